"""Inference in bands of rows: the BatchNorm+ReLU+convolution units with nothing to keep for backward.

In eval mode BatchNorm is a fixed per-channel affine map, so a unit ``conv(relu(bn(x)))`` with stride 1
and "same" padding can run on a band of rows of the first spatial axis at a time: its activation (and
the convolution's own workspace, which for ATen's 3x3x1 convolution is larger than its input) is then
a band's size instead of the whole map's. A kernel of height k reads r = (k - 1) // 2 rows beyond its
band on each side (the halo), clipped at the map's edges, where the zero padding is the map's own;
the convolution of a band padded as the whole map is padded is exact on every row whose kernel stays
inside the band, and those are the rows kept. Rows of one band are independent of the others' except
for the halo, which is recomputed, not exchanged (r rows per side and unit: a few percent of the work
at the band sizes below).

The band height is chosen so that the widest activation a band needs stays near ``BAND_BYTES``: large
enough that the convolutions remain long matrix products, small enough that AH-Net's last dense block
at 256x256x32 input needs tens of megabytes of temporaries instead of hundreds.

Only where no backward can follow (no gradient mode, or nothing that would need one) and the
statistics are the running ones: batch statistics need the whole map first.
"""
from __future__ import annotations

import math

import torch

__all__ = ["BAND_BYTES", "no_backward", "band_rows", "halo", "extend", "unit_rows", "workspace_for"]

BAND_BYTES = 16 * 2 ** 20


def no_backward(*tensors: torch.Tensor | None) -> bool:
    """True where no backward can follow (no gradient mode, or none of ``tensors`` needs a gradient)
    and an op may run as plain Python: not while torch.compile or the TorchScript tracer records the
    graph, which must see the registered op."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in tensors)


def halo(weight: torch.Tensor) -> int:
    """Rows a unit reads beyond its band on each side: (k - 1) // 2 for kernel height k."""
    return (weight.shape[2] - 1) // 2


def bandable(weight: torch.Tensor, stride, padding) -> bool:
    """Whether a unit runs in bands: stride 1, and an odd kernel with same padding on every axis (the
    output is the input's size, which the banded output is allocated at; an even kernel would shrink
    an axis)."""
    kernel = weight.shape[2:]
    return all(s == 1 for s in stride) and all(k % 2 == 1 for k in kernel) and \
        list(padding) == [(k - 1) // 2 for k in kernel]


def band_rows(x: torch.Tensor, channels: int) -> int:
    """Rows per band so that ``channels`` channels of a band of x's other sizes take about
    ``BAND_BYTES`` (at least one row, at most all of them). Off the CPU a band is the whole map: the
    banding is for the host's memory, and the GPU path is untimed here."""
    if x.device.type != "cpu":
        return x.shape[2]
    per_row = x.shape[0] * channels * math.prod(x.shape[3:]) * x.element_size()
    return max(1, min(x.shape[2], BAND_BYTES // max(per_row, 1)))


def extend(lo: int, hi: int, r: int, size: int) -> tuple[int, int]:
    """Rows [lo, hi) and r more on each side, within [0, size)."""
    return max(lo - r, 0), min(hi + r, size)


def workspace_for(x: torch.Tensor, channels: int, rows: int) -> torch.Tensor | None:
    """One flat buffer for the activations of the units' bands (``channels`` wide, ``rows`` high, one
    at a time), allocated once per call instead of once per band; None off the CPU (the Triton
    engine normalises while it loads and writes no activation)."""
    if x.device.type != "cpu":
        return None
    return torch.empty(x.shape[0] * channels * rows * math.prod(x.shape[3:]), dtype=x.dtype, device=x.device)


def unit_rows(engine, t: torch.Tensor, t_lo: int, lo: int, hi: int, bn_weight, bn_bias, running_mean, running_var,
              eps: float, weight: torch.Tensor, workspace: torch.Tensor | None) -> torch.Tensor:
    """Rows [lo, hi) of ``conv(relu(bn(.)))`` (eval BatchNorm, stride 1, same padding) as a view of a
    fresh tensor, from ``t``, which holds the unit input's rows [t_lo, t_lo + t.shape[2]) and must
    cover [lo - r, hi + r] within the map (r = :func:`halo`)."""
    nd = weight.dim() - 2
    y = engine.forward(t, bn_weight, bn_bias, running_mean, running_var, False, eps, weight, [1] * nd,
                       [(k - 1) // 2 for k in weight.shape[2:]], workspace)[0]
    return y[:, :, lo - t_lo: hi - t_lo]
