"""Dice scores for label maps, per case and pooled over a data set (the two LiTS rankings).

LiTS ranks liver and lesion segmentation by two Dice scores that answer different questions:

* **Dice per case** (:meth:`DiceTracker.mean_per_case`): the mean of each volume's Dice. Every
  patient counts the same, so missing a single small lesion in a volume with one lesion costs that
  case its whole lesion score.
* **Dice global** (:meth:`DiceTracker.global_dice`): ``2 * sum|A ∩ B| / sum(|A| + |B|)`` over all
  voxels of all cases, as if the data set were one volume. Large lesions dominate; small ones
  barely count.

A model that finds the big lesions and misses the small ones scores well globally and poorly per
case; reporting both shows it.

Convention for an empty class: when neither the prediction nor the ground truth contains a class,
its Dice is 1.0 (a correct "nothing here"), so a healthy liver without lesions, correctly predicted
lesion-free, counts as a success and no NaN enters the means. A class present in only one of
the two scores 0.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["LITS_CLASS_NAMES", "DiceTracker", "default_class_names", "dice_per_class"]

LITS_CLASS_NAMES = ("background", "liver", "lesion")


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """``("background", "liver", "lesion")`` for 3 classes (the LiTS labels this package targets),
    else ``("background", "class1", "class2", ...)``."""
    if num_classes == len(LITS_CLASS_NAMES):
        return LITS_CLASS_NAMES
    return ("background",) + tuple(f"class{i}" for i in range(1, num_classes))


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def _check_class_names(class_names, num_classes: int) -> tuple[str, ...]:
    if class_names is None:
        return default_class_names(num_classes)
    if isinstance(class_names, str):
        raise ValueError(f"class_names must be a sequence of names, got the string {class_names!r}")
    names = tuple(class_names)
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names for {num_classes} classes: {names!r}")
    for name in names:
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"class names must be non-empty strings without '/', got {name!r} in {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be unique, got {names!r}")
    return names


def _as_labels(x, what: str):
    """A torch tensor (kept on its device) or numpy array of integer labels."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex():
            raise ValueError(
                f"{what} must hold integer class labels, got a {x.dtype} tensor "
                "(take argmax over the class axis of logits/probabilities first)"
            )
        return x.detach()
    arr = np.asarray(x)
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise ValueError(
            f"{what} must hold integer class labels, got dtype {arr.dtype} "
            "(take argmax over the class axis of logits/probabilities first)"
        )
    return arr


def _overlap_counts(pred, target, num_classes: int) -> np.ndarray:
    """``(3, num_classes)`` int64: per class |pred ∩ target|, |pred|, |target|.

    One boolean mask per class instead of a confusion matrix: an int64 index over a 512x512x800
    CT would take 1.7 GB, the masks take a byte per voxel. Torch inputs are counted on their device.
    """
    num_classes = _check_num_classes(num_classes)
    pred, target = _as_labels(pred, "pred"), _as_labels(target, "target")
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    is_torch = isinstance(pred, torch.Tensor) or isinstance(target, torch.Tensor)
    if is_torch:
        if isinstance(pred, torch.Tensor) and isinstance(target, torch.Tensor) and pred.device != target.device:
            raise ValueError(f"pred and target are on different devices: {pred.device} vs {target.device}")
        dev = pred.device if isinstance(pred, torch.Tensor) else target.device
        # a numpy array next to a tensor is moved to the tensor's device (int64: numpy's unsigned
        # types beyond uint8 have few torch kernels)
        pred, target = (
            x if isinstance(x, torch.Tensor) else torch.from_numpy(x.astype(np.int64)).to(dev) for x in (pred, target)
        )
    for arr, what in ((pred, "pred"), (target, "target")):
        if math.prod(arr.shape) == 0:
            continue  # empty: nothing to check (min/max of nothing would raise)
        if int(arr.min()) < 0 or int(arr.max()) >= num_classes:
            values = arr.unique() if is_torch else np.unique(arr)
            bad = [int(v) for v in values.tolist() if not 0 <= int(v) < num_classes]
            if bad:
                raise ValueError(
                    f"{what} has labels outside [0, {num_classes}): {bad[:10]}{' ...' if len(bad) > 10 else ''}"
                )
    counts = np.zeros((3, num_classes), dtype=np.int64)
    for c in range(num_classes):
        a, b = pred == c, target == c
        if is_torch:
            counts[:, c] = [int((a & b).sum().item()), int(a.sum().item()), int(b.sum().item())]
        else:
            counts[:, c] = [np.count_nonzero(a & b), np.count_nonzero(a), np.count_nonzero(b)]
    return counts


def _dice_from_counts(intersection: np.ndarray, pred_sum: np.ndarray, target_sum: np.ndarray) -> np.ndarray:
    denom = pred_sum + target_sum
    dice = np.ones(denom.shape, dtype=np.float64)  # both empty -> 1.0
    nonzero = denom > 0
    dice[nonzero] = 2.0 * intersection[nonzero] / denom[nonzero]
    return dice


def dice_per_class(pred, target, num_classes: int) -> np.ndarray:
    """Dice of every class ``0 .. num_classes-1`` between two integer label maps of one shape.

    ``pred`` and ``target`` are numpy arrays or torch tensors (any shape, any device; counted where
    they are). Both empty -> 1.0 for that class (see the module docstring). Returns float64
    ``(num_classes,)``. Raises ValueError for float inputs (logits passed by mistake), shape
    mismatches and labels outside ``[0, num_classes)``.
    """
    counts = _overlap_counts(pred, target, num_classes)
    return _dice_from_counts(*counts)


class DiceTracker:
    """Collects the Dice counts of evaluated cases for per-case and global Dice.

    Keeps three integers per class and case (not the volumes), so it is cheap over a whole data
    set. ``update(pred, target, case="volume-3")`` adds one case; names must be unique so that a
    case cannot be counted twice by mistake.
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None):
        self.num_classes = _check_num_classes(num_classes)
        self.class_names = _check_class_names(class_names, self.num_classes)
        self._counts: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._counts)

    def reset(self) -> None:
        """Forget all cases (e.g. before the next evaluation round)."""
        self._counts.clear()

    def update(self, pred, target, case: str | None = None) -> np.ndarray:
        """Add one case (integer label maps, numpy or torch); returns its per-class Dice.

        ``case`` defaults to ``"case<k>"`` with k the number of cases so far.
        """
        name = f"case{len(self._counts)}" if case is None else str(case)
        if name in self._counts:
            raise ValueError(f"case {name!r} was already added to this DiceTracker")
        counts = _overlap_counts(pred, target, self.num_classes)
        self._counts[name] = counts
        return _dice_from_counts(*counts)

    def _require_cases(self) -> None:
        if not self._counts:
            raise ValueError("DiceTracker has no cases yet: call update(pred, target, case=...) first")

    def per_case(self) -> dict[str, np.ndarray]:
        """Case name -> per-class Dice (float64 ``(num_classes,)``), in the order added."""
        return {name: _dice_from_counts(*c) for name, c in self._counts.items()}

    def mean_per_case(self) -> np.ndarray:
        """LiTS "Dice per case": the mean over cases of each case's Dice, per class."""
        self._require_cases()
        return np.mean(np.stack(list(self.per_case().values())), axis=0)

    def global_dice(self) -> np.ndarray:
        """LiTS "Dice global": ``2 * sum|A ∩ B| / sum(|A| + |B|)`` over all cases, per class."""
        self._require_cases()
        total = np.sum(np.stack(list(self._counts.values())), axis=0)
        return _dice_from_counts(*total)

    def summary(self) -> dict[str, float]:
        """Plain floats for logs and JSON: ``"dice_case/<class>"`` and ``"dice_global/<class>"``.

        The background class (0) is left out when there are other classes: its Dice is close to 1
        on any CT and would only dilute means and crowd plots.
        """
        per_case, pooled = self.mean_per_case(), self.global_dice()
        classes = range(1, self.num_classes) if self.num_classes > 1 else range(self.num_classes)
        out = {f"dice_case/{self.class_names[c]}": float(per_case[c]) for c in classes}
        out.update({f"dice_global/{self.class_names[c]}": float(pooled[c]) for c in classes})
        return out
