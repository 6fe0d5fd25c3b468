"""Focal loss forward+backward: fused C++ kernel vs the PyTorch reference vs MONAI's FocalLoss.

Time: median of several runs in one process, ratio against MONAI in the same run. Peak memory: each
(implementation, case) in a fresh process with glibc's mmap threshold fixed
(MALLOC_MMAP_THRESHOLD_=65536, so freed blocks go back to the system and VmHWM is honest), the
high-water mark reset after the inputs exist (/proc/self/clear_refs), then VmHWM minus the RSS
before the step: the extra memory the loss needs, to compare with one logits-sized tensor.
Also: the minimum bytes the loss must move (read logits + labels, write the gradient) over the
fused time, against a same-size tensor copy in the same run.

    python benchmarks/bench_focal_loss.py [--repeats 5] [--out benchmarks/results/focal_loss_cpu.md]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
from _common import finish_report, median_seconds, rss_bytes  # benchmarks/ is the script's folder, first on sys.path

CASES = [  # (shape, softmax, target kind)
    ((2, 3, 192, 192, 64), True, "labels"),
    ((2, 3, 192, 192, 64), False, "labels"),
    ((1, 8, 128, 128, 64), True, "labels"),
    ((1, 8, 128, 128, 64), True, "onehot"),
]
IMPLS = ("MONAI", "reference", "fused")


def make(shape, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).requires_grad_()
    labels = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    if kind == "labels":
        return x, labels, labels.unsqueeze(1).float()
    onehot = torch.nn.functional.one_hot(labels, shape[1]).movedim(-1, 1).float()
    return x, onehot, onehot


def loss_fn(impl, softmax, kind):
    if impl == "MONAI":  # MONAI one-hots a label map itself (to_onehot_y=True)
        from monai.losses import FocalLoss

        m = FocalLoss(use_softmax=softmax, to_onehot_y=kind == "labels")
        return lambda x, t_ours, t_monai: m(x, t_monai)
    import ahnet_fast

    backend = "cpp" if impl == "fused" else "reference"
    f = ahnet_fast.FocalLoss(use_softmax=softmax, backend=backend)
    return lambda x, t_ours, t_monai: f(x, t_ours)


def step(f, x, t_ours, t_monai):
    x.grad = None
    f(x, t_ours, t_monai).backward()


def measure_peak(impl, shape, softmax, kind):
    """Run in a fresh process (see main): extra peak memory of one forward+backward."""
    x, t_ours, t_monai = make(shape, kind)
    f = loss_fn(impl, softmax, kind)
    step(f, x, t_ours, t_monai)  # warm-up, so one-time allocations are not counted
    x.grad = None
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = rss_bytes("VmRSS")
    step(f, x, t_ours, t_monai)
    return rss_bytes("VmHWM") - before


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--peak", nargs=4, help=argparse.SUPPRESS)  # internal: impl shape softmax kind
    args = parser.parse_args()
    if args.peak:
        impl, shape, softmax, kind = args.peak
        print(json.dumps(measure_peak(impl, tuple(json.loads(shape)), softmax == "1", kind)))
        return
    lines = ["# Focal loss forward+backward on CPU: fused C++ kernel vs PyTorch reference vs MONAI", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} runs; "
             "speed-up = MONAI time / time (same run); extra peak = VmHWM - RSS in a fresh process "
             "(MALLOC_MMAP_THRESHOLD_=65536), in units of one logits-sized fp32 tensor.", "",
             "| case | impl | ms | speed-up vs MONAI | extra peak | extra peak / logits | fused GB/s (min bytes) | copy GB/s |",
             "|---|---|---|---|---|---|---|---|"]
    for shape, softmax, kind in CASES:
        x, t_ours, t_monai = make(shape, kind)
        times = {}
        for impl in IMPLS:
            f = loss_fn(impl, softmax, kind)
            times[impl] = median_seconds(lambda: step(f, x, t_ours, t_monai), args.repeats)
        dst, src = torch.empty_like(x), x.detach()
        logits_bytes = x.numel() * 4
        copy_gbps = 2 * logits_bytes / median_seconds(lambda: dst.copy_(src), args.repeats) / 1e9
        min_bytes = 2 * logits_bytes + t_ours.numel() * t_ours.element_size()  # read x, t; write grad
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        case = f"{tuple(shape)} {'softmax' if softmax else 'sigmoid'} {kind}"
        for impl in IMPLS:
            out = subprocess.run([sys.executable, __file__, "--peak", impl, json.dumps(list(shape)),
                                  "1" if softmax else "0", kind], capture_output=True, text=True, env=env, check=True)
            peak = json.loads(out.stdout.strip().splitlines()[-1])
            gbps = f"{min_bytes / times[impl] / 1e9:.1f}" if impl == "fused" else ""
            lines.append(f"| {case} | {impl} | {times[impl] * 1e3:.0f} | {times['MONAI'] / times[impl]:.1f}x | "
                         f"{peak / 2**20:.0f} MiB | {peak / logits_bytes:.2f} | {gbps} | {copy_gbps:.1f} |")
            print(lines[-1], flush=True)
    finish_report(lines, args.out)


if __name__ == "__main__":
    main()
