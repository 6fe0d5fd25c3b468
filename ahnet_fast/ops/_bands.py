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

In inference, where no backward can follow and the statistics are the running ones. In training
(the dense block's C++ engine on the CPU) the same bands run with the batch statistics, computed over
the whole input first (one reduction pass, no temporary): :func:`unit_banded` for a unit's forward and
for its recomputation in backward, :func:`conv_backward_banded` for its convolution's gradients. A
unit's input and output then exist whole (the next BatchNorm's statistics need them) but its
activation and the convolution's workspaces exist a band at a time.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from ahnet_fast.ops import _conv_paths as conv_paths, aniso_conv
from ahnet_fast._layout import is_channels_last, opmath_dtype
from ahnet_fast.ops._conv_paths import output_format

__all__ = ["BAND_BYTES", "no_backward", "band_rows", "halo", "extend", "unit_rows", "unit_banded",
           "conv_backward_banded", "own_rows", "summed", "activation_in", "view_like", "workspace_for"]

BAND_BYTES = 16 * 2 ** 20

# Whether a backward should run in bands where it can: set around a unit's backward by its autograd
# function when its forward ran where memory comes first (the scratch pool not kept: AHNet with any
# checkpoint policy, inside its segments and outside them); elsewhere the whole map is faster
# (measured: a banded unit backward took up to twice as long, each band's copies and products being
# small).
_lean: list[bool] = []


@contextlib.contextmanager
def lean(flag: bool):
    """Within the block, :func:`lean_preferred` is ``flag``."""
    _lean.append(bool(flag))
    try:
        yield
    finally:
        _lean.pop()


def lean_preferred() -> bool:
    return bool(_lean) and _lean[-1]


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


def workspace_for(x: torch.Tensor, channels: int, rows: int, reach: int = 0) -> torch.Tensor | None:
    """One flat buffer for the activations of the units' bands (``channels`` wide, ``rows`` high plus
    ``reach`` halo rows on each side, at most the map's height; one band at a time), allocated once per
    call instead of once per band; None off the CPU (the Triton engine normalises while it loads and
    writes no activation)."""
    if x.device.type != "cpu":
        return None
    rows = min(rows + 2 * reach, x.shape[2])
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


def unit_banded(engine, x: torch.Tensor, bn_weight, bn_bias, mean, var, eps: float, weight: torch.Tensor,
                rows: int, workspace: torch.Tensor | None, out: torch.Tensor | None = None,
                source: Callable[[int, int], torch.Tensor] | None = None) -> torch.Tensor:
    """``conv(relu(bn(x)))`` with the given statistics (the running ones, or batch statistics computed
    beforehand), stride 1 and same padding, ``rows`` rows at a time; written into ``out`` when given
    (a tensor or view of the output's shape), else into a fresh tensor laid out as the unit's output.
    One band (rows >= the map's height) is the engine's plain forward.

    ``source(lo, hi)``, in place of x's data: rows [lo, hi) of the unit's input, made on demand (the
    input then never exists whole); x gives only the batch, spatial sizes, dtype and layout."""
    size = x.shape[2]
    nd = weight.dim() - 2
    rows_of = source if source is not None else (lambda lo, hi: x[:, :, lo:hi])
    if rows >= size:
        y = engine.forward(rows_of(0, size), bn_weight, bn_bias, mean, var, False, eps, weight, [1] * nd,
                           [(k - 1) // 2 for k in weight.shape[2:]], workspace)[0]
        return y if out is None else out.copy_(y)
    if out is None:
        out = torch.empty((x.shape[0], weight.shape[0], *x.shape[2:]), dtype=x.dtype, device=x.device,
                          memory_format=output_format(x))
    r = halo(weight)
    for h0 in range(0, size, rows):
        h1 = min(h0 + rows, size)
        lo, hi = extend(h0, h1, r, size)
        out[:, :, h0:h1].copy_(unit_rows(engine, rows_of(lo, hi), lo, h0, h1, bn_weight, bn_bias, mean, var, eps,
                                         weight, workspace))
    return out


def view_like(flat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The first t.numel() elements of the flat buffer as a tensor of t's shape, channels-last where
    t is (else contiguous): elementwise work between the two then runs on matching layouts."""
    v = flat[:t.numel()]
    return v.view(t.shape[0], *t.shape[2:], t.shape[1]).movedim(-1, 1) if is_channels_last(t) else v.view(t.shape)


def activation_in(workspace: torch.Tensor, xb: torch.Tensor, bn_weight, bn_bias, mean, var, eps: float):
    """relu(bn(xb)) with the given statistics (C++ kernel), written into the flat ``workspace`` and
    returned as a view of it: laid out as the kernel reads xb (channels-last, or contiguous: a strided
    band is read through a contiguous copy)."""
    a = view_like(workspace, xb)
    torch.ops.ahnet_fast.bn_relu_apply_(xb, bn_weight, bn_bias, mean, var, eps, a)
    return a


def own_rows(buffer: torch.Tensor, grad_y: torch.Tensor, lo: int, hi: int, h0: int, h1: int) -> torch.Tensor:
    """grad_y's rows [h0, h1) inside rows [lo, hi) of ``buffer`` (a tensor of grad_y's other sizes,
    at least hi - lo rows), zero on the halo rows around them: a band's own output rows, so that
    each output row counts in one band only."""
    g = buffer[:, :, :hi - lo]
    g[:, :, :h0 - lo].zero_()
    g[:, :, h1 - lo:].zero_()
    g[:, :, h0 - lo:h1 - lo].copy_(grad_y[:, :, h0:h1])
    return g


def summed(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """``total + part`` for a weight gradient summed over bands, kept in float32 (float64 for
    float64): a bf16 sum rounded once per band loses the low bits at hundreds of bands."""
    return part.to(opmath_dtype(part.dtype), copy=True) if total is None else total.add_(part)


def conv_backward_banded(grad_y: torch.Tensor, x: torch.Tensor, bn_weight, bn_bias, mean, var, eps: float,
                         weight: torch.Tensor, rows: int, workspace: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The gradients of ``conv(a)``, a = relu(bn(x)) with the given statistics (stride 1, same
    padding, C++ kernels on the CPU), with ``a`` recomputed a band at a time: returns the weight
    gradient, the activation's gradient written into ``out`` (x's shape). ``workspace``: a flat buffer of x's
    dtype for one band's activation, halo rows included.

    Each band contributes the terms of its own output rows: its weight gradient from grad_y on the
    band's rows (zero on the halo rows, which are the neighbouring bands' to count), its activation
    gradient on the rows those output rows read (the band and its halo), added into ``out``. The
    gradients are linear in grad_y, so the sums over bands are the whole map's."""
    size = grad_y.shape[2]
    r = halo(weight)
    nd = weight.dim() - 2
    stride, padding = [1] * nd, [(k - 1) // 2 for k in weight.shape[2:]]
    if r:
        out.zero_()
        masked = torch.empty((grad_y.shape[0], grad_y.shape[1], min(rows + 2 * r, size), *grad_y.shape[3:]),
                             dtype=grad_y.dtype, device=grad_y.device)
    grad_w = None
    for h0 in range(0, size, rows):
        h1 = min(h0 + rows, size)
        lo, hi = extend(h0, h1, r, size)
        a = activation_in(workspace, x[:, :, lo:hi], bn_weight, bn_bias, mean, var, eps)
        g = own_rows(masked, grad_y, lo, hi, h0, h1) if r else grad_y[:, :, h0:h1]
        grad_a, gw = conv_paths.backward(aniso_conv.choose("backward", a, weight, stride, padding), g, a, weight,
                                         stride, padding)
        (out[:, :, lo:hi].add_ if r else out[:, :, lo:hi].copy_)(grad_a)
        grad_w = summed(grad_w, gw)
        del grad_a, gw
    return grad_w.to(weight.dtype)
