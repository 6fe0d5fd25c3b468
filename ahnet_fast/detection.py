"""Lesion detection from a predicted heat map: candidates, and their FROC against the truth.

A detection network (the paper's DBT task) predicts, per voxel, how close a lesion centre is; the
lesions are then the heat map's local maxima. :func:`find_peaks` finds them by 3D max-pool
non-maximum suppression whose window is the box inside a physical radius's sphere (anisotropic in
voxels, as DBT's 0.1 mm in-plane / 1 mm slice spacing is), followed by greedy suppression in
millimetres: from the highest, a maximum is kept unless a kept one lies within the radius. Positions are reported in the volume's world coordinates (its affine), so candidates from
a resampled volume compare directly with truth given on the original one.

:func:`froc` scores candidates against lesions with the conventions of the LUNA16 and DBTex
challenges, stated here because FROC numbers are only comparable under the same rules:

- a candidate *hits* a lesion when its distance to the lesion's centre is at most the lesion's
  radius (or, for lesions given as points, a stated ``hit_distance_mm``);
- a lesion's score is the highest score among the candidates that hit it (it is found at every
  threshold up to that score); a lesion no candidate hits is never found;
- a candidate that hits at least one lesion is never a false positive, also when another candidate
  already hit the same lesion (duplicates are neither true nor false positives) and when it hits
  two lesions (it finds both);
- every other candidate is a false positive; false positives are counted per volume over every
  volume evaluated, lesion-free volumes included;
- the sensitivity at a rate r of false positives per volume is the highest sensitivity of any score
  threshold whose false-positive rate is at most r (0 when even the highest threshold exceeds r);
  the CPM-style summary is the mean over the rates (by default 1/8, 1/4, 1/2, 1, 2 and 4).
"""
from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ahnet_fast.data.case import is_valid_affine, spacing_from_affine

FROC_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass(frozen=True)
class Candidate:
    """A detected lesion: volume name, centre in world millimetres (x, y, z), score."""

    case: str
    position_mm: tuple[float, float, float]
    score: float


@dataclass(frozen=True)
class Lesion:
    """A true lesion: volume name, centre in world millimetres, and its radius (None: a point, judged
    with the evaluation's hit distance)."""

    case: str
    position_mm: tuple[float, float, float]
    radius_mm: float | None = None


@dataclass
class FrocResult:
    """FROC of one evaluation: ``sensitivity`` at each of ``rates`` false positives per volume, their
    mean ``cpm``, and the whole curve (``curve_fp_per_volume``, ``curve_sensitivity``, one point per
    distinct score threshold, from the highest threshold down)."""

    rates: tuple[float, ...]
    sensitivity: tuple[float, ...]
    cpm: float
    curve_fp_per_volume: np.ndarray
    curve_sensitivity: np.ndarray
    curve_threshold: np.ndarray
    n_lesions: int
    n_volumes: int
    n_found: int          # lesions hit by any candidate (the curve's final sensitivity x n_lesions)
    n_false_positives: int
    n_duplicates: int     # candidates that hit an already-hit lesion: neither true nor false positive
    hit_rule: str = field(default="")

    def as_dict(self) -> dict:
        return {"rates": list(self.rates), "sensitivity": list(self.sensitivity), "cpm": self.cpm,
                "n_lesions": self.n_lesions, "n_volumes": self.n_volumes, "n_found": self.n_found,
                "n_false_positives": self.n_false_positives, "n_duplicates": self.n_duplicates,
                "hit_rule": self.hit_rule,
                "curve": {"fp_per_volume": self.curve_fp_per_volume.tolist(),
                          "sensitivity": self.curve_sensitivity.tolist(),
                          "threshold": self.curve_threshold.tolist()}}


# ---------------------------------------------------------------- the training target

def heatmap_target(shape, affine, lesions: Sequence[Lesion], *, sigma_fraction: float = 0.5,
                   min_sigma_mm: float = 1.0, point_sigma_mm: float = 2.0) -> np.ndarray:
    """The detection target of a volume: for each lesion a Gaussian of height 1 at its centre, with
    sigma = ``sigma_fraction`` x its radius in millimetres (at least ``min_sigma_mm``; lesions given as
    points: ``point_sigma_mm``), so anisotropic in voxels when the spacing is; where lesions overlap,
    the maximum. float32 (X, Y, Z) on the grid of ``shape`` and ``affine``. Lesions' world positions
    are mapped to voxels with the affine's inverse, so the target sits where the image shows them."""
    shape = tuple(int(n) for n in shape)
    affine = np.asarray(affine, dtype=np.float64)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"heatmap_target: shape must be three positive sizes, got {shape}")
    target = np.zeros(shape, dtype=np.float32)
    spacing = np.asarray(spacing_from_affine(affine))
    to_voxel = np.linalg.inv(affine)
    for les in lesions:
        sigma_mm = point_sigma_mm if les.radius_mm is None else max(sigma_fraction * les.radius_mm, min_sigma_mm)
        centre = (to_voxel @ np.r_[les.position_mm, 1.0])[:3]
        sigma = sigma_mm / spacing  # voxels, per axis
        lo = np.maximum(np.floor(centre - 3 * sigma).astype(int), 0)
        hi = np.minimum(np.ceil(centre + 3 * sigma).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue  # entirely outside this grid (a patch that misses the lesion)
        axes = [(np.arange(lo[k], hi[k]) - centre[k]) / sigma[k] for k in range(3)]
        g = np.exp(-0.5 * (axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2))
        box = target[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        np.maximum(box, g.astype(np.float32), out=box)
    return target


# ---------------------------------------------------------------- peak finding

def find_peaks(heatmap, affine, *, radius_mm: float = 5.0, threshold: float = 0.5, max_candidates: int = 100,
               case: str = "") -> list[Candidate]:
    """Local maxima of ``heatmap`` (X, Y, Z), numpy or torch, at least ``threshold``, none within
    ``radius_mm`` (world distance) of a higher kept one, highest first, at most ``max_candidates``; each a
    :class:`Candidate` at the voxel centre's world position (``affine``: voxel to world, 4x4)."""
    vol = torch.as_tensor(np.asarray(heatmap) if not isinstance(heatmap, torch.Tensor) else heatmap)
    if vol.dim() != 3 or vol.numel() == 0:
        raise ValueError(f"find_peaks: expected a non-empty (X, Y, Z) heat map, got shape {tuple(vol.shape)}")
    if not vol.is_floating_point():
        vol = vol.float()
    bad = int((~torch.isfinite(vol)).sum())
    if bad:
        raise ValueError(f"find_peaks{f' ({case})' if case else ''}: the heat map has {bad} NaN or infinite values")
    affine = np.asarray(affine, dtype=np.float64)
    if not is_valid_affine(affine):
        raise ValueError(f"find_peaks: affine must be a finite, invertible 4x4 matrix, got {affine.tolist()}")
    if not (radius_mm > 0 and math.isfinite(radius_mm)):
        raise ValueError(f"find_peaks: radius_mm must be a positive number, got {radius_mm}")
    if int(max_candidates) < 1:
        raise ValueError(f"find_peaks: max_candidates must be >= 1, got {max_candidates}")
    spacing = spacing_from_affine(affine)
    # local maxima over the largest box inside the radius's sphere (half-width radius/sqrt(3) mm per
    # axis: anisotropic in voxels): a voxel that is not one has a higher voxel closer than the radius.
    # A box as wide as the radius would also drop peaks in its corners, up to sqrt(3) radii away.
    half = [max(int(math.floor(radius_mm / (math.sqrt(3.0) * s))), 0) for s in spacing]
    kernel = [2 * h + 1 for h in half]
    x = vol.float()[None, None]
    pooled = torch.nn.functional.max_pool3d(x, kernel, stride=1, padding=half)[0, 0]
    peak = (vol.float() == pooled) & (vol.float() >= threshold)
    idx = torch.nonzero(peak).numpy()
    if idx.size == 0:
        return []
    scores = vol.float()[peak].numpy().astype(np.float64)
    order = np.lexsort((idx[:, 2], idx[:, 1], idx[:, 0], -scores))  # highest first; ties in voxel order
    idx, scores = idx[order], scores[order]
    world = (affine @ np.c_[idx, np.ones(len(idx))].T).T[:, :3]
    kept: list[int] = []
    for i in range(len(idx)):  # greedy suppression in millimetres (plateaus and the box's corners)
        if kept and np.min(np.linalg.norm(world[kept] - world[i], axis=1)) <= radius_mm:
            continue
        kept.append(i)
        if len(kept) == max_candidates:
            break
    return [Candidate(case, tuple(float(v) for v in world[i]), float(scores[i])) for i in kept]


# ---------------------------------------------------------------- FROC

def froc(candidates: Sequence[Candidate], lesions: Sequence[Lesion], cases: Sequence[str] | None = None, *,
         hit_distance_mm: float | None = None, rates: Sequence[float] = FROC_RATES) -> FrocResult:
    """FROC of ``candidates`` against ``lesions`` over the volumes ``cases`` (default: every volume that
    has a lesion or a candidate; pass the full list so that lesion-free volumes without candidates
    count). Rules in the module docstring. ValueError for a candidate or lesion of a volume not in
    ``cases``, a lesion without a radius when no ``hit_distance_mm`` is given, non-finite numbers."""
    candidates, lesions = list(candidates), list(lesions)
    if cases is None:
        cases = sorted({c.case for c in candidates} | {les.case for les in lesions})
    cases = list(dict.fromkeys(cases))
    if not cases:
        raise ValueError("froc: no volumes to evaluate (no cases, candidates or lesions given)")
    known = set(cases)
    unknown = sorted({c.case for c in candidates} - known)
    if unknown:
        raise ValueError(f"froc: candidates for {len(unknown)} volume(s) that are not evaluated: "
                         f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    unknown = sorted({les.case for les in lesions} - known)
    if unknown:
        raise ValueError(f"froc: lesions in {len(unknown)} volume(s) that are not evaluated: {', '.join(unknown[:5])}")
    if hit_distance_mm is not None and not (hit_distance_mm > 0 and math.isfinite(hit_distance_mm)):
        raise ValueError(f"froc: hit_distance_mm must be a positive number, got {hit_distance_mm}")
    rates = tuple(float(r) for r in rates)
    if not rates or any(not (r > 0 and math.isfinite(r)) for r in rates):
        raise ValueError(f"froc: rates must be positive numbers, got {rates}")
    for c in candidates:
        if not (math.isfinite(c.score) and all(math.isfinite(v) for v in c.position_mm)):
            raise ValueError(f"froc: candidate in {c.case} at {c.position_mm} with score {c.score}: not finite")
    reach = []
    for les in lesions:
        r = les.radius_mm if les.radius_mm is not None else hit_distance_mm
        if r is None:
            raise ValueError(f"froc: the lesion in {les.case} at {les.position_mm} has no radius; give "
                             "hit_distance_mm (--hit-distance-mm) for lesions given as points")
        if not (r > 0 and math.isfinite(r)) or not all(math.isfinite(v) for v in les.position_mm):
            raise ValueError(f"froc: the lesion in {les.case} at {les.position_mm} with radius {r}: not a positive, "
                             "finite size at a finite position")
        reach.append(float(r))

    lesion_score = np.full(len(lesions), -np.inf)
    fp_scores = []
    duplicates = 0
    by_case: dict[str, list[int]] = {}
    for i, les in enumerate(lesions):
        by_case.setdefault(les.case, []).append(i)
    hit_before = np.zeros(len(lesions), dtype=bool)
    for c in sorted(candidates, key=lambda c: -c.score):
        hits = [i for i in by_case.get(c.case, ())
                if math.dist(c.position_mm, lesions[i].position_mm) <= reach[i]]
        if not hits:
            fp_scores.append(c.score)
            continue
        if all(hit_before[i] for i in hits):
            duplicates += 1
        for i in hits:
            lesion_score[i] = max(lesion_score[i], c.score)
            hit_before[i] = True

    n_vol, n_les = len(cases), len(lesions)
    fp_scores = np.sort(np.asarray(fp_scores, dtype=np.float64))[::-1]
    thresholds = np.unique(np.r_[fp_scores, lesion_score[np.isfinite(lesion_score)]])[::-1]
    found_sorted = np.sort(lesion_score)  # -inf for never found
    # counts at score >= t, for each threshold t (from the highest down)
    tp = (len(found_sorted) - np.searchsorted(found_sorted, thresholds, side="left")).astype(np.float64)
    fp = np.searchsorted(-fp_scores, -thresholds, side="right").astype(np.float64)
    sens = tp / n_les if n_les else np.zeros_like(tp)
    fppv = fp / n_vol
    curve_fp, curve_sens, curve_thr = np.r_[0.0, fppv], np.r_[0.0, sens], np.r_[np.inf, thresholds]
    at = []
    for r in rates:
        ok = curve_fp <= r
        at.append(float(curve_sens[ok].max()) if ok.any() else 0.0)
    rule = ("within each lesion's radius" if hit_distance_mm is None else
            f"within each lesion's radius, or {hit_distance_mm:g} mm of a lesion given as a point")
    return FrocResult(rates=rates, sensitivity=tuple(at), cpm=float(np.mean(at)), curve_fp_per_volume=curve_fp,
                      curve_sensitivity=curve_sens, curve_threshold=curve_thr, n_lesions=n_les, n_volumes=n_vol,
                      n_found=int(np.isfinite(lesion_score).sum()), n_false_positives=len(fp_scores),
                      n_duplicates=duplicates, hit_rule=rule)


# ---------------------------------------------------------------- CSV files

CANDIDATE_COLUMNS = ("case", "x_mm", "y_mm", "z_mm", "score")
TRUTH_COLUMNS = ("case", "x_mm", "y_mm", "z_mm")  # and optionally radius_mm


def _rows(path, required: Sequence[str], what: str):
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path}: no such file")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise ValueError(f"{what} {path}: missing column(s) {', '.join(missing)}; the header must have "
                                 f"{', '.join(required)} (it has {', '.join(header) or 'nothing'})")
            reader.fieldnames = header
            for line, row in enumerate(reader, start=2):
                if None in row:
                    raise ValueError(f"{path}:{line}: more fields than the header's {len(header)}")
                yield line, {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items()}
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path}: not a text CSV file ({exc})") from exc


def _number(row: dict, key: str, path, line: int, *, positive: bool = False, minimum: float | None = None) -> float:
    """``row[key]`` as a finite number (optionally > 0 or >= ``minimum``); ValueError naming file and line."""
    text = row.get(key)
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{path}:{line}: {key} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{path}:{line}: {key} is {text}, not a finite number")
    if positive and value <= 0:
        raise ValueError(f"{path}:{line}: {key} must be positive, got {text}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{path}:{line}: {key} must be >= {minimum:g}, got {text}")
    return value


def read_candidates(path) -> list[Candidate]:
    """Candidates from a CSV with the columns case, x_mm, y_mm, z_mm, score (world millimetres)."""
    out = []
    for line, row in _rows(path, CANDIDATE_COLUMNS, "candidates"):
        if not row["case"]:
            raise ValueError(f"{path}:{line}: empty case name")
        pos = tuple(_number(row, k, path, line) for k in ("x_mm", "y_mm", "z_mm"))
        out.append(Candidate(row["case"], pos, _number(row, "score", path, line)))
    return out


def read_truth(path) -> tuple[list[Lesion], list[str]]:
    """(lesions, every volume named) from a CSV with the columns case, x_mm, y_mm, z_mm and optionally
    radius_mm. A row with a case name and empty coordinates names a lesion-free volume (it counts in
    the false positives per volume)."""
    lesions, cases = [], []
    for line, row in _rows(path, TRUTH_COLUMNS, "truth"):
        if not row["case"]:
            raise ValueError(f"{path}:{line}: empty case name")
        cases.append(row["case"])
        coords = [row.get(k) or "" for k in ("x_mm", "y_mm", "z_mm")]
        if not any(coords):
            continue  # a volume without lesions
        pos = tuple(_number(row, k, path, line) for k in ("x_mm", "y_mm", "z_mm"))
        radius = None
        if row.get("radius_mm"):
            radius = _number(row, "radius_mm", path, line)
            if radius <= 0:
                raise ValueError(f"{path}:{line}: radius_mm must be positive, got {radius:g}")
        lesions.append(Lesion(row["case"], pos, radius))
    if not cases:
        raise ValueError(f"truth {path}: no rows")
    return lesions, list(dict.fromkeys(cases))


def write_candidates(path, candidates: Sequence[Candidate]) -> None:
    """Writes candidates as read_candidates reads them, atomically."""
    from ahnet_fast._atomic import atomic_path

    with atomic_path(os.fspath(path)) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CANDIDATE_COLUMNS)
        for c in candidates:
            w.writerow([c.case, *(f"{v:.3f}" for v in c.position_mm), f"{c.score:.6g}"])
