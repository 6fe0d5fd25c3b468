"""FocalLoss: MONAI 1.6's ``monai.losses.FocalLoss``, on the fused op ``ahnet_fast.ops.focal_loss``."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.modules.loss import _Loss

from ahnet_fast.nn._bn import set_backend
from ahnet_fast.ops.focal_loss import REDUCTIONS, focal_loss

__all__ = ["FocalLoss"]


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
        return focal_loss(input, target, gamma=self.gamma, alpha=self.alpha, weight=self.class_weight,
                          reduction=self.reduction, use_softmax=self.use_softmax,
                          include_background=self.include_background, to_onehot_y=self.to_onehot_y,
                          ignore_index=self.ignore_index, backend=self.backend)
