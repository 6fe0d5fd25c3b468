"""AH-Net's decoder dense blocks: bytes kept for backward and time, one-buffer op vs eager layers.

The five blocks of AH-Net (3 pseudo-3D layers, growth 20, bottleneck 80) at the shapes the model
gives them for a 1x1x128x128x32 input (and, with --large, for 1x1x256x256x32). Three
implementations, the same parameters, in one run:

- MONAI: ``monai.networks.nets.ahnet.DenseBlock`` (eager: a new concatenation per layer, every
  BatchNorm output kept) — when MONAI is installed;
- layers: ahnet_fast's layers one by one (BN-ReLU-conv units that keep only their input, but a new
  concatenation per layer) — ``Pseudo3DLayer`` called in sequence;
- block: ``ahnet_fast.ops.dense_block`` as AHNet runs it by default (one concatenation buffer,
  activations recomputed, each layer's bottleneck output c1 kept);
- block-lean: the same inside activation checkpointing (c1 recomputed too).

Saved bytes: distinct storages autograd keeps (torch.autograd.graph.saved_tensors_hooks), the
parameters not counted (they exist either way). Time: median forward+backward.

    python benchmarks/bench_dense_block.py [--repeats 5] [--large] [--out benchmarks/results/dense_block_cpu.md]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch
from _common import backends_that_ran, finish_report, median_seconds, run_info, saved_bytes  # benchmarks/ is the script's folder, first on sys.path

from ahnet_fast.nn._checkpoint import prefer_recomputation
from ahnet_fast.nn.ahnet import DenseBlock

# (name, input channels, spatial size) at a 128x128x32 input; the in-plane sizes double with --large
BLOCKS = (("dense0", 1024, (8, 8, 2)), ("dense1", 512, (16, 16, 4)), ("dense2", 256, (32, 32, 8)),
          ("dense3", 64, (32, 32, 8)), ("dense4", 64, (64, 64, 16)))


def make(channels):
    torch.manual_seed(0)
    ours = DenseBlock(3, 3, channels, 4, 20, 0.0)
    impls = {}
    try:
        from monai.networks.nets.ahnet import DenseBlock as MonaiDenseBlock

        theirs = MonaiDenseBlock(3, 3, channels, 4, 20, 0.0)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        impls["MONAI"] = theirs
    except ImportError:
        pass

    def layers(x):
        for layer in ours:
            x = layer(x)
        return x

    impls["layers"] = layers
    impls["block"] = ours

    def lean(x):
        with prefer_recomputation():
            return ours(x)

    impls["block-lean"] = lean
    return impls, list(ours.parameters()) + list(impls["MONAI"].parameters() if "MONAI" in impls else [])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--large", action="store_true", help="also the blocks of a 1x1x256x256x32 input")
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    lines = [f"# Dense blocks (3 layers, growth 20), CPU fp32 — {datetime.date.today()}, {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads", "",
             "| block | input | impl | saved for backward (MiB) | saved vs MONAI | forward+backward (ms) | speed vs MONAI |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    scales = (1, 2) if args.large else (1,)
    records = []
    for scale in scales:
        for name, channels, (h, w, d) in BLOCKS:
            shape = (1, channels, h * scale, w * scale, d)
            impls, params = make(channels)
            x = torch.randn(shape).requires_grad_()
            grad = torch.randn(1, channels + 60, *shape[2:])
            rows = {}
            ran_by_impl = {}
            for impl, f in impls.items():
                saved, _ = saved_bytes(lambda: f(x), exclude=params)
                # which backend ran each ahnet_fast op (empty for MONAI's block)
                _, ran_by_impl[impl] = backends_that_ran(lambda: f(x).backward(grad))

                def step():
                    x.grad = None
                    f(x).backward(grad)

                rows[impl] = (saved, median_seconds(step, args.repeats))
            base = rows.get("MONAI", rows["layers"])
            records.extend(dict(block=name, shape=list(shape), impl=impl, saved_bytes=saved, ms=t * 1e3,
                                backends=ran_by_impl[impl] or None) for impl, (saved, t) in rows.items())
            for impl, (saved, t) in rows.items():
                lines.append(f"| {name} | {shape} | {impl} | {saved / 2**20:.1f} | {saved / base[0]:.2f}x | "
                             f"{t * 1e3:.1f} | {base[1] / t:.2f}x |")
                print(lines[-1], flush=True)
    finish_report(lines, args.out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(run_info("cpu", platform.processor() or platform.machine()), results=records), f, indent=1)


if __name__ == "__main__":
    main()
