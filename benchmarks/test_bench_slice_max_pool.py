"""pytest-benchmark view of AH-Net's slice max-pooling (window 1x1x2 along the slice axis, forward +
backward): PyTorch's max_pool3d (MONAI's pool1) vs ahnet_fast's slice_max_pool (a uint8 window
position kept instead of the input and int64 indices):

    pip install pytest-benchmark
    pytest benchmarks/test_bench_slice_max_pool.py --benchmark-group-by=param:case

(Timings are never asserted; the result is checked against max_pool3d's before it is timed.)
"""
import pytest
import torch
import torch.nn.functional as F
from _common import assert_matches, smoke

from ahnet_fast.ops.slice_max_pool import _SliceMaxPool, slice_max_pool

pytest.importorskip("pytest_benchmark")

# conv1's output at a 1x1x128x128x32 input (pooled to 16 slices), and at 1x1x256x256x64
CASES = {"64@64x64x32": (1, 64, 64, 64, 32), "64@128x128x64": (1, 64, 128, 128, 64)}
if smoke():
    CASES = {k: (1, 3, 5, 4, 6) for k in CASES}


@pytest.mark.parametrize("impl", ["torch", "fused", "composed"])
@pytest.mark.parametrize("layout", ["contiguous", "slice_major"])
@pytest.mark.parametrize("case", list(CASES))
def test_slice_max_pool_forward_backward(benchmark, case, layout, impl):
    """fused = the op (the compiled kernel on CPU), composed = its torch-op fallback (CUDA);
    slice_major = conv1's output as the slice-folded stem convolution leaves it."""
    shape = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    if layout == "slice_major":
        x = x.movedim(-1, 1).contiguous().movedim(1, -1)
    x.requires_grad_()
    grad = torch.randn((*shape[:-1], shape[-1] // 2), generator=g)

    def run(which):
        x.grad = None
        y = F.max_pool3d(x, (1, 1, 2), (1, 1, 2)) if which == "torch" else slice_max_pool(x, 2) \
            if which == "fused" else _SliceMaxPool.apply(x, 2)
        y.backward(grad)
        return y.detach(), x.grad

    assert_matches(run(impl), run("torch"), f"{case} {impl}", rtol=0)
    benchmark.pedantic(lambda: run(impl), rounds=5, warmup_rounds=1)
