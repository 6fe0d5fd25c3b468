"""pytest-benchmark view of training-mode BatchNorm+ReLU (forward + backward): PyTorch's
F.batch_norm + F.relu vs ahnet_fast's reference vs the fused C++ op, channel-first and channels-last:

    pip install pytest-benchmark
    pytest benchmarks/test_bench_bn_relu.py --benchmark-group-by=param:case,param:layout

(Timings are never asserted; the fused result is checked against PyTorch's before it is timed.)
bench_bn_relu.py adds the bytes saved for backward and the fraction of the copy bandwidth.
"""
import pytest
import torch
import torch.nn.functional as F
from _common import assert_matches, smoke

import ahnet_fast
from ahnet_fast.ops import bn_relu

pytest.importorskip("pytest_benchmark")

CASES = {"stem 64@64x64x16": (1, 64, 64, 64, 16), "dense4 80@64x64x16": (1, 80, 64, 64, 16),
         "dense0 1084@8x8x2": (1, 1084, 8, 8, 2)}
if smoke():
    CASES = {k: (1, s[1] % 7 + 3, 5, 4, 3) for k, s in CASES.items()}


@pytest.mark.parametrize("impl", ["torch", "reference", "fused"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("case", list(CASES))
def test_bn_relu_forward_backward(benchmark, case, layout, impl):
    if impl == "fused" and not ahnet_fast.extension_available():
        pytest.skip("the compiled extension is not built")
    shape = CASES[case]
    fmt = torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).contiguous(memory_format=fmt).requires_grad_()
    w = (torch.rand(shape[1], generator=g) + 0.5).requires_grad_()
    b = torch.randn(shape[1], generator=g).requires_grad_()
    grad = torch.randn(shape, generator=g).contiguous(memory_format=fmt)

    def run(which):
        x.grad = w.grad = b.grad = None
        rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
        if which == "torch":
            y = F.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))
        else:
            y = bn_relu(x, rm, rv, w, b, True, 0.1, 1e-5, backend="cpp" if which == "fused" else "reference")
        y.backward(grad)
        return y.detach(), x.grad, w.grad, b.grad

    assert_matches(run(impl), run("torch"), f"{case} {layout} {impl}")
    benchmark.pedantic(lambda: run(impl), rounds=5, warmup_rounds=1)
