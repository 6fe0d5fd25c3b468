"""pytest-benchmark view of AH-Net's anisotropic convolutions (forward + input and weight gradients):
each path of ahnet_fast.ops.aniso_conv (aten = PyTorch's own conv3d, matmul, shift, folded) and the
one the dispatcher picks, on the heaviest shapes of each kernel at a 1x1x128x128x32 input:

    pip install pytest-benchmark
    pytest benchmarks/test_bench_aniso_conv.py --benchmark-group-by=param:case

(Not part of the test suite's timings: claims to read side by side, never asserted. Every path's
result is checked against aten before it is timed.) bench_aniso_conv.py covers every shape, with
FLOPs and the fraction of the measured matmul peak; roofline.py puts the ops side by side.
"""
import pytest
import torch
from _common import assert_matches, smoke

from ahnet_fast.ops import aniso_conv, _conv_paths as conv_paths

pytest.importorskip("pytest_benchmark")

# (input, weight): the decoder's 3x3x1 and 1x1x3 (growth 20 from a bottleneck of 80) at full
# decoder resolution, the encoder's widest 3x3x1, and a 1x1x1 bottleneck
CASES = {"3x3x1 80->20 @64x64x16": ((1, 80, 64, 64, 16), (20, 80, 3, 3, 1)),
         "1x1x3 20->20 @64x64x16": ((1, 20, 64, 64, 16), (20, 20, 1, 1, 3)),
         "3x3x1 64->64 @32x32x8": ((1, 64, 32, 32, 8), (64, 64, 3, 3, 1)),
         "1x1x1 104->80 @64x64x16": ((1, 104, 64, 64, 16), (80, 104, 1, 1, 1))}
if smoke():
    CASES = {k: ((1, x[1], 6, 5, 3), w) for k, (x, w) in CASES.items()}
PATHS = ["aten", "matmul", "shift", "folded", "dispatched"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(CASES))
def test_aniso_conv_forward_backward(benchmark, case, path):
    x_shape, w_shape = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=g)
    w = torch.randn(w_shape, generator=g) * 0.05
    stride, padding = [1, 1, 1], [(k - 1) // 2 for k in w_shape[2:]]
    candidates = aniso_conv.candidates(x, w, stride, padding)
    if path != "dispatched" and path not in candidates:
        pytest.skip(f"path {path} cannot compute {case}")
    grad = torch.randn(conv_paths.forward("aten", x, w, stride, padding).shape, generator=g)

    def run():
        fp = aniso_conv.choose("forward", x, w, stride, padding) if path == "dispatched" else path
        bp = aniso_conv.choose("backward", x, w, stride, padding) if path == "dispatched" else path
        return (conv_paths.forward(fp, x, w, stride, padding),) + tuple(
            conv_paths.backward(bp, grad, x, w, stride, padding))

    reference = (conv_paths.forward("aten", x, w, stride, padding),) + tuple(
        conv_paths.backward("aten", grad, x, w, stride, padding))
    assert_matches(run(), reference, f"{case} {path}")
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
