"""ahnet_fast::bn_add_relu (a bottleneck's BatchNorm + residual sum + ReLU): the C++ kernel against the
pure-PyTorch reference."""
import importlib

import pytest
import torch

import ahnet_fast
from ahnet_fast import backends
from ahnet_fast.ops import bn_add_relu, bn_add_relu_reference
from tests.conftest import assert_close_normwise, rel_err
from tests.test_bn_relu import make_input

pytestmark = pytest.mark.skipif(not ahnet_fast.extension_available(), reason="compiled extension not built")


def run(x, r, training, backend, dtype_params=torch.float32, momentum=0.1):
    c = x.shape[1]
    g = torch.Generator().manual_seed(11)
    weight = (torch.rand(c, generator=g) + 0.5).to(dtype_params).requires_grad_()
    bias = torch.randn(c, generator=g).to(dtype_params).requires_grad_()
    rm = torch.randn(c, generator=g).to(dtype_params)
    rv = (torch.rand(c, generator=g) + 0.5).to(dtype_params)
    xi, ri = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    if backend == "reference":
        y = bn_add_relu_reference(xi, ri, rm, rv, weight, bias, training, momentum, 1e-5)
    else:
        y = bn_add_relu(xi, ri, rm, rv, weight, bias, training, momentum, 1e-5, backend=backend)
    grad = torch.randn(y.shape, generator=g).to(y.dtype)
    y.backward(grad)
    return y, xi.grad, ri.grad, weight.grad, bias.grad, rm, rv


NAMES = ("y", "dx", "dresidual", "dweight", "dbias", "running_mean", "running_var")
SHAPES = [(2, 3, 5, 7, 3), (1, 4, 9, 1, 2), (3, 5, 11), (2, 6, 4, 5)]
CASES = [(s, lay) for s in SHAPES for lay in ("contiguous", "channels_last", "transposed", "strided")
         if lay == "contiguous" or len(s) >= 4]


@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("residual_layout", ["same", "contiguous"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fp32_matches_reference(shape, layout, residual_layout, training):
    seed = hash((shape, layout, residual_layout)) % 2**31
    x = make_input(shape, torch.float32, layout, torch.Generator().manual_seed(seed))
    r = make_input(shape, torch.float32, layout if residual_layout == "same" else "contiguous",
                   torch.Generator().manual_seed(seed + 1)) - 1.0
    ours, ref = run(x, r, training, "cpp"), run(x, r, training, "reference")
    for name, a, b in zip(NAMES, ours, ref):
        assert_close_normwise(a, b, rtol=1e-5, atol=1e-6, what=name)
    expected = x.stride() if x.is_contiguous() or layout == "channels_last" else torch.empty(shape).stride()
    assert ours[0].stride() == expected, "output layout"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float64_matches_reference_tightly(layout, training):
    x = make_input((2, 4, 6, 5, 3), torch.float64, layout)
    r = make_input((2, 4, 6, 5, 3), torch.float64, layout) - 1.0
    for name, a, b in zip(NAMES, run(x, r, training, "cpp", torch.float64),
                          run(x, r, training, "reference", torch.float64)):
        assert_close_normwise(a, b, rtol=1e-12, atol=1e-13, what=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_low_precision_within_twice_torch_error(dtype, training):
    x32 = make_input((2, 8, 9, 10, 4), torch.float32, "channels_last")
    r32 = make_input((2, 8, 9, 10, 4), torch.float32, "channels_last") - 1.0
    x_low, r_low = x32.to(dtype), r32.to(dtype)
    gold = run(x_low.float(), r_low.float(), training, "reference")
    ours = run(x_low, r_low, training, "cpp")
    theirs = run(x_low, r_low, training, "reference")
    for name, o, t, gd in zip(NAMES[:5], ours, theirs, gold):
        assert o.dtype == t.dtype, name
        err_ours, err_torch = rel_err(o, gd), rel_err(t, gd)
        assert err_ours <= 2 * err_torch + 2e-3, f"{name}: ours {err_ours:.2e} vs torch {err_torch:.2e}"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_float64(training, layout):
    x = make_input((2, 3, 4, 3, 2), torch.float64, layout).requires_grad_()
    r = make_input((2, 3, 4, 3, 2), torch.float64, layout).sub(1.0).requires_grad_()
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64).requires_grad_()
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def f(x, r, w, b):
        return bn_add_relu(x, r, None if training else rm, None if training else rv, w, b, training, 0.1,
                                   1e-5, backend="cpp")

    assert torch.autograd.gradcheck(f, (x, r, w, b))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_opcheck(layout):
    x = make_input((2, 3, 4, 5, 2), torch.float32, layout)
    r = make_input((2, 3, 4, 5, 2), torch.float32, "contiguous") - 1.0
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    op = torch.ops.ahnet_fast.bn_add_relu.default
    torch.library.opcheck(op, (x, r, w, b, None, None, True, 1e-5))
    torch.library.opcheck(op, (x, r, w, b, rm, rv, False, 1e-5))
    torch.library.opcheck(op, (x.clone().requires_grad_(), r.clone().requires_grad_(), w.clone().requires_grad_(),
                               b.clone().requires_grad_(), None, None, True, 1e-5))
    y, mean, var = op(x, r, w, b, None, None, True, 1e-5)
    torch.library.opcheck(torch.ops.ahnet_fast.bn_add_relu_backward.default,
                          (torch.randn_like(y), y, x, w, b, mean, var, True, 1e-5))


def test_torch_compile_fullgraph():
    x = make_input((2, 4, 6, 5, 3), torch.float32, "contiguous").requires_grad_()
    r = make_input((2, 4, 6, 5, 3), torch.float32, "contiguous").sub(1.0).requires_grad_()
    w, b = (torch.rand(4) + 0.5).requires_grad_(), torch.randn(4).requires_grad_()

    def f(x, r, w, b):
        return bn_add_relu(x, r, None, None, w, b, True, 0.1, 1e-5, backend="cpp").square().sum()

    eager = torch.autograd.grad(f(x, r, w, b), (x, r, w, b))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, e in zip(torch.autograd.grad(compiled(x, r, w, b), (x, r, w, b)), eager):
        assert_close_normwise(a, e, 1e-6)


def test_module_helper_matches_batchnorm_bookkeeping():
    from ahnet_fast.nn._bn import bn_add_relu

    x = make_input((3, 4, 5, 6, 2), torch.float32, "contiguous")
    r = torch.randn(3, 4, 5, 6, 2)
    for momentum in (0.1, None):
        ours, ref = torch.nn.BatchNorm3d(4, momentum=momentum), torch.nn.BatchNorm3d(4, momentum=momentum)
        for step in range(3):
            xs = x * (step + 1)
            assert_close_normwise(bn_add_relu(ours, xs, r, "cpp"), torch.relu(ref(xs) + r), 1e-6)
        ours.eval(), ref.eval()
        assert_close_normwise(bn_add_relu(ours, x, r, "cpp"), torch.relu(ref(x) + r), 1e-6)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert_close_normwise(getattr(ours, name).float(), getattr(ref, name).float(), 1e-6, what=name)


def test_mixed_dtypes_fall_back_to_the_composition_and_forced_cpp_says_why():
    x = torch.randn(2, 3, 4, 4, 2, dtype=torch.bfloat16)
    r = torch.randn(2, 3, 4, 4, 2)
    w, b = torch.ones(3), torch.zeros(3)
    y = bn_add_relu(x, r, None, None, w, b, True, 0.1, 1e-5)
    assert y.dtype == torch.float32  # the sum promotes, as in the composition
    assert torch.equal(y, bn_add_relu_reference(x, r, None, None, w, b, True, 0.1, 1e-5))
    with pytest.raises(backends.BackendUnavailableError, match="residual's dtype"):
        bn_add_relu(x, r, None, None, w, b, True, 0.1, 1e-5, backend="cpp")


def test_bad_input_raises_value_error():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="residual has shape"):
        bn_add_relu(x, torch.randn(2, 3, 5), None, None, None, None, True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="3 channels"):
        bn_add_relu(x, torch.randn(2, 3, 4), None, None, torch.ones(4), torch.zeros(4), True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn_add_relu(torch.randn(1, 3), torch.randn(1, 3), None, None, None, None, True, 0.1, 1e-5)


def test_auto_runs_the_composition_on_small_maps(monkeypatch):
    mod = importlib.import_module("ahnet_fast.ops.bn_add_relu")  # the package re-exports the op over it

    calls = []
    real = torch.ops.ahnet_fast.bn_add_relu
    monkeypatch.setattr(mod.torch.ops.ahnet_fast, "bn_add_relu", lambda *a: calls.append(1) or real(*a),
                        raising=False)
    small = torch.randn(1, 4, 4, 4, 2)  # 32 values per channel
    large = torch.randn(1, 4, 16, 16, 4)  # 1024
    for x in (small, large):
        bn_add_relu(x, torch.randn_like(x), None, None, None, None, True, 0.1, 1e-5, backend="auto")
    assert len(calls) == 1  # the large map only
    bn_add_relu(small, torch.randn_like(small), None, None, None, None, True, 0.1, 1e-5, backend="cpp")
    assert len(calls) == 2  # a forced backend runs whatever the size


def test_nan_follows_torch_relu_backward():
    """A NaN output passes the gradient (torch's ReLU backward blocks only where the output is <= 0):
    here a NaN only in the residual."""
    x = make_input((1, 3, 4, 4, 2), torch.float64, "contiguous")
    r = torch.randn(1, 3, 4, 4, 2, dtype=torch.float64)
    r[0, 1, 2, 3, 1] = float("nan")
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    grads = []
    for backend in ("cpp", "reference"):
        xi, ri = x.clone().requires_grad_(), r.clone().requires_grad_()
        y = bn_add_relu(xi, ri, None, None, w, b, True, 0.1, 1e-5, backend=backend)
        y.backward(torch.ones_like(y))
        grads.append((y.detach(), ri.grad))
    (y, dr), (y_ref, dr_ref) = grads
    assert torch.equal(y.isnan(), y_ref.isnan()) and y.isnan().sum() == 1
    assert torch.equal(dr, dr_ref) and dr[0, 1, 2, 3, 1] == 1


def dispatch_sample():
    """One call of the op for tests/test_dispatch.py's contract over every registered op: (run(backend) ->
    output, the arguments its table's reasons take)."""
    from ahnet_fast import ops
    from tests.test_bn_relu import bn_sample_arguments

    x, mean, var, w, b = bn_sample_arguments()
    residual = torch.randn_like(x)
    return (lambda be: ops.bn_add_relu(x, residual, mean.clone(), var.clone(), w, b, True, 0.1, 1e-5, backend=be)), \
        (x, residual)
