"""A plain (not BatchNorm-fused) 1x1x1 convolution without padding, any stride: the first
convolution of every encoder bottleneck and the strided downsampling projections.

Backends (the table :data:`IMPLEMENTATIONS`):

- ``reference``: ``F.conv3d`` (2D: ``F.conv2d``).
- ``cpp`` (CPU; an ATen composition, no compiled kernel needed): one matrix product, (Co, Ci) @
  (Ci, S), after subsampling a strided input once (a strided 1x1x1 convolution reads only every
  s-th voxel). ATen sends these convolutions to oneDNN at batch 1; the product is faster on AH-Net's
  shapes (``benchmarks/bench_aniso_conv.py``, ``benchmarks/results/aniso_conv_cpu.md``). Inside
  ``aniso_conv.use_path(p)`` with p other than "matmul", ATen's convolution (eager arithmetic).
- ``triton`` (the GPU path; no Triton kernel): cuDNN's convolution. A 1x1x1 convolution is one
  GEMM, which cuDNN runs as such; a fused kernel would have nothing to fuse here.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ahnet_fast import backends
from ahnet_fast.ops import aniso_conv, channel_mm
from ahnet_fast.ops._registry import define_script_entry
from ahnet_fast.ops._registry import cpu_reasons, gpu_composition_reasons
from ahnet_fast.ops._conv_paths import _as_matrix, _from_matrix, output_format

__all__ = ["pointwise_conv", "pointwise_conv_reference"]


def pointwise_conv_reference(x, weight, bias, stride):
    return (F.conv3d if x.dim() == 5 else F.conv2d)(x, weight, bias, tuple(stride))


def _check(x, weight, bias, stride):
    nd = x.dim() - 2
    if x.dim() not in (4, 5):
        raise ValueError(f"pointwise_conv: input must be (N, C, H, W) or (N, C, H, W, D), got {tuple(x.shape)}")
    if weight.dim() != x.dim() or any(k != 1 for k in weight.shape[2:]) or weight.shape[1] != x.shape[1]:
        raise ValueError(f"pointwise_conv: weight {tuple(weight.shape)} is not a 1x1 kernel for input "
                         f"{tuple(x.shape)}")
    if len(stride) != nd or any(s < 1 for s in stride):
        raise ValueError(f"pointwise_conv: stride must be {nd} positive integers, got {stride!r}")
    if bias is not None and bias.numel() != weight.shape[0]:
        raise ValueError(f"pointwise_conv: bias has {bias.numel()} elements, expected {weight.shape[0]}")


def _matmul(a, weight, bias, stride):
    nd = a.dim() - 2
    if any(s != 1 for s in stride):
        fmt = output_format(a)  # the subsampled copy keeps the input's layout
        a = a[(slice(None), slice(None), *(slice(None, None, s) for s in stride))].contiguous(memory_format=fmt)
    w = weight.view(weight.shape[0], weight.shape[1])
    m, cl = _as_matrix(a)
    y = torch.matmul(m, w.t()) if cl else channel_mm.mm_batched(w, m)
    y = _from_matrix(y, a, weight.shape[0], cl)
    if bias is not None:
        y = y + bias.to(y.dtype).view(1, -1, *([1] * nd))
    return y


IMPLEMENTATIONS = backends.register("pointwise_conv", (
    backends.Implementation("reference", lambda *a: [], runs="F.conv3d"),
    backends.Implementation("cpp", lambda x: cpu_reasons(x.device),
                            runs="a matrix product (a strided input subsampled first); ATen inside use_path"),
    backends.Implementation("triton", lambda x: gpu_composition_reasons(x.device),
                            runs="cuDNN convolution (no Triton kernel)"),
))


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int], *,
                   backend: str | None = None) -> torch.Tensor:
    """``conv(x, weight, bias, stride)`` for a 1x1x1 (2D: 1x1) kernel without padding,
    differentiable."""
    stride = [int(s) for s in stride]
    _check(x, weight, bias, stride)

    def run(chosen):
        if chosen == "cpp" and aniso_conv.forced_path() in (None, "matmul"):
            return _matmul(x, weight, bias, stride)
        return pointwise_conv_reference(x, weight, bias, stride)

    return backends.dispatch("pointwise_conv", IMPLEMENTATIONS, x.device, (x,), backend, run)

# TorchScript's entry to the op (see define_script_entry): the same dispatch as a Python call.
define_script_entry(
    "pointwise_conv_script", "(Tensor x, Tensor weight, Tensor? bias, int[] stride, str? backend) -> Tensor",
    lambda x, weight, bias, stride, backend: pointwise_conv(x, weight, bias, stride, backend=backend))
