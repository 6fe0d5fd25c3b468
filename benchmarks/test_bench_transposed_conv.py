"""pytest-benchmark view of AH-Net's x2 up-transitions (transposed convolution, kernel = stride = 2,
forward + backward): PyTorch's conv_transpose3d (MONAI's) vs ahnet_fast's matrix product + voxel
shuffle:

    pip install pytest-benchmark
    pytest benchmarks/test_bench_transposed_conv.py --benchmark-group-by=param:case

(Timings are never asserted; the result is checked against conv_transpose3d's before it is timed.)
"""
import pytest
import torch
import torch.nn.functional as F
from _common import assert_matches, smoke

from ahnet_fast.ops.transposed_conv import transposed_conv

pytest.importorskip("pytest_benchmark")

# (channels, input map) of up0, up1, up2, up3 and final's upsampling at a 1x1x128x128x32 input
CASES = {"up0": (1024, (4, 4, 1)), "up1": (512, (8, 8, 2)), "up2": (256, (16, 16, 4)), "up3": (64, (32, 32, 8)),
         "final": (3, (64, 64, 16))}
if smoke():
    CASES = {k: (3, (2, 3, 2)) for k in CASES}


@pytest.mark.parametrize("impl", ["torch", "fused"])
@pytest.mark.parametrize("case", list(CASES))
def test_transposed_conv_forward_backward(benchmark, case, impl):
    ch, size = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, ch, *size, generator=g).requires_grad_()
    w = (torch.randn(ch, ch, 2, 2, 2, generator=g) * 0.05).requires_grad_()
    grad = torch.randn(1, ch, *[2 * s for s in size], generator=g)

    def run(which):
        x.grad = w.grad = None
        y = F.conv_transpose3d(x, w, None, 2) if which == "torch" else transposed_conv(x, w, None, (2, 2, 2))
        y.backward(grad)
        return y.detach(), x.grad, w.grad

    assert_matches(run(impl), run("torch"), f"{case} {impl}", rtol=1e-5)
    benchmark.pedantic(lambda: run(impl), rounds=5, warmup_rounds=1)
