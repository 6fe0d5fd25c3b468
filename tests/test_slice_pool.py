"""Slice-axis max pooling with one byte per output kept for backward, against F.max_pool3d/2d."""
import pytest
import torch

from ahnet_fast.ops.slice_pool import slice_max_pool, slice_max_pool_reference
from benchmarks._common import saved_bytes
from tests.conftest import assert_close_normwise


def both(x, k, grad):
    out = []
    for f in (slice_max_pool, slice_max_pool_reference):
        xi = x.detach().clone().requires_grad_()
        y = f(xi, k)
        y.backward(grad)
        out.append((y.detach(), xi.grad))
    return out


@pytest.mark.parametrize("shape,k", [((2, 3, 4, 5, 8), 2), ((1, 4, 3, 2, 7), 2), ((2, 3, 4, 5, 9), 3),
                                     ((2, 3, 5, 6), 2), ((1, 2, 3, 4, 4), 4)],
                         ids=["3d", "3d-odd", "3d-k3", "2d", "3d-k4"])
@pytest.mark.parametrize("values", ["random", "ties", "nan"])
def test_matches_max_pool_exactly(shape, k, values):
    """Values and gradient positions equal to PyTorch's max pooling, ties (first maximum wins) and
    NaN (a NaN wins; the last NaN) included."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if values == "ties":
        x = torch.randint(0, 3, shape, generator=g).double()
    elif values == "nan":
        x[torch.rand(shape, generator=g) < 0.2] = float("nan")
    out_shape = (*shape[:-1], shape[-1] // k)
    grad = torch.randn(out_shape, generator=g, dtype=torch.float64)
    (y, gx), (ry, rgx) = both(x, k, grad)
    assert torch.equal(y.isnan(), ry.isnan()) and torch.equal(y.nan_to_num(), ry.nan_to_num())
    assert torch.equal(gx, rgx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layouts_and_dtypes(dtype):
    x = torch.randn(2, 5, 4, 3, 6).to(dtype)
    grad = torch.randn(2, 5, 4, 3, 3).to(dtype)
    for xin in (x, x.contiguous(memory_format=torch.channels_last_3d), x.transpose(2, 3).contiguous().transpose(2, 3)):
        (y, gx), (ry, rgx) = both(xin, 2, grad)
        assert torch.equal(y, ry) and torch.equal(gx, rgx)
        assert y.is_contiguous(memory_format=torch.channels_last_3d) == ry.is_contiguous(
            memory_format=torch.channels_last_3d)


def test_gradcheck():
    x = torch.randn(2, 3, 4, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: slice_max_pool(t, 2), (x,))


def test_keeps_one_byte_per_output():
    x = torch.randn(1, 8, 16, 16, 8, requires_grad=True)
    ours, _ = saved_bytes(lambda: slice_max_pool(x, 2))
    theirs, theirs64 = saved_bytes(lambda: slice_max_pool_reference(x, 2))
    assert ours == x.numel() // 2
    assert theirs == x.numel() * 4 + theirs64 and theirs64 == x.numel() // 2 * 8


def test_window_one_is_identity_and_bad_input_is_a_value_error():
    x = torch.randn(1, 2, 3, 4, 5)
    assert slice_max_pool(x, 1) is x
    with pytest.raises(ValueError, match="shorter than the window"):
        slice_max_pool(x, 6)
    with pytest.raises(ValueError, match="window must be an integer"):
        slice_max_pool(x, 0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        slice_max_pool(x[0, 0], 2)


def test_compiles_without_graph_breaks():
    x = torch.randn(2, 3, 4, 5, 6, requires_grad=True)
    explanation = torch._dynamo.explain(lambda t: slice_max_pool(t, 2).sum())(x)
    assert explanation.graph_break_count == 0
    assert_close_normwise(torch.compile(lambda t: slice_max_pool(t, 2), backend="aot_eager")(x),
                          slice_max_pool_reference(x, 2), 0)
