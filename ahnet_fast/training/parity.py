"""``ahnet-fast parity``: proof that the fast path trains like MONAI, by two criteria that an exact
implementation passes and a wrong one fails.

**float64, SGD.** ahnet_fast's AHNet + FocalLoss (fused kernels) and MONAI's, both in float64, from
the same weights on the same batches, SGD with momentum 0.9. In float64 a different summation order
changes a result by ~1e-16, and SGD moves each weight in proportion to its gradient, so after
``steps_fp64`` steps every step's loss and every final weight and running statistic must agree to
1e-9 relative (normwise per tensor). A wrong formula (a dropped bias, another epsilon, one kernel
reading its input in float32) is off by far more. Not Adam: Adam's first steps move every weight by
about lr whatever its gradient's size, so a gradient whose sign rounding decides (a bias in front of
a training-mode BatchNorm has gradient 0 in exact arithmetic) becomes a full step either way.

The learning rate (default 1e-6) keeps the 20 steps in the regime where two float64 trajectories
that start 1e-16 apart stay close. AH-Net at batch 1 is extremely sensitive in its weights
(training-mode BatchNorm over a few values per channel in the deep layers): measured here with MONAI
against ahnet_fast at 96x96x32, the largest per-tensor gradient difference grows from 1e-10 to 7e-4
within 5 steps at lr 1e-5 and to 1e-3 within 3 steps at lr 1e-3, while at lr 1e-6 it stays below
3e-10 over 20 steps. Past that regime no two implementations, MONAI against itself on another
thread count included, can agree to 1e-9, and the float32 criterion below is the one that applies.

**float32, Adam, against MONAI's own rounding noise.** Training AH-Net in float32 at batch 1 is
chaotic at the level of rounding: no per-step tolerance can be met by any implementation that sums
in another order. So MONAI is run again under rounding-level perturbations (the controls: its first
input scaled by 1 + 1e-7 and by 1 - 1e-7, its initial weights moved one ulp up and one ulp down,
another thread count), and each control's distance from MONAI is measured the way ahnet_fast's is:
the largest per-step relative loss difference and the largest held-out Dice difference (per case,
per class) after training. ahnet_fast passes when each of its two distances is at most twice the
largest control's. The pure-PyTorch reference path is trained and reported alongside (it computes
MONAI's arithmetic).

The report (``parity.json``, ``parity.md``, ``parity.png``) says pass or fail per criterion, and
``ahnet-fast parity`` exits non-zero on a fail.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import platform
import sys
from pathlib import Path

import numpy as np
import torch

import ahnet_fast
from ahnet_fast import _json
from ahnet_fast._atomic import atomic_path
from ahnet_fast.backends import backend as use_backend
from ahnet_fast.data import PatchSampler
from ahnet_fast.nn import AHNet, FocalLoss
from ahnet_fast.training.config import TrainConfig
from ahnet_fast.training.evaluate import evaluate_cases
from ahnet_fast.training.loop import load_datasets

FLOAT64_RTOL = 1e-9
CONTROL_FACTOR = 2.0
PERTURBATION = 1e-7
SGD_MOMENTUM = 0.9
PARTS = ("float64", "float32")


def _loss_fn(reference_backend: bool = False):
    return FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0, backend="reference" if reference_backend else None)


def _monai_loss_fn():
    from monai.losses import FocalLoss as MonaiFocalLoss

    return MonaiFocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0)


def _monai_loss_fn_float64():
    """MONAI's FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2) in float64: the module casts its
    input to float32 (``input.float()``), so its own functions are composed here the way its forward
    composes them (equal to the module in float32)."""
    from monai.losses.focal_loss import softmax_focal_loss
    from monai.networks import one_hot

    def loss(logits, target):
        return softmax_focal_loss(logits, one_hot(target, logits.shape[1], dtype=logits.dtype), 2.0, None).mean()

    return loss


def _model_kwargs(cfg: TrainConfig, layers=(3, 4, 6, 3)) -> dict:
    return dict(layers=tuple(layers), in_channels=1, out_channels=cfg.num_classes, psp_block_num=cfg.psp_block_num,
                upsample_mode="transpose")


def _monai_model(kwargs: dict, state: dict):
    from monai.networks.nets import AHNet as MonaiAHNet

    model = MonaiAHNet(**kwargs)
    model.load_state_dict(state)
    return model


def _fast_model(kwargs: dict, state: dict, backend: str | None = None) -> AHNet:
    model = AHNet(**kwargs, backend=backend)
    model.load_state_dict(state)
    return model


@contextlib.contextmanager
def _threads(n: int | None):
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _nudge_weights(model: torch.nn.Module, direction: float) -> None:
    """Every floating parameter moved by one ulp towards +inf (direction > 0) or -inf."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.copy_(torch.nextafter(p, torch.full_like(p, direction * float("inf"))))


def _train(model, loss_fn, sampler, steps: int, optimizer, *, dtype=torch.float32, input_scale: float = 1.0,
           desc: str = "", progress: bool = True) -> list[float]:
    from tqdm.auto import tqdm

    losses = []
    model.train()
    for step in tqdm(range(steps), desc=desc, unit="step", disable=not progress, file=sys.stderr):
        x, y = sampler.batch(step, 1)
        x = x.to(dtype)
        if step == 0 and input_scale != 1.0:
            x = x * input_scale
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y.unsqueeze(1))
        if not torch.isfinite(loss):
            raise RuntimeError(f"parity: {desc} diverged at step {step + 1} (loss {loss.item()})")
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _relative_weight_differences(model, reference) -> dict[str, float]:
    """||a - b|| / ||b|| per floating tensor of the state dict (parameters and running statistics)."""
    ref_state = reference.state_dict()
    out = {}
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            b = ref_state[name].to(torch.float64)
            out[name] = float((value.to(torch.float64) - b).norm() / b.norm().clamp_min(1e-300))
    return out


def _relative_loss_differences(losses, reference) -> list[float]:
    a, b = np.asarray(losses, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return (np.abs(a - b) / np.maximum(np.abs(b), 1e-300)).tolist()


def _float64_part(kwargs, state0, sampler, steps, lr, use_monai, progress) -> dict:
    """The fast path against MONAI (the reference path where MONAI is missing), both in float64, SGD."""
    fast = _fast_model(kwargs, state0).double()
    if use_monai:
        base_name, base, base_loss = "MONAI", _monai_model(kwargs, state0).double(), _monai_loss_fn_float64()
    else:
        base_name, base, base_loss = "reference", _fast_model(kwargs, state0, "reference").double(), \
            _loss_fn(reference_backend=True)
    runs = {}
    for name, model, loss_fn, ctx in (("ahnet_fast", fast, _loss_fn(), contextlib.nullcontext),
                                      (base_name, base, base_loss,
                                       (lambda: use_backend("reference")) if base_name == "reference"
                                       else contextlib.nullcontext)):
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=SGD_MOMENTUM)
        with ctx():
            runs[name] = _train(model, loss_fn, sampler, steps, optimizer, dtype=torch.float64,
                                desc=f"parity float64 {name}", progress=progress)
    loss_diff = _relative_loss_differences(runs["ahnet_fast"], runs[base_name])
    weight_diff = _relative_weight_differences(fast, base)
    worst = max(weight_diff, key=weight_diff.get)
    result = {
        "against": base_name, "steps": steps, "lr": lr, "momentum": SGD_MOMENTUM, "losses": runs,
        "rel_loss_diff": loss_diff, "max_rel_loss_diff": max(loss_diff),
        "max_rel_weight_diff": weight_diff[worst], "worst_tensor": worst, "tolerance": FLOAT64_RTOL,
    }
    result["loss_ok"] = result["max_rel_loss_diff"] <= FLOAT64_RTOL
    result["weights_ok"] = result["max_rel_weight_diff"] <= FLOAT64_RTOL
    result["passed"] = result["loss_ok"] and result["weights_ok"]
    return result


def _controls(threads_now: int) -> list[tuple[str, dict]]:
    other = 1 if threads_now > 1 else 2
    return [(f"input x (1+{PERTURBATION:g})", {"input_scale": 1 + PERTURBATION}),
            (f"input x (1-{PERTURBATION:g})", {"input_scale": 1 - PERTURBATION}),
            ("weights +1 ulp", {"nudge": 1.0}),
            ("weights -1 ulp", {"nudge": -1.0}),
            (f"{other} thread{'s' if other > 1 else ''}", {"threads": other})]


def _float32_part(cfg, kwargs, state0, sampler, val_set, steps, lr, use_monai, progress) -> dict:
    base_name = "MONAI" if use_monai else "reference"

    def make_base():
        if use_monai:
            return _monai_model(kwargs, state0), _monai_loss_fn(), contextlib.nullcontext
        return _fast_model(kwargs, state0, "reference"), _loss_fn(reference_backend=True), \
            (lambda: use_backend("reference"))

    contenders = [("ahnet_fast", lambda: (_fast_model(kwargs, state0), _loss_fn(), contextlib.nullcontext), {})]
    if use_monai:  # the reference path besides MONAI, reported
        contenders.append(("reference", lambda: (_fast_model(kwargs, state0, "reference"), _loss_fn(True),
                                                 lambda: use_backend("reference")), {}))
    contenders.append((base_name, make_base, {}))
    controls = _controls(torch.get_num_threads())
    contenders += [(f"{base_name}, {label}", make_base, change) for label, change in controls]

    runs = {}
    for name, make, change in contenders:
        model, loss_fn, ctx = make()
        if "nudge" in change:
            _nudge_weights(model, change["nudge"])
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        with ctx(), _threads(change.get("threads")):
            losses = _train(model, loss_fn, sampler, steps, optimizer, input_scale=change.get("input_scale", 1.0),
                            desc=f"parity float32 {name}", progress=progress)
            tracker, _ = evaluate_cases(model, val_set, cfg.patch, num_classes=cfg.num_classes,
                                        class_names=cfg.class_names, overlap=cfg.overlap)
        runs[name] = {"losses": losses, "dice": tracker.summary()}
        del optimizer, model

    def distance(run):
        rel = _relative_loss_differences(run["losses"], runs[base_name]["losses"])
        keys = [k for k in runs[base_name]["dice"] if k.startswith("dice_case/")]
        return {"max_rel_loss_diff": max(rel), "step_of_max": int(np.argmax(rel)) + 1, "rel_loss_diff": rel,
                "max_dice_diff": max(abs(run["dice"][k] - runs[base_name]["dice"][k]) for k in keys)}

    distances = {name: distance(run) for name, run in runs.items() if name != base_name}
    control_names = [f"{base_name}, {label}" for label, _ in controls]
    loss_bound = CONTROL_FACTOR * max(distances[c]["max_rel_loss_diff"] for c in control_names)
    dice_bound = CONTROL_FACTOR * max(distances[c]["max_dice_diff"] for c in control_names)
    for name, d in distances.items():
        d["loss_ok"] = d["max_rel_loss_diff"] <= loss_bound
        d["dice_ok"] = d["max_dice_diff"] <= dice_bound
    fast = distances["ahnet_fast"]
    return {"against": base_name, "steps": steps, "lr": lr, "runs": runs, "controls": control_names,
            "distances": distances, "loss_bound": loss_bound, "dice_bound": dice_bound,
            "passed": fast["loss_ok"] and fast["dice_ok"]}


def _monai_available() -> bool:
    try:
        import monai.networks.nets  # noqa: F401
    except ImportError:
        return False
    return True


def run_parity(*, steps: int = 100, steps_fp64: int = 20, patch=(96, 96, 32), psp_block_num: int = 2,
               lr: float = 1e-3, lr_fp64: float = 1e-6, seed: int = 0, out="benchmarks/results/parity",
               monai: bool = True, train_cases: int = 6, val_cases: int = 2, synthetic_size_xy: int = 256,
               spacing_xy: float | None = 1.6, parts=PARTS, layers=(3, 4, 6, 3), progress: bool = True) -> dict:
    """Runs the criteria in ``parts`` ("float64", "float32"), writes the report to ``out`` (None: not
    written) and returns it; ``report["passed"]`` is the verdict. ``layers``: AHNet's residual blocks
    per encoder layer (the full network by default; the tests use fewer)."""
    parts = tuple(parts)
    if not parts or set(parts) - set(PARTS):
        raise ValueError(f"parity: parts must be a non-empty selection of {PARTS}, got {parts!r}")
    for name, value in (("steps", steps), ("steps_fp64", steps_fp64)):
        if value < 1:
            raise ValueError(f"parity: {name} must be at least 1, got {value}")
    cfg = TrainConfig(stage="finetune", steps=steps, patch=tuple(patch), psp_block_num=psp_block_num, lr=lr,
                      seed=seed, train_cases=train_cases, val_cases=val_cases, synthetic_size_xy=synthetic_size_xy,
                      spacing_xy=spacing_xy, progress=progress).validate()
    use_monai = monai and _monai_available()
    train_set, val_set = load_datasets(cfg, progress=False)
    sampler = PatchSampler(train_set, cfg.patch, foreground_ratio=cfg.foreground_ratio, seed=seed)
    kwargs = _model_kwargs(cfg, layers)
    torch.manual_seed(seed)
    state0 = copy.deepcopy(AHNet(**kwargs).state_dict())

    report = {
        "date": datetime.date.today().isoformat(), "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": str(torch.__version__), "ahnet_fast": ahnet_fast.__version__,
        "monai": _monai_version() if use_monai else None,
        "config": {"steps": steps, "steps_fp64": steps_fp64, "patch": list(cfg.patch), "psp_block_num": psp_block_num,
                   "lr": lr, "lr_fp64": lr_fp64, "seed": seed, "loss": "FocalLoss(softmax, gamma=2, one-hot y)",
                   "train_cases": train_cases, "val_cases": val_cases, "synthetic_size_xy": synthetic_size_xy,
                   "batch": 1, "parts": list(parts), "layers": list(layers)},
    }
    if "float64" in parts:
        report["float64"] = _float64_part(kwargs, state0, sampler, steps_fp64, lr_fp64, use_monai, progress)
    if "float32" in parts:
        report["float32"] = _float32_part(cfg, kwargs, state0, sampler, val_set, steps, lr, use_monai, progress)
    report["passed"] = all(report[p]["passed"] for p in parts)
    report["summary"] = _summary(report)
    if out:
        out = Path(out)
        with atomic_path(out / "parity.json") as tmp:
            tmp.write_text(_json.dumps(report, indent=1))
        with atomic_path(out / "parity.md") as tmp:
            tmp.write_text(_markdown(report))
        with atomic_path(out / "parity.png", suffix=".png") as tmp:
            _plot(report, tmp)
        report["files"] = [str(out / n) for n in ("parity.json", "parity.md", "parity.png")]
    return report


def _monai_version():
    import monai

    return monai.__version__


def _verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def _summary(report: dict) -> str:
    lines = []
    if "float64" in report:
        r = report["float64"]
        lines.append(f"float64, {r['steps']} SGD steps, ahnet_fast vs {r['against']}: largest per-step relative loss "
                     f"difference {r['max_rel_loss_diff']:.1e} ({_verdict(r['loss_ok'])}), largest final weight "
                     f"difference {r['max_rel_weight_diff']:.1e} in {r['worst_tensor']} ({_verdict(r['weights_ok'])}); "
                     f"tolerance {FLOAT64_RTOL:g}")
    if "float32" in report:
        r = report["float32"]
        fast = r["distances"]["ahnet_fast"]
        lines.append(f"float32, {r['steps']} Adam steps, distances from {r['against']}: ahnet_fast loss "
                     f"{fast['max_rel_loss_diff']:.2e} (bound {r['loss_bound']:.2e}: {_verdict(fast['loss_ok'])}), "
                     f"Dice {fast['max_dice_diff']:.4f} (bound {r['dice_bound']:.4f}: {_verdict(fast['dice_ok'])}); "
                     f"bounds = {CONTROL_FACTOR:g} x the largest of {len(r['controls'])} rounding-level controls")
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)


def _markdown(report: dict) -> str:
    c = report["config"]
    rows = ["# Training parity: ahnet_fast vs MONAI", "",
            f"{report['date']}, {report['device']} ({report['threads']} threads), torch {report['torch']}, MONAI "
            f"{report['monai']}; AHNet (psp_block_num {c['psp_block_num']}) + softmax focal loss on "
            f"{'x'.join(map(str, c['patch']))} patches of the synthetic CT volumes, batch 1, seed {c['seed']}; every "
            f"run from the same initial weights on the same batches. Regenerate: `ahnet-fast parity --steps "
            f"{c['steps']} --steps-fp64 {c['steps_fp64']} --patch {' '.join(map(str, c['patch']))} --psp-block-num "
            f"{c['psp_block_num']}`.", "",
            f"**Verdict: {'PASSED' if report['passed'] else 'FAILED'}.**", ""]
    if "float64" in report:
        r = report["float64"]
        rows += [f"## float64, SGD (lr {r['lr']}, momentum {r['momentum']}), {r['steps']} steps", "",
                 f"ahnet_fast's fast path against {r['against']}, both in float64. Rounding differs by ~1e-16 here "
                 "and SGD steps in proportion to the gradient, so an exact implementation stays within "
                 f"{FLOAT64_RTOL:g}; a wrong one does not.", "",
                 "| criterion | largest relative difference | tolerance | verdict |", "|---|---|---|---|",
                 f"| loss, every step | {r['max_rel_loss_diff']:.2e} | {FLOAT64_RTOL:g} | {_verdict(r['loss_ok'])} |",
                 f"| final weights and running statistics (normwise per tensor; worst: `{r['worst_tensor']}`) | "
                 f"{r['max_rel_weight_diff']:.2e} | {FLOAT64_RTOL:g} | {_verdict(r['weights_ok'])} |", ""]
    if "float32" in report:
        r = report["float32"]
        rows += [f"## float32, Adam (lr {r['lr']}), {r['steps']} steps, against {r['against']}'s own rounding noise", "",
                 f"{r['against']} run again under rounding-level changes (the controls) gives the distances that "
                 "rounding alone causes in this training; ahnet_fast's distances must each be at most "
                 f"{CONTROL_FACTOR:g}x the largest control's. Loss: the largest per-step relative difference from "
                 f"{r['against']}; Dice: the largest difference of the held-out per-case Dice (any class) after "
                 "training.", "",
                 "| run | loss distance | at step | Dice distance | final loss | "
                 + " | ".join(k.replace("dice_case/", "Dice ") for k in r["runs"][r["against"]]["dice"]
                              if k.startswith("dice_case/")) + " | verdict |",
                 "|---|---|---|---|---|" + "---|" * sum(1 for k in r["runs"][r["against"]]["dice"]
                                                       if k.startswith("dice_case/")) + "---|"]
        for name, run in r["runs"].items():
            d = r["distances"].get(name)
            dice = " | ".join(f"{v:.4f}" for k, v in run["dice"].items() if k.startswith("dice_case/"))
            if d is None:
                verdict, dist = "(the baseline)", "- | - | -"
            else:
                dist = f"{d['max_rel_loss_diff']:.2e} | {d['step_of_max']} | {d['max_dice_diff']:.4f}"
                verdict = "control" if name in r["controls"] else (
                    f"{_verdict(d['loss_ok'] and d['dice_ok'])}" if name == "ahnet_fast"
                    else f"reported ({'within' if d['loss_ok'] and d['dice_ok'] else 'outside'} the bounds)")
            rows.append(f"| {name} | {dist} | {run['losses'][-1]:.5f} | {dice} | {verdict} |")
        rows += ["", f"Bounds: loss {r['loss_bound']:.2e}, Dice {r['dice_bound']:.4f}.", ""]
    rows += ["![parity curves](parity.png)", ""]
    return "\n".join(rows)


def _plot(report: dict, path: Path) -> None:
    from ahnet_fast.plots import _new_figure

    n = 2 * ("float32" in report) + ("float64" in report)  # float32: curves and distances; float64: one
    fig = _new_figure((5.5 * n, 4.6), layout="constrained")
    axes = list(fig.subplots(1, n, squeeze=False).ravel())
    below = dict(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False, fontsize=8)
    if "float32" in report:
        r = report["float32"]
        ax_loss, ax_diff = axes[0], axes[1]
        axes = axes[2:]
        steps = np.arange(1, r["steps"] + 1)
        controls = np.array([r["runs"][c]["losses"] for c in r["controls"]])
        ax_loss.fill_between(steps, controls.min(0), controls.max(0), color="tab:gray", alpha=0.3,
                             label=f"{r['against']} controls (envelope)")
        ax_loss.plot(steps, r["runs"][r["against"]]["losses"], color="k", lw=1.0, label=r["against"])
        ax_loss.plot(steps, r["runs"]["ahnet_fast"]["losses"], color="tab:blue", lw=1.6, label="ahnet_fast")
        if "reference" in r["runs"] and r["against"] != "reference":
            ax_loss.plot(steps, r["runs"]["reference"]["losses"], color="tab:orange", lw=1.0, ls="--",
                         label="reference path")
        ax_loss.set_yscale("log")
        ax_loss.set(xlabel="step", ylabel="focal loss", title="float32 training loss (Adam)")
        ax_loss.legend(**below)
        diffs = np.maximum(np.array([r["distances"][c]["rel_loss_diff"] for c in r["controls"]]), 1e-12)
        ax_diff.fill_between(steps, diffs.min(0), diffs.max(0), color="tab:gray", alpha=0.3,
                             label="controls (envelope)")
        ax_diff.semilogy(steps, np.maximum(r["distances"]["ahnet_fast"]["rel_loss_diff"], 1e-12), color="tab:blue",
                         lw=1.4, label="ahnet_fast")
        ax_diff.axhline(r["loss_bound"], color="tab:red", lw=1, label=f"bound ({CONTROL_FACTOR:g}x largest control)")
        ax_diff.set(xlabel="step", ylabel=f"relative loss difference from {r['against']}",
                    title="float32: distance from the baseline")
        ax_diff.legend(**below)
    if "float64" in report:
        r = report["float64"]
        ax = axes[0]
        steps = np.arange(1, r["steps"] + 1)
        ax.semilogy(steps, np.maximum(r["rel_loss_diff"], 1e-18), color="tab:blue", marker="o", ms=3,
                    label=f"ahnet_fast vs {r['against']}")
        ax.axhline(FLOAT64_RTOL, color="tab:red", lw=1, label=f"tolerance {FLOAT64_RTOL:g}")
        ax.set(xlabel="step", ylabel="relative loss difference", title="float64 (SGD): loss difference")
        ax.legend(**below)
    fig.savefig(path, dpi=110, format="png")
