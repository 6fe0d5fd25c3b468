"""The memory planner against measurement: estimated vs measured peak of AH-Net training.

For each configuration (input shape, checkpoint policy, precision), a fresh process with glibc's
mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=65536) creates the batch, resets its high-water mark
(/proc/self/clear_refs), then builds AHNet (MONAI's defaults, 3 classes) and Adam and runs two
training steps (the second one with the gradients and Adam's moments of the first). Measured = VmHWM
minus the RSS before the model existed; compared with ``estimate_training_memory(...).total``
(parameters + gradients + optimizer state + activations + workspace).

    python benchmarks/bench_memory.py [--out benchmarks/results/memory_cpu.md] [--json PATH]
    python benchmarks/bench_memory.py --scaling [--json benchmarks/results/memory_scaling_cpu_DATE.json]
    python benchmarks/bench_memory.py --single 512 512 256 --checkpoint all --precision bf16 [--json PATH]

``--scaling`` measures the bytes a training step adds per input voxel (peak minus parameters,
gradients and Adam's moments) for MONAI's AHNet and for ahnet_fast with checkpoint="all" and "none",
in-plane 128, 256 and 384 with 32 slices: whether checkpointing's saving holds as the volume grows.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import torch
from _common import backends_that_ran, rss_bytes, run_info  # benchmarks/ is the script's folder, first on sys.path

CONFIGS = [  # (input shape, checkpoint, precision)
    ((1, 1, 128, 128, 32), "none", "fp32"),
    ((1, 1, 128, 128, 32), "encoder", "fp32"),
    ((1, 1, 128, 128, 32), "decoder", "fp32"),
    ((1, 1, 128, 128, 32), "all", "fp32"),
    ((2, 1, 128, 128, 32), "none", "fp32"),
    ((1, 1, 256, 256, 32), "none", "fp32"),
    ((1, 1, 256, 256, 32), "all", "fp32"),
    ((1, 1, 128, 128, 64), "none", "bf16"),
]


# --scaling: the bytes a checkpointed training step adds per input voxel, in-plane size 128 to 384 (32
# slices), against MONAI's AHNet at the same sizes (issue 25: <= 0.15x MONAI's at 256, flat in size)
SCALING_SIZES = (128, 256, 384)
SCALING_SLICES = 32


def measure(shape, checkpoint, precision, impl="ahnet_fast"):
    """In a fresh process: the peak bytes of building the model and optimizer and running two training
    steps, over the process after its imports and the batch (what ``estimate.total`` predicts).
    impl "MONAI": MONAI's AHNet (no checkpoint policy), the same loss and optimizer."""
    import ahnet_fast

    torch.manual_seed(0)
    x = torch.randn(shape)
    y = torch.randint(0, 3, (shape[0], 1, *shape[2:]))
    loss_fn = ahnet_fast.FocalLoss(to_onehot_y=True, use_softmax=True)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = rss_bytes("VmRSS")
    if impl == "MONAI":
        from monai.networks.nets import AHNet as MonaiAHNet

        net = MonaiAHNet(in_channels=1, out_channels=3, psp_block_num=4)
    else:
        net = ahnet_fast.AHNet(in_channels=1, out_channels=3, psp_block_num=4, checkpoint=checkpoint)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = net(x)
        loss_fn(out.float(), y).backward()
        opt.step()

    if impl == "MONAI":
        ran = None
        step()
    else:
        _, ran = backends_that_ran(step)
    step()  # the second step has the gradients and Adam's moments from the first
    return {"peak": rss_bytes("VmHWM") - before, "backends": ran}


def _meta_model():
    """The model measure() builds, on the meta device: what the estimates and the parameter count need."""
    import ahnet_fast

    with torch.device("meta"):
        return ahnet_fast.AHNet(in_channels=1, out_channels=3, psp_block_num=4)


def _machine() -> str:
    import platform

    return f"{platform.machine()} ({os.cpu_count()} CPUs)"


def _mem_total() -> int:
    """The machine's RAM in bytes (/proc/meminfo's MemTotal)."""
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


class ChildFailed(RuntimeError):
    """The measuring process died; ``killed`` when by a signal (SIGKILL: the kernel's out-of-memory
    killer, the usual cause at the largest sizes)."""

    def __init__(self, returncode: int, stderr: str):
        self.killed = returncode < 0
        how = f"killed by signal {-returncode}" if self.killed else f"exit status {returncode}"
        super().__init__(f"the measuring process ended: {how}\n{stderr[-3000:]}")


def _child(shape, checkpoint, precision, impl="ahnet_fast") -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(list(shape)), checkpoint, precision, impl],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise ChildFailed(out.returncode, out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def scaling(json_path: str | None) -> list[dict]:
    """The per-voxel table: for each size, MONAI's step and ahnet_fast's with checkpoint="all" (and
    "none"), each in a fresh process; the step's bytes = measured peak - parameters, gradients and
    Adam's two moments (the same 38 M parameters in both), per input voxel."""
    from ahnet_fast.memory import estimate_training_memory

    model = _meta_model()
    fixed = sum(p.numel() for p in model.parameters()) * 4 * 4  # weights, gradients, two Adam moments
    rows = []
    print(f"{'input':>14} {'impl':>16} {'peak MiB':>9} {'step B/voxel':>13} {'vs MONAI':>9} {'estimate':>9}")
    for size in SCALING_SIZES:
        shape = (1, 1, size, size, SCALING_SLICES)
        voxels = size * size * SCALING_SLICES
        monai_step = None
        for impl, checkpoint in (("MONAI", "none"), ("ahnet_fast", "all"), ("ahnet_fast", "none")):
            peak = _child(shape, checkpoint, "fp32", impl)["peak"]
            per_voxel = (peak - fixed) / voxels
            monai_step = per_voxel if impl == "MONAI" else monai_step
            est = None if impl == "MONAI" else estimate_training_memory(model, shape, checkpoint=checkpoint).total
            rows.append(dict(shape=list(shape), impl=impl, checkpoint=checkpoint, peak=peak, fixed=fixed,
                             step_bytes_per_voxel=per_voxel, ratio_to_monai=per_voxel / monai_step, estimate=est))
            print(f"{'x'.join(map(str, shape[2:])):>14} {impl + ':' + checkpoint:>16} {peak / 2**20:9.0f} "
                  f"{per_voxel:13.0f} {per_voxel / monai_step:9.3f} "
                  f"{'' if est is None else f'{est / peak:.2f}x':>9}", flush=True)
    if json_path:
        from ahnet_fast._atomic import atomic_path

        with atomic_path(json_path) as tmp, open(tmp, "w") as f:
            json.dump(dict(run_info("cpu", _machine()), slices=SCALING_SLICES, results=rows), f, indent=1)
        print(f"wrote {json_path}")
    return rows


def single(size, checkpoint, precision, json_path):
    """One training-step measurement (batch 1), its estimate beside it: e.g. whether a whole
    512x512x256 CT slab trains in bf16 within 16 GiB (issue 25)."""
    import time

    from ahnet_fast.memory import estimate_training_memory

    shape = (1, 1, *size)
    model = _meta_model()
    est = estimate_training_memory(model, shape, dtype=precision, checkpoint=checkpoint)
    start = time.perf_counter()
    try:
        result = _child(shape, checkpoint, precision)
    except ChildFailed as e:
        if not e.killed:
            raise
        # recorded, not lost: a run the machine could not hold says so (its RAM is in run_info)
        result = {"peak": None, "backends": None, "failed": str(e).splitlines()[0]}
    record = dict(run_info("cpu", _machine()), memory_total=_mem_total(), shape=list(shape), checkpoint=checkpoint,
                  precision=precision, measured_step_peak=result["peak"], estimate=est.as_dict(), estimate_total=est.total,
                  seconds=time.perf_counter() - start, backends=result["backends"], failed=result.get("failed"))
    if result["peak"] is None:
        print(f"{'x'.join(map(str, shape))} checkpoint={checkpoint} {precision}: {record['failed']} after "
              f"{record['seconds']:.0f} s (estimated {est.total / 2**30:.2f} GiB)", flush=True)
        if json_path:
            from ahnet_fast._atomic import atomic_path

            with atomic_path(json_path) as tmp, open(tmp, "w") as f:
                json.dump(record, f, indent=1)
        return record
    print(f"{'x'.join(map(str, shape))} checkpoint={checkpoint} {precision}: measured {result['peak'] / 2**30:.2f} GiB "
          f"(model, Adam and two training steps), estimated {est.total / 2**30:.2f} GiB "
          f"({est.total / result['peak']:.2f}x), {record['seconds']:.0f} s", flush=True)
    if json_path:
        from ahnet_fast._atomic import atomic_path

        with atomic_path(json_path) as tmp, open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {json_path}")
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--configs", type=int, nargs="+", help="indices into CONFIGS (default: all)")
    parser.add_argument("--scaling", action="store_true",
                        help="the per-voxel table instead (checkpoint='all' vs MONAI, in-plane 128-384); "
                             "--json names its record")
    parser.add_argument("--single", type=int, nargs=3, metavar=("H", "W", "D"),
                        help="one configuration of this input size (batch 1) instead, with --checkpoint and "
                             "--precision; --json names its record")
    parser.add_argument("--checkpoint", default="all", choices=("none", "encoder", "decoder", "all"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        single(tuple(args.single), args.checkpoint, args.precision, args.json)
        return
    if args.one:
        shape, checkpoint, precision, impl = args.one
        print(json.dumps(measure(tuple(json.loads(shape)), checkpoint, precision, impl)))
        return
    if args.scaling:
        scaling(args.json)
        return
    from ahnet_fast.memory import estimate_training_memory

    model = _meta_model()
    lines = [f"# Memory planner vs measurement, CPU — {datetime.date.today()}, torch {torch.__version__}", "",
             "Peak memory of building AHNet + Adam and running two training steps (focal loss), over the process "
             "before the model existed, in a fresh process with MALLOC_MMAP_THRESHOLD_=65536; against "
             "`estimate_training_memory(...).total`.", "",
             "| input | checkpoint | precision | estimated MiB (params+grads+Adam / activations / workspace) | "
             "measured MiB | estimate / measured |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    records = []
    for i in args.configs or range(len(CONFIGS)):
        shape, checkpoint, precision = CONFIGS[i]
        est = estimate_training_memory(model, shape, dtype=precision, checkpoint=checkpoint)
        result = _child(shape, checkpoint, precision)
        measured = result["peak"]
        fixed = est.parameters + est.gradients + est.optimizer_state
        lines.append(f"| {'x'.join(map(str, shape))} | {checkpoint} | {precision} | {est.total / 2**20:.0f} "
                     f"({fixed / 2**20:.0f} / {est.activations / 2**20:.0f} / {est.workspace / 2**20:.0f}) | "
                     f"{measured / 2**20:.0f} | {est.total / measured:.2f} |")
        print(lines[-1], flush=True)
        records.append(dict(shape=list(shape), checkpoint=checkpoint, precision=precision, estimate=est.as_dict(),
                            measured_step_peak=measured, backends=result["backends"]))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            from ahnet_fast.memory import CALIBRATION_POINTS

            json.dump(dict(run_info("cpu", "cpu"), calibration_points=[list(p) for p in CALIBRATION_POINTS],
                           results=records), f, indent=1)


if __name__ == "__main__":
    main()
