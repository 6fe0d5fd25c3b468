"""ahnet_fast::channel_mm_conv_ (out (+)= conv(act(x), weight), stride 1, the size kept: AH-Net's 3x3x1 and
1x1x3 convolutions on CPU without their taps' maps) against float64, its dispatch (ops.channel_mm's
table, kind "conv"), and the shift path running on it. Narrower ISAs: tests/test_channel_mm.py."""
import math

import pytest
import torch

from ahnet_fast import backends
from ahnet_fast._extension import extension_available
from ahnet_fast.ops import _conv_paths, channel_mm
from ahnet_fast.ops.channel_mm import channel_mm_conv_reference, conv_batched, conv_into
from tests.conftest import assert_close_normwise

needs_ext = pytest.mark.skipif(not extension_available(), reason="compiled extension not built")
needs_kernel = pytest.mark.skipif(channel_mm.kernel_isa() != "avx512",
                                  reason="the kernel runs on AVX-512 CPUs (elsewhere the shift path's tap maps)")


def operands(co, ci, kernel, spatial, *, act=False, channel_gap=0, seed=0):
    """weight, one sample x (Ci, *spatial) whose channels lie channel_gap values apart beyond their
    block (a band of a larger map), scale, shift."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(co, ci, *kernel, generator=g) / math.sqrt(ci * math.prod(kernel))
    voxels = math.prod(spatial)
    x = torch.randn(ci, voxels + channel_gap, generator=g)[:, channel_gap // 2:channel_gap // 2 + voxels]
    scale = torch.rand(ci, generator=g) + 0.5 if act else None
    shift = torch.randn(ci, generator=g) * 0.5 if act else None
    return w, x.view(ci, *spatial), scale, shift


def reference64(w, x, scale, shift):
    return channel_mm_conv_reference(w.double(), x.double().unsqueeze(0), None if scale is None else scale.double(),
                                  None if shift is None else shift.double())[0]


# (Co, Ci, kernel, spatial): register blocks of 8 rows and their tails, column blocks of 48 voxels and
# theirs (a map shorter than one block, one not a multiple of 48), taps leaving the map on every side,
# maps thinner than the kernel, a 3x3x3 kernel (27 taps, the table's limit), 2D and 1D maps
SHAPES = [
    (20, 80, (3, 3, 1), (7, 9, 5)),
    (8, 16, (1, 1, 3), (4, 5, 6)),
    (11, 13, (3, 3, 3), (5, 6, 7)),
    (3, 40, (3, 3, 1), (13, 11, 3)),
    (1, 2, (3, 3, 1), (1, 2, 1)),
    (17, 5, (3, 1, 1), (2, 3, 8)),
    (9, 7, (3, 3), (10, 17)),
    (12, 4, (5,), (101,)),
    (16, 24, (3, 3, 1), (16, 12, 1)),
]


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}x{s[1]}-{'x'.join(map(str, s[2]))}-{'x'.join(map(str, s[3]))}"
                                               for s in SHAPES])
@pytest.mark.parametrize("act", [False, True], ids=["plain", "bn-relu"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "accumulate"])
def test_kernel_matches_float64(shape, act, accumulate):
    co, ci, kernel, spatial = shape
    w, x, scale, shift = operands(co, ci, kernel, spatial, act=act, channel_gap=13)
    start = torch.randn(co, *spatial)
    out = start.clone()
    torch.ops.ahnet_fast.channel_mm_conv_(out.view(co, -1), w, x.flatten(1), list(spatial), scale, shift, accumulate)
    expected = reference64(w, x, scale, shift) + (start.double() if accumulate else 0)
    assert_close_normwise(out, expected, 2e-6, 1e-7, what=f"{shape} act={act} accumulate={accumulate}")


@needs_ext
def test_kernel_writes_only_its_block_and_nan_spreads_to_neighbours_only():
    """A NaN in x reaches exactly the outputs whose window covers it (3x3x1: nine voxels of the plane);
    out's rows inside a larger buffer: nothing around them is written."""
    w, x, _, _ = operands(10, 6, (3, 3, 1), (9, 8, 4))
    x = x.clone()
    x[2, 4, 3, 1] = float("nan")
    buffer = torch.full((12, 9 * 8 * 4 + 10), 7.0)
    out = buffer[1:11, 5:5 + 9 * 8 * 4]
    torch.ops.ahnet_fast.channel_mm_conv_(out, w, x.flatten(1), [9, 8, 4], None, None, False)
    nan = out.view(10, 9, 8, 4).isnan()
    expected = torch.zeros(9, 8, 4, dtype=torch.bool)
    expected[3:6, 2:5, 1] = True
    assert (nan == expected).all()
    outside = torch.ones_like(buffer, dtype=torch.bool)
    outside[1:11, 5:5 + 9 * 8 * 4] = False
    assert (buffer[outside] == 7.0).all()


@needs_ext
def test_kernel_refuses_bad_operands():
    w, x, scale, shift = operands(8, 6, (3, 3, 1), (5, 6, 7))
    flat, out = x.flatten(1), torch.empty(8, 210)
    with pytest.raises(RuntimeError, match="odd kernel"):
        torch.ops.ahnet_fast.channel_mm_conv_(out, torch.randn(8, 6, 2, 3, 1), flat, [5, 6, 7], None, None, False)
    with pytest.raises(RuntimeError, match="at most 27 taps"):
        torch.ops.ahnet_fast.channel_mm_conv_(out, torch.randn(8, 6, 5, 3, 3), flat, [5, 6, 7], None, None, False)
    # kernel sizes whose product wraps around 2^64 to 1 (a free argument of the weight-gradient op)
    with pytest.raises(RuntimeError, match="at most 27 taps"):
        torch.ops.ahnet_fast.channel_mm_nt_conv_(torch.empty(8, 6), torch.randn(8, 210), flat, [5, 6, 7],
                                                 [7, 0x6db6db6db6db6db7, 1], False)
    with pytest.raises(RuntimeError, match="overflows"):
        torch.ops.ahnet_fast.channel_mm_nt_conv_(torch.empty(8, 54), torch.randn(8, 210), flat,
                                                 [2 ** 29, 2 ** 29, 2 ** 29], [3, 3, 1], False)
    assert conv_batched(torch.empty(0, 6, 3, 3, 1), x.unsqueeze(0)) is None  # no output channels: nothing to run
    with pytest.raises(RuntimeError, match="x must be"):
        torch.ops.ahnet_fast.channel_mm_conv_(out, w, flat, [5, 6, 6], None, None, False)
    with pytest.raises(RuntimeError, match="out must be"):
        torch.ops.ahnet_fast.channel_mm_conv_(out[:7], w, flat, [5, 6, 7], None, None, False)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.ahnet_fast.channel_mm_conv_(out.double(), w.double(), flat.double(), [5, 6, 7], None, None, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.ahnet_fast.channel_mm_conv_(out, w.transpose(2, 3).contiguous().transpose(2, 3), flat, [5, 6, 7],
                                           None, None, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.ahnet_fast.channel_mm_conv_(out, w, torch.randn(210, 6).t(), [5, 6, 7], None, None, False)
    with pytest.raises(RuntimeError, match="scale and shift"):
        torch.ops.ahnet_fast.channel_mm_conv_(out, w, flat, [5, 6, 7], torch.ones(6), None, False)
    shared = torch.randn(8 * 210)  # out and the weight on the same memory
    with pytest.raises(RuntimeError, match="overlaps"):
        torch.ops.ahnet_fast.channel_mm_conv_(shared.view(8, 210), shared[:8 * 54].view(8, 6, 3, 3, 1), flat, [5, 6, 7],
                                           None, None, False)
    with pytest.raises(ValueError, match="odd kernel sizes"):
        conv_into(torch.empty(8, 5, 6, 7), torch.randn(8, 6, 2, 3, 1), x)
    with pytest.raises(ValueError, match="shapes do not fit"):
        conv_into(torch.empty(8, 5, 6, 6), w, x)


@needs_ext
def test_empty_map_and_no_channels():
    out = torch.full((8, 30), 3.0)
    torch.ops.ahnet_fast.channel_mm_conv_(out, torch.empty(8, 0, 3, 1), torch.empty(0, 30), [5, 6], None, None, False)
    assert (out == 0).all()
    out.fill_(3.0)
    torch.ops.ahnet_fast.channel_mm_conv_(out, torch.empty(8, 0, 3, 1), torch.empty(0, 30), [5, 6], None, None, True)
    assert (out == 3.0).all()
    assert conv_batched(torch.randn(8, 4, 3, 3, 1), torch.empty(0, 4, 5, 6, 7)) is None


@needs_ext
def test_opcheck():
    w, x, scale, shift = operands(9, 5, (3, 3, 1), (6, 7, 3), act=True)
    for args in ((torch.empty(9, 126), w, x.flatten(1), [6, 7, 3], scale, shift, False),
                 (torch.randn(9, 126), w, x.flatten(1), [6, 7, 3], None, None, True)):
        torch.library.opcheck(torch.ops.ahnet_fast.channel_mm_conv_.default, args)


def test_dispatch_takes_the_kernel_only_where_it_runs_and_pays():
    w, x, scale, shift = operands(20, 16, (3, 3, 1), (12, 10, 8), act=True)
    batch = x.unsqueeze(0)
    expected = torch.Tensor if channel_mm.kernel_isa() == "avx512" else type(None)
    assert isinstance(conv_batched(w, batch, scale=scale, shift=shift), expected)
    assert conv_batched(w[:3], batch) is None  # fewer outputs than a register block: the shift path's product
    assert conv_batched(w.double(), batch.double()) is None
    assert conv_batched(w, batch.transpose(3, 4)) is None  # the map is not one block per channel
    assert conv_batched(w.requires_grad_(), batch) is None  # a gradient to come
    w = w.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv_batched(w, batch) is None
    reasons = backends.explain("channel_mm", x.device, *channel_mm._conv_args(
        torch.empty(3, 960), w[:3], x, None, None, False), explicit="auto")["implementations"]["cpp"]
    assert any("output channels" in r for r in reasons["slower"]), reasons
    # the forced backends agree
    for backend in ("reference",) + (("cpp",) if channel_mm.kernel_isa() == "avx512" else ()):
        out = conv_into(torch.empty(20, 12, 10, 8), w, x, scale=scale, shift=shift, backend=backend)
        assert_close_normwise(out, reference64(w, x, scale, shift), 2e-6, what=backend)


@needs_kernel
@pytest.mark.parametrize("kernel", [(3, 3, 1), (1, 1, 3)], ids=["3x3x1", "1x1x3"])
@pytest.mark.parametrize("batch", [1, 2])
def test_shift_path_runs_on_the_kernel(kernel, batch):
    """_conv_paths' shift forward on channel_mm_conv_ (no tap maps): as float64, and the BatchNorm-ReLU
    fused into the panel gives the same bits as the activation written out first (what checkpointing's
    recomputation relies on); a band of rows (a view) as well as a whole map."""
    g = torch.Generator().manual_seed(1)
    full = torch.randn(batch, 24, 14, 10, 6, generator=g)
    w = torch.randn(20, 24, *kernel, generator=g) * 0.1
    scale, shift = torch.rand(24, generator=g) + 0.5, torch.randn(24, generator=g) * 0.3
    for a in (full, full[:, :, 3:11]):
        with backends.recording() as calls:
            fused = _conv_paths.forward("shift", a, w, [1, 1, 1], [(k - 1) // 2 for k in kernel], scale, shift)
        assert calls["channel_mm"].get("cpp", 0) == 1, calls
        activated = torch.relu(a * scale.view(1, -1, 1, 1, 1) + shift.view(1, -1, 1, 1, 1))
        written = _conv_paths.forward("shift", activated, w, [1, 1, 1], [(k - 1) // 2 for k in kernel])
        assert torch.equal(fused, written)
        expected = channel_mm_conv_reference(w.double(), a.double(), scale.double(), shift.double())
        assert_close_normwise(fused, expected, 2e-6, what=f"band={a.shape[2]}")
        assert fused.is_contiguous() and fused.shape == (batch, 20, *a.shape[2:])


# ---------------------------------------------------------------------------------------------
# channel_mm_nt_conv_: the convolution's weight gradient, and conv_backward (both gradients on the kernels)


def weight_grad64(grad_y, x, kernel):
    """float64 weight gradient of conv(x) (stride 1, the size kept) for one sample: (Co, Ci, *kernel)."""
    xd = x.double().unsqueeze(0).requires_grad_(False)
    w = torch.zeros(grad_y.shape[0], x.shape[0], *kernel, dtype=torch.float64, requires_grad=True)
    channel_mm_conv_reference(w, xd).backward(grad_y.double().unsqueeze(0))
    return w.grad


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}x{s[1]}-{'x'.join(map(str, s[2]))}-{'x'.join(map(str, s[3]))}"
                                               for s in SHAPES])
@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "accumulate"])
def test_weight_gradient_kernel_matches_float64(shape, accumulate):
    """Every tap's shifted rows of x against the output gradient: chunks of 2048 voxels and their tails,
    taps leaving the map on every side, row-strided operands."""
    co, ci, kernel, spatial = shape
    _, x, _, _ = operands(co, ci, kernel, spatial, channel_gap=7)
    g = torch.Generator().manual_seed(5)
    voxels = math.prod(spatial)
    grad_y = torch.randn(co, voxels + 9, generator=g)[:, 2:2 + voxels]
    start = torch.randn(co, ci * math.prod(kernel), generator=g)
    out = start.clone()
    torch.ops.ahnet_fast.channel_mm_nt_conv_(out, grad_y, x.flatten(1), list(spatial), list(kernel), accumulate)
    expected = weight_grad64(grad_y.reshape(co, *spatial), x, kernel).reshape(co, -1) + \
        (start.double() if accumulate else 0)
    assert_close_normwise(out, expected, 2e-6, 1e-7, what=f"{shape} accumulate={accumulate}")


@needs_ext
def test_weight_gradient_kernel_over_many_chunks():
    """A map of several 2048-voxel chunks split between threads, the chunk edges inside rows."""
    _, x, _, _ = operands(12, 10, (3, 3, 1), (37, 23, 11))
    grad_y = torch.randn(12, 37 * 23 * 11)
    out = torch.empty(12, 90)
    torch.ops.ahnet_fast.channel_mm_nt_conv_(out, grad_y, x.flatten(1), [37, 23, 11], [3, 3, 1], False)
    expected = weight_grad64(grad_y.view(12, 37, 23, 11), x, (3, 3, 1)).reshape(12, -1)
    assert_close_normwise(out, expected, 2e-6)


@needs_ext
def test_weight_gradient_kernel_refuses_bad_operands_and_opcheck():
    _, x, _, _ = operands(8, 6, (3, 3, 1), (5, 6, 7))
    flat, grad_y = x.flatten(1), torch.randn(8, 210)
    with pytest.raises(RuntimeError, match="do not fit"):
        torch.ops.ahnet_fast.channel_mm_nt_conv_(torch.empty(8, 53), grad_y, flat, [5, 6, 7], [3, 3, 1], False)
    with pytest.raises(RuntimeError, match="odd kernel"):
        torch.ops.ahnet_fast.channel_mm_nt_conv_(torch.empty(8, 36), grad_y, flat, [5, 6, 7], [2, 3, 1], False)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.ahnet_fast.channel_mm_nt_conv_(torch.empty(8, 54, dtype=torch.float64), grad_y.double(),
                                                 flat.double(), [5, 6, 7], [3, 3, 1], False)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.ahnet_fast.channel_mm_nt_conv_(torch.empty(8, 54), torch.randn(210, 8).t(), flat, [5, 6, 7],
                                                 [3, 3, 1], False)
    for accumulate in (False, True):
        torch.library.opcheck(torch.ops.ahnet_fast.channel_mm_nt_conv_.default,
                              (torch.randn(8, 54), grad_y, flat, [5, 6, 7], [3, 3, 1], accumulate))


@needs_kernel
@pytest.mark.parametrize("kernel", [(3, 3, 1), (1, 1, 3)], ids=["3x3x1", "1x1x3"])
@pytest.mark.parametrize("batch", [1, 2])
def test_shift_backward_runs_on_the_kernels(kernel, batch):
    """_conv_paths' shift backward on channel_mm_conv_ (input gradient: the flipped weight) and
    channel_mm_nt_conv_ (weight gradient): as float64's autograd, with a band of rows as the input,
    grad_x written into a caller's buffer at batch 1; the grouped path (chunks given) agrees."""
    g = torch.Generator().manual_seed(2)
    full = torch.randn(batch, 24, 14, 10, 6, generator=g)
    w = torch.randn(20, 24, *kernel, generator=g) * 0.1
    for a in (full, full[:, :, 3:11]):
        grad_y = torch.randn(batch, 20, *a.shape[2:], generator=g)
        buffer = torch.full((a.numel() + 5,), 9.0)
        with backends.recording() as calls:
            grad_a, grad_w = _conv_paths.backward("shift", grad_y, a, w, [1, 1, 1], [(k - 1) // 2 for k in kernel],
                                                  out=buffer)
        assert calls["channel_mm"].get("cpp", 0) == 2, calls  # the input gradient's convolution, the weight gradient
        a64, w64 = a.double().requires_grad_(), w.double().requires_grad_()
        channel_mm_conv_reference(w64, a64).backward(grad_y.double())
        assert_close_normwise(grad_a, a64.grad, 2e-6, what="grad_a")
        assert_close_normwise(grad_w, w64.grad, 2e-6, what="grad_w")
        if batch == 1:
            assert grad_a.data_ptr() == buffer.data_ptr()
        # fewer output channels than a register block: the shift path's copies (both kernels or neither);
        # the rule's probe says the same
        assert channel_mm.conv_backward(grad_y[:, :3], a, w[:3]) is None
        assert channel_mm.conv_backward_takes(w, a) and not channel_mm.conv_backward_takes(w[:3], a)
        grouped = _conv_paths._shift_backward(grad_y, a, w, chunks=2)
        assert_close_normwise(grouped[0], a64.grad, 2e-6, what="grouped grad_a")
        assert_close_normwise(grouped[1], w64.grad, 2e-6, what="grouped grad_w")
