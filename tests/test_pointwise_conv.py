"""ahnet_fast.ops.pointwise_conv (the encoder's 1x1x1 convolutions, strided or not) against ATen."""
import pytest
import torch

from ahnet_fast import BackendUnavailableError
from ahnet_fast.ops import aniso_conv, _conv_paths as conv_paths
from ahnet_fast.ops.pointwise_conv import pointwise_conv
from tests.conftest import assert_close_normwise, rel_err

# (weight shape, input shape, stride): the bottlenecks' 1x1x1 and the strided downsampling, odd sizes,
# batch 2, 2D
POINTWISE_CASES = [
    ((7, 5, 1, 1, 1), (1, 5, 6, 5, 3), (1, 1, 1)),
    ((4, 6, 1, 1, 1), (2, 6, 7, 6, 4), (2, 2, 1)),
    ((3, 4, 1, 1, 1), (1, 4, 5, 9, 5), (2, 3, 2)),
    ((5, 3, 1, 1), (2, 3, 7, 6), (2, 2)),
]


@pytest.mark.parametrize("case", POINTWISE_CASES, ids=["s1", "s221-n2", "s232-odd", "2d-s22-n2"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_pointwise_conv_matches_aten_float64(case, layout, bias):
    wshape, shape, stride = case
    x = torch.randn(shape, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)
    elif layout == "strided":
        x = torch.zeros((*shape[:-1], 2 * shape[-1]), dtype=torch.float64)[..., ::2].copy_(x)
    w = torch.randn(wshape, dtype=torch.float64)
    b = torch.randn(wshape[0], dtype=torch.float64) if bias else None
    conv = torch.nn.functional.conv3d if x.dim() == 5 else torch.nn.functional.conv2d
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = pointwise_conv(xs, ws, b, stride)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = conv(xr, wr, b, stride)
    assert y.shape == ref.shape
    assert_close_normwise(y, ref, 1e-13, what="output")
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=conv_paths.output_format(x))
    g = torch.randn_like(ref)
    y.backward(g)
    ref.backward(g)
    assert_close_normwise(xs.grad, xr.grad, 1e-13, what="grad input")
    assert_close_normwise(ws.grad, wr.grad, 1e-13, what="grad weight")


def test_pointwise_conv_gradcheck_and_forced_aten():
    x = torch.randn(2, 3, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: pointwise_conv(*t, (2, 2, 1)), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda *t: pointwise_conv(*t, (1, 1, 1)), (x, w, b))
    with aniso_conv.use_path("aten"):  # ATen's convolution, bit for bit
        y = pointwise_conv(x, w, b, (2, 2, 1))
    assert torch.equal(y, torch.nn.functional.conv3d(x, w, b, (2, 2, 1)))


def test_pointwise_conv_rejects_other_kernels_and_strides():
    x = torch.randn(1, 3, 4, 4, 2)
    with pytest.raises(ValueError, match="not a 1x1 kernel"):
        pointwise_conv(x, torch.randn(2, 3, 3, 3, 1), None, (1, 1, 1))
    with pytest.raises(ValueError, match="not a 1x1 kernel"):
        pointwise_conv(x, torch.randn(2, 4, 1, 1, 1), None, (1, 1, 1))
    with pytest.raises(ValueError, match="stride"):
        pointwise_conv(x, torch.randn(2, 3, 1, 1, 1), None, (1, 1))
    with pytest.raises(ValueError, match="stride"):
        pointwise_conv(x, torch.randn(2, 3, 1, 1, 1), None, (0, 1, 1))


def test_pointwise_conv_under_autocast_keeps_the_low_precision():
    x = torch.randn(1, 4, 6, 5, 3)
    w = torch.randn(3, 4, 1, 1, 1)
    b = torch.randn(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pointwise_conv(x, w, b, (2, 2, 1))
        ref = torch.nn.functional.conv3d(x, w, b, (2, 2, 1))
    assert y.dtype == ref.dtype == torch.bfloat16
    assert rel_err(y.float(), ref.float()) < 2e-2



@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_pointwise_conv_backends_agree_float64(backend):
    x = torch.randn(2, 3, 5, 4, 3, dtype=torch.float64)
    w = torch.randn(4, 3, 1, 1, 1, dtype=torch.float64)
    ref = torch.nn.functional.conv3d(x, w, None, (2, 2, 1))
    assert_close_normwise(pointwise_conv(x, w, None, (2, 2, 1), backend=backend), ref, 1e-13)


def test_pointwise_conv_forced_triton_on_cpu_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="triton.*pointwise_conv.*TRITON_INTERPRET"):
        pointwise_conv(torch.randn(1, 3, 4, 4, 2), torch.randn(2, 3, 1, 1, 1), None, (1, 1, 1), backend="triton")


def dispatch_sample():
    """One call of the op for tests/test_dispatch.py's contract over every registered op: (run(backend) ->
    output, the arguments its table's reasons take)."""
    from ahnet_fast import ops

    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, 4, dtype=torch.float64)
    w = torch.randn(5, 4, 1, 1, 1, dtype=torch.float64) * 0.2
    return (lambda be: ops.pointwise_conv(x, w, None, (2, 2, 1), backend=be)), (x,)
