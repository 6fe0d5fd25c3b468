"""pytest-benchmark view of the matrix products behind the CPU convolutions: torch.mm (MKL), with
the BatchNorm-ReLU as a separate pass where the layer has one, against ahnet_fast's channel_mm
kernels (the activation applied as x is read; the weight gradient as channel_mm_nt_):

    pip install pytest-benchmark
    pytest benchmarks/test_bench_channel_mm.py --benchmark-group-by=param:case

(Timings are never asserted; each result is checked against torch's before it is timed. On a CPU
without AVX-512 the kernels' dispatch sends every product to torch.mm, and both columns time it.)
"""
import pytest
import torch
from _common import assert_matches, smoke

from ahnet_fast.ops import channel_mm

pytest.importorskip("pytest_benchmark")

# (M, K, N, BN-ReLU) at a 1x1x128x128x32 input: a dense layer's bottleneck over a band of the last
# block, the final 3x3x1 convolution's nine taps, layer1's 1x1x1 expansion, a 1x1x3's three taps
CASES = {"bottleneck": (80, 104, 40960, True), "final": (27, 128, 33792, True), "layer1": (256, 64, 8192, False),
         "1x1x3": (60, 20, 39936, True)}
if smoke():
    CASES = {k: (m, k2, 200, act) for k, (m, k2, _, act) in CASES.items()}


@pytest.mark.parametrize("impl", ["torch", "kernel"])
@pytest.mark.parametrize("product", ["forward", "weight_gradient"])
@pytest.mark.parametrize("case", list(CASES))
def test_channel_mm(benchmark, case, product, impl):
    m, k, n, act = CASES[case]
    g = torch.Generator().manual_seed(0)
    backend = "reference" if impl == "torch" else "auto"
    if product == "forward":  # out = w @ act(x)
        w, x, out = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g), torch.empty(m, n)
        scale = torch.rand(k, generator=g) + 0.5 if act else None
        shift = torch.randn(k, generator=g) if act else None

        def run(which):
            return channel_mm.mm_into(out, w, x, scale=scale, shift=shift, backend=which).clone()
    else:  # out = grad @ x^T, over the voxels
        grad, x, out = torch.randn(m, n, generator=g), torch.randn(k, n, generator=g), torch.empty(m, k)

        def run(which):
            return channel_mm.mm_nt_into(out, grad, x, backend=which).clone()

    assert_matches(run(backend), run("reference"), f"{case} {product} {impl}", rtol=1e-5)
    benchmark.pedantic(lambda: run(backend), rounds=5, warmup_rounds=1)


# (Co, Ci, kernel, spatial) at a 1x1x128x128x32 input: a dense layer's 3x3x1 and 1x1x3 over a band of
# the last block, layer1's 3x3x1
CONV_CASES = {"dense 3x3x1": (20, 80, (3, 3, 1), (40, 64, 16)), "dense 1x1x3": (20, 20, (1, 1, 3), (40, 64, 16)),
              "layer1 3x3x1": (64, 64, (3, 3, 1), (32, 32, 8))}
if smoke():
    CONV_CASES = {k: (co, ci, kernel, (5, 6, 4)) for k, (co, ci, kernel, _) in CONV_CASES.items()}


@pytest.mark.parametrize("impl", ["torch", "kernel"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_channel_mm_conv(benchmark, case, impl):
    """channel_mm_conv_ (the taps read in place, BatchNorm-ReLU in its panel) against torch's convolution
    (oneDNN) of the activation written out first."""
    co, ci, kernel, spatial = CONV_CASES[case]
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(co, ci, *kernel, generator=g), torch.randn(ci, *spatial, generator=g)
    scale, shift = torch.rand(ci, generator=g) + 0.5, torch.randn(ci, generator=g)
    out = torch.empty(co, *spatial)

    def run(which):
        return channel_mm.conv_into(out, w, x, scale=scale, shift=shift, backend=which).clone()

    backend = "reference" if impl == "torch" else "auto"
    assert_matches(run(backend), run("reference"), f"{case} {impl}", rtol=1e-5)
    benchmark.pedantic(lambda: run(backend), rounds=5, warmup_rounds=1)
