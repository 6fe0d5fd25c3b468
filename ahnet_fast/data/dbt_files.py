"""Real tomosynthesis data as researchers get it: volumes (DICOM or NIfTI) and a CSV of lesion boxes.

Two layouts are read:

- **Duke BCS-DBT** (the public Breast Cancer Screening DBT set): a *file-paths* table with the columns
  PatientID, StudyUID, View and descriptive_path (or classic_path), relative to the data folder, one
  multi-frame DICOM per view; and a *boxes* table with PatientID, StudyUID, View, Slice, X, Y, Width,
  Height (and Class, VolumeSlices, ...). A view is the case ``PatientID_StudyUID_View``. Views listed
  in the paths table without a box are lesion-free volumes: they count in the false positives per
  volume.
- **A folder of volumes**, one per case named ``<case>.nii.gz``, ``<case>.nii`` or ``<case>.dcm``
  anywhere below it, and a CSV whose rows are lesions: a column ``case``, and ``slice``, ``x``, ``y``,
  with either ``width`` and ``height`` (a box whose first voxel is x, y) or neither (x, y, slice is the
  centre; an optional ``radius_mm`` gives its size). Column names are matched without regard to case,
  so Duke's tables need no renaming.

Coordinates are voxel indices of the volume as this module reads it: (X, Y, Z) = (column, row, frame)
of a DICOM, the array axes of a NIfTI. A box's lesion is its centre on the box's slice, with a radius of
half the box's in-plane diagonal in mm (the boxes give no extent across slices; the DBTex challenge
judges slices separately, by +-25% of the volume, a rule this library's 3D FROC does not use).

Why the laterality flip: Duke's boxes are drawn on images oriented so that the chest wall lies on the
side the view's laterality (its first letter, L or R) says, and its DICOM laterality tags are known to
be wrong for some views; so, as its authors do, a DICOM with a known view is flipped in-plane (both
axes) when its brighter edge column, where the chest wall is, lies on the other side.

Why each volume is scaled by its own percentiles: DBT intensities are vendor-specific, unitless
detector values, unlike CT's Hounsfield units, so no fixed window fits every scanner; the 0.5th and
99.5th percentiles map to 0 and 1 (clipped), which puts air near 0 and dense tissue near 1 as in the
synthetic volumes.

DICOM needs ``pydicom`` (``pip install pydicom``); Duke's files are JPEG 2000 compressed and also need
a decoder (``pip install pylibjpeg pylibjpeg-openjpeg``). Positions in millimetres are world
coordinates for NIfTI (its affine) and, for DICOM, the reoriented image's voxel grid scaled by its pixel
spacing and slice spacing (origin at the first voxel's centre), in which the boxes are given.
"""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ahnet_fast.data.case import is_valid_affine, spacing_from_affine
from ahnet_fast.data.dbt import DetectionCase
from ahnet_fast.data.nifti import _nifti_suffix, _stem, check_finite, load_nifti
from ahnet_fast.data.preprocess import _resample_linear, _resampled_affine, resampled_shape
from ahnet_fast.detection import Lesion, _number

__all__ = ["DbtVolume", "LesionMark", "discover_dbt", "load_dbt_case", "normalise_intensity", "read_geometry",
           "prepare_volume", "read_volume", "truth_lesions", "volume_name", "DICOM_INSTALL_HINT"]

DICOM_INSTALL_HINT = "pip install pydicom (and, for compressed files such as Duke's, pylibjpeg pylibjpeg-openjpeg)"
PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class LesionMark:
    """One row of the boxes CSV, in the volume's voxels: a box (``width`` and ``height`` given) or a
    centre. ``line`` is the row's line in ``source`` (for errors); ``volume_slices`` Duke's slice count
    of the volume, when given (checked against the file)."""

    source: str
    line: int
    x: float
    y: float
    slice: float
    width: float | None = None
    height: float | None = None
    radius_mm: float | None = None
    kind: str = "lesion"
    volume_slices: int | None = None

    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass(frozen=True)
class DbtVolume:
    """One case: its name, its file, Duke's ``view`` (lcc, rmlo, ...; None when not known: no flip) and
    its lesions as given (:class:`LesionMark`)."""

    name: str
    path: Path
    view: str | None = None
    marks: tuple[LesionMark, ...] = ()


# ---------------------------------------------------------------- CSV tables

def _table(path: Path, what: str):
    """(lower-cased header, [(line, row with lower-cased keys)]) of a CSV, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path}: no such file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # Excel writes a byte-order mark
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                raise ValueError(f"{what} {path}: empty file (no header row)")
            header = [h.strip().lower() for h in header]
            rows = []
            for line, values in enumerate(reader, start=2):
                if not any(v.strip() for v in values):
                    continue  # a blank line
                if len(values) > len(header):
                    raise ValueError(f"{path}:{line}: {len(values)} fields, more than the header's {len(header)}")
                rows.append((line, {h: (values[i].strip() if i < len(values) else "") for i, h in enumerate(header)}))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path}: not a text CSV file ({exc})") from exc
    except csv.Error as exc:
        raise ValueError(f"{what} {path}: not a valid CSV file ({exc})") from exc
    return header, rows


def _case_key(header, path: Path, what: str) -> str:
    """How a table names its cases: a ``case`` column, or Duke's PatientID, StudyUID and View."""
    if "case" in header:
        return "case"
    if all(k in header for k in ("patientid", "studyuid", "view")):
        return "duke"
    raise ValueError(f"{what} {path}: no case column; give 'case' or Duke's PatientID, StudyUID and View "
                     f"(the header has {', '.join(header)})")


def _case_name(row: dict, key: str, path: Path, line: int) -> str:
    if key == "case":
        name = row["case"]
    else:
        parts = [row["patientid"], row["studyuid"], row["view"]]
        if not all(parts):
            raise ValueError(f"{path}:{line}: PatientID, StudyUID and View must all be given")
        name = "_".join(parts)
    if not name:
        raise ValueError(f"{path}:{line}: empty case name")
    return name


def read_marks(boxes_csv) -> dict[str, list[LesionMark]]:
    """The lesions of a boxes/centres CSV by case name (rules in the module docstring)."""
    path = Path(boxes_csv)
    header, rows = _table(path, "boxes")
    key = _case_key(header, path, "boxes")
    missing = [c for c in ("slice", "x", "y") if c not in header]
    if missing:
        raise ValueError(f"boxes {path}: missing column(s) {', '.join(missing)}; each row needs slice, x, y "
                         f"(and width, height for a box) (the header has {', '.join(header)})")
    has_box = ("width" in header, "height" in header)
    if has_box[0] != has_box[1]:
        raise ValueError(f"boxes {path}: a box needs both width and height columns (it has only "
                         f"{'width' if has_box[0] else 'height'})")
    marks: dict[str, list[LesionMark]] = {}
    for line, row in rows:
        name = _case_name(row, key, path, line)
        x, y = (_number(row, k, path, line, minimum=0) for k in ("x", "y"))
        z = _number(row, "slice", path, line, minimum=0)
        width = height = radius = None
        if has_box[0] and (row["width"] or row["height"]):
            width, height = (_number(row, k, path, line, positive=True) for k in ("width", "height"))
        if row.get("radius_mm"):
            radius = _number(row, "radius_mm", path, line, positive=True)
        slices = None
        if row.get("volumeslices"):
            slices = int(_number(row, "volumeslices", path, line, positive=True))
        kind = row.get("class") or row.get("kind") or "lesion"
        marks.setdefault(name, []).append(LesionMark(str(path), line, x, y, z, width, height, radius, kind, slices))
    return marks


# ---------------------------------------------------------------- discovery

def _volume_suffix(path: Path) -> str:
    return _nifti_suffix(path) or (".dcm" if path.name.lower().endswith(".dcm") else "")


def volume_name(path) -> str:
    """The case a volume file is: its name without the volume suffix (``a.nii.gz``, ``a.dcm`` -> ``a``);
    ValueError for a file that is no volume this module reads."""
    path = Path(path)
    suffix = _volume_suffix(path)
    if not suffix:
        raise ValueError(f"{path}: not a volume this reader knows (.nii.gz, .nii or .dcm)")
    return _stem(path) if suffix != ".dcm" else path.name[:-len(suffix)]


def _inside(root: Path, rel: str, table: Path, line: int) -> Path:
    if Path(rel).is_absolute():
        return Path(rel)
    path = root / rel
    resolved, base = path.resolve(), root.resolve()
    if base not in resolved.parents:
        raise ValueError(f"{table}:{line}: path {rel!r} leads outside the data folder {root} (to {resolved}); "
                         "write it as an absolute path if that file is meant")
    return path


def _from_paths_table(root: Path, table: Path) -> list[tuple[str, Path, str | None]]:
    header, rows = _table(table, "file paths")
    if _case_key(header, table, "file paths") != "duke":
        raise ValueError(f"file paths {table}: expected Duke's columns PatientID, StudyUID, View and "
                         f"descriptive_path or classic_path (the header has {', '.join(header)})")
    columns = [c for c in ("descriptive_path", "classic_path", "path") if c in header]
    if not columns:
        raise ValueError(f"file paths {table}: no path column (descriptive_path, classic_path or path)")
    out = []
    for line, row in rows:
        name = _case_name(row, "duke", table, line)
        given = [row[c] for c in columns if row[c]]
        if not given:
            raise ValueError(f"{table}:{line}: no path given for {name}")
        candidates = [_inside(root, rel, table, line) for rel in given]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise ValueError(f"{table}:{line}: the volume of {name} is not under {root} (looked for "
                             f"{', '.join(str(p) for p in candidates)})")
        out.append((name, found, row["view"].lower()))
    return out


def discover_dbt(root, boxes=None, file_paths=None) -> list[DbtVolume]:
    """The cases of a DBT data folder, in a fixed order (the paths table's, or sorted by name), each with
    its lesions from ``boxes`` (None: none given, e.g. for inference).

    ValueError, naming file and line, for: a folder that is not one, a paths-table row whose file is
    missing, two volumes with one case name, a box of a case that has no volume, any malformed row.
    Boxes are checked against each volume's size when it is read (:func:`truth_lesions`)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: DBT data folder not found" if not root.exists() else f"{root}: not a folder")
    if file_paths is not None:
        found = _from_paths_table(root, Path(file_paths))
        where = f"the paths table {file_paths}"
    else:
        found = []
        for p in sorted(root.rglob("*")):
            if _volume_suffix(p) and p.is_file():
                found.append((volume_name(p), p, None))
        where = f"{root} (volumes named <case>.nii.gz, <case>.nii or <case>.dcm)"
        if not found:
            raise ValueError(f"{root}: no volumes (.nii.gz, .nii or .dcm files) below it; for Duke's layout give "
                             "its file-paths table (--file-paths)")
    seen: dict[str, Path] = {}
    for name, path, _ in found:
        if name in seen:
            raise ValueError(f"two volumes for case {name!r}: {seen[name]} and {path}")
        seen[name] = path
    marks = read_marks(boxes) if boxes is not None else {}
    unknown = [n for n in marks if n not in seen]
    if unknown:
        first = marks[unknown[0]][0]
        raise ValueError(f"{first.where()}: case {unknown[0]!r} has no volume in {where}"
                         + (f" ({len(unknown)} unknown cases in all)" if len(unknown) > 1 else ""))
    return [DbtVolume(name, path, view, tuple(marks.get(name, ()))) for name, path, view in found]


# ---------------------------------------------------------------- volumes

def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise ValueError(f"reading DICOM needs pydicom, which is not installed: {DICOM_INSTALL_HINT}") from None
    return pydicom


def _dicom_spacing(ds, path: Path) -> tuple[float, float, float]:
    """(X, Y, Z) spacing in mm: the shared functional groups' pixel measures of a multi-frame DBT
    object, else the classic attributes. PixelSpacing is (between rows, between columns) = (Y, X)."""
    measures = None
    shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
    if shared and "PixelMeasuresSequence" in shared[0]:
        measures = shared[0].PixelMeasuresSequence[0]
    pixel = (getattr(measures, "PixelSpacing", None) if measures is not None else None) or \
        getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None)
    slice_mm = None
    for source in (measures, ds):
        if source is None:
            continue
        slice_mm = getattr(source, "SpacingBetweenSlices", None) or getattr(source, "SliceThickness", None)
        if slice_mm:
            break
    if not pixel or len(pixel) != 2 or not slice_mm:
        raise ValueError(f"{path}: no voxel size in the DICOM header (PixelSpacing and SliceThickness or "
                         "SpacingBetweenSlices, in the shared functional groups or at the top level)")
    spacing = (float(pixel[1]), float(pixel[0]), float(slice_mm))
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"{path}: voxel size {spacing} mm from the DICOM header is not positive")
    return spacing


def _dicom_header(path: Path, pixels: bool):
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=not pixels)
    except Exception as exc:  # pydicom raises InvalidDicomError, EOFError, struct errors, ...
        raise ValueError(f"{path}: cannot read as DICOM ({type(exc).__name__}: {' '.join(str(exc).split())})") from exc


def _dicom_shape(ds, path: Path) -> tuple[int, int, int]:
    try:
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        return int(ds.Columns), int(ds.Rows), frames
    except AttributeError as exc:
        raise ValueError(f"{path}: DICOM header without Rows/Columns ({exc})") from None


def read_geometry(path) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape (X, Y, Z), 4x4 affine) of a volume file, read from its header only."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    suffix = _volume_suffix(path)
    if suffix == ".dcm":
        ds = _dicom_header(path, pixels=False)
        return _dicom_shape(ds, path), np.diag([*_dicom_spacing(ds, path), 1.0])
    if suffix:
        import nibabel as nib

        try:
            img = nib.load(str(path))
            shape = tuple(int(s) for s in img.shape)
        except Exception as exc:
            raise ValueError(f"{path}: cannot read as NIfTI ({type(exc).__name__}: {exc})") from exc
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) != 3:
            raise ValueError(f"{path}: expected a 3D volume (X, Y, Z), got shape {shape}")
        affine = np.asarray(img.affine, dtype=np.float64)
        if not is_valid_affine(affine):
            raise ValueError(f"{path}: invalid affine (singular or not finite)")
        return shape, affine
    raise ValueError(f"{path}: not a volume this reader knows (.nii.gz, .nii or .dcm)")


def _laterality(frame_xy: np.ndarray) -> str:
    """Which breast an (X, Y) slice shows: the chest wall, the image's bright edge, is on its side."""
    return "R" if frame_xy[0].sum() < frame_xy[-1].sum() else "L"


def read_volume(path, view: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 (X, Y, Z), affine) of a volume file. A DICOM is reoriented to ``view``'s
    laterality (module docstring) and inverted when stored as MONOCHROME1 (bright = low attenuation)."""
    path = Path(path)
    if _volume_suffix(path) != ".dcm":
        image, affine, _ = load_nifti(path)
        return check_finite(image, path), affine
    ds = _dicom_header(path, pixels=True)
    shape = _dicom_shape(ds, path)
    spacing = _dicom_spacing(ds, path)
    log = logging.getLogger("pydicom")
    level = log.level
    log.setLevel(logging.CRITICAL)  # pydicom logs each failed decoder's traceback; the error below says it
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # no decoder for the transfer syntax, truncated pixel data, ...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        reason = " ".join(str(exc).split())
        raise ValueError(f"{path}: cannot decode the pixel data (transfer syntax {name}; {type(exc).__name__}: "
                         f"{reason}); a compressed file needs a decoder for it: {DICOM_INSTALL_HINT}") from exc
    finally:
        log.setLevel(level)
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.ndim != 3:
        raise ValueError(f"{path}: expected a grey-scale multi-frame volume, got pixel data of shape {pixels.shape}")
    view_xyz = pixels.transpose(2, 1, 0)  # (frames, rows, cols) -> (X, Y, Z), a view
    if view_xyz.shape != shape:
        raise ValueError(f"{path}: pixel data {view_xyz.shape} does not match the header's {shape} (X, Y, Z)")
    monochrome1 = str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    if view and view[0].upper() in "LR":
        first = view_xyz[:, :, 0]
        side = _laterality(first.max() - first.astype(np.float64) if monochrome1 else first)
        if side != view[0].upper():
            view_xyz = view_xyz[::-1, ::-1, :]
    # one float32 copy in (X, Y, Z) order (a DBT view is ~2500 x 2000 x 60 voxels: 1.2 GB in float32)
    image = np.empty(view_xyz.shape, dtype=np.float32)
    image[...] = view_xyz
    del pixels, view_xyz
    if monochrome1:  # stored inverted (bright = low attenuation): turned the usual way round
        np.subtract(image.max(), image, out=image)
    return check_finite(image, path), np.diag([*spacing, 1.0])


def normalise_intensity(image: np.ndarray) -> np.ndarray:
    """The volume scaled by its own 0.5th / 99.5th percentiles to [0, 1] (clipped), float32."""
    sample = image.reshape(-1)[:: max(1, image.size // 2_000_000)]  # percentiles of ~2M voxels: enough
    lo, hi = (float(v) for v in np.percentile(sample, PERCENTILES))
    if not hi > lo:
        return np.zeros(image.shape, dtype=np.float32)  # a constant volume: nothing to see
    out = np.clip(image, lo, hi).astype(np.float32)
    out -= np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return out


def truth_lesions(volume: DbtVolume, shape, affine) -> list[Lesion]:
    """``volume``'s lesions in world millimetres, each checked to lie in a volume of ``shape`` (X, Y, Z)."""
    spacing = spacing_from_affine(affine)
    out = []
    for m in volume.marks:
        if m.volume_slices is not None and m.volume_slices != shape[2]:
            raise ValueError(f"{m.where()}: VolumeSlices {m.volume_slices} but {volume.path} has {shape[2]} slices "
                             f"(a box for another volume?)")
        if m.width is not None:
            inside = m.x + m.width <= shape[0] and m.y + m.height <= shape[1] and m.slice < shape[2]
            centre = (m.x + (m.width - 1) / 2, m.y + (m.height - 1) / 2, m.slice)
            radius = m.radius_mm or 0.5 * math.hypot(m.width * spacing[0], m.height * spacing[1])
            what = f"box x {m.x:g}..{m.x + m.width:g}, y {m.y:g}..{m.y + m.height:g}, slice {m.slice:g}"
        else:
            inside = m.x <= shape[0] - 1 and m.y <= shape[1] - 1 and m.slice <= shape[2] - 1
            centre, radius = (m.x, m.y, m.slice), m.radius_mm
            what = f"centre x {m.x:g}, y {m.y:g}, slice {m.slice:g}"
        if not inside:
            raise ValueError(f"{m.where()}: {what} lies outside {volume.name} ({volume.path.name}: "
                             f"{shape[0]} x {shape[1]} x {shape[2]} voxels, X x Y x slices)")
        world = (np.asarray(affine) @ np.r_[centre, 1.0])[:3]
        out.append(Lesion(volume.name, tuple(float(v) for v in world), radius))
    return out


def prepare_volume(image: np.ndarray, affine: np.ndarray, spacing_xy: float | None, *,
                   normalise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(image, affine) resampled in-plane to ``spacing_xy`` mm (None: as stored) and, with
    ``normalise``, scaled by :func:`normalise_intensity`: what training and inference both feed the
    detection network."""
    spacing = spacing_from_affine(affine)
    new_xy = resampled_shape(image.shape[:2], spacing[:2], spacing_xy)
    if new_xy != tuple(image.shape[:2]):
        resampled = _resample_linear(image, new_xy)
        affine = _resampled_affine(affine, image.shape[:2], new_xy)
        image = resampled
    return (normalise_intensity(image) if normalise else np.asarray(image, dtype=np.float32)), affine


def load_dbt_case(volume: DbtVolume, spacing_xy: float | None) -> DetectionCase:
    """``volume`` read and prepared (:func:`prepare_volume`), with its lesions (world mm, checked
    against the volume)."""
    image, affine = read_volume(volume.path, volume.view)
    lesions = truth_lesions(volume, image.shape, affine)
    image, affine = prepare_volume(image, affine, spacing_xy)
    return DetectionCase(name=volume.name, image=image, label=None, spacing=spacing_from_affine(affine), affine=affine,
                         lesions=tuple(lesions), kinds=tuple(m.kind for m in volume.marks))
