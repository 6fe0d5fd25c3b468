"""pytest-benchmark view of a bottleneck's tail in training mode (forward + backward): PyTorch's
F.relu(F.batch_norm(x) + residual) vs ahnet_fast's reference vs the fused C++ op, channel-first and
channels-last:

    pip install pytest-benchmark
    pytest benchmarks/test_bench_bn_add_relu.py --benchmark-group-by=param:case,param:layout

(Timings are never asserted; the fused result is checked against PyTorch's before it is timed.)
bench_bn_add_relu.py adds the bytes saved for backward and the rate against the copy bandwidth.
"""
import pytest
import torch
import torch.nn.functional as F
from _common import assert_matches, smoke

import ahnet_fast
from ahnet_fast.ops import bn_add_relu

pytest.importorskip("pytest_benchmark")

CASES = {"layer1 256@32x32x8": (1, 256, 32, 32, 8), "layer2 512@16x16x4": (1, 512, 16, 16, 4)}
if smoke():
    CASES = {k: (1, s[1] % 7 + 3, 5, 4, 3) for k, s in CASES.items()}


@pytest.mark.parametrize("impl", ["torch", "reference", "fused"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("case", list(CASES))
def test_bn_add_relu_forward_backward(benchmark, case, layout, impl):
    if impl == "fused" and not ahnet_fast.extension_available():
        pytest.skip("the compiled extension is not built")
    shape = CASES[case]
    fmt = torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).contiguous(memory_format=fmt).requires_grad_()
    r = torch.randn(shape, generator=g).contiguous(memory_format=fmt).requires_grad_()
    w = (torch.rand(shape[1], generator=g) + 0.5).requires_grad_()
    b = torch.randn(shape[1], generator=g).requires_grad_()
    grad = torch.randn(shape, generator=g).contiguous(memory_format=fmt)

    def run(which):
        x.grad = r.grad = w.grad = b.grad = None
        rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
        if which == "torch":
            y = F.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5) + r)
        else:
            y = bn_add_relu(x, r, rm, rv, w, b, True, 0.1, 1e-5,
                                    backend="cpp" if which == "fused" else "reference")
        y.backward(grad)
        return y.detach(), x.grad, r.grad, w.grad, b.grad

    assert_matches(run(impl), run("torch"), f"{case} {layout} {impl}")
    benchmark.pedantic(lambda: run(impl), rounds=5, warmup_rounds=1)
