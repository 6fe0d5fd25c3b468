"""Transposed convolution with kernel == stride as a matrix product and a voxel shuffle
(ahnet_fast.ops.transposed_conv), against F.conv_transpose3d/2d and the torch-op shuffle."""
import pytest
import torch
import torch.nn.functional as F

import ahnet_fast
from ahnet_fast._extension import extension_available
from ahnet_fast.ops.transposed_conv import (transposed_conv, transposed_conv_shuffle, transposed_conv_shuffle_reference,
                                            transposed_conv_unshuffle, transposed_conv_unshuffle_reference)
from tests.conftest import assert_close_normwise, rel_err

needs_ext = pytest.mark.skipif(not extension_available(), reason="compiled extension not built")

# (input shape, out channels, kernel = stride): AH-Net's x2 up-transitions, odd sizes, batch 2,
# unequal factors (the shuffle's general loop), 2D
CASES = [
    ((1, 6, 3, 2, 5), 4, (2, 2, 2)),
    ((2, 5, 3, 4, 1), 3, (2, 2, 2)),
    ((1, 3, 2, 3, 4), 2, (2, 3, 1)),
    ((2, 2, 3, 2, 3), 3, (1, 2, 3)),
    ((2, 4, 5, 3), 3, (2, 2)),
]
IDS = ["x2", "x2-n2-depth1", "f231", "f123", "2d"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_conv_transpose_float64(case, bias, layout):
    shape, co, k = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)
    w = torch.randn(shape[1], co, *k, generator=g, dtype=torch.float64)
    b = torch.randn(co, generator=g, dtype=torch.float64) if bias else None
    ref = (F.conv_transpose3d if x.dim() == 5 else F.conv_transpose2d)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ws = [w.clone().requires_grad_() for _ in range(2)]
    bs = [b.clone().requires_grad_() if b is not None else None for _ in range(2)]
    y = transposed_conv(xs[0], ws[0], bs[0], k)
    ry = ref(xs[1], ws[1], bs[1], k)
    assert y.shape == ry.shape
    assert_close_normwise(y, ry, 1e-13, what="y")
    gy = torch.randn(ry.shape, generator=g, dtype=torch.float64)
    y.backward(gy)
    ry.backward(gy)
    assert_close_normwise(xs[0].grad, xs[1].grad, 1e-13, what="grad x")
    assert_close_normwise(ws[0].grad, ws[1].grad, 1e-13, what="grad w")
    if bias:
        assert_close_normwise(bs[0].grad, bs[1].grad, 1e-13, what="grad bias")


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_shuffle_is_a_permutation_and_unshuffle_inverts_it(case, dtype):
    shape, co, k = case
    taps = 1
    for f in k:
        taps *= f
    t = torch.randn(shape[0], co * taps, *shape[2:]).to(dtype)
    y = transposed_conv_shuffle(t, k)
    assert torch.equal(y, transposed_conv_shuffle_reference(t, k))
    assert torch.equal(transposed_conv_unshuffle(y, k), t)
    assert torch.equal(transposed_conv_unshuffle_reference(y, k), t)
    # a strided input is read as its values
    assert torch.equal(transposed_conv_shuffle(t.transpose(2, 3).contiguous().transpose(2, 3), k), y)


def test_gradcheck():
    x = torch.randn(2, 3, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: transposed_conv(*a, (2, 2, 2)), (x, w, b))
    t = torch.randn(1, 8, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a: transposed_conv_shuffle(a, (2, 2, 2)), (t,))


@needs_ext
def test_opcheck():
    t = torch.randn(2, 12, 3, 2, 5)
    for ti in (t, t.clone().requires_grad_()):
        torch.library.opcheck(torch.ops.ahnet_fast.transposed_conv_shuffle.default, (ti, [2, 3, 1]))
    y = torch.randn(2, 2, 6, 4, 5)
    for yi in (y, y.clone().requires_grad_()):
        torch.library.opcheck(torch.ops.ahnet_fast.transposed_conv_unshuffle.default, (yi, [3, 2, 1]))


def test_float32_within_twice_aten_error():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 64, 8, 8, 4, generator=g)
    w = torch.randn(64, 64, 2, 2, 2, generator=g) * 0.1
    truth = F.conv_transpose3d(x.double(), w.double(), None, 2)
    e_ours = rel_err(transposed_conv(x, w, None, (2, 2, 2)), truth)
    e_aten = rel_err(F.conv_transpose3d(x, w, None, 2), truth)
    assert e_ours <= 2 * e_aten + 1e-7


def test_autocast_keeps_the_low_precision_with_a_bias():
    x = torch.randn(1, 4, 2, 3, 2)
    w = torch.randn(4, 3, 2, 2, 2)
    b = torch.randn(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = transposed_conv(x, w, b, (2, 2, 2))
        ref = F.conv_transpose3d(x, w, b, 2)
    assert y.dtype == ref.dtype == torch.bfloat16
    truth = F.conv_transpose3d(x.double(), w.double(), b.double(), 2)
    assert rel_err(y, truth) <= 2 * rel_err(ref, truth) + 1e-2


def test_reference_backend_is_conv_transpose_and_bad_input_is_a_value_error():
    x = torch.randn(1, 3, 2, 2, 2, requires_grad=True)
    w = torch.randn(3, 2, 2, 2, 2)
    with ahnet_fast.backend("reference"):
        assert "ConvolutionBackward" in type(transposed_conv(x, w, None, (2, 2, 2)).grad_fn).__name__
    with pytest.raises(ValueError, match="must equal the stride"):
        transposed_conv(x, w, None, (2, 2, 1))
    with pytest.raises(ValueError, match="does not fit input"):
        transposed_conv(x, torch.randn(4, 2, 2, 2, 2), None, (2, 2, 2))
    with pytest.raises(ValueError, match="bias"):
        transposed_conv(x, w, torch.randn(3), (2, 2, 2))


def test_compiles_without_graph_breaks():
    x = torch.randn(1, 3, 2, 3, 2, requires_grad=True)
    w = torch.randn(3, 2, 2, 2, 2, requires_grad=True)
    fn = lambda a: transposed_conv(a, w, None, (2, 2, 2)).sum()  # noqa: E731
    assert torch._dynamo.explain(fn)(x).graph_break_count == 0
    assert_close_normwise(torch.compile(fn, backend="aot_eager")(x), F.conv_transpose3d(x, w, None, 2).sum(), 1e-5)


def dispatch_sample():
    """One call of the op for tests/test_dispatch.py's contract over every registered op: (run(backend) ->
    output, the arguments its table's reasons take)."""
    from ahnet_fast import ops

    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, 4, dtype=torch.float64)
    w = torch.randn(4, 3, 2, 2, 2, dtype=torch.float64)
    return (lambda be: ops.transposed_conv(x, w, None, (2, 2, 2), backend=be)), (x,)
