"""Triton kernels of AH-Net's anisotropic 3D convolutions, with the preceding BatchNorm-apply + ReLU
fused into the operand load ("BN-ReLU on load").

Tensors are (N, C, H, W, D), D the slice axis; weights (Co, Ci, KH, KW, KD) with (KH, KW, KD) one of
(3, 3, 1), (1, 1, 3), (1, 1, 1); any stride and padding, groups 1, no dilation, no bias. The
convolution sees the operand a = relu(x * scale[c] + shift[c]) (fp32 math, fp64 for fp64) when a
scale/shift pair is given, else x; zero padding applies to a. Inputs are read through their strides
(a channel prefix ``buf[:, :C]`` of a concatenation buffer is read in place); only the small weight
is repacked. Kernel size, stride and padding are runtime arguments: one build per operand dtype,
tile and prologue on/off serves every geometry. Kernels, all implicit GEMMs with a tl.dot per
(tap, channel block); forward and input gradient are computed as (channels) x (positions) so that
the position-major tile, the one read through arbitrary strides, enters tl.dot untransposed:

- ``conv_fwd_kernel``: y[m, co] = sum over taps and ci of a[in(m, tap), ci] * w[co, ci, tap], m the
  N*Ho*Wo*Do output positions.
- ``conv_dgrad_kernel``: grad_a[p, ci] = sum over taps and co of grad_y[out(p, tap), co] *
  w[co, ci, tap], p the input positions. The programs take one stride-parity class of p each
  (h = rh + SH * i, ...), so whether a tap lands on an output position depends on the class alone:
  the taps that cannot contribute are skipped whole instead of being multiplied as masked zeros
  (3/4 of the 3x3 taps at stride 2).
- ``conv_wgrad_kernel``: grad_w[co, ci, tap] = sum over m of a[in(m, tap), ci] * grad_y[m, co],
  split over programs in fixed ranges of m (split-K) into a partials buffer that
  ``wgrad_reduce_kernel`` sums in a fixed order: no atomics, so bit-reproducible.

fp16/bf16 operands go into tl.dot in their own dtype with fp32 accumulation; fp32 operands in
"ieee" fp32 or "tf32"; fp64 in fp64 (used by the interpreted tests). Importing this module needs
triton; on CPU tensors it runs only when TRITON_INTERPRET=1 was set before the import.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ahnet_fast._layout import is_channels_last, opmath_dtype
from ahnet_fast.kernels.triton._launch import kernel, launch

NUM_WARPS = 4
KERNEL_SIZES = ((3, 3, 1), (1, 1, 3), (1, 1, 1))
PRECISIONS = ("ieee", "tf32")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Tiles by dot path: "mma" fp16/bf16 and "tf32" on tensor cores, both compiled for GPUs; "fma"
# exact fp32 and fp64 (tl.dot as a register-blocked FMA loop), which run only in the interpreter:
# on a GPU those convolve on cuDNN (ops/bn_relu_conv.py), since no FMA tile fits the registers under
# every supported Triton. Chosen so that every GPU build compiles and fits in registers without
# spilling on sm_80 and sm_90 under Triton 3.5-3.9 (scripts/compile_matrix.sh), not tuned on a
# GPU. Two constraints came from older Tritons: a dot's K must be >= 16 for fp32 operands before
# Triton 3.8 (3.8 accepts 8), and Triton 3.5/3.6 keep about twice the registers per tile that 3.8
# does, so the larger tiles run with 8 warps.
# (BLOCK_M positions, BLOCK_N output channels, BLOCK_K, warps) of the forward and input-gradient
# GEMMs, by the number of output channels (BLOCK_N 32 for the dense layers' 20 channels).
GEMM_TILES = {"mma": ((128, 32, 16, 8), (64, 64, 16, 8), (128, 64, 16, 8)),
              "tf32": ((128, 32, 16, 8), (128, 64, 16, 8), (64, 128, 16, 8)),
              "fma": ((32, 32, 16, 4),) * 3}
# (BLOCK_CI, BLOCK_CO, BLOCK_M, warps) of the weight-gradient GEMM (BLOCK_M is its K step).
WGRAD_TILES = {"mma": ((32, 32, 32, 4), (64, 32, 32, 4), (64, 64, 16, 4), (64, 128, 16, 8)),
               "tf32": ((32, 32, 32, 4), (32, 32, 32, 4), (64, 64, 16, 4), (64, 128, 16, 8)),
               "fma": ((32, 32, 16, 4),) * 4}
REDUCE_BLOCK = 512
WGRAD_TARGET_PROGRAMS = 1024  # enough programs to fill an H100 several times over
WGRAD_MAX_SPLITS = 256


@triton.jit
def _split_position(m, Ho, Wo, Do):
    """Sample and output coordinates of flattened positions m = ((n * Ho + ho) * Wo + wo) * Do + do."""
    do = m % Do
    t = m // Do
    wo = t % Wo
    t = t // Wo
    return t // Ho, t % Ho, wo, do


@triton.jit
def _operand_t(x_ptr, scale_ptr, shift_ptr, offs, mask, c, c_mask, sxc, PROLOGUE: tl.constexpr,
               OP_DTYPE: tl.constexpr):
    """The transposed operand tile (channels c on axis 0, positions at element offsets ``offs`` on
    axis 1): x, or relu(x * scale + shift) in the math precision; masked elements (padding, tails)
    are 0 after the prologue, as zero padding of a requires. Positions go on the last axis because
    Triton spreads a warp's threads along it: each thread then keeps a few position bases (int64)
    instead of one per row of the tile, and channel-first inputs load coalesced."""
    full = mask[None, :] & c_mask[:, None]
    v = tl.load(x_ptr + offs[None, :] + c[:, None].to(tl.int64) * sxc, mask=full, other=0)
    if PROLOGUE:
        sc = tl.load(scale_ptr + c, mask=c_mask, other=0)
        sh = tl.load(shift_ptr + c, mask=c_mask, other=0)
        a = tl.maximum(v.to(sc.dtype) * sc[:, None] + sh[:, None], 0)
        v = tl.where(full, a, 0)
    return v.to(OP_DTYPE)


@triton.jit
def _tap(tap, KW, KD):
    return tap // (KW * KD), (tap // KD) % KW, tap % KD


_GEOMETRY_ARGS = ("SH", "SW", "SD", "PH", "PW", "PD")


@kernel(do_not_specialize=("Ci", "Co", "H", "W", "D", "Ho", "Wo", "Do", "M") + _GEOMETRY_ARGS + ("KH", "KW", "KD"))
def conv_fwd_kernel(x_ptr, w_ptr, y_ptr, scale_ptr, shift_ptr, Ci, Co, H, W, D, Ho, Wo, Do, M,
                    sxn, sxc, sxh, sxw, sxd, syn, syc, syh, syw, syd, SH, SW, SD, PH, PW, PD, KH, KW, KD,
                    PROLOGUE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # w_ptr: the weight repacked as (KH * KW * KD, Co, Ci), contiguous, in the operand dtype. The
    # taps are a runtime loop: one compiled kernel for every kernel size, and a short body. The
    # product is computed transposed, y^T = w^T a^T, so that the position-major operand tile
    # enters tl.dot as loaded (a transposed left operand costs register shuffles and spills)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    op_dtype: tl.constexpr = w_ptr.dtype.element_ty
    acc_dtype: tl.constexpr = tl.float64 if op_dtype == tl.float64 else tl.float32
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < M
    n, ho, wo, do = _split_position(m, Ho, Wo, Do)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_mask = co < Co
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=acc_dtype)
    for tap in range(KH * KW * KD):
        kh, kw, kd = _tap(tap, KW, KD)
        h = ho * SH - PH + kh
        w = wo * SW - PW + kw
        d = do * SD - PD + kd
        valid = m_mask & (h >= 0) & (h < H) & (w >= 0) & (w < W) & (d >= 0) & (d < D)
        offs = n.to(tl.int64) * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw + d.to(tl.int64) * sxd
        w_tap = w_ptr + tap * Ci * Co
        for c0 in range(0, Ci, BLOCK_K):
            c = c0 + kk
            c_mask = c < Ci
            a_t = _operand_t(x_ptr, scale_ptr, shift_ptr, offs, valid, c, c_mask, sxc, PROLOGUE, op_dtype)
            w_t = tl.load(w_tap + co[:, None] * Ci + c[None, :], mask=co_mask[:, None] & c_mask[None, :], other=0)
            acc = tl.dot(w_t, a_t, acc, input_precision=PRECISION, out_dtype=acc_dtype)
    y_offs = n.to(tl.int64) * syn + ho.to(tl.int64) * syh + wo.to(tl.int64) * syw + do.to(tl.int64) * syd
    y_ptrs = y_ptr + y_offs[None, :] + co[:, None].to(tl.int64) * syc
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=co_mask[:, None] & m_mask[None, :])


@kernel(do_not_specialize=("Ci", "Co", "H", "W", "D", "Ho", "Wo", "Do", "Hc", "Wc", "Dc", "Mc") + _GEOMETRY_ARGS
        + ("KH", "KW", "KD"))
def conv_dgrad_kernel(g_ptr, w_ptr, dx_ptr, Ci, Co, H, W, D, Ho, Wo, Do, Hc, Wc, Dc, Mc,
                      sgn, sgc, sgh, sgw, sgd, sdn, sdc, sdh, sdw, sdd, SH, SW, SD, PH, PW, PD, KH, KW, KD,
                      PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    # w_ptr: the weight repacked as (KH * KW * KD, Ci, Co); computed transposed as the forward;
    # (Hc, Wc, Dc) = ceil((H, W, D) / stride),
    # the largest parity class, Mc = N * Hc * Wc * Dc
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    r = tl.program_id(2)
    op_dtype: tl.constexpr = w_ptr.dtype.element_ty
    acc_dtype: tl.constexpr = tl.float64 if op_dtype == tl.float64 else tl.float32
    rh = r // (SW * SD)
    rw = (r // SD) % SW
    rd = r % SD
    p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n, i, j, k = _split_position(p, Hc, Wc, Dc)
    h = rh + SH * i
    w = rw + SW * j
    d = rd + SD * k
    p_mask = (p < Mc) & (h < H) & (w < W) & (d < D)
    ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_mask = ci < Ci
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=acc_dtype)
    for tap in range(KH * KW * KD):
        kh, kw, kd = _tap(tap, KW, KD)
        # output index (h + PH - kh) / SH = qh / SH + i: integral for the whole class or for none of it
        qh = rh + PH - kh
        qw = rw + PW - kw
        qd = rd + PD - kd
        if (qh % SH == 0) & (qw % SW == 0) & (qd % SD == 0):
            oh = qh // SH + i
            ow = qw // SW + j
            od = qd // SD + k
            valid = p_mask & (oh >= 0) & (oh < Ho) & (ow >= 0) & (ow < Wo) & (od >= 0) & (od < Do)
            offs = n.to(tl.int64) * sgn + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw + od.to(tl.int64) * sgd
            w_tap = w_ptr + tap * Co * Ci
            for c0 in range(0, Co, BLOCK_K):
                c = c0 + kk
                c_mask = c < Co
                g_t = _operand_t(g_ptr, g_ptr, g_ptr, offs, valid, c, c_mask, sgc, False, op_dtype)
                w_t = tl.load(w_tap + ci[:, None] * Co + c[None, :], mask=ci_mask[:, None] & c_mask[None, :], other=0)
                acc = tl.dot(w_t, g_t, acc, input_precision=PRECISION, out_dtype=acc_dtype)
    dx_offs = n.to(tl.int64) * sdn + h.to(tl.int64) * sdh + w.to(tl.int64) * sdw + d.to(tl.int64) * sdd
    dx_ptrs = dx_ptr + dx_offs[None, :] + ci[:, None].to(tl.int64) * sdc
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=ci_mask[:, None] & p_mask[None, :])


@kernel(do_not_specialize=("Ci", "Co", "H", "W", "D", "Ho", "Wo", "Do", "M", "per_split") + _GEOMETRY_ARGS
        + ("KW", "KD"))
def conv_wgrad_kernel(x_ptr, g_ptr, part_ptr, scale_ptr, shift_ptr, Ci, Co, H, W, D, Ho, Wo, Do, M, per_split,
                      sxn, sxc, sxh, sxw, sxd, sgn, sgc, sgh, sgw, sgd, SH, SW, SD, PH, PW, PD, KW, KD,
                      PROLOGUE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_CI: tl.constexpr,
                      BLOCK_CO: tl.constexpr, BLOCK_M: tl.constexpr):
    # program (ci/co tile, tap, split): the partial sum over m in [split * per_split, + per_split)
    # of one tap, stored at part[split, co, ci, tap] (the layout of the weight)
    pid = tl.program_id(0)
    tap = tl.program_id(1)
    split = tl.program_id(2)
    op_dtype: tl.constexpr = g_ptr.dtype.element_ty
    acc_dtype: tl.constexpr = part_ptr.dtype.element_ty
    n_ci = tl.cdiv(Ci, BLOCK_CI)
    ci = (pid % n_ci) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    co = (pid // n_ci) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    ci_mask = ci < Ci
    co_mask = co < Co
    kh, kw, kd = _tap(tap, KW, KD)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, M)
    mm = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_CI, BLOCK_CO], dtype=acc_dtype)
    for m0 in range(lo, hi, BLOCK_M):
        m = m0 + mm
        m_mask = m < hi
        n, ho, wo, do = _split_position(m, Ho, Wo, Do)
        h = ho * SH - PH + kh
        w = wo * SW - PW + kw
        d = do * SD - PD + kd
        valid = m_mask & (h >= 0) & (h < H) & (w >= 0) & (w < W) & (d >= 0) & (d < D)
        x_offs = n.to(tl.int64) * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw + d.to(tl.int64) * sxd
        a_t = _operand_t(x_ptr, scale_ptr, shift_ptr, x_offs, valid, ci, ci_mask, sxc, PROLOGUE, op_dtype)
        g_offs = n.to(tl.int64) * sgn + ho.to(tl.int64) * sgh + wo.to(tl.int64) * sgw + do.to(tl.int64) * sgd
        g_t = _operand_t(g_ptr, g_ptr, g_ptr, g_offs, m_mask, co, co_mask, sgc, False, op_dtype)
        acc = tl.dot(a_t, tl.trans(g_t), acc, input_precision=PRECISION, out_dtype=acc_dtype)
    taps = tl.num_programs(1)
    size = Co * Ci * taps
    dst = part_ptr + split.to(tl.int64) * size + (co[None, :] * Ci + ci[:, None]) * taps + tap
    tl.store(dst, acc, mask=ci_mask[:, None] & co_mask[None, :])


@kernel(do_not_specialize=("size", "SPLITS"))
def wgrad_reduce_kernel(part_ptr, out_ptr, size, SPLITS, BLOCK: tl.constexpr):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = e < size
    acc = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
    for s in range(SPLITS):  # always split 0, 1, 2, ...: the same sum every run
        acc += tl.load(part_ptr + s * size + e, mask=mask, other=0)
    tl.store(out_ptr + e, acc, mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers.


def _triple(v, what):
    v = (v,) * 3 if isinstance(v, int) else tuple(int(t) for t in v)
    if len(v) != 3:
        raise ValueError(f"{what} must be an int or 3 ints, got {v}")
    return v


def _check_geometry(stride, padding):
    stride, padding = _triple(stride, "stride"), _triple(padding, "padding")
    if min(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if min(padding) < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    return stride, padding


def _check_kernel(weight_shape):
    weight_shape = tuple(weight_shape)
    if len(weight_shape) != 5:
        raise ValueError(f"weight must be 5D (Co, Ci, KH, KW, KD), got shape {weight_shape}")
    if weight_shape[2:] not in KERNEL_SIZES:
        raise ValueError(f"kernel size {weight_shape[2:]} not supported (one of {KERNEL_SIZES})")
    return weight_shape


def _check_tensor(t, what, dtype=None, device=None):
    if t.dim() != 5:
        raise ValueError(f"{what} must be 5D (N, C, H, W, D), got {t.dim()}D")
    if t.dtype not in DTYPES:
        raise ValueError(f"{what}: dtype {t.dtype} not supported (float16, bfloat16, float32, float64)")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{what}: dtype {t.dtype} differs from {dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{what} is on {t.device}, expected {device}")


def _output_sizes(in_sizes, kernel, stride, padding):
    out = tuple((i + 2 * p - k) // s + 1 for i, k, s, p in zip(in_sizes, kernel, stride, padding))
    if min(out) < 1:
        raise ValueError(f"input spatial size {tuple(in_sizes)} too small for kernel {tuple(kernel)}, "
                         f"stride {stride}, padding {padding}")
    return out


def _prologue(x, scale, shift):
    """(scale, shift, on): contiguous vectors in the math precision, or dummies when off."""
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift must be given together")
    sd = opmath_dtype(x.dtype)
    if scale is None:
        dummy = torch.empty(1, dtype=sd, device=x.device)
        return dummy, dummy, False
    c = x.shape[1]
    for t, what in ((scale, "scale"), (shift, "shift")):
        if t.shape != (c,):
            raise ValueError(f"{what} must have shape ({c},), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{what} is on {t.device}, expected {x.device}")
    return scale.to(sd).contiguous(), shift.to(sd).contiguous(), True


def _precision(dtype, precision):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    # TF32 only exists for fp32 operands; one code path (and compile_check entry) for the others
    return precision if dtype == torch.float32 else "ieee"


def _path(dtype, precision):
    if dtype in (torch.float16, torch.bfloat16):
        return "mma"
    return "tf32" if precision == "tf32" else "fma"


def _gemm_tile(n_cols, path):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps) for a GEMM with n_cols output channels."""
    tiles = GEMM_TILES[path]
    return tiles[0] if n_cols <= 32 else tiles[1] if n_cols <= 64 else tiles[2]


def _wgrad_tile(ci, co, path):
    tiles = WGRAD_TILES[path]
    if co <= 32:
        return tiles[0] if ci <= 32 else tiles[1]
    return tiles[2] if co <= 64 else tiles[3]


def _output(ref, shape, dtype):
    """Channel-first contiguous, or channels_last_3d when ``ref`` is."""
    fmt = torch.channels_last_3d if is_channels_last(ref) else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=ref.device, memory_format=fmt)


def conv_forward(x, weight, scale, shift, stride, padding, precision="ieee"):
    """y = conv3d(a, weight, stride, padding), a = relu(x * scale + shift) (or x when scale is None)."""
    _check_tensor(x, "x")
    co, ci, kh, kw, kd = _check_kernel(weight.shape)
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, expected {x.device}")
    if ci != x.shape[1]:
        raise ValueError(f"weight expects {ci} input channels, x has {x.shape[1]}")
    stride, padding = _check_geometry(stride, padding)
    prec = _precision(x.dtype, precision)
    scale, shift, on = _prologue(x, scale, shift)
    n, _, h, w, d = x.shape
    ho, wo, do = _output_sizes((h, w, d), (kh, kw, kd), stride, padding)
    y = _output(x, (n, co, ho, wo, do), x.dtype)
    m = n * ho * wo * do
    if m == 0 or co == 0:
        return y
    # the weight is small: repack it as (tap, co, ci) in the operand dtype
    wp = weight.detach().to(x.dtype).permute(2, 3, 4, 0, 1).contiguous()
    bm, bn, bk, warps = _gemm_tile(co, _path(x.dtype, prec))
    grid = (triton.cdiv(m, bm), triton.cdiv(co, bn))
    launch(conv_fwd_kernel, grid, x, wp, y, scale, shift, ci, co, h, w, d, ho, wo, do, m, *x.stride(), *y.stride(),
           *stride, *padding, kh, kw, kd, PROLOGUE=on, PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
           num_warps=warps)
    return y


def conv_input_grad(grad_y, weight, input_shape, stride, padding, precision="ieee"):
    """Gradient of conv3d(a, weight) w.r.t. a, of shape ``input_shape`` and grad_y's dtype."""
    _check_tensor(grad_y, "grad_y")
    co, ci, kh, kw, kd = _check_kernel(weight.shape)
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 5:
        raise ValueError(f"input_shape must have 5 sizes, got {input_shape}")
    if weight.device != grad_y.device:
        raise ValueError(f"weight is on {weight.device}, expected {grad_y.device}")
    if input_shape[1] != ci:
        raise ValueError(f"weight expects {ci} input channels, input_shape has {input_shape[1]}")
    stride, padding = _check_geometry(stride, padding)
    prec = _precision(grad_y.dtype, precision)
    n, _, h, w, d = input_shape
    ho, wo, do = _output_sizes((h, w, d), (kh, kw, kd), stride, padding)
    if tuple(grad_y.shape) != (n, co, ho, wo, do):
        raise ValueError(f"grad_y has shape {tuple(grad_y.shape)}, expected {(n, co, ho, wo, do)}")
    dx = _output(grad_y, input_shape, grad_y.dtype)
    if dx.numel() == 0:
        return dx
    if co == 0:
        return dx.zero_()
    wp = weight.detach().to(grad_y.dtype).permute(2, 3, 4, 1, 0).contiguous()  # (tap, ci, co)
    hc, wc, dc = (triton.cdiv(s, t) for s, t in zip((h, w, d), stride))
    mc = n * hc * wc * dc
    bm, bn, bk, warps = _gemm_tile(ci, _path(grad_y.dtype, prec))
    grid = (triton.cdiv(mc, bm), triton.cdiv(ci, bn), stride[0] * stride[1] * stride[2])
    launch(conv_dgrad_kernel, grid, grad_y, wp, dx, ci, co, h, w, d, ho, wo, do, hc, wc, dc, mc, *grad_y.stride(),
           *dx.stride(), *stride, *padding, kh, kw, kd, PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
           num_warps=warps)
    return dx


def _wgrad_splits(m, tiles, block_m):
    """A fixed split of the m range (a function of the shape only): per_split, splits."""
    blocks = triton.cdiv(m, block_m)
    want = max(1, min(WGRAD_MAX_SPLITS, triton.cdiv(WGRAD_TARGET_PROGRAMS, tiles), blocks // 4))
    per = triton.cdiv(blocks, want) * block_m
    return per, triton.cdiv(m, per)


def conv_weight_grad(x, grad_y, scale, shift, weight_shape, stride, padding, precision="ieee"):
    """Gradient of conv3d(a, weight) w.r.t. weight (a recomputed from x), in fp32 (fp64 for fp64)."""
    _check_tensor(x, "x")
    _check_tensor(grad_y, "grad_y", dtype=x.dtype, device=x.device)
    co, ci, kh, kw, kd = _check_kernel(weight_shape)
    if ci != x.shape[1]:
        raise ValueError(f"weight_shape expects {ci} input channels, x has {x.shape[1]}")
    stride, padding = _check_geometry(stride, padding)
    prec = _precision(x.dtype, precision)
    scale, shift, on = _prologue(x, scale, shift)
    n, _, h, w, d = x.shape
    ho, wo, do = _output_sizes((h, w, d), (kh, kw, kd), stride, padding)
    if tuple(grad_y.shape) != (n, co, ho, wo, do):
        raise ValueError(f"grad_y has shape {tuple(grad_y.shape)}, expected {(n, co, ho, wo, do)}")
    acc_dtype = opmath_dtype(x.dtype)
    out = torch.empty(weight_shape, dtype=acc_dtype, device=x.device)
    m = n * ho * wo * do
    if out.numel() == 0:
        return out
    if m == 0:
        return out.zero_()
    bci, bco, bm, warps = _wgrad_tile(ci, co, _path(x.dtype, prec))
    taps = kh * kw * kd
    tiles = triton.cdiv(ci, bci) * triton.cdiv(co, bco)
    per, splits = _wgrad_splits(m, tiles * taps, bm)
    part = torch.empty((splits, out.numel()), dtype=acc_dtype, device=x.device)
    launch(conv_wgrad_kernel, (tiles, taps, splits), x, grad_y, part, scale, shift, ci, co, h, w, d, ho, wo, do, m,
           per, *x.stride(), *grad_y.stride(), *stride, *padding, kw, kd, PROLOGUE=on, PRECISION=prec,
           BLOCK_CI=bci, BLOCK_CO=bco, BLOCK_M=bm, num_warps=warps)
    size = out.numel()
    launch(wgrad_reduce_kernel, (triton.cdiv(size, REDUCE_BLOCK),), part, out, size, splits, BLOCK=REDUCE_BLOCK,
           num_warps=NUM_WARPS)
    return out


# ---------------------------------------------------------------------------------------------
# What compile_check builds.

def _variants():
    """(name, dtype string, precision) of every operand precision the launchers use on a GPU: TF32
    for fp32 (exact fp32 and fp64 convolve on cuDNN there, see ops/bn_relu_conv.py), bf16, fp16."""
    return (("fp32-tf32", "fp32", "tf32"), ("bf16", "bf16", "ieee"), ("fp16", "fp16", "ieee"))


def _ints(*names):
    return {k: "i32" for k in names}


def compile_specs():
    """One entry per (kernel, operand dtype and dot precision, tile, prologue on/off); the kernel
    size, stride and padding are runtime arguments, so one build serves 3x3x1, 1x1x3 and 1x1x1.
    Integers are i32, as Triton types them at launch (sizes and strides below 2**31)."""
    specs = []
    strides = lambda p: _ints(*(f"s{p}{a}" for a in "nchwd"))  # noqa: E731
    for vname, dt, prec in _variants():
        path = _path({"fp32": torch.float32, "fp64": torch.float64}.get(dt, torch.float16), prec)
        math = "fp64" if dt == "fp64" else "fp32"
        geometry = _ints(*_GEOMETRY_ARGS, "KH", "KW", "KD")
        for bm, bn, bk, warps in dict.fromkeys(GEMM_TILES[path]):
            tile = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
            for on in (True, False):
                sig = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "y_ptr": f"*{dt}", "scale_ptr": f"*{math}",
                       "shift_ptr": f"*{math}", **_ints("Ci", "Co", "H", "W", "D", "Ho", "Wo", "Do", "M"),
                       **strides("x"), **strides("y"), **geometry}
                specs.append((f"{vname}-{bm}x{bn}x{bk}-w{warps}-{'bnrelu' if on else 'plain'}", conv_fwd_kernel, sig,
                              dict(PROLOGUE=on, PRECISION=prec, **tile), warps))
            sig = {"g_ptr": f"*{dt}", "w_ptr": f"*{dt}", "dx_ptr": f"*{dt}",
                   **_ints("Ci", "Co", "H", "W", "D", "Ho", "Wo", "Do", "Hc", "Wc", "Dc", "Mc"),
                   **strides("g"), **strides("d"), **geometry}
            specs.append((f"{vname}-{bm}x{bn}x{bk}-w{warps}", conv_dgrad_kernel, sig, dict(PRECISION=prec, **tile),
                          warps))
        for bci, bco, bm, warps in dict.fromkeys(WGRAD_TILES[path]):
            for on in (True, False):
                sig = {"x_ptr": f"*{dt}", "g_ptr": f"*{dt}", "part_ptr": f"*{math}", "scale_ptr": f"*{math}",
                       "shift_ptr": f"*{math}",
                       **_ints("Ci", "Co", "H", "W", "D", "Ho", "Wo", "Do", "M", "per_split"),
                       **strides("x"), **strides("g"), **_ints(*_GEOMETRY_ARGS, "KW", "KD")}
                specs.append((f"{vname}-{bci}x{bco}x{bm}-w{warps}-{'bnrelu' if on else 'plain'}", conv_wgrad_kernel,
                              sig, dict(PROLOGUE=on, PRECISION=prec, BLOCK_CI=bci, BLOCK_CO=bco, BLOCK_M=bm), warps))
    specs.append(("fp32", wgrad_reduce_kernel, {"part_ptr": "*fp32", "out_ptr": "*fp32", "size": "i32", "SPLITS": "i32"},
                  dict(BLOCK=REDUCE_BLOCK), NUM_WARPS))
    return specs
