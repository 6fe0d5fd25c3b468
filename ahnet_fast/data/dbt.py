"""Synthetic digital breast tomosynthesis (DBT) volumes with lesion centres, for the detection task.

Why these ingredients: what makes DBT detection hard, and AH-Net's design fit it, is the geometry
and the texture, so the phantom reproduces those rather than photorealism:

- anisotropy: detectors resolve ~0.1 mm in-plane while reconstructed slices are 1 mm apart; the
  volume is generated at a working in-plane spacing (default 0.5 mm, what a detector's 0.1 mm is
  commonly resampled to for detection) with 1 mm slices;
- limited-angle blur: tomosynthesis sweeps a narrow arc, so structures are sharp in their own slice
  and smeared over neighbouring ones; the whole volume is blurred along the slice axis only;
- the compressed breast: a half-ellipse against the chest wall (at x = 0), the full compressed
  thickness inside and a rounded edge, air outside, a thin skin line;
- fibroglandular texture: breast tissue has a power-law spectrum (power ~ 1/f^3, as measured on
  mammograms and breast CT); a field with that spectrum, denser towards the chest wall, mixes fat and
  glandular attenuation, so masses hide in look-alike tissue;
- lesions of realistic sizes: masses 5-20 mm across with lobulated margins, a little denser than
  glandular tissue; calcification clusters, 5-15 specks of one voxel (0.5 mm) within 3-6 mm, much
  brighter but tiny.

Intensities are normalised attenuation: air 0, fat ~0.35, glandular ~0.6, masses ~0.75, calcifications
~1, plus quantum noise. Each lesion is a :class:`ahnet_fast.detection.Lesion` (world centre in mm and
radius), the form that :func:`ahnet_fast.detection.froc` scores and that
:func:`ahnet_fast.detection.heatmap_target` turns into a training target. Everything comes from one
``numpy.random.Generator`` seeded from the case's seed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ahnet_fast.data.case import Case
from ahnet_fast.data.synthetic import _check_seed, derive_case_seed
from ahnet_fast.detection import Lesion, heatmap_target

__all__ = ["DBT_SPACING_XY", "DetectionCase", "make_synthetic_dbt", "synthetic_dbt_cases", "with_target"]

FAT, GLAND, MASS, CALC, SKIN = 0.35, 0.60, 0.75, 1.0, 0.55
# the working in-plane spacing of detection (mm): the synthetic volumes are made at it, and real DBT
# (~0.1 mm) is resampled to it unless told otherwise; masses stay 10-40 voxels across, a 0.5 mm
# calcification one voxel
DBT_SPACING_XY = 0.5


@dataclass
class DetectionCase(Case):
    """A volume with lesion centres (:class:`ahnet_fast.detection.Lesion`, world millimetres) instead of
    a label map; ``kinds`` says what each lesion is ("mass" or "calcifications"). ``target`` is the
    training target (float32 heat map on the image grid, see :func:`with_target`); ``label`` is then the
    mask target > 0.5, which the samplers use to centre patches on lesions."""

    lesions: tuple = ()
    kinds: tuple = ()
    target: np.ndarray | None = None


def with_target(case: DetectionCase, **heatmap_kw) -> DetectionCase:
    """``case`` with its heat-map ``target`` (:func:`ahnet_fast.detection.heatmap_target`) and the lesion
    mask as ``label``."""
    target = heatmap_target(case.image.shape, case.affine, case.lesions, **heatmap_kw)
    return dataclasses.replace(case, target=target, label=(target > 0.5).astype(np.uint8))


def _power_law_field(rng: np.random.Generator, shape, spacing, beta: float = 3.0) -> np.ndarray:
    """Unit-variance Gaussian field whose power falls as 1/f^beta (f in cycles per mm, so the texture
    is the same in millimetres whatever the voxel size)."""
    freqs = [np.fft.fftfreq(n, d=s) for n, s in zip(shape[:-1], spacing[:-1])] + \
        [np.fft.rfftfreq(shape[-1], d=spacing[-1])]
    f2 = sum(np.meshgrid(*[f ** 2 for f in freqs], indexing="ij", sparse=True))
    amplitude = (np.maximum(f2, 1.0 / 50.0 ** 2)) ** (-beta / 4.0)  # |F|^2 ~ f^-beta; flat below 1/50 mm
    spectrum = amplitude * (rng.standard_normal(amplitude.shape) + 1j * rng.standard_normal(amplitude.shape))
    field = np.fft.irfftn(spectrum, s=shape, axes=(0, 1, 2)).astype(np.float32)
    field -= field.mean()
    return field / max(float(field.std()), 1e-12)


def _blur_slices(vol: np.ndarray, sigma_slices: float) -> np.ndarray:
    """Gaussian blur along the slice axis only (the limited-angle spread), edges reflected."""
    radius = int(np.ceil(3 * sigma_slices))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_slices) ** 2)
    k /= k.sum()
    padded = np.pad(vol, ((0, 0), (0, 0), (radius, radius)), mode="reflect")
    out = np.zeros_like(vol)
    for i, w in enumerate(k):
        out += w * padded[:, :, i:i + vol.shape[2]]
    return out


def make_synthetic_dbt(seed: int, *, size_xy: int = 192, spacing_xy: float = DBT_SPACING_XY, slices: tuple[int, int] = (32, 48),
                       masses: tuple[int, int] = (1, 3), clusters: tuple[int, int] = (0, 2),
                       name: str | None = None) -> DetectionCase:
    """One DBT-like volume (X, Y, Z) = (size_xy, size_xy, 32-48 slices) at ``spacing_xy`` mm in-plane
    and 1 mm slices, with 1-3 masses and 0-2 calcification clusters (ranges inclusive)."""
    _check_seed(seed, "seed")
    if int(size_xy) < 48:
        raise ValueError(f"make_synthetic_dbt: size_xy must be >= 48 voxels, got {size_xy}")
    if not spacing_xy > 0:
        raise ValueError(f"make_synthetic_dbt: spacing_xy must be positive, got {spacing_xy}")
    if not (1 <= slices[0] <= slices[1]) or not (0 <= masses[0] <= masses[1]) or not (0 <= clusters[0] <= clusters[1]):
        raise ValueError(f"make_synthetic_dbt: ranges must be (low, high) with 0 <= low <= high (slices >= 1), "
                         f"got slices={slices}, masses={masses}, clusters={clusters}")
    rng = np.random.default_rng(seed)
    name = name or f"dbt-{seed % 10**6:06d}"
    nz = int(rng.integers(slices[0], slices[1] + 1))
    shape = (int(size_xy), int(size_xy), nz)
    spacing = (float(spacing_xy), float(spacing_xy), 1.0)
    x, y = np.meshgrid(np.arange(shape[0]) + 0.5, np.arange(shape[1]) + 0.5, indexing="ij")

    # the compressed breast: a half-ellipse from the chest wall (x = 0), rounded at its edge
    a = rng.uniform(0.75, 0.95) * shape[0]
    b = rng.uniform(0.36, 0.47) * shape[1]
    yc = shape[1] / 2 + rng.uniform(-0.04, 0.04) * shape[1]
    rho = np.sqrt((x / a) ** 2 + ((y - yc) / b) ** 2)  # 0 at the chest wall's centre, 1 at the skin
    edge = np.clip((rho - 0.8) / 0.2, 0.0, None)
    half_thickness = (nz / 2 - 0.5) * np.sqrt(np.clip(1.0 - edge ** 2, 0.0, 1.0))  # in slices
    z = np.arange(nz) + 0.5 - nz / 2
    inside = (rho[..., None] <= 1.0) & (np.abs(z)[None, None, :] <= half_thickness[..., None])

    # fibroglandular tissue: power-law texture, denser near the chest wall and the centre
    field = _power_law_field(rng, shape, spacing)
    bias = 1.2 * (1.0 - rho)[..., None] - rng.uniform(0.3, 0.8)
    gland_fraction = 1.0 / (1.0 + np.exp(-(field + bias) / 0.35))
    vol = np.where(inside, FAT + (GLAND - FAT) * gland_fraction, 0.0).astype(np.float32)
    # the skin: a line one or two voxels thick at the in-plane boundary
    shell = inside & (rho[..., None] > 1.0 - 1.5 / min(a, b))
    vol[shell] = SKIN

    lesions, kinds = [], []
    grid = np.stack(np.meshgrid(*(np.arange(n) + 0.0 for n in shape), indexing="ij"), axis=-1)  # voxel centres

    def place(radius_mm):
        """A centre well inside the breast (its radius off the skin and off the first/last slice)."""
        for _ in range(200):
            cx, cy = rng.uniform(0.05, 0.85) * a, yc + rng.uniform(-0.75, 0.75) * b
            i, j = int(cx), int(cy)
            if not (0 <= i < shape[0] and 0 <= j < shape[1]) or rho[i, j] > 0.8 - radius_mm / (min(a, b) * spacing_xy):
                continue
            hz = half_thickness[i, j] - radius_mm - 2
            if hz <= 0:
                continue
            cz = nz / 2 - 0.5 + rng.uniform(-hz, hz)
            c = np.array([cx, cy, cz])
            # apart from the lesions already placed (each lesion is one thing to find)
            if any(np.linalg.norm((c - np.asarray(les.position_mm) / spacing) * spacing) < radius_mm + les.radius_mm + 2
                   for les in lesions):
                continue
            return c
        return None

    for _ in range(int(rng.integers(masses[0], masses[1] + 1))):
        radius_mm = float(rng.uniform(2.5, 10.0))
        c = place(radius_mm)
        if c is None:
            continue
        d_mm = np.linalg.norm((grid - c) * spacing, axis=-1)
        # lobulated margin: the radius varies with direction (a few low-order lobes)
        direction = np.arctan2((grid[..., 1] - c[1]), (grid[..., 0] - c[0]))
        lobes = 1.0 + sum(rng.uniform(0.03, 0.12) * np.cos(k * direction + rng.uniform(0, 2 * np.pi))
                          for k in (2, 3, 5))
        margin = radius_mm * lobes
        inside_mass = 1.0 / (1.0 + np.exp((d_mm - margin) / 0.4))  # a soft edge ~0.4 mm
        vol = vol + inside_mass.astype(np.float32) * (MASS - vol) * inside
        lesions.append(Lesion(name, tuple(float(v) for v in c * spacing), radius_mm))
        kinds.append("mass")

    for _ in range(int(rng.integers(clusters[0], clusters[1] + 1))):
        radius_mm = float(rng.uniform(3.0, 6.0))
        c = place(radius_mm)
        if c is None:
            continue
        n = int(rng.integers(5, 16))
        offsets = rng.normal(0.0, radius_mm / 2.0, size=(n, 3)) / np.array(spacing)
        for p in np.round(c + offsets).astype(int):
            if all(0 <= p[k] < shape[k] for k in range(3)) and inside[tuple(p)]:
                vol[tuple(p)] = CALC * rng.uniform(0.9, 1.1)
        lesions.append(Lesion(name, tuple(float(v) for v in c * spacing), radius_mm))
        kinds.append("calcifications")

    vol = _blur_slices(vol, sigma_slices=1.5)
    vol += rng.normal(0.0, rng.uniform(0.015, 0.03), size=shape).astype(np.float32) * (vol > 0.05)
    vol = np.clip(vol, 0.0, 1.0).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    return DetectionCase(name=name, image=vol, label=None, spacing=spacing, affine=affine,
                         lesions=tuple(lesions), kinds=tuple(kinds))


def synthetic_dbt_cases(n: int, seed: int = 0, **kw) -> list[DetectionCase]:
    """``n`` independent volumes of the set drawn with ``seed`` (see :func:`derive_case_seed`)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"synthetic_dbt_cases: n must be a positive integer, got {n!r}")
    return [make_synthetic_dbt(derive_case_seed(seed, i), name=f"dbt-{seed}-{i:04d}", **kw) for i in range(n)]
