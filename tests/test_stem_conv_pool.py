"""ahnet_fast.ops.stem_conv_pool (AH-Net's conv1 + pool1) and its band-by-band CPU path against
conv3d + max_pool3d."""
import importlib
import json

import pytest
import torch

from ahnet_fast import BackendUnavailableError
from ahnet_fast.ops import aniso_conv
from ahnet_fast.ops.stem_conv_pool import slice_fold_conv_pool, stem_conv_pool
from tests.conftest import assert_close_normwise

# the module (ahnet_fast.ops exports the function under the same name)
stem_ops = importlib.import_module("ahnet_fast.ops.stem_conv_pool")

# (input shape, weight shape, bias, stride, padding, k): the stem's conv1 + pool1 (smaller), batch 2 with a
# bias, two input channels and a leftover slice that floor-mode pooling drops, a window of 3, no padding
# along the rows (the bands are plain slices of the input)
STEM_CASES = [
    ((1, 1, 13, 10, 8), (6, 1, 7, 7, 3), False, (2, 2, 1), (3, 3, 1), 2),
    ((2, 1, 9, 8, 6), (4, 1, 7, 7, 3), True, (2, 2, 1), (3, 3, 1), 2),
    ((1, 2, 7, 9, 9), (3, 2, 3, 5, 3), True, (1, 2, 1), (1, 2, 1), 2),
    ((1, 1, 6, 5, 10), (5, 1, 3, 3, 3), False, (1, 1, 1), (1, 1, 0), 3),
    ((2, 1, 9, 6, 6), (3, 1, 3, 3, 3), True, (2, 1, 1), (0, 1, 1), 2),
]


@pytest.mark.parametrize("case", STEM_CASES, ids=["stem", "n2-bias", "2ch-leftover", "k3", "n2-no-row-padding"])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30], ids=["chunked", "whole"])
def test_slice_fold_conv_pool_matches_conv_then_pool_float64(case, chunk_bytes, monkeypatch):
    shape, wshape, bias, stride, padding, k = case
    monkeypatch.setattr(stem_ops, "SLICE_CHUNK_BYTES", chunk_bytes)
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(wshape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(wshape[0], dtype=torch.float64, requires_grad=True) if bias else None
    params = [w] + ([b] if bias else [])
    y = slice_fold_conv_pool(x, w, b, stride, padding, k)
    ref = torch.nn.functional.max_pool3d(torch.nn.functional.conv3d(x, w, b, stride, padding), (1, 1, k), (1, 1, k))
    assert y.shape == ref.shape and y.is_contiguous()
    assert_close_normwise(y, ref, 1e-13, what="output")
    g = torch.randn_like(ref)
    for got, want, name in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g),
                               ("weight", "bias")):
        assert_close_normwise(got, want, 1e-13, what=f"grad {name}")
    assert torch.autograd.gradcheck(lambda *p: slice_fold_conv_pool(x, p[0], p[1] if bias else None,
                                                                               stride, padding, k),
                                    tuple(params) if bias else (w, None))


def test_slice_fold_conv_pool_refuses_an_input_that_needs_a_gradient():
    x = torch.randn(1, 1, 8, 8, 4, requires_grad=True)
    with pytest.raises(ValueError, match="must not need a gradient"):
        slice_fold_conv_pool(x, torch.randn(2, 1, 3, 3, 3), None, (1, 1, 1), (1, 1, 1), 2)


@pytest.fixture
def bands(monkeypatch):
    """Counts the calls that take the band-by-band path."""
    calls = []
    real = stem_ops.slice_fold_conv_pool

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(stem_ops, "slice_fold_conv_pool", spy)
    return calls


STEM = dict(stride=(2, 2, 1), padding=(3, 3, 1), window=2)


def _stem_args(dtype=torch.float64):
    x = torch.randn(1, 1, 32, 32, 32, dtype=dtype)
    w = torch.randn(64, 1, 7, 7, 3, dtype=dtype) * 0.1
    return x, w


def reference(x, w, b=None):
    conv = torch.nn.functional.conv3d(x, w, b, STEM["stride"], STEM["padding"])
    return torch.nn.functional.max_pool3d(conv, (1, 1, 2), (1, 1, 2))


def test_cpu_takes_the_bands_where_the_image_needs_no_gradient(bands, fresh_choices):
    x, w = _stem_args()
    y = stem_conv_pool(x, w, None, **STEM)
    assert len(bands) == 1
    assert_close_normwise(y, reference(x, w), 1e-13)
    # an input that needs a gradient, the reference backend, a forced aten path: the composition
    for kwargs, ctx in (({}, None), ({"backend": "reference"}, None), ({}, "aten")):
        xi = x.clone().requires_grad_() if not kwargs and ctx is None else x
        if ctx:
            with aniso_conv.use_path(ctx):
                y = stem_conv_pool(xi, w, None, **STEM, **kwargs)
        else:
            y = stem_conv_pool(xi, w, None, **STEM, **kwargs)
        assert_close_normwise(y, reference(x, w), 1e-13)
    assert len(bands) == 1


def test_gradients_through_every_backend_match_float64(fresh_choices):
    x, w = _stem_args()
    x = x[..., :8].contiguous()
    b = torch.randn(64, dtype=torch.float64)
    for backend in ("reference", "cpp"):
        for needs_grad in (False, True):
            xi = x.clone().requires_grad_(needs_grad)
            wi, bi = w.clone().requires_grad_(), b.clone().requires_grad_()
            y = stem_conv_pool(xi, wi, bi, **STEM, backend=backend)
            xr = x.clone().requires_grad_(needs_grad)
            wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
            ref = reference(xr, wr, br)
            assert_close_normwise(y, ref, 1e-13)
            g = torch.randn_like(ref)
            inputs = [wi, bi] + ([xi] if needs_grad else [])
            ref_inputs = [wr, br] + ([xr] if needs_grad else [])
            for got, want in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, ref_inputs, g)):
                assert_close_normwise(got, want, 1e-12)


def test_2d_stem_matches_conv2d_then_pool():
    x = torch.randn(2, 1, 20, 9, dtype=torch.float64)
    w = torch.randn(8, 1, 7, 3, dtype=torch.float64)
    ref = torch.nn.functional.max_pool2d(torch.nn.functional.conv2d(x, w, None, (2, 1), (3, 1)), (1, 2), (1, 2))
    for backend in ("reference", "cpp"):
        assert_close_normwise(stem_conv_pool(x, w, None, (2, 1), (3, 1), 2, backend=backend), ref, 1e-13)


def test_forced_triton_on_cpu_says_why_and_bad_arguments_are_named(monkeypatch):
    x, w = _stem_args(torch.float32)
    # in the interpreter (the tests' setting) the GPU path runs on CPU tensors, outside it says why not
    assert_close_normwise(stem_conv_pool(x, w, None, **STEM, backend="triton"), reference(x, w), 1e-5)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailableError, match="triton.*stem_conv_pool.*TRITON_INTERPRET"):
        stem_conv_pool(x, w, None, **STEM, backend="triton")
    with pytest.raises(ValueError, match="window"):
        stem_conv_pool(x[..., :2], w, None, (2, 2, 1), (3, 3, 0), 2)
    with pytest.raises(ValueError, match="weight"):
        stem_conv_pool(x, w[:, :, :, :, :1].expand(64, 2, 7, 7, 1), None, **STEM)
    with pytest.raises(ValueError, match="bias"):
        stem_conv_pool(x, w, torch.zeros(3), **STEM)


def test_autocast_and_a_loaded_aten_choice_keep_the_composition(bands, fresh_choices, tmp_path):
    x, w = _stem_args(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stem_conv_pool(x, w, None, **STEM)  # conv's autocast casting stays autograd's
    assert not bands
    stem_conv_pool(x, w, None, **STEM)
    assert len(bands) == 1
    stem_keys = [k for k, v in aniso_conv.choices().items() if v["path"] == "slice_fold"]
    assert stem_keys
    aniso_conv.clear_choices()
    path = tmp_path / "paths.json"
    path.write_text(json.dumps({k: {"path": "aten"} for k in stem_keys}))
    aniso_conv.load_choices(str(path))  # a loaded choice of aten for conv1 is honoured
    y = stem_conv_pool(x, w, None, **STEM)
    assert len(bands) == 1
    assert_close_normwise(y, reference(x, w), 1e-5)


def test_the_model_stem_runs_through_the_op(bands):
    from ahnet_fast.nn.ahnet import AHNet

    net = AHNet(in_channels=1, out_channels=2, psp_block_num=1).double().eval()
    x = torch.randn(1, 1, 32, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        net(x)
    assert len(bands) == 1


@pytest.fixture
def fresh_choices():
    saved = aniso_conv.choices()
    aniso_conv.clear_choices()
    aniso_conv.set_tuning(False)
    yield
    aniso_conv.clear_choices()
    aniso_conv.set_tuning(None)
    aniso_conv._choices.update(saved)


def dispatch_sample():
    """One call of the op for tests/test_dispatch.py's contract over every registered op: (run(backend) ->
    output, the arguments its table's reasons take)."""
    from ahnet_fast import ops

    torch.manual_seed(0)
    x = torch.randn(1, 1, 12, 12, 6, dtype=torch.float64)
    w = torch.randn(4, 1, 7, 7, 3, dtype=torch.float64) * 0.1
    return (lambda be: ops.stem_conv_pool(x, w, None, (2, 2, 1), (3, 3, 1), 2, backend=be)), (x, w)
