"""PNG figures for a training run: learning curves and a segmentation montage.

Both functions draw on a bare ``matplotlib.figure.Figure`` rendered by the Agg backend, without
pyplot: nothing global is switched (a user's interactive backend stays as it is), no figure is
left open, and they work on headless training machines. matplotlib is imported inside the
functions so that importing ``ahnet_fast`` does not pay for it. Files are written atomically (a
temporary file in the same folder, then ``os.replace``), so a viewer refreshing the PNG during
training never reads half a file.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ahnet_fast._atomic import atomic_path
from ahnet_fast.metrics import default_class_names

__all__ = ["plot_curves", "plot_montage"]

# Per class (1, 2, ...): (ground-truth colour, prediction colour). Ground truth is drawn solid and
# the prediction dashed, so the two stay apart for readers who cannot tell the colours apart.
_CLASS_COLOURS = [
    ("#00e000", "#ffd000"),  # liver: green truth, yellow prediction
    ("#00b0ff", "#ff2060"),  # lesion: blue truth, red prediction
    ("#c060ff", "#ff8000"),
    ("#ffffff", "#ff00ff"),
    ("#00ffc0", "#a0a0ff"),
]


def _class_colour(c: int, which: int) -> str:
    """Colour of class ``c`` >= 1 for the truth (``which`` 0) or the prediction (1); classes past
    the hand-picked pairs take tab20's dark/light pairs."""
    if c <= len(_CLASS_COLOURS):
        return _CLASS_COLOURS[c - 1][which]
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    return to_hex(colormaps["tab20"](2 * ((c - 1) % 10) + which))


def _new_figure(figsize, layout=None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def _smooth(values: np.ndarray) -> np.ndarray:
    """Bias-corrected exponential moving average over ~1/20 of the run (the TensorBoard kind of
    smoothing, without its lag at the start)."""
    span = max(1, len(values) // 20)
    alpha = 2.0 / (span + 1.0)
    out = np.empty_like(values, dtype=np.float64)
    avg = 0.0
    for i, v in enumerate(values):
        avg = (1 - alpha) * avg + alpha * v
        out[i] = avg / (1 - (1 - alpha) ** (i + 1))
    return out


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def plot_curves(records: Sequence[dict], path) -> Path:
    """Loss and Dice against the training step, as a PNG at ``path`` (returned).

    ``records`` are the rows of ``metrics.jsonl``: ``"step"`` and ``"loss"`` per logged step, and on
    evaluation steps Dice entries named ``"dice/<class>"`` (also accepted: ``"dice_case/<class>"``,
    ``"dice_global/<class>"`` as written by :meth:`ahnet_fast.metrics.DiceTracker.summary`); other
    keys are ignored. The loss is drawn raw (faint) and smoothed, on a log scale while it stays
    positive (a loss falling over decades is unreadable on a linear one); non-finite losses (a
    diverged step) are left out and counted in the legend. The loss axis spans the bulk of the
    values (2nd percentile to the maximum, see :func:`robust_log_limits`): a few near-zero losses of
    an easy batch would otherwise stretch it over many decades; how many fall below it is counted
    in the legend. Legends sit below the axes, off the curves. Raises ValueError when no record has
    a step with a loss or a Dice value.
    """
    if isinstance(records, dict):
        raise ValueError("records must be a list of dicts (one per logged step), got a single dict")
    loss_steps, losses, skipped = [], [], 0
    dice: dict[str, tuple[list, list]] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"records[{i}] is a {type(rec).__name__}, expected a dict")
        step = _number(rec.get("step"))
        if step is None:
            continue
        loss = _number(rec.get("loss"))
        if loss is not None:
            if math.isfinite(loss):
                loss_steps.append(step)
                losses.append(loss)
            else:
                skipped += 1
        for key, value in rec.items():
            # Dice per class, or a detection run's FROC mean sensitivity (and its chance level)
            if (key.startswith("dice") and "/" in key) or key in ("froc_cpm", "froc_chance_cpm"):
                v = _number(value)
                if v is not None and math.isfinite(v):
                    xs, ys = dice.setdefault(key, ([], []))
                    xs.append(step)
                    ys.append(v)
    if not losses and not dice:
        raise ValueError("records contain no step with a finite 'loss' or a 'dice/<class>' value to plot")
    froc_names = {"froc_cpm": "FROC mean sensitivity", "froc_chance_cpm": "chance"}
    metric = "FROC mean sensitivity" if any(k in froc_names for k in dice) else "Dice"

    fig = _new_figure((11, 4.6), layout="constrained")
    ax_loss, ax_dice = fig.subplots(1, 2)
    below = dict(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False, fontsize=9)
    if losses:
        order = np.argsort(loss_steps, kind="stable")
        x, y = np.asarray(loss_steps)[order], np.asarray(losses)[order]
        ax_loss.plot(x, y, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
        ax_loss.plot(x, _smooth(y), color="tab:blue", linewidth=1.8, label="smoothed")
        if (y > 0).all():
            ax_loss.set_yscale("log")
            low, high = robust_log_limits(y)
            ax_loss.set_ylim(low, high)
            clipped = int((y < low).sum())
            if clipped:
                ax_loss.plot([], [], " ", label=f"{clipped} below the axis (min {y.min():.1e})")
        if skipped:
            ax_loss.plot([], [], " ", label=f"{skipped} non-finite left out")
        ax_loss.legend(**below)
    else:
        ax_loss.text(0.5, 0.5, "no loss recorded", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training loss")
    ax_loss.grid(True, which="both", alpha=0.3)

    if dice:
        for key in sorted(dice):
            xs, ys = dice[key]
            order = np.argsort(xs, kind="stable")
            ax_dice.plot(np.asarray(xs)[order], np.asarray(ys)[order], marker="o", markersize=3,
                         label=froc_names.get(key, key))
        ax_dice.legend(**below)
    else:
        ax_dice.text(0.5, 0.5, "no Dice recorded yet", ha="center", va="center", transform=ax_dice.transAxes)
    ax_dice.set_ylim(0.0, 1.02)  # room for the markers of a perfect score
    ax_dice.set_xlabel("step")
    ax_dice.set_ylabel(metric)
    ax_dice.set_title(f"validation {metric}")
    ax_dice.grid(True, alpha=0.3)
    return _save_png(fig, path)


def robust_log_limits(values: np.ndarray, low_quantile: float = 0.02) -> tuple[float, float]:
    """Limits of a log axis for positive ``values``: from their ``low_quantile`` quantile to their
    maximum, widened by a tenth of the span (at least a tenth of a decade) on each side."""
    logs = np.log10(np.asarray(values, dtype=np.float64))
    lo, hi = float(np.quantile(logs, low_quantile)), float(logs.max())
    pad = max(0.1 * (hi - lo), 0.1)
    return 10.0 ** (lo - pad), 10.0 ** (hi + pad)


def _as_volume(x, what: str, *, labels: bool) -> np.ndarray | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).numpy()
    arr = np.asarray(x)
    if arr.ndim != 3:
        raise ValueError(f"{what} must be an (X, Y, Z) volume, got shape {arr.shape}")
    if labels:
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
            raise ValueError(f"{what} must hold integer class labels, got dtype {arr.dtype}")
        if arr.size and arr.min() < 0:
            raise ValueError(f"{what} has negative labels: {sorted(set(np.unique(arr[arr < 0]).tolist()))[:10]}")
    return arr


def _pick_slices(masks: list[np.ndarray], n: int, nz: int) -> list[int]:
    """Up to ``n`` slice indices, in order.

    Slices with foreground in the first non-empty mask (the ground truth, else the prediction)
    are the candidates, spread evenly over their range; then every class present in that mask but
    missing from the picks (a small lesion between the picks) gets its largest slice swapped in
    for the nearest pick not needed by another class. Without any foreground: evenly over Z.
    """
    for labels in masks:
        fg_area = (labels > 0).sum(axis=(0, 1))
        candidates = np.flatnonzero(fg_area)
        if candidates.size:
            break
    else:
        if nz <= n:
            return list(range(nz))
        return sorted({int(round(v)) for v in np.linspace(0, nz - 1, n + 2)[1:-1]})
    if candidates.size <= n:
        return candidates.tolist()
    picks = [int(candidates[int(round(i))]) for i in np.linspace(0, candidates.size - 1, n)]
    pinned: set[int] = set()
    for c in [int(c) for c in np.unique(labels) if c > 0]:
        area = (labels == c).sum(axis=(0, 1))
        shown = [p for p in picks if area[p] > 0]
        if shown:
            pinned.add(shown[0])
            continue
        best = int(np.argmax(area))
        free = [i for i, p in enumerate(picks) if p not in pinned]
        if not free:
            break
        j = min(free, key=lambda i: abs(picks[i] - best))
        picks[j] = best
        pinned.add(best)
    return sorted(set(picks))


def plot_montage(
    image,
    label,
    pred,
    path,
    *,
    n_slices: int = 6,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
    display_range: tuple[float, float] | None = None,
    affine=None,
) -> Path:
    """Axial slices of a volume with the ground truth and the prediction outlined, as a PNG.

    Args:
        image: ``(X, Y, Z)`` intensities: raw CT in HU (shown in the abdominal soft-tissue window,
            -160..240 HU) or preprocessed (shown over the 0.5-99.5th percentile of the shown
            slices); ``display_range`` overrides both.
        label: ``(X, Y, Z)`` integer ground truth, or None (an unlabelled case).
        pred: ``(X, Y, Z)`` integer prediction, or None (e.g. to inspect the ground truth).
        path: where the PNG goes (returned); parent folders are created.
        n_slices: how many Z slices to show. They are taken where the ground truth has foreground
            (else the prediction, else anywhere), spread over it, and every foreground class of
            that volume appears in at least one slice when ``n_slices`` allows.
        class_names: names for the legend, index = class (default: LiTS names for 3 classes).
        title: figure title.
        display_range: ``(low, high)`` intensities mapped to black and white.
        affine: the 4x4 voxel-to-world (RAS+) matrix of the volume (a NIfTI's); the volume is first
            turned to the closest RAS voxel order. None: the voxel axes are taken as RAS already (as
            for the synthetic cases and volumes loaded as closest-canonical).

    Slices are axial and shown in the radiological convention: as seen from the feet, the patient's
    right on the viewer's left (R and L are marked), anterior up. Per class the ground truth is a
    solid outline and the prediction a dashed one in a different colour.
    """
    img = _as_volume(image, "image", labels=False)
    to_ras = _ras_reorientation(affine)
    if not np.issubdtype(img.dtype, np.number) or np.issubdtype(img.dtype, np.complexfloating):
        raise ValueError(f"image must be real-valued, got dtype {img.dtype}")
    lab = _as_volume(label, "label", labels=True)
    prd = _as_volume(pred, "pred", labels=True)
    for arr, what in ((lab, "label"), (prd, "pred")):
        if arr is not None and arr.shape != img.shape:
            raise ValueError(f"{what} shape {arr.shape} differs from image shape {img.shape}")
    img, lab, prd = (None if a is None else to_ras(a) for a in (img, lab, prd))
    if isinstance(n_slices, bool) or not isinstance(n_slices, int) or n_slices < 1:
        raise ValueError(f"n_slices must be a positive integer, got {n_slices!r}")
    if 0 in img.shape:
        raise ValueError(f"image is empty: shape {img.shape}")
    present = [a for a in (lab, prd) if a is not None]
    max_label = max([int(a.max()) for a in present] + [1])
    if class_names is None:
        names = default_class_names(max_label + 1)
    elif isinstance(class_names, str) or not all(isinstance(n, str) for n in class_names):
        raise ValueError(f"class_names must be a sequence of strings, got {class_names!r}")
    else:
        names = tuple(class_names)
    if len(names) <= max_label:
        raise ValueError(f"class_names {names!r} has no name for label {max_label}")

    slices = _pick_slices(present, n_slices, img.shape[2])
    lo, hi = _display_range(img[:, :, slices], display_range)

    cols = 2 if len(slices) == 4 else min(len(slices), 3)
    rows = math.ceil(len(slices) / cols)
    aspect = img.shape[1] / img.shape[0]  # rows of the drawn slice (Y) per column (X)
    panel = 3.6
    height = rows * (panel * aspect + 0.35) + (0.5 if present else 0.1) + (0.4 if title else 0.0)
    fig = _new_figure((cols * panel, height), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(slices) :]:
        ax.axis("off")
    from matplotlib.lines import Line2D

    legend: dict[tuple[int, int], Line2D] = {}  # (class, 0 truth / 1 prediction) -> handle
    for ax, z in zip(axes, slices):
        ax.imshow(img[:, :, z].T, cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
        for arr, style, which in ((lab, "solid", 0), (prd, "dashed", 1)):
            if arr is None:
                continue
            sl = arr[:, :, z]
            for c in (int(c) for c in np.unique(sl) if c > 0):
                mask = (sl == c).T.astype(np.float32)
                colour = _class_colour(c, which)
                # pad by one so outlines at the slice border close instead of running off it
                ax.contour(
                    np.pad(mask, 1), levels=[0.5], colors=[colour], linewidths=1.4, linestyles=style,
                    extent=(-1.5, mask.shape[1] + 0.5, -1.5, mask.shape[0] + 0.5), origin="lower",
                )
                kind = ("truth", "prediction")[which]
                handle = Line2D([], [], color=colour, linestyle=style, linewidth=2, label=f"{names[c]} ({kind})")
                legend.setdefault((c, which), handle)
        # contours must not widen the view beyond the image; +X (the patient's right) to the left
        ax.set_xlim(img.shape[0] - 0.5, -0.5)
        ax.set_ylim(-0.5, img.shape[1] - 0.5)
        for x_frac, letter in ((0.03, "R"), (0.97, "L")):
            ax.text(x_frac, 0.5, letter, transform=ax.transAxes, ha="center", va="center", color="yellow",
                    fontsize=9, fontweight="bold")
        ax.set_title(f"z = {z} / {img.shape[2] - 1}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [legend[k] for k in sorted(legend)]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=9, frameon=False)
    elif present:
        fig.supxlabel("no foreground in the shown slices", fontsize=9)
    if title:
        fig.suptitle(title)
    return _save_png(fig, path)


def _ras_reorientation(affine):
    """A function turning an (X, Y, Z) array into the closest RAS voxel order of ``affine`` (the
    identity for None)."""
    if affine is None:
        return lambda a: a
    import nibabel as nib

    from ahnet_fast.data.case import is_valid_affine

    affine = np.asarray(affine, dtype=np.float64)
    if not is_valid_affine(affine):
        raise ValueError(f"affine must be a finite, invertible 4x4 matrix, got {affine.tolist()}")
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                                nib.orientations.axcodes2ornt("RAS"))
    return lambda a: np.ascontiguousarray(nib.orientations.apply_orientation(a, transform))


# Raw CT in Hounsfield units is shown in the standard abdominal soft-tissue window (level 40,
# width 400): a percentile range would be dominated by air (-1000) and bone and leave the liver,
# lesions and their ~30 HU contrast in one flat grey.
_SOFT_TISSUE_WINDOW = (-160.0, 240.0)


def _display_range(shown: np.ndarray, display_range) -> tuple[float, float]:
    if display_range is not None:
        lo, hi = (float(v) for v in display_range)
        if not hi > lo:
            raise ValueError(f"display_range must be (low, high) with low < high, got {display_range!r}")
        return lo, hi
    values = shown[np.isfinite(shown)].astype(np.float64)
    if not values.size:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [0.5, 99.5])
    if lo <= -500 and hi >= 0:  # air below -500 and tissue above: Hounsfield units
        return _SOFT_TISSUE_WINDOW
    return (float(lo), float(hi)) if hi > lo else (float(lo), float(lo) + 1.0)


def plot_froc(results: dict, path, *, title: str = "FROC") -> Path:
    """FROC curves as a PNG at ``path`` (returned): sensitivity against false positives per volume on
    a log2 axis (the listed rates, 1/8 to 4, are evenly spaced there), each curve marked at the rates
    with its sensitivity there and labelled with its CPM-style mean. ``results`` maps a label to a
    :class:`ahnet_fast.detection.FrocResult` (or its ``as_dict()``)."""
    if not results:
        raise ValueError("plot_froc: no FROC results to draw")
    fig = _new_figure((6.4, 4.8), layout="constrained")
    ax = fig.add_subplot()
    rates_all = set()
    for i, (label, res) in enumerate(results.items()):
        d = res.as_dict() if hasattr(res, "as_dict") else res
        fp = np.asarray(d["curve"]["fp_per_volume"], dtype=float)
        sens = np.asarray(d["curve"]["sensitivity"], dtype=float)
        rates = np.asarray(d["rates"], dtype=float)
        rates_all.update(rates.tolist())
        lo = min(rates.min() / 2, fp[fp > 0].min() if (fp > 0).any() else rates.min() / 2)
        hi = max(rates.max() * 1.5, fp.max())
        # the curve is a staircase: sensitivity holds until a lower threshold adds a lesion
        x = np.r_[lo, np.maximum(fp[1:], lo), hi]
        y = np.r_[sens[0], np.maximum.accumulate(sens[1:]), sens.max()]
        colour = f"C{i}"
        ax.step(x, y, where="post", color=colour, label=f"{label}: mean sensitivity {d['cpm']:.3f} "
                                                        f"({d['n_lesions']} lesions, {d['n_volumes']} volumes)")
        ax.plot(rates, d["sensitivity"], "o", color=colour)
        ax.set_xlim(lo, hi)
    ax.set_xscale("log", base=2)
    ticks = sorted(rates_all)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per volume")
    ax.set_ylabel("sensitivity (lesions found)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize="small", frameon=False)
    return _save_png(fig, path)


def plot_detections(image, affine, lesions, candidates, path, *, title: str = "", max_panels: int = 4,
                    slab_mm: float = 2.0) -> Path:
    """Detected against true lesions as a PNG at ``path`` (returned): one panel per true lesion (up to
    ``max_panels``, then the highest-scoring false positives), each the slice through its centre, the
    true lesions there drawn as green circles of their radius, the candidates within ``slab_mm`` of that
    slice as red crosses labelled with their score. Positions are world millimetres (``affine``)."""
    from matplotlib.patches import Circle

    vol = np.asarray(image, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"plot_detections: expected an (X, Y, Z) image, got shape {vol.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    to_voxel = np.linalg.inv(affine)

    def voxel(p):
        return (to_voxel @ np.r_[p, 1.0])[:3]

    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    centres = [int(round(voxel(les.position_mm)[2])) for les in lesions][:max_panels]
    if len(centres) < max_panels:
        centres += [int(round(voxel(c.position_mm)[2])) for c in sorted(candidates, key=lambda c: -c.score)
                    ][:max_panels - len(centres)]
    centres = [min(max(z, 0), vol.shape[2] - 1) for z in centres] or [vol.shape[2] // 2]
    fig = _new_figure((3.2 * len(centres), 3.9), layout="constrained")
    lo, hi = np.percentile(vol[vol > 0.05], (1, 99.5)) if (vol > 0.05).any() else (0.0, 1.0)
    for i, z in enumerate(centres):
        ax = fig.add_subplot(1, len(centres), i + 1)
        ax.imshow(vol[:, :, z].T, cmap="gray", origin="lower", vmin=lo, vmax=hi, interpolation="nearest")
        for les in lesions:
            v = voxel(les.position_mm)
            if abs(v[2] - z) * spacing[2] <= (les.radius_mm or 0):
                ax.add_patch(Circle((v[0], v[1]), (les.radius_mm or 2.0) / spacing[0], fill=False, color="lime", lw=1.2))
        for c in candidates:
            v = voxel(c.position_mm)
            if abs(v[2] - z) * spacing[2] <= slab_mm:
                ax.plot(v[0], v[1], "x", color="red", ms=7, mew=1.5)
                ax.annotate(f"{c.score:.2f}", (v[0], v[1]), xytext=(4, 4), textcoords="offset points", color="red",
                            fontsize=7)
        ax.set_title(f"slice {z}", fontsize=9)
        ax.set_axis_off()
    fig.suptitle((title + "\n" if title else "") + "true lesions: green circles; candidates: red crosses (score)",
                 fontsize=9)
    return _save_png(fig, path)
