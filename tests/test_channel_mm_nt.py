"""ahnet_fast::channel_mm_nt_ (out (+)= a @ b^T over the voxels: the convolutions' weight gradients on
CPU) against float64, and its dispatch (ops.channel_mm.mm_nt_into: the channel_mm table, transposed).
Narrower ISAs: tests/test_channel_mm.py checks both kernels there."""
import pytest
import torch

from ahnet_fast import backends
from ahnet_fast._extension import extension_available
from ahnet_fast.ops import channel_mm
from ahnet_fast.ops.channel_mm import channel_mm_nt_reference, mm_nt, mm_nt_into
from tests.conftest import assert_close_normwise

needs_ext = pytest.mark.skipif(not extension_available(), reason="compiled extension not built")


def operands(m, k, length, *, row_stride=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, length + row_stride, generator=g)[:, :length]  # rows of a longer buffer: a view
    b = torch.randn(k, length + row_stride, generator=g)[:, :length]
    return a, b


# (M, K, L): blocks of 4 x 6 and their tails (1, 3, 5, 7, 9 rows), voxels around the 16-wide vector and
# the 2048-voxel chunk (15, 16, 17, 2047, 2049, two threads' worth)
SHAPES = [(1, 1, 1), (3, 5, 15), (4, 6, 16), (5, 7, 17), (9, 13, 2047), (8, 12, 2049), (20, 60, 5000)]


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "accumulate"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "row-strided"])
def test_kernel_matches_float64(shape, accumulate, strided):
    m, k, length = shape
    a, b = operands(m, k, length, row_stride=3 if strided else 0)
    start = torch.randn(m, k)
    out = start.clone()
    torch.ops.ahnet_fast.channel_mm_nt_(out, a, b, accumulate)
    expected = channel_mm_nt_reference(a.double(), b.double()) + (start.double() if accumulate else 0)
    assert_close_normwise(out, expected, 1e-6, 1e-7, what=f"{shape} accumulate={accumulate}")


@needs_ext
def test_kernel_writes_only_its_block_and_nan_reaches_out():
    a, b = operands(6, 9, 3000)
    a[2, 1234] = float("nan")
    buffer = torch.full((8, 12), 7.0)
    out = buffer[1:7, 2:11]
    torch.ops.ahnet_fast.channel_mm_nt_(out, a, b, False)
    assert out[2].isnan().all() and not out[[0, 1, 3, 4, 5]].isnan().any()
    outside = torch.ones_like(buffer, dtype=torch.bool)
    outside[1:7, 2:11] = False
    assert (buffer[outside] == 7.0).all()


@needs_ext
def test_kernel_refuses_bad_operands():
    a, b = operands(4, 6, 100)
    with pytest.raises(RuntimeError, match="do not chain"):
        torch.ops.ahnet_fast.channel_mm_nt_(torch.empty(4, 6), a, b[:, :99], False)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.ahnet_fast.channel_mm_nt_(torch.empty(4, 6, dtype=torch.float64), a.double(), b.double(), False)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.ahnet_fast.channel_mm_nt_(torch.empty(4, 6), torch.randn(100, 4).t(), b, False)
    square = torch.randn(6, 6)
    with pytest.raises(RuntimeError, match="overlaps"):
        torch.ops.ahnet_fast.channel_mm_nt_(square, square, torch.randn(6, 6), False)
    with pytest.raises(ValueError, match="do not chain"):
        mm_nt_into(torch.empty(4, 6), a, b[:5])


@needs_ext
def test_opcheck():
    a, b = operands(5, 7, 300)
    for accumulate in (False, True):
        torch.library.opcheck(torch.ops.ahnet_fast.channel_mm_nt_.default, (torch.randn(5, 7), a, b, accumulate))


def test_dispatch_uses_kernel_only_where_it_runs_and_pays():
    def chosen(out, a, b):
        return backends.explain("channel_mm", torch.device("cpu"), out, a, b, None, None, False, "nt",
                                explicit="auto")["chosen"]

    a, b = operands(20, 60, 4096)
    expected = "cpp" if channel_mm.kernel_isa() == "avx512" else "reference"
    assert chosen(torch.empty(20, 60), a, b) == expected
    assert chosen(torch.empty(20, 60), a[:, :100], b[:, :100]) == "reference"  # short reduction
    big_a, big_b = torch.empty(512, 1024), torch.empty(256, 1024)
    assert chosen(torch.empty(512, 256), big_a, big_b) == "reference"  # b's chunk would leave L2
    assert chosen(torch.empty(20, 60, dtype=torch.float64), a.double(), b.double()) == "reference"
    ag = a.clone().requires_grad_()
    y = mm_nt(ag, b)
    y.sum().backward()
    assert ag.grad is not None  # a gradient to come: torch's differentiable a @ b.t()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mm_nt(a, b).dtype == torch.bfloat16
    assert_close_normwise(mm_nt(a, b), channel_mm_nt_reference(a.double(), b.double()), 1e-6)
