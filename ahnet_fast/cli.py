"""Command line: ``ahnet-fast`` (or ``python -m ahnet_fast``).

Subcommands (each has ``--help``):

- ``train``: the paper's schedule (2D network on slices, 3D decoder on the transferred encoder,
  then end to end) on synthetic CT-like volumes or a Decathlon / LiTS folder; checkpoints, metrics,
  plots; ``torchrun --nproc_per_node=N -m ahnet_fast train ...`` for many processes.
- ``infer``: whole-volume sliding-window segmentation of a NIfTI file with a trained checkpoint.
- ``plan``: the fastest configuration that fits a memory budget.
- ``parity``: trains the fast model, the pure-PyTorch reference and MONAI's AHNet side by side.
- ``bench``: the end-to-end benchmark against MONAI (ahnet_fast/benchmark.py).
- ``demo``: a few timed training steps with memory figures.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _peak_rss_bytes() -> int | None:
    """Peak resident set size of this process (VmHWM), or None where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def synthetic_volume(shape, out_channels, seed=0):
    """An anisotropic volume with a few bright ellipsoids and their label map (class 1..C-1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    b, _, h, w, d = shape
    zz, yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), torch.linspace(-1, 1, d),
                                indexing="ij")
    image = torch.randn(shape, generator=g) * 0.2
    label = torch.zeros((b, h, w, d), dtype=torch.long)
    for i in range(b):
        for k in range(1, max(out_channels, 2)):
            c = torch.rand(3, generator=g) * 1.0 - 0.5
            r = torch.rand(3, generator=g) * 0.25 + 0.15
            inside = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1
            image[i, 0][inside] += 1.0 * k
            label[i][inside] = k % max(out_channels, 2)
    return image, label


def _run_steps(net, x, target, steps, device, name, out_channels):
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    param_storages = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved = {"bytes": 0, "seen": set()}

    def pack(t):
        # activation memory kept for backward: each storage once, parameters excluded
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages and ptr not in saved["seen"]:
            saved["seen"].add(ptr)
            saved["bytes"] += t.untyped_storage().nbytes()
        return t

    times, losses = [], []
    net.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _reset_peak_rss()
    for step in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        saved["bytes"], saved["seen"] = 0, set()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = net(x)
            if out_channels == 1:
                loss = F.binary_cross_entropy_with_logits(logits[:, 0], (target > 0).float())
            else:
                loss = F.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        bar = "#" * (20 * (step + 1) // steps)
        print(f"\r  {name:<10} [{bar:<20}] step {step + 1}/{steps}  loss {losses[-1]:.4f}  "
              f"{times[-1]:.2f} s/step", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss_bytes()
    # the first step includes one-time set-up (allocator warm-up, kernel selection): not in the median
    median = statistics.median(times[1:] if len(times) > 1 else times)
    return {"median_s": median, "saved": saved["bytes"], "peak": peak, "loss": losses}


def cmd_demo(args) -> int:
    import torch

    import ahnet_fast

    device = torch.device(args.device)
    shape = (args.batch, 1, *args.shape)
    torch.manual_seed(args.seed)
    net = ahnet_fast.AHNet(out_channels=args.out_channels, psp_block_num=args.psp_block_num,
                           backend=args.backend).to(device)
    x, target = synthetic_volume(shape, args.out_channels, args.seed)
    x, target = x.to(device), target.to(device)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"ahnet_fast {ahnet_fast.__version__}  torch {torch.__version__}  device {device}  "
          f"threads {torch.get_num_threads()}  compiled extension: {'yes' if ahnet_fast.extension_available() else 'no'}")
    print(f"AHNet: {n_params / 1e6:.1f} M parameters; input {tuple(shape)}; {args.steps} training steps "
          f"(forward, loss, backward, SGD)")
    results = {"ahnet_fast": _run_steps(net, x, target, args.steps, device, "ahnet_fast", args.out_channels)}
    if args.compare_monai:
        try:
            from monai.networks.nets import AHNet as MonaiAHNet
        except ImportError:
            print("--compare-monai: MONAI is not installed (pip install monai==1.6.1)", file=sys.stderr)
            return 2
        torch.manual_seed(args.seed)
        ref = MonaiAHNet(out_channels=args.out_channels, psp_block_num=args.psp_block_num).to(device)
        results["MONAI"] = _run_steps(ref, x, target, args.steps, device, "MONAI", args.out_channels)
    voxels = x.numel() // x.shape[1]
    mem_kind = "peak CUDA allocated" if device.type == "cuda" else "peak RSS of the process"
    print(f"\n{'':<12}{'s/step (median)':>16}{'voxels/s':>12}{'activations saved':>20}{mem_kind:>26}")
    for name, r in results.items():
        print(f"{name:<12}{r['median_s']:>16.3f}{voxels / r['median_s']:>12.0f}{_fmt_bytes(r['saved']):>20}"
              f"{_fmt_bytes(r['peak']):>26}")
    if "MONAI" in results:
        a, b = results["ahnet_fast"], results["MONAI"]
        print(f"\nratio MONAI / ahnet_fast: time {b['median_s'] / a['median_s']:.2f}x, saved for backward "
              f"{b['saved'] / max(a['saved'], 1):.2f}x (same run, same input)")
        if args.compare_monai and b["peak"] and a["peak"] and device.type != "cuda":
            print("(peak RSS is process-wide and never goes down: MONAI's row includes what the first run left "
                  "resident; compare peaks with each network in its own process)")
    return 0


def cmd_plan(args) -> int:
    import torch

    from ahnet_fast import AHNet
    from ahnet_fast.memory import parse_bytes, plan

    budget = parse_bytes(args.budget)
    with torch.device("meta"):
        model = AHNet(in_channels=args.in_channels, out_channels=args.out_channels, psp_block_num=args.psp_block_num)
    if args.infer:
        return _plan_inference(args, model, budget)
    result = plan(budget, tuple(args.shape), model=model, max_batch=args.max_batch, optimizer=args.optimizer,
                  precisions=tuple(args.precisions))
    gib = 2**30
    lines = [f"AH-Net training step on {' x '.join(map(str, args.shape))} voxels per sample ({args.in_channels} input "
             f"channel(s), {args.out_channels} classes), {args.optimizer}; budget {budget / gib:.2f} GiB", "",
             f"{'precision':<10} {'checkpoint':<11} {'batch':>5} {'peak GiB':>9} {'fits':>5} {'rel. speed':>10}"]
    for row in result["table"]:
        lines.append(f"{row['precision']:<10} {row['checkpoint']:<11} {row['batch']:>5} {row['total'] / gib:>9.2f} "
                     f"{'yes' if row['fits'] else 'no':>5} {row['relative_speed']:>10.2f}")
    est = result["estimate"]
    lines += ["", f"chosen: {result['precision']}, checkpoint={result['checkpoint']!r}, batch {result['batch']}: "
                  f"predicted peak {est.total / gib:.2f} GiB = parameters {est.parameters / gib:.2f} + gradients "
                  f"{est.gradients / gib:.2f} + optimizer state {est.optimizer_state / gib:.2f} + activations "
                  f"{est.activations / gib:.2f} + workspace {est.workspace / gib:.2f}"]
    print("\n".join(lines))
    if args.json:  # the README's transcript is generated from this file (benchmarks/report.py)
        _write_plan(args.json, argv=["ahnet-fast", "plan", "--budget", args.budget, "--shape", *map(str, args.shape),
                                     "--max-batch", str(args.max_batch)],
                    shape=list(args.shape), in_channels=args.in_channels, out_channels=args.out_channels,
                    psp_block_num=args.psp_block_num, optimizer=args.optimizer, budget=budget,
                    table=result["table"], chosen=dict(precision=result["precision"], checkpoint=result["checkpoint"],
                                                       batch=result["batch"], estimate=est.as_dict()),
                    transcript=lines)
    return 0


def _plan_inference(args, model, budget) -> int:
    """plan --infer: the largest sliding window whose whole-volume inference fits the budget."""
    from ahnet_fast.memory import plan_inference

    result = plan_inference(budget, tuple(args.shape), model=model)
    gib = 2**30
    lines = [f"AH-Net whole-volume inference of a {' x '.join(map(str, args.shape))} volume ({args.out_channels} "
             f"classes), fp32 (a bf16 run needs less), one window per forward; budget {budget / gib:.2f} GiB", "",
             f"{'window':<15} {'forward GiB':>11} {'logits GiB':>10} {'peak GiB':>9} {'fits':>5}"]
    for row in result["table"]:
        lines.append(f"{'x'.join(map(str, row['window'])):<15} {row['forward'] / gib:>11.2f} "
                     f"{row['stitching'] / gib:>10.2f} {row['total'] / gib:>9.2f} {'yes' if row['fits'] else 'no':>5}")
    est = result["estimate"]
    lines += ["", f"chosen: window {' '.join(map(str, result['window']))}: predicted peak "
                  f"{est.total / gib:.2f} GiB over the model and the volume = one window's forward "
                  f"{est.forward / gib:.2f} + the volume's logits {est.stitching / gib:.2f}"]
    print("\n".join(lines))
    if args.json:
        _write_plan(args.json, argv=["ahnet-fast", "plan", "--infer", "--budget", args.budget, "--shape",
                                     *map(str, args.shape)],
                    volume=list(args.shape), budget=budget, table=result["table"],
                    chosen=dict(window=list(result["window"]), precision=result["precision"], total=est.total),
                    transcript=lines)
    return 0


def _write_plan(path, **record) -> None:
    """A plan's search and choice as JSON (written atomically), with the date and torch version."""
    import datetime

    import torch

    from ahnet_fast import _json
    from ahnet_fast._atomic import atomic_path

    record = dict(date=str(datetime.date.today()), torch=torch.__version__, **record)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(_json.dumps(record, indent=1))


def _spacing(args):
    """--spacing, whose default is the task's: 1.6 mm for CT segmentation, DBT's working spacing for
    detection; 0 keeps the acquired grid."""
    from ahnet_fast.data.dbt import DBT_SPACING_XY

    if args.spacing is None:
        return DBT_SPACING_XY if args.task == "detection" else 1.6
    return None if args.spacing <= 0 else args.spacing


def _train_config(args):
    from ahnet_fast.training.config import TrainConfig

    return TrainConfig(
        data=args.data, task=args.task, det_radius_mm=args.det_radius_mm, det_threshold=args.det_threshold,
        stage="finetune" if args.stage == "all" else args.stage, init=args.init, steps=args.steps,
        patch=tuple(args.patch), batch=args.batch, micro_batch=args.micro_batch, lr=args.lr,
        optimizer=args.optimizer, momentum=args.momentum, amp=args.amp,
        checkpoint=args.checkpoint, seed=args.seed, device=args.device, out=args.out, resume=args.resume,
        num_classes=args.num_classes, psp_block_num=args.psp_block_num, backend=args.backend,
        data_seed=args.data_seed, train_cases=args.train_cases, val_cases=args.val_cases, max_cases=args.max_cases,
        synthetic_size_xy=args.synthetic_size, spacing_xy=_spacing(args), boxes=args.boxes, file_paths=args.file_paths,
        window=tuple(args.window), foreground_ratio=args.foreground_ratio, eval_every=args.eval_every,
        save_every=args.save_every, overlap=args.overlap, window_batch=args.window_batch,
        progress=not args.no_progress, plots=not args.no_plots)


def _check_out_folder(out: str, resume: bool, overwrite: bool) -> None:
    """An earlier run's files in OUT are kept unless --resume continues the run or --overwrite says so."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file; the run's folder must be a folder (or not exist yet)")
    if resume or overwrite or not os.path.isdir(out) or not os.listdir(out):
        return
    raise ValueError(f"--out {out} already holds files ({', '.join(sorted(os.listdir(out))[:5])}): pass --resume to "
                     "continue that run, --overwrite to replace it, or choose another --out")


def cmd_train(args) -> int:
    from ahnet_fast.training import train, train_schedule
    from ahnet_fast import _json

    cfg = _train_config(args)
    # every argument checked before any work: with --stage all the config says "finetune", whose
    # checks (the patch against AHNet's size rule) cover the 3d stage too
    cfg.validate()
    # under torchrun only rank 0 writes OUT, and only it checks it: another rank looking later could
    # find rank 0's fresh files and refuse its own run
    if os.environ.get("RANK", "0") == "0":
        _check_out_folder(args.out, args.resume, args.overwrite)
        from ahnet_fast._atomic import check_writable

        check_writable(os.path.join(args.out, "last.pt"), overwrite=True, what="--out")  # before any work
    if args.stage == "all":
        steps = {"2d": args.steps_2d or args.steps, "3d": args.steps_3d or args.steps, "finetune": args.steps}
        results = train_schedule(cfg, steps=steps)
    else:
        results = [train(cfg)]
    for r in results:
        scores = r.get("dice") or r.get("froc")
        if scores is not None:
            print(_json.dumps({"out": r["out"], "step": r["step"], "loss": r["loss"], **scores}))
    return 0


def cmd_infer(args) -> int:
    from ahnet_fast.training.infer import checkpoint_task, detect_volumes, infer_file

    task = checkpoint_task(args.model)
    if args.task not in ("auto", task):
        raise ValueError(f"--task {args.task}: {args.model} was trained for {task}")
    if task == "detection":
        unused = [flag for flag, value in (("--probabilities", args.probabilities), ("--stitch", args.stitch != "auto"),
                                           ("--replace-nonfinite", args.replace_nonfinite is not None),
                                           ("--patch", args.patch is not None)) if value]
        if unused:
            raise ValueError(f"{', '.join(unused)}: segmentation options; {args.model} is a detection checkpoint")
        summary = detect_volumes(args.model, args.input, args.output, file_paths=args.file_paths, view=args.view,
                                 radius_mm=args.det_radius_mm, threshold=args.det_threshold,
                                 max_candidates=args.max_candidates, overlap=args.overlap,
                                 window_batch=args.window_batch, amp=args.amp, device=args.device,
                                 progress=not args.no_progress, overwrite=args.overwrite)
        print(f"wrote {summary['output']}: {summary['candidates']} candidates in {summary['volumes']} volume(s) "
              f"(radius {summary['radius_mm']:g} mm, threshold {summary['threshold']:g}) in {summary['seconds']:.1f} s")
        return 0
    for flag, value in (("--file-paths", args.file_paths), ("--view", args.view), ("--det-radius-mm", args.det_radius_mm),
                        ("--det-threshold", args.det_threshold)):
        if value is not None:
            raise ValueError(f"{flag}: a detection option; {args.model} is a segmentation checkpoint")

    summary = infer_file(args.model, args.input, args.output, overlap=args.overlap, window_batch=args.window_batch,
                         amp=args.amp, device=args.device, stitch=args.stitch, probabilities=args.probabilities,
                         progress=not args.no_progress, overwrite=args.overwrite,
                         replace_nonfinite=args.replace_nonfinite,
                         patch=tuple(args.patch) if args.patch is not None else None)
    voxels = ", ".join(f"{k} {v}" for k, v in summary["voxels"].items())
    print(f"wrote {summary['output']} ({' x '.join(map(str, summary['shape']))} voxels; {voxels}) in "
          f"{summary['seconds']:.1f} s")
    return 0


def cmd_parity(args) -> int:
    from ahnet_fast.training.parity import run_parity

    report = run_parity(steps=args.steps, steps_fp64=args.steps_fp64, patch=tuple(args.patch),
                        psp_block_num=args.psp_block_num, lr=args.lr, lr_fp64=args.lr_fp64, seed=args.seed,
                        out=args.out, monai=not args.no_monai, train_cases=args.train_cases,
                        val_cases=args.val_cases, synthetic_size_xy=args.synthetic_size, parts=tuple(args.parts),
                        layers=tuple(args.layers), spacing_xy=None if args.spacing <= 0 else args.spacing,
                        progress=not args.no_progress)
    print(report["summary"])
    return 0 if report["passed"] else 1


def cmd_bench(args) -> int:
    from ahnet_fast.benchmark import main as bench_main

    extra = list(args.bench_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return bench_main(extra, prog="ahnet-fast bench")


def cmd_froc(args) -> int:
    from ahnet_fast import _json
    from ahnet_fast._atomic import atomic_path, check_writable
    from ahnet_fast.detection import froc, read_candidates, read_truth

    for path in (args.plot, args.json):
        if path:
            check_writable(path, overwrite=True, what="output")
    if args.data is not None:  # the truth as boxes/centres in voxels of the folder's volumes
        from ahnet_fast.data.dbt_files import discover_dbt, read_geometry, truth_lesions

        volumes = discover_dbt(args.data, args.truth, args.file_paths)
        lesions = [les for v in volumes for les in truth_lesions(v, *read_geometry(v.path))]
        cases = [v.name for v in volumes]
    elif args.file_paths is not None:
        raise ValueError("--file-paths lists the volumes of a DBT folder: give the folder with --data")
    else:
        lesions, cases = read_truth(args.truth)
    candidates = read_candidates(args.candidates)
    result = froc(candidates, lesions, cases, hit_distance_mm=args.hit_distance_mm)
    print(f"FROC of {args.candidates}: {result.n_lesions} lesions in {result.n_volumes} volumes, "
          f"{len(candidates)} candidates ({result.n_found} lesions hit, {result.n_false_positives} false positives, "
          f"{result.n_duplicates} duplicates); a hit is {result.hit_rule}")
    print("false positives per volume: " + "  ".join(f"{r:>6g}" for r in result.rates))
    print("sensitivity:                " + "  ".join(f"{s:>6.3f}" for s in result.sensitivity))
    print(f"mean sensitivity over these rates (CPM): {result.cpm:.3f}")
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(_json.dumps({"candidates": str(args.candidates), "truth": str(args.truth),
                                        **result.as_dict()}, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        from ahnet_fast.plots import plot_froc

        plot_froc({os.path.basename(args.candidates): result}, args.plot)
        print(f"wrote {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ahnet-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add_command(name, **kwargs):  # every --help shows the defaults
        return sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)

    demo = add_command("demo", help="training steps of AH-Net on a synthetic volume: time and memory",
                          description="Runs AH-Net training steps on a synthetic anisotropic volume and prints "
                                      "time per step, voxels/s, activation bytes saved for backward and peak memory.")
    demo.add_argument("--shape", type=int, nargs=3, default=(128, 128, 32), metavar=("H", "W", "D"),
                      help="spatial size; D is the slice axis (default 128 128 32)")
    demo.add_argument("--batch", type=int, default=1)
    demo.add_argument("--out-channels", type=int, default=3)
    demo.add_argument("--psp-block-num", type=int, default=4)
    demo.add_argument("--steps", type=int, default=3)
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--backend", default=None, choices=("auto", "reference", "cpp", "triton"))
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--compare-monai", action="store_true", help="also run MONAI's AHNet for a side-by-side ratio")
    demo.set_defaults(func=cmd_demo)
    plan_p = add_command("plan", help="the fastest training configuration (or, --infer, the largest inference "
                                      "window) that fits a memory budget",
                            description="Estimates the peak memory of AH-Net training steps (parameters, gradients, "
                                        "optimizer state, activations traced on fake tensors, workspace) for each "
                                        "precision, checkpoint policy and batch size, and picks the fastest that "
                                        "fits the budget. With --infer: estimates whole-volume sliding-window "
                                        "inference (one window's eval-mode forward, traced on fake tensors, plus "
                                        "the volume's blended logits) for each window size and precision, and "
                                        "picks the largest window that fits.")
    plan_p.add_argument("--budget", required=True, help="memory budget, e.g. 16GB or 512MB")
    plan_p.add_argument("--shape", type=int, nargs=3, required=True, metavar=("H", "W", "D"),
                        help="spatial size of one sample (with --infer: of the whole volume); D is the slice axis")
    plan_p.add_argument("--in-channels", type=int, default=1)
    plan_p.add_argument("--out-channels", type=int, default=3)
    plan_p.add_argument("--psp-block-num", type=int, default=4)
    plan_p.add_argument("--max-batch", type=int, default=4)
    plan_p.add_argument("--optimizer", default="adam", choices=("adam", "adamw", "sgd", "sgd_momentum"))
    plan_p.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=("bf16", "fp16", "fp32"))
    plan_p.add_argument("--infer", action="store_true",
                        help="plan whole-volume inference instead: --shape is the volume, and the plan is the "
                             "largest sliding window that fits the budget")
    plan_p.add_argument("--json", default=None, help="also write the search and the choice to this JSON file")
    plan_p.set_defaults(func=cmd_plan)

    train_p = add_command("train", help="train AH-Net (the paper's 2D->3D schedule) on synthetic or real CT",
                             description="Trains one stage of the paper's schedule, or all three (--stage all): 2d "
                                         "(MCFCN on three adjacent slices as channels), 3d (AHNet whose encoder is "
                                         "transferred from --init and frozen; the decoder trains), finetune (all "
                                         "weights). Writes OUT/last.pt, OUT/metrics.jsonl, OUT/curves.png and "
                                         "OUT/montage.png, and prints the held-out Dice.")
    train_p.add_argument("--data", default="synthetic",
                         help="'synthetic' (default: CT-like volumes, or DBT-like ones for --task detection, made "
                              "from --data-seed), a Medical Segmentation Decathlon task folder (dataset.json), a "
                              "folder of LiTS volume-N.nii / segmentation-N.nii pairs, or for detection a DBT "
                              "folder (with --boxes)")
    train_p.add_argument("--boxes", default=None, metavar="CSV",
                         help="detection on a DBT folder: its lesions, a row per box or centre in voxels (columns "
                              "case or Duke's PatientID/StudyUID/View; slice, x, y; width, height for a box)")
    train_p.add_argument("--file-paths", default=None, metavar="CSV",
                         help="detection on Duke BCS-DBT: its file-paths table (volumes relative to --data)")
    train_p.add_argument("--task", default="segmentation", choices=("segmentation", "detection"),
                         help="segmentation: liver and lesions in CT (label maps); detection: lesion centres in "
                              "breast tomosynthesis (a Gaussian heat map per lesion, scored by FROC)")
    train_p.add_argument("--det-radius-mm", type=float, default=5.0,
                         help="detection: peaks closer than this to a higher one are one candidate")
    train_p.add_argument("--det-threshold", type=float, default=0.05,
                         help="detection: heat-map values below this are never candidates")
    train_p.add_argument("--stage", default="all", choices=("2d", "3d", "finetune", "all"),
                         help="all (default) runs 2d, 3d and finetune in OUT/2d, OUT/3d, OUT/finetune")
    train_p.add_argument("--init", default=None, help="checkpoint to start from: a stage-2d last.pt for stage 3d "
                                                      "(its encoder is transferred), a 3d one for finetune")
    train_p.add_argument("--steps", type=int, default=200, help="optimizer steps (per stage with --stage all)")
    train_p.add_argument("--steps-2d", type=int, default=None, help="--stage all: steps of the 2d stage")
    train_p.add_argument("--steps-3d", type=int, default=None, help="--stage all: steps of the 3d stage")
    train_p.add_argument("--patch", type=int, nargs=3, default=(128, 128, 32), metavar=("H", "W", "D"),
                         help="training patch; D is the slice axis (2d stage: H W slices)")
    train_p.add_argument("--batch", type=int, default=1, help="global batch per optimizer step")
    train_p.add_argument("--micro-batch", type=int, default=None,
                         help="samples per forward pass (BatchNorm statistics group); default batch / processes")
    train_p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    train_p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"),
                         help="adam (default) or sgd with --momentum")
    train_p.add_argument("--momentum", type=float, default=0.9, help="sgd momentum")
    train_p.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"),
                         help="autocast precision; fp16 (CUDA) uses a GradScaler")
    train_p.add_argument("--checkpoint", default="none", choices=("none", "encoder", "decoder", "all", "auto"),
                         help="activation checkpointing of AHNet (auto: the memory planner picks)")
    train_p.add_argument("--seed", type=int, default=0, help="initial weights and batch sampling")
    train_p.add_argument("--device", default="cpu", help="cpu or cuda")
    train_p.add_argument("--out", default="runs/ahnet", help="output folder")
    train_p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt exactly")
    train_p.add_argument("--overwrite", action="store_true",
                         help="replace what an earlier run left in OUT (without it, a non-empty OUT is refused)")
    train_p.add_argument("--num-classes", type=int, default=3, help="classes including background (default 3: "
                                                                   "background, liver, lesion)")
    train_p.add_argument("--psp-block-num", type=int, default=4, help="AHNet pyramid pooling levels (0-4)")
    train_p.add_argument("--backend", default=None, choices=("auto", "reference", "cpp", "triton"))
    train_p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic volumes")
    train_p.add_argument("--train-cases", type=int, default=8, help="synthetic: training volumes")
    train_p.add_argument("--val-cases", type=int, default=2, help="held-out volumes (real data: the last ones)")
    train_p.add_argument("--max-cases", type=int, default=None, help="real data: read at most this many cases")
    train_p.add_argument("--synthetic-size", type=int, default=256, help="synthetic: in-plane voxels at ~0.8 mm")
    train_p.add_argument("--spacing", type=float, default=None,
                         help="in-plane spacing (mm) to resample to; 0 keeps the native spacing (default: 1.6 for "
                              "segmentation, 0.5 for detection)")
    train_p.add_argument("--window", type=float, nargs=2, default=(-200.0, 250.0), metavar=("LOW", "HIGH"),
                         help="CT window in HU, scaled to [0, 1]")
    train_p.add_argument("--foreground-ratio", type=float, default=0.67,
                         help="fraction of patches centred on a foreground voxel")
    train_p.add_argument("--eval-every", type=int, default=0, help="held-out Dice every N steps (0: at the end)")
    train_p.add_argument("--save-every", type=int, default=25, help="write OUT/last.pt every N steps")
    train_p.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap in evaluation")
    train_p.add_argument("--window-batch", type=int, default=1, help="windows per forward in evaluation")
    train_p.add_argument("--no-progress", action="store_true", help="no progress bar")
    train_p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    train_p.set_defaults(func=cmd_train)

    infer_p = add_command("infer", help="segment a volume, or detect lesions, with a trained checkpoint",
                             description="Whole-volume sliding-window inference (Gaussian blending) with the "
                                         "preprocessing stored in the checkpoint. A segmentation checkpoint writes a "
                                         "uint8 label map with the input's affine and header; a detection one the "
                                         "lesion candidates of one volume or of every volume in a DBT folder "
                                         "(case, x_mm, y_mm, z_mm, score), which `ahnet-fast froc` scores.")
    infer_p.add_argument("--model", required=True, help="a training checkpoint (OUT/last.pt)")
    infer_p.add_argument("input", help="input volume (.nii or .nii.gz; for detection also .dcm, or a DBT folder)")
    infer_p.add_argument("output", help="output label map (.nii or .nii.gz); for detection the candidates (.csv)")
    infer_p.add_argument("--task", default="auto", choices=("auto", "segmentation", "detection"),
                         help="what the checkpoint does (auto: as it was trained; a different one is an error)")
    infer_p.add_argument("--file-paths", default=None, metavar="CSV",
                         help="detection on a Duke BCS-DBT folder: its file-paths table")
    infer_p.add_argument("--view", default=None, help="detection on one Duke DICOM: its view (lcc, rmlo, ...)")
    infer_p.add_argument("--det-radius-mm", type=float, default=None,
                         help="detection: suppression radius (default: the checkpoint's)")
    infer_p.add_argument("--det-threshold", type=float, default=None,
                         help="detection: lowest candidate score (default: the checkpoint's)")
    infer_p.add_argument("--max-candidates", type=int, default=100, help="detection: at most this many per volume")
    infer_p.add_argument("--overlap", type=float, default=None, help="window overlap (default: the training one)")
    infer_p.add_argument("--window-batch", type=int, default=1, help="windows per forward pass")
    infer_p.add_argument("--patch", type=int, nargs=3, default=None, metavar=("H", "W", "D"),
                         help="segmentation: the sliding window (default: the checkpoint's training patch; "
                              "'ahnet-fast plan --infer' gives the largest that fits a memory budget)")
    infer_p.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"))
    infer_p.add_argument("--device", default="cpu", help="cpu or cuda")
    infer_p.add_argument("--stitch", default="auto", choices=("auto", "device", "cpu"),
                         help="where the blended output is accumulated (auto: on the CPU when it does not fit "
                              "the device)")
    infer_p.add_argument("--probabilities", default=None, metavar="PATH",
                         help="also write the class probabilities (classes on a 4th axis)")
    infer_p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    infer_p.add_argument("--replace-nonfinite", type=float, default=None, metavar="HU",
                         help="put this value (HU, e.g. -1024 for air) where the input has NaN or infinite voxels "
                              "(without it such an input is refused)")
    infer_p.add_argument("--no-progress", action="store_true")
    infer_p.set_defaults(func=cmd_infer)

    parity_p = add_command("parity", help="train the fast model and the references side by side",
                              description="Two criteria, every run from the same initial weights on the same "
                                          "batches: float64 with SGD, ahnet_fast's fast path against MONAI (every "
                                          "step's loss and the final weights within 1e-9); float32 with Adam, "
                                          "ahnet_fast's distance from MONAI (largest per-step loss difference, "
                                          "held-out Dice difference) at most 2x that of MONAI rerun under five "
                                          "rounding-level perturbations. Writes a JSON / Markdown report and the "
                                          "curves. Exit status 1 when a criterion fails.")
    parity_p.add_argument("--steps", type=int, default=100, help="float32 (Adam) training steps of each run")
    parity_p.add_argument("--steps-fp64", type=int, default=20, help="float64 (SGD) training steps of each run")
    parity_p.add_argument("--patch", type=int, nargs=3, default=(96, 96, 32), metavar=("H", "W", "D"))
    parity_p.add_argument("--psp-block-num", type=int, default=2)
    parity_p.add_argument("--layers", type=int, nargs=4, default=(3, 4, 6, 3), metavar=("L1", "L2", "L3", "L4"),
                          help="AHNet's residual blocks per encoder layer")
    parity_p.add_argument("--spacing", type=float, default=1.6,
                          help="in-plane spacing (mm) to resample to; 0 keeps the native spacing")
    parity_p.add_argument("--lr", type=float, default=1e-3, help="float32 Adam learning rate")
    parity_p.add_argument("--lr-fp64", type=float, default=1e-6,
                          help="float64 SGD learning rate (momentum 0.9); small enough that 20 steps stay out of "
                               "AH-Net's chaotic regime at batch 1 (see ahnet_fast/training/parity.py)")
    parity_p.add_argument("--seed", type=int, default=0)
    parity_p.add_argument("--train-cases", type=int, default=6)
    parity_p.add_argument("--val-cases", type=int, default=2)
    parity_p.add_argument("--synthetic-size", type=int, default=256)
    parity_p.add_argument("--parts", nargs="+", default=["float64", "float32"], choices=("float64", "float32"),
                          help="which criteria to run")
    parity_p.add_argument("--out", default="benchmarks/results/parity", help="report folder")
    parity_p.add_argument("--no-monai", action="store_true",
                          help="judge against the pure-PyTorch reference path even when MONAI is installed")
    parity_p.add_argument("--no-progress", action="store_true")
    parity_p.set_defaults(func=cmd_parity)

    froc_p = add_command("froc", help="score detection candidates against the truth (FROC)",
                            description="FROC of a candidates CSV (case, x_mm, y_mm, z_mm, score: world mm) against "
                                        "a truth CSV (case, x_mm, y_mm, z_mm, optional radius_mm; a row with only a "
                                        "case names a lesion-free volume): sensitivity at 1/8, 1/4, 1/2, 1, 2 and 4 "
                                        "false positives per volume and their mean. A candidate hits a lesion within "
                                        "its radius (or --hit-distance-mm); the highest-scoring hit finds the "
                                        "lesion, other hits are duplicates (neither true nor false positives), every "
                                        "other candidate is a false positive.")
    froc_p.add_argument("--candidates", required=True, help="candidates CSV")
    froc_p.add_argument("--truth", required=True,
                        help="truth CSV (world mm); with --data, a boxes/centres CSV in voxels of that folder's volumes")
    froc_p.add_argument("--data", default=None, metavar="DIR",
                        help="the DBT folder whose volumes --truth's boxes refer to (every volume in it is evaluated)")
    froc_p.add_argument("--file-paths", default=None, metavar="CSV", help="with --data: Duke's file-paths table")
    froc_p.add_argument("--hit-distance-mm", type=float, default=None,
                        help="hit distance for lesions without a radius_mm")
    froc_p.add_argument("--plot", default=None, metavar="PNG", help="write the FROC curve here")
    froc_p.add_argument("--json", default=None, help="write the result (and the whole curve) here")
    froc_p.set_defaults(func=cmd_froc)

    bench_p = add_command("bench", help="end-to-end benchmark against MONAI (training step and inference)",
                             description="The end-to-end benchmark (ahnet_fast/benchmark.py); arguments after "
                                         "'bench' go to it (ahnet-fast bench --help lists them).")
    bench_p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    bench_p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        # everything after 'bench' belongs to the benchmark's own parser (argparse would read its
        # options as ahnet-fast's), --help included
        args = argparse.Namespace(command="bench", func=cmd_bench, bench_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    from ahnet_fast._atomic import WriteError
    from ahnet_fast.training.signals import Interrupted, TrainingDiverged, exit_on_signals

    try:
        with exit_on_signals():
            return args.func(args)
    except ValueError as exc:  # bad shapes or arguments: say what, without a traceback
        print(f"ahnet-fast {args.command}: {exc}", file=sys.stderr)
        return 2
    except (WriteError, TrainingDiverged) as exc:  # the file system said no, or training diverged
        print(f"ahnet-fast {args.command}: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:  # SIGINT / SIGTERM: what was being written was finished or removed
        print(f"ahnet-fast {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
