"""Focal loss (Lin et al., ICCV 2017) with MONAI 1.6's ``FocalLoss`` conventions, fused.

``focal_loss(logits, target, ...)`` gives MONAI's values and gradients:

- sigmoid path (default): per element, BCE-with-logits times ``sigmoid(-x (2t - 1))**gamma``;
  scalar ``alpha`` weighs target 1 by alpha and target 0 by 1 - alpha; a per-class ``alpha``
  sequence weighs elements whose target is exactly 1 by alpha[c] and leaves the others at 1.
- softmax path (``use_softmax=True``): ``-(1 - p)**gamma * log p * t`` over the classes; scalar alpha
  weighs class 0 by 1 - alpha and the others by alpha, and is dropped (with MONAI's warning) when
  ``include_background=False``; a sequence gives one factor per class.
- ``include_background=False`` drops channel 0 *before* the softmax, as MONAI does.
- ``weight``: a factor per class (or one for all) after the focal term.
- reductions: "mean" over every element; "sum" = mean over the spatial axes, then sum; "none".
  With ``ignore_index`` MONAI's masked forms: "mean" divides the sum by the number of voxels that
  are not ignored (not times the classes), "sum" divides each sample's sums by its count of such voxels.

Beyond MONAI: the target may be an integer label map (B, *spatial) or (B, 1, *spatial), used
directly (no one-hot tensor is built); ``alpha`` may be a per-class sequence on both paths.

Backends: ``reference`` (pure PyTorch; oracle and fallback) and ``cpp`` (csrc/cpu/focal_loss.cpp:
loss and gradient in one pass over logits and target; the backward only scales the stored
gradient). The fused kernels cover reductions "mean" and "sum"; "none", and a dense target
together with ``ignore_index``, run the reference.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ahnet_fast import backends
from ahnet_fast._extension import extension_available
from ahnet_fast._layout import opmath_dtype, output_like
from ahnet_fast.ops._registry import cpp_kernel_reasons, note_compiled_kernels, triton_reasons

__all__ = ["focal_loss", "focal_loss_reference", "REDUCTIONS"]

REDUCTIONS = ("none", "mean", "sum")


@dataclass
class _Problem:
    """A focal-loss call, validated and normalised for every backend."""

    logits: torch.Tensor  # (B, C, *spatial), floating
    target: torch.Tensor  # label map (B, *spatial) integer, or dense (B, C, *spatial) floating
    label: bool
    first: int  # first class that enters the loss (1 when the background is excluded)
    softmax: bool
    gamma: float
    factor_pos: torch.Tensor  # (C - first,) float64: alpha*weight for target 1 (softmax: the class factor)
    factor_neg: torch.Tensor  # (C - first,) float64: for target 0 (sigmoid)
    alpha_linear: bool  # sigmoid: factor = t*pos + (1-t)*neg (scalar alpha) instead of t==1 ? pos : neg
    ignore_index: int | None
    reduction: str


def _as_class_vector(value, n: int, name: str, *, single_channel_ok: bool) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    if t.ndim == 0:
        return t.expand(n).clone()
    t = t.flatten()
    if n == 1 and not single_channel_ok:
        raise ValueError(f"focal_loss: a per-class {name} is not supported for single-channel outputs")
    if t.numel() != n:
        raise ValueError(f"focal_loss: {name} has {t.numel()} values but {n} classes enter the loss")
    return t


def _prepare(logits, target, *, gamma, alpha, weight, reduction, use_softmax, include_background, to_onehot_y,
             ignore_index) -> _Problem:
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError("focal_loss: logits and target must be tensors")
    if not logits.is_floating_point():
        raise ValueError(f"focal_loss: logits must be floating point, got {logits.dtype}")
    if logits.dim() < 3:
        raise ValueError(f"focal_loss: logits must have shape (B, C) or (B, C, *spatial), got {tuple(logits.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f'Unsupported reduction: {reduction}, available options are ["mean", "sum", "none"].')
    gamma = float(gamma)
    if not gamma >= 0:
        raise ValueError(f"focal_loss: gamma must be >= 0, got {gamma}")
    if ignore_index is not None and (isinstance(ignore_index, bool) or int(ignore_index) != ignore_index):
        raise ValueError(f"focal_loss: ignore_index must be an integer, got {ignore_index!r}")
    b, c = logits.shape[:2]
    spatial = tuple(logits.shape[2:])
    label_shapes = ((b, *spatial), (b, 1, *spatial))

    # What kind of target this is.
    if target.is_floating_point() and tuple(target.shape) == tuple(logits.shape) and not (to_onehot_y and c > 1):
        label = False
    elif tuple(target.shape) in label_shapes and (not target.is_floating_point() or (to_onehot_y and c > 1)):
        label = True
    elif tuple(target.shape) == tuple(logits.shape) and target.dtype == torch.bool:
        label, target = False, target.to(logits.dtype)
    elif tuple(target.shape) == tuple(logits.shape) and not target.is_floating_point() and c > 1:
        label, target = False, target.to(torch.float32)  # an integer one-hot target
    else:
        hint = ""
        if tuple(target.shape) in label_shapes and target.is_floating_point():
            hint = " (a float label map needs to_onehot_y=True; an integer label map is used directly)"
        raise ValueError(f"ground truth has different shape ({tuple(target.shape)}) from input "
                         f"({tuple(logits.shape)}){hint}")

    if label:
        if target.is_floating_point():
            if not torch.isfinite(target).all() or (target != torch.round(target)).any():
                raise ValueError("focal_loss: a float label map (to_onehot_y=True) must hold integer class indices")
            target = target.long()
        if target.dtype not in (torch.uint8, torch.int32, torch.int64):  # the kernels' label dtypes
            target = target.to(torch.int32)
        target = target.reshape(b, *spatial)
    elif target.dtype not in (torch.float32, logits.dtype):  # the kernels' dense-target dtypes
        target = target.float()

    if to_onehot_y and c == 1:
        warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=3)
    first = 0
    if not include_background:
        if c == 1:
            warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=3)
        else:
            first = 1
    n = c - first

    # Per-class factors: alpha, then weight.
    pos = neg = torch.ones(n, dtype=torch.float64)
    alpha_linear = True
    if isinstance(alpha, torch.Tensor) and alpha.ndim == 0:
        alpha = float(alpha)
    if alpha is None:
        pass
    elif isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        a = float(alpha)
        if not math.isfinite(a):  # MONAI would return NaN: say so instead
            raise ValueError(f"focal_loss: alpha must be finite, got {a}")
        if use_softmax:
            if first == 1:
                warnings.warn("`include_background=False`, scalar `alpha` ignored when using softmax.", stacklevel=3)
                pos = torch.ones(n, dtype=torch.float64)
            else:
                pos = torch.tensor([1 - a] + [a] * (n - 1), dtype=torch.float64)
            neg = pos
        else:
            pos, neg = torch.full((n,), a, dtype=torch.float64), torch.full((n,), 1 - a, dtype=torch.float64)
        alpha_linear = True
    else:
        seq = torch.as_tensor(alpha, dtype=torch.float64).detach().cpu().flatten()
        if seq.numel() != n:
            raise ValueError(f"The length of alpha ({seq.numel()}) must match the number of classes ({n}).")
        if not torch.isfinite(seq).all():
            raise ValueError(f"focal_loss: alpha values must be finite, got {seq.tolist()}")
        pos, neg = seq, torch.ones(n, dtype=torch.float64)
        alpha_linear = False
    if weight is not None:
        w = _as_class_vector(weight, n, "weight", single_channel_ok=False)
        if (w < 0).any():
            raise ValueError("class_weight values must be non-negative.")
        pos, neg = pos * w, neg * w
    return _Problem(logits, target, label, first, bool(use_softmax), gamma, pos, neg, alpha_linear,
                    None if ignore_index is None else int(ignore_index), reduction)


def _check_target_values(p: _Problem) -> None:
    c = p.logits.shape[1]
    if p.label:
        t = p.target
        valid = torch.ones_like(t, dtype=torch.bool) if p.ignore_index is None else t != p.ignore_index
        vals = t[valid]
        if vals.numel():
            lo, hi = int(vals.min()), int(vals.max())
            top = 1 if c == 1 else c - 1
            if lo < 0 or hi > top:
                raise ValueError(_label_range_message(p, lo, hi))
    else:
        t = p.target
        in_range = (t >= 0) & (t <= 1)
        if p.ignore_index is not None:  # voxels MONAI's ignore mask drops may hold anything (e.g. 255)
            in_range = in_range | (_dense_target_and_mask(p)[1] == 0)
        if not in_range.all():
            bad = t[~in_range]
            raise ValueError("focal_loss: target values must be in [0, 1] (and not NaN) where ignore_index does "
                             f"not mask them; got {bad.numel()} such values, e.g. {float(bad[0])}")


def _label_range_message(p: _Problem, lo=None, hi=None) -> str:
    c = p.logits.shape[1]
    allowed = "0 or 1 (one output channel: a binary target)" if c == 1 else f"0..{c - 1}"
    seen = f" (found min {lo}, max {hi})" if lo is not None else ""
    ign = "" if p.ignore_index is None else f", or ignore_index={p.ignore_index}"
    return f"focal_loss: labels must be {allowed}{ign}{seen}"


# ---------------------------------------------------------------------------------------------
# Reference: PyTorch ops with MONAI's arithmetic. Builds a one-hot target for label maps.


def _dense_target_and_mask(p: _Problem):
    c = p.logits.shape[1]
    if p.label:
        labels = p.target.long()
        mask = None
        if p.ignore_index is not None:
            mask = (labels != p.ignore_index).unsqueeze(1).float()
            labels = torch.where(labels == p.ignore_index, torch.zeros_like(labels), labels)
        if c == 1:
            t = labels.unsqueeze(1).float()
        else:
            t = torch.zeros(p.logits.shape, dtype=torch.float32, device=p.logits.device)
            t.scatter_(1, labels.unsqueeze(1), 1.0)
        return t, mask
    t = p.target.float()
    mask = None
    if p.ignore_index is not None:  # MONAI's create_ignore_mask on a one-hot (or single-channel) target
        if t.shape[1] == 1:
            mask = (t != p.ignore_index).float()
        elif 0 <= p.ignore_index < t.shape[1]:
            mask = 1.0 - t[:, p.ignore_index:p.ignore_index + 1]
        else:
            mask = (t.sum(dim=1, keepdim=True) > 0).float()
    return t, mask


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    # MONAI computes in float32 (fp16 logs underflow); float64 logits keep float64 (gradcheck).
    return opmath_dtype(logits.dtype)


def focal_loss_reference(p: _Problem) -> torch.Tensor:
    t, mask = _dense_target_and_mask(p)
    dt = _compute_dtype(p.logits)
    x = p.logits[:, p.first:].to(dt)
    t = t[:, p.first:].to(dt)
    if mask is not None:
        mask = mask.to(dt)
    if mask is not None:
        x, t = x * mask, t * mask
    shape = [-1] + [1] * (x.dim() - 2)
    pos = p.factor_pos.to(device=x.device, dtype=x.dtype).view(shape)
    neg = p.factor_neg.to(device=x.device, dtype=x.dtype).view(shape)
    if p.softmax:
        log_p = x.log_softmax(1)
        loss = -(1 - log_p.exp()).pow(p.gamma) * log_p * t * pos
    else:
        loss = x - x * t - F.logsigmoid(x)
        loss = (F.logsigmoid(-x * (t * 2 - 1)) * p.gamma).exp() * loss
        factor = t * pos + (1 - t) * neg if p.alpha_linear else torch.where(t == 1, pos, neg)
        loss = factor * loss
    if mask is not None:
        loss = loss * mask
    if p.reduction == "sum":
        spatial = list(range(2, loss.dim()))
        if mask is not None:
            per = loss.sum(dim=spatial, keepdim=True) / mask.sum(dim=spatial, keepdim=True).clamp(
                min=torch.finfo(mask.dtype).eps)
        else:
            per = loss.mean(dim=spatial)
        return per.sum()
    if p.reduction == "mean":
        if mask is not None:
            return loss.sum() / mask.sum().clamp(min=torch.finfo(mask.dtype).eps)
        return loss.mean()
    return loss


# ---------------------------------------------------------------------------------------------
# Fused backends.


def _kernel_contract_reasons(p: _Problem) -> list[str]:
    """What the fused kernels (C++ and Triton alike) do not cover."""
    reasons = []
    if p.reduction == "none":
        reasons.append("reduction='none' returns a full-size loss; the fused kernel covers 'mean' and 'sum'")
    if not p.label and p.ignore_index is not None:
        reasons.append("ignore_index with a dense (one-hot or soft) target follows MONAI's fractional mask; "
                       "the fused kernel takes ignore_index with label-map targets")
    if p.softmax and p.logits.shape[1] == 1 and p.label:
        reasons.append("softmax over a single channel with a label map")
    if p.logits.numel() == 0:
        reasons.append("an empty batch: MONAI's arithmetic gives its answer (mean: NaN, sum: 0, none: empty)")
    return reasons


def _cpp_reasons(p: _Problem) -> list[str]:
    return cpp_kernel_reasons("focal_loss", p.logits.device) + _kernel_contract_reasons(p)


def _triton_reasons(p: _Problem) -> list[str]:
    # the kernel only converts bf16 to fp32 and back: exact in the interpreter too
    return triton_reasons(p.logits.device, p.logits.dtype, interpreter_bf16=True) + _kernel_contract_reasons(p)


IMPLEMENTATIONS = backends.register("focal_loss", (
    backends.Implementation("reference", lambda p: []),
    backends.Implementation("cpp", _cpp_reasons),
    backends.Implementation("triton", _triton_reasons),
))


SYNC_CHECKS_ENV = "AHNET_FAST_SYNC_CHECKS"


def _fused(p: _Problem, op, gradient_in_backward: bool = False) -> torch.Tensor:
    """The loss from a fused op. The C++ op writes the gradient during the forward, already carrying
    the reduction's final scale (with ignore_index that scale needs the count of voxels that count,
    read once from the label map), so that the usual loss.backward() returns it untouched. The
    Triton op (``gradient_in_backward``) computes the gradient in backward instead, scaled by the
    upstream gradient on the device: no host sync, no logits-sized multiply, and no gradient held
    between forward and backward."""
    b, c = p.logits.shape[:2]
    voxels = p.logits[0, 0].numel()
    n_classes = c - p.first
    need_grad = p.logits.requires_grad and torch.is_grad_enabled()
    eps = torch.finfo(torch.float32).eps
    if gradient_in_backward:
        grad_scale = torch.ones(b, dtype=torch.float64, device=p.logits.device)
    elif p.ignore_index is None:
        per = 1.0 / (b * n_classes * voxels) if p.reduction == "mean" else 1.0 / voxels
        grad_scale = torch.full((b,), per, dtype=torch.float64)
    else:
        counted = (p.target != p.ignore_index).reshape(b, -1).sum(1).to(torch.float64).cpu()
        if p.reduction == "mean":
            grad_scale = (1.0 / counted.sum().clamp(min=eps)).expand(b).clone()
        else:
            grad_scale = 1.0 / counted.clamp(min=eps)
    loss_sum, count, _, invalid = op(
        p.logits, p.target, p.factor_pos, p.factor_neg, grad_scale, p.gamma, p.softmax, p.label, p.first,
        0 if p.ignore_index is None else p.ignore_index, p.ignore_index is not None, p.alpha_linear,
        need_grad and not gradient_in_backward)
    if p.reduction == "mean":
        denom = count.sum().clamp(min=eps) if p.ignore_index is not None else float(b * n_classes * voxels)
        loss = loss_sum.sum() / denom
    else:
        per_sample = count.clamp(min=eps) if p.ignore_index is not None else torch.full_like(count, float(voxels))
        loss = (loss_sum / per_sample).sum()
    if p.logits.device.type == "cpu" or os.environ.get(SYNC_CHECKS_ENV) == "1" or \
            torch.compiler.is_compiling():
        if int(invalid) > 0:
            if p.label:
                _check_target_values(p)  # finds the range for the message
                raise ValueError(_label_range_message(p))
            raise ValueError("focal_loss: target values must be in [0, 1] (and not NaN)")
    else:
        # On a GPU the range check would stop the pipeline for a host sync on every call: a bad
        # target makes the loss NaN instead (never a quiet number), and AHNET_FAST_SYNC_CHECKS=1
        # raises the ValueError naming the bad values.
        loss = loss + torch.where(invalid > 0, float("nan"), 0.0)
    return loss.to(_compute_dtype(p.logits))


def focal_loss(logits: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0,
               alpha: float | Sequence[float] | None = None, weight=None, reduction: str = "mean",
               use_softmax: bool = False, include_background: bool = True, to_onehot_y: bool = False,
               ignore_index: int | None = None, backend: str | None = None) -> torch.Tensor:
    """Focal loss of ``logits`` (B, C, *spatial), or (B, C) for classification, against ``target``: a
    float tensor shaped like the logits (one-hot or soft, values in [0, 1] except where ``ignore_index``
    masks them), or a label map (B, *spatial) / (B, 1, *spatial) of integer class indices (a float
    label map with ``to_onehot_y=True``, as MONAI). See the module
    docstring for the conventions. Returns a float32 scalar ("mean", "sum") or the float32
    per-element loss ("none"). Bad input raises ValueError."""
    classification = isinstance(logits, torch.Tensor) and logits.dim() == 2 and isinstance(target, torch.Tensor)
    if classification:
        # (B, C) logits: one voxel per sample. MONAI's "sum" averages over the spatial axes, which are
        # none here, and torch reduces an empty axis list over every axis: its "sum" is the mean.
        logits = logits.unsqueeze(-1)
        target = target.reshape(-1, 1) if target.dim() == 1 else target.unsqueeze(-1)
        reduction = "mean" if reduction == "sum" else reduction
    p = _prepare(logits, target, gamma=gamma, alpha=alpha, weight=weight, reduction=reduction,
                 use_softmax=use_softmax, include_background=include_background, to_onehot_y=to_onehot_y,
                 ignore_index=ignore_index)

    def run(chosen):
        if chosen == "cpp":
            return _fused(p, torch.ops.ahnet_fast.focal_loss)
        if chosen == "triton":
            return _fused(p, _triton_op(), gradient_in_backward=True)
        _check_target_values(p)
        return focal_loss_reference(p)

    loss = backends.dispatch("focal_loss", IMPLEMENTATIONS, p.logits.device, (p,), backend, run)
    return loss.squeeze(-1) if classification and p.reduction == "none" else loss


# ---------------------------------------------------------------------------------------------
# Fake and autograd of the compiled op.


def _fake(logits, target, factor_pos, factor_neg, grad_scale, gamma, softmax, label_target, first_channel,
          ignore_index, has_ignore, alpha_linear, compute_grad):
    b = logits.shape[0]
    grad = output_like(logits) if compute_grad else logits.new_empty(0)
    return (logits.new_empty(b, dtype=torch.float64), logits.new_empty(b, dtype=torch.float64), grad,
            logits.new_empty((), dtype=torch.int64))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[2], inputs[4])  # the gradient, and the scale it already carries
    ctx.compute_grad = inputs[12]
    # Outputs other than the loss sums get no gradient; without this autograd would build a
    # zero tensor shaped like the stored gradient (a whole logits-sized allocation) to pass in.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss_sum, _count, _grad, _invalid):
    grad, grad_scale = ctx.saved_tensors
    if grad_loss_sum is None:
        return (None,) * 13
    if not ctx.compute_grad:
        raise RuntimeError("focal_loss: the forward ran without computing the gradient (logits did not "
                           "require grad, or grad mode was off)")
    # d(loss_sum[b]) / d(logits) = grad / grad_scale[b]
    factor = grad_loss_sum.to(torch.float64) / grad_scale.to(grad_loss_sum.device)
    factor = factor.to(opmath_dtype(grad.dtype))
    # The usual case (upstream gradient 1, as loss.backward() gives): the stored gradient is final.
    # Checked only on concrete CPU tensors: no device sync, nothing data-dependent while tracing.
    if type(factor) is torch.Tensor and factor.device.type == "cpu" and bool((factor == 1).all()):
        return (grad,) + (None,) * 12
    # Otherwise a scaled copy: the stored gradient stays intact for another backward (retain_graph).
    return (grad * factor.view(-1, *([1] * (grad.dim() - 1))),) + (None,) * 12


def _triton_setup_context(ctx, inputs, output):
    (logits, target, factor_pos, factor_neg, _grad_scale, gamma, softmax, label_target, first_channel, ignore_index,
     has_ignore, alpha_linear, _compute_grad) = inputs
    ctx.save_for_backward(logits, target, factor_pos, factor_neg)
    ctx.args = (gamma, softmax, label_target, first_channel, ignore_index, has_ignore, alpha_linear)
    ctx.set_materialize_grads(False)


def _triton_backward(ctx, grad_loss_sum, _count, _grad, _invalid):
    """The kernel again, now writing the gradient, each sample's scaled by its upstream gradient
    read on the device."""
    if grad_loss_sum is None:
        return (None,) * 13
    logits, target, factor_pos, factor_neg = ctx.saved_tensors
    grad = torch.ops.ahnet_fast.focal_loss_backward_triton(logits, target, factor_pos, factor_neg, grad_loss_sum,
                                                           *ctx.args)
    return (grad,) + (None,) * 12


_TRITON_OP = None


def _triton_op():
    """``ahnet_fast::focal_loss_triton``: the Triton kernel as a custom op (any device the kernel
    runs on: CUDA, or CPU under TRITON_INTERPRET=1), sharing the C++ op's fake and autograd."""
    global _TRITON_OP
    if _TRITON_OP is None:
        @torch.library.custom_op("ahnet_fast::focal_loss_triton", mutates_args=())
        def focal_loss_triton(logits: torch.Tensor, target: torch.Tensor, factor_pos: torch.Tensor,
                              factor_neg: torch.Tensor, grad_scale: torch.Tensor, gamma: float,
                              softmax: bool, label_target: bool, first_channel: int, ignore_index: int,
                              has_ignore: bool, alpha_linear: bool, compute_grad: bool
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
            from ahnet_fast.kernels.triton import focal_loss as kernel

            return kernel.focal_loss(logits, target, factor_pos, factor_neg, grad_scale, gamma, softmax,
                                     label_target, first_channel, ignore_index, has_ignore, alpha_linear,
                                     compute_grad)

        @torch.library.custom_op("ahnet_fast::focal_loss_backward_triton", mutates_args=())
        def focal_loss_backward_triton(logits: torch.Tensor, target: torch.Tensor, factor_pos: torch.Tensor,
                                       factor_neg: torch.Tensor, grad_loss_sum: torch.Tensor, gamma: float,
                                       softmax: bool, label_target: bool, first_channel: int, ignore_index: int,
                                       has_ignore: bool, alpha_linear: bool) -> torch.Tensor:
            from ahnet_fast.kernels.triton import focal_loss as kernel

            return kernel.focal_loss(logits, target, factor_pos, factor_neg, grad_loss_sum, gamma, softmax,
                                     label_target, first_channel, ignore_index, has_ignore, alpha_linear, True)[2]

        focal_loss_backward_triton.register_fake(lambda logits, *args: output_like(logits))
        focal_loss_triton.register_fake(_fake)
        focal_loss_triton.register_autograd(_triton_backward, setup_context=_triton_setup_context)
        _TRITON_OP = torch.ops.ahnet_fast.focal_loss_triton.default
    return _TRITON_OP


def _register():
    if not extension_available():
        return
    note_compiled_kernels("focal_loss")
    torch.library.register_fake("ahnet_fast::focal_loss")(_fake)
    torch.library.register_autograd("ahnet_fast::focal_loss", _backward, setup_context=_setup_context)


_register()
