"""pytest-benchmark view of pyramid volumetric pooling (forward+backward), MONAI's PSP vs reference vs fused,
on CPU, alone and with the concatenation AH-Net takes:

    pip install pytest-benchmark
    pytest benchmarks/test_bench_pyramid_pool.py --benchmark-group-by=param:case,param:use

(Timings are claims to read side by side, never asserted; each result is checked against MONAI's
before it is timed.)
The script bench_pyramid_pool.py adds saved-for-backward bytes, fresh-process peak memory and bandwidth.
"""
import pytest
import torch
from _common import assert_matches, smoke

import ahnet_fast

pytest.importorskip("pytest_benchmark")
monai_ahnet = pytest.importorskip("monai.networks.nets.ahnet")

CASES = {"1x124x64x64x16": (1, 124, 64, 64, 16), "1x124x128x128x32": (1, 124, 128, 128, 32)}
if smoke():  # the largest pooling window is 64: the smallest input it takes
    CASES = {"1x5x64x64x2": (1, 5, 64, 64, 2)}


@pytest.mark.parametrize("impl", ["MONAI", "reference", "fused"])
@pytest.mark.parametrize("use", ["psp", "psp+cat"])
@pytest.mark.parametrize("case", list(CASES))
def test_pyramid_pool_forward_backward(benchmark, case, use, impl):
    shape = CASES[case]
    torch.manual_seed(0)
    theirs = monai_ahnet.PSP(3, 4, shape[1], "transpose")
    ours = ahnet_fast.PyramidVolumetricPooling(3, 4, shape[1], "transpose",
                                               backend="cpp" if impl == "fused" else "reference")
    ours.load_state_dict(theirs.state_dict())
    concat = use == "psp+cat"
    if impl == "MONAI":
        fn = (lambda a: torch.cat((theirs(a), a), 1)) if concat else theirs
    else:
        fn = lambda a: ours(a, concat_input=concat)  # noqa: E731
    x = torch.randn(shape).requires_grad_()
    with torch.no_grad():
        grad = torch.randn(fn(x).shape)

    def run(f):
        x.grad = None
        y = f(x)
        y.backward(grad)
        return y.detach(), x.grad

    theirs_fn = (lambda a: torch.cat((theirs(a), a), 1)) if concat else theirs
    assert_matches(run(fn), run(theirs_fn), f"{case} {use} {impl}")
    benchmark.pedantic(lambda: run(fn), rounds=5, warmup_rounds=1)
