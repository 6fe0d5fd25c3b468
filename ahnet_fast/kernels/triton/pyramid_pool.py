"""Triton kernels of pyramid volumetric pooling (the op ``ahnet_fast.ops.pyramid_pool``).

Same contract as the C++ kernels ``ahnet_fast::pyramid_pool`` / ``pyramid_pool_backward``
(csrc/cpu/pyramid_pool.cpp); the map is (N, C, H, W, D), level l pools windows of s = 8 << l rows
by s (pool_w) or 1 columns. Kernels:

- ``pyramid_pool_pool0_kernel``: the one full read of x. A program takes BLOCK level-0 cells (i, j, d) of
  one (sample, channel), scans the window in row-major order (first maximum wins, a NaN wins over
  numbers: PyTorch's rule), writes the maxima and their int8 window positions, and copies what it
  read into the output channels after the pyramid ones (the fused concatenation).
- ``pyramid_pool_coarsen_kernel``: level l from the 2x2 (or 2x1) cells of level l-1, the same rule applied
  between candidates, int16 positions in the larger window.
- ``pyramid_pool_project_kernel``: the 1-channel projection of one level (sum over channels), read from the
  pooled maxima (1/64 of x for level 0). On the GPU the channels of a cell live in different
  programs of the pooling kernel; summing them there would take atomics (order-dependent results),
  so the projection reads the small pooled map back instead.
- ``pyramid_pool_upsample_kernel``: one output channel from the padded projection, through the same
  index/weight tables as the C++ kernel (transpose: times the weight of the window phase, plus bias).
- ``pyramid_pool_route_kernel`` (backward): grad_x = grad of the concatenated x (or 0) plus, for each level,
  the pooled gradient where the element is that window's stored argmax. Every element is computed
  independently: no atomics, deterministic.

Importing this module needs triton; on CPU tensors it runs only when TRITON_INTERPRET=1 was set
before the import.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ahnet_fast._layout import channels_innermost, opmath_dtype
from ahnet_fast.kernels.triton._launch import kernel, launch

BLOCK = 256
NUM_WARPS = 4


@triton.jit
def _split(offs, W, D):
    """Row, column and depth of flattened (row, column, depth) indices, depth fastest."""
    t = offs // D
    return t // W, t % W, offs % D


@kernel(do_not_specialize=("C", "h0", "w0", "D", "out_c0"))
def pyramid_pool_pool0_kernel(x_ptr, out_ptr, pooled_ptr, arg_ptr, C, h0, w0, D,
                     sxn, sxc, sxh, sxw, sxd, son, soc, soh, sow, sod, out_c0,
                     S: tl.constexpr, SW: tl.constexpr, COPY: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nc = tl.program_id(1)
    n = nc // C
    c = nc % C
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    cells = h0 * w0 * D
    mask = offs < cells
    i, j, d = _split(offs, w0, D)
    src = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc + d.to(tl.int64) * sxd
    dst = out_ptr + n.to(tl.int64) * son + (c + out_c0).to(tl.int64) * soc + d.to(tl.int64) * sod
    m = tl.full([BLOCK], float("-inf"), x_ptr.dtype.element_ty)
    idx = tl.zeros([BLOCK], dtype=tl.int32)
    # rows in a loop, the columns of a row unrolled: SW loads in flight per thread and ~half the
    # registers of unrolling the whole window
    for a in range(S):
        for b in tl.static_range(SW):
            hh = (i * S + a).to(tl.int64)
            ww = (j * SW + b).to(tl.int64)
            v = tl.load(src + hh * sxh + ww * sxw, mask=mask, other=float("-inf"))
            take = (v > m) | (v != v)
            m = tl.where(take, v, m)
            idx = tl.where(take, a * SW + b, idx)
            if COPY:
                tl.store(dst + hh * soh + ww * sow, v, mask=mask)
    base = nc.to(tl.int64) * cells + offs
    tl.store(pooled_ptr + base, m, mask=mask)
    tl.store(arg_ptr + base, idx.to(tl.int8), mask=mask)


@triton.jit
def _beats(va, pa, vb, pb):
    """Candidate a (value, window position) beats b under PyTorch's scan rule."""
    na = va != va
    nb = vb != vb
    by_nan = na & ((nb == 0) | (pa > pb))
    by_value = (va > vb) | ((va == vb) & (pa < pb))
    return tl.where(na | nb, by_nan, by_value)


@kernel(do_not_specialize=("hi", "wi", "ho", "wo", "D"))
def pyramid_pool_coarsen_kernel(pin_ptr, ain_ptr, pout_ptr, aout_ptr, hi, wi, ho, wo, D,
                       SP: tl.constexpr, SWP: tl.constexpr, CW: tl.constexpr, BLOCK: tl.constexpr):
    # children per cell: 2 rows by CW (2 when the columns are pooled, else 1) columns; the larger
    # window is CW * SWP columns wide
    pid = tl.program_id(0)
    nc = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    cells = ho * wo * D
    mask = offs < cells
    i, j, d = _split(offs, wo, D)
    SWB: tl.constexpr = CW * SWP
    best_v = tl.load(pin_ptr + ((nc * hi + 2 * i) * wi + j * CW) * D + d, mask=mask, other=0)
    p = tl.load(ain_ptr + ((nc * hi + 2 * i) * wi + j * CW) * D + d, mask=mask, other=0).to(tl.int32)
    best_p = (p // SWP) * SWB + p % SWP
    for ci in tl.static_range(2):
        for cj in tl.static_range(CW):
            if ci + cj > 0:
                k = ((nc * hi + 2 * i + ci) * wi + j * CW + cj) * D + d
                v = tl.load(pin_ptr + k, mask=mask, other=0)
                p = tl.load(ain_ptr + k, mask=mask, other=0).to(tl.int32)
                pos = (ci * SP + p // SWP) * SWB + cj * SWP + p % SWP
                take = _beats(v, pos, best_v, best_p)
                best_v = tl.where(take, v, best_v)
                best_p = tl.where(take, pos, best_p)
    o = nc * cells + offs
    tl.store(pout_ptr + o, best_v, mask=mask)
    tl.store(aout_ptr + o, best_p.to(tl.int16), mask=mask)


@kernel(do_not_specialize=("C", "h", "w", "D"))
def pyramid_pool_project_kernel(pooled_ptr, w_ptr, b_ptr, pp_ptr, C, h, w, D, PAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    cells = h * w * D
    mask = offs < cells
    acc = tl.zeros([BLOCK], dtype=pp_ptr.dtype.element_ty)
    for c in range(C):
        wc = tl.load(w_ptr + c)
        v = tl.load(pooled_ptr + (n * C + c) * cells + offs, mask=mask, other=0)
        acc += wc * v.to(pp_ptr.dtype.element_ty)
    acc += tl.load(b_ptr)
    i, j, d = _split(offs, w, D)
    wp = w + 2 * PAD
    tl.store(pp_ptr + ((n * (h + 2) + i + 1) * wp + j + PAD) * D + d, acc, mask=mask)


@kernel(do_not_specialize=("H", "W", "D", "hp", "wp", "channel", "S", "SW"))
def pyramid_pool_upsample_kernel(pp_ptr, out_ptr, ih_ptr, lh_ptr, iw_ptr, lw_ptr, upw_ptr, upb_ptr, H, W, D, hp, wp,
                        son, soc, soh, sow, sod, channel, S, SW,
                        LINEAR: tl.constexpr, TRANSPOSE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H * W * D
    oh, ow, d = _split(offs, W, D)
    i0 = tl.load(ih_ptr + oh, mask=mask, other=0)
    j0 = tl.load(iw_ptr + ow, mask=mask, other=0)
    row0 = pp_ptr + (n * hp + i0) * wp * D + d
    v00 = tl.load(row0 + j0 * D, mask=mask, other=0)
    if LINEAR:
        i1 = tl.load(ih_ptr + H + oh, mask=mask, other=0)
        j1 = tl.load(iw_ptr + W + ow, mask=mask, other=0)
        b1 = tl.load(lh_ptr + oh, mask=mask, other=0)
        a1 = tl.load(lw_ptr + ow, mask=mask, other=0)
        row1 = pp_ptr + (n * hp + i1) * wp * D + d
        v01 = tl.load(row0 + j1 * D, mask=mask, other=0)
        v10 = tl.load(row1 + j0 * D, mask=mask, other=0)
        v11 = tl.load(row1 + j1 * D, mask=mask, other=0)
        val = (1 - b1) * ((1 - a1) * v00 + a1 * v01) + b1 * ((1 - a1) * v10 + a1 * v11)
    elif TRANSPOSE:
        k = tl.load(upw_ptr + (oh % S) * SW + ow % SW, mask=mask, other=0)
        val = v00 * k + tl.load(upb_ptr)
    else:
        val = v00
    dst = out_ptr + n * son + channel * soc + oh.to(tl.int64) * soh + ow.to(tl.int64) * sow + d.to(tl.int64) * sod
    tl.store(dst, val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _route_level(acc, gp_ptr, a_ptr, nc, hh, ww, d, H, W, D, mask, S: tl.constexpr, SW: tl.constexpr):
    h = H // S
    w = W // SW
    i = hh // S
    j = ww // SW
    valid = mask & (i < h) & (j < w)
    cell = ((nc * h + i) * w + j) * D + d
    pos = (hh % S) * SW + ww % SW
    arg = tl.load(a_ptr + cell, mask=valid, other=-1).to(tl.int32)
    g = tl.load(gp_ptr + cell, mask=valid & (arg == pos), other=0)
    return acc + g


@kernel(do_not_specialize=("C", "H", "W", "D"))
def pyramid_pool_route_kernel(gid_ptr, gx_ptr, gp0, a0, gp1, a1, gp2, a2, gp3, a3, C, H, W, D,
                     sgn, sgc, sgh, sgw, sgd, sxn, sxc, sxh, sxw, sxd,
                     LEVELS: tl.constexpr, POOL_W: tl.constexpr, HAS_ID: tl.constexpr, BLOCK: tl.constexpr):
    # level l windows: 8 << l rows by 8 << l (POOL_W) or 1 columns
    pid = tl.program_id(0)
    nc = tl.program_id(1).to(tl.int64)
    n = nc // C
    c = nc % C
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H * W * D
    hh, ww, d = _split(offs, W, D)
    acc = tl.zeros([BLOCK], dtype=gp0.dtype.element_ty)
    if HAS_ID:
        g = tl.load(gid_ptr + n * sgn + c * sgc + hh.to(tl.int64) * sgh + ww.to(tl.int64) * sgw
                    + d.to(tl.int64) * sgd, mask=mask, other=0)
        acc += g.to(gp0.dtype.element_ty)
    acc = _route_level(acc, gp0, a0, nc, hh, ww, d, H, W, D, mask, 8, 8 * POOL_W + 1 - POOL_W)
    if LEVELS > 1:
        acc = _route_level(acc, gp1, a1, nc, hh, ww, d, H, W, D, mask, 16, 16 * POOL_W + 1 - POOL_W)
    if LEVELS > 2:
        acc = _route_level(acc, gp2, a2, nc, hh, ww, d, H, W, D, mask, 32, 32 * POOL_W + 1 - POOL_W)
    if LEVELS > 3:
        acc = _route_level(acc, gp3, a3, nc, hh, ww, d, H, W, D, mask, 64, 64 * POOL_W + 1 - POOL_W)
    tl.store(gx_ptr + n * sxn + c * sxc + hh.to(tl.int64) * sxh + ww.to(tl.int64) * sxw + d.to(tl.int64) * sxd,
             acc.to(gx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers (arguments as the C++ ops take them).


def _check_grid(planes):
    # (sample, channel) planes run on the grid's second axis, which CUDA caps at 65535
    if planes > 65535:
        raise ValueError(f"pyramid_pool (Triton): batch x channels = {planes} exceeds 65535; split the batch")


def pyramid_pool(x, proj_weight, proj_bias, up_weight, up_bias, index_h, lambda_h, index_w, lambda_w, levels,
                         pool_w, linear, concat_input):
    n, c, h, w, d = x.shape
    _check_grid(n * c)
    op = opmath_dtype(x.dtype)
    fmt = torch.channels_last_3d if channels_innermost(x) else torch.contiguous_format
    out = torch.empty((n, levels + (c if concat_input else 0), h, w, d), dtype=x.dtype, device=x.device,
                      memory_format=fmt)
    pad = 1 if pool_w else 0
    pooled, args, proj = [], [], []
    for level in range(levels):
        s = 8 << level
        hl, wl = h // s, (w // s if pool_w else w)
        pooled.append(torch.empty((n, c, hl, wl, d), dtype=x.dtype, device=x.device))
        args.append(torch.empty((n, c, hl, wl, d), dtype=torch.int8 if level == 0 else torch.int16, device=x.device))
        proj.append(torch.empty((n, hl + 2, wl + 2 * pad, d), dtype=op, device=x.device))
    pw = proj_weight.to(op).contiguous()
    pb = proj_bias.to(op).contiguous()
    s0, sw0 = 8, (8 if pool_w else 1)
    h0, w0 = h // s0, w // sw0
    cells = h0 * w0 * d
    launch(pyramid_pool_pool0_kernel, (triton.cdiv(cells, BLOCK), n * c),
        x, out, pooled[0], args[0], c, h0, w0, d, *x.stride(), *out.stride(), levels,
        S=s0, SW=sw0, COPY=concat_input, BLOCK=BLOCK, num_warps=NUM_WARPS)
    if concat_input:  # rows and columns outside the whole windows: copied, not pooled
        if h0 * s0 < h:
            out[:, levels:, h0 * s0:].copy_(x[:, :, h0 * s0:])
        if w0 * sw0 < w:
            out[:, levels:, :h0 * s0, w0 * sw0:].copy_(x[:, :, :h0 * s0, w0 * sw0:])
    for level in range(1, levels):
        sp = 8 << (level - 1)
        swp = sp if pool_w else 1
        hi_, wi = pooled[level - 1].shape[2:4]
        ho, wo = pooled[level].shape[2:4]
        launch(pyramid_pool_coarsen_kernel, (triton.cdiv(ho * wo * d, BLOCK), n * c),
            pooled[level - 1], args[level - 1], pooled[level], args[level], hi_, wi, ho, wo, d,
            SP=sp, SWP=swp, CW=2 if pool_w else 1, BLOCK=BLOCK, num_warps=NUM_WARPS)
    for level in range(levels):
        hl, wl = pooled[level].shape[2:4]
        proj[level].copy_(pb[level].expand_as(proj[level]))  # the ring; the kernel writes the interior
        launch(pyramid_pool_project_kernel, (triton.cdiv(hl * wl * d, BLOCK), n),
            pooled[level], pw[level], pb[level:], proj[level], c, hl, wl, d, PAD=pad, BLOCK=BLOCK,
            num_warps=NUM_WARPS)
    ih, iw = index_h.contiguous(), index_w.contiguous()
    lh, lw = lambda_h.to(op).contiguous(), lambda_w.to(op).contiguous()
    transpose = up_weight is not None
    uw = up_weight.to(op).contiguous() if transpose else pw
    ub = up_bias.to(op).contiguous() if transpose else pb
    for level in range(levels):
        s = 8 << level
        hp, wp = proj[level].shape[1:3]
        launch(pyramid_pool_upsample_kernel, (triton.cdiv(h * w * d, BLOCK), n),
            proj[level], out, ih[level], lh[level], iw[level], lw[level], uw[level], ub[level:], h, w, d, hp, wp,
            *out.stride(), level, s, s if pool_w else 1, LINEAR=linear, TRANSPOSE=transpose, BLOCK=BLOCK,
            num_warps=NUM_WARPS)
    return out, pooled, args, proj


def pyramid_pool_backward(grad_identity, grad_pooled, argmax, size, pool_w, dtype, channels_last):
    n, c, h, w, d = size
    _check_grid(n * c)
    levels = len(grad_pooled)
    op = opmath_dtype(dtype)
    gps = [g.to(op).contiguous() for g in grad_pooled]
    aps = [a.contiguous() for a in argmax]
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    gx = torch.empty(size, dtype=dtype, device=gps[0].device, memory_format=fmt)
    while len(gps) < 4:  # unused level slots (LEVELS is a compile-time constant)
        gps.append(gps[0])
        aps.append(aps[0])
    gid = grad_identity if grad_identity is not None else gx
    launch(pyramid_pool_route_kernel, (triton.cdiv(h * w * d, BLOCK), n * c),
        gid, gx, gps[0], aps[0], gps[1], aps[1], gps[2], aps[2], gps[3], aps[3], c, h, w, d,
        *gid.stride(), *gx.stride(), LEVELS=levels, POOL_W=pool_w, HAS_ID=grad_identity is not None, BLOCK=BLOCK,
        num_warps=NUM_WARPS)
    return gx


# ---------------------------------------------------------------------------------------------
# What compile_check builds: every configuration the launchers produce.

_STRIDES = ("n", "c", "h", "w", "d")


def compile_specs():
    specs = []
    for dt in ("fp32", "bf16", "fp16"):
        op = "fp64" if dt == "fp64" else "fp32"
        for pool_w in (True, False):
            for copy in (True, False):
                sig = {"x_ptr": f"*{dt}", "out_ptr": f"*{dt}", "pooled_ptr": f"*{dt}", "arg_ptr": "*i8", "C": "i32",
                       "h0": "i32", "w0": "i32", "D": "i32", "out_c0": "i32"}
                sig.update({f"sx{k}": "i32" for k in _STRIDES})
                sig.update({f"so{k}": "i32" for k in _STRIDES})
                name = f"{dt}-{'3d' if pool_w else '2d'}-{'concat' if copy else 'psp'}"
                specs.append((name, pyramid_pool_pool0_kernel, sig,
                              dict(S=8, SW=8 if pool_w else 1, COPY=copy, BLOCK=BLOCK), NUM_WARPS))
            for level in (1, 2, 3):
                sp = 8 << (level - 1)
                sig = {"pin_ptr": f"*{dt}", "ain_ptr": "*i8" if level == 1 else "*i16", "pout_ptr": f"*{dt}",
                       "aout_ptr": "*i16", "hi": "i32", "wi": "i32", "ho": "i32", "wo": "i32", "D": "i32"}
                specs.append((f"{dt}-{'3d' if pool_w else '2d'}-level{level}", pyramid_pool_coarsen_kernel, sig,
                              dict(SP=sp, SWP=sp if pool_w else 1, CW=2 if pool_w else 1, BLOCK=BLOCK), NUM_WARPS))
            for levels in (1, 2, 3, 4):
                for has_id in (True, False):
                    sig = {"gid_ptr": f"*{dt}", "gx_ptr": f"*{dt}", "C": "i32", "H": "i32", "W": "i32", "D": "i32"}
                    for k in range(4):
                        sig[f"gp{k}"] = f"*{op}"
                        sig[f"a{k}"] = "*i8" if k == 0 else "*i16"
                    sig.update({f"sg{k}": "i32" for k in _STRIDES})
                    sig.update({f"sx{k}": "i32" for k in _STRIDES})
                    name = f"{dt}-{'3d' if pool_w else '2d'}-L{levels}-{'concat' if has_id else 'psp'}"
                    specs.append((name, pyramid_pool_route_kernel, sig,
                                  dict(LEVELS=levels, POOL_W=pool_w, HAS_ID=has_id, BLOCK=BLOCK), NUM_WARPS))
        sig = {"pooled_ptr": f"*{dt}", "w_ptr": f"*{op}", "b_ptr": f"*{op}", "pp_ptr": f"*{op}", "C": "i32", "h": "i32",
               "w": "i32", "D": "i32"}
        for pad in (0, 1):
            specs.append((f"{dt}-pad{pad}", pyramid_pool_project_kernel, sig, dict(PAD=pad, BLOCK=BLOCK), NUM_WARPS))
        for mode in ("transpose", "linear", "nearest"):
            sig = {"pp_ptr": f"*{op}", "out_ptr": f"*{dt}", "ih_ptr": "*i64", "lh_ptr": f"*{op}", "iw_ptr": "*i64",
                   "lw_ptr": f"*{op}", "upw_ptr": f"*{op}", "upb_ptr": f"*{op}", "H": "i32", "W": "i32", "D": "i32",
                   "hp": "i32", "wp": "i32", "channel": "i32", "S": "i32", "SW": "i32"}
            sig.update({f"so{k}": "i32" for k in _STRIDES})
            specs.append((f"{dt}-{mode}", pyramid_pool_upsample_kernel, sig,
                          dict(LINEAR=mode == "linear", TRANSPOSE=mode == "transpose", BLOCK=BLOCK), NUM_WARPS))
    return specs
