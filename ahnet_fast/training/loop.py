"""The reference training loop: one stage of the paper's schedule, or all three in turn.

Every batch is a pure function of (seed, step) (see :mod:`ahnet_fast.data.sampling`) and the model
has no other randomness, so ``resume`` continues exactly where a run stopped and torchrun's ranks
together compute the same step as one process (see :class:`TrainConfig`'s ``micro_batch``).
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch

import ahnet_fast
from ahnet_fast.data import (PatchSampler, Preprocessing, SliceSampler, discover_cases, load_case, preprocess,
                             synthetic_cases)
from ahnet_fast.nn import FocalLoss
from ahnet_fast.training import distributed
from ahnet_fast import _json
from ahnet_fast._atomic import atomic_path, remove_stale_temps
from ahnet_fast.training.checkpoint import FORMAT_VERSION, atomic_torch_save, load_checkpoint, nonfinite_tensors
from ahnet_fast.training.config import TrainConfig
from ahnet_fast.training.evaluate import AMP_DTYPES, HEATMAP_PRIOR_LOGIT, evaluate_cases, evaluate_detection
from ahnet_fast.training.signals import Interrupted, TrainingDiverged, deferred_signals
from ahnet_fast.training.models import (build_model, freeze_encoder, initialise_from, model_spec, set_train_mode,
                                        trainable_parameters)

# configuration fields that must not change when a run is resumed: they define the batches and model
RESUME_INVARIANTS = ("data", "stage", "patch", "batch", "micro_batch", "seed", "data_seed", "num_classes",
                     "psp_block_num", "train_cases", "val_cases", "max_cases", "synthetic_size_xy", "spacing_xy",
                     "window", "foreground_ratio", "lr", "optimizer", "momentum", "weight_decay", "amp", "init", "task",
                     "boxes", "file_paths")
# ... of which these matter only for the synthetic data, and this one only for real data
SYNTHETIC_ONLY = ("data_seed", "train_cases", "synthetic_size_xy")
REAL_ONLY = ("max_cases", "boxes", "file_paths")
FINGERPRINT_BYTES = 1 << 20


def make_adam(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Adam:
    """Adam; on CPU and CUDA its fused implementation (one kernel over all parameters instead of a
    loop of elementwise ops per parameter, which for AH-Net's 38 M parameters in 300-odd tensors
    is dominated by per-op overhead). The update is Adam's, up to float rounding."""
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **fused)


def make_optimizer(cfg: TrainConfig, params, device: torch.device) -> torch.optim.Optimizer:
    """The run's optimizer: Adam (default) or SGD with momentum. SGD's step is proportional to the
    gradient, so it is also what shows a wrongly scaled gradient (e.g. summed instead of averaged over
    processes), which Adam's normalised step would hide."""
    if cfg.optimizer == "sgd":
        fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fused)
    return make_adam(params, cfg.lr, cfg.weight_decay, device)


def _tqdm():
    from tqdm.auto import tqdm
    return tqdm


def _say(msg: str, main: bool = True) -> None:
    if main:
        _tqdm().write(msg, file=sys.stderr)


def load_datasets(cfg: TrainConfig, *, progress: bool = True):
    """(train cases, held-out cases), preprocessed (in-plane spacing, CT window to [0, 1])."""
    prep = Preprocessing(spacing_xy=cfg.spacing_xy, window=tuple(cfg.window))
    tqdm = _tqdm()
    if cfg.task == "detection":
        return _load_detection(cfg, progress)
    if cfg.data == "synthetic":
        raw = synthetic_cases(cfg.train_cases + cfg.val_cases, seed=cfg.data_seed, size_xy=cfg.synthetic_size_xy)
        cases = [preprocess(c, prep) for c in raw]
        return cases[:cfg.train_cases], cases[cfg.train_cases:]
    root = Path(cfg.data)
    if not root.exists():
        raise ValueError(f"--data {cfg.data!r}: no such folder (give 'synthetic', a Decathlon task folder with "
                         "dataset.json, or a folder of LiTS volume-N.nii / segmentation-N.nii pairs)")
    paths = discover_cases(root)
    if cfg.max_cases:
        paths = paths[:cfg.max_cases]
    if any(p.label is None for p in paths):
        missing = [p.name for p in paths if p.label is None]
        raise ValueError(f"--data {cfg.data!r}: cases without a label cannot be used for training: {missing[:5]}")
    if len(paths) <= cfg.val_cases:
        _split(paths, cfg.val_cases, cfg.data)  # the same error, before any volume is read
    cases = [preprocess(load_case(p, cfg.num_classes), prep)
             for p in tqdm(paths, desc="reading cases", unit="case", disable=not progress, file=sys.stderr)]
    return _split(cases, cfg.val_cases, cfg.data)


def _split(cases, val_cases: int, data: str):
    if len(cases) <= val_cases:
        raise ValueError(f"--data {data!r}: {len(cases)} case(s) found, but {val_cases} are held out for "
                         "validation (--val-cases): at least one must remain for training")
    return cases[:-val_cases], cases[-val_cases:]


def _load_detection(cfg: TrainConfig, progress: bool):
    """Detection cases with their heat-map targets: the synthetic DBT set (made at its working spacing,
    already normalised), or a real DBT folder (:mod:`ahnet_fast.data.dbt_files`) resampled in-plane to
    ``spacing_xy`` and scaled by each volume's percentiles."""
    from ahnet_fast.data.dbt import synthetic_dbt_cases, with_target

    if cfg.data == "synthetic":
        raw = synthetic_dbt_cases(cfg.train_cases + cfg.val_cases, seed=cfg.data_seed, size_xy=cfg.synthetic_size_xy)
        cases = [with_target(c) for c in raw]
        return cases[:cfg.train_cases], cases[cfg.train_cases:]
    from ahnet_fast.data.dbt_files import discover_dbt, load_dbt_case

    volumes = discover_dbt(cfg.data, cfg.boxes, cfg.file_paths)
    if cfg.max_cases:
        volumes = volumes[:cfg.max_cases]
    cases = [with_target(load_dbt_case(v, cfg.spacing_xy))
             for v in _tqdm()(volumes, desc="reading volumes", unit="volume", disable=not progress, file=sys.stderr)]
    return _split(cases, cfg.val_cases, cfg.data)


def _normalised_path(value):
    """A path setting as one spelling (runs/x, ./runs//x/ and /abs/runs/x are one folder)."""
    if value is None or value == "synthetic":
        return value
    return str(Path(value).expanduser().resolve())


def data_fingerprint(cfg: TrainConfig) -> dict | None:
    """What identifies real training data: every case file's name, size and a SHA-256 of its first and
    last MiB (cheap on a 50 GB dataset, and unchanged by a copy to another disk, unlike modification
    times). None for the synthetic data, which the settings alone define."""
    import hashlib

    if cfg.data == "synthetic":
        return None
    root = Path(cfg.data)
    if cfg.task == "detection":
        from ahnet_fast.data.dbt_files import discover_dbt

        volumes = discover_dbt(root, cfg.boxes, cfg.file_paths)[:cfg.max_cases or None]
        files = [v.path for v in volumes] + [Path(p) for p in (cfg.boxes, cfg.file_paths) if p]
    else:
        paths = discover_cases(root)[:cfg.max_cases or None]
        files = [f for p in paths for f in (p.image, p.label) if f is not None]
    prints = {}
    for f in files:
        size = f.stat().st_size
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            h.update(fh.read(FINGERPRINT_BYTES))
            if size > FINGERPRINT_BYTES:
                fh.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
                h.update(fh.read())
        key = str(f.relative_to(root)) if root in f.parents else str(f)  # images and labels share names
        prints[key] = f"{size}:{h.hexdigest()[:16]}"
    return prints


def _check_resume(saved_ckpt: dict, cfg: TrainConfig, path: Path, fingerprint: dict | None) -> None:
    saved = saved_ckpt["config"]
    diffs = []
    now = cfg.to_dict()
    defaults = TrainConfig().to_dict()  # a key that an older checkpoint lacks had its default then
    real = cfg.data != "synthetic"
    for key in RESUME_INVARIANTS:
        if key in (SYNTHETIC_ONLY if real else REAL_ONLY):
            continue
        a, b = saved.get(key, defaults[key]), now.get(key)
        if key in ("data", "init", "boxes", "file_paths"):
            a, b = _normalised_path(a), _normalised_path(b)
        if a != b:
            diffs.append(f"{key}: checkpoint {a!r}, now {b!r}")
    if diffs:
        raise ValueError(f"--resume: {path} was written by a run with other settings, so it cannot continue exactly: "
                         + "; ".join(diffs))
    before = saved_ckpt.get("data_fingerprint")
    if real and before is not None:
        after = fingerprint
        changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
        gone, new = sorted(before.keys() - after.keys()), sorted(after.keys() - before.keys())
        if changed or gone or new:
            parts = [f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                     for label, names in (("changed", changed), ("missing", gone), ("new", new)) if names]
            raise ValueError(f"--resume: the data in {cfg.data} is not what {path} was trained on ("
                             + "; ".join(parts) + "); start a new run (another --out) for the new data")


def _rewrite_metrics(path: Path, keep_until: int) -> list[dict]:
    """Records of a resumed run up to its checkpoint's step (a killed run may have logged later steps)."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if rec.get("step", 0) <= keep_until:
                records.append(rec)
    with atomic_path(path) as tmp:  # a kill now must not lose the kept lines
        tmp.write_text("".join(_json.dumps(r) + "\n" for r in records))
    return records


def _plots(out: Path, records: list[dict], montage=None, main=True) -> list[Path]:
    if not main:
        return []
    from ahnet_fast import plots

    written = []
    plots.plot_curves(records, out / "curves.png")
    written.append(out / "curves.png")
    if montage is not None:
        image, label, pred, names, title, affine = montage
        plots.plot_montage(image, label, pred, out / "montage.png", class_names=names, title=title, affine=affine)
        written.append(out / "montage.png")
    return written


def train(cfg: TrainConfig) -> dict:
    """Runs one stage; returns {"step", "loss", "dice", "out", "checkpoint"}. Writes DIR/last.pt,
    DIR/metrics.jsonl, DIR/curves.png and DIR/montage.png (rank 0)."""
    cfg.validate()
    device_type = "cuda" if cfg.device.startswith("cuda") else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to this torch")
    info, dist_device = distributed.setup(device_type)
    try:
        return _train(cfg, info, dist_device or torch.device(cfg.device))
    finally:
        distributed.teardown()


def _train(cfg: TrainConfig, info: distributed.DistInfo, device: torch.device) -> dict:
    main = info.is_main
    out = Path(cfg.out)
    if cfg.batch % info.world_size:
        raise ValueError(f"--batch {cfg.batch} must be divisible by the number of processes ({info.world_size})")
    local_batch = cfg.batch // info.world_size
    micro = cfg.micro_batch or local_batch
    if local_batch % micro:
        raise ValueError(f"--micro-batch {micro} must divide the per-process batch {local_batch}")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        stale = remove_stale_temps(out)
        if stale:
            _say(f"[{cfg.stage}] removed {len(stale)} temporary file(s) ({sum(n for _, n in stale) / 2**20:.0f} MiB) "
                 f"that a killed run left in {out}: " + ", ".join(p.name for p, _ in stale), main)
    show = cfg.progress and main
    ckpt_path = out / "last.pt"
    resume = None
    fingerprint = data_fingerprint(cfg) if main or cfg.resume else None
    if cfg.resume and ckpt_path.exists():  # checked before the (slow) data loading
        resume = load_checkpoint(ckpt_path)
        _check_resume(resume, cfg, ckpt_path, fingerprint)

    train_cases, val_cases = load_datasets(cfg, progress=show)
    if cfg.stage == "2d":
        sampler = SliceSampler(train_cases, cfg.patch[:2], foreground_ratio=cfg.foreground_ratio, seed=cfg.seed)
        voxels_per_sample = cfg.patch[0] * cfg.patch[1]
    else:
        sampler = PatchSampler(train_cases, cfg.patch, foreground_ratio=cfg.foreground_ratio, seed=cfg.seed)
        voxels_per_sample = math.prod(cfg.patch)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    if resume is None and cfg.init:
        _say(f"[{cfg.stage}] {initialise_from(model, cfg.init)}", main)
    frozen = freeze_encoder(model) if cfg.stage == "3d" else []
    optimizer = make_optimizer(cfg, trainable_parameters(model), device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        start = int(resume["step"])
        _say(f"[{cfg.stage}] resuming {ckpt_path} at step {start}", main)
    elif cfg.resume:
        _say(f"[{cfg.stage}] --resume: no {ckpt_path} yet, starting from step 0", main)

    net = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # buffers (BatchNorm statistics) are kept equal on every rank by StepRunningStats, not by DDP's
        # broadcast of rank 0's at each forward
        net = DDP(model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)
    bn_stats = distributed.StepRunningStats(model, info, local_batch // micro)
    if cfg.task == "detection":
        def loss_fn(logits, target):  # the heat map regressed as a probability map (see heatmap_loss)
            return heatmap_loss(logits, target)
    else:
        loss_fn = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0, backend=cfg.backend)
    amp_dtype = AMP_DTYPES[cfg.amp]

    metrics_path = out / "metrics.jsonl"
    records = _rewrite_metrics(metrics_path, start) if (main and resume is not None) else []
    if main and resume is None:
        metrics_path.write_text("")
    log = open(metrics_path, "a") if main else None

    def write(rec):
        records.append(rec)
        if log is not None:
            log.write(_json.dumps(rec) + "\n")
            log.flush()

    saved_step = start if resume is not None else None

    def last_good() -> str:
        if saved_step is None:
            return f"no checkpoint was written yet ({ckpt_path} does not hold this run)"
        return f"{ckpt_path} holds step {saved_step}, the last finite state; --resume continues from it"

    def save(step):
        nonlocal saved_step
        # a checkpoint is the state to continue from: never one with NaN or infinite numbers in it
        bad = nonfinite_tensors({"model": model.state_dict(), "optimizer": optimizer.state_dict()["state"]})
        if bad:
            raise TrainingDiverged(f"[{cfg.stage}] training diverged: after step {step} {len(bad)} tensor(s) are NaN "
                                   f"or infinite ({', '.join(bad[:3])}); {last_good()}. Try a lower --lr than "
                                   f"{cfg.lr}.")
        if main:
            atomic_torch_save({
                "format": FORMAT_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None, "step": step,
                "config": cfg.to_dict(), "model_spec": model_spec(cfg), "frozen": list(frozen),
                "versions": {"ahnet_fast": str(ahnet_fast.__version__), "torch": str(torch.__version__)},
                # one source of geometry, here and in `infer`: the voxel spacing is the affine's
                "geometry": {"spacing_from": "affine", "spacing_xy": cfg.spacing_xy},
                "data_fingerprint": fingerprint,
            }, ckpt_path)
        saved_step = step
        distributed.barrier(info)

    def evaluate(step):
        if main and cfg.task == "detection":
            result, chance, candidates = evaluate_detection(
                model, val_cases, cfg.patch, radius_mm=cfg.det_radius_mm, threshold=cfg.det_threshold,
                overlap=cfg.overlap, window_batch=cfg.window_batch, amp=cfg.amp, device=device, chance_seed=step)
            rec = {"step": step, "kind": "eval", "froc_cpm": result.cpm, "froc_chance_cpm": chance.cpm,
                   **{f"sensitivity@{r:g}": s for r, s in zip(result.rates, result.sensitivity)},
                   "lesions": result.n_lesions, "candidates": len(candidates)}
            write(rec)
            distributed.barrier(info)
            return rec, (result, chance, candidates)
        if main:
            tracker, preds = evaluate_cases(model, val_cases, cfg.patch, num_classes=cfg.num_classes,
                                            class_names=cfg.class_names, overlap=cfg.overlap,
                                            window_batch=cfg.window_batch, amp=cfg.amp, device=device)
            summary = tracker.summary()
            rec = {"step": step, "kind": "eval", **summary}  # dice_case/<class>, dice_global/<class>
            write(rec)
            result = (rec, preds)
        else:
            result = (None, None)
        distributed.barrier(info)
        return result

    tqdm = _tqdm()
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.stage}", unit="step", disable=not show,
               file=sys.stderr, dynamic_ncols=True)
    n_micro = local_batch // micro
    train_losses = [r["loss"] for r in records if r.get("kind") == "train"]
    last_loss = train_losses[-1] if train_losses else None

    def announce(signum):
        bar.write(f"[{cfg.stage}] {signal.Signals(signum).name}: stopping after this step with a checkpoint "
                  "(signal again to stop at once)", file=sys.stderr)

    stopping = contextlib.ExitStack()
    stop = stopping.enter_context(deferred_signals(announce if main else None))
    try:
        for step in range(start, cfg.steps):
            set_train_mode(model, frozen)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            x, y = sampler.batch(step, cfg.batch, rank=info.rank, world_size=info.world_size)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), device=device)
            bn_stats.begin_step()
            for i in range(n_micro):
                xs, ys = x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro]
                sync = net.no_sync() if (info.enabled and i < n_micro - 1) else contextlib.nullcontext()
                with sync:
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        logits = net(xs)
                    # the focal loss in float32: its logs underflow in 16 bits
                    loss = loss_fn(logits.float(), ys.unsqueeze(1)) / n_micro
                    scaler.scale(loss).backward()
                bn_stats.after_micro_batch()
                total += loss.detach()
            bn_stats.end_step()
            step_loss, stop_now = distributed.mean_and_any(total.item(), stop.requested, info, device)
            if not math.isfinite(step_loss) and not scaler.is_enabled():
                raise TrainingDiverged(f"[{cfg.stage}] training diverged: the loss is {step_loss} at step {step + 1}; "
                                       f"{last_good()}. Try a lower --lr than {cfg.lr}.")
            scaler.step(optimizer)
            scaler.update()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            last_loss = step_loss
            write({"step": step + 1, "kind": "train", "loss": step_loss, "lr": cfg.lr, "seconds": dt,
                   "voxels_per_s": cfg.batch * voxels_per_sample / dt})
            bar.set_postfix(loss=f"{step_loss:.4f}", vox_s=f"{cfg.batch * voxels_per_sample / dt:,.0f}")
            bar.update(1)
            done = step + 1
            if done % cfg.save_every == 0 or done == cfg.steps or stop_now:
                save(done)
            if stop_now:
                signum = stop.signum or signal.SIGTERM  # another rank's signal
                raise Interrupted(signum, f"[{cfg.stage}] stopped by {signal.Signals(signum).name} after step {done}: "
                                          f"{ckpt_path} holds it; --resume continues")
            if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                rec, _ = evaluate(done)
                if rec is not None:
                    bar.write(f"[{cfg.stage}] step {done}: " + _dice_line(rec, cfg), file=sys.stderr)
                    if cfg.plots:
                        _plots(out, records)
    finally:
        stopping.close()
        bar.close()
        if log is not None:
            log.close()
    final_step = max(start, cfg.steps)
    if start >= cfg.steps and resume is not None:
        _say(f"[{cfg.stage}] {ckpt_path} is already at step {start} of {cfg.steps}: nothing to train", main)

    log = open(metrics_path, "a") if main else None
    rec, preds = evaluate(final_step)  # a signal now interrupts it: the checkpoint is already written
    if log is not None:
        log.close()
    result = {"step": final_step, "loss": last_loss, "out": str(out), "checkpoint": str(ckpt_path)}
    if main:
        result["froc" if cfg.task == "detection" else "dice"] = {k: v for k, v in rec.items()
                                                                 if k not in ("step", "kind")}
        _say(f"[{cfg.stage}] final ({final_step} steps) on {len(val_cases)} held-out case(s): "
             + _dice_line(rec, cfg), main)
        if cfg.plots and cfg.task == "detection":
            froc_result, chance, candidates = preds
            written = _plots(out, records) + [_detection_plots(out, val_cases[0], froc_result, candidates,
                                                               f"{cfg.stage}: {val_cases[0].name}, step {final_step}")]
            written.append(_froc_plot(out, froc_result, chance, f"{cfg.stage}, step {final_step}"))
            result["plots"] = [str(p) for p in written]
            _say(f"[{cfg.stage}] wrote {ckpt_path}, {metrics_path}, " + ", ".join(str(p) for p in written), main)
        elif cfg.plots:
            case = val_cases[0]
            title = f"{cfg.stage}: {case.name}, step {final_step}"
            written = _plots(out, records, (case.image, case.label, preds[0], list(cfg.class_names), title,
                                            case.affine))
            result["plots"] = [str(p) for p in written]
            _say(f"[{cfg.stage}] wrote {ckpt_path}, {metrics_path}, " + ", ".join(str(p) for p in written), main)
    return result


def heatmap_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Detection loss: binary cross-entropy between the network's one-channel output, read as the logit
    of a heat map in [0, 1] (what the peak threshold applies to) offset by the prior
    :data:`~ahnet_fast.training.evaluate.HEATMAP_PRIOR_LOGIT`, and the Gaussian target as a soft
    label, both (B, 1, *spatial). Why not the squared error of the sigmoid: on a target that is zero
    almost everywhere the sigmoid saturates near 0 and its gradient with it, so the lesions' peaks
    are learnt slowly; cross-entropy's gradient is sigmoid(logit) - target, never saturated."""
    if logits.shape != target.shape:
        raise ValueError(f"heatmap_loss: logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    return torch.nn.functional.binary_cross_entropy_with_logits(logits.float() + HEATMAP_PRIOR_LOGIT, target.float())


def _froc_plot(out: Path, result, chance, title: str) -> Path:
    from ahnet_fast import plots

    return plots.plot_froc({"AH-Net": result, "chance (random positions, same scores)": chance},
                           out / "froc.png", title=f"FROC on the held-out volumes ({title})")


def _detection_plots(out: Path, case, result, candidates, title) -> Path:
    from ahnet_fast import plots

    return plots.plot_detections(case.image, case.affine, case.lesions, [c for c in candidates if c.case == case.name],
                                 out / "montage.png", title=title)


def _dice_line(rec: dict, cfg: TrainConfig) -> str:
    if cfg.task == "detection":
        return (f"FROC mean sensitivity {rec['froc_cpm']:.3f} (chance {rec['froc_chance_cpm']:.3f}); at 1 false "
                f"positive per volume {rec['sensitivity@1']:.3f}, at 4 {rec['sensitivity@4']:.3f} "
                f"({rec['lesions']} lesions)")
    parts = []
    for name in cfg.class_names[1:]:
        case, glob = rec.get(f"dice_case/{name}"), rec.get(f"dice_global/{name}")
        if case is not None:
            parts.append(f"{name} Dice {case:.3f} per case, {glob:.3f} global")
    return "; ".join(parts)


def train_schedule(cfg: TrainConfig, stages=("2d", "3d", "finetune"), steps: dict | None = None) -> list[dict]:
    """The paper's schedule: 2D network on slices, then the 3D decoder on the transferred frozen
    encoder, then everything; each stage in its own folder under ``cfg.out``, each taking the previous
    stage's last.pt as --init."""
    results = []
    init = cfg.init
    for stage in stages:
        sub = TrainConfig.from_dict({**cfg.to_dict(), "stage": stage, "out": str(Path(cfg.out) / stage),
                                     "init": init, "steps": (steps or {}).get(stage, cfg.steps)})
        results.append(train(sub))
        init = results[-1]["checkpoint"]
    return results
