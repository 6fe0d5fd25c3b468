"""Fused BatchNorm+ReLU (ahnet_fast::bn_relu) against PyTorch's F.batch_norm + F.relu.

For the BN-ReLU shapes AH-Net meets at a 1x1x128x128x32 input: median time of forward+backward
(training mode) and of the eval forward, as a ratio against PyTorch in the same run, plus the bytes
each path saves for backward (counted with saved_tensors_hooks) and the minimum traffic of the
fused op (bytes that must move) to say how close it gets to the machine's copy bandwidth,
measured in the same run with a tensor copy of the same size.

    python benchmarks/bench_bn_relu.py [--repeats 7] [--out benchmarks/results/bn_relu_cpu.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import torch
import torch.nn.functional as F

import ahnet_fast
from ahnet_fast.ops import bn_relu
from _common import finish_report, median_seconds  # benchmarks/ is the script's folder, first on sys.path

# (name, shape) of BN-ReLU inputs in AH-Net at 1x1x128x128x32
SHAPES = [
    ("stem bn0", (1, 64, 64, 64, 16)),
    ("layer1 bn2", (1, 64, 32, 32, 8)),
    ("dense4 bn2", (1, 80, 64, 64, 16)),
    ("final norm", (1, 128, 64, 64, 16)),
    ("dense0 bn1", (1, 1084, 8, 8, 2)),
]


def saved_bytes(fn):
    total = {"n": 0}

    def pack(t):
        total["n"] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total["n"]


def bench(shape, layout, repeats):
    fmt = torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format
    c = shape[1]
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    w, b = (torch.rand(c) + 0.5).requires_grad_(), torch.randn(c).requires_grad_()
    rm, rv = torch.zeros(c), torch.ones(c)
    grad = torch.randn(shape).contiguous(memory_format=fmt)

    def torch_train():
        return F.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))

    def fused_train():
        return bn_relu(x, rm, rv, w, b, True, 0.1, 1e-5, backend="cpp")

    def step(f):
        def run():
            y = f()
            torch.autograd.backward(y, grad)
        return run

    def eval_fwd(f_name):
        def run():
            with torch.no_grad():
                if f_name == "torch":
                    F.relu(F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5))
                else:
                    bn_relu(x, rm, rv, w, b, False, 0.1, 1e-5, backend="cpp")
        return run

    dst = torch.empty_like(x)
    copy_t = median_seconds(lambda: dst.copy_(x.detach()), repeats)
    nbytes = x.numel() * x.element_size()
    out = {
        "train_torch": median_seconds(step(torch_train), repeats),
        "train_fused": median_seconds(step(fused_train), repeats),
        "eval_torch": median_seconds(eval_fwd("torch"), repeats),
        "eval_fused": median_seconds(eval_fwd("fused"), repeats),
        "saved_torch": saved_bytes(torch_train),
        "saved_fused": saved_bytes(fused_train),
        "copy_gbps": 2 * nbytes / copy_t / 1e9,
        # eval forward: read x, write y = 2 tensor passes at least
        "eval_fused_gbps": 2 * nbytes / 1e9,
    }
    out["eval_fused_gbps"] /= out["eval_fused"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    args = parser.parse_args()
    if not ahnet_fast.extension_available():
        raise SystemExit("the compiled extension is not built: nothing to benchmark")
    lines = [
        "# bn_relu on CPU: fused C++ kernel vs PyTorch (F.batch_norm + F.relu)",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; median of {args.repeats} runs; ratio = PyTorch time / fused time (same run).",
        "",
        "| shape | layout | train fwd+bwd torch ms | fused ms | ratio | eval fwd torch ms | fused ms | ratio "
        "| saved for backward torch | fused | eval fused GB/s | copy GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, shape in SHAPES:
        for layout in ("contiguous", "channels_last_3d"):
            r = bench(shape, layout, args.repeats)
            lines.append(
                f"| {name} {shape} | {layout} | {r['train_torch'] * 1e3:.1f} | {r['train_fused'] * 1e3:.1f} | "
                f"{r['train_torch'] / r['train_fused']:.2f}x | {r['eval_torch'] * 1e3:.1f} | {r['eval_fused'] * 1e3:.1f} | "
                f"{r['eval_torch'] / r['eval_fused']:.2f}x | {r['saved_torch'] / 2**20:.1f} MiB | "
                f"{r['saved_fused'] / 2**20:.1f} MiB | {r['eval_fused_gbps']:.1f} | {r['copy_gbps']:.1f} |")
            print(lines[-1], flush=True)
    finish_report(lines, args.out)


if __name__ == "__main__":
    main()
