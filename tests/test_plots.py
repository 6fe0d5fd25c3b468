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


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions save, drawn (for positions), in order."""
    figures = []
    save = plots._save_png

    def keep(fig, path):
        fig.canvas.draw()
        figures.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save_png", keep)
    return figures


def test_loss_axis_is_robust_to_a_near_zero_outlier_and_legends_stay_off_the_data(tmp_path, drawn):
    records = _records()
    records[120]["loss"] = 1e-7  # an easy batch, as the demo's 2D stage had
    plot_curves(records, tmp_path / "c.png")
    ax_loss, ax_dice = drawn[0].axes[:2]
    low, high = ax_loss.get_ylim()
    assert 1e-3 < low < 0.1 and high > 2.0  # the bulk of the curve (0.07..2), not 8 decades
    texts = [t.get_text() for t in ax_loss.get_legend().get_texts()]
    assert any("1 below the axis" in t for t in texts), texts
    for ax in (ax_loss, ax_dice):  # each legend entirely below its axes
        assert ax.get_legend().get_window_extent().y1 <= ax.get_window_extent().y0 + 1


def test_robust_log_limits():
    low, high = plots.robust_log_limits(np.array([1.0, 0.5, 0.2, 0.1] * 25 + [1e-9]))
    assert 0.05 < low < 0.1 and 1.0 < high < 1.5


@pytest.mark.parametrize("x_sign", [1, -1], ids=["RAS", "LAS"])
def test_montage_is_radiological_and_follows_the_affine(tmp_path, drawn, x_sign):
    """A structure on the patient's right (the liver) is drawn on the viewer's left, whichever way the
    voxel X axis runs (RAS affine: +X is right; LAS: +X is left)."""
    image = np.zeros((20, 16, 4), np.float32)
    right_end = 19 if x_sign == 1 else 0  # the voxel column at the patient's right
    image[right_end, :, :] = 100.0
    label = np.zeros(image.shape, np.uint8)
    label[right_end, 4:8, :] = 1
    plot_montage(image, label, None, tmp_path / "m.png", n_slices=1, affine=np.diag([x_sign * 0.8, 0.8, 2.5, 1.0]))
    ax = drawn[0].axes[0]
    shown = np.asarray(ax.images[0].get_array())  # (Y, X) of the RAS-ordered slice
    bright_column = int(np.argmax(shown.max(axis=0)))
    left, right = ax.get_xlim()
    assert left > right  # +X (patient's right) runs to the viewer's left
    assert bright_column == 19  # the patient's right end, in RAS order ...
    x_on_screen = ax.transData.transform((bright_column, 0))[0]
    assert x_on_screen < ax.transAxes.transform((0.5, 0))[0]  # ... on the left half of the panel
    assert {t.get_text() for t in ax.texts} >= {"R", "L"}


def test_montage_rejects_a_singular_affine(tmp_path):
    image = np.zeros((8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="affine must be a finite, invertible 4x4"):
        plot_montage(image, None, None, tmp_path / "m.png", affine=np.zeros((4, 4)))
