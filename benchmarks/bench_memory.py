"""The memory planner against measurement: estimated vs measured peak of AH-Net training.

For each configuration (input shape, checkpoint policy, precision), a fresh process with glibc's
mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=65536) creates the batch, resets its high-water mark
(/proc/self/clear_refs), then builds AHNet (MONAI's defaults, 3 classes) and Adam and runs two
training steps (the second one with the gradients and Adam's moments of the first). Measured = VmHWM
minus the RSS before the model existed; compared with ``estimate_training_memory(...).total``
(parameters + gradients + optimizer state + activations + workspace).

    python benchmarks/bench_memory.py [--out benchmarks/results/memory_cpu.md] [--json PATH]
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


def measure(shape, checkpoint, precision):
    """In a fresh process: the peak bytes of building the model and optimizer and running two training
    steps, over the process after its imports and the batch (what ``estimate.total`` predicts)."""
    import ahnet_fast

    torch.manual_seed(0)
    x = torch.randn(shape)
    y = torch.randint(0, 3, (shape[0], 1, *shape[2:]))
    loss_fn = ahnet_fast.FocalLoss(to_onehot_y=True, use_softmax=True)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = rss_bytes("VmRSS")
    net = ahnet_fast.AHNet(in_channels=1, out_channels=3, psp_block_num=4, checkpoint=checkpoint)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = net(x)
        loss_fn(out.float(), y).backward()
        opt.step()

    _, ran = backends_that_ran(step)
    step()  # the second step has the gradients and Adam's moments from the first
    return {"peak": rss_bytes("VmHWM") - before, "backends": ran}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--configs", type=int, nargs="+", help="indices into CONFIGS (default: all)")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        shape, checkpoint, precision = args.one
        print(json.dumps(measure(tuple(json.loads(shape)), checkpoint, precision)))
        return
    import ahnet_fast
    from ahnet_fast.memory import estimate_training_memory

    with torch.device("meta"):
        model = ahnet_fast.AHNet(in_channels=1, out_channels=3, psp_block_num=4)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
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
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(list(shape)), checkpoint, precision],
                             capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        result = json.loads(out.stdout.strip().splitlines()[-1])
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
