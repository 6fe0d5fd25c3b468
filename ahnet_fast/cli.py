"""Command line: ``ahnet-fast`` (or ``python -m ahnet_fast``).

``ahnet-fast demo`` runs AH-Net training steps (forward, loss, backward) on a synthetic anisotropic
volume and prints time per step, voxels per second, activation bytes saved for backward and peak memory;
``--compare-monai`` runs MONAI's AHNet on the same input in the same process for a side-by-side
ratio. The training, inference, planning and benchmark subcommands arrive with their issues.
"""
from __future__ import annotations

import argparse
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
    result = plan(budget, tuple(args.shape), model=model, max_batch=args.max_batch, optimizer=args.optimizer,
                  precisions=tuple(args.precisions))
    gib = 2**30
    print(f"AH-Net training step on {' x '.join(map(str, args.shape))} voxels per sample ({args.in_channels} input "
          f"channel(s), {args.out_channels} classes), {args.optimizer}; budget {budget / gib:.2f} GiB\n")
    print(f"{'precision':<10} {'checkpoint':<11} {'batch':>5} {'peak GiB':>9} {'fits':>5} {'rel. speed':>10}")
    for row in result["table"]:
        print(f"{row['precision']:<10} {row['checkpoint']:<11} {row['batch']:>5} {row['total'] / gib:>9.2f} "
              f"{'yes' if row['fits'] else 'no':>5} {row['relative_speed']:>10.2f}")
    est = result["estimate"]
    print(f"\nchosen: {result['precision']}, checkpoint={result['checkpoint']!r}, batch {result['batch']}: predicted "
          f"peak {est.total / gib:.2f} GiB = parameters {est.parameters / gib:.2f} + gradients {est.gradients / gib:.2f}"
          f" + optimizer state {est.optimizer_state / gib:.2f} + activations {est.activations / gib:.2f} + workspace "
          f"{est.workspace / gib:.2f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ahnet-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="training steps of AH-Net on a synthetic volume: time and memory",
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
    plan_p = sub.add_parser("plan", help="the fastest training configuration that fits a memory budget",
                            description="Estimates the peak memory of AH-Net training steps (parameters, gradients, "
                                        "optimizer state, activations traced on fake tensors, workspace) for each "
                                        "precision, checkpoint policy and batch size, and picks the fastest that "
                                        "fits the budget.")
    plan_p.add_argument("--budget", required=True, help="memory budget, e.g. 16GB or 512MB")
    plan_p.add_argument("--shape", type=int, nargs=3, required=True, metavar=("H", "W", "D"),
                        help="spatial size of one sample; D is the slice axis")
    plan_p.add_argument("--in-channels", type=int, default=1)
    plan_p.add_argument("--out-channels", type=int, default=3)
    plan_p.add_argument("--psp-block-num", type=int, default=4)
    plan_p.add_argument("--max-batch", type=int, default=4)
    plan_p.add_argument("--optimizer", default="adam", choices=("adam", "adamw", "sgd", "sgd_momentum"))
    plan_p.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=("bf16", "fp16", "fp32"))
    plan_p.set_defaults(func=cmd_plan)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # bad shapes or arguments: say what, without a traceback
        print(f"ahnet-fast {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
