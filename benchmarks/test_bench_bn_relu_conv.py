"""pytest-benchmark view of the pre-activation unit BN-ReLU-conv (training forward + backward):
PyTorch eager (F.batch_norm, F.relu, F.conv3d: the normalised activation stored) vs ahnet_fast's
reference vs the fused op (C++ BatchNorm+ReLU, the activation recomputed in backward):

    pip install pytest-benchmark
    pytest benchmarks/test_bench_bn_relu_conv.py --benchmark-group-by=param:case

(Timings are never asserted; the fused result is checked against PyTorch's before it is timed.)
"""
import pytest
import torch
import torch.nn.functional as F
from _common import assert_matches, smoke

import ahnet_fast
from ahnet_fast.ops import bn_relu_conv

pytest.importorskip("pytest_benchmark")

# (input, weight): the dense layers' three units at decoder resolution, and an encoder 3x3x1
CASES = {"1x1x1 104->80 @64x64x16": ((1, 104, 64, 64, 16), (80, 104, 1, 1, 1)),
         "3x3x1 80->20 @64x64x16": ((1, 80, 64, 64, 16), (20, 80, 3, 3, 1)),
         "1x1x3 20->20 @64x64x16": ((1, 20, 64, 64, 16), (20, 20, 1, 1, 3)),
         "3x3x1 128->128 @16x16x4": ((1, 128, 16, 16, 4), (128, 128, 3, 3, 1))}
if smoke():
    CASES = {k: ((1, x[1] % 7 + 3, 6, 5, 3), (w[0] % 5 + 2, x[1] % 7 + 3, *w[2:])) for k, (x, w) in CASES.items()}


@pytest.mark.parametrize("impl", ["torch", "reference", "fused"])
@pytest.mark.parametrize("case", list(CASES))
def test_bn_relu_conv_forward_backward(benchmark, case, impl):
    if impl == "fused" and not ahnet_fast.extension_available():
        pytest.skip("the compiled extension is not built")
    x_shape, w_shape = CASES[case]
    c = x_shape[1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=g).requires_grad_()
    bw = (torch.rand(c, generator=g) + 0.5).requires_grad_()
    bb = torch.randn(c, generator=g).requires_grad_()
    w = (torch.randn(w_shape, generator=g) * 0.05).requires_grad_()
    grad = torch.randn((x_shape[0], w_shape[0], *x_shape[2:]), generator=g)
    padding = [(k - 1) // 2 for k in w_shape[2:]]

    def run(which):
        x.grad = bw.grad = bb.grad = w.grad = None
        rm, rv = torch.zeros(c), torch.ones(c)
        if which == "torch":
            y = F.conv3d(F.relu(F.batch_norm(x, rm, rv, bw, bb, True, 0.1, 1e-5)), w, None, 1, padding)
        else:
            y = bn_relu_conv(x, rm, rv, bw, bb, True, 0.1, 1e-5, w,
                             backend="cpp" if which == "fused" else "reference")
        y.backward(grad)
        return y.detach(), x.grad, bw.grad, bb.grad, w.grad

    assert_matches(run(impl), run("torch"), f"{case} {impl}")
    benchmark.pedantic(lambda: run(impl), rounds=5, warmup_rounds=1)
