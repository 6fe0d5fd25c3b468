"""Peak finding and FROC on hand-built inputs whose answers are known (every hit, miss and duplicate rule)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ahnet_fast.cli import main
from ahnet_fast.detection import (FROC_RATES, Candidate, Lesion, find_peaks, froc, read_candidates, read_truth,
                                  write_candidates)

DBT_AFFINE = np.diag([0.5, 0.5, 1.0, 1.0])  # 0.5 mm in-plane, 1 mm slices


def _blob(shape, centre, sigma_vox, peak=1.0):
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    d2 = sum(((g - c) / s) ** 2 for g, c, s in zip(grid, centre, sigma_vox))
    return peak * np.exp(-0.5 * d2)


# ---------------------------------------------------------------- peaks

def test_peaks_are_found_at_the_blob_centres_in_world_millimetres():
    affine = DBT_AFFINE.copy()
    affine[:3, 3] = (10.0, -20.0, 5.0)
    heat = np.maximum(_blob((40, 40, 12), (10, 12, 3), (4, 4, 2), 0.9), _blob((40, 40, 12), (30, 25, 8), (4, 4, 2), 0.7))
    peaks = find_peaks(heat, affine, radius_mm=4.0, threshold=0.3, case="v")
    assert [p.case for p in peaks] == ["v", "v"]
    assert peaks[0].position_mm == (15.0, -14.0, 8.0) and peaks[0].score == pytest.approx(0.9)
    assert peaks[1].position_mm == (25.0, -7.5, 13.0) and peaks[1].score == pytest.approx(0.7)
    # the threshold, and at most max_candidates, highest first
    assert len(find_peaks(heat, affine, radius_mm=4.0, threshold=0.8)) == 1
    assert [p.score for p in find_peaks(heat, affine, radius_mm=4.0, threshold=0.3, max_candidates=1)] == \
        [pytest.approx(0.9)]
    # torch input gives the same
    assert find_peaks(torch.from_numpy(heat), affine, radius_mm=4.0, threshold=0.3) == \
        find_peaks(heat, affine, radius_mm=4.0, threshold=0.3)


def test_two_maxima_closer_than_the_radius_in_millimetres_give_one_candidate():
    """Voxels are 0.5 x 0.5 x 1 mm: two maxima 3 voxels apart in-plane are 1.5 mm apart (one candidate
    at radius 2 mm) while 3 slices apart are 3 mm (two candidates)."""
    shape = (30, 30, 20)
    inplane = np.maximum(_blob(shape, (10, 10, 10), (1, 1, 1), 1.0), _blob(shape, (13, 10, 10), (1, 1, 1), 0.8))
    assert len(find_peaks(inplane, DBT_AFFINE, radius_mm=2.0, threshold=0.5)) == 1
    across = np.maximum(_blob(shape, (10, 10, 5), (1, 1, 1), 1.0), _blob(shape, (10, 10, 8), (1, 1, 1), 0.8))
    assert len(find_peaks(across, DBT_AFFINE, radius_mm=2.0, threshold=0.5)) == 2
    # on the diagonal: 2 voxels along x and along y is 1.41 mm. A pooling box 1.2 mm wide per axis would
    # swallow it; the radius does not
    corner = np.zeros(shape)
    corner[10, 10, 10], corner[12, 12, 10] = 1.0, 0.9
    assert len(find_peaks(corner, DBT_AFFINE, radius_mm=1.5, threshold=0.5)) == 1
    assert len(find_peaks(corner, DBT_AFFINE, radius_mm=1.2, threshold=0.5)) == 2


def test_a_plateau_is_one_candidate_and_bad_input_is_refused():
    heat = np.zeros((20, 20, 6), np.float32)
    heat[5:8, 5:8, 2:4] = 0.6
    peaks = find_peaks(heat, DBT_AFFINE, radius_mm=3.0, threshold=0.5)
    assert len(peaks) == 1 and peaks[0].position_mm == (2.5, 2.5, 2.0)  # the first voxel of the plateau
    assert find_peaks(np.zeros((4, 4, 4)), np.eye(4), threshold=0.5) == []
    bad = heat.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"find_peaks \(v1\): the heat map has 1 NaN or infinite values"):
        find_peaks(bad, DBT_AFFINE, case="v1")
    with pytest.raises(ValueError, match="affine"):
        find_peaks(heat, np.zeros((4, 4)))
    with pytest.raises(ValueError, match="radius_mm"):
        find_peaks(heat, DBT_AFFINE, radius_mm=0)
    with pytest.raises(ValueError, match="non-empty"):
        find_peaks(np.zeros((4, 4)), DBT_AFFINE)


# ---------------------------------------------------------------- FROC rules

def C(case, x, score, y=0.0, z=0.0):
    return Candidate(case, (float(x), float(y), float(z)), float(score))


def L(case, x, radius=5.0, y=0.0, z=0.0):
    return Lesion(case, (float(x), float(y), float(z)), radius)


def test_every_lesion_found_without_false_positives_is_sensitivity_one():
    r = froc([C("a", 0, 0.9), C("b", 100, 0.8)], [L("a", 1), L("b", 101)], ["a", "b"])
    assert r.sensitivity == (1.0,) * 6 and r.cpm == 1.0
    assert (r.n_found, r.n_false_positives, r.n_duplicates) == (2, 0, 0)


def test_hits_are_within_the_radius_inclusive():
    lesion = [L("a", 0, radius=5.0)]
    assert froc([C("a", 3, 0.9, y=4)], lesion).n_found == 1            # exactly 5 mm: a hit
    r = froc([C("a", 3, 0.9, y=4.0001)], lesion)                         # just beyond: a miss and an FP
    assert (r.n_found, r.n_false_positives) == (0, 1) and r.cpm == 0.0
    # a candidate in another volume at the same coordinates is not a hit
    r = froc([C("b", 0, 0.9)], lesion, ["a", "b"])
    assert (r.n_found, r.n_false_positives) == (0, 1)


def test_duplicates_are_neither_true_nor_false_positives_and_the_best_score_counts():
    cands = [C("a", 0, 0.9), C("a", 1, 0.95), C("a", 2, 0.2)]
    r = froc(cands, [L("a", 0)])
    assert (r.n_found, r.n_false_positives, r.n_duplicates) == (1, 0, 2)
    assert r.curve_threshold[1] == pytest.approx(0.95)  # the lesion is found at its best candidate's score
    assert r.cpm == 1.0


def test_one_candidate_hitting_two_lesions_finds_both():
    r = froc([C("a", 5, 0.9)], [L("a", 0, radius=6), L("a", 10, radius=6)])
    assert r.n_found == 2 and r.sensitivity[0] == 1.0 and r.n_duplicates == 0


def test_false_positives_are_per_volume_lesion_free_volumes_included():
    """One lesion found at score 0.5 below four false positives at 0.6-0.9, over 2 volumes, then over
    4 (two lesion-free volumes with nothing in them): the lesion is found at 2 FP/volume, then at 1."""
    cands = [C("a", 0, 0.5), C("a", 50, 0.9), C("a", 60, 0.8), C("b", 0, 0.7), C("b", 10, 0.6)]
    r = froc(cands, [L("a", 0)], ["a", "b"])
    assert r.sensitivity == (0, 0, 0, 0, 1, 1)
    r = froc(cands, [L("a", 0)], ["a", "b", "c", "d"])
    assert r.sensitivity == (0, 0, 0, 1, 1, 1) and r.cpm == pytest.approx(0.5)


def test_a_hand_computed_froc():
    """Three volumes, four lesions (one never hit), candidates by score:
    0.9 hit l1 | 0.8 FP | 0.7 hit l2 | 0.6 FP | 0.5 FP | 0.4 hit l3 | 0.3 FP | 0.2 FP.
    Thresholds from the top: (FP/vol, sensitivity) = (0, 1/4), (1/3, 1/4), (1/3, 2/4), (2/3, 2/4), (1, 2/4),
    (1, 3/4), (4/3, 3/4), (5/3, 3/4). At 1/8 and 1/4 FP/vol: 1/4; at 1/2: 2/4; at 1: 3/4; at 2 and 4: 3/4."""
    lesions = [L("a", 0), L("a", 100), L("b", 0), L("c", 0)]
    cands = [C("a", 0, 0.9), C("a", 50, 0.8), C("a", 100, 0.7), C("b", 50, 0.6), C("c", 50, 0.5), C("b", 1, 0.4),
             C("c", 70, 0.3), C("c", 90, 0.2)]
    r = froc(cands, lesions, ["a", "b", "c"])
    assert r.sensitivity == pytest.approx((0.25, 0.25, 0.5, 0.75, 0.75, 0.75))
    assert r.cpm == pytest.approx((0.25 * 2 + 0.5 + 0.75 * 3) / 6)
    np.testing.assert_allclose(r.curve_fp_per_volume, [0, 0, 1 / 3, 1 / 3, 2 / 3, 1, 1, 4 / 3, 5 / 3])
    np.testing.assert_allclose(r.curve_sensitivity, [0, 0.25, 0.25, 0.5, 0.5, 0.5, 0.75, 0.75, 0.75])
    assert (r.n_lesions, r.n_volumes, r.n_found, r.n_false_positives) == (4, 3, 3, 5)
    assert r.rates == FROC_RATES


def test_points_need_a_hit_distance_and_unknown_volumes_are_refused():
    point = [Lesion("a", (0.0, 0.0, 0.0), None)]
    with pytest.raises(ValueError, match="has no radius; give hit_distance_mm"):
        froc([C("a", 0, 0.9)], point)
    assert froc([C("a", 3, 0.9)], point, hit_distance_mm=4).n_found == 1
    assert froc([C("a", 5, 0.9)], point, hit_distance_mm=4).n_found == 0
    with pytest.raises(ValueError, match="candidates for 1 volume"):
        froc([C("z", 0, 0.9)], [L("a", 0)], ["a"])
    with pytest.raises(ValueError, match="lesions in 1 volume"):
        froc([], [L("z", 0)], ["a"])
    with pytest.raises(ValueError, match="not finite"):
        froc([C("a", 0, math.nan)], [L("a", 0)])


def test_no_lesions_at_all_is_sensitivity_zero_not_an_error():
    r = froc([C("a", 0, 0.5)], [], ["a"])
    assert r.cpm == 0.0 and r.n_false_positives == 1


# ---------------------------------------------------------------- CSV files and the command

def test_csv_round_trip_and_clear_errors(tmp_path):
    cands = [C("case-1", 1.25, 0.9, y=2, z=3), C("case 2", -4, 0.125)]
    write_candidates(tmp_path / "c.csv", cands)
    assert read_candidates(tmp_path / "c.csv") == cands
    (tmp_path / "t.csv").write_text("case,x_mm,y_mm,z_mm,radius_mm\ncase-1,1,2,3,4\ncase-3,,,,\ncase 2,0,0,0,\n")
    lesions, cases = read_truth(tmp_path / "t.csv")
    assert cases == ["case-1", "case-3", "case 2"]
    assert lesions == [Lesion("case-1", (1.0, 2.0, 3.0), 4.0), Lesion("case 2", (0.0, 0.0, 0.0), None)]
    bad = {
        "case,x_mm,y_mm,score\na,1,2,0.5\n": r"missing column\(s\) z_mm",
        "case,x_mm,y_mm,z_mm,score\na,1,2,three,0.5\n": r"bad.csv:2: z_mm 'three' is not a number",
        "case,x_mm,y_mm,z_mm,score\na,1,2,3,nan\n": r"bad.csv:2: score is nan, not a finite number",
        "case,x_mm,y_mm,z_mm,score\na,1,2,3,0.5,9\n": r"bad.csv:2: more fields than the header's 5",
        "case,x_mm,y_mm,z_mm,score\n,1,2,3,0.5\n": r"bad.csv:2: empty case name",
    }
    for text, message in bad.items():
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(ValueError, match=message):
            read_candidates(tmp_path / "bad.csv")
    (tmp_path / "bad.csv").write_text("case,x_mm,y_mm,z_mm,radius_mm\na,1,2,3,-1\n")
    with pytest.raises(ValueError, match="radius_mm must be positive"):
        read_truth(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="no such file"):
        read_truth(tmp_path / "missing.csv")


def test_froc_command_prints_writes_json_and_plot(tmp_path, capsys):
    lesions = [L("a", 0), L("a", 100), L("b", 0), L("c", 0)]
    cands = [C("a", 0, 0.9), C("a", 50, 0.8), C("a", 100, 0.7), C("b", 50, 0.6), C("c", 50, 0.5), C("b", 1, 0.4),
             C("c", 70, 0.3), C("c", 90, 0.2)]
    write_candidates(tmp_path / "c.csv", cands)
    (tmp_path / "t.csv").write_text("case,x_mm,y_mm,z_mm,radius_mm\n"
                                    + "".join(f"{x.case},{x.position_mm[0]},0,0,5\n" for x in lesions))
    assert main(["froc", "--candidates", str(tmp_path / "c.csv"), "--truth", str(tmp_path / "t.csv"),
                 "--json", str(tmp_path / "froc.json"), "--plot", str(tmp_path / "froc.png")]) == 0
    out = capsys.readouterr().out
    assert "sensitivity:" in out and "0.250   0.250   0.500   0.750   0.750   0.750" in out
    assert "mean sensitivity over these rates (CPM): 0.542" in out
    record = json.loads((tmp_path / "froc.json").read_text())
    assert record["cpm"] == pytest.approx(0.5416666) and record["n_false_positives"] == 5
    assert (tmp_path / "froc.png").read_bytes()[:4] == b"\x89PNG"
    # a candidate for a volume the truth does not name: one line, exit 2
    write_candidates(tmp_path / "c.csv", [*cands, C("zz", 0, 0.1)])
    assert main(["froc", "--candidates", str(tmp_path / "c.csv"), "--truth", str(tmp_path / "t.csv")]) == 2
    assert "candidates for 1 volume(s) that are not evaluated: zz" in capsys.readouterr().err


# ---------------------------------------------------------------- the target and the synthetic DBT volumes

def test_heatmap_target_is_anisotropic_in_voxels_and_peaks_at_the_lesions():
    from ahnet_fast.detection import heatmap_target

    affine = DBT_AFFINE.copy()
    affine[:3, 3] = (-3.0, 2.0, 1.0)
    lesions = [Lesion("v", (7.0, 12.0, 9.0), 4.0), Lesion("v", (20.0, 5.0, 4.0), None)]
    h = heatmap_target((60, 40, 16), affine, lesions)
    assert h.dtype == np.float32 and h.shape == (60, 40, 16)
    i, j, k = 20, 20, 8  # (7 + 3) / 0.5, (12 - 2) / 0.5, 9 - 1
    assert h[i, j, k] == pytest.approx(1.0)
    # sigma = 2 mm: 4 voxels in-plane, 2 slices; one sigma away the target is exp(-1/2) on both axes
    assert h[i + 4, j, k] == pytest.approx(np.exp(-0.5), rel=1e-5)
    assert h[i, j, k + 2] == pytest.approx(np.exp(-0.5), rel=1e-5)
    peaks = find_peaks(h, affine, radius_mm=3.0, threshold=0.9, case="v")
    assert sorted(p.position_mm for p in peaks) == sorted(les.position_mm for les in lesions)
    # a lesion outside the grid (a patch that misses it) leaves the target empty
    assert heatmap_target((8, 8, 4), np.eye(4), [Lesion("v", (100.0, 100.0, 100.0), 3.0)]).max() == 0.0


def test_synthetic_dbt_volumes():
    from ahnet_fast.data.dbt import make_synthetic_dbt, synthetic_dbt_cases

    a, b = make_synthetic_dbt(7), make_synthetic_dbt(7)
    assert np.array_equal(a.image, b.image) and a.lesions == b.lesions
    assert not np.array_equal(make_synthetic_dbt(8).image[:, :, :32], a.image[:, :, :32])
    cases = synthetic_dbt_cases(4, seed=3, size_xy=96)
    for case in cases:
        img = case.image
        assert img.dtype == np.float32 and img.shape[:2] == (96, 96) and 32 <= img.shape[2] <= 48
        assert case.spacing == (0.5, 0.5, 1.0) and 0.0 <= img.min() and img.max() <= 1.0
        assert img[-1, 0, :].max() == 0.0  # air at the corner away from the chest wall
        assert len(case.lesions) == len(case.kinds) >= 1 and set(case.kinds) <= {"mass", "calcifications"}
        for les, kind in zip(case.lesions, case.kinds):
            centre = np.round(np.asarray(les.position_mm) / np.asarray(case.spacing)).astype(int)
            assert all(0 <= c < n for c, n in zip(centre, img.shape))
            lo, hi = (2.5, 10.0) if kind == "mass" else (3.0, 6.0)
            assert lo <= les.radius_mm <= hi
            if kind == "mass":  # denser than the tissue around it
                r = int(les.radius_mm / 0.5)
                core = img[centre[0] - r // 2:centre[0] + r // 2 + 1, centre[1] - r // 2:centre[1] + r // 2 + 1,
                           centre[2]]
                ring = img[max(centre[0] - 2 * r, 0):centre[0] + 2 * r + 1, max(centre[1] - 2 * r, 0):centre[1] + 2 * r + 1,
                           centre[2]]
                assert core.mean() > ring[ring > 0.05].mean()
        for p, q in [(p, q) for i, p in enumerate(case.lesions) for q in case.lesions[i + 1:]]:
            assert math.dist(p.position_mm, q.position_mm) >= p.radius_mm + q.radius_mm + 2  # separate lesions
    assert sum(k == "calcifications" for c in cases for k in c.kinds) >= 1
    with pytest.raises(ValueError, match="size_xy"):
        make_synthetic_dbt(0, size_xy=16)


# ---------------------------------------------------------------- detection training

def test_samplers_cut_the_heat_map_and_centre_patches_on_lesions():
    from ahnet_fast.data import PatchSampler, SliceSampler
    from ahnet_fast.data.dbt import synthetic_dbt_cases, with_target

    cases = [with_target(c) for c in synthetic_dbt_cases(2, seed=5, size_xy=96)]
    x, y = PatchSampler(cases, (32, 32, 16), foreground_ratio=1.0, seed=0).batch(0, 4)
    assert x.shape == (4, 1, 32, 32, 16) and y.shape == (4, 32, 32, 16) and y.dtype == torch.float32
    assert float(y.amax(dim=(1, 2, 3)).min()) > 0.5  # every lesion-centred patch holds a lesion's peak region
    x, y = SliceSampler(cases, (32, 32), foreground_ratio=1.0, seed=0).batch(0, 2)
    assert x.shape == (2, 3, 32, 32) and y.dtype == torch.float32 and float(y.max()) > 0.5


def test_heatmap_loss_is_the_cross_entropy_against_the_soft_target():
    from ahnet_fast.training.evaluate import HEATMAP_PRIOR_LOGIT
    from ahnet_fast.training.loop import heatmap_loss

    assert torch.sigmoid(torch.tensor(HEATMAP_PRIOR_LOGIT)) == pytest.approx(0.01)  # an untrained net says 0.01
    logits, target = torch.randn(2, 1, 4, 4, 4, dtype=torch.float64), torch.rand(2, 1, 4, 4, 4, dtype=torch.float64)
    p = torch.sigmoid(logits + HEATMAP_PRIOR_LOGIT)
    expected = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    torch.testing.assert_close(heatmap_loss(logits, target).double(), expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="differ"):
        heatmap_loss(logits, target[:, 0])


def test_detection_schedule_trains_end_to_end_and_reports_froc(tmp_path):
    """2d -> 3d -> finetune on synthetic DBT with a one-channel heat map, the FROC (and its chance level)
    in metrics.jsonl, the FROC curve and the detections montage written."""
    from ahnet_fast.training import TrainConfig, train_schedule
    from ahnet_fast.training.checkpoint import load_checkpoint

    cfg = TrainConfig(task="detection", patch=(64, 64, 32), psp_block_num=0, train_cases=2, val_cases=1,
                      synthetic_size_xy=96, progress=False, plots=True, save_every=2, out=str(tmp_path / "run"))
    results = train_schedule(cfg, steps={"2d": 2, "3d": 1, "finetune": 1})
    for stage, r in zip(("2d", "3d", "finetune"), results):
        ckpt = load_checkpoint(r["checkpoint"])
        assert ckpt["model_spec"]["kwargs"]["out_channels"] == 1 and ckpt["config"]["task"] == "detection"
        assert {"froc_cpm", "froc_chance_cpm", "sensitivity@1"} <= r["froc"].keys()
        assert 0.0 <= r["froc"]["froc_cpm"] <= 1.0
        for name in ("froc.png", "montage.png", "curves.png"):
            assert (tmp_path / "run" / stage / name).read_bytes()[:4] == b"\x89PNG"
    evals = [json.loads(x) for x in (tmp_path / "run" / "finetune" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in x]
    assert evals and "froc_cpm" in evals[-1]
    # `infer` segments: a detection checkpoint is refused before anything is written
    from ahnet_fast.data import save_nifti
    from ahnet_fast.training.infer import infer_file

    save_nifti(tmp_path / "dbt.nii.gz", np.zeros((64, 64, 32), np.float32), np.diag([0.5, 0.5, 1.0, 1.0]))
    with pytest.raises(ValueError, match="is a detection checkpoint"):
        infer_file(results[-1]["checkpoint"], tmp_path / "dbt.nii.gz", tmp_path / "seg.nii.gz", progress=False)
    assert not (tmp_path / "seg.nii.gz").exists()
    # ... its candidates come from detect_volumes, as the evaluation found them (same heat map and peaks)
    from ahnet_fast.data.dbt import synthetic_dbt_cases
    from ahnet_fast.detection import find_peaks, read_candidates
    from ahnet_fast.training.evaluate import predict_heatmap
    from ahnet_fast.training.infer import detect_volumes

    case = synthetic_dbt_cases(1, seed=5, size_xy=96)[0]
    save_nifti(tmp_path / "one.nii.gz", case.image, case.affine)
    summary = detect_volumes(results[-1]["checkpoint"], tmp_path / "one.nii.gz", tmp_path / "cand.csv",
                             threshold=0.0, max_candidates=7, progress=False)
    got = read_candidates(tmp_path / "cand.csv")
    assert summary["candidates"] == len(got) == 7 and {c.case for c in got} == {"one"}
    from ahnet_fast.training.infer import load_trained_model

    net, tcfg = load_trained_model(results[-1]["checkpoint"])
    want = find_peaks(predict_heatmap(net, case.image, tcfg.patch, overlap=tcfg.overlap), case.affine,
                      radius_mm=tcfg.det_radius_mm, threshold=0.0, max_candidates=7, case="one")
    np.testing.assert_allclose([c.position_mm for c in got], [c.position_mm for c in want], atol=1e-3)
    np.testing.assert_allclose([c.score for c in got], [c.score for c in want], rtol=1e-5)


def test_detection_on_a_folder_needs_its_boxes_and_boxes_need_a_folder(tmp_path):
    from ahnet_fast.training import TrainConfig

    with pytest.raises(ValueError, match="give its lesions with --boxes"):
        TrainConfig(task="detection", data=str(tmp_path)).validate()
    with pytest.raises(ValueError, match="give it with --data DIR"):
        TrainConfig(task="detection", boxes="b.csv").validate()
    with pytest.raises(ValueError, match="are for --task detection"):
        TrainConfig(data=str(tmp_path), boxes="b.csv").validate()
