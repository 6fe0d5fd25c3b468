"""pytest-benchmark view of AH-Net's stem, conv1 (7x7x3, stride (2, 2, 1)) then pool1 (1x1x2 over the
slices), forward + backward with the image needing no gradient (as in training): PyTorch's conv3d +
max_pool3d (MONAI's) vs ahnet_fast's stem_conv_pool (slice taps folded into a 2D convolution, the
compiled slice pooling, band by band):

    pip install pytest-benchmark
    pytest benchmarks/test_bench_stem_conv_pool.py --benchmark-group-by=param:case

(Timings are never asserted; the result is checked against conv3d + max_pool3d before it is timed.)
"""
import pytest
import torch
import torch.nn.functional as F
from _common import assert_matches, smoke

from ahnet_fast.ops.stem_conv_pool import stem_conv_pool

pytest.importorskip("pytest_benchmark")

# the input image: AH-Net's training patch, and a larger one
CASES = {"128x128x32": (128, 128, 32), "256x256x64": (256, 256, 64)}
if smoke():
    CASES = {k: (12, 10, 6) for k in CASES}


@pytest.mark.parametrize("impl", ["torch", "fused"])
@pytest.mark.parametrize("case", list(CASES))
def test_stem_conv_pool_forward_backward(benchmark, case, impl):
    size = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, *size, generator=g)
    w = (torch.randn(64, 1, 7, 7, 3, generator=g) * 0.05).requires_grad_()
    grad = torch.randn(1, 64, size[0] // 2, size[1] // 2, size[2] // 2, generator=g)

    def run(which):
        w.grad = None
        if which == "torch":
            y = F.max_pool3d(F.conv3d(x, w, None, (2, 2, 1), (3, 3, 1)), (1, 1, 2), (1, 1, 2))
        else:
            y = stem_conv_pool(x, w, None, (2, 2, 1), (3, 3, 1), 2)
        y.backward(grad)
        return y.detach(), w.grad

    assert_matches(run(impl), run("torch"), f"{case} {impl}", rtol=1e-5)
    benchmark.pedantic(lambda: run(impl), rounds=5, warmup_rounds=1)
