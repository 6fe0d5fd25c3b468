"""Preprocessing of a CT case for AH-Net: in-plane resampling to a common spacing, HU windowing.

Why in-plane only: LiTS slice spacing ranges 0.7-5 mm while in-plane spacing is 0.55-1.0 mm; AH-Net
is built for exactly this anisotropy (its 2D-pretrained encoder sees slices, its 1 x 1 x k decoder
kernels learn the between-slice context), so Z is kept as acquired and only X/Y are brought to one
spacing, which makes a patch cover the same physical area in every case. The default 1.6 mm halves
a typical 512 x 512 slice, which is what makes whole-slab training fit.

Why the window [-200, 250] HU: it spans fat, liver (~60-110 HU enhanced) and lesions while clipping
air and bone, whose values would otherwise dominate the input range; it is scaled to [0, 1].

The settings travel with a trained model (:meth:`Preprocessing.to_dict` goes into the checkpoint
as plain Python types, loadable with ``torch.load(weights_only=True)``), so inference preprocesses
exactly as training did.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ahnet_fast.data.case import Case, spacing_from_affine

__all__ = ["Preprocessing", "preprocess", "restore_inplane", "resampled_shape", "window_scale"]

_Z_CHUNK = 32  # slices resampled at a time: bounds the temporary (Z, 1, X, Y) float32 copies


@dataclass
class Preprocessing:
    """In-plane target spacing in mm (None: keep the acquired grid) and the HU window mapped to [0, 1]."""

    spacing_xy: float | None = 1.6
    window: tuple[float, float] = (-200.0, 250.0)

    def __post_init__(self) -> None:
        if self.spacing_xy is not None:
            if isinstance(self.spacing_xy, bool) or not isinstance(self.spacing_xy, (int, float, np.number)):
                raise ValueError(f"Preprocessing: spacing_xy must be a number (mm) or None, got {self.spacing_xy!r}")
            if not (np.isfinite(self.spacing_xy) and self.spacing_xy > 0):
                raise ValueError(f"Preprocessing: spacing_xy must be > 0 mm, got {self.spacing_xy!r}")
            self.spacing_xy = float(self.spacing_xy)
        try:
            lo, hi = (float(v) for v in self.window)
        except (TypeError, ValueError):
            msg = f"Preprocessing: window must be two numbers (low, high) in HU, got {self.window!r}"
            raise ValueError(msg) from None
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise ValueError(f"Preprocessing: window must satisfy low < high, got {self.window!r}")
        self.window = (lo, hi)

    def to_dict(self) -> dict:
        """Plain Python types only (float / None / list), for checkpoints and JSON."""
        return {"spacing_xy": self.spacing_xy, "window": [self.window[0], self.window[1]]}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        """Inverse of :meth:`to_dict`. Both keys are required and no others are accepted: a
        checkpoint whose preprocessing cannot be reproduced exactly must not load with defaults."""
        if not isinstance(d, dict):
            raise ValueError(f"Preprocessing.from_dict: expected a dict, got {type(d).__name__}")
        keys = {"spacing_xy", "window"}
        if set(d) != keys:
            missing, unknown = sorted(keys - set(d)), sorted(set(d) - keys)
            raise ValueError(f"Preprocessing.from_dict: missing keys {missing}, unknown keys {unknown} in {d!r}")
        return cls(spacing_xy=d["spacing_xy"], window=d["window"])


def resampled_shape(
    shape_xy: tuple[int, int], spacing_xy: tuple[float, float], target: float | None
) -> tuple[int, int]:
    """In-plane size after resampling to ``target`` mm: the field of view is kept, rounded to voxels."""
    if target is None:
        return (int(shape_xy[0]), int(shape_xy[1]))
    return tuple(max(1, int(round(n * s / target))) for n, s in zip(shape_xy, spacing_xy))


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output voxel for nearest-neighbour resampling with the voxel grids'
    outer edges aligned (torch's "nearest-exact", scipy's convention). Done by indexing rather
    than torch.interpolate so that any label dtype (uint8, int64, bool) is supported."""
    idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def _resample_nearest(array: np.ndarray, shape_xy: tuple[int, int], x_axis: int) -> np.ndarray:
    ix = _nearest_index(array.shape[x_axis], shape_xy[0])
    iy = _nearest_index(array.shape[x_axis + 1], shape_xy[1])
    return np.take(np.take(array, ix, axis=x_axis), iy, axis=x_axis + 1)


def _resample_linear(array: np.ndarray, shape_xy: tuple[int, int]) -> np.ndarray:
    """Bilinear in-plane resampling of (X, Y, Z) float32 in chunks of slices.

    ``antialias=True``: when downsampling (0.7 -> 1.6 mm) the kernel is widened to the output
    spacing, so CT noise and thin structures are averaged instead of aliased; for upsampling it
    is plain bilinear. ``align_corners=False`` matches :func:`_nearest_index` and the affine update.
    """
    X, Y, Z = array.shape
    out = np.empty((shape_xy[0], shape_xy[1], Z), dtype=np.float32)
    for z0 in range(0, Z, _Z_CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(array[:, :, z0 : z0 + _Z_CHUNK].transpose(2, 0, 1)))
        res = F.interpolate(chunk[:, None], size=tuple(shape_xy), mode="bilinear", align_corners=False, antialias=True)
        out[:, :, z0 : z0 + _Z_CHUNK] = res[:, 0].numpy().transpose(1, 2, 0)
    return out


def _resampled_affine(affine: np.ndarray, shape_in: tuple[int, int], shape_out: tuple[int, int]) -> np.ndarray:
    """Affine of the resampled grid: output voxel i' sits at input index (i' + 0.5) * n/n' - 0.5
    (edges aligned), so each in-plane column scales by n/n' and the origin moves half an old
    voxel minus half a new one along it."""
    out = affine.copy()
    for axis in (0, 1):
        scale = shape_in[axis] / shape_out[axis]
        out[:3, axis] = affine[:3, axis] * scale
        out[:3, 3] += affine[:3, axis] * 0.5 * (scale - 1.0)
    return out


def window_scale(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip HU to ``window`` and scale it to [0, 1], float32."""
    lo, hi = window
    out = np.clip(image, lo, hi).astype(np.float32, copy=False)
    out -= np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return out


def preprocess(case: Case, prep: Preprocessing) -> Case:
    """Resample ``case`` in-plane to ``prep.spacing_xy`` (image bilinear, label nearest; Z as
    acquired), update its affine and spacing to the actual new grid (the rounded size makes the
    spacing differ slightly from the target), then window and scale the image to [0, 1] float32.

    The header is kept: it describes the original file, which is where outputs are written back to
    after :func:`restore_inplane`.
    """
    if not isinstance(prep, Preprocessing):
        raise ValueError(f"preprocess({case.name}): prep must be a Preprocessing, got {type(prep).__name__}")
    X, Y, Z = case.image.shape
    new_xy = resampled_shape((X, Y), case.spacing[:2], prep.spacing_xy)
    image, label, affine = case.image, case.label, case.affine
    if new_xy != (X, Y):
        image = _resample_linear(np.asarray(image, dtype=np.float32), new_xy)
        if label is not None:
            label = _resample_nearest(label, new_xy, x_axis=0)
        affine = _resampled_affine(case.affine, (X, Y), new_xy)
    image = window_scale(image, prep.window)  # always a new array: the input case is left untouched
    return replace(case, image=image, label=label, affine=affine, spacing=spacing_from_affine(affine))


def restore_inplane(array, shape_xy: tuple[int, int], *, is_label: bool) -> np.ndarray:
    """Map an (X', Y', Z) or (C, X', Y', Z) array (numpy or torch) back to the in-plane size
    ``shape_xy`` of the original volume: nearest for labels (dtype kept), bilinear for
    probabilities / logits (float32). The exact inverse grid of :func:`preprocess`."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim not in (3, 4):
        raise ValueError(f"restore_inplane: expected (X, Y, Z) or (C, X, Y, Z), got shape {array.shape}")
    shape_xy = tuple(int(s) for s in shape_xy)
    if len(shape_xy) != 2 or min(shape_xy) < 1:
        raise ValueError(f"restore_inplane: shape_xy must be two positive sizes, got {shape_xy}")
    x_axis = array.ndim - 3
    if tuple(array.shape[x_axis : x_axis + 2]) == shape_xy:
        return array.copy() if is_label else array.astype(np.float32)
    if is_label:
        return _resample_nearest(array, shape_xy, x_axis=x_axis)
    if array.ndim == 3:
        return _resample_linear(array.astype(np.float32, copy=False), shape_xy)
    return np.stack([_resample_linear(a.astype(np.float32, copy=False), shape_xy) for a in array])
