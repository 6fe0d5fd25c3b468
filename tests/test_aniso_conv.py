"""The convolution paths (ahnet_fast.ops._conv_paths) against ATen, and their recorded, reproducible choice
(ahnet_fast.ops.aniso_conv)."""
import json

import importlib

import pytest
import torch

from ahnet_fast.ops import _conv_paths as conv_paths, aniso_conv, channel_mm
from tests.conftest import assert_close_normwise, rel_err

# the module (ahnet_fast.ops exports the function under the same name)
stem_ops = importlib.import_module("ahnet_fast.ops.stem_conv_pool")

A = torch.ops.aten

# (kernel, input shape, out channels): AH-Net's kernels, odd sizes, batch > 1, 2D
CASES = [
    ((1, 1, 1), (1, 6, 5, 4, 3), 7),
    ((1, 1, 1), (2, 6, 5, 4, 3), 3),
    ((3, 3, 1), (1, 5, 7, 6, 3), 3),
    ((3, 3, 1), (2, 8, 5, 9, 2), 4),
    ((1, 1, 3), (2, 4, 5, 3, 7), 4),
    ((3, 1), (2, 5, 7, 6), 3),
    ((1, 3), (1, 3, 5, 6), 2),
]
IDS = ["1x1x1", "1x1x1-n2", "3x3x1", "3x3x1-n2", "1x1x3", "2d-3x1", "2d-1x3"]


def aten_pair(x, w, g):
    nd = x.dim() - 2
    pad = [(k - 1) // 2 for k in w.shape[2:]]
    y = A.convolution(x, w, None, [1] * nd, pad, [1] * nd, False, [0] * nd, 1)
    ga, gw, _ = A.convolution_backward(g, x, w, None, [1] * nd, pad, [1] * nd, False, [0] * nd, 1, [True, True, False])
    return y, ga, gw


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_every_candidate_matches_aten_float64(case, layout):
    kernel, shape, co = case
    x = torch.randn(shape, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)
    elif layout == "strided":
        x = torch.zeros((*shape[:-1], 2 * shape[-1]), dtype=torch.float64)[..., ::2].copy_(x)
    w = torch.randn(co, shape[1], *kernel, dtype=torch.float64)
    pad = [(k - 1) // 2 for k in kernel]
    stride = [1] * len(kernel)
    ref_y = A.convolution(x.contiguous(), w, None, stride, pad, [1] * len(kernel), False, [0] * len(kernel), 1)
    g = torch.randn(ref_y.shape, dtype=torch.float64)
    _, ref_ga, ref_gw = aten_pair(x.contiguous(), w, g)
    paths = aniso_conv.candidates(x, w, stride, pad)
    assert "aten" in paths
    if all(k == 1 for k in kernel):
        assert "matmul" in paths
    if layout != "channels_last" and any(k > 1 for k in kernel):
        assert "shift" in paths
    for path in paths:
        y = conv_paths.forward(path, x, w, stride, pad)
        ga, gw = conv_paths.backward(path, g, x, w, stride, pad)
        assert_close_normwise(y, ref_y, 1e-13, what=f"{path} y")
        assert_close_normwise(ga, ref_ga, 1e-13, what=f"{path} grad input")
        assert_close_normwise(gw, ref_gw, 1e-13, what=f"{path} grad weight")
        if layout == "channels_last" and path != "folded":
            assert y.is_contiguous(memory_format=conv_paths.output_format(x)), path


@pytest.mark.parametrize("case", [c for c in CASES if any(k > 1 for k in c[0])],
                         ids=[i for c, i in zip(CASES, IDS) if any(k > 1 for k in c[0])])
@pytest.mark.parametrize("chunks", [2, 3, 9])
def test_shift_backward_in_tap_groups_matches_aten_float64(case, chunks):
    # Large convolutions run the shift path's backward in groups of taps (grad_a accumulated in
    # place, batch 1 and batch > 1 taking different in-place products); tiny test shapes would
    # never reach the size threshold, so the grouping is forced here.
    kernel, shape, co = case
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(co, shape[1], *kernel, dtype=torch.float64)
    g = torch.randn((shape[0], co, *shape[2:]), dtype=torch.float64)
    _, ref_ga, ref_gw = aten_pair(x, w, g)
    ga, gw = conv_paths._shift_backward(g, x, w, chunks=chunks)
    assert_close_normwise(ga, ref_ga, 1e-13, what="grad input")
    assert_close_normwise(gw, ref_gw, 1e-13, what="grad weight")


def test_shift_backward_groups_taps_past_the_size_threshold(monkeypatch):
    x = torch.randn(1, 4, 6, 5, 3, dtype=torch.float64)
    w = torch.randn(3, 4, 3, 3, 1, dtype=torch.float64)
    g = torch.randn(1, 3, 6, 5, 3, dtype=torch.float64)
    added = []
    real_addmm_ = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda self, *a: added.append(1) or real_addmm_(self, *a))
    monkeypatch.setattr(conv_paths, "SHIFT_CHUNK_BYTES", g.numel() * 8 * 3)  # three taps per group
    ga, gw = conv_paths._shift_backward(g, x, w)
    _, ref_ga, ref_gw = aten_pair(x, w, g)
    assert_close_normwise(ga, ref_ga, 1e-13, what="grad input")
    assert_close_normwise(gw, ref_gw, 1e-13, what="grad weight")
    assert len(added) == 2  # the first group of three taps allocates grad_a; the other two add into it


# kernels whose first axis is longer than 1, which the size threshold sends to the by-rows grouping:
# 3x3x1 (batch 1 and 2), a full 3x3x3, a 5x3x1 (two padding rows each side), 2D (3, 3) and (3, 1)
ROW_CASES = [
    ((3, 3, 1), (1, 5, 7, 6, 3), 3),
    ((3, 3, 1), (2, 4, 5, 9, 2), 4),
    ((3, 3, 3), (1, 3, 5, 4, 5), 2),
    ((5, 3, 1), (2, 3, 7, 5, 3), 3),
    ((3, 3), (2, 4, 7, 6), 3),
    ((3, 1), (1, 5, 6, 5), 2),
]


@pytest.mark.parametrize("case", ROW_CASES, ids=["3x3x1", "3x3x1-n2", "3x3x3", "5x3x1-n2", "2d-3x3-n2", "2d-3x1"])
def test_shift_backward_by_rows_matches_aten_float64(case, monkeypatch):
    kernel, shape, co = case
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(co, shape[1], *kernel, dtype=torch.float64)
    g = torch.randn((shape[0], co, *shape[2:]), dtype=torch.float64)
    monkeypatch.setattr(conv_paths, "SHIFT_CHUNK_BYTES", g[0].numel() * 8)  # every kernel is past it
    used = []
    real = conv_paths._shift_backward_by_rows
    monkeypatch.setattr(conv_paths, "_shift_backward_by_rows", lambda *a: used.append(1) or real(*a))
    ga, gw = conv_paths._shift_backward(g, x, w)
    assert used, "the by-rows grouping did not run"
    _, ref_ga, ref_gw = aten_pair(x, w, g)
    assert_close_normwise(ga, ref_ga, 1e-13, what="grad input")
    assert_close_normwise(gw, ref_gw, 1e-13, what="grad weight")
    assert ga.shape == x.shape and gw.shape == w.shape and ga.is_contiguous()


def test_folded_is_a_candidate_for_contiguous_anisotropic_kernels():
    x = torch.randn(1, 4, 6, 5, 3)
    assert "folded" in aniso_conv.candidates(x, torch.randn(2, 4, 3, 3, 1), [1, 1, 1], [1, 1, 0])
    assert "folded" in aniso_conv.candidates(x, torch.randn(2, 4, 1, 1, 3), [1, 1, 1], [0, 0, 1])
    assert "folded" not in aniso_conv.candidates(x, torch.randn(2, 4, 3, 3, 1), [2, 2, 1], [1, 1, 0])
    assert aniso_conv.candidates(x, torch.randn(2, 4, 3, 3, 1), [2, 2, 1], [1, 1, 0]) == ["aten"]


# (weight shape, input shape, stride, padding): the stem's conv1 (smaller), batch > 1, two input
# channels, no slice padding, a 5-deep kernel with odd sizes
SLICE_FOLD_CASES = [
    ((6, 1, 7, 7, 3), (1, 1, 13, 10, 5), (2, 2, 1), (3, 3, 1)),
    ((4, 1, 7, 7, 3), (2, 1, 9, 8, 4), (2, 2, 1), (3, 3, 1)),
    ((3, 2, 3, 5, 3), (1, 2, 7, 9, 6), (1, 2, 1), (1, 0, 1)),
    ((5, 1, 3, 3, 3), (1, 1, 6, 5, 4), (1, 1, 1), (1, 1, 0)),
    ((2, 3, 3, 3, 5), (2, 3, 5, 7, 9), (2, 1, 1), (0, 1, 2)),
]


@pytest.mark.parametrize("case", SLICE_FOLD_CASES, ids=["stem", "stem-n2", "ci2", "no-slice-pad", "kd5"])
def test_slice_fold_matches_aten_float64(case):
    wshape, shape, stride, pad = case
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(wshape, dtype=torch.float64)
    b = torch.randn(wshape[0], dtype=torch.float64)
    assert "slice_fold" in aniso_conv.candidates(x, w, stride, pad)
    ref_y = A.convolution(x, w, None, list(stride), list(pad), [1, 1, 1], False, [0, 0, 0], 1)
    g = torch.randn(ref_y.shape, dtype=torch.float64)
    ref_ga, ref_gw, _ = A.convolution_backward(g, x, w, None, list(stride), list(pad), [1, 1, 1], False, [0, 0, 0],
                                               1, [True, True, False])
    assert_close_normwise(conv_paths.forward("slice_fold", x, w, stride, pad), ref_y, 1e-13, what="y")
    ga, gw = conv_paths.backward("slice_fold", g, x, w, stride, pad)
    assert_close_normwise(ga, ref_ga, 1e-13, what="grad input")
    assert_close_normwise(gw, ref_gw, 1e-13, what="grad weight")
    # the differentiable entry the stem uses: slice axis outermost in memory, bias, gradcheck
    with aniso_conv.use_path("slice_fold"):
        y = stem_ops.conv3d(x, w, b, stride, pad)
        assert_close_normwise(y, torch.nn.functional.conv3d(x, w, b, stride, pad), 1e-13, what="conv3d")
        assert y.stride(4) > y.stride(1)  # slice axis outside the channels
        assert torch.autograd.gradcheck(lambda *t: stem_ops.conv3d(t[0], t[1], t[2], stride, pad),
                                        (x[..., :4].clone().requires_grad_(), w.clone().requires_grad_(),
                                         b.clone().requires_grad_()))


def test_slice_fold_candidates_and_rule(fresh_choices):
    aniso_conv.set_tuning(False)
    x = torch.randn(1, 1, 16, 16, 6)
    stem = torch.randn(8, 1, 7, 7, 3)
    assert aniso_conv.choose("forward", x, stem, [2, 2, 1], [3, 3, 1]) == "slice_fold"
    assert "slice_fold" not in aniso_conv.candidates(x, stem, [2, 2, 2], [3, 3, 1])  # strided slices
    assert "slice_fold" not in aniso_conv.candidates(x, torch.randn(8, 1, 3, 3, 1), [1, 1, 1], [1, 1, 0])
    wide = torch.randn(1, 6, 16, 16, 6)  # 6 channels x 3 taps > SLICE_FOLD_MAX_CHANNELS
    assert "slice_fold" not in aniso_conv.candidates(wide, torch.randn(8, 6, 7, 7, 3), [2, 2, 1], [3, 3, 1])
    with aniso_conv.use_path("aten"):  # forcing aten keeps conv3d's own output layout
        assert stem_ops.conv3d(x, stem, None, [2, 2, 1], [3, 3, 1]).is_contiguous()


def test_slice_fold_output_feeds_slice_max_pooling_in_place():
    """The stem: the folded convolution's output (slice axis outermost) pooled over slice pairs by
    the compiled kernel straight into a contiguous map, as conv3d + max_pool3d would give."""
    from ahnet_fast.ops.slice_max_pool import slice_max_pool

    x = torch.randn(1, 1, 20, 18, 8, dtype=torch.float64)
    w = torch.randn(6, 1, 7, 7, 3, dtype=torch.float64, requires_grad=True)
    with aniso_conv.use_path("slice_fold"):
        y = stem_ops.conv3d(x, w, None, [2, 2, 1], [3, 3, 1])
    assert not y.is_contiguous() and y.stride(4) == max(y.stride()[1:])
    pooled = slice_max_pool(y, 2)
    assert pooled.is_contiguous()
    ref = torch.nn.functional.max_pool3d(torch.nn.functional.conv3d(x, w, None, [2, 2, 1], [3, 3, 1]), (1, 1, 2))
    assert_close_normwise(pooled, ref, 1e-13)
    g = torch.randn(ref.shape, dtype=torch.float64)
    assert_close_normwise(torch.autograd.grad(pooled, w, g)[0], torch.autograd.grad(ref, w, g)[0], 1e-13)


def test_slice_fold_compiles_without_graph_breaks():
    x = torch.randn(1, 1, 16, 16, 6)
    w = torch.randn(4, 1, 7, 7, 3, requires_grad=True)
    fn = lambda t: stem_ops.conv3d(t, w, None, [2, 2, 1], [3, 3, 1]).sum()  # noqa: E731
    assert torch._dynamo.explain(fn)(x).graph_break_count == 0
    assert_close_normwise(torch.compile(fn, backend="aot_eager")(x),
                          torch.nn.functional.conv3d(x, w, None, [2, 2, 1], [3, 3, 1]).sum(), 1e-5)


@pytest.fixture
def fresh_choices():
    saved = aniso_conv.choices()
    aniso_conv.clear_choices()
    yield
    aniso_conv.clear_choices()
    aniso_conv.set_tuning(None)
    aniso_conv._choices.update(saved)


def test_static_rule_is_recorded(fresh_choices):
    aniso_conv.set_tuning(False)
    a = torch.randn(1, 16, 8, 8, 4)
    assert aniso_conv.choose("forward", a, torch.randn(8, 16, 1, 1, 1), [1, 1, 1], [0, 0, 0]) == "matmul"
    assert aniso_conv.choose("forward", a, torch.randn(3, 16, 3, 3, 1), [1, 1, 1], [1, 1, 0]) == "shift"
    # where ops.channel_mm's convolution kernels run (float32, AVX-512): the shift path on them at any
    # size; elsewhere: small inputs' slices folded into a 2D convolution, from FOLDED_MAX_BYTES up
    # oneDNN's 3D one
    kernel = channel_mm.kernel_isa() == "avx512"
    assert aniso_conv.choose("forward", a, torch.randn(64, 16, 3, 3, 1), [1, 1, 1], [1, 1, 0]) == \
        ("shift" if kernel else "folded")
    assert aniso_conv.choose("forward", a.double(), torch.randn(64, 16, 3, 3, 1).double(), [1, 1, 1],
                             [1, 1, 0]) == "folded"
    assert aniso_conv.choose("backward", a, torch.randn(64, 16, 3, 3, 1), [1, 1, 1], [1, 1, 0]) == \
        ("shift" if kernel else "folded")
    # a weight gradient past the kernel's 2^16 elements: folded / oneDNN
    assert aniso_conv.choose("backward", a, torch.randn(512, 16, 3, 3, 1), [1, 1, 1], [1, 1, 0]) == "folded"
    big = torch.randn(1, 16, 64, 64, 8)  # 2 MiB
    assert aniso_conv.choose("forward", big, torch.randn(64, 16, 3, 3, 1), [1, 1, 1], [1, 1, 0]) == \
        ("shift" if kernel else "aten")
    assert aniso_conv.choose("backward", big, torch.randn(64, 16, 3, 3, 1), [1, 1, 1], [1, 1, 0]) == \
        ("shift" if kernel else "aten")
    assert aniso_conv.choose("forward", a, torch.randn(8, 16, 3, 3, 1), [2, 2, 1], [1, 1, 0]) == "aten"
    table = aniso_conv.choices()
    assert len(table) == 9 and all(v["reason"] == "rule" for v in table.values())


def test_tuning_measures_and_saved_choices_reload(fresh_choices, tmp_path):
    aniso_conv.set_tuning(True)
    a = torch.randn(1, 16, 8, 8, 4)
    w = torch.randn(4, 16, 3, 3, 1)
    path = aniso_conv.choose("backward", a, w, [1, 1, 1], [1, 1, 0])
    (key, entry), = aniso_conv.choices().items()
    assert entry["reason"] == "measured" and set(entry["ms"]) == {"aten", "shift", "folded"}
    assert entry["path"] == path == min(entry["ms"], key=entry["ms"].get)
    file = tmp_path / "paths.json"
    aniso_conv.save_choices(str(file))
    aniso_conv.clear_choices()
    # a loaded table wins over measuring: the same path again, without timing anything
    forced = {key: {"path": "aten"}}
    file.write_text(json.dumps(forced))
    assert aniso_conv.load_choices(str(file)) == 1
    assert aniso_conv.choose("backward", a, w, [1, 1, 1], [1, 1, 0]) == "aten"
    assert aniso_conv.choices()[key]["reason"] == "loaded"


def test_load_rejects_a_file_that_is_not_a_table(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"k": {"path": "cudnn9"}}))
    with pytest.raises(ValueError, match="not a table of convolution paths"):
        aniso_conv.load_choices(str(bad))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float32_within_twice_aten_error(case):
    """Each path in float32 is as accurate as ATen's float32 (at most 2x its error vs float64 + 1e-7)."""
    kernel, shape, co = case
    g = torch.Generator().manual_seed(7)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64).relu() * 100
    w64 = torch.randn(co, shape[1], *kernel, generator=g, dtype=torch.float64)
    stride, pad = [1] * len(kernel), [(k - 1) // 2 for k in kernel]
    gy64 = torch.randn(conv_paths.forward("aten", x64, w64, stride, pad).shape, generator=g, dtype=torch.float64)
    truth = (conv_paths.forward("aten", x64, w64, stride, pad), *conv_paths.backward("aten", gy64, x64, w64, stride, pad))
    x, w, gy = x64.float(), w64.float(), gy64.float()
    aten = (conv_paths.forward("aten", x, w, stride, pad), *conv_paths.backward("aten", gy, x, w, stride, pad))
    for path in aniso_conv.candidates(x, w, stride, pad):
        got = (conv_paths.forward(path, x, w, stride, pad), *conv_paths.backward(path, gy, x, w, stride, pad))
        for a, b, t, name in zip(got, aten, truth, ("y", "grad input", "grad weight")):
            assert rel_err(a, t) <= 2 * rel_err(b, t) + 1e-7, f"{path} {name}: {rel_err(a, t):.2e} vs aten {rel_err(b, t):.2e}"


def test_use_path_forces_and_records_nothing(fresh_choices):
    a = torch.randn(1, 16, 8, 8, 4)
    w = torch.randn(3, 16, 3, 3, 1)
    with aniso_conv.use_path("aten"):
        assert aniso_conv.choose("forward", a, w, [1, 1, 1], [1, 1, 0]) == "aten"
    with aniso_conv.use_path("matmul"):  # not a candidate for a 3x3x1 kernel: ATen
        assert aniso_conv.choose("forward", a, w, [1, 1, 1], [1, 1, 0]) == "aten"
    assert aniso_conv.choices() == {}
    with pytest.raises(ValueError, match="unknown path"):
        with aniso_conv.use_path("cudnn"):
            pass


def _shifted_reference(src, offset):
    """dst[..., q] = src[..., q - offset], zero outside: by zero padding and slicing."""
    nd = len(offset)
    pad = []
    for o in reversed(offset):
        pad += [abs(o), abs(o)]
    padded = torch.nn.functional.pad(src, pad)
    index = [slice(None)] * (src.dim() - nd)
    for size, o in zip(src.shape[src.dim() - nd:], offset):
        index.append(slice(abs(o) - o, abs(o) - o + size))
    return padded[tuple(index)]


@pytest.mark.parametrize("offset", [(0, 0, 1), (0, 0, -1), (1, 0, 0), (-1, 1, 0), (1, -1, -1), (0, 2, 1),
                                    (0, 0, 7), (3, 0, 0), (0, 0, -9), (-5, 0, 0), (0, -6, 2)])
@pytest.mark.parametrize("kind", ["contiguous", "padded_rows", "strided_last"])
def test_copy_shifted_matches_padding_and_slicing(offset, kind):
    """The shifted copy of the shift path's backward: as one copy of the flattened trailing block
    when both sides are contiguous there (the values that wrap across rows land in zeroed strips),
    by per-axis slices otherwise; offsets as long as an axis give all zeros."""
    src = torch.randn(2, 3, 4, 5, 7, dtype=torch.float64)
    if kind == "padded_rows":  # the destination: rows 1..4 of a buffer padded along the first axis
        dst = torch.full((2, 3, 6, 5, 7), float("nan"), dtype=torch.float64)[:, :, 1:5]
    elif kind == "strided_last":
        dst = torch.full((2, 3, 4, 5, 14), float("nan"), dtype=torch.float64)[..., ::2]
    else:
        dst = torch.full((2, 3, 4, 5, 7), float("nan"), dtype=torch.float64)
    conv_paths._copy_shifted(dst, src, offset)
    assert torch.equal(dst, _shifted_reference(src, offset))


@pytest.mark.parametrize("by_rows", [False, True], ids=["grouped", "by_rows"])
def test_shift_backward_writes_into_a_given_buffer(by_rows, monkeypatch):
    """At batch 1 the shift path can write grad_a into a caller's flat scratch buffer (the dense
    block's pooled one): the same values, as a view of that buffer; a batch of 2 ignores it."""
    if by_rows:
        monkeypatch.setattr(conv_paths, "SHIFT_CHUNK_BYTES", 1)
    x = torch.randn(1, 6, 7, 5, 3, dtype=torch.float64)
    w = torch.randn(4, 6, 3, 3, 1, dtype=torch.float64)
    g = torch.randn(1, 4, 7, 5, 3, dtype=torch.float64)
    ref_ga, ref_gw = conv_paths.backward("shift", g, x, w, [1, 1, 1], [1, 1, 0])
    buf = torch.full((x.numel() + 5,), float("nan"), dtype=torch.float64)
    ga, gw = conv_paths.backward("shift", g, x, w, [1, 1, 1], [1, 1, 0], buf)
    assert ga.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    assert torch.equal(ga, ref_ga) and torch.equal(gw, ref_gw)
    x2, g2 = torch.cat([x, x]), torch.cat([g, g])
    ga2, _ = conv_paths.backward("shift", g2, x2, w, [1, 1, 1], [1, 1, 0], torch.empty(x2.numel(), dtype=x.dtype))
    assert torch.equal(ga2[:1], ref_ga)


@pytest.mark.parametrize("kernel,shape", [((1, 7), (1, 3, 5, 2)), ((7, 1, 3), (2, 2, 3, 4, 1)), ((5, 5, 1), (1, 2, 1, 2, 3))],
                         ids=["2d-1x7-on-2", "3d-7x1x3", "3d-5x5x1-on-1"])
def test_shift_path_with_a_kernel_wider_than_an_axis(kernel, shape):
    """Kernels whose radius exceeds an axis (every tap along it beyond the map): the shift path's
    zeroed strips are clamped to the axis, so the flat sums and copies add nothing that wrapped."""
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(3, shape[1], *kernel, dtype=torch.float64)
    g = torch.randn((shape[0], 3, *shape[2:]), dtype=torch.float64)
    padding = [(k - 1) // 2 for k in kernel]
    stride = [1] * len(kernel)
    assert "shift" in aniso_conv.candidates(x, w, stride, padding)
    y = conv_paths.forward("shift", x, w, stride, padding)
    ga, gw = conv_paths.backward("shift", g, x, w, stride, padding)
    ref_y, ref_ga, ref_gw = aten_pair(x, w, g)
    assert_close_normwise(y, ref_y, 1e-13, what="output")
    assert_close_normwise(ga, ref_ga, 1e-13, what="grad input")
    assert_close_normwise(gw, ref_gw, 1e-13, what="grad weight")
