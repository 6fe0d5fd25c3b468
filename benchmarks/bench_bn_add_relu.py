"""A bottleneck's tail, BatchNorm + residual sum + ReLU: ahnet_fast::bn_add_relu against PyTorch's
F.relu(F.batch_norm(x) + residual).

For the four bottleneck widths of AH-Net's encoder at a 1x1x128x128x32 input: median time of
forward+backward (training mode) and of the eval forward, as a ratio against PyTorch in the same
run; the bytes each saves for backward (saved_tensors_hooks); and the fused op's rate against its
minimum traffic (training forward: read x twice and the residual, write y = 4 tensor passes;
backward: read x, y and the gradient twice, write two gradients = 8 passes) next to the machine's
copy bandwidth measured in the same run.

    python benchmarks/bench_bn_add_relu.py [--repeats 9] [--out benchmarks/results/bn_add_relu_cpu.md]
"""
from __future__ import annotations

import argparse
import os
import platform

import torch
import torch.nn.functional as F

import ahnet_fast
from ahnet_fast.ops import bn_add_relu
from _common import finish_report, median_seconds  # benchmarks/ is the script's folder, first on sys.path
from bench_bn_relu import saved_bytes

# (name, shape): bn3's input in the bottlenecks of layer1..layer4 at 1x1x128x128x32
SHAPES = [
    ("layer1 bn3", (1, 256, 32, 32, 8)),
    ("layer2 bn3", (1, 512, 16, 16, 4)),
    ("layer3 bn3", (1, 1024, 8, 8, 2)),
    ("layer4 bn3", (1, 2048, 4, 4, 1)),
]


def bench(shape, layout, repeats):
    fmt = torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format
    c = shape[1]
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    r = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    w, b = (torch.rand(c) + 0.5).requires_grad_(), torch.randn(c).requires_grad_()
    rm, rv = torch.zeros(c), torch.ones(c)
    grad = torch.randn(shape).contiguous(memory_format=fmt)

    def torch_op(training):
        return F.relu(F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5) + r)

    def fused_op(training):
        return bn_add_relu(x, r, rm, rv, w, b, training, 0.1, 1e-5, backend="cpp")

    def step(f):
        return lambda: torch.autograd.backward(f(True), grad)

    def eval_fwd(f):
        def run():
            with torch.no_grad():
                f(False)
        return run

    dst = torch.empty_like(x)
    copy_t = median_seconds(lambda: dst.copy_(x.detach()), repeats)
    nbytes = x.numel() * x.element_size()
    out = {
        "train_torch": median_seconds(step(torch_op), repeats),
        "train_fused": median_seconds(step(fused_op), repeats),
        "eval_torch": median_seconds(eval_fwd(torch_op), repeats),
        "eval_fused": median_seconds(eval_fwd(fused_op), repeats),
        "saved_torch": saved_bytes(lambda: torch_op(True)),
        "saved_fused": saved_bytes(lambda: fused_op(True)),
        "copy_gbps": 2 * nbytes / copy_t / 1e9,
    }
    out["train_fused_gbps"] = 12 * nbytes / out["train_fused"] / 1e9
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    args = parser.parse_args()
    if not ahnet_fast.extension_available():
        raise SystemExit("the compiled extension is not built: nothing to benchmark")
    lines = [
        "# bn_add_relu on CPU: fused C++ kernel vs PyTorch (F.relu(F.batch_norm(x) + residual))",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; median of {args.repeats} runs; ratio = PyTorch time / fused time (same run). "
        "Fused GB/s: the training step's 12 minimum tensor passes over its time.",
        "",
        "| shape | layout | train fwd+bwd torch ms | fused ms | ratio | eval fwd torch ms | fused ms | ratio "
        "| saved for backward torch | fused | train fused GB/s | copy GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, shape in SHAPES:
        for layout in ("contiguous", "channels_last_3d"):
            r = bench(shape, layout, args.repeats)
            lines.append(
                f"| {name} {shape} | {layout} | {r['train_torch'] * 1e3:.2f} | {r['train_fused'] * 1e3:.2f} | "
                f"{r['train_torch'] / r['train_fused']:.2f}x | {r['eval_torch'] * 1e3:.2f} | "
                f"{r['eval_fused'] * 1e3:.2f} | {r['eval_torch'] / r['eval_fused']:.2f}x | "
                f"{r['saved_torch'] / 2**20:.1f} MiB | {r['saved_fused'] / 2**20:.1f} MiB | "
                f"{r['train_fused_gbps']:.1f} | {r['copy_gbps']:.1f} |")
            print(lines[-1], flush=True)
    finish_report(lines, args.out)


if __name__ == "__main__":
    main()
