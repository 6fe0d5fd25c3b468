"""The Triton kernels of BatchNorm + ReLU (ahnet_fast/kernels/triton/bn_relu.py), run in Triton's
interpreter on CPU tensors (on a GPU machine, on CUDA), through the op ``bn_relu`` with
backend="triton" against the pure-PyTorch reference (float64 where the point is accuracy).

Coverage (branch -> tests); test_coverage_table checks it against the kernels' compile_specs():

    bn_relu_stats_kernel          BLOCK=*             -> test_slices_and_programs, test_matches_reference
    bn_relu_fwd_kernel       BLOCK=*             -> test_slices_and_programs, test_matches_reference
    bn_relu_grad_sums_kernel BLOCK=*             -> test_slices_and_programs, test_matches_reference
    bn_relu_bwd_kernel       TRAINING=True|False -> test_slices_and_programs, test_matches_reference, test_low_precision
    bn_relu_bwd_kernel       BLOCK=*             -> test_slices_and_programs, test_matches_reference

The reductions (bn_relu_stats_kernel, bn_relu_grad_sums_kernel) run a program per (channel, slice of the
channel's M = N * S elements); a slice is at least a block, and longer than a block once M passes
MAX_SLICES blocks. test_slices_and_programs runs both: several one-block slices per
channel, and slices of two blocks (the in-kernel combination of blocks by Chan's formula, checked
with a mean 10^4 times the spread); with several programs along both grid axes of every kernel,
channel-first and channels-last, training (batch statistics, TRAINING) and eval (running statistics).
test_low_precision runs float16 and bfloat16 inputs (bfloat16: tests/_triton_support.py).
"""
import importlib

import pytest
import torch

from tests._triton_support import (DEVICE, INTERPRETED, allow_bf16, check_coverage, launches,  # noqa: F401
                                   low_precision_ok, runs_here)
from tests.conftest import assert_close_normwise, rel_err
from tests.test_bn_relu import make_input, run

pytest.importorskip("triton")
from ahnet_fast.kernels.triton import bn_relu as kernels  # noqa: E402

bn_module = importlib.import_module("ahnet_fast.ops.bn_relu")  # the package re-exports names over it
NAMES = ("y", "dx", "dweight", "dbias", "running_mean", "running_var")
CASES = [((2, 3, 5, 7, 3), "contiguous"), ((2, 3, 5, 7, 3), "channels_last"), ((3, 5, 11), "contiguous"),
         ((4, 3), "contiguous"), ((2, 6, 4, 5), "transposed"), ((2, 3, 9, 4, 5), "strided")]


@runs_here
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_matches_reference(shape, layout, training):
    """Small shapes in every layout the op takes (one program per channel)."""
    x = make_input(shape, torch.float32, layout, torch.Generator().manual_seed(3)).to(DEVICE)
    got, ref = run(x, training, "triton"), run(x, training, "reference")
    for a, b, what in zip(got, ref, NAMES):
        assert_close_normwise(a, b, 1e-5, 1e-7, what=what)
    if layout == "channels_last":
        assert got[0].stride() == x.stride() and got[1].stride() == x.stride()


def _shape(kind):
    """'slices': M = N * S between 2 and 3 blocks: 3 one-block slices and 3 programs per channel.
    'long': M just past MAX_SLICES blocks: slices of two blocks (the last one short)."""
    block = kernels.BLOCK
    if kind == "slices":
        return (2, 3, 7, -(-5 * block // 28) + 1)  # H * W = 7 * (ceil(1.25 * BLOCK / 7) + 1)
    return (2, 2, (kernels.MAX_SLICES * block) // 2 + block // 2 + 5)


SLICE_CASES = [("slices", "contiguous", True), ("slices", "contiguous", False), ("slices", "channels_last", True),
               ("slices", "channels_last", False), ("long", "contiguous", True)]


@runs_here
@pytest.mark.parametrize("kind,layout,training", SLICE_CASES,
                         ids=[f"{k}-{lay}-{'train' if t else 'eval'}" for k, lay, t in SLICE_CASES])
def test_slices_and_programs(kind, layout, training, launches):
    """Against float64. In the 'long' case channel 1 has a mean 10^4 times its spread: its statistics
    (two-pass within a block, Chan's formula between blocks and slices) must keep the variance."""
    shape = _shape(kind)
    x = make_input(shape, torch.float32, layout, torch.Generator().manual_seed(8)).to(DEVICE)
    big = kind == "long"
    if big:
        x[:, 1] += 1e4
    got = run(x, training, "triton")
    truth = run(x.double(), training, "reference", torch.float64)
    m = shape[0] * x[0, 0].numel()
    per, slices = kernels._slices(m)
    if kind == "slices":
        assert per == kernels.BLOCK and slices >= 3
    else:
        assert per >= 2 * kernels.BLOCK and slices >= 2
    for a, b, what in zip(got, truth, NAMES):
        if big:  # channel 0 as any other; channel 1's x - mean loses ~1e-3 of y's digits in float32
            assert_close_normwise(a[0] if a.dim() == 1 else a[:, 0], b[0] if b.dim() == 1 else b[:, 0], 1e-5, 1e-7,
                                  what=f"{what}, channel 0")
        else:
            assert_close_normwise(a, b, 1e-5, 1e-7, what=what)
    if big:
        assert_close_normwise(got[4][1], truth[4][1], 1e-6, what="running_mean, mean 1e4")
        assert_close_normwise(got[5][1], truth[5][1], 1e-5, what="running_var, mean 1e4")
        assert rel_err(got[0][:, 1], truth[0][:, 1]) < 1e-3
    c = shape[1]
    blocks = -(-m // kernels.BLOCK)
    assert launches.max_grid("bn_relu_stats_kernel") == ((c, slices, 1) if training else (0, 0, 0))
    assert launches.max_grid("bn_relu_grad_sums_kernel") == (c, slices, 1)
    assert launches.max_grid("bn_relu_fwd_kernel") == (blocks, c, 1)
    assert launches.max_grid("bn_relu_bwd_kernel", TRAINING=training) == (blocks, c, 1)


@runs_here
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_low_precision(dtype, training, monkeypatch, launches):
    """float16 / bfloat16 input (float32 parameters and statistics): each result within 2x the error
    of PyTorch's own batch_norm + relu in that dtype, against float64 from the same rounded input
    and output gradient."""
    if dtype == torch.bfloat16:
        allow_bf16(monkeypatch, bn_module, required=False)  # right without ml_dtypes too
    x = make_input(_shape("slices"), torch.float64, "channels_last", torch.Generator().manual_seed(4)).to(DEVICE)
    x = x.to(dtype)
    truth = run(x.double(), training, "reference", torch.float64, grad_dtype=dtype)
    ref = run(x, training, "reference")
    got = run(x, training, "triton")
    for a, b, t, what in zip(got[:4], ref[:4], truth[:4], NAMES):
        low_precision_ok(a, b, t, 1e-3, what=what)
    assert got[0].dtype == got[1].dtype == dtype
    assert launches.values("bn_relu_bwd_kernel", "TRAINING") == {training}


@runs_here
@pytest.mark.skipif(not INTERPRETED, reason="float64 runs on ATen on a GPU (triton_reasons)")
def test_float64():
    x = make_input((2, 4, 6, 5, 3), torch.float64, "contiguous", torch.Generator().manual_seed(4)).to(DEVICE)
    for training in (True, False):
        for a, b, what in zip(run(x, training, "triton", torch.float64),
                              run(x, training, "reference", torch.float64), NAMES):
            assert_close_normwise(a, b, 1e-10, 1e-12, what=what)


@runs_here
def test_triton_opcheck():
    forward, backward = bn_module._triton_ops()
    x = make_input((2, 3, 4, 5), torch.float32, "contiguous", torch.Generator().manual_seed(6)).to(DEVICE)
    w, b = torch.rand(3, device=DEVICE) + 0.5, torch.randn(3, device=DEVICE)
    rm, rv = torch.randn(3, device=DEVICE), torch.rand(3, device=DEVICE) + 0.5
    for xin, training in ((x, True), (x.clone().requires_grad_(), True), (x, False)):
        torch.library.opcheck(forward, (xin, w, b, None if training else rm, None if training else rv, training,
                                        1e-5), test_utils=("test_schema", "test_faketensor",
                                                           "test_autograd_registration"))


def test_coverage_table():
    """Every constexpr value compile_specs() builds is in the table above, with a test that runs it."""
    check_coverage(__doc__, kernels, globals())


@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_prefix_read_in_place(channels_last):
    """The dense block's input is a channel prefix buf[:, :C] of its concatenation buffer: at batch 2
    it is not contiguous, and the kernels index it where it lies instead of copying it."""
    g = torch.Generator().manual_seed(11)
    buf = torch.randn(2, 9, 5, 6, 3, generator=g, dtype=torch.float64).to(DEVICE)
    if channels_last:
        buf = buf.contiguous(memory_format=torch.channels_last_3d)
    x = buf[:, :4]
    assert not x.is_contiguous()
    assert kernels.indexable(x) is x
    weight = torch.rand(4, generator=g, dtype=torch.float64).to(DEVICE) + 0.5
    bias = torch.randn(4, generator=g, dtype=torch.float64).to(DEVICE) * 0.1
    y, mean, var = kernels.bn_relu_forward(x, weight, bias, None, None, True, 1e-5)
    ref = torch.relu(torch.nn.functional.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5))
    assert_close_normwise(y, ref, 1e-12)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(DEVICE)
    dx, dw, db = kernels.bn_relu_backward(gy, x, weight, bias, mean, var, True, 1e-5)
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    torch.relu(torch.nn.functional.batch_norm(xr, None, None, wr, br, True, 0.0, 1e-5)).backward(gy)
    for a, b in ((dx, xr.grad), (dw, wr.grad), (db, br.grad)):
        assert_close_normwise(a, b, 1e-10)
    # a layout whose spatial axes do not collapse into one stride is copied
    permuted = buf.permute(0, 1, 3, 2, 4)[:, :4]
    assert kernels.indexable(permuted) is not permuted
