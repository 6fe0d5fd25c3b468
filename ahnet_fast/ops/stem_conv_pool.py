"""AH-Net's stem, conv1 then pool1: a plain convolution (7x7x3 on the image, stride (2, 2, 1)) and
a max pool over the slice axis alone ((1, 1, k) windows, stride k), as one op.

``stem_conv_pool(x, weight, bias, stride, padding, window) = max_pool(conv(x), (1, 1, window))``.

Backends (the table :data:`IMPLEMENTATIONS`; ``ahnet_fast.backends`` picks):

- ``reference``: ``F.conv3d`` then ``F.max_pool3d`` (2D: ``conv2d``, ``max_pool2d``): MONAI's
  arithmetic.
- ``cpp`` (CPU, compiled extension): the convolution by the path ``aniso_conv.choose`` picks
  (``slice_fold`` for conv1: its three slice taps folded into input channels of a 2D convolution,
  the paper's own view of conv1), then the compiled slice pooling, which reads the slice-major
  result as it is and keeps one byte per output for backward. Where the image needs no gradient
  and no autocast is active, the two run band by band (:func:`slice_fold_conv_pool`): the
  convolution's full output, the model's largest map, is never allocated.
- ``triton`` (the GPU path; no Triton kernel): cuDNN's convolution, then the slice pooling's GPU
  composition (``ops.slice_max_pool``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ahnet_fast import backends
from ahnet_fast._layout import autocast_dtype
from ahnet_fast.ops import aniso_conv
from ahnet_fast.ops._registry import define_script_entry
from ahnet_fast.ops._registry import cpp_kernel_reasons, dtype_reasons, gpu_composition_reasons
from ahnet_fast.ops._conv_paths import _fold_slices, _fold_weight, slice_fold_forward
from ahnet_fast.ops.slice_max_pool import slice_max_pool, slice_max_pool_reference

__all__ = ["stem_conv_pool", "stem_conv_pool_reference", "conv3d", "slice_fold_conv_pool"]


def stem_conv_pool_reference(x, weight, bias, stride, padding, window):
    conv = F.conv3d if x.dim() == 5 else F.conv2d
    return slice_max_pool_reference(conv(x, weight, bias, tuple(stride), tuple(padding)), window)


def _check(x, weight, bias, stride, padding, window):
    nd = x.dim() - 2
    if x.dim() not in (4, 5):
        raise ValueError(f"stem_conv_pool: input must be (N, C, H, W) or (N, C, H, W, D), got {tuple(x.shape)}")
    if weight.dim() != x.dim() or weight.shape[1] != x.shape[1]:
        raise ValueError(f"stem_conv_pool: weight {tuple(weight.shape)} does not fit input {tuple(x.shape)} "
                         f"(expected (Co, Ci={x.shape[1]}, *kernel))")
    if bias is not None and bias.numel() != weight.shape[0]:
        raise ValueError(f"stem_conv_pool: bias has {bias.numel()} elements, expected {weight.shape[0]}")
    if len(stride) != nd or len(padding) != nd or any(s < 1 for s in stride) or any(p < 0 for p in padding):
        raise ValueError(f"stem_conv_pool: stride and padding must be {nd} integers (stride >= 1, padding >= 0), "
                         f"got {list(stride)} and {list(padding)}")
    d_out = x.shape[-1] + 2 * padding[-1] - weight.shape[-1] + 1
    if not isinstance(window, int) or window < 1 or d_out < window:
        raise ValueError(f"stem_conv_pool: the pooling window {window!r} must be a positive integer no longer than "
                         f"the convolution's slice axis ({d_out})")


def conv3d(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
           padding: Sequence[int]) -> torch.Tensor:
    """A plain (not BatchNorm-fused) 3D convolution, zero padding, dilation 1, groups 1, by the path
    ``aniso_conv.choose`` picks among ``aten`` and ``slice_fold``, differentiable. A ``slice_fold``
    result has its slice axis outermost in memory (see ``_conv_paths.slice_fold_forward``)."""
    stride, padding = list(stride), list(padding)
    paths = aniso_conv.candidates(a, weight, stride, padding)
    if "slice_fold" in paths:
        if torch.compiler.is_compiling() and aniso_conv.forced_path() is None:
            # no recording or measuring while tracing: the static rule
            path = aniso_conv.rule("forward", a, weight, paths)
        else:
            path = aniso_conv.choose("forward", a, weight, stride, padding)
        if path == "slice_fold":
            return slice_fold_forward(a, weight, bias, stride, padding)
    return F.conv3d(a, weight, bias, stride, padding)


def _banded(x, weight, stride, padding, window) -> bool:
    """Whether the band-by-band conv + pool applies: a 5D image that needs no gradient, no
    autocast, not traced, the slice_fold path chosen for the convolution."""
    if x.dim() != 5 or x.requires_grad or autocast_dtype(x) is not None or torch.compiler.is_compiling():
        return False
    stride, padding = list(stride), list(padding)
    return "slice_fold" in aniso_conv.candidates(x, weight, stride, padding) and \
        aniso_conv.choose("forward", x, weight, stride, padding) == "slice_fold"


def _cpp_reasons(x, weight):
    return cpp_kernel_reasons("slice_max_pool", x.device) + dtype_reasons(x.dtype)


IMPLEMENTATIONS = backends.register("stem_conv_pool", (
    backends.Implementation("reference", lambda *a: [], runs="F.conv3d, then F.max_pool3d"),
    backends.Implementation("cpp", _cpp_reasons,
                            runs="the chosen convolution path (slice_fold), then the compiled slice pooling, band "
                                 "by band where the image needs no gradient"),
    backends.Implementation("triton", lambda x, weight: gpu_composition_reasons(x.device),
                            runs="cuDNN convolution, then the slice pooling's GPU composition (no Triton kernel)"),
))


def stem_conv_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
                   padding: Sequence[int], window: int, *, backend: str | None = None) -> torch.Tensor:
    """``max_pool(conv(x, weight, bias, stride, padding), (1, 1, window), stride (1, 1, window))``
    (2D: the last axis pooled), zero padding, dilation 1, groups 1."""
    stride, padding, window = [int(s) for s in stride], [int(p) for p in padding], int(window)
    _check(x, weight, bias, stride, padding, window)

    def run(chosen):
        if chosen == "reference":
            return stem_conv_pool_reference(x, weight, bias, stride, padding, window)
        if chosen == "cpp":
            if _banded(x, weight, stride, padding, window):
                return slice_fold_conv_pool(x, weight, bias, stride, padding, window)
            y = conv3d(x, weight, bias, stride, padding) if x.dim() == 5 else \
                F.conv2d(x, weight, bias, stride, padding)
            return slice_max_pool(y, window, backend="cpp")
        conv = F.conv3d if x.dim() == 5 else F.conv2d
        return slice_max_pool(conv(x, weight, bias, stride, padding), window, backend="triton")

    return backends.dispatch("stem_conv_pool", IMPLEMENTATIONS, x.device, (x, weight), backend, run)


# ---------------------------------------------------------------------------------------------
# Band by band: the slice_fold convolution and the slice pooling over bands of output rows

SLICE_CHUNK_BYTES = 8 << 20


def slice_fold_conv_pool(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
                         padding: Sequence[int], k: int) -> torch.Tensor:
    """``max_pool3d(conv3d(a, weight, bias, stride, padding), (1, 1, k))`` (AH-Net's conv1 and pool1)
    through the ``slice_fold`` convolution and the compiled slice pooling, a band of output rows at a
    time: the convolution's output, twice the pooled map (large enough that glibc maps every such
    allocation freshly, a page fault per 4 KiB, twice per step), only ever exists as a band of
    about SLICE_CHUNK_BYTES. Bands of rows, not of slices: a band's pooled
    result is a block of whole rows of the output (contiguous runs of W x D values), where a chunk
    of slices would be written, and its gradient gathered, in runs of D / chunks values (4 at AH-Net's
    input: short runs copy slowly). Backward, band by band, routes the gradient through the kept
    window positions and accumulates the weight gradient; ``a`` gets no gradient (the image), so
    callers use this only where it needs none. CPU, compiled extension.

    Timed against conv3d + max_pool3d in ``benchmarks/test_bench_stem_conv_pool.py``."""
    if a.requires_grad:
        raise ValueError("slice_fold_conv_pool: the input must not need a gradient (it is the image)")
    return _SliceFoldConvPool.apply(a, weight, bias, tuple(stride), tuple(padding), int(k))


def _row_bands(n: int, rows: int, per_row_bytes: int):
    """(sample, first output row, rows) bands covering every output row of every sample."""
    per = max(1, SLICE_CHUNK_BYTES // max(1, per_row_bytes))
    return [(i, r0, min(per, rows - r0)) for i in range(n) for r0 in range(0, rows, per)]


def _band_input(padded, i, d_out, r0, r, stride_h, kh):
    """The input rows (already padded along H) that output rows r0..r0+r-1 of sample i read."""
    return padded[i * d_out:(i + 1) * d_out, :, r0 * stride_h:(r0 + r - 1) * stride_h + kh]


class _SliceFoldConvPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, weight, bias, stride, padding, k):
        n = a.shape[0]
        co, kh = weight.shape[0], weight.shape[2]
        folded = _fold_slices(a, weight.shape[4], padding[2])  # (N * Do, Ci * kd, H, W)
        # padded along H once (a copy of the folded slices, kd times the image), so that every band
        # is a plain slice
        padded = torch.nn.functional.pad(folded, (0, 0, padding[0], padding[0])) if padding[0] else folded
        wf = _fold_weight(weight)
        d_out = folded.shape[0] // n
        d_pool = d_out // k
        ho = (padded.shape[2] - kh) // stride[0] + 1
        wo = (a.shape[3] + 2 * padding[1] - weight.shape[3]) // stride[1] + 1
        pooled = a.new_empty((n, co, ho, wo, d_pool))
        positions = []
        bands = _row_bands(n, ho, d_out * co * wo * a.element_size())
        for i, r0, r in bands:
            y = torch.nn.functional.conv2d(_band_input(padded, i, d_out, r0, r, stride[0], kh), wf, bias,
                                           stride[:2], (0, padding[1]))  # (Do, Co, r, Wo)
            out, position = torch.ops.ahnet_fast.slice_max_pool(y.permute(1, 2, 3, 0).unsqueeze(0), k)
            pooled[i:i + 1, :, r0:r0 + r] = out
            positions.append(position)
        ctx.save_for_backward(padded, weight, *positions)
        ctx.args = (bands, stride, padding, k, d_out, bias is not None)
        return pooled

    @staticmethod
    def backward(ctx, grad):
        padded, weight, *positions = ctx.saved_tensors
        bands, stride, padding, k, d_out, has_bias = ctx.args
        co, ci, kh, kw, kd = weight.shape
        wf = _fold_weight(weight)
        wo = grad.shape[3]
        grad_wf = grad_b = None
        for (i, r0, r), position in zip(bands, positions):
            g = grad[i:i + 1, :, r0:r0 + r].contiguous()
            # the band's convolution output layout: (Do, Co, r, Wo) memory seen as (1, Co, r, Wo, Do)
            gy = torch.ops.ahnet_fast.slice_max_pool_backward(g, position, k, [1, co, r, wo, d_out],
                                                               [d_out * co * r * wo, r * wo, wo, 1, co * r * wo])
            gy = gy.squeeze(0).permute(3, 0, 1, 2)
            _, gw, gb = torch.ops.aten.convolution_backward(
                gy, _band_input(padded, i, d_out, r0, r, stride[0], kh), wf, [co] if has_bias else None,
                list(stride[:2]), [0, padding[1]], [1, 1], False, [0, 0], 1, [False, True, has_bias])
            grad_wf = gw if grad_wf is None else grad_wf.add_(gw)
            if has_bias:
                grad_b = gb if grad_b is None else grad_b.add_(gb)
        grad_w = grad_wf.view(co, ci, kd, kh, kw).permute(0, 1, 3, 4, 2).contiguous()
        return None, grad_w, grad_b, None, None, None

# TorchScript's entry to the op (see define_script_entry): the same dispatch as a Python call.
define_script_entry(
    "stem_conv_pool_script",
    "(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int window, str? backend) -> Tensor",
    lambda x, weight, bias, stride, padding, window, backend: stem_conv_pool(x, weight, bias, stride, padding, window,
                                                                             backend=backend))
