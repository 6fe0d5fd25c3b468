"""Pyramid volumetric pooling forward+backward on CPU: fused C++ kernels vs the PyTorch reference vs MONAI's PSP.

Two uses are timed: the PSP alone (B, levels, ...), and the PSP with the concatenation AH-Net does
next, ``cat([psp(d4), d4], 1)`` (MONAI: PSP then torch.cat; ours: ``concat_input=True``, one buffer).
Time: median of several runs in one process, the upstream gradient allocated beforehand, ratio
against MONAI in the same run. Saved for backward: bytes of the distinct storages the autograd
graph keeps (torch.autograd.graph.saved_tensors_hooks), and of those how many are int64. Peak
memory: each (implementation, case) in a fresh process with glibc's mmap threshold fixed
(MALLOC_MMAP_THRESHOLD_=65536), the high-water mark reset after the inputs exist
(/proc/self/clear_refs), VmHWM minus the RSS before the step, in units of the input's size.
Bandwidth: the minimum bytes of the fused forward+backward (read x, write the output; read the
output's gradient, write x's gradient) over its time, against a copy of x into an existing
tensor and into a freshly allocated one, measured in the same run.

    python benchmarks/bench_pyramid_pool.py [--repeats 5] [--out benchmarks/results/pyramid_pool_cpu.md]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
from _common import finish_report, median_seconds, rss_bytes, saved_bytes  # benchmarks/ is the script's folder, first on sys.path

# (shape of the PSP input d4, upsample mode, where AH-Net meets it)
CASES = [
    ((1, 124, 64, 64, 16), "transpose", "AHNet input 1x1x128x128x32"),
    ((2, 124, 64, 64, 16), "transpose", "AHNet input 2x1x128x128x32"),
    ((1, 124, 128, 128, 32), "transpose", "AHNet input 1x1x256x256x64 (the issue's size)"),
    ((1, 124, 128, 128, 32), "trilinear", "same, interpolation mode"),
    ((1, 124, 256, 256, 32), "transpose", "AHNet input 1x1x512x512x64"),
]
IMPLS = ("MONAI", "reference", "fused")


def make_modules(mode, channels, seed=0):
    import ahnet_fast
    from monai.networks.nets.ahnet import PSP

    torch.manual_seed(seed)
    theirs = PSP(3, 4, channels, mode)
    ours = ahnet_fast.PyramidVolumetricPooling(3, 4, channels, mode)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def forward_fn(impl, concat, theirs, ours):
    if impl == "MONAI":
        return (lambda x: torch.cat((theirs(x), x), 1)) if concat else theirs
    ours.backend = "cpp" if impl == "fused" else "reference"
    return lambda x: ours(x, concat_input=concat)


def step(f, x, grad):
    x.grad = None
    f(x).backward(grad)


def measure_peak(impl, shape, mode, concat):
    """Run in a fresh process (see main): extra peak memory of one forward+backward."""
    theirs, ours = make_modules(mode, shape[1])
    f = forward_fn(impl, concat, theirs, ours)
    x = torch.randn(shape).requires_grad_()
    grad = torch.randn(f(x).shape)
    step(f, x, grad)  # warm-up
    x.grad = None
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = rss_bytes("VmRSS")
    step(f, x, grad)
    return rss_bytes("VmHWM") - before


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="only the first case (a smoke test)")
    parser.add_argument("--cases", type=int, nargs="+", help="indices into CASES to run (default: all)")
    parser.add_argument("--peak", nargs=4, help=argparse.SUPPRESS)  # internal: impl shape mode concat
    args = parser.parse_args()
    if args.peak:
        impl, shape, mode, concat = args.peak
        print(json.dumps(measure_peak(impl, tuple(json.loads(shape)), mode, concat == "1")))
        return
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "0")
    lines = ["# Pyramid volumetric pooling forward+backward on CPU: fused C++ vs PyTorch reference vs MONAI's PSP", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, THP_MEM_ALLOC_ENABLE={thp}; median of "
             f"{args.repeats} runs; speed-up = MONAI time / time (same run). 'PSP' = the pooling alone; "
             "'PSP+cat' = cat([psp(x), x], 1) as AH-Net uses it. saved = bytes kept for backward (int64 part in "
             "brackets); extra peak = VmHWM - RSS in a fresh process (MALLOC_MMAP_THRESHOLD_=65536), in units of "
             "the input's size. GB/s: minimum bytes of the fused step over its time; copy: x copied into an "
             "existing / a fresh tensor.", "",
             "| input | mode | use | impl | ms | speed-up vs MONAI | saved MiB (int64) | extra peak / input | "
             "GB/s (min bytes) | copy GB/s existing / fresh |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    cases = CASES[:1] if args.quick else [CASES[i] for i in args.cases] if args.cases else CASES
    for shape, mode, where in cases:
        theirs, ours = make_modules(mode, shape[1])
        x = torch.randn(shape).requires_grad_()
        in_bytes = x.numel() * 4
        big = x.numel() >= 2e8
        repeats = max(2, args.repeats // 2) if big else args.repeats
        dst = torch.empty_like(x)
        src = x.detach()
        copy_existing = 2 * in_bytes / median_seconds(lambda: dst.copy_(src), repeats) / 1e9
        copy_fresh = 2 * in_bytes / median_seconds(lambda: src.clone(), repeats) / 1e9
        del dst
        for concat in (False, True):
            times = {}
            for impl in IMPLS:
                f = forward_fn(impl, concat, theirs, ours)
                with torch.no_grad():
                    grad = torch.randn(f(x).shape)
                times[impl] = median_seconds(lambda: step(f, x, grad), repeats)
                del grad
            out_bytes = (4 + (shape[1] if concat else 0)) * in_bytes // shape[1]
            # forward: read x, write the output; backward: read its gradient, write x's gradient
            min_bytes = in_bytes + out_bytes + out_bytes + in_bytes
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            for impl in IMPLS:
                f = forward_fn(impl, concat, theirs, ours)
                saved, saved64 = saved_bytes(lambda: f(x))
                if big and impl != "fused":
                    peak_txt = "not measured (size)"
                else:
                    out = subprocess.run([sys.executable, __file__, "--peak", impl, json.dumps(list(shape)), mode,
                                          "1" if concat else "0"], capture_output=True, text=True, env=env, check=True)
                    peak_txt = f"{json.loads(out.stdout.strip().splitlines()[-1]) / in_bytes:.2f}"
                gbps = f"{min_bytes / times[impl] / 1e9:.1f}" if impl == "fused" else ""
                lines.append(f"| {tuple(shape)} ({where}) | {mode} | {'PSP+cat' if concat else 'PSP'} | {impl} | "
                             f"{times[impl] * 1e3:.0f} | {times['MONAI'] / times[impl]:.1f}x | "
                             f"{saved / 2**20:.1f} ({saved64 / 2**20:.1f}) | {peak_txt} | {gbps} | "
                             f"{copy_existing:.1f} / {copy_fresh:.1f} |")
                print(lines[-1], flush=True)
    finish_report(lines, args.out)


if __name__ == "__main__":
    main()
