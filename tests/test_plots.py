"""Learning curves and segmentation montages: valid PNGs, slice choice, edge cases."""
import math

import numpy as np
import pytest
import torch

from ahnet_fast import plots
from ahnet_fast.plots import plot_curves, plot_montage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_bytes=5_000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is suspiciously small ({len(data)} bytes)"
    assert not list(path.parent.glob(f".{path.name}.*")), "temporary file left behind"


def _records(n=200):
    rng = np.random.default_rng(0)
    out = []
    for step in range(n):
        rec = {"step": step, "loss": float(2.0 * math.exp(-step / 60) + 0.05 * rng.random()), "lr": 1e-3}
        if step % 50 == 49:
            rec.update({"dice/liver": min(1.0, 0.3 + step / 250), "dice/lesion": step / 400, "time": 1.0})
        out.append(rec)
    return out


def test_plot_curves_writes_png(tmp_path):
    path = plot_curves(_records(), tmp_path / "sub" / "curves.png")
    assert path == tmp_path / "sub" / "curves.png"
    assert_png(path)


def test_plot_curves_tolerates_gaps_nonfinite_and_summary_keys(tmp_path):
    records = _records(30)
    records[5]["loss"] = float("nan")  # a diverged step
    records[6]["loss"] = float("inf")
    records.append({"step": 30, "dice_case/liver": 0.8, "dice_global/liver": 0.9})  # evaluation only
    records.append({"note": "no step"})  # ignored
    assert_png(plot_curves(records, tmp_path / "c.png"))


def test_plot_curves_nonpositive_loss_and_dice_only(tmp_path):
    assert_png(plot_curves([{"step": i, "loss": 1.0 - 0.1 * i} for i in range(15)], tmp_path / "lin.png"))
    assert_png(plot_curves([{"step": 10, "dice/liver": 0.5}, {"step": 20, "dice/liver": 0.7}], tmp_path / "d.png"))


@pytest.mark.parametrize("records", [[], [{"step": 1, "lr": 0.1}], [{"loss": 0.3}]])
def test_plot_curves_nothing_to_plot(tmp_path, records):
    with pytest.raises(ValueError, match="no step"):
        plot_curves(records, tmp_path / "x.png")


def test_plot_curves_bad_records(tmp_path):
    with pytest.raises(ValueError, match="list of dicts"):
        plot_curves({"step": 1, "loss": 1.0}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"records\[1\]"):
        plot_curves([{"step": 1, "loss": 1.0}, 3.0], tmp_path / "x.png")


def test_smoothing_is_unbiased_at_the_start():
    s = plots._smooth(np.full(100, 3.0))
    np.testing.assert_allclose(s, 3.0)


def _volume(seed=0):
    """A body, a liver on slices 6-13 and a small lesion only on slice 12."""
    shape = (64, 48, 20)
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    image = np.full(shape, -1000.0, np.float32)
    body = ((x - 32) / 28) ** 2 + ((y - 24) / 20) ** 2 < 1
    image[body] = 40.0
    label = np.zeros(shape, np.uint8)
    liver = ((x - 24) / 12) ** 2 + ((y - 20) / 9) ** 2 < 1
    for z in range(6, 14):
        label[liver, z] = 1
        image[liver, z] = 60.0
    lesion = ((x - 22) / 3) ** 2 + ((y - 19) / 3) ** 2 < 1
    label[lesion, 12] = 2
    image[lesion, 12] = 20.0
    image += rng.normal(0, 15, shape).astype(np.float32)
    pred = np.roll(label, 2, axis=0)  # a shifted prediction so both outlines show
    return image, label, pred


def test_plot_montage_writes_png(tmp_path):
    image, label, pred = _volume()
    path = plot_montage(image, label, pred, tmp_path / "montage.png", title="volume-0")
    assert_png(path, min_bytes=20_000)


def test_montage_picks_foreground_slices_and_keeps_the_lesion():
    image, label, pred = _volume()
    picks = plots._pick_slices([label, pred], 4, image.shape[2])
    assert len(picks) == 4 and picks == sorted(picks)
    assert all(6 <= z <= 13 for z in picks), picks  # only slices with foreground
    assert 12 in picks  # the one lesion slice is shown although an even spread would miss it
    assert plots._pick_slices([label], 20, image.shape[2]) == list(range(6, 14))  # fewer than asked: all


def test_montage_picks_prediction_slices_when_label_is_empty():
    image, label, pred = _volume()
    empty = np.zeros_like(label)
    picks = plots._pick_slices([empty, pred], 6, image.shape[2])
    assert all(pred[:, :, z].any() for z in picks)
    picks = plots._pick_slices([empty], 6, 20)  # no foreground anywhere: spread over the volume
    assert len(picks) == 6 and picks[0] > 0 and picks[-1] < 19
    assert plots._pick_slices([empty[:, :, :3]], 6, 3) == [0, 1, 2]


def test_plot_montage_without_foreground_or_pred(tmp_path):
    image, label, pred = _volume()
    empty = np.zeros_like(label)
    assert_png(plot_montage(image, empty, None, tmp_path / "empty.png"))
    assert_png(plot_montage(image, label, None, tmp_path / "nopred.png"))
    assert_png(plot_montage(image, None, None, tmp_path / "image_only.png"))
    assert_png(plot_montage(image, None, pred, tmp_path / "pred_only.png", n_slices=1))


def test_plot_montage_accepts_tensors_and_names(tmp_path):
    image, label, pred = (a[:, :, 5:14].copy() for a in _volume())
    path = plot_montage(
        torch.from_numpy(image), torch.from_numpy(label), torch.from_numpy(pred).long(), tmp_path / "t.png",
        n_slices=2, class_names=["bg", "organ", "tumour"],
    )
    assert_png(path)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(image=np.zeros((4, 4))), "image must be an"),
        (dict(label=np.zeros((4, 4, 3), np.uint8)), "label shape"),
        (dict(pred=np.zeros((64, 48, 20), np.float32)), "integer class labels"),
        (dict(n_slices=0), "n_slices"),
        (dict(class_names=["bg", "liver"]), "no name for label 2"),
    ],
)
def test_plot_montage_bad_inputs(tmp_path, change, match):
    image, label, pred = _volume()
    kwargs = dict(image=image, label=label, pred=pred, path=tmp_path / "x.png")
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        plot_montage(kwargs.pop("image"), kwargs.pop("label"), kwargs.pop("pred"), kwargs.pop("path"), **kwargs)


def test_no_pyplot_state_is_touched(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    image, label, pred = (a[:, :, 8:14] for a in _volume())
    plot_montage(image, label, pred, tmp_path / "m.png", n_slices=2)
    assert matplotlib.get_backend() == backend


def test_display_range():
    hu = np.concatenate([np.full(100, -1000.0), np.linspace(-100, 300, 900)]).astype(np.float32)
    assert plots._display_range(hu, None) == (-160.0, 240.0)  # raw CT: soft-tissue window
    lo, hi = plots._display_range(np.linspace(0, 1, 1001), None)  # preprocessed: percentiles
    assert lo == pytest.approx(0.005) and hi == pytest.approx(0.995)
    assert plots._display_range(np.zeros(10), None) == (0.0, 1.0)  # flat image: still a valid range
    assert plots._display_range(hu, (0, 100)) == (0.0, 100.0)
    with pytest.raises(ValueError, match="display_range"):
        plots._display_range(hu, (5, 5))


def test_many_classes_get_distinct_colours(tmp_path):
    image, label, pred = _volume()
    label = label.copy()
    label[40:50, 30:40, 8] = 9
    colours = [plots._class_colour(c, w) for c in range(1, 10) for w in (0, 1)]
    assert len(set(colours)) == len(colours)
    assert_png(plot_montage(image, label, pred, tmp_path / "many.png", class_names=[f"c{i}" for i in range(10)]))


def test_matplotlib_is_imported_lazily():
    import subprocess
    import sys

    code = "import sys, ahnet_fast.plots, ahnet_fast.inference; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
