"""pytest-benchmark view of AH-Net's decoder dense blocks (3 pseudo-3D layers, growth 20; forward +
backward): MONAI's DenseBlock vs ahnet_fast's reference (the same modules, eager) vs the one-buffer
op with recomputation:

    pip install pytest-benchmark
    pytest benchmarks/test_bench_dense_block.py --benchmark-group-by=param:case

(Timings are never asserted; every result is checked against MONAI's before it is timed.)
bench_dense_block.py adds the bytes each keeps for backward.
"""
import pytest
import torch
from _common import assert_matches, smoke

import ahnet_fast
from ahnet_fast.nn.ahnet import DenseBlock

pytest.importorskip("pytest_benchmark")
monai_ahnet = pytest.importorskip("monai.networks.nets.ahnet")

# the blocks' inputs at a 1x1x128x128x32 AH-Net input
CASES = {"dense4 64@64x64x16": (1, 64, 64, 64, 16), "dense2 256@32x32x8": (1, 256, 32, 32, 8),
         "dense0 1024@8x8x2": (1, 1024, 8, 8, 2)}
if smoke():
    CASES = {k: (1, s[1] // 32 + 3, 5, 4, 3) for k, s in CASES.items()}


@pytest.mark.parametrize("impl", ["MONAI", "reference", "fused"])
@pytest.mark.parametrize("case", list(CASES))
def test_dense_block_forward_backward(benchmark, case, impl):
    if impl == "fused" and not ahnet_fast.extension_available():
        pytest.skip("the compiled extension is not built")
    shape = CASES[case]
    torch.manual_seed(0)
    theirs = monai_ahnet.DenseBlock(3, 3, shape[1], 4, 20, 0.0)
    ours = DenseBlock(3, 3, shape[1], 4, 20, 0.0)
    ours.load_state_dict(theirs.state_dict())
    ours.backend = "cpp" if impl == "fused" else "reference"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).requires_grad_()
    grad = torch.randn((shape[0], shape[1] + 60, *shape[2:]), generator=g)

    def run(block):
        x.grad = None
        block.zero_grad(set_to_none=True)
        y = block(x)
        y.backward(grad)
        return y.detach(), x.grad, *(p.grad for p in block.parameters())

    block = theirs if impl == "MONAI" else ours
    assert_matches(run(block), run(theirs), f"{case} {impl}")
    benchmark.pedantic(lambda: run(block), rounds=5, warmup_rounds=1)
