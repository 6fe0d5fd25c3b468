"""Triton kernel of the focal loss: loss and gradient in one pass over the logits.

Same contract as the C++ kernel ``ahnet_fast::focal_loss`` (csrc/cpu/focal_loss.cpp): one
program handles BLOCK voxels of one sample, loops over the classes (softmax: max, sum of
exponentials, then the gradient; sigmoid: elementwise), writes the gradient already scaled by
grad_scale[b], and one partial loss sum, count and invalid-target count per program, summed on the
host side in a fixed order (deterministic, no atomics). fp32 math for every input dtype.

Importing this module needs triton; on CPU tensors it runs only when TRITON_INTERPRET=1 was set
before the import (Triton decides at decoration time).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ahnet_fast._layout import is_channels_last
from ahnet_fast.kernels.triton._launch import kernel, launch

# One voxel a thread: with 2 or 4 a thread, some supported Triton spills a few bytes of a softmax
# path (3.5/3.6 on sm_90 at 256 voxels and 4 warps, 3.7 on sm_80 at 512 and 8 warps: a stack slot at
# 40-96 registers, not register pressure); at 256 and 8 warps none does (compile_matrix.sh)
BLOCK = 256
NUM_WARPS = 8


@triton.jit
def _softplus(x):
    e = tl.exp(-tl.abs(x))
    # log(1 + e) with the series for tiny e, so softplus of a very negative x stays exact
    return tl.maximum(x, 0.0) + tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    s = 1.0 / (1.0 + e)
    return tl.where(x >= 0, s, e * s)


@triton.jit
def _focal_terms(lp, gamma, GAMMA_TWO: tl.constexpr):
    """For log p: (F, loss term) with F = (1-p)^g [1 - g p log p / (1-p)] and loss = -(1-p)^g log p."""
    p = tl.exp(lp)
    u = tl.where(lp > -1e-3, -lp * (1.0 + lp * (0.5 + lp * (1.0 / 6.0))), 1.0 - p)
    if GAMMA_TWO:
        mod = u * u
    else:
        # u == 0: 0^gamma, which is 1 for gamma == 0 (cast: a select of Python floats is fp64)
        zero_pow = tl.where(gamma == 0.0, 1.0, 0.0).to(tl.float32)
        mod = tl.where(u > 0, tl.exp(gamma * tl.log(tl.maximum(u, 1e-30))), zero_pow)
    ratio = tl.where(u > 0, lp / tl.where(u > 0, u, 1.0), -1.0)
    return mod * (1.0 - gamma * p * ratio), -mod * lp


# Flags that select between a few instructions per voxel are runtime arguments, not constexprs:
# one compiled kernel per (path, target kind, dtypes) instead of 2**4 more, at no measurable cost in a
# kernel bound by memory. SOFTMAX and LABELS change the loops' structure and stay compile-time.
@kernel(do_not_specialize=("S", "C", "FIRST", "IGNORE", "BINARY", "HAS_IGNORE", "ALPHA_LINEAR", "COMPUTE_GRAD"))
def focal_loss_fwd_kernel(
    x_ptr, t_ptr, grad_ptr, fpos_ptr, fneg_ptr, scale_ptr, loss_part_ptr, count_part_ptr, bad_part_ptr,
    S, C, FIRST, IGNORE, x_sb, x_sc, x_ss, t_sb, t_sc, t_ss, gamma, BINARY, HAS_IGNORE, ALPHA_LINEAR, COMPUTE_GRAD,
    SOFTMAX: tl.constexpr, LABELS: tl.constexpr, GAMMA_TWO: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    nprog = tl.num_programs(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < S
    offs64 = offs.to(tl.int64)
    # channel offsets c * x_sc can pass 2**31 on large volumes: int64 strides (Triton passes ints
    # below 2**31 as i32)
    x_sc = tl.cast(x_sc, tl.int64)
    t_sc = tl.cast(t_sc, tl.int64)
    x_row = x_ptr + b.to(tl.int64) * x_sb + offs64 * x_ss
    g_row = grad_ptr + b.to(tl.int64) * x_sb + offs64 * x_ss
    t_row = t_ptr + b.to(tl.int64) * t_sb + offs64 * t_ss
    scale = tl.load(scale_ptr + b)

    valid = inb
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    cls = tl.zeros([BLOCK], dtype=tl.int32)
    if LABELS:
        v = tl.load(t_row, mask=inb, other=0).to(tl.int64)
        ignored = (v == IGNORE) & (HAS_IGNORE != 0)
        binary = BINARY != 0
        out = tl.where(binary, (v != 0) & (v != 1), (v < 0) | (v >= C))
        bad = (inb & (~ignored) & out).to(tl.int32)
        valid = inb & (~ignored) & (~out)
        cls = tl.where(valid, tl.where(binary, v, v - FIRST), -1).to(tl.int32)
    vloss = tl.zeros([BLOCK], dtype=tl.float32)

    if SOFTMAX:
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        for c in range(FIRST, C):
            z = tl.load(x_row + c * x_sc, mask=inb, other=0.0).to(tl.float32)
            m = tl.maximum(m, z)
        se = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(FIRST, C):
            z = tl.load(x_row + c * x_sc, mask=inb, other=0.0).to(tl.float32)
            se += tl.exp(z - m)
        lse = tl.log(se)  # log p = (z - m) - lse: never forms m + lse, which loses digits at large logits
        if LABELS:
            hit = cls >= 0
            ci = tl.where(hit, cls, 0)
            z = tl.load(x_row + (ci + FIRST).to(tl.int64) * x_sc, mask=inb, other=0.0).to(tl.float32)
            F, loss_term = _focal_terms((z - m) - lse, gamma, GAMMA_TWO)
            a = tl.load(fpos_ptr + ci, mask=inb & hit, other=0.0)
            a = tl.where(hit, a, 0.0)
            vloss = a * loss_term
            gy = a * F
            if COMPUTE_GRAD != 0:
                for c in range(FIRST, C):
                    z = tl.load(x_row + c * x_sc, mask=inb, other=0.0).to(tl.float32)
                    p = tl.exp((z - m) - lse)
                    d = p * gy - tl.where(cls == c - FIRST, gy, 0.0)
                    tl.store(g_row + c * x_sc, tl.where(valid, scale * d, 0.0).to(grad_ptr.dtype.element_ty),
                             mask=inb)
        else:
            gsum = tl.zeros([BLOCK], dtype=tl.float32)
            for c in range(FIRST, C):
                z = tl.load(x_row + c * x_sc, mask=inb, other=0.0).to(tl.float32)
                tv = tl.load(t_row + c * t_sc, mask=inb, other=0.0).to(tl.float32)
                is_bad = inb & ~((tv >= 0.0) & (tv <= 1.0))
                bad += is_bad.to(tl.int32)
                valid = valid & ~is_bad
                a = tl.load(fpos_ptr + c - FIRST)
                F, loss_term = _focal_terms((z - m) - lse, gamma, GAMMA_TWO)
                vloss += a * tv * loss_term
                gsum += a * tv * F
            if COMPUTE_GRAD != 0:
                for c in range(FIRST, C):
                    z = tl.load(x_row + c * x_sc, mask=inb, other=0.0).to(tl.float32)
                    tv = tl.load(t_row + c * t_sc, mask=inb, other=0.0).to(tl.float32)
                    a = tl.load(fpos_ptr + c - FIRST)
                    lp = (z - m) - lse
                    F, loss_term = _focal_terms(lp, gamma, GAMMA_TWO)
                    d = tl.exp(lp) * gsum - a * tv * F
                    tl.store(g_row + c * x_sc, tl.where(valid, scale * d, 0.0).to(grad_ptr.dtype.element_ty),
                             mask=inb)
    else:
        for c in range(FIRST, C):
            xv = tl.load(x_row + c * x_sc, mask=inb, other=0.0).to(tl.float32)
            if LABELS:
                tv = tl.where(BINARY != 0, cls == 1, cls == c - FIRST).to(tl.float32)
            else:
                tv = tl.load(t_row + c * t_sc, mask=inb, other=0.0).to(tl.float32)
                is_bad = inb & ~((tv >= 0.0) & (tv <= 1.0))
                bad += is_bad.to(tl.int32)
                valid = valid & ~is_bad
                tv = tl.where(is_bad, 0.0, tv)
            pos = tl.load(fpos_ptr + c - FIRST)
            neg = tl.load(fneg_ptr + c - FIRST)
            a = tl.where(ALPHA_LINEAR != 0, tv * pos + (1.0 - tv) * neg, tl.where(tv == 1.0, pos, neg))
            bce = _softplus(xv) - xv * tv
            two_t_minus_1 = 2.0 * tv - 1.0
            u = -xv * two_t_minus_1
            sig_u = _sigmoid(u)
            if GAMMA_TWO:
                mod = sig_u * sig_u
            else:
                mod = tl.exp(-gamma * _softplus(-u))
            vloss += a * bce * mod
            if COMPUTE_GRAD != 0:
                d = a * ((_sigmoid(xv) - tv) * mod - bce * mod * gamma * (1.0 - sig_u) * two_t_minus_1)
                tl.store(g_row + c * x_sc, tl.where(valid, scale * d, 0.0).to(grad_ptr.dtype.element_ty),
                         mask=inb)
    if COMPUTE_GRAD != 0:
        for c in range(0, FIRST):  # classes excluded from the loss get no gradient
            tl.store(g_row + c * x_sc, tl.zeros([BLOCK], dtype=tl.float32).to(grad_ptr.dtype.element_ty),
                     mask=inb)
    part = b * nprog + pid
    tl.store(loss_part_ptr + part, tl.sum(tl.where(valid, vloss, 0.0), axis=0))
    tl.store(count_part_ptr + part, tl.sum(valid.to(tl.float32), axis=0))
    tl.store(bad_part_ptr + part, tl.sum(bad, axis=0))


def _readable(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The tensor in a layout the kernel indexes with one voxel stride, and that stride."""
    if is_channels_last(x):
        return x, x.shape[1]
    return x.contiguous(), 1


def focal_loss(logits, target, factor_pos, factor_neg, grad_scale, gamma, softmax, label_target,
                       first_channel, ignore_index, has_ignore, alpha_linear, compute_grad):
    """Launches the kernel; returns what ahnet_fast::focal_loss returns."""
    x, x_ss = _readable(logits)
    b, c = x.shape[:2]
    s = x[0, 0].numel()
    if label_target:
        # int32 or int64 labels: uint8 maps are widened, so that two label dtypes cover every call
        t = target.reshape(b, s)
        t = (t if t.dtype in (torch.int32, torch.int64) else t.to(torch.int32)).contiguous()
        t_sb, t_sc, t_ss = s, 0, 1
    else:
        t, t_ss = _readable(target)
        t_sb, t_sc = t.stride(0), t.stride(1)
    dev = x.device
    grad = torch.empty_like(x) if compute_grad else x.new_empty(0)
    grid = (triton.cdiv(max(s, 1), BLOCK), b)
    loss_part = torch.empty(grid[0] * b, dtype=torch.float32, device=dev)
    count_part = torch.empty_like(loss_part)
    bad_part = torch.empty(grid[0] * b, dtype=torch.int32, device=dev)
    launch(focal_loss_fwd_kernel, grid,
           x, t, grad if compute_grad else x, factor_pos.to(dev, torch.float32), factor_neg.to(dev, torch.float32),
           grad_scale.to(dev, torch.float32), loss_part, count_part, bad_part,
           s, c, first_channel, ignore_index, x.stride(0), x.stride(1), x_ss, t_sb, t_sc, t_ss, float(gamma),
           int(label_target and c == 1), int(has_ignore), int(alpha_linear), int(compute_grad),
           SOFTMAX=bool(softmax), LABELS=bool(label_target), GAMMA_TWO=float(gamma) == 2.0, BLOCK=BLOCK,
           num_warps=NUM_WARPS)
    loss_sum = loss_part.view(b, -1).double().sum(1)
    count = count_part.view(b, -1).double().sum(1)
    return loss_sum, count, grad, bad_part.sum().to(torch.int64)


def compile_specs():
    """Every configuration the launcher produces: path (softmax/sigmoid) x target kind x gamma == 2,
    for each logits dtype and each target dtype it passes (labels int32/int64; dense targets fp32
    or the logits' dtype). Binary labels, ignore_index, the alpha form and the gradient are runtime
    flags: one build covers them."""
    specs = []
    for dt in ("fp32", "bf16", "fp16"):
        targets = [("labels", "i32"), ("labels", "i64")] + [("dense", t) for t in dict.fromkeys(("fp32", dt))]
        for softmax in (False, True):
            for kind, t_dt in targets:
                for gamma_two in (False, True):
                    sig = {"x_ptr": f"*{dt}", "t_ptr": f"*{t_dt}", "grad_ptr": f"*{dt}", "fpos_ptr": "*fp32",
                           "fneg_ptr": "*fp32", "scale_ptr": "*fp32", "loss_part_ptr": "*fp32",
                           "count_part_ptr": "*fp32", "bad_part_ptr": "*i32"}
                    sig.update({k: "i32" for k in ("S", "C", "FIRST", "IGNORE", "x_sb", "x_sc", "x_ss", "t_sb",
                                                    "t_sc", "t_ss")})
                    sig["gamma"] = "fp32"
                    sig.update({k: "i32" for k in ("BINARY", "HAS_IGNORE", "ALPHA_LINEAR", "COMPUTE_GRAD")})
                    consts = dict(SOFTMAX=softmax, LABELS=kind == "labels", GAMMA_TWO=gamma_two, BLOCK=BLOCK)
                    name = f"{'softmax' if softmax else 'sigmoid'}-{kind}-{t_dt}-{'g2' if gamma_two else 'g'}-{dt}"
                    specs.append((name, focal_loss_fwd_kernel, sig, consts, NUM_WARPS))
    return specs
