"""Max pooling along the slice axis only (windows (1, 1, k), stride (1, 1, k)), keeping one byte per
output for backward.

AH-Net pools the slice axis alone three ways: after conv1 (``pool1``, (1, 1, 2)), in the
downsample branches ((1, 1, stride)) and on a bottleneck's main branch when the two branches'
shapes differ. ``F.max_pool3d`` keeps its input and int64 indices for backward (twice the input's
bytes for fp32 and k = 2): at conv1's output, the model's largest map, that is 64 MiB at a
128x128x32 input. This op keeps only the winning position in each window as uint8 (1/8 of the
input's bytes for fp32 and k = 2), and routes the gradient from it.

Ties and NaN follow ``F.max_pool3d`` on CPU and CUDA: the first maximum in the window wins, and a
NaN wins over any number (the last NaN if several). Windows that would run past the end are dropped
(floor mode), as in ``nn.MaxPool3d(ceil_mode=False)``. A window of 1 is the identity.

Backends (the table :data:`IMPLEMENTATIONS`):

- ``reference``: ``F.max_pool3d`` (2D: ``F.max_pool2d``).
- ``cpp``: the compiled CPU kernel ``ahnet_fast::slice_max_pool`` (csrc/cpu/slice_max_pool.cpp: one
  pass each way, any dense input strides, so it also takes the stem's slice-folded convolution
  output, whose slice axis is outermost, and writes a contiguous result without a separate
  transposition).
- ``triton`` (the GPU path; no Triton kernel): the same arithmetic composed of torch ops (a few
  elementwise passes, nothing a kernel would save), keeping the uint8 positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ahnet_fast import backends
from ahnet_fast._extension import extension_available
from ahnet_fast.ops._registry import define_script_entry
from ahnet_fast.ops._registry import cpp_kernel_reasons, dtype_reasons, gpu_composition_reasons, register_compiled_pair

__all__ = ["slice_max_pool", "slice_max_pool_reference"]


def slice_max_pool_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    window = (1,) * (x.dim() - 3) + (k,)
    return (F.max_pool3d if x.dim() == 5 else F.max_pool2d)(x, window, window)


def _check(x, k):
    if x.dim() not in (4, 5):
        raise ValueError(f"slice_max_pool: input must be (N, C, H, W) or (N, C, H, W, D), got {tuple(x.shape)}")
    if not isinstance(k, int) or not 1 <= k <= 255:
        raise ValueError(f"slice_max_pool: window must be an integer in [1, 255], got {k!r}")
    if x.shape[-1] < k:
        raise ValueError(f"slice_max_pool: the last axis ({x.shape[-1]}) is shorter than the window ({k})")


class _SliceMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k):
        d_out = x.shape[-1] // k
        windows = x[..., :d_out * k].unflatten(-1, (d_out, k))
        best = windows[..., 0]
        if k == 2:  # one comparison; the position is the comparison itself
            v = windows[..., 1]
            take = (v > best) | v.isnan()  # max_pool's rule: strictly greater, or NaN
            best = torch.where(take, v, best)
            position = take.to(torch.uint8)
        else:
            position = torch.zeros(best.shape, dtype=torch.uint8, device=x.device)
            for i in range(1, k):
                v = windows[..., i]
                take = (v > best) | v.isnan()
                best = torch.where(take, v, best)
                position.masked_fill_(take, i)
        fmt = _out_format(x)
        ctx.save_for_backward(position)
        ctx.shape, ctx.k = x.shape, k
        return best.contiguous(memory_format=fmt)

    @staticmethod
    def backward(ctx, grad):
        (position,) = ctx.saved_tensors
        k = ctx.k
        d_out = position.shape[-1]
        if ctx.shape[-1] == d_out * k:  # no leftover slices: build the gradient without a zero fill
            parts = [torch.where(position == i, grad, 0) for i in range(k)]
            grad_x = torch.stack(parts, -1).flatten(-2)
        else:
            grad_x = grad.new_zeros(ctx.shape)
            windows = grad_x[..., :d_out * k].unflatten(-1, (d_out, k))
            for i in range(k):
                windows[..., i] = torch.where(position == i, grad, 0)
        return grad_x, None


def _channels_last(x):
    return x.stride(1) == 1 and x.shape[1] > 1 and not x.is_contiguous()


def _cpp_reasons(x, *_):
    reasons = cpp_kernel_reasons("slice_max_pool", x.device) + dtype_reasons(x.dtype)
    if not _dense(x):
        reasons.append("the input has overlapping or non-dense strides")
    return reasons


def _dense(x):
    """Every element at its own offset, no gaps: some permutation of the axes is contiguous."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(x.shape, x.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


IMPLEMENTATIONS = backends.register("slice_max_pool", (
    backends.Implementation("reference", lambda x: [], runs="F.max_pool3d"),
    backends.Implementation("cpp", _cpp_reasons, runs="ahnet_fast::slice_max_pool (csrc/cpu/slice_max_pool.cpp)"),
    backends.Implementation("triton", lambda x: gpu_composition_reasons(x.device),
                            runs="torch ops keeping uint8 window positions (no Triton kernel)"),
))


def slice_max_pool(x: torch.Tensor, k: int, *, backend: str | None = None) -> torch.Tensor:
    """``max_pool3d(x, (1, 1, k), (1, 1, k))`` (2D: ``max_pool2d(x, (1, k), (1, k))``), keeping a uint8
    window position per output for backward instead of the input and int64 indices (except the
    ``reference`` backend, which is ``F.max_pool3d`` itself)."""
    _check(x, k)
    if k == 1:
        return x

    def run(chosen):
        if chosen == "reference":
            return slice_max_pool_reference(x, k)
        if chosen == "cpp":
            return torch.ops.ahnet_fast.slice_max_pool(x, k)[0]
        return _SliceMaxPool.apply(x, k)

    return backends.dispatch("slice_max_pool", IMPLEMENTATIONS, x.device, (x,), backend, run)


# ---------------------------------------------------------------------------------------------
# Fake (shape) functions and autograd of the compiled op, registered when the extension loads.


def _out_format(x):
    if not _channels_last(x):
        return torch.contiguous_format
    return torch.channels_last_3d if x.dim() == 5 else torch.channels_last


def _forward_fake(x, k):
    size = (*x.shape[:-1], x.shape[-1] // k)
    fmt = _out_format(x)
    return (torch.empty(size, dtype=x.dtype, device=x.device, memory_format=fmt),
            torch.empty(size, dtype=torch.uint8, device=x.device, memory_format=fmt))


def _backward_fake(grad, position, k, size, stride):
    return torch.empty_strided(size, stride, dtype=grad.dtype, device=grad.device)


def _setup_context(ctx, inputs, output):
    x, k = inputs
    ctx.save_for_backward(output[1])
    ctx.k, ctx.size, ctx.stride = k, tuple(x.shape), tuple(x.stride())


def _make_backward(backward_op):
    def backward(ctx, grad, _grad_position):
        (position,) = ctx.saved_tensors
        return backward_op(grad, position, ctx.k, ctx.size, ctx.stride), None

    return backward


if extension_available():
    register_compiled_pair("slice_max_pool", "slice_max_pool_backward", _forward_fake, _backward_fake,
                           _make_backward, _setup_context)

# TorchScript's entry to the op (see define_script_entry): the same dispatch as a Python call.
define_script_entry("slice_max_pool_script", "(Tensor x, int k, str? backend) -> Tensor",
                    lambda x, k, backend: slice_max_pool(x, k, backend=backend))
