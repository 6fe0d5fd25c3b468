"""Real DBT folders (ahnet_fast.data.dbt_files): NIfTI and Duke-style DICOM volumes with box CSVs, the
laterality flip, the per-volume scaling, every malformed input named, and the three commands
(train --task detection --data DIR --boxes, infer to a candidates CSV, froc against boxes) on one."""
from __future__ import annotations

import csv
import json
import math
import sys

import numpy as np
import pytest

from ahnet_fast.cli import main
from ahnet_fast.data import save_nifti
from ahnet_fast.data.dbt import make_synthetic_dbt
from ahnet_fast.data.dbt_files import (discover_dbt, load_dbt_case, normalise_intensity, read_geometry, read_marks,
                                       read_volume, truth_lesions)

pydicom = pytest.importorskip("pydicom")

DUKE_BOX_COLUMNS = ["PatientID", "StudyUID", "View", "Subject", "Slice", "X", "Y", "Width", "Height", "Class", "AD",
                    "VolumeSlices"]


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_dicom(path, volume_xyz: np.ndarray, spacing_xyz, *, monochrome1=False, spacing_at_top=False,
                no_spacing=False, compressed_garbage=False):
    """A multi-frame DICOM of an (X, Y, Z) uint16 volume as a DBT scanner stores it: frames of rows x
    columns, the voxel size in the shared functional groups' pixel measures (PixelSpacing = row, column)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import JPEG2000Lossless, ExplicitVRLittleEndian, generate_uid

    frames = np.ascontiguousarray(volume_xyz.transpose(2, 1, 0).astype(np.uint16))  # (Z, Y, X) = frames, rows, cols
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.13.1.3"  # Breast Tomosynthesis Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEG2000Lossless if compressed_garbage else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.Rows, ds.Columns, ds.NumberOfFrames = frames.shape[1], frames.shape[2], frames.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if not no_spacing:
        if spacing_at_top:
            ds.PixelSpacing, ds.SliceThickness = [spacing_xyz[1], spacing_xyz[0]], spacing_xyz[2]
        else:
            measures = Dataset()
            measures.PixelSpacing, measures.SliceThickness = [spacing_xyz[1], spacing_xyz[0]], spacing_xyz[2]
            group = Dataset()
            group.PixelMeasuresSequence = [measures]
            ds.SharedFunctionalGroupsSequence = [group]
    if compressed_garbage:
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([b"\x00\x01not a jpeg 2000 codestream" * 4 for _ in range(frames.shape[0])])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = frames.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def _voxel(case, lesion):
    return (np.linalg.inv(case.affine) @ np.r_[lesion.position_mm, 1.0])[:3]


# ---------------------------------------------------------------- NIfTI folders


def test_a_nifti_folder_with_boxes_and_centres_gives_the_lesions_in_world_millimetres(tmp_path):
    case = make_synthetic_dbt(1, size_xy=64, slices=(20, 20), masses=(2, 2), clusters=(0, 0))
    affine = case.affine.copy()
    affine[:3, 3] = (-20.0, 7.5, 3.0)  # an origin elsewhere: positions are world, not voxel, millimetres
    save_nifti(tmp_path / "a.nii.gz", case.image * 4000.0, affine)  # detector units: scaled away per volume
    save_nifti(tmp_path / "sub" / "b.nii", case.image[::-1].copy(), affine)
    rows = []
    for les in case.lesions:
        c = (np.linalg.inv(case.affine) @ np.r_[les.position_mm, 1.0])[:3]
        w = 2 * round(les.radius_mm / 0.5 / math.sqrt(2))  # a square box whose half diagonal ~ the radius
        rows.append(["a", round(c[2]), round(c[0] - (w - 1) / 2), round(c[1] - (w - 1) / 2), w, w])
    rows.append(["b", 5, 10, 11, "", ""])  # a centre without size: a point lesion
    boxes = write_csv(tmp_path / "boxes.csv", ["case", "slice", "x", "y", "width", "height"], rows)

    volumes = discover_dbt(tmp_path, boxes)
    assert [v.name for v in volumes] == ["a", "b"] and len(volumes[0].marks) == 2 and len(volumes[1].marks) == 1
    loaded = load_dbt_case(volumes[0], spacing_xy=1.0)
    assert loaded.image.shape == (32, 32, 20) and loaded.image.dtype == np.float32
    assert 0.0 <= loaded.image.min() and loaded.image.max() <= 1.0
    np.testing.assert_allclose(loaded.spacing, (1.0, 1.0, 1.0))
    for got, les in zip(loaded.lesions, case.lesions):  # the box centre is the lesion's, within rounding
        want = np.asarray(les.position_mm) + affine[:3, 3]
        assert np.linalg.norm(np.asarray(got.position_mm) - want) <= 0.8
        assert got.radius_mm == pytest.approx(les.radius_mm, abs=0.6)
    point = load_dbt_case(volumes[1], spacing_xy=None).lesions[0]
    assert point.radius_mm is None and point.position_mm == pytest.approx((10 * 0.5 - 20.0, 11 * 0.5 + 7.5, 5 + 3.0))
    shape, geo_affine = read_geometry(tmp_path / "a.nii.gz")
    assert shape == (64, 64, 20) and np.allclose(geo_affine, affine)


def test_normalise_intensity_maps_percentiles_to_zero_and_one():
    rng = np.random.default_rng(0)
    image = rng.normal(1000.0, 200.0, size=(40, 40, 10)).astype(np.float32)
    out = normalise_intensity(image)
    lo, hi = np.percentile(image, (0.5, 99.5))
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(normalise_intensity(image * 3 + 7), out, atol=1e-5)  # any linear detector scale
    assert np.mean(out == 0.0) == pytest.approx(0.005, abs=0.002) and (lo < 1000 < hi)
    assert not normalise_intensity(np.full((4, 4, 4), 5.0, np.float32)).any()  # constant: no NaN, all 0


# ---------------------------------------------------------------- Duke's layout (DICOM)


def _breast(shape, chest_wall_left: bool, blob_xyz=None):
    """Detector values: a bright chest wall on one side, fading away from it, and a blob."""
    x = np.arange(shape[0], dtype=np.float32)
    ramp = 3000.0 * np.exp(-(x if chest_wall_left else x[::-1]) / (shape[0] / 3))
    vol = np.broadcast_to(ramp[:, None, None], shape).copy() + 200.0
    if blob_xyz is not None:
        bx, by, bz = blob_xyz
        vol[bx - 1:bx + 2, by - 1:by + 2, bz] = 9000.0
    return vol


def _duke_folder(tmp_path):
    """Three views of one study: rcc stored mirrored (its chest wall on the left, as a left breast's),
    lcc stored as drawn, rmlo without a lesion; boxes on the oriented images."""
    shape, spacing = (40, 30, 9), (0.1, 0.1, 1.0)
    root = tmp_path / "duke"
    (root / "Breast-Cancer-Screening-DBT" / "DBT-P00001").mkdir(parents=True)
    rel = {v: f"Breast-Cancer-Screening-DBT/DBT-P00001/{v}/1-1.dcm" for v in ("rcc", "lcc", "rmlo")}
    for v in rel:
        (root / rel[v]).parent.mkdir(parents=True)
    # rcc, as drawn: chest wall on the right (high x), lesion at x=10, y=20, slice 4; stored mirrored
    drawn = _breast(shape, chest_wall_left=False, blob_xyz=(10, 20, 4))
    write_dicom(root / rel["rcc"], drawn[::-1, ::-1, :], spacing)
    write_dicom(root / rel["lcc"], _breast(shape, chest_wall_left=True, blob_xyz=(25, 5, 2)), spacing,
                spacing_at_top=True)
    write_dicom(root / rel["rmlo"], _breast(shape, chest_wall_left=False), spacing)
    paths = write_csv(root / "BCS-DBT-file-paths-train-v2.csv",
                      ["PatientID", "StudyUID", "View", "descriptive_path", "classic_path"],
                      [["DBT-P00001", "DBT-S00001", v, rel[v], "elsewhere/1-1.dcm"] for v in rel])
    boxes = write_csv(root / "BCS-DBT-boxes-train-v2.csv", DUKE_BOX_COLUMNS,
                      [["DBT-P00001", "DBT-S00001", "rcc", 1, 4, 9, 19, 3, 3, "cancer", 0, 9],
                       ["DBT-P00001", "DBT-S00001", "lcc", 1, 2, 24, 4, 3, 3, "benign", 0, 9]])
    return root, paths, boxes


def test_duke_layout_reads_views_flips_to_the_boxes_and_keeps_lesion_free_views(tmp_path):
    root, paths, boxes = _duke_folder(tmp_path)
    volumes = discover_dbt(root, boxes, paths)
    assert [v.name for v in volumes] == ["DBT-P00001_DBT-S00001_rcc", "DBT-P00001_DBT-S00001_lcc",
                                         "DBT-P00001_DBT-S00001_rmlo"]
    assert [len(v.marks) for v in volumes] == [1, 1, 0] and volumes[0].marks[0].kind == "cancer"
    for v, blob in zip(volumes[:2], ((10, 20, 4), (25, 5, 2))):
        image, affine = read_volume(v.path, v.view)
        assert image[blob] == 9000.0 and image.max() == 9000.0  # the blob where the box says
        np.testing.assert_allclose(np.diag(affine), (0.1, 0.1, 1.0, 1.0))
        (lesion,) = truth_lesions(v, image.shape, affine)
        assert lesion.position_mm == pytest.approx((blob[0] * 0.1, blob[1] * 0.1, blob[2] * 1.0))
        assert lesion.radius_mm == pytest.approx(0.5 * math.hypot(0.3, 0.3))
    # without the view the stored orientation is kept: the rcc blob is then mirrored
    image, _ = read_volume(volumes[0].path, None)
    assert image[40 - 1 - 10, 30 - 1 - 20, 4] == 9000.0 and image[10, 20, 4] != 9000.0
    assert load_dbt_case(volumes[2], spacing_xy=0.5).lesions == ()


def test_monochrome1_is_inverted(tmp_path):
    vol = _breast((20, 20, 3), chest_wall_left=True)
    write_dicom(tmp_path / "m1.dcm", vol.max() - vol, (0.1, 0.1, 1.0), monochrome1=True)
    image, _ = read_volume(tmp_path / "m1.dcm")
    assert np.corrcoef(image.ravel(), vol.ravel())[0, 1] > 0.999


# ---------------------------------------------------------------- what is refused, and how it is said


def _nifti_folder(tmp_path, shape=(20, 16, 6)):
    save_nifti(tmp_path / "v1.nii.gz", np.ones(shape, np.float32), np.diag([0.5, 0.5, 1.0, 1.0]))
    return tmp_path


@pytest.mark.parametrize("header,row,message", [
    (["case", "x", "y"], ["v1", 1, 2], r"missing column\(s\) slice"),
    (["case", "slice", "x", "y", "width"], ["v1", 1, 2, 3, 4], "needs both width and height"),
    (["slice", "x", "y"], [1, 2, 3], "no case column"),
    (["case", "slice", "x", "y"], ["v9", 1, 2, 3], r"boxes.csv:2: case 'v9' has no volume"),
    (["case", "slice", "x", "y"], ["v1", 1, "two", 3], r"boxes.csv:2: x 'two' is not a number"),
    (["case", "slice", "x", "y"], ["v1", 1, -2, 3], r"boxes.csv:2: x must be >= 0"),
    (["case", "slice", "x", "y", "width", "height"], ["v1", 1, 2, 3, 0, 4], "width must be positive"),
    (["case", "slice", "x", "y"], ["", 1, 2, 3], "empty case name"),
])
def test_malformed_box_rows_are_named_with_their_line(tmp_path, header, row, message):
    root = _nifti_folder(tmp_path)
    boxes = write_csv(tmp_path / "boxes.csv", header, [row])
    with pytest.raises(ValueError, match=message):
        discover_dbt(root, boxes)


@pytest.mark.parametrize("row,message", [
    (["v1", 2, 15, 3, 6, 4], r"boxes.csv:2: box x 15..21, y 3..7, slice 2 lies outside v1 \(v1.nii.gz: 20 x 16 x 6"),
    (["v1", 6, 1, 1, 2, 2], "slice 6 lies outside"),
    (["v1", 2, 19.5, 3, "", ""], "centre x 19.5, y 3, slice 2 lies outside"),
])
def test_boxes_outside_the_volume_are_refused(tmp_path, row, message):
    root = _nifti_folder(tmp_path)
    boxes = write_csv(tmp_path / "boxes.csv", ["case", "slice", "x", "y", "width", "height"], [row])
    (volume,) = discover_dbt(root, boxes)
    with pytest.raises(ValueError, match=message):
        load_dbt_case(volume, spacing_xy=None)
    with pytest.raises(ValueError, match=message):  # also when only the geometry is read (froc)
        truth_lesions(volume, *read_geometry(volume.path))


def test_duke_volume_slices_must_match_the_file(tmp_path):
    root, paths, boxes = _duke_folder(tmp_path)
    rows = list(csv.reader(open(boxes)))
    rows[1][-1] = "50"
    write_csv(boxes, rows[0], rows[1:])
    volume = discover_dbt(root, boxes, paths)[0]
    with pytest.raises(ValueError, match=r"boxes-train-v2.csv:2: VolumeSlices 50 but .*1-1.dcm has 9 slices"):
        truth_lesions(volume, *read_geometry(volume.path))


def test_folder_and_paths_table_errors(tmp_path):
    with pytest.raises(ValueError, match="DBT data folder not found"):
        discover_dbt(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no volumes \(.nii.gz, .nii or .dcm files\) below it"):
        discover_dbt(tmp_path / "empty")
    root = _nifti_folder(tmp_path / "two")
    save_nifti(root / "deeper" / "v1.nii", np.ones((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="two volumes for case 'v1'"):
        discover_dbt(root)
    root, paths, boxes = _duke_folder(tmp_path)
    rows = list(csv.reader(open(paths)))
    rows[2][3] = "Breast-Cancer-Screening-DBT/missing/1-1.dcm"
    write_csv(paths, rows[0], rows[1:])
    with pytest.raises(ValueError, match=r"file-paths-train-v2.csv:3: the volume of DBT-P00001_DBT-S00001_lcc is "
                                         r"not under"):
        discover_dbt(root, boxes, paths)
    rows[2][3] = "../../outside.dcm"
    write_csv(paths, rows[0], rows[1:])
    with pytest.raises(ValueError, match="leads outside the data folder"):
        discover_dbt(root, boxes, paths)
    write_csv(paths, ["case", "path"], [["a", "x.dcm"]])
    with pytest.raises(ValueError, match="expected Duke's columns PatientID, StudyUID, View"):
        discover_dbt(root, boxes, paths)
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not a text CSV file"):
        read_marks(tmp_path / "bin.csv")


def test_dicom_problems_are_named(tmp_path, monkeypatch):
    vol = _breast((12, 10, 3), chest_wall_left=True)
    write_dicom(tmp_path / "nospacing.dcm", vol, (0.1, 0.1, 1.0), no_spacing=True)
    with pytest.raises(ValueError, match=r"nospacing.dcm: no voxel size in the DICOM header"):
        read_volume(tmp_path / "nospacing.dcm")
    write_dicom(tmp_path / "j2k.dcm", vol, (0.1, 0.1, 1.0), compressed_garbage=True)
    with pytest.raises(ValueError, match=r"j2k.dcm: cannot decode the pixel data \(transfer syntax JPEG 2000.*"
                                         r"needs a decoder for it: pip install pydicom") as err:
        read_volume(tmp_path / "j2k.dcm")
    assert "\n" not in str(err.value)
    (tmp_path / "text.dcm").write_text("not dicom at all")
    with pytest.raises(ValueError, match="text.dcm: cannot read as DICOM"):
        read_volume(tmp_path / "text.dcm")
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if it were not installed
    with pytest.raises(ValueError, match="reading DICOM needs pydicom, which is not installed: pip install pydicom"):
        read_volume(tmp_path / "nospacing.dcm")


# ---------------------------------------------------------------- the commands on a real-layout folder


def test_train_infer_and_froc_commands_on_a_dbt_folder(tmp_path, capsys):
    """train --task detection on a NIfTI folder with a boxes CSV (2d stage, a few steps), infer writes
    every volume's candidates, froc scores them against the boxes; mistakes are one-line errors."""
    root = tmp_path / "dbt"
    rows = []
    for i in range(3):
        case = make_synthetic_dbt(2 + i, size_xy=64, slices=(20, 20), masses=(1, 2), clusters=(0, 0))
        save_nifti(root / f"case{i}.nii.gz", case.image * 1000.0, case.affine)
        for les in case.lesions:
            c = np.round(_voxel(case, les)).astype(int)
            rows.append([f"case{i}", c[2], c[0], c[1], f"{les.radius_mm:.2f}"])
    boxes = write_csv(tmp_path / "centres.csv", ["case", "slice", "x", "y", "radius_mm"], rows)
    run = tmp_path / "run"
    assert main(["train", "--task", "detection", "--data", str(root), "--boxes", str(boxes), "--stage", "2d",
                 "--steps", "2", "--patch", "64", "64", "20", "--val-cases", "1", "--no-progress", "--no-plots",
                 "--out", str(run)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "froc_cpm" in result
    ckpt = run / "last.pt"
    cand = tmp_path / "cand.csv"
    assert main(["infer", "--model", str(ckpt), str(root), str(cand), "--det-threshold", "0", "--max-candidates", "5",
                 "--no-progress"]) == 0
    assert "15 candidates in 3 volume(s)" in capsys.readouterr().out
    assert main(["froc", "--candidates", str(cand), "--truth", str(boxes), "--data", str(root)]) == 0
    assert f"{len(rows)} lesions in 3 volumes, 15 candidates" in capsys.readouterr().out
    # one DICOM file, oriented by its view: candidates named after the file, in its millimetres
    write_dicom(tmp_path / "view.dcm", (case.image * 4000).astype(np.uint16), (0.5, 0.5, 1.0))
    assert main(["infer", "--model", str(ckpt), str(tmp_path / "view.dcm"), str(tmp_path / "one.csv"), "--view", "lcc",
                 "--det-threshold", "0", "--max-candidates", "3", "--no-progress"]) == 0
    from ahnet_fast.detection import read_candidates

    got = read_candidates(tmp_path / "one.csv")
    assert len(got) == 3 and {c.case for c in got} == {"view"}
    assert all(0 <= c.position_mm[0] <= 64 * 0.5 and 0 <= c.position_mm[2] <= 20 for c in got)
    # refused, one line each, nothing written
    for argv, message in [
        (["infer", "--model", str(ckpt), str(root), str(cand), "--no-progress"], "exists"),
        (["infer", "--model", str(ckpt), str(root), str(tmp_path / "c.nii.gz")], "name it .csv"),
        (["infer", "--model", str(ckpt), str(root), str(tmp_path / "c.csv"), "--task", "segmentation"],
         "was trained for detection"),
        (["infer", "--model", str(ckpt), str(root), str(tmp_path / "c.csv"), "--probabilities", "p.nii.gz"],
         "--probabilities: segmentation options"),
        (["infer", "--model", str(ckpt), str(tmp_path / "none"), str(tmp_path / "c.csv")], "no such file or folder"),
        (["froc", "--candidates", str(cand), "--truth", str(boxes), "--file-paths", str(boxes)], "give the folder"),
        (["infer", "--model", str(ckpt), str(root), str(tmp_path / "c.csv"), "--view", "lcc"], "--view orients one"),
        (["train", "--task", "detection", "--data", str(root), "--out", str(tmp_path / "r2")], "--boxes CSV"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "c.csv").exists()
    # resume sees a changed boxes file
    rows[0][4] = "9.99"
    write_csv(boxes, ["case", "slice", "x", "y", "radius_mm"], rows)
    assert main(["train", "--task", "detection", "--data", str(root), "--boxes", str(boxes), "--stage", "2d",
                 "--steps", "3", "--patch", "64", "64", "20", "--val-cases", "1", "--no-progress", "--no-plots",
                 "--out", str(run), "--resume"]) == 2
    assert "changed: " in capsys.readouterr().err
