"""Triton kernels of BatchNorm followed by ReLU (the op ``ahnet_fast.ops.bn_relu``).

Same contract as the C++ ops ``ahnet_fast::bn_relu`` / ``bn_relu_backward`` (csrc/cpu/bn_relu.cpp):
the input is seen as (N, C, S) with any strides (channel-first: S contiguous; channels-last: C
contiguous). Kernels:

- ``bn_relu_stats_kernel``: per (channel, slice of the N*S elements) the count, mean and sum of squared
  deviations, a block at a time (two-pass inside the block, Chan's formula between blocks), so
  large means do not cancel the variance as E[x^2] - E[x]^2 would. The host combines the slices
  with the same formula in float64 (C x slices numbers).
- ``bn_relu_fwd_kernel``: y = max(0, (x - mean) * invstd * weight + bias).
- ``bn_relu_grad_sums_kernel``: per (channel, slice) the sums of g and g * xhat, where g is the
  output gradient where the ReLU passed (its mask recomputed from x, so y is never kept).
- ``bn_relu_bwd_kernel``: dx = weight * invstd * (g - [training] (sum g + xhat sum g xhat) / M).

fp32 math for every input dtype (fp64 for fp64). Importing this module needs triton; on CPU
tensors it runs only when TRITON_INTERPRET=1 was set before the import.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ahnet_fast._layout import opmath_dtype, output_like
from ahnet_fast.kernels.triton._launch import kernel, launch

BLOCK = 1024
NUM_WARPS = 4
MAX_SLICES = 64  # programs per channel for the reductions


@triton.jit
def _offsets(e, S, sn, ss):
    """Memory offset of flattened element e = n * S + s of one channel."""
    n = e // S
    s = e - n * S
    return n.to(tl.int64) * sn + s.to(tl.int64) * ss


@triton.jit
def _channel_params(mean_ptr, invstd_ptr, w_ptr, b_ptr, c):
    """Channel c's mean, 1/std, weight and bias, in the statistics' precision."""
    mean = tl.load(mean_ptr + c)
    return mean, tl.load(invstd_ptr + c), tl.load(w_ptr + c).to(mean.dtype), tl.load(b_ptr + c).to(mean.dtype)


@kernel(do_not_specialize=("M", "S", "per_slice", "SLICES"))
def bn_relu_stats_kernel(x_ptr, count_ptr, mean_ptr, m2_ptr, M, S, sn, sc, ss, per_slice, SLICES,
                    BLOCK: tl.constexpr):
    c = tl.program_id(0)
    k = tl.program_id(1)
    base = x_ptr + c.to(tl.int64) * sc
    lo = k * per_slice
    hi = tl.minimum(lo + per_slice, M)
    n_acc = tl.zeros([1], dtype=tl.float32)
    mean_acc = tl.zeros([1], dtype=m2_ptr.dtype.element_ty)
    m2_acc = tl.zeros([1], dtype=m2_ptr.dtype.element_ty)
    for start in range(lo, hi, BLOCK):
        e = start + tl.arange(0, BLOCK)
        mask = e < hi
        v = tl.load(base + _offsets(e, S, sn, ss), mask=mask, other=0).to(m2_ptr.dtype.element_ty)
        nb = tl.sum(mask.to(tl.float32), axis=0)
        mb = tl.sum(v, axis=0) / nb
        dev = tl.where(mask, v - mb, 0)
        m2b = tl.sum(dev * dev, axis=0)
        n_new = n_acc + nb
        delta = mb - mean_acc
        mean_acc = mean_acc + delta * (nb / n_new)
        m2_acc = m2_acc + m2b + delta * delta * (n_acc * nb / n_new)
        n_acc = n_new
    out = c * SLICES + k + tl.arange(0, 1)
    tl.store(count_ptr + out, n_acc)
    tl.store(mean_ptr + out, mean_acc)
    tl.store(m2_ptr + out, m2_acc)


@kernel(do_not_specialize=("M", "S"))
def bn_relu_fwd_kernel(x_ptr, y_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, M, S, sxn, sxc, sxs, syn, syc, sys_,
                       BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    c = tl.program_id(1)
    e = pid * BLOCK + tl.arange(0, BLOCK)
    mask = e < M
    mean, invstd, w, b = _channel_params(mean_ptr, invstd_ptr, w_ptr, b_ptr, c)
    scale = w * invstd
    shift = b - mean * scale
    x = tl.load(x_ptr + c.to(tl.int64) * sxc + _offsets(e, S, sxn, sxs), mask=mask, other=0).to(mean.dtype)
    y = tl.maximum(x * scale + shift, 0)
    tl.store(y_ptr + c.to(tl.int64) * syc + _offsets(e, S, syn, sys_), y.to(y_ptr.dtype.element_ty), mask=mask)


@kernel(do_not_specialize=("M", "S", "per_slice", "SLICES"))
def bn_relu_grad_sums_kernel(g_ptr, x_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, sum_g_ptr, sum_gx_ptr, M, S,
                             sgn, sgc, sgs, sxn, sxc, sxs, per_slice, SLICES, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    k = tl.program_id(1)
    mean, invstd, w, b = _channel_params(mean_ptr, invstd_ptr, w_ptr, b_ptr, c)
    lo = k * per_slice
    hi = tl.minimum(lo + per_slice, M)
    acc_g = tl.zeros([BLOCK], dtype=mean.dtype)
    acc_gx = tl.zeros([BLOCK], dtype=mean.dtype)
    for start in range(lo, hi, BLOCK):
        e = start + tl.arange(0, BLOCK)
        mask = e < hi
        x = tl.load(x_ptr + c.to(tl.int64) * sxc + _offsets(e, S, sxn, sxs), mask=mask, other=0).to(mean.dtype)
        g = tl.load(g_ptr + c.to(tl.int64) * sgc + _offsets(e, S, sgn, sgs), mask=mask, other=0).to(mean.dtype)
        xhat = (x - mean) * invstd
        g = tl.where(mask & (xhat * w + b > 0), g, 0)
        acc_g += g
        acc_gx += g * xhat
    tl.store(sum_g_ptr + c * SLICES + k, tl.sum(acc_g, axis=0))
    tl.store(sum_gx_ptr + c * SLICES + k, tl.sum(acc_gx, axis=0))


@kernel(do_not_specialize=("M", "S"))
def bn_relu_bwd_kernel(g_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, sum_g_ptr, sum_gx_ptr, M, S,
                       sgn, sgc, sgs, sxn, sxc, sxs, sdn, sdc, sds, TRAINING: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    c = tl.program_id(1)
    e = pid * BLOCK + tl.arange(0, BLOCK)
    mask = e < M
    mean, invstd, w, b = _channel_params(mean_ptr, invstd_ptr, w_ptr, b_ptr, c)
    x = tl.load(x_ptr + c.to(tl.int64) * sxc + _offsets(e, S, sxn, sxs), mask=mask, other=0).to(mean.dtype)
    g = tl.load(g_ptr + c.to(tl.int64) * sgc + _offsets(e, S, sgn, sgs), mask=mask, other=0).to(mean.dtype)
    xhat = (x - mean) * invstd
    g = tl.where(xhat * w + b > 0, g, 0)
    if TRAINING:
        inv_m = 1.0 / M.to(mean.dtype)
        g = g - (tl.load(sum_g_ptr + c) + xhat * tl.load(sum_gx_ptr + c)) * inv_m
    dx = g * (w * invstd)
    tl.store(dx_ptr + c.to(tl.int64) * sdc + _offsets(e, S, sdn, sds), dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers (arguments and results as the C++ ops take and give them).


def _spatial_stride(t: torch.Tensor) -> int | None:
    """The one stride of the flattened spatial index when the spatial axes collapse into one
    (stride[i] == stride[i + 1] * size[i + 1], size-1 axes ignored), else None."""
    axes = [(size, stride) for size, stride in zip(t.shape[2:], t.stride()[2:]) if size != 1]
    if not axes:
        return 1
    for (_, outer), (size, inner) in zip(axes, axes[1:]):
        if outer != inner * size:
            return None
    return axes[-1][1]


def indexable(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when the kernels can index it as (n, c, s) with one stride each, which covers
    contiguous and channels-last tensors and the dense block's channel prefix ``buf[:, :C]`` of
    either (read in place, not copied); otherwise a contiguous copy."""
    return t if _spatial_stride(t) is not None else t.contiguous()


def _ncs(t: torch.Tensor):
    """(N, C, S) sizes and the strides of n, c and the flattened spatial index s (see indexable)."""
    n, c = t.shape[:2]
    s = t[0, 0].numel() if t.dim() > 2 else 1
    return n, c, s, (t.stride(0), t.stride(1), _spatial_stride(t) if t.dim() > 2 else 1)


def _slices(m: int) -> tuple[int, int]:
    per = max(BLOCK, triton.cdiv(triton.cdiv(m, MAX_SLICES), BLOCK) * BLOCK)
    return per, triton.cdiv(m, per)


def bn_relu_stats(x):
    """Per-channel batch mean and biased variance of ``x`` (N, C, ...) in the kernels' precision."""
    x = indexable(x)
    n, c, s, (sn, sc, ss) = _ncs(x)
    m = n * s
    sd = opmath_dtype(x.dtype)
    per, slices = _slices(m)
    count = torch.empty(c * slices, dtype=torch.float32, device=x.device)
    mean_p = torch.empty(c * slices, dtype=sd, device=x.device)
    m2_p = torch.empty(c * slices, dtype=sd, device=x.device)
    launch(bn_relu_stats_kernel, (c, slices), x, count, mean_p, m2_p, m, s, sn, sc, ss, per, slices, BLOCK=BLOCK,
           num_warps=NUM_WARPS)
    # Chan's combination of the slices, in float64 (C x slices numbers)
    count, mean_p, m2_p = (t.double().view(c, slices) for t in (count, mean_p, m2_p))
    mean64 = (count * mean_p).sum(1) / m
    var64 = (m2_p + count * (mean_p - mean64[:, None]) ** 2).sum(1) / m
    return mean64.to(sd), var64.to(sd)


def bn_relu_forward(x, weight, bias, running_mean, running_var, training, eps):
    x = indexable(x)
    n, c, s, (sn, sc, ss) = _ncs(x)
    m = n * s
    sd = opmath_dtype(x.dtype)
    if training:
        mean, var = bn_relu_stats(x)
    else:
        mean, var = running_mean.to(sd), running_var.to(sd)
    invstd = torch.rsqrt(var.double() + eps).to(sd)
    y = output_like(x)
    _, _, _, (yn, yc, ys) = _ncs(y)
    launch(bn_relu_fwd_kernel, (triton.cdiv(m, BLOCK), c), x, y, mean.contiguous(), invstd, weight.contiguous(),
           bias.contiguous(), m, s, sn, sc, ss, yn, yc, ys, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return y, mean, var


def bn_relu_backward(grad_out, x, weight, bias, mean, var, training, eps):
    x = indexable(x)
    grad_out = indexable(grad_out)
    n, c, s, (sxn, sxc, sxs) = _ncs(x)
    _, _, _, (sgn, sgc, sgs) = _ncs(grad_out)
    m = n * s
    sd = opmath_dtype(x.dtype)
    mean = mean.to(sd).contiguous()
    invstd = torch.rsqrt(var.double() + eps).to(sd)
    w, b = weight.contiguous(), bias.contiguous()
    per, slices = _slices(m)
    sum_g = torch.empty(c * slices, dtype=sd, device=x.device)
    sum_gx = torch.empty(c * slices, dtype=sd, device=x.device)
    launch(bn_relu_grad_sums_kernel, (c, slices), grad_out, x, mean, invstd, w, b, sum_g, sum_gx, m, s, sgn, sgc,
           sgs, sxn, sxc, sxs, per, slices, BLOCK=BLOCK, num_warps=NUM_WARPS)
    sum_g = sum_g.view(c, slices).sum(1)
    sum_gx = sum_gx.view(c, slices).sum(1)
    dx = output_like(x)
    _, _, _, (sdn, sdc, sds) = _ncs(dx)
    launch(bn_relu_bwd_kernel, (triton.cdiv(m, BLOCK), c), grad_out, x, dx, mean, invstd, w, b, sum_g, sum_gx, m, s,
           sgn, sgc, sgs, sxn, sxc, sxs, sdn, sdc, sds, TRAINING=training, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dx, sum_gx.to(weight.dtype), sum_g.to(bias.dtype)


# ---------------------------------------------------------------------------------------------
# What compile_check builds.


def compile_specs():
    """Every kernel for each input dtype (statistics in fp32, fp64 for fp64); integers i32, as Triton
    types sizes and strides below 2**31 at launch."""
    specs = []
    for dt in ("fp32", "bf16", "fp16"):
        sd = "fp64" if dt == "fp64" else "fp32"
        ints = lambda *names: {k: "i32" for k in names}  # noqa: E731
        sig = {"x_ptr": f"*{dt}", "count_ptr": "*fp32", "mean_ptr": f"*{sd}", "m2_ptr": f"*{sd}",
               **ints("M", "S", "sn", "sc", "ss", "per_slice", "SLICES")}
        specs.append((dt, bn_relu_stats_kernel, sig, dict(BLOCK=BLOCK), NUM_WARPS))
        params = {"mean_ptr": f"*{sd}", "invstd_ptr": f"*{sd}", "w_ptr": f"*{sd}", "b_ptr": f"*{sd}"}
        sig = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", **params, **ints("M", "S", "sxn", "sxc", "sxs", "syn", "syc",
                                                                       "sys_")}
        specs.append((dt, bn_relu_fwd_kernel, sig, dict(BLOCK=BLOCK), NUM_WARPS))
        sig = {"g_ptr": f"*{dt}", "x_ptr": f"*{dt}", **params, "sum_g_ptr": f"*{sd}", "sum_gx_ptr": f"*{sd}",
               **ints("M", "S", "sgn", "sgc", "sgs", "sxn", "sxc", "sxs", "per_slice", "SLICES")}
        specs.append((dt, bn_relu_grad_sums_kernel, sig, dict(BLOCK=BLOCK), NUM_WARPS))
        for training in (True, False):
            sig = {"g_ptr": f"*{dt}", "x_ptr": f"*{dt}", "dx_ptr": f"*{dt}", **params, "sum_g_ptr": f"*{sd}",
                   "sum_gx_ptr": f"*{sd}", **ints("M", "S", "sgn", "sgc", "sgs", "sxn", "sxc", "sxs", "sdn", "sdc",
                                                  "sds")}
            specs.append((f"{dt}-{'train' if training else 'eval'}", bn_relu_bwd_kernel, sig,
                          dict(TRAINING=training, BLOCK=BLOCK), NUM_WARPS))
    return specs
