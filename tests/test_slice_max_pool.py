"""Slice-axis max pooling with one byte per output kept for backward, against F.max_pool3d/2d: the
compiled kernel (every dense layout, the stem's slice-major one included) and the torch composition."""
import pytest
import torch

import ahnet_fast
from ahnet_fast._extension import extension_available
from ahnet_fast.ops.slice_max_pool import _SliceMaxPool, slice_max_pool, slice_max_pool_reference
from benchmarks._common import saved_bytes
from tests.conftest import assert_close_normwise


needs_ext = pytest.mark.skipif(not extension_available(), reason="compiled extension not built")

IMPLS = {"auto": slice_max_pool, "composed": lambda x, k: _SliceMaxPool.apply(x, k)}


def both(x, k, grad, impl="auto"):
    out = []
    for f in (IMPLS[impl], slice_max_pool_reference):
        xi = x.detach().clone().requires_grad_()
        y = f(xi, k)
        y.backward(grad)
        out.append((y.detach(), xi.grad))
    return out


@pytest.mark.parametrize("shape,k", [((2, 3, 4, 5, 8), 2), ((1, 4, 3, 2, 7), 2), ((2, 3, 4, 5, 9), 3),
                                     ((2, 3, 5, 6), 2), ((1, 2, 3, 4, 4), 4)],
                         ids=["3d", "3d-odd", "3d-k3", "2d", "3d-k4"])
@pytest.mark.parametrize("values", ["random", "ties", "nan"])
@pytest.mark.parametrize("impl", ["auto", "composed"])
def test_matches_max_pool_exactly(shape, k, values, impl):
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
    (y, gx), (ry, rgx) = both(x, k, grad, impl)
    assert torch.equal(y.isnan(), ry.isnan()) and torch.equal(y.nan_to_num(), ry.nan_to_num())
    assert torch.equal(gx, rgx)


def _layout(x, name):
    """x in one of the dense layouts the kernel walks differently."""
    if name == "channels_last":
        return x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)
    if name == "permuted":  # H and W swapped in memory
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if name == "slice_major":  # the stem's slice-folded conv output: (N, D, C, H, W) memory
        return x.movedim(-1, 1).contiguous().movedim(1, -1)
    if name == "slice_outermost":  # slices outside the batch too
        return x.movedim(-1, 0).contiguous().movedim(0, -1)
    return x


LAYOUTS = ["contiguous", "channels_last", "permuted", "slice_major", "slice_outermost"]


@needs_ext
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,k", [((2, 3, 4, 5, 8), 2), ((1, 4, 3, 70, 7), 2), ((2, 3, 4, 5, 9), 3),
                                     ((2, 40, 30, 2, 6), 2), ((2, 3, 5, 6), 2), ((1, 2, 3, 4, 8), 3)],
                         ids=["3d", "3d-odd-wide", "3d-k3", "3d-many-lanes", "2d", "3d-k3-leftover"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_compiled_kernel_every_layout(layout, shape, k, dtype):
    """The compiled kernel on every dense layout (its contiguous, slice-major and strided loops):
    values, NaN, gradient positions exact; the gradient comes back in the input's layout and the
    output is contiguous (channels-last for channels-last input, as max_pool3d)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(dtype)
    x[torch.rand(shape, generator=g) < 0.1] = float("nan")
    x = _layout(x, layout)
    grad = torch.randn((*shape[:-1], shape[-1] // k), generator=g).to(dtype)
    (y, gx), (ry, rgx) = both(x, k, grad)
    assert torch.equal(y.isnan(), ry.isnan()) and torch.equal(y.nan_to_num(), ry.nan_to_num())
    assert torch.equal(gx, rgx)
    assert gx.stride() == x.stride()
    assert y.is_contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last) \
        if layout == "channels_last" else y.is_contiguous()


@needs_ext
def test_compiled_kernel_is_the_cpu_path_and_reference_is_max_pool():
    x = torch.randn(1, 2, 3, 4, 6, requires_grad=True)
    assert "slice_max_pool" in type(slice_max_pool(x, 2).grad_fn).__name__
    with ahnet_fast.backend("reference"):
        assert "MaxPool3D" in type(slice_max_pool(x, 2).grad_fn).__name__


@needs_ext
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout):
    x = _layout(torch.randn(2, 3, 4, 5, 7), layout)
    for xin in (x, x.clone().requires_grad_()):
        torch.library.opcheck(torch.ops.ahnet_fast.slice_max_pool.default, (xin, 2))
    _, position = torch.ops.ahnet_fast.slice_max_pool(x, 3)
    torch.library.opcheck(torch.ops.ahnet_fast.slice_max_pool_backward.default,
                          (torch.randn(position.shape), position, 3, list(x.shape), list(x.stride())))


@needs_ext
def test_compiled_kernel_bad_input_is_an_error():
    with pytest.raises(RuntimeError, match="shorter than the window"):
        torch.ops.ahnet_fast.slice_max_pool(torch.randn(1, 2, 3, 4, 1), 2)
    with pytest.raises(RuntimeError, match="dense"):
        torch.ops.ahnet_fast.slice_max_pool(torch.randn(1, 2, 3, 4, 8)[..., ::2], 2)
    x = torch.randn(1, 2, 3, 4, 8)[..., ::2]  # not dense: the public function takes the composition
    assert torch.equal(slice_max_pool(x, 2), slice_max_pool_reference(x, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layouts_and_dtypes(dtype):
    x = torch.randn(2, 5, 4, 3, 6).to(dtype)
    grad = torch.randn(2, 5, 4, 3, 3).to(dtype)
    for xin in (x, x.contiguous(memory_format=torch.channels_last_3d), x.transpose(2, 3).contiguous().transpose(2, 3)):
        (y, gx), (ry, rgx) = both(xin, 2, grad)
        assert torch.equal(y, ry) and torch.equal(gx, rgx)
        assert y.is_contiguous(memory_format=torch.channels_last_3d) == ry.is_contiguous(
            memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("impl", ["auto", "composed"])
@pytest.mark.parametrize("layout", ["contiguous", "slice_major"])
def test_gradcheck(impl, layout):
    x = _layout(torch.randn(2, 3, 4, 3, 7, dtype=torch.float64), layout).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: IMPLS[impl](t, 2), (x,))


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


def dispatch_sample():
    """One call of the op for tests/test_dispatch.py's contract over every registered op: (run(backend) ->
    output, the arguments its table's reasons take)."""
    from ahnet_fast import ops

    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, 4, dtype=torch.float64)
    return (lambda be: ops.slice_max_pool(x, 2, backend=be)), (x,)
