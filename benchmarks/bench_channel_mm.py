"""The matrix products of an AH-Net step on CPU: torch.mm (MKL) against ahnet_fast's kernels
(channel_mm_: weight @ act(x); channel_mm_nt_: the weight gradients, a @ b^T over the voxels;
channel_mm_conv_: a 3x3x1 / 1x1x3 convolution as one product over its taps, and channel_mm_nt_conv_ its
weight gradient, against torch's own convolution and its backward, oneDNN).

Every product a training step and an inference forward make at 1x1xSIZE (default 128x128x32) is
recorded with its shape and whether a BatchNorm-ReLU is applied to its input as it is read; each
distinct shape is then timed both ways, the same operands, medians of --repeats: torch.mm into a
preallocated output (plus, where the kernel applies a BatchNorm-ReLU, the separate activation pass
the product would otherwise need) against the kernel the dispatch sent it to. Products the dispatch
left to torch.mm (below the kernels' thresholds) are timed on torch.mm only. The totals weigh each
shape by how often a step makes it. Rates are judged against two ceilings measured in the same
run: torch.mm's on a 2048^3 product (on AMD CPUs MKL runs its AVX2 code) and the kernel's own on a
2048 x 2048 x 2048 product (the AVX-512 rate a large square product reaches here).

    python benchmarks/bench_channel_mm.py [--size 128 128 32] [--repeats 15] [--json PATH]
"""
from __future__ import annotations

import argparse
import collections
import datetime
import math
import os
import platform
import sys

import torch
from _common import median_seconds, run_info, write_json  # benchmarks/ is the script's folder, first on sys.path

from ahnet_fast.ops import channel_mm


def step_products(size) -> dict:
    """{(mode, kind, M, K, N, act, geometry): count} over one training step and one inference forward.
    kind "mm": out = weight (M, K) @ act(x) (K, N) on channel_mm_; "nt": out (M, K) = a (M, N) @ b (K, N)^T
    on channel_mm_nt_ (weight gradients, N the voxels); "conv": channel_mm_conv_, M output channels, K =
    input channels x taps, N voxels, geometry = (kernel, spatial sizes); "nt_conv": that convolution's
    weight gradient on channel_mm_nt_conv_ (M output channels, K input channels x taps, N voxels);
    "torch": a product left to
    torch.mm (below the kernels' thresholds, another dtype or layout), timed as (M, K) @ (K, N).
    Recorded by the profiler with shapes (and the convolution's sizes, a list argument)."""
    from torch.profiler import ProfilerActivity, profile

    from ahnet_fast import AHNet

    torch.manual_seed(0)
    net = AHNet(spatial_dims=3, in_channels=1, out_channels=3, psp_block_num=4)
    x = torch.randn(1, 1, *size)
    label = torch.randint(0, 3, (1, *size))
    counts = collections.Counter()
    for mode in ("train", "infer"):
        def step():
            if mode == "infer":
                net.eval()
                with torch.no_grad():
                    net(x)
            else:
                net.train()
                torch.nn.functional.cross_entropy(net(x), label).backward()
        step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
        for e in prof.events():
            shapes = e.input_shapes
            if e.name == "ahnet_fast::channel_mm_":  # (out, weight, x, scale, shift, accumulate)
                (m, k), n = shapes[1], shapes[2][1]
                counts[(mode, "mm", m, k, n, bool(shapes[3]), None)] += 1
            elif e.name == "ahnet_fast::channel_mm_conv_":  # (out, weight, x, spatial, scale, shift, accumulate)
                weight, spatial = shapes[1], tuple(e.concrete_inputs[3])
                k = weight[1] * math.prod(weight[2:])
                counts[(mode, "conv", weight[0], k, shapes[2][1], bool(shapes[4]), (tuple(weight[2:]), spatial))] += 1
            elif e.name == "ahnet_fast::channel_mm_nt_conv_":  # (out (Co, Ci * T), a (Co, S), x (Ci, S), spatial, kernel, acc)
                spatial, kernel = tuple(e.concrete_inputs[3]), tuple(e.concrete_inputs[4])
                counts[(mode, "nt_conv", shapes[0][0], shapes[0][1], shapes[1][1], False, (kernel, spatial))] += 1
            elif e.name == "ahnet_fast::channel_mm_nt_":  # (out, a, b, accumulate)
                (m, n), k = shapes[1], shapes[2][0]
                counts[(mode, "nt", m, k, n, False, None)] += 1
            elif e.name == "aten::mm" and len(shapes) >= 2 and len(shapes[0]) == 2 and len(shapes[1]) == 2:
                (m, k), n = shapes[0], shapes[1][1]
                counts[(mode, "torch", m, k, n, False, None)] += 1
    return counts


def time_shape(kind, m, k, n, act, repeats, geometry=None):
    """(torch seconds, kernel seconds or None, the kernel's relative error against float64). torch:
    torch.mm, or for a convolution torch's conv (oneDNN), each with the activation pass where the
    kernel applies one as it reads."""
    g = torch.Generator().manual_seed(0)
    if kind == "conv":
        return _time_conv(m, k, n, act, repeats, geometry, g)
    if kind == "nt_conv":
        return _time_conv_weight_grad(m, k, n, repeats, geometry, g)
    if kind == "nt":
        a, b, out = torch.randn(m, n, generator=g), torch.randn(k, n, generator=g), torch.empty(m, k)
        t_mkl = median_seconds(lambda: torch.mm(a, b.t(), out=out), repeats)
        t_kernel = median_seconds(lambda: torch.ops.ahnet_fast.channel_mm_nt_(out, a, b, False), repeats)
        expected = a.double() @ b.double().t()
        return t_mkl, t_kernel, ((out.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()
    w, x, out = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g), torch.empty(m, n)
    scale = torch.rand(k, generator=g) + 0.5 if act else None
    shift = torch.randn(k, generator=g) if act else None
    activated = torch.empty_like(x)

    def mkl():
        if act:
            torch.addcmul(shift.view(-1, 1), x, scale.view(-1, 1), out=activated).relu_()
            torch.mm(w, activated, out=out)
        else:
            torch.mm(w, x, out=out)

    t_mkl = median_seconds(mkl, repeats)
    if kind == "torch":
        return t_mkl, None, None
    t_kernel = median_seconds(lambda: torch.ops.ahnet_fast.channel_mm_(out, w, x, scale, shift, False), repeats)
    expected = channel_mm.channel_mm_reference(w.double(), x.double(), None if scale is None else scale.double(),
                                               None if shift is None else shift.double())
    return t_mkl, t_kernel, ((out.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _time_conv(m, k, n, act, repeats, geometry, g):
    kernel, spatial = geometry
    ci = k // math.prod(kernel)
    w, x = torch.randn(m, ci, *kernel, generator=g), torch.randn(1, ci, *spatial, generator=g)
    scale = torch.rand(ci, generator=g) + 0.5 if act else None
    shift = torch.randn(ci, generator=g) if act else None
    conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)[len(spatial) - 1]
    padding = [(s - 1) // 2 for s in kernel]
    activated = torch.empty_like(x)
    out = torch.empty(m, n)
    view = (1, -1) + (1,) * len(spatial)

    def torch_conv():
        a = torch.addcmul(shift.view(view), x, scale.view(view), out=activated).relu_() if act else x
        return conv(a, w, padding=padding)

    t_torch = median_seconds(torch_conv, repeats)
    t_kernel = median_seconds(lambda: torch.ops.ahnet_fast.channel_mm_conv_(out, w, x[0].flatten(1), list(spatial), scale,
                                                                         shift, False), repeats)
    expected = channel_mm.channel_mm_conv_reference(w.double(), x.double(), None if scale is None else scale.double(),
                                                 None if shift is None else shift.double())[0].flatten(1)
    return t_torch, t_kernel, ((out.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _time_conv_weight_grad(m, k, n, repeats, geometry, g):
    """channel_mm_nt_conv_ against oneDNN's weight gradient (convolution_backward, that output only)."""
    kernel, spatial = geometry
    ci = k // math.prod(kernel)
    grad_y, x = torch.randn(1, m, *spatial, generator=g), torch.randn(1, ci, *spatial, generator=g)
    w = torch.empty(m, ci, *kernel)
    nd, padding = len(spatial), [(s - 1) // 2 for s in kernel]
    out = torch.empty(m, k)
    t_torch = median_seconds(lambda: torch.ops.aten.convolution_backward(
        grad_y, x, w, None, [1] * nd, padding, [1] * nd, False, [0] * nd, 1, [False, True, False]), repeats)
    t_kernel = median_seconds(lambda: torch.ops.ahnet_fast.channel_mm_nt_conv_(
        out, grad_y[0].flatten(1), x[0].flatten(1), list(spatial), list(kernel), False), repeats)
    w64 = torch.zeros(m, ci, *kernel, dtype=torch.float64, requires_grad=True)
    channel_mm.channel_mm_conv_reference(w64, x.double()).backward(grad_y.double())
    expected = w64.grad.flatten(1)
    return t_torch, t_kernel, ((out.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, nargs=3, default=(128, 128, 32))
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if channel_mm.kernel_isa() != "avx512":
        print(f"bench_channel_mm: the kernel runs the {channel_mm.kernel_isa()} variant here (ATen's mm): "
              "nothing to compare", file=sys.stderr)
        return 1
    big = torch.randn(2048, 2048)
    out = torch.empty(2048, 2048)
    flops_big = 2 * 2048 ** 3
    ceilings = {"torch_mm_GFLOPs": flops_big / median_seconds(lambda: torch.mm(big, big, out=out), 5) / 1e9,
                "channel_mm_GFLOPs": flops_big / median_seconds(
                    lambda: torch.ops.ahnet_fast.channel_mm_(out, big, big, None, None, False), 5) / 1e9}
    print(f"ceilings: torch.mm {ceilings['torch_mm_GFLOPs']:.0f} GFLOP/s, channel_mm "
          f"{ceilings['channel_mm_GFLOPs']:.0f} GFLOP/s (2048^3)")
    counts = step_products(tuple(args.size))
    rows = []
    print(f"{'mode':>5} {'kind':>5} {'M':>5} {'K':>5} {'N':>6} {'act':>3} {'calls':>5} {'torch ms':>11} "
          f"{'kernel ms':>9} {'GFLOP/s':>8} {'speed-up':>8}")
    for (mode, kind, m, k, n, act, geometry), calls in sorted(counts.items(),
                                                              key=lambda kv: -kv[0][2] * kv[0][3] * kv[0][4] * kv[1]):
        t_mkl, t_kernel, err = time_shape(kind, m, k, n, act, args.repeats, geometry)
        flops = 2 * m * k * n
        rows.append(dict(mode=mode, kind=kind, M=m, K=k, N=n, act=act, calls=calls, torch_mm_s=t_mkl,
                         kernel_s=t_kernel, flops=flops, rel_err=err,
                         **({} if geometry is None else dict(kernel=list(geometry[0]), spatial=list(geometry[1])))))
        t = t_kernel if t_kernel is not None else t_mkl
        print(f"{mode:>5} {kind:>5} {m:>5} {k:>5} {n:>6} {int(act):>3} {calls:>5} {t_mkl * 1e3:11.3f} "
              f"{'-' if t_kernel is None else f'{t_kernel * 1e3:.3f}':>9} {flops / t / 1e9:8.0f} "
              f"{t_mkl / t:7.2f}x", flush=True)
    summary = {}
    for mode in ("train", "infer"):
        sel = [r for r in rows if r["mode"] == mode]
        t_mkl = sum(r["torch_mm_s"] * r["calls"] for r in sel)
        t_ours = sum((r["kernel_s"] if r["kernel_s"] is not None else r["torch_mm_s"]) * r["calls"] for r in sel)
        flops = sum(r["flops"] * r["calls"] for r in sel)
        on_kernel = sum(r["flops"] * r["calls"] for r in sel if r["kernel_s"] is not None)
        summary[mode] = dict(torch_mm_s=t_mkl, dispatched_s=t_ours, flops=flops, kernel_flops=on_kernel,
                             shapes=len(sel))
        print(f"{mode}: {len(sel)} shapes, {on_kernel / flops:.0%} of the FLOPs on the kernels; all on torch "
              f"{t_mkl * 1e3:.1f} ms ({flops / t_mkl / 1e9:.0f} GFLOP/s), as dispatched {t_ours * 1e3:.1f} ms "
              f"({flops / t_ours / 1e9:.0f} GFLOP/s, {t_mkl / t_ours:.2f}x)")
    if args.json:
        write_json(args.json, dict(run_info("cpu", f"{platform.machine()} ({os.cpu_count()} CPUs)"), size=list(args.size),
                                   repeats=args.repeats, ceilings=ceilings, summary=summary, rows=rows,
                                   date=datetime.date.today().isoformat()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
