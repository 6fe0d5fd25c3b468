"""Pyramid volumetric pooling (MONAI's ``PSP``, AH-Net's PVP) as one op.

For level ``l < levels`` with window ``s = 2**(l+3)``: max-pool windows of (s, s, 1) (2D: (s, 1)),
project to one channel with a 1x1(x1) convolution padded (1, 1, 0) (2D: (1, 0)) -- MONAI's quirk,
which adds a ring of bias values around the pooled map --, upsample back to the input size
(a transposed convolution with kernel = stride = window and padding = window, which drops the
ring; or interpolation of the ringed map to the input size, ``align_corners=True`` for the linear
modes), and concatenate the levels on the channel axis. With ``concat_input=True`` the op also
appends ``x`` itself, returning ``cat([psp(x), x], 1)``, the tensor AH-Net's final block takes, in
one buffer written in the same pass that reads ``x``.

Backends:

- ``reference``: MONAI's sequence of torch ops (max_pool, conv, conv_transpose / interpolate, cat).
  It keeps the int64 argmax of every level and reads ``x`` once per level.
- ``cpp`` (``torch.ops.ahnet_fast.pyramid_pool``, csrc/cpu/pyramid_pool.cpp) and ``triton``
  (ahnet_fast/kernels/triton/pyramid_pool.py): one read of ``x`` computes the level-0 maxima; each
  coarser level takes the maxima of 2x2 cells of the level below (8 -> 16 -> 32 -> 64); the
  projections and the upsampling write the output channels directly. For backward they keep only
  each level's maxima (1/64 of ``x`` and less), the position of each maximum inside its window as
  int8 (level 0) / int16, and the padded projections -- never ``x`` and never int64 indices. The
  backward routes the gradient through those positions in one pass that also adds the gradient of
  the concatenated ``x``; the small per-level part (adjoint of the upsampling and projection, the
  parameter gradients) runs as torch ops on maps 64x smaller than ``x``.

Ties between equal maxima and NaN: exactly PyTorch's max pooling (CPU and CUDA kernels alike):
scanning a window row by row, the first maximum wins, and a NaN wins over any number (the last
NaN, if several). The forward and the backward use the same stored position, so the gradient goes
to the element whose value was taken.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ahnet_fast import backends
from ahnet_fast._extension import extension_available
from ahnet_fast._layout import autocast_dtype, channels_innermost, opmath_dtype
from ahnet_fast.ops._handover import gradient_handed_over, handed_over
from ahnet_fast.ops._registry import define_script_entry
from ahnet_fast.ops._registry import (cpp_kernel_reasons, dtype_reasons, register_compiled_pair,
                                      register_triton_pair, triton_reasons)

__all__ = ["UPSAMPLE_MODES", "check_pyramid_pool_input", "pyramid_pool", "pyramid_pool_reference"]

UPSAMPLE_MODES = ("transpose", "bilinear", "trilinear", "nearest")
MAX_LEVELS = 4


def _window(level: int) -> int:
    return 2 ** (level + 3)


def check_pyramid_pool_input(x: torch.Tensor, levels: int, upsample_mode: str, what: str = "pyramid_pool") -> None:
    """ValueError naming the rule when the pooling cannot take ``x``: the in-plane axes (3D: the first
    two spatial axes; 2D: the first) must be a positive multiple of the largest window,
    2**(levels+2), with "transpose" (its upsampling tiles the window exactly), and at least that
    window otherwise."""
    if x.dim() not in (4, 5):
        raise ValueError(f"{what} expects (B, C, H, W) or (B, C, H, W, D), got shape {tuple(x.shape)}")
    if upsample_mode not in UPSAMPLE_MODES:
        raise ValueError(f"{what}: upsample_mode must be one of {UPSAMPLE_MODES}, got {upsample_mode!r}")
    if not isinstance(levels, int) or not 0 <= levels <= MAX_LEVELS:
        raise ValueError(f"{what}: the number of levels must be an integer in [0, {MAX_LEVELS}], got {levels!r}")
    if levels == 0:
        return
    window = _window(levels - 1)
    inplane = x.shape[2:4] if x.dim() == 5 else x.shape[2:3]
    for axis, n in enumerate(inplane):
        if upsample_mode == "transpose" and (n < window or n % window):
            raise ValueError(f"{what} cannot take shape {tuple(x.shape)}: in-plane axis {axis} has size {n}; "
                             f"it must be a positive multiple of {window}, the largest pooling window")
        if upsample_mode != "transpose" and n < window:
            raise ValueError(f"{what} cannot take shape {tuple(x.shape)}: in-plane axis {axis} has size {n}; "
                             f"it must be at least {window}, the largest pooling window")


def _check_params(x, proj_weights, proj_biases, up_weights, up_biases, upsample_mode):
    sd, c = x.dim() - 2, x.shape[1]
    levels = len(proj_weights)
    if len(proj_biases) != levels:
        raise ValueError(f"pyramid_pool: {levels} projection weights but {len(proj_biases)} biases")
    for i, (w, b) in enumerate(zip(proj_weights, proj_biases)):
        if tuple(w.shape) != (1, c) + (1,) * sd or b.numel() != 1:
            raise ValueError(f"pyramid_pool: level {i} projection must be a (1, {c}{', 1' * sd}) weight and one "
                             f"bias for input of shape {tuple(x.shape)}; got {tuple(w.shape)} and {tuple(b.shape)}")
    if upsample_mode == "transpose":
        if up_weights is None or up_biases is None or len(up_weights) != levels or len(up_biases) != levels:
            raise ValueError(f"pyramid_pool: upsample_mode='transpose' needs {levels} transposed-convolution weights "
                             "and biases")
        for i, (w, b) in enumerate(zip(up_weights, up_biases)):
            s = _window(i)
            want = (1, 1) + (s, s, 1)[-sd:]
            if tuple(w.shape) != want or b.numel() != 1:
                raise ValueError(f"pyramid_pool: level {i} transposed convolution must be a {want} weight and one "
                                 f"bias; got {tuple(w.shape)} and {tuple(b.shape)}")
    elif up_weights:
        raise ValueError(f"pyramid_pool: upsample_mode={upsample_mode!r} takes no transposed-convolution weights")
    if upsample_mode == "trilinear" and sd != 3 or upsample_mode == "bilinear" and sd != 2:
        raise ValueError(f"pyramid_pool: upsample_mode={upsample_mode!r} does not fit a {sd}D input")
    if not x.is_floating_point():
        raise ValueError(f"pyramid_pool: x must be a floating-point tensor, got {x.dtype}")


def pyramid_pool_reference(x, proj_weights, proj_biases, up_weights=None, up_biases=None,
                           upsample_mode: str = "transpose", concat_input: bool = False) -> torch.Tensor:
    """MONAI's PSP, op for op: the oracle and the fallback."""
    sd = x.dim() - 2
    max_pool = F.max_pool3d if sd == 3 else F.max_pool2d
    conv = F.conv3d if sd == 3 else F.conv2d
    conv_t = F.conv_transpose3d if sd == 3 else F.conv_transpose2d
    outputs = []
    for i, (pw, pb) in enumerate(zip(proj_weights, proj_biases)):
        s = _window(i)
        size = (s, s, 1)[-sd:]
        projected = conv(max_pool(x, size, size), pw, pb, padding=(1, 1, 0)[-sd:])
        if upsample_mode == "transpose":
            outputs.append(conv_t(projected, up_weights[i], up_biases[i], stride=size, padding=(s, s, 0)[-sd:]))
        else:
            align = True if upsample_mode in ("bilinear", "trilinear") else None
            outputs.append(F.interpolate(projected, size=x.shape[2:], mode=upsample_mode, align_corners=align))
    if concat_input:
        outputs.append(x)
    return torch.cat(outputs, dim=1)


# ---------------------------------------------------------------------------------------------
# Arguments of the fused kernels.


def _axis_tables(out_size: int, pooled: int, pad: int, window: int, mode: str, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For one axis of one level: which padded cells (2, out_size) each output index reads, and the
    weight of the second (out_size,). The formulas are PyTorch's own (UpSample.h), in the same
    float precision, so that the indices agree exactly."""
    o = torch.arange(out_size, device=device)
    in_size = pooled + 2 * pad
    if mode == "transpose":
        i0 = o // window + pad
        return torch.stack([i0, i0]), torch.zeros(out_size, dtype=dtype, device=device)
    if mode == "nearest":
        if out_size == in_size:
            i0 = o
        elif out_size == 2 * in_size:
            i0 = o >> 1
        else:
            scale = torch.tensor(float(in_size), dtype=torch.float32) / torch.tensor(float(out_size),
                                                                                      dtype=torch.float32)
            i0 = torch.floor(o.to(torch.float32) * scale.to(device)).long().clamp(max=in_size - 1)
        return torch.stack([i0, i0]), torch.zeros(out_size, dtype=dtype, device=device)
    # linear, align_corners=True
    if out_size > 1:
        scale = torch.tensor(float(in_size - 1), dtype=dtype) / torch.tensor(float(out_size - 1), dtype=dtype)
    else:
        scale = torch.zeros((), dtype=dtype)
    src = o.to(dtype) * scale.to(device)
    i0 = src.long()
    lam = (src - i0.to(dtype)).clamp(0, 1)
    i1 = i0 + (i0 < in_size - 1).long()
    return torch.stack([i0, i1]), lam


class _Args:
    """The fused kernels' view of one call: x as (N, C, H, W, D) (2D as (N, C, H, 1, W)), stacked
    parameters and the upsampling tables."""

    def __init__(self, x, proj_weights, proj_biases, up_weights, up_biases, upsample_mode):
        self.spatial_dims = x.dim() - 2
        self.x5 = x if self.spatial_dims == 3 else x.unsqueeze(3)
        self.levels = len(proj_weights)
        self.pool_w = self.spatial_dims == 3
        self.linear = upsample_mode in ("bilinear", "trilinear")
        self.transpose = upsample_mode == "transpose"
        n, c, h, w, d = self.x5.shape
        op = opmath_dtype(x.dtype)
        self.proj_weight = torch.stack([pw.reshape(c) for pw in proj_weights])
        self.proj_bias = torch.cat([pb.reshape(1) for pb in proj_biases])
        if self.transpose:
            kh = _window(self.levels - 1)
            kw = kh if self.pool_w else 1
            self.up_weight = torch.stack([F.pad(uw.reshape(-1), (0, kh * kw - uw.numel())) for uw in up_weights])
            self.up_bias = torch.cat([ub.reshape(1) for ub in up_biases])
        else:
            self.up_weight = self.up_bias = None
        idx_h, lam_h, idx_w, lam_w = [], [], [], []
        pad_w = 1 if self.pool_w else 0
        for level in range(self.levels):
            s = _window(level)
            sw = s if self.pool_w else 1
            ih, lh = _axis_tables(h, h // s, 1, s, upsample_mode, op, x.device)
            iw, lw = _axis_tables(w, w // sw, pad_w, sw, upsample_mode, op, x.device)
            idx_h.append(ih), lam_h.append(lh), idx_w.append(iw), lam_w.append(lw)
        self.index_h, self.lambda_h = torch.stack(idx_h), torch.stack(lam_h)
        self.index_w, self.lambda_w = torch.stack(idx_w), torch.stack(lam_w)

    def op_args(self, concat_input: bool) -> tuple:
        return (self.x5, self.proj_weight, self.proj_bias, self.up_weight, self.up_bias, self.index_h, self.lambda_h,
                self.index_w, self.lambda_w, self.levels, self.pool_w, self.linear, concat_input)


# ---------------------------------------------------------------------------------------------
# Backend choice.


def _cpp_reasons(x) -> list[str]:
    return cpp_kernel_reasons("pyramid_pool", x.device) + dtype_reasons(x.dtype)


def _triton_reasons(x) -> list[str]:
    reasons = triton_reasons(x.device, x.dtype) + dtype_reasons(x.dtype)
    if x.dim() >= 2 and x.shape[0] * x.shape[1] > 65535:  # the kernels' second grid axis: CUDA's limit
        reasons.append(f"batch x channels = {x.shape[0] * x.shape[1]} exceeds the 65535 programs CUDA allows "
                       f"along a grid's second axis")
    return reasons


IMPLEMENTATIONS = backends.register("pyramid_pool", (
    backends.Implementation("reference", lambda x: []),
    backends.Implementation("cpp", _cpp_reasons),
    backends.Implementation("triton", _triton_reasons),
))


def pyramid_pool(x: torch.Tensor, proj_weights: Sequence[torch.Tensor], proj_biases: Sequence[torch.Tensor],
                 up_weights: Sequence[torch.Tensor] | None = None, up_biases: Sequence[torch.Tensor] | None = None,
                 *, upsample_mode: str = "transpose", concat_input: bool = False,
                 backend: str | None = None, grad_handover: bool = False) -> torch.Tensor:
    """Pyramid volumetric pooling of ``x`` (B, C, H, W, D) or (B, C, H, W) with ``len(proj_weights)``
    levels; the parameters are those of MONAI's PSP (``project_modules.i`` weight (1, C, 1, 1[, 1])
    and bias, ``up_modules.i`` weight (1, 1, s, s, 1) / (1, 1, s, 1) and bias in "transpose" mode).
    Returns (B, levels, ...) or, with ``concat_input``, ``cat([that, x], 1)`` built in one buffer.
    Sizes the pooling cannot take raise ValueError (see :func:`check_pyramid_pool_input`).

    grad_handover (with ``concat_input``): the caller promises that the gradient reaching this
    output's backward is seen by nothing else (``ahnet_fast.ops._handover``); the C++ backward then
    adds the levels' gradient into the concatenated x's part of it and returns that part, rather than
    a new tensor of x's size."""
    levels = len(proj_weights)
    check_pyramid_pool_input(x, levels, upsample_mode)
    _check_params(x, proj_weights, proj_biases, up_weights, up_biases, upsample_mode)
    cast = autocast_dtype(x)
    if cast is not None:  # MONAI's PSP under autocast runs its convolutions, so its output, in this dtype
        x = x.to(cast)
    if levels == 0:
        return x.clone() if concat_input else x.new_empty((x.shape[0], 0, *x.shape[2:]))

    def run(chosen):
        if chosen == "reference":
            return pyramid_pool_reference(x, proj_weights, proj_biases, up_weights, up_biases, upsample_mode,
                                          concat_input)
        a = _Args(x, proj_weights, proj_biases, up_weights, up_biases, upsample_mode)
        forward = torch.ops.ahnet_fast.pyramid_pool if chosen == "cpp" else _triton_ops()[0]
        with handed_over(grad_handover and concat_input):
            out = forward(*a.op_args(concat_input))[0]
        return out if a.spatial_dims == 3 else out.squeeze(3)

    return backends.dispatch("pyramid_pool", IMPLEMENTATIONS, x.device, (x,), backend, run)


# ---------------------------------------------------------------------------------------------
# Fake and autograd of the compiled ops.


def _forward_fake(x, proj_weight, proj_bias, up_weight, up_bias, index_h, lambda_h, index_w, lambda_w, levels,
                  pool_w, linear, concat_input):
    n, c, h, w, d = x.shape
    fmt = torch.channels_last_3d if channels_innermost(x) else torch.contiguous_format
    out = torch.empty((n, levels + (c if concat_input else 0), h, w, d), dtype=x.dtype, device=x.device,
                      memory_format=fmt)
    pooled, args, proj = [], [], []
    pad = 1 if pool_w else 0
    for level in range(levels):
        s = _window(level)
        hl, wl = h // s, (w // s if pool_w else w)
        pooled.append(x.new_empty((n, c, hl, wl, d)))
        args.append(x.new_empty((n, c, hl, wl, d), dtype=torch.int8 if level == 0 else torch.int16))
        proj.append(x.new_empty((n, hl + 2, wl + 2 * pad, d), dtype=opmath_dtype(x.dtype)))
    return out, pooled, args, proj


def _backward_fake(grad_identity, grad_pooled, argmax, size, pool_w, dtype, channels_last):
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    return torch.empty(size, dtype=dtype, device=grad_pooled[0].device, memory_format=fmt)


def _setup_context(ctx, inputs, output):
    (x, proj_weight, proj_bias, up_weight, up_bias, index_h, lambda_h, index_w, lambda_w, levels, pool_w, linear,
     concat_input) = inputs
    _, pooled, args, proj = output
    # The interpolation tables (a few hundred entries) only matter for the interpolation modes; kept
    # as int32 so that nothing int64 is saved.
    interp = up_weight is None
    index_h = index_h.to(torch.int32) if interp else None
    index_w = index_w.to(torch.int32) if interp else None
    ctx.save_for_backward(proj_weight, up_weight, index_h, lambda_h if interp else None, index_w,
                          lambda_w if interp else None, *pooled, *args, *proj)
    ctx.levels, ctx.pool_w, ctx.linear, ctx.concat = levels, pool_w, linear, concat_input
    ctx.handed_over = gradient_handed_over()
    ctx.transpose = up_weight is not None
    ctx.size = tuple(x.shape)
    ctx.dtype = x.dtype
    ctx.channels_last = channels_innermost(x)
    ctx.param_dtypes = (proj_weight.dtype, proj_bias.dtype,
                        None if up_weight is None else up_weight.dtype, None if up_bias is None else up_bias.dtype)
    ctx.set_materialize_grads(False)


def _interp_matrix(index: torch.Tensor, lam: torch.Tensor, in_size: int, linear: bool) -> torch.Tensor:
    """Dense (out, in) matrix of one axis' interpolation (two non-zeros a row): its transpose is the
    adjoint. Tiny (the padded pooled axis is at most 66 long), and a matmul keeps it deterministic."""
    out_size = index.shape[1]
    m = torch.zeros(out_size, in_size, dtype=lam.dtype, device=lam.device)
    rows = torch.arange(out_size, device=lam.device)
    index = index.long()
    if linear:
        m.index_put_((rows, index[0]), 1 - lam, accumulate=True)
        m.index_put_((rows, index[1]), lam, accumulate=True)
    else:
        m[rows, index[0]] = 1
    return m


def _make_backward(backward_op, in_place_op=None):
    """The autograd backward on ``backward_op``; ``in_place_op`` (the C++ ``pyramid_pool_backward_``)
    where the gradient may be handed over."""
    def backward(ctx, grad_out, _grad_pooled, _grad_args, _grad_proj):
        if grad_out is None:
            return (None,) * 13
        levels = ctx.levels
        saved = ctx.saved_tensors  # once: activation checkpointing allows a single unpack
        proj_weight, up_weight, index_h, lambda_h, index_w, lambda_w = saved[:6]
        pooled = saved[6:6 + levels]
        args = saved[6 + levels:6 + 2 * levels]
        proj = saved[6 + 2 * levels:]
        n, c, h, w, d = ctx.size
        op = opmath_dtype(ctx.dtype)
        pad = 1 if ctx.pool_w else 0
        pw = proj_weight.to(op)
        g_pw, g_pb, g_uw, g_ub, g_pooled = [], [], [], [], []
        for level in range(levels):
            s = _window(level)
            sw = s if ctx.pool_w else 1
            hl, wl = h // s, w // sw
            g = grad_out[:, level].to(op)  # (N, H, W, D)
            if ctx.transpose:
                # out[i*s+a, j*sw+b] = proj[i, j] * k[a, b] + bias: adjoint over each window
                k = up_weight[level, :s * sw].to(op).view(s, sw)
                gv = g.reshape(n, hl, s, wl, sw, d)
                interior = proj[level][:, 1:hl + 1, pad:pad + wl]
                g_int = torch.einsum("nhawbd,ab->nhwd", gv, k)
                g_uw.append(F.pad(torch.einsum("nhawbd,nhwd->ab", gv, interior).reshape(-1),
                                  (0, up_weight.shape[1] - s * sw)))
                g_ub.append(g.sum())
                g_pb.append(g_int.sum())  # the ring is cut away by the transposed conv's padding
            else:
                mh = _interp_matrix(index_h[level], lambda_h[level], hl + 2, ctx.linear)
                mw = _interp_matrix(index_w[level], lambda_w[level], wl + 2 * pad, ctx.linear)
                g_pad = torch.einsum("oi,nowd,wj->nijd", mh, g, mw)
                g_pb.append(g_pad.sum())
                g_int = g_pad[:, 1:hl + 1, pad:pad + wl]
            g_pw.append(torch.einsum("nchwd,nhwd->c", pooled[level].to(op), g_int))
            g_pooled.append(pw[level].view(1, c, 1, 1, 1) * g_int.unsqueeze(1))
        grad_identity = grad_out[:, levels:] if ctx.concat else None
        if grad_identity is not None and grad_identity.dtype != ctx.dtype:
            grad_identity = grad_identity.to(ctx.dtype)
        if ctx.handed_over and grad_identity is not None and in_place_op is not None:
            # the gradient is ours (see pyramid_pool's grad_handover): the levels' share added into it
            in_place_op(grad_identity, g_pooled, list(args), ctx.pool_w)
            grad_x = grad_identity
        else:
            grad_x = backward_op(grad_identity, g_pooled, list(args), list(ctx.size), ctx.pool_w, ctx.dtype,
                                 ctx.channels_last)
        pw_dt, pb_dt, uw_dt, ub_dt = ctx.param_dtypes
        grads = [grad_x, torch.stack(g_pw).to(pw_dt), torch.stack(g_pb).to(pb_dt)]
        grads += [torch.stack(g_uw).to(uw_dt), torch.stack(g_ub).to(ub_dt)] if ctx.transpose else [None, None]
        return tuple(grads) + (None,) * 8

    return backward


_TRITON_OPS = None


def _triton_ops():
    """``ahnet_fast::pyramid_pool_triton`` / ``pyramid_pool_backward_triton``: the Triton kernels as custom ops
    (CUDA, or CPU under TRITON_INTERPRET=1), with the C++ ops' fakes and autograd."""
    global _TRITON_OPS
    if _TRITON_OPS is None:
        from ahnet_fast.ops import _triton as kernels

        @torch.library.custom_op("ahnet_fast::pyramid_pool_backward_triton", mutates_args=())
        def pyramid_pool_backward_triton(grad_identity: torch.Tensor | None, grad_pooled: list[torch.Tensor],
                                argmax: list[torch.Tensor], size: list[int], pool_w: bool, dtype: torch.dtype,
                                channels_last: bool) -> torch.Tensor:
            return kernels.pyramid_pool_backward(grad_identity, grad_pooled, argmax, size, pool_w, dtype, channels_last)

        @torch.library.custom_op("ahnet_fast::pyramid_pool_triton", mutates_args=())
        def pyramid_pool_triton(x: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor,
                               up_weight: torch.Tensor | None, up_bias: torch.Tensor | None, index_h: torch.Tensor,
                               lambda_h: torch.Tensor, index_w: torch.Tensor, lambda_w: torch.Tensor, levels: int,
                               pool_w: bool, linear: bool, concat_input: bool
                               ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
            return kernels.pyramid_pool(x, proj_weight, proj_bias, up_weight, up_bias, index_h, lambda_h,
                                                index_w, lambda_w, levels, pool_w, linear, concat_input)

        _TRITON_OPS = register_triton_pair(pyramid_pool_triton, pyramid_pool_backward_triton, _forward_fake,
                                           _backward_fake, _make_backward, _setup_context)
    return _TRITON_OPS


def _register():
    if extension_available():
        torch.library.register_fake("ahnet_fast::pyramid_pool_backward_")(
            lambda grad_x, grad_pooled, argmax, pool_w: None)
        in_place = torch.ops.ahnet_fast.pyramid_pool_backward_
        register_compiled_pair("pyramid_pool", "pyramid_pool_backward", _forward_fake, _backward_fake,
                               lambda op: _make_backward(op, in_place), _setup_context)


_register()

# TorchScript's entry to the op (see define_script_entry): the same dispatch as a Python call.
define_script_entry(
    "pyramid_pool_script",
    "(Tensor x, Tensor[] proj_weights, Tensor[] proj_biases, Tensor[]? up_weights, Tensor[]? up_biases, "
    "str upsample_mode, bool concat_input, str? backend) -> Tensor",
    lambda x, proj_weights, proj_biases, up_weights, up_biases, upsample_mode, concat_input, backend: pyramid_pool(
        x, proj_weights, proj_biases, up_weights, up_biases, upsample_mode=upsample_mode, concat_input=concat_input,
        backend=backend))
