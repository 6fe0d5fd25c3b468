"""Training batches as pure functions of (seed, step, sample index).

Why stateless: sample i of the global batch at step s is drawn from a generator seeded with
``SeedSequence([seed, kind, s, i])`` and nothing else, so

* resuming from a checkpoint at step k reproduces exactly the batches an uninterrupted run would
  have seen (no data-loader state to save), and
* distributed data parallel ranks need no communication: rank r takes global indices
  r, r + world_size, ..., and the union of the ranks' shards is the single-process batch, so a
  run on 4 GPUs with batch 8 sees the same samples as one GPU with batch 8.

Detection cases (:class:`ahnet_fast.data.dbt.DetectionCase` with a heat-map ``target``) give the
target's crop as y (float32) and use their lesion mask as the foreground.

Foreground oversampling: with probability ``foreground_ratio`` a patch is centred on a voxel drawn
uniformly from the case's foreground (label > 0), otherwise placed uniformly. The liver fills only
a few percent of an abdominal CT and lesions far less, so uniform patches alone would mostly
teach "background"; the 2:1 default is nnU-Net's and MONAI's usual choice.

A case smaller than the patch along an axis (few slices, a small crop after resampling) is padded
there, as nnU-Net and MONAI pad: the patch covers the whole axis and sits at a random offset (or
around the foreground voxel), the image padded with 0 (air: the lower end of the HU window, which
preprocessing maps to 0) and the label with background. Padded voxels count as background in the
loss: outside the scanned volume there is air, which is background, and a network that sees the
edge of a volume at inference (padded the same way) should have learnt to call it so.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ahnet_fast.data.case import Case

__all__ = ["PatchSampler", "SliceSampler", "PatchLocation", "PAD_IMAGE", "PAD_LABEL"]

PAD_IMAGE = 0.0  # air: preprocessing maps HU at or below the window's low end to 0
PAD_LABEL = 0  # background


@dataclass(frozen=True)
class PatchLocation:
    """Where one sample comes from: ``case`` (index into the sampler's cases), ``start`` (the
    patch's lowest voxel corner, negative on an axis where the case is smaller than the patch and
    padded; for :class:`SliceSampler` (x, y, z) with z the centre slice) and whether it was drawn as a
    ``foreground``-centred sample."""

    case: int
    start: tuple[int, ...]
    foreground: bool


def _start_range(p: int, n: int) -> tuple[int, int]:
    """Lowest and highest start of a patch of size p on an axis of size n: inside the axis when it is
    long enough, else covering all of it (the rest padded)."""
    return min(0, n - p), max(0, n - p)


def _centred(v: int, p: int, n: int) -> int:
    lo, hi = _start_range(p, n)
    return int(min(max(v - p // 2, lo), hi))


def _padded_crop(array: np.ndarray, start: Sequence[int], size: Sequence[int], fill, dtype) -> np.ndarray:
    """array[start : start + size] along the leading axes, as ``dtype``, with ``fill`` where the box
    leaves the array (the trailing axes are taken whole)."""
    src, dst = [], []
    for s, p, n in zip(start, size, array.shape):
        a, b = max(s, 0), min(s + p, n)
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    if all(d.start == 0 and d.stop == p for d, p in zip(dst, size)):
        return np.asarray(array[tuple(src)], dtype=dtype)
    out = np.full(tuple(size) + array.shape[len(size):], fill, dtype=dtype)
    out[tuple(dst)] = array[tuple(src)]
    return out


def _target(case: Case) -> np.ndarray:
    """What a sample's y is cut from: the heat map of a detection case (whose label, the lesion mask,
    only places the lesion-centred samples), else the label map."""
    target = getattr(case, "target", None)
    return case.label if target is None else target


def _check_int(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class _Sampler:
    """Shared validation, foreground index and drawing; subclasses define the patch geometry."""

    _KIND = -1  # separates the random streams of the two samplers for the same seed
    _PATCH_DIMS = 0

    def __init__(self, cases: Sequence[Case], patch: tuple[int, ...], foreground_ratio: float, seed: int):
        cls = type(self).__name__
        cases = list(cases)
        if not cases:
            raise ValueError(f"{cls}: no cases given")
        patch = tuple(patch)
        if len(patch) != self._PATCH_DIMS:
            raise ValueError(f"{cls}: patch must have {self._PATCH_DIMS} sizes, got {patch!r}")
        self.patch = tuple(_check_int(p, f"{cls}: patch size", 1) for p in patch)
        if (
            isinstance(foreground_ratio, bool)
            or not isinstance(foreground_ratio, (int, float, np.number))
            or not 0.0 <= float(foreground_ratio) <= 1.0
        ):
            raise ValueError(f"{cls}: foreground_ratio must be a number in [0, 1], got {foreground_ratio!r}")
        self.foreground_ratio = float(foreground_ratio)
        self.seed = _check_int(seed, f"{cls}: seed", 0)

        empty = []
        self._foreground: list[np.ndarray] = []
        for case in cases:
            if not isinstance(case, Case):
                raise ValueError(f"{cls}: expected Case objects, got {type(case).__name__}")
            if case.label is None:
                raise ValueError(f"{cls}: case {case.name!r} has no label; training needs labelled cases")
            fg = np.flatnonzero(case.label.reshape(-1) > 0)
            self._foreground.append(fg.astype(np.int32) if case.label.size < 2**31 else fg)
            if fg.size == 0:
                empty.append(case.name)
        if empty and self.foreground_ratio > 0:
            warnings.warn(
                f"{cls}: {len(empty)} case(s) have no foreground voxels ({', '.join(empty[:5])}"
                f"{', ...' if len(empty) > 5 else ''}); their foreground draws are placed uniformly",
                stacklevel=3,
            )
        self.cases = cases

    # -- drawing ------------------------------------------------------------------------------
    def _rng(self, step: int, index: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, self._KIND, step, index]))

    def locate(self, step: int, index: int) -> PatchLocation:
        """Where global sample ``index`` of the batch at ``step`` comes from (a pure function of
        seed, step and index)."""
        step = _check_int(step, "step", 0)
        index = _check_int(index, "index", 0)
        rng = self._rng(step, index)
        ci = int(rng.integers(len(self.cases)))
        case = self.cases[ci]
        want_fg = bool(rng.random() < self.foreground_ratio)
        fg = self._foreground[ci]
        if want_fg and fg.size:
            voxel = np.unravel_index(int(fg[rng.integers(fg.size)]), case.image.shape)
            return PatchLocation(ci, self._centred_start(voxel, case.image.shape), True)
        return PatchLocation(ci, self._uniform_start(rng, case.image.shape), False)

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1):
        """This rank's share of the global batch at ``step``: global indices rank, rank +
        world_size, ... of ``batch_size`` (which must be divisible by ``world_size``)."""
        batch_size = _check_int(batch_size, "batch_size", 1)
        world_size = _check_int(world_size, "world_size", 1)
        rank = _check_int(rank, "rank", 0)
        if rank >= world_size:
            raise ValueError(f"rank {rank} must be < world_size {world_size}")
        if batch_size % world_size:
            raise ValueError(
                f"batch_size {batch_size} is not divisible by world_size {world_size}: every rank must get "
                f"the same number of samples (use a multiple of {world_size})"
            )
        locs = [self.locate(step, i) for i in range(rank, batch_size, world_size)]
        xs, ys = zip(*(self._extract(loc) for loc in locs))
        x = torch.from_numpy(np.stack(xs))
        # labels as int64 class indices; a regression target (a detection case's heat map) as float32
        y = np.stack(ys)
        y = torch.from_numpy(y.astype(np.float32) if y.dtype.kind == "f" else y.astype(np.int64))
        return x, y


class PatchSampler(_Sampler):
    """3D patches for AH-Net: ``batch(step, batch_size, rank=0, world_size=1)`` returns
    ``x`` float32 (b, 1, px, py, pz) and ``y`` int64 (b, px, py, pz)."""

    _KIND = 3
    _PATCH_DIMS = 3

    def __init__(
        self, cases: Sequence[Case], patch: tuple[int, int, int], *, foreground_ratio: float = 0.67, seed: int = 0
    ):
        super().__init__(cases, patch, foreground_ratio, seed)

    def _centred_start(self, voxel, shape):
        return tuple(_centred(v, p, n) for v, p, n in zip(voxel, self.patch, shape))

    def _uniform_start(self, rng, shape):
        return tuple(int(rng.integers(lo, hi + 1)) for lo, hi in map(_start_range, self.patch, shape))

    def _extract(self, loc: PatchLocation):
        case = self.cases[loc.case]
        x = _padded_crop(case.image, loc.start, self.patch, PAD_IMAGE, np.float32)[None]
        y = _target(case)
        return x, _padded_crop(y, loc.start, self.patch, PAD_LABEL, y.dtype)


class SliceSampler(_Sampler):
    """2D samples for the paper's first stage (MCFCN): ``batch(...)`` returns ``x`` float32
    (b, 3, px, py), the slices z-1, z, z+1 as channels (edge slices repeated at the ends of the
    volume), and ``y`` int64 (b, px, py), the centre slice's label."""

    _KIND = 2
    _PATCH_DIMS = 2

    def __init__(
        self, cases: Sequence[Case], patch_xy: tuple[int, int], *, foreground_ratio: float = 0.67, seed: int = 0
    ):
        super().__init__(cases, patch_xy, foreground_ratio, seed)

    def _centred_start(self, voxel, shape):
        xy = tuple(_centred(v, p, n) for v, p, n in zip(voxel[:2], self.patch, shape[:2]))
        return xy + (int(voxel[2]),)

    def _uniform_start(self, rng, shape):
        xy = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in map(_start_range, self.patch, shape[:2]))
        return xy + (int(rng.integers(0, shape[2])),)

    def _extract(self, loc: PatchLocation):
        case = self.cases[loc.case]
        sx, sy, z = loc.start
        zs = np.clip([z - 1, z, z + 1], 0, case.image.shape[2] - 1)
        x = _padded_crop(case.image[:, :, zs], (sx, sy), self.patch, PAD_IMAGE, np.float32).transpose(2, 0, 1)
        target = _target(case)
        y = _padded_crop(target[:, :, z], (sx, sy), self.patch, PAD_LABEL, target.dtype)
        return np.ascontiguousarray(x), y
