"""Synthetic abdominal CT slabs with liver and lesion labels, for demos, tests and smoke training.

Why a phantom and not random blobs: the training pipeline, the windowing [-200, 250] HU and the
foreground sampling are all tuned for CT, so the synthetic cases are stored in Hounsfield units
with the intensities and geometry of a portal-venous abdominal scan: air outside the body, a
subcutaneous fat layer, the abdominal wall, bowel and mesenteric fat, the spine (vertebral bodies
with intervertebral discs, posterior elements), paraspinal muscles, the aorta, kidneys, and a liver
with vessels and hypodense lesions. Voxels are anisotropic (in-plane ~0.8 mm, slices 2.5-5 mm) like
LiTS, so AH-Net's 2D-to-3D design is exercised the way it is on real data.

How hard the task is was chosen on purpose: the liver (90-115 HU, enhanced) is clearly brighter
than the surrounding soft tissue (25-45 HU) after windowing, so a few hundred CPU steps learn it;
lesions are 35-70 HU darker than the liver, often only a few voxels across and under the same
15-25 HU noise, so they are visible but harder. Its size is scaled to the field of view (a
256 x 256 grid at 0.8 mm is ~20 cm), so the anatomy is proportionally, not literally, sized.

Orientation: the affine is diagonal and positive (RAS+), so +X is the patient's right (where the
liver is), +Y anterior, +Z superior. Labels: 0 background, 1 liver (vessels inside included, as in
LiTS), 2 lesion (lesion voxels are 2, not 1).

Everything is vectorised numpy (plus torch's trilinear upsampling for the smooth random fields);
a 256 x 256 x 50 case takes well under a second. Every random draw comes from one
``numpy.random.Generator`` seeded from the case's seed, so a seed always gives the same case.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ahnet_fast.data.case import Case

__all__ = ["make_synthetic_case", "synthetic_cases", "derive_case_seed"]

_HU_MIN, _HU_MAX = -1024.0, 3071.0


def derive_case_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` of a synthetic set drawn with ``seed`` (a 64-bit integer).

    SeedSequence mixing makes the cases of one set independent of each other and of other sets'
    cases, unlike ``seed + index`` where set 0's case 1 would equal set 1's case 0.
    """
    _check_seed(seed, "seed")
    _check_seed(index, "index")
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])


def _check_seed(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"synthetic data: {what} must be a non-negative integer, got {value!r}")


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], cells: tuple[int, int, int]) -> np.ndarray:
    """A smooth random field of ~unit standard deviation: Gaussian noise on a coarse grid of
    ``cells`` nodes, trilinearly upsampled to ``shape``. Feature size ~ shape / cells."""
    coarse = rng.standard_normal(cells).astype(np.float32)
    up = F.interpolate(torch.from_numpy(coarse)[None, None], size=shape, mode="trilinear", align_corners=True)
    field = up[0, 0].numpy()
    std = float(field.std())
    return field / std if std > 0 else field


def _smooth_xy(a: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 filter along X and Y (edges replicated).

    Stands in for the scanner's point-spread function: it softens the phantom's hard edges into a
    voxel or two of partial-volume blur and, applied to white noise, gives CT-like correlated noise.
    """
    out = a
    for axis in (0, 1):
        src = out
        out = 0.5 * src
        lo = [slice(None)] * src.ndim
        hi = [slice(None)] * src.ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        out[tuple(hi)] += 0.25 * src[tuple(lo)]
        out[tuple(lo)] += 0.25 * src[tuple(hi)]
        first = [slice(None)] * src.ndim
        last = [slice(None)] * src.ndim
        first[axis], last[axis] = slice(0, 1), slice(-1, None)
        out[tuple(first)] += 0.25 * src[tuple(first)]
        out[tuple(last)] += 0.25 * src[tuple(last)]
    return out


def _ellipse(u, v, cu, cv, au, av, angle=0.0):
    """Normalised elliptic radius: < 1 inside the ellipse centred (cu, cv) with semi-axes (au, av)."""
    du, dv = u - cu, v - cv
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        du, dv = c * du + s * dv, -s * du + c * dv
    return np.sqrt((du / au) ** 2 + (dv / av) ** 2)


def _bbox(center, radius_vox, shape):
    """Index slices of the box of half-size ``radius_vox`` (voxels) around ``center``, clipped."""
    return tuple(
        slice(max(0, int(np.floor(c - r)) - 1), min(n, int(np.ceil(c + r)) + 2))
        for c, r, n in zip(center, radius_vox, shape)
    )


def make_synthetic_case(seed: int, *, size_xy: int = 256, min_slices: int = 40, name: str | None = None) -> Case:
    """One synthetic abdominal CT slab (Hounsfield units, float32 (X, Y, Z)) with labels
    0 background / 1 liver / 2 lesion (uint8), deterministic from ``seed``.

    In-plane spacing is drawn in 0.7-0.9 mm, slice spacing in 2.5-5 mm, and the slice count so that
    the slab covers 120-200 mm, but at least ``min_slices`` slices (default 40, so that AH-Net's
    32-slice training patches fit every case). ``size_xy`` is the in-plane grid (X = Y = size_xy, >= 32).
    """
    _check_seed(seed, "seed")
    if isinstance(size_xy, bool) or not isinstance(size_xy, (int, np.integer)) or size_xy < 32:
        raise ValueError(f"make_synthetic_case: size_xy must be an integer >= 32, got {size_xy!r}")
    size_xy = int(size_xy)
    rng = np.random.default_rng(np.random.SeedSequence(int(seed)))

    # ---- geometry ----------------------------------------------------------------------------
    sxy = float(rng.uniform(0.7, 0.9))
    sz = float(rng.uniform(2.5, 5.0))
    extent_z = float(rng.uniform(120.0, 200.0))
    nz = max(8, int(min_slices), int(round(extent_z / sz)))
    shape = (size_xy, size_xy, nz)
    half_fov = 0.5 * size_xy * sxy  # mm per normalised unit

    # Normalised coordinates: u (-1..1, + = patient's right), v (-1..1, + = anterior), w (0..1, + = superior).
    ax1 = (np.arange(size_xy, dtype=np.float32) + 0.5) / size_xy * 2.0 - 1.0
    u = ax1[:, None]
    v = ax1[None, :]
    w = ((np.arange(nz, dtype=np.float32) + 0.5) / nz)[None, None, :]
    u3, v3 = u[:, :, None], v[:, :, None]
    z_mm = (np.arange(nz) * sz).astype(np.float32)

    # ---- body cross-section (constant along z: the abdomen barely changes over 15 cm) ---------
    body_au = rng.uniform(0.80, 0.92)
    body_av = rng.uniform(0.58, 0.70)
    body_cv = rng.uniform(-0.06, 0.04)
    theta = np.arctan2(v - body_cv, u)
    wobble = 1.0 + sum(
        rng.uniform(0.0, 0.025) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)
    )
    # flatter back: shrink the posterior half of the ellipse a little
    rho = _ellipse(u, v, 0.0, body_cv, body_au, body_av) / wobble
    rho = np.where(v < body_cv, rho * (1.0 + 0.12 * ((body_cv - v) / body_av) ** 2), rho)
    fat_t = rng.uniform(0.06, 0.11)
    wall_t = rng.uniform(0.03, 0.05)
    body = rho < 1.0
    cavity = rho < 1.0 - fat_t - wall_t

    hu_fat = rng.uniform(-110.0, -85.0)
    hu_soft = rng.uniform(25.0, 45.0)
    hu_muscle = rng.uniform(45.0, 60.0)

    slice2d = np.full((size_xy, size_xy), -1000.0, dtype=np.float32)
    slice2d[body] = hu_fat
    slice2d[body & (rho < 1.0 - fat_t)] = hu_muscle
    slice2d[cavity] = hu_soft

    # spine: vertebral body, canal, posterior arch and spinous process; paraspinal muscles
    vb_r = rng.uniform(0.085, 0.105)
    vb_cv = body_cv - body_av + rng.uniform(0.30, 0.36)
    vb_cu = rng.uniform(-0.02, 0.02)
    vb = _ellipse(u, v, vb_cu, vb_cv, vb_r * 1.1, vb_r)
    canal_cv = vb_cv - vb_r - 0.045
    canal = _ellipse(u, v, vb_cu, canal_cv, 0.045, 0.04)
    arch = (canal < 1.7) & (canal >= 1.0) & (v < canal_cv + 0.01)
    spinous = _ellipse(u, v, vb_cu, canal_cv - 0.11, 0.022, 0.07) < 1.0
    para = (_ellipse(u, v, vb_cu - 0.15, canal_cv - 0.03, 0.11, 0.08) < 1.0) | (
        _ellipse(u, v, vb_cu + 0.15, canal_cv - 0.03, 0.11, 0.08) < 1.0
    )
    slice2d[para & body] = hu_muscle
    posterior_bone = (arch | spinous) & body
    slice2d[posterior_bone] = rng.uniform(550.0, 750.0)
    slice2d[canal < 1.0] = rng.uniform(5.0, 20.0)
    cortex = (vb < 1.0) & (vb >= 0.8)
    medulla = vb < 0.8
    aorta = _ellipse(u, v, vb_cu - 0.07, vb_cv + vb_r + 0.065, 0.05, 0.05) < 1.0
    slice2d[aorta] = rng.uniform(140.0, 190.0)
    blocked2d = (vb < 1.15) | (canal < 1.7) | spinous | para | aorta | ~cavity  # the liver stays clear of these

    img = np.repeat(slice2d[:, :, None], nz, axis=2)

    # vertebrae and discs along z: cortical shell + cancellous bone, discs (~90 HU) every 26-32 mm
    period = rng.uniform(26.0, 32.0)
    disc = ((z_mm + rng.uniform(0.0, period)) % period) < rng.uniform(6.0, 9.0)
    hu_cortex, hu_cancellous = rng.uniform(600.0, 800.0), rng.uniform(180.0, 280.0)
    vb_cortex_vals = np.where(disc, 90.0, hu_cortex).astype(np.float32)
    vb_medulla_vals = np.where(disc, 90.0, hu_cancellous).astype(np.float32)
    img[cortex] = vb_cortex_vals
    img[medulla] = vb_medulla_vals

    # ---- abdominal contents: texture, mesenteric fat, bowel gas -------------------------------
    cells_z = max(2, int(round(nz * sz / 30.0)) + 1)
    tex = _smooth_field(rng, shape, (9, 9, cells_z))
    fatf = _smooth_field(rng, shape, (7, 7, cells_z))
    cav3 = cavity[:, :, None]
    img += np.where(cav3, 8.0 * tex, 0.0).astype(np.float32)
    mesenteric = cav3 & ~blocked2d[:, :, None] & (fatf + 1.2 * (0.25 - u3) + 0.6 * v3 > 1.1)
    img[mesenteric] = hu_fat + 10.0

    # ---- kidneys with perirenal fat (lower part of the slab; the right one sits lower) --------
    kidney3d = np.zeros(shape, dtype=bool)
    for side in (+1.0, -1.0):
        ku = side * rng.uniform(0.26, 0.32)
        kv = vb_cv + rng.uniform(0.0, 0.06)
        kc_w = rng.uniform(0.15, 0.35) - (0.08 if side > 0 else 0.0)
        k_hw = rng.uniform(24.0, 34.0) / (nz * sz)  # half-height in mm (FOV-scaled), as a slab fraction
        prof = np.sqrt(np.clip(1.0 - ((w[0, 0] - kc_w) / (1.35 * k_hw)) ** 2, 0.0, 1.0))
        kr = _ellipse(u, v, ku, kv, 0.085, 0.12, angle=side * rng.uniform(0.3, 0.6))[:, :, None]
        hu_kidney = rng.uniform(150.0, 190.0)
        zs = np.flatnonzero(prof > 0)  # the slices the kidney (with its fat) reaches: one interval
        if zs.size == 0:
            continue
        z0, z1 = int(zs[0]), int(zs[-1]) + 1
        kl = kr / prof[z0:z1] * 1.35  # < 1.35: perirenal fat, < 1: kidney, < 0.45: renal sinus
        view, cav_k = img[:, :, z0:z1], np.broadcast_to(cav3, kl.shape)
        view[(kl < 1.35) & cav_k] = hu_fat + 15.0
        view[(kl < 1.0) & cav_k] = hu_kidney
        view[(kl < 0.45) & cav_k] = hu_fat + 30.0
        kidney3d[:, :, z0:z1] |= (kl < 1.35) & cav_k

    # bowel gas: 0-3 small pockets on the left / anterior (the liver, painted later, overrides)
    hu_gas = rng.uniform(-950.0, -850.0)
    for _ in range(int(rng.integers(0, 4))):
        centre = np.array([rng.uniform(0.22, 0.52) * size_xy, rng.uniform(0.5, 0.7) * size_xy, rng.uniform(0, nz)])
        radii = rng.uniform(5.0, 12.0) * (half_fov / 100.0) * np.array([1.0, 0.8, 1.0])
        box = _bbox(centre, radii / np.array([sxy, sxy, sz]), shape)
        grids = np.meshgrid(*(np.arange(sl.start, sl.stop) for sl in box), indexing="ij", sparse=True)
        d2 = sum(((g + 0.5 - c) * sp / r) ** 2 for g, c, sp, r in zip(grids, centre, (sxy, sxy, sz), radii))
        img[box][(d2 < 1.0) & cav3[box[0], box[1]]] = hu_gas

    # ---- liver: smooth union of a right lobe and a left lobe, irregular, tapering in z --------
    l_w0 = rng.uniform(-0.05, 0.25)
    l_w1 = rng.uniform(0.85, 1.15)
    l_wc = l_w0 + rng.uniform(0.55, 0.7) * (l_w1 - l_w0)
    t = np.where(w < l_wc, (w - l_wc) / (l_wc - l_w0), (w - l_wc) / (l_w1 - l_wc))
    prof_r = np.sqrt(np.clip(1.0 - t ** 2, 0.0, 1.0)) ** 0.7

    r_cu, r_cv = rng.uniform(0.30, 0.40), body_cv + rng.uniform(-0.02, 0.12)
    r_au, r_av = rng.uniform(0.30, 0.38), rng.uniform(0.36, 0.46)
    l_cu, l_cv = rng.uniform(-0.04, 0.06), body_cv + rng.uniform(0.22, 0.30)
    l_au, l_av = rng.uniform(0.26, 0.34), rng.uniform(0.11, 0.16)
    # the left lobe only reaches the upper part of the liver
    l_low = l_w0 + rng.uniform(0.35, 0.55) * (l_w1 - l_w0)
    prof_l = np.sqrt(np.clip((w - l_low) / max(l_w1 - l_low, 1e-3), 0.0, 1.0) * (w < l_w1)) ** 0.5

    # angular harmonics of the outline that drift slowly along z:
    # cos(k*angle + phase + drift*w) = cos(k*angle + phase) cos(drift*w) - sin(...) sin(drift*w)
    ang_r = np.arctan2(v - r_cv, u - r_cu)
    harm = np.zeros(shape, dtype=np.float32)
    for k in (2, 3, 4, 5):
        amp, ph, drift = rng.uniform(0.0, 0.10 / np.sqrt(k)), rng.uniform(0, 2 * np.pi), rng.uniform(-3, 3)
        a2 = (k * ang_r + ph)[:, :, None]
        harm += (amp * np.cos(a2)) * np.cos(drift * w) - (amp * np.sin(a2)) * np.sin(drift * w)
    liverf = _smooth_field(rng, shape, (6, 6, cells_z))
    lev_r = _ellipse(u, v, r_cu, r_cv, r_au, r_av, angle=rng.uniform(-0.35, 0.35))[:, :, None]
    lev_l = _ellipse(u, v, l_cu, l_cv, l_au, l_av, angle=rng.uniform(-0.3, 0.1))[:, :, None]
    lev_r = lev_r / np.maximum(prof_r, 1e-6)
    lev_l = lev_l / np.maximum(prof_l, 1e-6)
    k_soft = 0.12
    level = -k_soft * np.logaddexp(-lev_r / k_soft, -lev_l / k_soft)  # smooth minimum: one organ
    level = level * (1.0 + harm) + 0.07 * liverf
    liver = (level < 1.0) & ~blocked2d[:, :, None] & ~kidney3d
    if not liver.any():  # cannot happen with the ranges above; guards the "labels never empty" promise
        raise RuntimeError(f"make_synthetic_case({seed}, size_xy={size_xy}): generated an empty liver")

    hu_liver = rng.uniform(90.0, 115.0)
    vessf1 = _smooth_field(rng, shape, (7, 7, cells_z))
    vessf2 = _smooth_field(rng, shape, (7, 7, cells_z))
    vessels = liver & (np.abs(vessf1) < 0.10) & (np.abs(vessf2) < 0.25)
    img[liver] = hu_liver + 5.0 * liverf[liver]
    img[vessels] = hu_liver + rng.uniform(40.0, 70.0)

    label = np.zeros(shape, dtype=np.uint8)
    label[liver] = 1

    # ---- lesions: 1-4 hypodense ellipsoids inside the liver ---------------------------------
    # Sizes scale with the field of view like the rest of the anatomy (1 at a ~20 cm FOV), but never
    # below two in-plane voxels so that every lesion is visible. Each centre is redrawn (up to 8
    # times, deterministically) until >= 90% of the ellipsoid lies in the liver; the label is
    # clipped to the liver in any case.
    deep = np.flatnonzero((level < 0.7) & liver)
    candidates = deep if deep.size else np.flatnonzero(liver)
    spacing = np.array([sxy, sxy, sz])
    scale = half_fov / 100.0
    for _ in range(int(rng.integers(1, 5))):
        r_mm = rng.uniform(2.5, 6.0) if rng.random() < 0.5 else rng.uniform(8.0, 18.0)
        radii = np.maximum(r_mm * scale * rng.uniform(0.8, 1.2, size=3), 2.0 * sxy)
        best = None
        for _try in range(8):
            centre = np.array(np.unravel_index(candidates[rng.integers(candidates.size)], shape))
            box = _bbox(centre, 1.4 * radii / spacing, shape)
            grids = np.meshgrid(*(np.arange(sl.start, sl.stop) for sl in box), indexing="ij", sparse=True)
            d = np.sqrt(sum(((g - c) * sp / r) ** 2 for g, c, sp, r in zip(grids, centre, spacing, radii)))
            in_liver = label[box] > 0
            inside = float(in_liver[d < 1.0].mean())
            if best is None or inside > best[0]:
                best = (inside, box, d, in_liver)
            if inside >= 0.9:
                break
        _, box, d, in_liver = best
        hu_lesion = hu_liver - rng.uniform(35.0, 70.0)
        # soft edge centred on the label boundary (d = 1), so the label marks the visible border
        alpha = np.clip((1.2 - d) / 0.4, 0.0, 1.0) * in_liver
        core = hu_lesion - 10.0 * np.clip(1.0 - d / 0.5, 0.0, 1.0)  # slightly darker necrotic centre
        img[box] = (img[box] * (1.0 - alpha) + core * alpha).astype(np.float32)
        label[box][(d < 1.0) & in_liver] = 2

    # ---- scanner: partial-volume blur, correlated noise -----------------------------------------
    img = _smooth_xy(img)
    sigma = rng.uniform(15.0, 25.0)
    noise = rng.standard_normal(shape, dtype=np.float32)
    img += _smooth_xy(noise) * np.float32(sigma / 0.375)  # [1,2,1]/4 twice scales the std by 0.375
    np.clip(img, _HU_MIN, _HU_MAX, out=img)

    affine = np.diag([sxy, sxy, sz, 1.0])
    affine[:3, 3] = -0.5 * (np.array(shape) - 1) * spacing  # volume centred on the world origin
    return Case(
        name=name if name is not None else f"synthetic-{seed}",
        image=np.ascontiguousarray(img, dtype=np.float32),
        label=label,
        spacing=(sxy, sxy, sz),
        affine=affine,
        header=None,
    )


def synthetic_cases(n: int, seed: int = 0, **kw) -> list[Case]:
    """``n`` synthetic cases; case ``i`` is ``make_synthetic_case(derive_case_seed(seed, i), **kw)``,
    named ``synthetic-{seed}-{i:04d}``, so any one case can be regenerated on its own."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"synthetic_cases: n must be a non-negative integer, got {n!r}")
    if "name" in kw:
        raise ValueError("synthetic_cases: 'name' cannot be given; cases are named synthetic-{seed}-{i:04d}")
    return [
        make_synthetic_case(derive_case_seed(seed, i), name=f"synthetic-{seed}-{i:04d}", **kw) for i in range(n)
    ]
