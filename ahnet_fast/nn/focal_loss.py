"""FocalLoss: MONAI 1.6's ``monai.losses.FocalLoss``, on the fused op ``ahnet_fast.ops.focal_loss``."""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from ahnet_fast.nn._bn import set_backend
from ahnet_fast.ops.focal_loss import REDUCTIONS, focal_loss

__all__ = ["FocalLoss", "monai_focal_loss"]


class FocalLoss(_Loss):
    """Focal loss with MONAI's arguments, defaults, buffer (``class_weight``) and results.

    Args (as MONAI 1.6):
        include_background: False drops channel 0 (before the softmax, as MONAI).
        to_onehot_y: the target is a label map (B, 1, *spatial) to one-hot.
        gamma: focusing exponent (>= 0).
        alpha: a scalar or one value per class, unrestricted as in MONAI (see
            :mod:`ahnet_fast.ops.focal_loss`).
        weight: per-class (or single) non-negative factor after the focal term.
        reduction: "mean", "sum" (mean over spatial axes, then sum) or "none".
        use_softmax: softmax over the classes instead of a sigmoid per element.
        ignore_index: voxels whose label equals it are excluded.

    Beyond MONAI: an integer label map (B, *spatial) or (B, 1, *spatial) is used directly, with no
    one-hot tensor built. Keyword-only ``backend`` picks the implementation (see ahnet_fast.backends).

    Under ``torch.jit.script`` the loss is MONAI's arithmetic in ATen ops (:func:`monai_focal_loss`):
    the fused op's argument checks and dispatch are Python, and a scripted loss of ATen ops loads
    without ahnet_fast. It takes the inputs MONAI takes, without the value checks of the eager op.
    """

    def __init__(self, include_background: bool = True, to_onehot_y: bool = False, gamma: float = 2.0,
                 alpha: float | Sequence[float] | None = None, weight=None, reduction: str = "mean",
                 use_softmax: bool = False, ignore_index: int | None = None, *, backend: str | None = None):
        reduction = getattr(reduction, "value", reduction)
        if reduction not in REDUCTIONS:
            raise ValueError(f'Unsupported reduction: {reduction}, available options are ["mean", "sum", "none"].')
        super().__init__(reduction=reduction)
        if not float(gamma) >= 0:
            raise ValueError(f"FocalLoss: gamma must be >= 0, got {gamma}")
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.gamma = gamma
        self.weight = weight
        self.use_softmax = use_softmax
        if alpha is None:
            self.alpha = None
        elif isinstance(alpha, (float, int)):
            self.alpha = float(alpha)
        else:
            self.alpha = torch.as_tensor(alpha)
        self.register_buffer("class_weight", torch.as_tensor(weight) if weight is not None else None)
        self.ignore_index = ignore_index
        set_backend(self, backend)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            alpha = self.alpha
            alpha_t: torch.Tensor | None = None
            if isinstance(alpha, float):
                alpha_t = torch.tensor(alpha, dtype=torch.float64)
            elif isinstance(alpha, torch.Tensor):
                alpha_t = alpha
            return monai_focal_loss(input, target, self.include_background, self.to_onehot_y, float(self.gamma),
                                    alpha_t, self.class_weight, self.reduction, self.use_softmax, self.ignore_index)
        return self._fused(input, target)

    @torch.jit.unused
    def _fused(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return focal_loss(input, target, gamma=self.gamma, alpha=self.alpha, weight=self.class_weight,
                          reduction=self.reduction, use_softmax=self.use_softmax,
                          include_background=self.include_background, to_onehot_y=self.to_onehot_y,
                          ignore_index=self.ignore_index, backend=self.backend)


def monai_focal_loss(input: torch.Tensor, target: torch.Tensor, include_background: bool, to_onehot_y: bool,
                     gamma: float, alpha: torch.Tensor | None, class_weight: torch.Tensor | None, reduction: str,
                     use_softmax: bool, ignore_index: int | None) -> torch.Tensor:
    """MONAI 1.6's FocalLoss arithmetic in TorchScript-compatible ATen ops (``alpha``: None, a 0-d
    tensor for a scalar, or one value per class): the scripted form of :class:`FocalLoss`."""
    n_classes = input.shape[1]
    original_target = target
    if to_onehot_y:
        if n_classes == 1:
            warnings.warn("single channel prediction, `to_onehot_y=True` ignored.")
        else:
            if target.dim() == 1:
                target = target.unsqueeze(1)
            if ignore_index is not None and (ignore_index < 0 or ignore_index >= n_classes):
                target = torch.where(target == ignore_index, torch.zeros_like(target), target)
            shape = list(target.shape)
            shape[1] = n_classes
            target = torch.zeros(shape, dtype=input.dtype, device=input.device).scatter_(1, target.long(), 1.0)
    if not include_background:
        if n_classes == 1:
            warnings.warn("single channel prediction, `include_background=False` ignored.")
        else:
            target = target[:, 1:]
            input = input[:, 1:]
    mask: torch.Tensor | None = None
    if ignore_index is not None:  # MONAI's ignore mask, computed on the target as given
        if original_target.dim() == 1 or original_target.shape[1] == 1:
            mask = (original_target != ignore_index).float()
            if mask.dim() == 1:
                mask = mask.unsqueeze(1)
        elif 0 <= ignore_index < original_target.shape[1]:
            mask = 1.0 - original_target[:, ignore_index:ignore_index + 1].float()
        else:
            mask = (original_target.sum(dim=1, keepdim=True) > 0).float()
    if target.shape != input.shape:
        raise ValueError("ground truth has different shape from input")
    if mask is not None:
        input = input * mask
        target = target * mask
    x = input.float()
    t = target.float()
    view = [-1] + [1] * (t.dim() - 2)
    if use_softmax:
        if not include_background and alpha is not None and alpha.dim() == 0:
            warnings.warn("`include_background=False`, scalar `alpha` ignored when using softmax.")
            alpha = None
        log_p = x.log_softmax(1)
        loss = -(1 - log_p.exp()).pow(gamma) * log_p * t
        if alpha is not None:
            a = alpha.to(device=x.device, dtype=x.dtype)
            if a.dim() == 0:
                factor = torch.full([t.shape[1]], float(a.item()), dtype=x.dtype, device=x.device)
                factor[0] = 1 - a
            else:
                if a.shape[0] != t.shape[1]:
                    raise ValueError("The length of alpha must match the number of classes.")
                factor = a
            loss = factor.view(view) * loss
    else:
        loss = x - x * t - F.logsigmoid(x)
        loss = (F.logsigmoid(-x * (t * 2 - 1)) * gamma).exp() * loss
        if alpha is not None:
            a = alpha.to(device=x.device, dtype=x.dtype)
            if a.dim() == 0:
                loss = (t * a + (1 - t) * (1 - a)) * loss
            else:
                if a.shape[0] != t.shape[1]:
                    raise ValueError("The length of alpha must match the number of classes.")
                a = a.view(view)
                loss = torch.where(t == 1, a, torch.ones_like(a)) * loss
    if mask is not None:
        loss = loss * mask
    if class_weight is not None:
        cw = class_weight.to(device=loss.device, dtype=loss.dtype)
        if cw.dim() > 0:
            if loss.shape[1] == 1:
                raise ValueError("Per-class class_weight is not supported for single-channel outputs.")
            if cw.numel() != loss.shape[1]:
                raise ValueError("The number of class_weight must match the number of output channels.")
            if bool((cw < 0).any()):
                raise ValueError("class_weight values must be non-negative.")
            loss = loss * cw.view(view)
        else:
            if bool(cw < 0):
                raise ValueError("class_weight values must be non-negative.")
            loss = loss * cw
    spatial = list(range(2, t.dim()))
    eps = 1.1920928955078125e-07  # torch.finfo(torch.float32).eps, the mask's dtype (TorchScript has no finfo)
    if reduction == "sum":
        if mask is not None:
            denom = mask.sum(dim=spatial, keepdim=True).clamp(min=eps)
            loss = loss.sum(dim=spatial, keepdim=True) / denom
        else:
            loss = loss.mean(dim=spatial)
        return loss.sum()
    if reduction == "mean":
        if mask is not None:
            return loss.sum() / mask.sum().clamp(min=eps)
        return loss.mean()
    if reduction == "none":
        return loss
    raise ValueError("Unsupported reduction, available options are [\"mean\", \"sum\", \"none\"].")
