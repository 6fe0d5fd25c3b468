"""A Triton kernel that cannot run falls back to the op's ATen composition under ``auto`` (one warning,
listed by ``ahnet_fast.fallback_report()``), and raises when Triton is forced.

Failures are injected where Triton would raise a compile error (``ahnet_fast.kernels.errors``). On
this CPU machine the kernels run in Triton's interpreter; ``auto`` never picks Triton for CPU
tensors, so the tests that exercise ``auto`` put Triton first in the CPU preference, as on a GPU.
"""
import os
import warnings

import pytest
import torch

import ahnet_fast
from ahnet_fast import backends
from ahnet_fast.kernels import errors
from ahnet_fast.ops import bn_relu, bn_relu_conv, focal_loss, pyramid_pool
from tests.conftest import assert_close_normwise

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs a GPU or TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def clean_state():
    errors.clear_injected_failures()
    backends.clear_fallback_report()
    yield
    errors.clear_injected_failures()
    backends.clear_fallback_report()


@pytest.fixture
def triton_first(monkeypatch):
    """auto prefers Triton on this device, as it does on a GPU."""
    monkeypatch.setattr(backends, "device_preference", lambda device: ("triton", "cpp", "reference"))


def _bn_params(c, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    return (torch.rand(c, generator=g, dtype=dtype) + 0.5, torch.randn(c, generator=g, dtype=dtype) * 0.1)


def _conv_case():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 5, 7, 3, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    w = (torch.randn(4, 6, 3, 3, 1, generator=g, dtype=torch.float64) * 0.2).to(DEVICE).requires_grad_()
    bw, bb = (t.to(DEVICE).requires_grad_() for t in _bn_params(6))
    return x, w, bw, bb


def _run_conv(backend, x, w, bw, bb):
    xs = [t.detach().clone().requires_grad_() for t in (x, w, bw, bb)]
    y = bn_relu_conv(xs[0], None, None, xs[2], xs[3], True, 0.1, 1e-5, xs[1], 1, [1, 1, 0], backend=backend)
    y.backward(torch.ones_like(y))
    return [y.detach()] + [t.grad for t in xs]


def test_launch_failure_is_a_named_kernel_error():
    from ahnet_fast.kernels.triton import aniso_conv as ac

    errors.inject_failure("conv_fwd_kernel")
    x = torch.randn(1, 4, 5, 5, 3, dtype=torch.float64, device=DEVICE)
    w = torch.randn(6, 4, 3, 3, 1, dtype=torch.float64, device=DEVICE)
    with pytest.raises(errors.TritonKernelError, match="conv_fwd_kernel"):
        ac.conv_forward(x, w, None, None, 1, (1, 1, 0))
    errors.clear_injected_failures()
    ac.conv_forward(x, w, None, None, 1, (1, 1, 0))  # runs again once the failure is gone


def test_failed_variant_is_not_compiled_again(monkeypatch):
    from ahnet_fast.kernels.triton import _launch, aniso_conv as ac

    errors.inject_failure("conv_fwd_kernel")
    x = torch.randn(1, 4, 5, 5, 3, dtype=torch.float64, device=DEVICE)
    w = torch.randn(6, 4, 3, 3, 1, dtype=torch.float64, device=DEVICE)
    with pytest.raises(errors.TritonKernelError):
        ac.conv_forward(x, w, None, None, 1, (1, 1, 0))
    errors._injected.clear()  # the injection is gone, the remembered failure is not
    calls = []
    monkeypatch.setattr(_launch, "injected", lambda name: calls.append(name) or False)
    with pytest.raises(errors.TritonKernelError, match="injected"):
        ac.conv_forward(x, w, None, None, 1, (1, 1, 0))
    assert calls == []  # refused before any compile was attempted


def test_grid_past_cuda_limits_falls_back_by_reason():
    from ahnet_fast.kernels.triton import _launch, aniso_conv as ac

    with pytest.raises(errors.TritonKernelError, match="wgrad_reduce_kernel.*grid axis 1 needs 70000 programs"):
        _launch.launch(ac.wgrad_reduce_kernel, (1, 70000), num_warps=4)
    # pyramid pooling puts batch x channels on that axis: the op refuses Triton by reason
    from ahnet_fast.ops.pyramid_pool import _triton_reasons

    big = torch.empty(2, 40000, 8, 8, 1, device="meta")
    assert any("65535" in r for r in _triton_reasons(big))


@pytest.mark.parametrize("kernel", ["conv_fwd_kernel", "conv_dgrad_kernel", "conv_wgrad_kernel", "bn_relu_stats_kernel",
                                    "bn_relu_bwd_kernel"])
def test_auto_falls_back_with_one_warning(triton_first, kernel):
    """Forward and backward kernels alike: the result and every gradient match the reference."""
    case = _conv_case()
    expected = _run_conv("reference", *case)
    errors.inject_failure(kernel)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _run_conv(None, *case)
        again = _run_conv(None, *case)
    for a, b, what in zip(got, expected, ("y", "x", "w", "bn weight", "bn bias")):
        assert_close_normwise(a, b, 1e-10, what=what)
    for a, b in zip(again, got):
        assert torch.equal(a, b)
    ours = [w for w in caught if "falls back from Triton" in str(w.message)]
    assert len(ours) == 1 and kernel in str(ours[0].message)
    report = ahnet_fast.fallback_report()
    assert [r["kernel"] for r in report] == [kernel]
    assert report[0]["count"] >= 2 and "injected" in report[0]["error"]


@pytest.mark.parametrize("kernel", ["conv_fwd_kernel", "conv_dgrad_kernel"])
def test_forced_triton_raises(kernel):
    case = _conv_case()
    errors.inject_failure(kernel)
    with pytest.raises(ahnet_fast.BackendUnavailableError, match=kernel):
        _run_conv("triton", *case)
    with pytest.raises(ahnet_fast.BackendUnavailableError, match=kernel):
        with ahnet_fast.backend("triton"):
            _run_conv(None, *case)
    assert ahnet_fast.fallback_report() == []


def test_bn_relu_falls_back(triton_first):
    x = torch.randn(3, 5, 4, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    bw, bb = (t.to(DEVICE) for t in _bn_params(5))
    ref = bn_relu(x, None, None, bw, bb, True, 0.1, 1e-5, backend="reference")
    errors.inject_failure("bn_relu_fwd_kernel")
    with pytest.warns(RuntimeWarning, match="bn_relu_fwd_kernel"):
        got = bn_relu(x, None, None, bw, bb, True, 0.1, 1e-5)
    assert_close_normwise(got, ref, 1e-12)


def test_focal_loss_falls_back_to_the_next_backend(triton_first):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 9, 7, generator=g).to(DEVICE).requires_grad_()
    labels = torch.randint(0, 3, (2, 9, 7), generator=g).to(DEVICE)
    ref = focal_loss(logits, labels, use_softmax=True, backend="reference")
    errors.inject_failure("focal_loss_fwd_kernel")
    with pytest.warns(RuntimeWarning, match="focal_loss_fwd_kernel"):
        got = focal_loss(logits, labels, use_softmax=True)
    assert_close_normwise(got, ref, 1e-5)
    with pytest.raises(ahnet_fast.BackendUnavailableError, match="focal_loss_fwd_kernel"):
        focal_loss(logits, labels, use_softmax=True, backend="triton")


def _psp_params(c, levels, dtype):
    g = torch.Generator().manual_seed(9)
    proj_w = [torch.randn(1, c, 1, 1, 1, generator=g, dtype=dtype) * 0.3 for _ in range(levels)]
    proj_b = [torch.randn(1, generator=g, dtype=dtype) * 0.1 for _ in range(levels)]
    up_w = [torch.randn(1, 1, 8 << i, 8 << i, 1, generator=g, dtype=dtype) * 0.1 for i in range(levels)]
    up_b = [torch.randn(1, generator=g, dtype=dtype) * 0.1 for _ in range(levels)]
    return proj_w, proj_b, up_w, up_b


@pytest.mark.parametrize("kernel", ["pyramid_pool_pool0_kernel", "pyramid_pool_route_kernel"])
def test_pyramid_pool_falls_back(triton_first, kernel):
    """The forward through the op's dispatch; the backward (route kernel) through its composition."""
    levels, c = 2, 3
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, c, 32, 32, 2, generator=g, dtype=torch.float64).to(DEVICE)
    params = [[t.to(DEVICE) for t in ts] for ts in _psp_params(c, levels, torch.float64)]

    def run(backend):
        xi = x.clone().requires_grad_()
        y = pyramid_pool(xi, *params, upsample_mode="transpose", concat_input=True, backend=backend)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y))
        return y.detach(), xi.grad

    ref = run("reference")
    errors.inject_failure(kernel)
    with pytest.warns(RuntimeWarning, match=kernel):
        got = run(None)
    for a, b in zip(got, ref):
        assert_close_normwise(a, b, 1e-10)
    with pytest.raises(ahnet_fast.BackendUnavailableError, match=kernel):
        run("triton")


def test_below_sm80_is_refused_by_reason(monkeypatch):
    from ahnet_fast.ops import _registry

    monkeypatch.setattr(_registry, "triton_interpreted", lambda: False)
    monkeypatch.setattr(_registry, "cuda_capability", lambda device: (7, 5))
    reasons = _registry.triton_reasons(torch.device("cuda", 0), torch.float32)
    assert any("sm_75" in r and "sm_80" in r for r in reasons)


def test_old_triton_is_refused_by_reason(monkeypatch):
    from ahnet_fast.ops import _registry

    monkeypatch.setattr(_registry, "_triton_version", (3, 3))
    reasons = _registry.triton_reasons(torch.device("cuda", 0), torch.float32)
    assert any("3.3 is older than 3.5" in r for r in reasons)
