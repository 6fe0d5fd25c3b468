"""Every 1x1x1 / 3x3x1 / 1x1x3 convolution AH-Net runs (and the stem's 7x7x3 conv1), timed through each
path that can compute it.

The shapes are listed from the model itself (forward hooks on a meta-device AHNet with MONAI's
defaults, 3 output classes) at a 1x1x128x128x32 input, and with --large also at 1x1x512x512x64. For
each distinct shape: forward and backward (input + weight gradient) median times of every
candidate path of ``ahnet_fast.ops.aniso_conv`` (CPU: aten = oneDNN / unfold, matmul (strided 1x1x1:
``aniso_conv.pointwise_conv``), shift, folded, slice_fold (conv1's slice taps as 2D input channels); CUDA: aten = cuDNN conv3d, folded = cuDNN conv2d over a folded view, triton), the path the
static rule picks, the FLOPs, and the rate of the fastest path against the machine's matmul peak
measured in the same run.

    python benchmarks/bench_aniso_conv.py [--large] [--device cpu|cuda] [--repeats 3]
        [--out benchmarks/results/aniso_conv_cpu.md] [--json PATH]
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import platform

import torch
from _common import finish_report, median_seconds  # benchmarks/ is the script's folder, first on sys.path

from ahnet_fast import AHNet
from ahnet_fast.ops import aniso_conv, _conv_paths as conv_paths
from ahnet_fast.ops.pointwise_conv import pointwise_conv

KERNELS = ((1, 1, 1), (3, 3, 1), (1, 1, 3), (7, 7, 3))
COLUMNS = ("aten", "matmul", "shift", "folded", "slice_fold", "triton")


def conv_shapes(size, out_channels=3):
    """Counter of (input shape, weight shape, stride, padding) over the model's 1x1x1 / 3x3x1 / 1x1x3
    convolutions: the reference backend on meta tensors, every aten.convolution call recorded."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = collections.Counter()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default:
                x, w, _, stride, padding, _, transposed = args[:7]
                if not transposed and tuple(w.shape[2:]) in KERNELS:
                    seen[(tuple(x.shape), tuple(w.shape), tuple(stride), tuple(padding))] += 1
            return func(*args, **(kwargs or {}))

    with torch.device("meta"):
        model = AHNet(in_channels=1, out_channels=out_channels, psp_block_num=4, backend="reference")
    with Record(), torch.no_grad():
        model(torch.empty(1, 1, *size, device="meta"))
    return seen


def flops(x_shape, w_shape, stride):
    out = [(n + s - 1) // s for n, s in zip(x_shape[2:], stride)]
    positions = x_shape[0] * out[0] * out[1] * out[2]
    return 2 * positions * w_shape[0] * w_shape[1] * w_shape[2] * w_shape[3] * w_shape[4]


def matmul_peak(device):
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    return 2 * n ** 3 / median_seconds(lambda: a @ b, 3, sync=sync)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", action="store_true", help="also the shapes of a 512x512x64 input")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--max-shapes", type=int, default=None, help="only the N most expensive shapes per size")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    peak = matmul_peak(device)
    lines = [f"# AH-Net's anisotropic convolutions, per path — {datetime.date.today()}, {name}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, fp32", "",
             f"Matmul peak measured in this run: {peak / 1e9:.0f} GFLOP/s. Times: median of {args.repeats}, ms, forward / "
             "backward (input + weight gradient). 'rule' = the path the static rule picks (no measuring).", "",
             "| input | x | weight | stride | count | GFLOP fwd | " +
             " | ".join(f"{p} fwd / bwd" for p in COLUMNS) +
             " | rule fwd / bwd | best vs aten (fwd+bwd) | best % of peak |",
             "|---|---|---|---|---|---|" + "---|" * len(COLUMNS) + "---|---|---|"]
    print("\n".join(lines), flush=True)
    records = []
    sizes = [(128, 128, 32)] + ([(512, 512, 64)] if args.large else [])
    for size in sizes:
        shapes = sorted(conv_shapes(size).items(), key=lambda kv: -flops(*kv[0][:3]))[:args.max_shapes]
        for (xs, ws, stride, padding), count in shapes:
            x = torch.randn(xs, device=device)
            w = torch.randn(ws, device=device) * 0.05
            stride, padding = list(stride), list(padding)
            g = conv_paths.forward("aten", x, w, stride, padding).normal_()
            paths = aniso_conv.candidates(x, w, stride, padding)
            times = {}
            for path in paths:
                tf = median_seconds(lambda: conv_paths.forward(path, x, w, stride, padding), args.repeats, sync=sync)
                tb = median_seconds(lambda: conv_paths.backward(path, g, x, w, stride, padding), args.repeats,
                                    sync=sync)
                times[path] = (tf, tb)
            pointwise = all(k == 1 for k in ws[2:]) and not any(padding)
            if pointwise and "matmul" not in times and device.type == "cpu":  # (CUDA: pointwise_conv is cuDNN)
                # a strided 1x1x1 (the encoder's downsampling): aniso_conv.pointwise_conv's matrix product
                # on the subsampled input, backward through its autograd
                tf = median_seconds(lambda: pointwise_conv(x, w, None, stride), args.repeats, sync=sync)
                xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
                y = pointwise_conv(xr, wr, None, stride)
                tb = median_seconds(lambda: torch.autograd.grad(y, (xr, wr), g, retain_graph=True), args.repeats,
                                    sync=sync)
                times["matmul"] = (tf, tb)
                del xr, wr, y
            if device.type == "cuda" and tuple(ws[2:]) != (7, 7, 3):  # the Triton kernels: the decoder's shapes
                from ahnet_fast.kernels.triton import aniso_conv as kernels

                tf = median_seconds(lambda: kernels.conv_forward(x, w, None, None, tuple(stride), tuple(padding),
                                                                 precision="tf32"), args.repeats, sync=sync)
                tb = median_seconds(lambda: (kernels.conv_input_grad(g, w, tuple(x.shape), tuple(stride),
                                                                     tuple(padding), precision="tf32"),
                                             kernels.conv_weight_grad(x, g, None, None, tuple(w.shape), tuple(stride),
                                                                      tuple(padding), precision="tf32")),
                                    args.repeats, sync=sync)
                times["triton"] = (tf, tb)
            aniso_conv.set_tuning(False)
            rule = (aniso_conv.rule("forward", x, w, paths), aniso_conv.rule("backward", x, w, paths))
            if pointwise and device.type == "cpu":  # the model calls pointwise_conv: matmul on CPU, any stride
                rule = ("matmul", "matmul")
            best = min(sum(t) for t in times.values())
            fl = flops(xs, ws, stride)
            cells = [f"{times[p][0] * 1e3:.2f} / {times[p][1] * 1e3:.2f}" if p in times else "—"
                     for p in COLUMNS]
            lines.append(f"| {size} | {xs} | {ws} | {tuple(stride)} | {count} | {fl / 1e9:.3f} | " + " | ".join(cells) +
                         f" | {rule[0]} / {rule[1]} | {sum(times['aten']) / best:.2f}x | "
                         f"{3 * fl / best / peak * 100:.0f}% |")
            print(lines[-1], flush=True)
            records.append(dict(input=list(size), x=list(xs), weight=list(ws), stride=stride, count=count,
                                gflop_forward=fl / 1e9, ms={p: [t[0] * 1e3, t[1] * 1e3] for p, t in times.items()},
                                rule=list(rule)))
            del x, w, g
            # written after every shape: a time cap on a lent GPU still leaves what was measured
            finish_report(lines, args.out)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(dict(device=name, torch=torch.__version__, date=str(datetime.date.today()),
                                   matmul_peak_gflops=peak / 1e9, shapes=records), f, indent=1)


if __name__ == "__main__":
    main()
