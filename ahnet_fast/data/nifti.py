"""NIfTI input/output and discovery of the two common liver data layouts (MSD Task03, LiTS).

Every problem with an input file is raised as a ``ValueError`` that names the file and what is
wrong with it, at the point it is found: a training run over 131 LiTS volumes should fail in the
first second with "segmentation-87.nii: shape (512, 512, 124) does not match volume-87.nii
(512, 512, 125)", not hours later inside the sampler, and never skip a case silently.
"""
from __future__ import annotations

import contextlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ahnet_fast._atomic import atomic_path
from ahnet_fast.data.case import Case, is_valid_affine, spacing_from_affine

__all__ = ["load_nifti", "save_nifti", "CasePaths", "discover_cases", "load_case", "GeometryWarning", "save_niftis",
           "check_finite"]


class GeometryWarning(UserWarning):
    """A NIfTI header whose voxel size (pixdim) disagrees with its affine, or that nibabel repaired.
    The affine is the geometry used everywhere (training, inference, the files written), as nibabel
    recommends; the warning says that the file's two descriptions differ, naming it."""


def check_finite(image: np.ndarray, path, replace: float | None = None) -> np.ndarray:
    """``image`` unchanged when every voxel is finite. Otherwise a ValueError naming ``path`` and the
    count of NaN / infinite voxels, or, with ``replace`` (an explicit choice), those voxels set to it
    and a warning saying how many were."""
    bad = ~np.isfinite(image)
    n = int(np.count_nonzero(bad))
    if n == 0:
        return image
    if replace is None:
        raise ValueError(f"{path}: {n} of {image.size} voxels are NaN or infinite; fix the file or replace them "
                         "explicitly (ahnet-fast infer --replace-nonfinite VALUE, e.g. -1024 for air in HU)")
    if not np.isfinite(replace):
        raise ValueError(f"the replacement for non-finite voxels must be finite, got {replace}")
    warnings.warn(f"{path}: {n} NaN or infinite voxels replaced by {replace:g}", stacklevel=2)
    image = image.copy()
    image[bad] = replace
    return image


def _file_pixdim(img, path: Path) -> np.ndarray:
    """The header's pixdim[1:4] as stored in the file: nibabel's loader repairs zeros to 1."""
    from nibabel.openers import ImageOpener

    with ImageOpener(str(path)) as f:
        raw = img.header_class.from_fileobj(f, check=False)
    return np.asarray(raw["pixdim"][1:4], dtype=np.float64)


def _check_geometry(img, affine: np.ndarray, path: Path) -> None:
    stored = _file_pixdim(img, path)
    from_affine = np.asarray(spacing_from_affine(affine))
    axes = "XYZ"
    if np.any(stored == 0) or not np.all(np.isfinite(stored)):
        which = ", ".join(f"{axes[i]}" for i in np.flatnonzero((stored == 0) | ~np.isfinite(stored)))
        warnings.warn(GeometryWarning(
            f"{path}: the header's voxel size (pixdim) is {_mm(stored)} mm, zero or invalid along {which}; nibabel "
            f"assumed 1 mm there, so the geometry used ({_mm(from_affine)} mm) is a guess along {which}"
            + ("" if int(img.header["sform_code"]) or int(img.header["qform_code"]) else
               " (the file has no sform or qform either)")), stacklevel=3)
        return
    if not np.allclose(np.abs(stored), from_affine, rtol=1e-3, atol=1e-4):
        warnings.warn(GeometryWarning(
            f"{path}: the header's voxel size (pixdim) {_mm(stored)} mm disagrees with its affine's "
            f"{_mm(from_affine)} mm; the affine is used (in training and inference alike)"), stacklevel=3)


def _mm(values) -> str:
    return " x ".join(f"{float(v):g}" for v in values)

_LITS_RE = re.compile(r"^(volume|segmentation)-(\d+)\.nii(\.gz)?$")
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _nifti_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def _stem(path: Path) -> str:
    """File name without its NIfTI extension (``liver_0.nii.gz`` -> ``liver_0``)."""
    suffix = _nifti_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def load_nifti(path) -> tuple[np.ndarray, np.ndarray, object]:
    """Read a 3D NIfTI volume: ``(array float32 (X, Y, Z), affine float64 4x4, header)``.

    The array is in the file's voxel order with its scaling (scl_slope / scl_inter) applied. The
    affine is the geometry (spacing = its column lengths); a header whose pixdim disagrees with it, or
    that nibabel repaired (a zero pixdim), gives a :class:`GeometryWarning` naming the file.
    Trailing singleton dimensions beyond the third (a 4D file with one channel or time point) are
    squeezed; anything else that is not 3D is rejected. Reading is eager, so a truncated or corrupt
    file fails here (nibabel reads the data lazily and would otherwise fail at first use).
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found" if not path.exists() else f"{path}: not a regular file")
    try:
        img = nib.load(str(path), mmap=False)  # a memory map would tie the array to the file
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise ValueError(f"a {type(img).__name__}, not a NIfTI image")
        data = np.asarray(img.get_fdata(dtype=np.float32, caching="unchanged"))
    except MemoryError:
        raise
    except Exception as exc:  # nibabel, gzip, zlib and struct all raise their own types for a bad file
        raise ValueError(f"{path}: cannot read as NIfTI ({type(exc).__name__}: {exc})") from exc
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume (X, Y, Z), got shape {shape}")
    if 0 in data.shape:
        raise ValueError(f"{path}: empty volume, shape {shape}")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not is_valid_affine(affine):
        raise ValueError(f"{path}: invalid affine (singular or not finite):\n{affine}")
    _check_geometry(img, affine, path)
    return np.ascontiguousarray(data, dtype=np.float32), affine, img.header


def _storable(array: np.ndarray, path: Path) -> np.ndarray:
    """The array in a dtype NIfTI stores faithfully: bool -> uint8, 64-bit integers -> the
    smallest of uint8/int16/int32 that holds their range (nibabel refuses int64 by default)."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype in (np.int64, np.uint64):
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        for dtype in (np.uint8, np.int16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return array.astype(dtype)
        raise ValueError(f"{path}: integer values in [{lo}, {hi}] do not fit int32, which NIfTI tools expect")
    if array.dtype == np.float16:
        return array.astype(np.float32)
    return array


def save_nifti(path, array, affine, header=None) -> None:
    """Write ``array`` (numpy, or a torch tensor moved to the CPU) as NIfTI at ``path``, atomically.

    The file is written to a temporary name in the same folder and moved over ``path`` with
    ``os.replace``, so an interrupted run never leaves a truncated ``.nii.gz`` that looks finished.
    With ``header`` (e.g. the input image's), its metadata (units, descriptions, codes) is kept but
    the data type is the array's own and no intensity scaling is applied: a uint8 prediction is
    stored as uint8 even when the input was int16 with a slope. ``.nii.gz`` paths are gzipped.
    """
    save_niftis([(path, array, affine, header)])


def save_niftis(items) -> None:
    """Writes several NIfTI files (``(path, array, affine, header)`` each, as :func:`save_nifti`) so that
    they land together: every file goes to its temporary name first, and only when all are complete
    are they renamed into place; a failure in any write leaves none of them (and the previous files
    untouched)."""
    import nibabel as nib

    images = []
    for path, array, affine, header in items:
        path = Path(path)
        if not _nifti_suffix(path):
            raise ValueError(f"{path}: output must end in .nii or .nii.gz")
        if hasattr(array, "detach"):  # a torch tensor
            array = array.detach().cpu().numpy()
        array = _storable(np.asarray(array), path)
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"{path}: affine must be 4x4, got shape {affine.shape}")
        hdr = header.copy() if header is not None else None
        img = nib.Nifti1Image(array, affine, header=hdr)
        img.set_data_dtype(array.dtype)
        img.header.set_slope_inter(1.0, 0.0)
        # sform and qform both describe the new affine (a header copied from a resampled input would
        # otherwise keep a stale qform that some viewers prefer)
        img.set_sform(affine, code=int(img.header["sform_code"]) or 1)
        img.set_qform(affine, code=int(img.header["qform_code"]) or 1)
        images.append((path, img))
    with contextlib.ExitStack() as stack:
        # the temporary names keep the .nii/.nii.gz suffix: nibabel picks the format (and gzip) from it
        tmps = [stack.enter_context(atomic_path(path, suffix=_nifti_suffix(path))) for path, _ in images]
        for tmp, (_, img) in zip(tmps, images):
            nib.save(img, str(tmp))  # a failure: atomic_path removes every temporary, names the file


@dataclass
class CasePaths:
    """Where one case's files are: ``image`` and, for labelled data, ``label``."""

    name: str
    image: Path
    label: Path | None


def _listed_path(root: Path, rel: str, spec_file: Path, i: int) -> Path:
    """A dataset.json path: relative ones must stay inside the dataset folder (a ``../other/x.nii.gz``
    would read another dataset's file without a word); an absolute path is taken as the user's choice."""
    if Path(rel).is_absolute():
        return Path(rel)
    path = root / rel
    inside = root.resolve()
    resolved = path.resolve()
    if resolved != inside and inside not in resolved.parents:
        raise ValueError(f"{spec_file}: training entry {i} path {rel!r} leads outside the dataset folder {root} "
                         f"(to {resolved}); write it as an absolute path if that file is meant")
    return path


def _require_file(path: Path, referenced_by: str) -> Path:
    if not path.is_file():
        raise ValueError(f"{path}: file not found (listed by {referenced_by})")
    return path


def _discover_decathlon(root: Path, require_labels: bool) -> list[CasePaths]:
    spec_file = root / "dataset.json"
    try:
        spec = json.loads(spec_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{spec_file}: cannot read as JSON ({exc})") from exc
    entries = spec.get("training") if isinstance(spec, dict) else None
    if not isinstance(entries, list):
        raise ValueError(
            f"{spec_file}: no 'training' list; expected a Medical Segmentation Decathlon dataset.json "
            f'with "training": [{{"image": ..., "label": ...}}, ...]'
        )
    if not entries:
        raise ValueError(f"{spec_file}: the 'training' list is empty")
    cases: list[CasePaths] = []
    seen: dict[str, Path] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise ValueError(f"{spec_file}: training entry {i} has no 'image' path: {entry!r}")
        image = _require_file(_listed_path(root, entry["image"], spec_file, i), spec_file.name)
        label_rel = entry.get("label")
        if label_rel is None:
            if require_labels:
                raise ValueError(f"{spec_file}: training entry {i} ({entry['image']}) has no 'label' path")
            label = None
        elif not isinstance(label_rel, str):
            raise ValueError(f"{spec_file}: training entry {i} has a non-string 'label': {label_rel!r}")
        else:
            label = _require_file(_listed_path(root, label_rel, spec_file, i), spec_file.name)
        name = _stem(image)
        if name in seen:
            raise ValueError(f"{spec_file}: case name {name!r} appears twice ({seen[name]} and {image})")
        seen[name] = image
        cases.append(CasePaths(name=name, image=image, label=label))
    return cases


def _discover_lits(root: Path, require_labels: bool) -> list[CasePaths]:
    found: dict[str, dict[int, Path]] = {"volume": {}, "segmentation": {}}
    for path in sorted(root.rglob("*.nii*")):
        m = _LITS_RE.match(path.name)
        if m is None or not path.is_file():
            continue
        kind, number = m.group(1), int(m.group(2))
        if number in found[kind]:
            raise ValueError(f"{path}: duplicate LiTS {kind} {number} (also {found[kind][number]})")
        found[kind][number] = path
    volumes, segmentations = found["volume"], found["segmentation"]
    orphans = sorted(set(segmentations) - set(volumes))
    if orphans:
        raise ValueError(f"{segmentations[orphans[0]]}: no matching volume-{orphans[0]}.nii[.gz] under {root}")
    cases = []
    for number in sorted(volumes):
        label = segmentations.get(number)
        if label is None and require_labels:
            raise ValueError(f"{volumes[number]}: no matching segmentation-{number}.nii[.gz] under {root}")
        cases.append(CasePaths(name=f"volume-{number}", image=volumes[number], label=label))
    return cases


def discover_cases(root, *, require_labels: bool = True) -> list[CasePaths]:
    """The cases of a dataset folder, in a fixed order.

    Two layouts are recognised:

    * Medical Segmentation Decathlon: ``root/dataset.json`` with ``"training": [{"image": ...,
      "label": ...}]``, paths relative to ``root``; cases in the file's order, named by the image
      file (``liver_0``).
    * LiTS: ``volume-N.nii[.gz]`` and ``segmentation-N.nii[.gz]`` anywhere below ``root`` (the
      challenge ships them in "Training Batch 1/2" folders); cases sorted by N, named ``volume-N``.

    Every listed file must exist. With ``require_labels`` (training), a case without a label is
    an error; without it, such cases get ``label=None`` (inference on unlabelled volumes).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: dataset folder not found" if not root.exists() else f"{root}: not a folder")
    if (root / "dataset.json").is_file():
        return _discover_decathlon(root, require_labels)
    cases = _discover_lits(root, require_labels)
    if not cases:
        raise ValueError(
            f"{root}: neither a Medical Segmentation Decathlon folder (no dataset.json) nor a LiTS folder "
            f"(no volume-N.nii / volume-N.nii.gz files below it)"
        )
    return cases


def load_case(paths: CasePaths, num_classes: int) -> Case:
    """Read one case: image as float32 (HU), label as uint8 with values checked to lie in
    ``[0, num_classes)``, spacing from the image affine, and the image header for writing outputs.

    Raises ValueError naming the file for: a missing or corrupt file, a non-3D volume, non-finite
    image values, a label whose shape differs from the image's (both shapes given), or label values
    that are not integers in ``[0, num_classes)`` (the offending values given). A label whose affine
    differs from the image's by more than 1e-3 mm is accepted with a warning: the voxel grids match
    (same shape), and LiTS has files whose headers differ only by rounding.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or not 2 <= num_classes <= 256:
        raise ValueError(f"load_case({paths.name}): num_classes must be an integer in [2, 256], got {num_classes!r}")
    image, affine, header = load_nifti(paths.image)
    image = check_finite(image, paths.image)
    label = None
    if paths.label is not None:
        lab, lab_affine, _ = load_nifti(paths.label)
        if lab.shape != image.shape:
            raise ValueError(
                f"{paths.label}: label shape {lab.shape} does not match image {paths.image.name} shape {image.shape}"
            )
        # fast path (two passes over the volume); np.unique's sort only to report offending values
        in_range = bool(0 <= lab.min() and lab.max() < num_classes)  # False when NaN is present
        label = lab.astype(np.uint8) if in_range else None
        if label is None or not np.array_equal(label, lab):  # out of range, NaN, or fractional values
            values = np.unique(lab)
            bad = values[~np.isfinite(values) | (values != np.round(values)) | (values < 0) | (values >= num_classes)]
            shown = ", ".join(f"{v:g}" for v in bad[:10]) + (f" (+{bad.size - 10} more)" if bad.size > 10 else "")
            raise ValueError(f"{paths.label}: label values must be integers in [0, {num_classes}); found {shown}")
        if not np.allclose(lab_affine, affine, atol=1e-3):
            warnings.warn(
                f"{paths.label}: affine differs from {paths.image.name}'s; using the image's geometry",
                stacklevel=2,
            )
    return Case(
        name=paths.name,
        image=image,
        label=label,
        spacing=spacing_from_affine(affine),
        affine=affine,
        header=header,
    )
