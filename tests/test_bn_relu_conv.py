"""BN-ReLU-convolution op (keeps only its input for backward) against the reference composition."""
import os

import pytest
import torch

import ahnet_fast
from ahnet_fast.ops import bn_relu_conv, bn_relu_conv_reference, _conv_paths as conv_paths
from benchmarks._common import saved_bytes
from tests.conftest import assert_close_normwise, rel_err

needs_ext = pytest.mark.skipif(not ahnet_fast.extension_available(), reason="compiled extension not built")

# (kernel, stride, input shape): every kernel AH-Net uses, its strided 3x3x1, odd sizes, and 2D
CASES = [
    ((1, 1, 1), (1, 1, 1), (2, 6, 5, 4, 3)),
    ((3, 3, 1), (1, 1, 1), (2, 5, 7, 6, 3)),
    ((1, 1, 3), (1, 1, 1), (1, 4, 5, 3, 7)),
    ((3, 3, 1), (2, 2, 1), (2, 4, 7, 9, 2)),
    ((1, 1, 1), (2, 2, 1), (1, 6, 6, 5, 2)),
    ((3, 1), (1, 1), (2, 5, 7, 6)),
    ((1, 3), (1, 1), (2, 3, 5, 6)),
]
IDS = ["1x1x1", "3x3x1", "1x1x3", "3x3x1-s2", "1x1x1-s2", "2d-3x1", "2d-1x3"]


def params(channels, out_channels, kernel, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    bw = (torch.rand(channels, generator=g, dtype=dtype) + 0.5)
    bb = torch.randn(channels, generator=g, dtype=dtype) * 0.3
    rm = torch.randn(channels, generator=g, dtype=dtype) * 0.2
    rv = torch.rand(channels, generator=g, dtype=dtype) + 0.5
    w = torch.randn(out_channels, channels, *kernel, generator=g, dtype=dtype) * 0.3
    return bw, bb, rm, rv, w


def run(backend, x, bw, bb, rm, rv, w, stride, training, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (x, bw, bb, w)]
    rm, rv = rm.clone(), rv.clone()
    y = bn_relu_conv(leaves[0], rm, rv, leaves[1], leaves[2], training, 0.1, 1e-5, leaves[3], stride, backend=backend)
    grads = torch.autograd.grad(y, leaves, grad)
    return y.detach(), grads, rm, rv


def layout(x, kind):
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)
    if kind == "channel_prefix":  # the first channels of a bigger buffer, as a dense block reads them
        buf = torch.zeros((x.shape[0], x.shape[1] + 3, *x.shape[2:]), dtype=x.dtype)
        buf[:, :x.shape[1]].copy_(x)
        return buf[:, :x.shape[1]]
    if kind == "strided":
        buf = torch.zeros((*x.shape[:-1], 2 * x.shape[-1]), dtype=x.dtype)[..., ::2]
        buf.copy_(x)
        return buf
    return x


@needs_ext
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_reference_float64(case, training):
    kernel, stride, shape = case
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    bw, bb, rm, rv, w = params(shape[1], 5, kernel)
    ref_y = bn_relu_conv_reference(x, rm.clone(), rv.clone(), bw, bb, training, 0.1, 1e-5, w, stride)
    grad = torch.randn(ref_y.shape, dtype=torch.float64)
    ref = run("reference", x, bw, bb, rm, rv, w, stride, training, grad)
    got = run("cpp", x, bw, bb, rm, rv, w, stride, training, grad)
    assert_close_normwise(got[0], ref[0], 1e-12, what="y")
    for a, b, name in zip(got[1], ref[1], ("dx", "d bn weight", "d bn bias", "d conv weight")):
        assert_close_normwise(a, b, 1e-11, atol=1e-13, what=name)
    assert_close_normwise(got[2], ref[2], 1e-14, what="running_mean")
    assert_close_normwise(got[3], ref[3], 1e-14, what="running_var")


@needs_ext
@pytest.mark.parametrize("kind", ["channels_last", "channel_prefix", "strided"])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3], CASES[5]], ids=["3x3x1", "1x1x3", "3x3x1-s2", "2d"])
def test_layouts_float32(case, kind):
    """fp32 within 1e-5 of the float64 reference, whatever the input's layout; channels-last in,
    channels-last out."""
    kernel, stride, shape = case
    x64 = torch.randn(shape, dtype=torch.float64)
    bw, bb, rm, rv, w = params(shape[1], 4, kernel)
    y64 = bn_relu_conv_reference(x64, rm.clone(), rv.clone(), bw, bb, True, 0.1, 1e-5, w, stride)
    grad = torch.randn(y64.shape, dtype=torch.float64)
    ref = run("reference", x64, bw, bb, rm, rv, w, stride, True, grad)
    x = layout(x64.float(), kind)
    got = run("cpp", x, *(t.float() for t in (bw, bb, rm, rv, w)), stride, True, grad.float())
    assert_close_normwise(got[0], ref[0], 1e-5, what="y")
    for a, b in zip(got[1], ref[1]):
        assert_close_normwise(a, b, 1e-5, atol=1e-6)
    if kind == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_torch_error(dtype):
    """Judged as flash-attention is: error vs the float64 reference at most twice that of PyTorch's own
    computation in the same dtype, plus a small atol."""
    torch.manual_seed(3)
    shape = (2, 8, 9, 7, 4)
    x64 = torch.randn(shape, dtype=torch.float64)
    bw, bb, rm, rv, w = params(8, 6, (3, 3, 1))
    grad = torch.randn(2, 6, 9, 7, 4, dtype=torch.float64)
    ref = run("reference", x64, bw, bb, rm, rv, w, (1, 1, 1), True, grad)
    cast = [t.to(dtype) for t in (x64, bw, bb, rm, rv, w)]
    theirs = run("reference", *cast, (1, 1, 1), True, grad.to(dtype))
    ours = run("cpp", *cast, (1, 1, 1), True, grad.to(dtype))
    for a, b, r in zip((ours[0], *ours[1]), (theirs[0], *theirs[1]), (ref[0], *ref[1])):
        assert rel_err(a, r) <= 2 * rel_err(b, r) + 1e-3


@needs_ext
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3], CASES[6]], ids=["3x3x1", "1x1x3", "3x3x1-s2", "2d"])
def test_gradcheck(case, training):
    kernel, stride, shape = case
    shape = (shape[0], 3, *shape[2:])
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    bw, bb, rm, rv, w = (t.requires_grad_() if i in (0, 1, 4) else t for i, t in enumerate(params(3, 2, kernel)))

    def f(x, bw, bb, w):
        return bn_relu_conv(x, rm.clone(), rv.clone(), bw, bb, training, 0.1, 1e-5, w, stride, backend="cpp")

    assert torch.autograd.gradcheck(f, (x, bw, bb, w), eps=1e-6, atol=1e-6, rtol=1e-5)


@needs_ext
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[2], CASES[3], CASES[5]],
                         ids=["1x1x1", "3x3x1", "1x1x3", "3x3x1-s2", "2d"])
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_opcheck(case, kind):
    kernel, stride, shape = case
    x = layout(torch.randn(shape), kind)
    bw, bb, rm, rv, w = (t.float() for t in params(shape[1], 3, kernel))
    op = torch.ops.ahnet_fast.bn_relu_conv.default
    stride, padding = list(stride), [(k - 1) // 2 for k in kernel]
    torch.library.opcheck(op, (x, bw, bb, None, None, True, 1e-5, w, stride, padding))
    torch.library.opcheck(op, (x, bw, bb, rm, rv, False, 1e-5, w, stride, padding))
    leaves = [t.clone().requires_grad_() for t in (x, bw, bb, w)]
    torch.library.opcheck(op, (leaves[0], leaves[1], leaves[2], None, None, True, 1e-5, leaves[3], stride, padding))
    # the backward op too (autograd calls it; torch.compile traces it through its fake)
    y, mean, var = op(x, bw, bb, None, None, True, 1e-5, w, stride, padding)
    grad = torch.randn(y.shape).contiguous(memory_format=conv_paths.output_format(x))
    for training in (True, False):
        torch.library.opcheck(torch.ops.ahnet_fast.bn_relu_conv_backward.default,
                              (grad, x, bw, bb, mean, var, training, 1e-5, w, stride, padding))


@needs_ext
def test_keeps_only_the_input():
    """What autograd keeps: x, the parameters and two statistics; the reference also keeps the
    normalised activation (one more tensor of x's size)."""
    x = torch.randn(2, 16, 12, 10, 4, requires_grad=True)
    bw, bb, rm, rv, w = (t.float() for t in params(16, 8, (3, 3, 1)))
    bw.requires_grad_(), w.requires_grad_()
    f = {b: (lambda b=b: bn_relu_conv(x, rm, rv, bw, bb, True, 0.1, 1e-5, w, backend=b)) for b in ("reference", "cpp")}
    ours, _ = saved_bytes(f["cpp"], exclude=(bw, bb, w))
    theirs, _ = saved_bytes(f["reference"], exclude=(bw, bb, w))
    x_bytes = x.numel() * 4
    assert ours <= x_bytes + 1024
    assert theirs >= 2 * x_bytes


def test_bad_input_is_a_value_error():
    x = torch.randn(2, 4, 5, 5, 3)
    bw, bb, rm, rv, w = (t.float() for t in params(4, 3, (3, 3, 1)))
    with pytest.raises(ValueError, match="weight of shape"):
        bn_relu_conv(x, rm, rv, bw, bb, True, 0.1, 1e-5, w[:, :3])
    with pytest.raises(ValueError, match="bn_weight has 3 elements"):
        bn_relu_conv(x, rm, rv, bw[:3], bb, True, 0.1, 1e-5, w)
    with pytest.raises(ValueError, match="stride must be 3"):
        bn_relu_conv(x, rm, rv, bw, bb, True, 0.1, 1e-5, w, stride=(1, 1))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn_relu_conv(x[:1, :, :1, :1, :1], rm, rv, bw, bb, True, 0.1, 1e-5, w, padding=(0, 0, 0))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        bn_relu_conv(x[0, 0], rm, rv, bw, bb, True, 0.1, 1e-5, w)


# ---------------------------------------------------------------------------------------------
# Triton (interpreted on CPU; on CUDA on a GPU machine)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_here = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1", reason="needs a GPU or TRITON_INTERPRET=1")


@triton_here
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES[:5], ids=IDS[:5])
def test_triton_matches_reference(case, training):
    pytest.importorskip("triton")
    kernel, stride, shape = case
    x64 = torch.randn(shape, dtype=torch.float64) + 0.3
    bw, bb, rm, rv, w = params(shape[1], 5, kernel)
    y64 = bn_relu_conv_reference(x64, rm.clone(), rv.clone(), bw, bb, training, 0.1, 1e-5, w, stride)
    grad = torch.randn(y64.shape, dtype=torch.float64)
    ref = run("reference", x64, bw, bb, rm, rv, w, stride, training, grad)
    args = [t.float().to(DEVICE) for t in (x64, bw, bb, rm, rv, w)]
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # exact fp32 in the kernel for the 1e-5 comparison
    try:
        got = run("triton", *args, stride, training, grad.float().to(DEVICE))
    finally:
        torch.backends.cudnn.allow_tf32 = prev
    assert_close_normwise(got[0].cpu(), ref[0], 1e-5, what="y")
    for a, b, name in zip(got[1], ref[1], ("dx", "d bn weight", "d bn bias", "d conv weight")):
        assert_close_normwise(a.cpu(), b, 1e-5, atol=1e-6, what=name)
    assert_close_normwise(got[2].cpu(), ref[2], 1e-6, what="running_mean")
    assert_close_normwise(got[3].cpu(), ref[3], 1e-6, what="running_var")


@needs_ext
@pytest.mark.parametrize("kernel,stride,shape", [((1, 1, 1), (1, 1, 1), (1, 6, 5, 4, 3)),
                                                 ((3, 3, 1), (1, 1, 1), (1, 5, 7, 6, 3)),
                                                 ((1, 1, 3), (1, 1, 1), (2, 4, 5, 3, 7))], ids=IDS[:3])
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_results_do_not_share_the_scratch_pool(kernel, stride, shape, kind):
    """The cpp backend recomputes the activation in a pooled scratch buffer (ahnet_fast._scratch)
    and may write the BatchNorm gradient over the convolution's: nothing it returns may be a view of
    the pool, so a second call (which reuses the pool) leaves the first call's results unchanged."""
    from ahnet_fast import _scratch as scratch

    bw, bb, rm, rv, w = params(shape[1], 3, kernel, torch.float32)
    first_x = layout(torch.randn(shape), kind)
    y1, g1, _, _ = run("cpp", first_x, bw, bb, rm, rv, w, stride, True, torch.randn(shape[0], 3, *shape[2:]))
    kept = [y1.clone(), *(g.clone() for g in g1)]
    pool_before = scratch.pooled_bytes()
    assert pool_before > 0  # the pool was used
    second_x = layout(torch.randn(shape) * 3 + 1, kind)
    run("cpp", second_x, bw, bb, rm, rv, w, stride, True, torch.randn(shape[0], 3, *shape[2:]))
    for a, b in zip([y1, *g1], kept):
        assert torch.equal(a, b)


def dispatch_sample():
    """One call of the op for tests/test_dispatch.py's contract over every registered op: (run(backend) ->
    output, the arguments its table's reasons take)."""
    from ahnet_fast import ops
    from tests.test_bn_relu import bn_sample_arguments

    x, mean, var, w, b = bn_sample_arguments()
    conv_w = torch.randn(5, 4, 3, 3, 1, dtype=torch.float64) * 0.2
    return (lambda be: ops.bn_relu_conv(x, mean.clone(), var.clone(), w, b, True, 0.1, 1e-5, conv_w, backend=be)), \
        (x, conv_w)


@needs_ext
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "channel_prefix"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_inference_in_bands_matches_reference(case, kind, training, monkeypatch):
    """Without a backward to follow, the unit runs as plain Python, in eval mode in bands of rows
    (ops._bands; here two or three rows a band, the last one shorter, so every band boundary and
    both map edges are crossed by the 3-row kernels): within 1e-5 of the float64 oracle, every
    layout, the running statistics updated as with a backward to follow."""
    from ahnet_fast.ops import _bands

    kernel, stride, shape = case
    bw, bb, rm, rv, w = params(shape[1], 4, kernel)
    x64 = torch.randn(shape, dtype=torch.float64)
    ref = bn_relu_conv_reference(x64, rm.clone(), rv.clone(), bw, bb, training, 0.1, 1e-5, w, stride)
    per_row = shape[0] * shape[1] * 4 * torch.tensor(shape[3:]).prod().item()
    monkeypatch.setattr(_bands, "BAND_BYTES", 2 * per_row + 1)
    x = layout(x64.float(), kind)
    f32 = [t.float() for t in (bw, bb, rm, rv, w)]
    stats = [f32[2].clone(), f32[3].clone()]
    with torch.no_grad():
        got = bn_relu_conv(x, stats[0], stats[1], f32[0], f32[1], training, 0.1, 1e-5, f32[4], stride, backend="cpp")
    assert_close_normwise(got, ref, 1e-5)
    expected = [f32[2].clone(), f32[3].clone()]
    bn_relu_conv(x, expected[0], expected[1], f32[0], f32[1], training, 0.1, 1e-5, f32[4].requires_grad_(), stride,
                 backend="cpp")
    for a, b in zip(stats, expected):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


@needs_ext
@pytest.mark.parametrize("kernel", [(3, 2, 1), (3, 1, 2), (2, 3, 1)])
def test_inference_with_an_even_kernel_is_not_banded(kernel, monkeypatch):
    """An even kernel with padding (k - 1) // 2 shrinks its axis: not banded (the banded output has the
    input's size), the whole map at once, equal to the reference."""
    from ahnet_fast.ops import _bands

    monkeypatch.setattr(_bands, "BAND_BYTES", 1)  # one row a band, where banding applies
    bw, bb, rm, rv, w = params(4, 3, kernel)
    x = torch.randn(1, 4, 5, 6, 3, dtype=torch.float64)
    ref = bn_relu_conv_reference(x, rm, rv, bw, bb, False, 0.1, 1e-5, w)
    with torch.no_grad():
        got = bn_relu_conv(x, rm.clone(), rv.clone(), bw, bb, False, 0.1, 1e-5, w, backend="cpp")
    assert got.shape == ref.shape
    assert_close_normwise(got, ref, 1e-12)


@needs_ext
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "channel_prefix"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[2], CASES[5]], ids=["1x1x1", "3x3x1", "1x1x3", "2d-3x1"])
def test_backward_in_bands_where_memory_comes_first(case, kind, training, monkeypatch):
    """A forward run with the scratch pool not kept (inside activation checkpointing) has its backward
    run in bands of rows (two a band: every boundary and both edges crossed by the 3-row kernels):
    gradients within 1e-11 of the float64 oracle's; with the pool kept the backward is the whole map."""
    from ahnet_fast import _scratch as scratch
    from ahnet_fast.ops import _bands

    kernel, stride, shape = case
    bw, bb, rm, rv, w = params(shape[1], 4, kernel)
    x = layout(torch.randn(shape, dtype=torch.float64), kind)
    grad = torch.randn((shape[0], 4, *shape[2:]), dtype=torch.float64)
    ref = run("reference", x, bw, bb, rm, rv, w, stride, training, grad)
    per_row = shape[0] * max(shape[1], 4) * 8 * torch.tensor(shape[3:]).prod().item()
    monkeypatch.setattr(_bands, "BAND_BYTES", 2 * per_row)
    calls = []
    original = _bands.conv_backward_banded
    monkeypatch.setattr(_bands, "conv_backward_banded", lambda *a, **k: calls.append(1) or original(*a, **k))
    for keep in (False, True):
        scratch.push_keep(keep)
        try:
            got = run("cpp", x, bw, bb, rm, rv, w, stride, training, grad)
        finally:
            scratch.pop_keep()
        assert bool(calls) == (not keep), keep
        calls.clear()
        assert_close_normwise(got[0], ref[0], 1e-12)
        for a, b in zip(got[1], ref[1]):
            assert_close_normwise(a, b, 1e-11, atol=1e-13)


@needs_ext
def test_banded_bf16_weight_gradient_is_summed_in_float32(monkeypatch):
    """A banded backward with a band per row sums hundreds of per-band weight gradients: in float32, so
    bf16's error stays that of the whole-map backward (within 2x of it, against the float64 oracle)."""
    from ahnet_fast import _scratch as scratch
    from ahnet_fast.ops import _bands

    bw, bb, rm, rv, w = params(8, 4, (3, 3, 1))
    x = torch.randn(1, 8, 256, 4, 4, dtype=torch.float64)
    grad = torch.randn(1, 4, 256, 4, 4, dtype=torch.float64)
    ref = run("reference", x, bw, bb, rm, rv, w, [1, 1, 1], True, grad)
    low = [t.bfloat16() for t in (x, bw, bb, rm, rv, w, grad)]
    errors = {}
    for keep, band_bytes in ((True, 10 ** 12), (False, 1)):
        monkeypatch.setattr(_bands, "BAND_BYTES", band_bytes)
        scratch.push_keep(keep)
        try:
            got = run("cpp", *low[:6], [1, 1, 1], True, low[6])
        finally:
            scratch.pop_keep()
        errors[keep] = rel_err(got[1][3].double(), ref[1][3])
    assert errors[False] <= 2 * errors[True] + 1e-3, errors
