"""pytest-benchmark view of the focal loss (forward+backward), MONAI vs reference vs fused, on CPU:

    pip install pytest-benchmark
    pytest benchmarks/test_bench_focal_loss.py --benchmark-group-by=param:case

(Timings are claims to read side by side, never asserted; each result is checked against MONAI's
before it is timed.)
The script bench_focal_loss.py adds fresh-process peak memory and bandwidth figures.
"""
import pytest
import torch
from _common import assert_matches, smoke

import ahnet_fast

pytest.importorskip("pytest_benchmark")
monai_losses = pytest.importorskip("monai.losses")

CASES = {"2x3x192x192x64-softmax": ((2, 3, 192, 192, 64), True),
         "2x3x192x192x64-sigmoid": ((2, 3, 192, 192, 64), False),
         "1x8x128x128x64-softmax": ((1, 8, 128, 128, 64), True)}
if smoke():
    CASES = {k: ((1, s[1], 5, 4, 3), softmax) for k, (s, softmax) in CASES.items()}


@pytest.mark.parametrize("impl", ["MONAI", "reference", "fused"])
@pytest.mark.parametrize("case", list(CASES))
def test_focal_loss_forward_backward(benchmark, case, impl):
    shape, softmax = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).requires_grad_()
    labels = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    if impl == "MONAI":
        loss_fn, target = monai_losses.FocalLoss(use_softmax=softmax, to_onehot_y=True), labels.unsqueeze(1).float()
    else:
        loss_fn = ahnet_fast.FocalLoss(use_softmax=softmax, backend="cpp" if impl == "fused" else "reference")
        target = labels

    def step():
        x.grad = None
        loss = loss_fn(x, target)
        loss.backward()
        return loss.detach(), x.grad

    reference_fn = monai_losses.FocalLoss(use_softmax=softmax, to_onehot_y=True)

    def reference():
        x.grad = None
        loss = reference_fn(x, labels.unsqueeze(1).float())
        loss.backward()
        return loss.detach(), x.grad

    assert_matches(step(), reference(), f"{case} {impl}")
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
