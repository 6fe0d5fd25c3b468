"""Transposed convolution whose kernel equals its stride (AH-Net's x2 up-transitions, kernel =
stride = 2, and the final upsampling), as one matrix product and a voxel shuffle.

Windows of such a convolution never overlap: the Ci values of one input voxel times the
(Ci, Co * F) weight matrix (F = kernel volume) give the whole F-voxel block of the output that the
voxel owns. So

    T = W^T X   (Co * F, S) = (Co * F, Ci) @ (Ci, S),  S = H * W * D,  then  out = transposed_conv_shuffle(T)

where the shuffle moves tap (a, b, c) of channel co to output position (h * f0 + a, w * f1 + b,
d * f2 + c) (the 3D pixel shuffle). Backward is autograd's: the gradient is unshuffled and goes
through the two matrix products. ATen on CPU computes these convolutions through oneDNN (with a
reorder of the output from its blocked layout) or its unfold path and zero-fills the weight
gradient before accumulating; here the shuffle is the compiled ``ahnet_fast::transposed_conv_shuffle`` (each
output row interleaves f2 contiguous rows of T). Measured in
``benchmarks/test_bench_transposed_conv.py``.

Backends (the table :data:`IMPLEMENTATIONS`):

- ``reference``: ``F.conv_transpose3d`` (2D: ``conv_transpose2d``).
- ``cpp`` (CPU): the matrix product and the compiled shuffle (torch's ``view/permute/reshape``,
  the same values, where the extension is missing); inside ``aniso_conv.use_path(p)`` with p other
  than "matmul", ATen's transposed convolution (eager arithmetic).
- ``triton`` (the GPU path; no Triton kernel): cuDNN's transposed convolution, until a GPU run has
  compared it with the product and shuffle.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ahnet_fast import backends
from ahnet_fast._extension import extension_available
from ahnet_fast.ops import aniso_conv, channel_mm
from ahnet_fast.ops._registry import define_script_entry
from ahnet_fast.ops._registry import cpp_kernel_reasons, cpu_reasons, dtype_reasons, gpu_composition_reasons, \
    note_compiled_kernels

__all__ = ["transposed_conv", "transposed_conv_reference", "transposed_conv_shuffle", "transposed_conv_unshuffle",
           "transposed_conv_shuffle_reference", "transposed_conv_unshuffle_reference"]


def transposed_conv_reference(x, weight, bias, stride):
    return (F.conv_transpose3d if x.dim() == 5 else F.conv_transpose2d)(x, weight, bias, tuple(stride))


def transposed_conv_shuffle_reference(t: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    n, cf, *spatial = t.shape
    c = cf // math.prod(factors)
    nd = len(spatial)
    # (N, C, f..., s...) -> (N, C, s0, f0, s1, f1, ...)
    v = t.reshape(n, c, *factors, *spatial)
    order = [0, 1] + [i for k in range(nd) for i in (2 + nd + k, 2 + k)]
    return v.permute(order).reshape(n, c, *[s * f for s, f in zip(spatial, factors)])


def transposed_conv_unshuffle_reference(y: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    n, c, *fine = y.shape
    nd = len(fine)
    spatial = [s // f for s, f in zip(fine, factors)]
    v = y.reshape(n, c, *[d for s, f in zip(spatial, factors) for d in (s, f)])
    order = [0, 1] + [3 + 2 * k for k in range(nd)] + [2 + 2 * k for k in range(nd)]
    return v.permute(order).reshape(n, c * math.prod(factors), *spatial)


def _compiled(t: torch.Tensor) -> bool:
    return extension_available() and not cpp_kernel_reasons("transposed_conv_shuffle", t.device) and \
        not dtype_reasons(t.dtype)


def transposed_conv_shuffle(t: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """(N, C * F, *s) -> (N, C, *(s_i * f_i)): tap (a, b, c) of channel co to position
    (h * f0 + a, w * f1 + b, d * f2 + c). Differentiable (its gradient is :func:`transposed_conv_unshuffle`)."""
    factors = [int(f) for f in factors]
    if _compiled(t):
        return torch.ops.ahnet_fast.transposed_conv_shuffle(t, factors)
    return transposed_conv_shuffle_reference(t, factors)


def transposed_conv_unshuffle(y: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """The inverse of :func:`transposed_conv_shuffle`. Differentiable."""
    factors = [int(f) for f in factors]
    if _compiled(y):
        return torch.ops.ahnet_fast.transposed_conv_unshuffle(y, factors)
    return transposed_conv_unshuffle_reference(y, factors)


def _check(x, weight, bias, stride):
    nd = x.dim() - 2
    if x.dim() not in (4, 5):
        raise ValueError(f"transposed_conv: input must be (N, C, H, W[, D]), got {tuple(x.shape)}")
    if weight.dim() != x.dim() or weight.shape[0] != x.shape[1]:
        raise ValueError(f"transposed_conv: weight {tuple(weight.shape)} does not fit input "
                         f"{tuple(x.shape)} (expected (Ci={x.shape[1]}, Co, *kernel))")
    if tuple(weight.shape[2:]) != tuple(stride) or len(stride) != nd:
        raise ValueError(f"transposed_conv: the kernel {tuple(weight.shape[2:])} must equal the stride "
                         f"{tuple(stride)}")
    if bias is not None and bias.numel() != weight.shape[1]:
        raise ValueError(f"transposed_conv: bias has {bias.numel()} elements, expected {weight.shape[1]}")


def transposed_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            stride: Sequence[int], *, backend: str | None = None) -> torch.Tensor:
    """``conv_transpose3d(x, weight, bias, stride)`` (2D: ``conv_transpose2d``) for kernel == stride,
    no padding, groups 1; on CPU as a matrix product and a voxel shuffle (see the module docstring)."""
    stride = [int(s) for s in stride]
    _check(x, weight, bias, stride)

    def run(chosen):
        if chosen == "cpp" and aniso_conv.forced_path() in (None, "matmul"):
            return _product_shuffle(x, weight, bias, stride)
        return transposed_conv_reference(x, weight, bias, stride)

    return backends.dispatch("transposed_conv", IMPLEMENTATIONS, x.device, (x,), backend, run)


IMPLEMENTATIONS = backends.register("transposed_conv", (
    backends.Implementation("reference", lambda x: [], runs="F.conv_transpose3d"),
    backends.Implementation("cpp", lambda x: cpu_reasons(x.device),
                            runs="a matrix product and ahnet_fast::transposed_conv_shuffle; ATen inside use_path"),
    backends.Implementation("triton", lambda x: gpu_composition_reasons(x.device),
                            runs="cuDNN transposed convolution (no Triton kernel)"),
))


def _product_shuffle(x, weight, bias, stride):
    n, ci = x.shape[:2]
    co = weight.shape[1]
    taps = weight[0, 0].numel()
    # contiguous (N, Ci, S) operand: channels-last input is made channel-first once
    m = x.contiguous().view(n, ci, -1)
    w = weight.reshape(ci, co * taps).t()  # (Co * F, Ci), a transposed view
    t = channel_mm.mm_batched(w, m)
    y = transposed_conv_shuffle(t.view(n, co * taps, *x.shape[2:]), stride)
    if bias is not None:
        y = y + bias.to(y.dtype).view(1, co, *([1] * (x.dim() - 2)))  # autocast: stay in the product's dtype
    return y


# ---------------------------------------------------------------------------------------------
# Fakes and autograd of the compiled shuffles, registered when the extension loads.


def _shuffle_fake(t, factors):
    return t.new_empty((t.shape[0], t.shape[1] // math.prod(factors), *[s * f for s, f in zip(t.shape[2:], factors)]))


def _unshuffle_fake(y, factors):
    return y.new_empty((y.shape[0], y.shape[1] * math.prod(factors), *[s // f for s, f in zip(y.shape[2:], factors)]))


def _setup(ctx, inputs, output):
    ctx.factors = list(inputs[1])


def _register():
    if not extension_available():
        return
    note_compiled_kernels("transposed_conv_shuffle")
    torch.library.register_fake("ahnet_fast::transposed_conv_shuffle")(_shuffle_fake)
    torch.library.register_fake("ahnet_fast::transposed_conv_unshuffle")(_unshuffle_fake)
    torch.library.register_autograd(
        "ahnet_fast::transposed_conv_shuffle",
        lambda ctx, g: (torch.ops.ahnet_fast.transposed_conv_unshuffle(g, ctx.factors), None), setup_context=_setup)
    torch.library.register_autograd(
        "ahnet_fast::transposed_conv_unshuffle",
        lambda ctx, g: (torch.ops.ahnet_fast.transposed_conv_shuffle(g, ctx.factors), None), setup_context=_setup)


_register()

# TorchScript's entry to the op (see define_script_entry): the same dispatch as a Python call.
define_script_entry(
    "transposed_conv_script", "(Tensor x, Tensor weight, Tensor? bias, int[] stride, str? backend) -> Tensor",
    lambda x, weight, bias, stride, backend: transposed_conv(x, weight, bias, stride, backend=backend))
