"""pytest-benchmark view of AH-Net's plain 1x1x1 convolutions (each bottleneck's first convolution
and the strided downsampling projections, forward + backward): PyTorch's conv3d (MONAI's) vs
ahnet_fast's pointwise_conv (a strided input subsampled once, then one matrix product):

    pip install pytest-benchmark
    pytest benchmarks/test_bench_pointwise_conv.py --benchmark-group-by=param:case

(Timings are never asserted; the result is checked against conv3d's before it is timed.)
"""
import pytest
import torch
import torch.nn.functional as F
from _common import assert_matches, smoke

from ahnet_fast.ops.pointwise_conv import pointwise_conv

pytest.importorskip("pytest_benchmark")

# (in, out channels, input map, stride) at a 1x1x128x128x32 input: layer1's first convolution, and the
# downsampling projections of layer1 (stride 1), layer2 and layer4 (strided)
CASES = {"layer1.conv1": (256, 64, (32, 32, 16), (1, 1, 1)), "layer1.down": (64, 256, (32, 32, 16), (1, 1, 1)),
         "layer2.down": (256, 512, (32, 32, 16), (2, 2, 1)), "layer4.down": (1024, 2048, (8, 8, 4), (2, 2, 1))}
if smoke():
    CASES = {k: (3, 4, (4, 5, 2), stride) for k, (_, _, _, stride) in CASES.items()}


@pytest.mark.parametrize("impl", ["torch", "fused"])
@pytest.mark.parametrize("case", list(CASES))
def test_pointwise_conv_forward_backward(benchmark, case, impl):
    ci, co, size, stride = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, ci, *size, generator=g).requires_grad_()
    w = (torch.randn(co, ci, 1, 1, 1, generator=g) * 0.05).requires_grad_()
    out_size = [(s + st - 1) // st for s, st in zip(size, stride)]
    grad = torch.randn(1, co, *out_size, generator=g)

    def run(which):
        x.grad = w.grad = None
        y = F.conv3d(x, w, None, stride) if which == "torch" else pointwise_conv(x, w, None, stride)
        y.backward(grad)
        return y.detach(), x.grad, w.grad

    assert_matches(run(impl), run("torch"), f"{case} {impl}", rtol=1e-5)
    benchmark.pedantic(lambda: run(impl), rounds=5, warmup_rounds=1)
