"""channel_mm: out (+)= weight @ act(x), the matrix product inside AH-Net's CPU convolutions.

A convolution path that is a matrix product over channels (the 1x1x1 convolutions, every tap of a
3x3x1 / 1x1x3 one at once in the ``shift`` path, a transposed convolution before its pixel shuffle,
and their input gradients) multiplies a small weight matrix (M = 20 to 2048 output rows, K input
channels) by a channel-first map viewed as (K, N), N = the voxels of a band or map. ``torch.mm``
sends these to MKL, which on AMD CPUs runs its AVX2 code: about half of what AVX-512 does.
``ahnet_fast::channel_mm_`` (csrc/cpu/channel_mm*.cpp) is a register-blocked AVX-512 kernel for this
shape, which can also apply a BatchNorm-ReLU to x as it reads it (``scale``, ``shift``: the
activation is never written out). ``benchmarks/bench_channel_mm.py`` compares it with torch.mm.

``ahnet_fast::channel_mm_conv_`` is the same kernel over a convolution's taps (stride 1, the size kept:
AH-Net's 3x3x1 and 1x1x3): row c * T + t of its panel is channel c read at tap t's offset, zero
where the tap leaves the map, so the convolution is one (Co, Ci * T) product with nothing written
but the output (:func:`conv_batched`, which the shift path's forward takes). Its gradients
(:func:`conv_backward`) need no shifted copy of the output gradient: the input gradient is the same
kernel with the weight flipped, the weight gradient ``ahnet_fast::channel_mm_nt_conv_`` (the
weight-gradient kernel with the output gradient's rows read at each tap's offset).

:func:`mm_into` is the one entry: the ``cpp`` kernel where it runs (CPU, float32, AVX-512, rows
contiguous, no autograd or autocast to respect), else ``torch.mm`` / ``addmm_`` on the activated x
(the reference). The choice is always ``auto``: forcing a backend on the ops that call it (``cpp``)
must not fail on a CPU without AVX-512, where torch.mm is the CPU path. No Triton kernel: on CUDA
the products are cuBLAS's (torch.mm), which is what a kernel of ours would have to beat.
"""
from __future__ import annotations

import math

import torch

from ahnet_fast import backends
from ahnet_fast._extension import extension_available
from ahnet_fast._layout import trailing_contiguous
from ahnet_fast.ops._registry import cpp_kernel_reasons, gpu_composition_reasons, note_compiled_kernels

__all__ = ["channel_mm_conv_reference", "channel_mm_reference", "channel_mm_nt_reference", "conv_backward",
           "conv_backward_takes", "conv_batched", "conv_into", "conv_takes",
           "kernel_isa", "kernel_takes", "mm", "mm_batched", "mm_into", "mm_nt", "mm_nt_into"]


def channel_mm_reference(weight: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None = None,
                         shift: torch.Tensor | None = None) -> torch.Tensor:
    """weight @ act(x), act(v) = relu(v * scale[k] + shift[k]) per row k of x, or v."""
    return weight @ _activated(x, scale, shift)


def _activated(x, scale, shift):
    if scale is None:
        return x
    return torch.relu(x * scale.view(-1, 1) + shift.view(-1, 1))


_isa: str | None = None


def kernel_isa() -> str | None:
    """The variant ``ahnet_fast::channel_mm_`` runs on this CPU ("avx512", "avx2" or "baseline", the
    last two being ATen's mm), or None without the compiled extension. Read once: the C++ side reads
    AHNET_FAST_NO_AVX512 / AHNET_FAST_NO_AVX2 once too."""
    global _isa
    if _isa is None and extension_available():
        _isa = torch.ops.ahnet_fast.channel_mm_isa()
    return _isa


def kernel_takes(t: torch.Tensor) -> bool:
    """Whether the kernels take float32 products of tensors like ``t`` here (the conditions of the
    dispatch that depend on neither shapes nor autograd): a CPU tensor, float32, an AVX-512 CPU, CPU
    autocast off. The convolution paths decide on it what to hand the kernels."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and kernel_isa() == "avx512" \
        and not torch.is_autocast_enabled("cpu")


_KERNELS = {"mm": "channel_mm_", "nt": "channel_mm_nt_", "conv": "channel_mm_conv_", "nt_conv": "channel_mm_nt_conv_"}


def _cpp_reasons(out, weight, x, scale, shift, accumulate, kind="mm") -> list[str]:
    """Why the kernel cannot take this product. ``kind`` "mm": out (+)= weight @ act(x) (channel_mm_);
    "nt": out (+)= weight @ x^T (channel_mm_nt_: weight the output gradient, x the input); "conv": the
    convolution of channel_mm_conv_, weight its (Co, Ci * taps) matrix, x the (Ci, voxels) map; "nt_conv":
    that convolution's weight gradient (channel_mm_nt_conv_), weight the output gradient (Co, voxels),
    x the input map (Ci, voxels), out (Co, Ci * taps)."""
    transposed = kind in ("nt", "nt_conv")
    reasons = cpp_kernel_reasons(_KERNELS[kind], x.device)
    if reasons:
        return reasons
    if kernel_isa() != "avx512":
        reasons.append(f"the kernel is written for AVX-512 and this CPU runs the {kernel_isa()} variant (no "
                       "AVX-512 F/BW/VL/DQ, or AHNET_FAST_NO_AVX512 / AHNET_FAST_NO_AVX2 set): torch.mm is as fast")
    tensors = [out, weight, x] + ([scale, shift] if scale is not None else [])
    if any(t.dtype != torch.float32 for t in tensors):
        reasons.append("the kernel is float32 only (" + ", ".join(str(t.dtype) for t in tensors) + ")")
    rows = (out, weight, x) if transposed else (out, x)
    if any(t.shape[1] > 1 and t.stride(1) != 1 for t in rows):
        reasons.append("the operands' rows must be contiguous (strides "
                       + ", ".join(str(tuple(t.stride())) for t in rows) + ")")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        reasons.append("an input requires grad: the kernel writes into out (mm() differentiates it)")
    if torch.is_autocast_enabled("cpu"):
        reasons.append("CPU autocast is on: torch.mm casts its operands, the kernel would not")
    reasons += _transform_reasons()
    return reasons


def _transform_reasons() -> list[str]:
    """torch.func transforms (vmap, grad, jvp) and forward-mode AD see through torch.mm, not through
    the kernel (a custom op without batching or forward-gradient rules)."""
    if torch._C._are_functorch_transforms_active():
        return ["a torch.func transform is active: torch.mm has its rules, the kernel none"]
    if torch.autograd.forward_ad._current_level >= 0:
        return ["forward-mode AD is active: torch.mm has its rule, the kernel none"]
    return []


# Below these the kernel loses to MKL (benchmarks/bench_channel_mm.py): a register block is 48 columns
# wide, so a map of 16 voxels (up0's transposed convolution) fills a third of its lanes while the
# whole weight streams through for them; and a tiny product is all call overhead.
MIN_COLUMNS = 64
MIN_MULTIPLY_ADDS = 1 << 16


def _slower_reasons(out, weight, x, scale, shift, accumulate, kind="mm") -> list[str]:
    reasons = []
    if kind == "conv" and weight.shape[0] < CONV_MIN_OUTPUTS:
        reasons.append(f"{weight.shape[0]} < {CONV_MIN_OUTPUTS} output channels: the taps' panel costs more than "
                       "its products (the shift path's one product over every tap is faster)")
    if kind == "nt_conv" and out.shape[0] < CONV_MIN_OUTPUTS:
        reasons.append(f"{out.shape[0]} < {CONV_MIN_OUTPUTS} output channels: too few rows of the output gradient "
                       "per tap block (the shift path's product over copies of it is faster)")
    if kind in ("nt", "nt_conv"):
        if x.shape[1] < NT_MIN_LENGTH:
            reasons.append(f"a reduction over {x.shape[1]} < {NT_MIN_LENGTH} voxels: MKL's torch.mm is faster")
        if out.shape[0] * out.shape[1] > NT_MAX_OUTPUTS:
            reasons.append(f"{out.shape[0]} x {out.shape[1]} outputs: the chunk of x leaves L2, MKL's torch.mm "
                           "is faster")
        return reasons
    if x.shape[1] < MIN_COLUMNS:
        reasons.append(f"{x.shape[1]} columns, fewer than {MIN_COLUMNS}: MKL's torch.mm is faster")
    if weight.shape[0] * weight.shape[1] * x.shape[1] < MIN_MULTIPLY_ADDS:
        reasons.append("a product this small is call overhead either way")
    return reasons


# channel_mm_nt_ keeps a block's rows of the chunk in L1 and x's chunk (K rows of 2048 voxels) in L2:
# past 2^16 output elements that chunk spills to L3 and MKL is faster (1024 x 512 outputs over 1024
# voxels: 0.7x); over a short reduction the per-chunk sums dominate.
NT_MIN_LENGTH = 256
NT_MAX_OUTPUTS = 1 << 16


# channel_mm_conv_ builds a Ci * taps x 48 panel per column block for the products of all output channels:
# with fewer than 8 (one register block) the packing is most of the work (the final 3-class 3x3x1
# convolution: 86 GFLOP/s against the shift path's 27-row product at twice that).
CONV_MIN_OUTPUTS = 8


# One table for the three kernels: the reasons take (out, weight, x, scale, shift, accumulate[, kind]).
IMPLEMENTATIONS = backends.register("channel_mm", (
    backends.Implementation("reference", lambda *a: [], runs="torch.mm / addmm_ on the activated x (or x^T); a convolution: "
                                                           "the caller's own path (conv_batched answers None)"),
    backends.Implementation("cpp", _cpp_reasons, _slower_reasons,
                            runs="ahnet_fast::channel_mm_ / channel_mm_nt_ / channel_mm_conv_, the AVX-512 kernels "
                                 "(csrc/cpu/channel_mm*.cpp)"),
    backends.Implementation("triton", lambda out, weight, x, *rest: gpu_composition_reasons(x.device),
                            runs="torch.mm (cuBLAS) on the activated x: no kernel of ours on GPUs"),
))


def mm_into(out: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, *, scale: torch.Tensor | None = None,
            shift: torch.Tensor | None = None, accumulate: bool = False, backend: str = "auto") -> torch.Tensor:
    """out = weight @ act(x), or out += weight @ act(x) with ``accumulate``; returns out. weight (M, K),
    x (K, N), out (M, N), not overlapping; act as in :func:`channel_mm_reference`. ``backend``:
    "auto" (the ops' products always choose: a backend forced on an op must not reach its inner
    products), or one forced, for the tests."""
    if weight.dim() != 2 or x.dim() != 2 or out.dim() != 2 or weight.shape[1] != x.shape[0] \
            or tuple(out.shape) != (weight.shape[0], x.shape[1]):
        raise ValueError(f"channel_mm: shapes do not chain: weight {tuple(weight.shape)}, x {tuple(x.shape)}, "
                         f"out {tuple(out.shape)}")
    if (scale is None) != (shift is None):
        raise ValueError("channel_mm: give scale and shift together")
    args = (out, weight, x, scale, shift, accumulate)
    if backends.select("channel_mm", IMPLEMENTATIONS, x.device, args, explicit=backend) == "cpp":
        torch.ops.ahnet_fast.channel_mm_(out, weight, x, scale, shift, accumulate)
        return out
    act = _activated(x, scale, shift)
    if accumulate:
        return out.addmm_(weight, act)
    return torch.mm(weight, act, out=out)


class _Product(torch.autograd.Function):
    """weight @ x on the kernel, differentiable: the input gradient weight^T @ grad and the weight
    gradient grad @ x^T on the kernels too where they run (mm, mm_nt). Only reached where the
    kernel was chosen for the operands (no torch.func transform, no forward-mode AD)."""

    @staticmethod
    def forward(ctx, weight, x):
        out = x.new_empty((weight.shape[0], x.shape[1]))
        torch.ops.ahnet_fast.channel_mm_(out, weight, x, None, None, False)
        ctx.save_for_backward(weight, x)
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, x = ctx.saved_tensors
        grad_w = mm_nt(grad, x) if ctx.needs_input_grad[0] else None
        grad_x = mm(weight.t(), grad) if ctx.needs_input_grad[1] else None
        return grad_w, grad_x


def mm(weight: torch.Tensor, x: torch.Tensor, *, scale: torch.Tensor | None = None,
       shift: torch.Tensor | None = None) -> torch.Tensor:
    """weight @ act(x) in a new tensor: the kernel where it runs (differentiable without ``scale``:
    the forward and both gradients on the kernels), else exactly ``weight @ act(x)`` (autograd,
    autocast and dtype promotion as torch.mm has them)."""
    if x.dim() == 2 and weight.dim() == 2:
        differentiable = scale is None and torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)
        # the choice is made on a stand-in for out (no memory), and with a gradient to come on the
        # operands' values (autograd is then _Product's)
        probe = x.new_empty((weight.shape[0], x.shape[1]), device="meta")
        args = (probe, weight.detach(), x.detach(), scale, shift, False) if differentiable else \
            (probe, weight, x, scale, shift, False)
        if backends.select("channel_mm", IMPLEMENTATIONS, x.device, args, explicit="auto") == "cpp":
            if differentiable:
                return _Product.apply(weight, x)
            out = x.new_empty((weight.shape[0], x.shape[1]))
            torch.ops.ahnet_fast.channel_mm_(out, weight, x, scale, shift, False)
            return out
    return weight @ _activated(x, scale, shift)


def mm_batched(weight: torch.Tensor, x: torch.Tensor, *, scale: torch.Tensor | None = None,
               shift: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """weight @ act(x[n]) for every n of a batch x (N, K, S) (torch.matmul would fold the batch into
    rows by copying x transposed), into ``out`` (N, M, S) when given; act as in :func:`mm_into`.
    Without autograd or autocast, one product per sample whichever runs it, as with ``scale`` or
    ``out`` always (so that a convolution unit fused or not gives the same bits)."""
    if out is None and scale is None:
        if x.shape[0] == 1:  # squeeze, not x[0]: select's backward would fill a zero tensor and copy into it
            return mm(weight, x.squeeze(0)).unsqueeze(0)
        plain = x.shape[0] > 0 and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)) \
            and not torch.is_autocast_enabled("cpu") and weight.dtype == x.dtype
        if not plain:
            return torch.bmm(weight.expand(x.shape[0], -1, -1), x)
    if out is None:
        out = x.new_empty((x.shape[0], weight.shape[0], x.shape[2]))
    for i in range(x.shape[0]):
        mm_into(out[i], weight, x[i], scale=scale, shift=shift)
    return out


# ---------------------------------------------------------------------------------------------
# channel_mm_nt: out (+)= a @ b^T over the voxels, a convolution's weight gradient


def channel_mm_nt_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b^T: a (M, L) an output gradient, b (K, L) the input, L the voxels."""
    return a @ b.t()


def mm_nt_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool = False,
               backend: str = "auto") -> torch.Tensor:
    """out = a @ b^T (or out += with ``accumulate``); returns out. a (M, L), b (K, L), out (M, K). The
    choice is "auto" as for :func:`mm_into`."""
    if a.dim() != 2 or b.dim() != 2 or out.dim() != 2 or a.shape[1] != b.shape[1] \
            or tuple(out.shape) != (a.shape[0], b.shape[0]):
        raise ValueError(f"channel_mm_nt: shapes do not chain: a {tuple(a.shape)}, b {tuple(b.shape)}, "
                         f"out {tuple(out.shape)}")
    if backends.select("channel_mm", IMPLEMENTATIONS, b.device, (out, a, b, None, None, accumulate, "nt"),
                       explicit=backend) == "cpp":
        torch.ops.ahnet_fast.channel_mm_nt_(out, a, b, accumulate)
        return out
    if accumulate:
        return out.addmm_(a, b.t())
    return torch.mm(a, b.t(), out=out)


def mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b^T in a new tensor: the kernel where it runs, else exactly ``a @ b.t()``."""
    if a.dim() == 2 and b.dim() == 2:
        probe = b.new_empty((a.shape[0], b.shape[0]), device="meta")  # the choice needs no memory
        if backends.select("channel_mm", IMPLEMENTATIONS, b.device, (probe, a, b, None, None, False, "nt"),
                           explicit="auto") == "cpp":
            out = b.new_empty((a.shape[0], b.shape[0]))
            torch.ops.ahnet_fast.channel_mm_nt_(out, a, b, False)
            return out
    return a @ b.t()


# ---------------------------------------------------------------------------------------------
# channel_mm_conv: a stride-1, size-keeping convolution of act(x) without its taps' maps


def channel_mm_conv_reference(weight: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None = None,
                           shift: torch.Tensor | None = None) -> torch.Tensor:
    """conv(act(x), weight), stride 1, zero padding (k - 1) / 2 per axis: x (N, Ci, *spatial), weight
    (Co, Ci, *kernel) with odd sizes; act as in :func:`channel_mm_reference`, per channel."""
    nd = x.dim() - 2
    act = x if scale is None else torch.relu(x * scale.view(1, -1, *[1] * nd) + shift.view(1, -1, *[1] * nd))
    conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)[nd - 1]
    return conv(act, weight, padding=[(k - 1) // 2 for k in weight.shape[2:]])


def _conv_args(out, weight, x, scale, shift, accumulate):
    """The dispatch's view of one sample's convolution: weight as its (Co, Ci * taps) matrix, x as
    (Ci, voxels); out stays (Co, voxels)."""
    return (out, weight.reshape(weight.shape[0], math.prod(weight.shape[1:])), x.flatten(1), scale, shift, accumulate,
            "conv")


def conv_batched(weight: torch.Tensor, x: torch.Tensor, *, scale: torch.Tensor | None = None,
                 shift: torch.Tensor | None = None) -> torch.Tensor | None:
    """conv(act(x[n]), weight) for every sample of x (N, Ci, *spatial) on channel_mm_conv_ (stride 1,
    the size kept: AH-Net's 3x3x1 and 1x1x3 convolutions), a new (N, Co, *spatial) tensor; None where
    the dispatch does not choose the kernel for these operands (the caller then computes the
    convolution its own way). x's spatial axes must be one contiguous block per channel (a band of
    rows of a map qualifies); the tap panel reads them in place, so no tap's map is ever written."""
    if not _conv_fits(weight, x) or backends.select("channel_mm", IMPLEMENTATIONS, x.device, _conv_args(
            _conv_probe(weight, x), weight, x[0], scale, shift, False), explicit="auto") != "cpp":
        return None
    spatial = list(x.shape[2:])
    voxels = math.prod(spatial)
    weight = weight.contiguous()
    out = x.new_empty((x.shape[0], weight.shape[0], *spatial))
    for i in range(x.shape[0]):
        torch.ops.ahnet_fast.channel_mm_conv_(out[i].view(weight.shape[0], voxels), weight, x[i].flatten(1), spatial,
                                           scale, shift, False)
    return out


def conv_takes(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether :func:`conv_batched` would run the kernel for a batch like x (N, Ci, *spatial) and this
    weight, a gradient to come or not (a convolution path's rule decides on it once per shape, for
    calls inside autograd functions, whose forwards see no gradient)."""
    if not _conv_fits(weight, x):
        return False
    args = _conv_args(_conv_probe(weight, x), weight.detach(), x[0].detach(), None, None, False)
    return backends.explain("channel_mm", x.device, *args, explicit="auto")["chosen"] == "cpp"


def conv_backward_takes(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether :func:`conv_backward` would run both gradient kernels for a batch like x and this weight
    (as :func:`conv_takes`, for a convolution path's rule)."""
    if not _conv_fits(weight, x):
        return False
    rows = x[0].detach().flatten(1)
    # a stand-in with the shape, device and row layout of one sample's output gradient
    grad_rows = rows[:1].expand(weight.shape[0], rows.shape[1])
    return all(backends.explain("channel_mm", x.device, *args, explicit="auto")["chosen"] == "cpp"
               for args in _conv_backward_args(weight.detach().transpose(0, 1), grad_rows, rows))


def _conv_backward_args(flipped, grad_rows, rows):
    """The dispatch's view of one sample's two gradient products: the input gradient's convolution
    (flipped: the weight with its channels swapped, (Ci, Co, *kernel)) and the weight gradient;
    grad_rows (Co, voxels) the output gradient, rows (Ci, voxels) the input; outputs as stand-ins."""
    co, taps = flipped.shape[1], math.prod(flipped.shape[2:])
    return (_conv_args(rows.new_empty(rows.shape, device="meta"), flipped, grad_rows, None, None, False),
            (rows.new_empty((co, rows.shape[0] * taps), device="meta"), grad_rows, rows, None, None, False, "nt_conv"))


def _conv_fits(weight, x) -> bool:
    """The shapes channel_mm_conv_ computes: odd kernels of at most CONV_MAX_TAPS taps over 1 to 3 axes,
    a non-empty batch of non-empty maps, each channel's map one contiguous block."""
    nd = x.dim() - 2
    return 1 <= nd <= 3 and weight.dim() == nd + 2 and weight.shape[1] == x.shape[1] \
        and all(k % 2 for k in weight.shape[2:]) and math.prod(weight.shape[2:]) <= CONV_MAX_TAPS \
        and x.shape[0] > 0 and x[0, 0].numel() > 0 and trailing_contiguous(x[0], nd)


def _conv_probe(weight, x):
    """A stand-in for one sample's output (no memory)."""
    return x.new_empty((weight.shape[0], x[0, 0].numel()), device="meta")


def conv_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, *,
                  out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(grad_x, grad_weight) of y = conv(x, weight) as :func:`conv_batched` computes it (x (N, Ci,
    *spatial), no activation), on the kernels: grad_x is the convolution of grad_y with the weight
    flipped and its channels swapped (channel_mm_conv_, the flipped taps read in place), grad_weight
    the sum over the batch of channel_mm_nt_conv_ (grad_y against each tap's shifted rows of x). No
    tap's map or shifted copy of grad_y is written. None where the dispatch does not choose both
    kernels. ``out``: a flat buffer of at least x.numel() elements that grad_x is written into (then
    a view of it) at batch 1."""
    if not _conv_fits(weight, x) or grad_y.shape != (x.shape[0], weight.shape[0], *x.shape[2:]):
        return None
    nd = x.dim() - 2
    grad_y = grad_y if trailing_contiguous(grad_y, nd + 1) else grad_y.contiguous()
    flipped = weight.flip(list(range(2, weight.dim()))).transpose(0, 1)
    voxels = x[0, 0].numel()
    if any(backends.select("channel_mm", IMPLEMENTATIONS, x.device, args, explicit="auto") != "cpp"
           for args in _conv_backward_args(flipped, grad_y[0].view(weight.shape[0], voxels), x[0].flatten(1))):
        return None
    spatial, kernel = list(x.shape[2:]), list(weight.shape[2:])
    grad_w = x.new_empty((weight.shape[0], math.prod(weight.shape[1:])))
    for i in range(x.shape[0]):
        torch.ops.ahnet_fast.channel_mm_nt_conv_(grad_w, grad_y[i].view(weight.shape[0], voxels), x[i].flatten(1),
                                                 spatial, kernel, i > 0)
    if out is not None and x.shape[0] == 1 and out.numel() >= x.numel() and out.dtype == x.dtype:
        grad_x = out[:x.numel()].view(x.shape)
    else:
        grad_x = x.new_empty(x.shape)
    flipped = flipped.contiguous()
    for i in range(x.shape[0]):
        torch.ops.ahnet_fast.channel_mm_conv_(grad_x[i].view(x.shape[1], voxels), flipped,
                                              grad_y[i].view(weight.shape[0], voxels), spatial, None, None, False)
    return grad_x, grad_w.view(weight.shape)


def conv_into(out: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, *, scale: torch.Tensor | None = None,
              shift: torch.Tensor | None = None, accumulate: bool = False, backend: str = "auto") -> torch.Tensor:
    """out (Co, *spatial) = conv(act(x), weight) for one sample x (Ci, *spatial), or += with
    ``accumulate``; returns out. ``backend`` as for :func:`mm_into` (the reference: torch's
    convolution of the activated x)."""
    nd = x.dim() - 1
    if not 1 <= nd <= 3 or weight.dim() != nd + 2 or weight.shape[1] != x.shape[0] \
            or tuple(out.shape) != (weight.shape[0], *x.shape[1:]):
        raise ValueError(f"channel_mm_conv: shapes do not fit: weight {tuple(weight.shape)}, x {tuple(x.shape)}, "
                         f"out {tuple(out.shape)}")
    if any(k % 2 == 0 for k in weight.shape[2:]) or math.prod(weight.shape[2:]) > CONV_MAX_TAPS:
        raise ValueError(f"channel_mm_conv: odd kernel sizes with at most {CONV_MAX_TAPS} taps, got "
                         f"{tuple(weight.shape[2:])}")
    if (scale is None) != (shift is None):
        raise ValueError("channel_mm_conv: give scale and shift together")
    x = x if trailing_contiguous(x, nd) else x.contiguous()
    if trailing_contiguous(out, nd) and backends.select(
            "channel_mm", IMPLEMENTATIONS, x.device, _conv_args(out.flatten(1), weight, x, scale, shift, accumulate),
            explicit=backend) == "cpp":
        torch.ops.ahnet_fast.channel_mm_conv_(out.view(out.shape[0], -1), weight.contiguous(), x.flatten(1),
                                           list(x.shape[1:]), scale, shift, accumulate)
        return out
    y = channel_mm_conv_reference(weight, x.unsqueeze(0), scale, shift)[0]
    return out.add_(y) if accumulate else out.copy_(y)


# channel_mm_conv_'s tap table is fixed-size (csrc/cpu/channel_mm.h: kMaxTaps)
CONV_MAX_TAPS = 27


def _register():
    if not extension_available():
        return
    note_compiled_kernels("channel_mm_")
    note_compiled_kernels("channel_mm_nt_")
    torch.library.register_fake("ahnet_fast::channel_mm_")(lambda out, weight, x, scale, shift, accumulate: None)
    torch.library.register_fake("ahnet_fast::channel_mm_nt_")(lambda out, a, b, accumulate: None)
    note_compiled_kernels("channel_mm_conv_")
    note_compiled_kernels("channel_mm_nt_conv_")
    torch.library.register_fake("ahnet_fast::channel_mm_nt_conv_")(lambda out, a, x, spatial, kernel, accumulate: None)
    torch.library.register_fake("ahnet_fast::channel_mm_conv_")(lambda out, weight, x, spatial, scale, shift, accumulate:
                                                             None)


_register()
