"""GPU check of what exists so far, for a lent GPU machine (run by benchmarks/gpu_check.sh).

1. The machine's two ceilings, measured: device-to-device copy bandwidth and a large matmul rate.
2. Correctness on the GPU: AHNet (fp32, train and eval) against the same network in float64 on
   the CPU — output, input gradient, parameter gradients — with the backend `auto` picks there.
3. Training step (forward, loss, backward, SGD) time and peak memory, fp32 and bf16 autocast,
   ahnet_fast vs MONAI when MONAI is importable, in the same process, at 128x128x32 and 256x256x64.
4. Focal loss forward+backward: the Triton kernel against the reference (and MONAI), correctness
   against float64, time, peak memory, and the fraction of the measured copy bandwidth it reaches
   for the bytes it must move (read logits and labels, write the gradient).
5. The memory planner: its estimate against torch.cuda.max_memory_allocated for AHNet + Adam and two
   training steps (fp32/bf16, checkpoint policies, up to the 512x512x64 bf16 slab of issue 6), with
   the step time; and which convolution path each shape took.
6. Pyramid volumetric pooling (AHNet.psp) forward+backward, alone and with the concatenation AH-Net
   takes (``concat_input=True``): the Triton kernels against the reference (and MONAI's PSP + cat),
   error against float64, time, peak memory, and the fraction of the copy bandwidth reached for
   the minimum bytes (read x, write the output; read its gradient, write x's gradient).

Writes a markdown table and JSON to --out. With --smoke it runs tiny sizes on whatever device
exists (used on CPU to test this script before spending GPU time).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
import torch
import torch.nn.functional as F

import ahnet_fast
from ahnet_fast import backends
from ahnet_fast.ops import bn_relu as bn_relu_op
from _common import median_seconds  # benchmarks/ is the script's folder, first on sys.path


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, warmup=2, repeats=7):
    return 1e3 * median_seconds(fn, repeats, warmup, sync=lambda: sync(device))


def time_and_extra_peak(step, device, smoke):
    """(median ms of step(), peak bytes allocated beyond what was allocated before; None off CUDA)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    ms = median_ms(step, device, warmup=2, repeats=5 if smoke else 20)
    extra = (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else None
    return ms, extra


def ceilings(device, smoke):
    n = (1 << 20) if smoke else (1 << 28)  # 1 GiB of fp32 on the GPU
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device)
    m = 256 if smoke else 8192
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(m, m, device=device, dtype=dt), torch.randn(m, m, device=device, dtype=dt)
    mm_ms = median_ms(lambda: a @ b, device)
    return {"copy_GBps": 2 * src.numel() * 4 / copy_ms / 1e6, "matmul_TFLOPs": 2 * m ** 3 / mm_ms / 1e9,
            "matmul_dtype": str(dt)}


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def correctness(device, smoke):
    rows = []
    shape = (2, 1, 32, 32, 32) if smoke else (2, 1, 128, 128, 32)
    layers = (1, 1, 1, 1) if smoke else (3, 4, 6, 3)
    psp = 0 if smoke else 4
    for train in (False, True):
        torch.manual_seed(0)
        ref = ahnet_fast.AHNet(layers=layers, psp_block_num=psp, out_channels=3).double().train(train)
        net = copy.deepcopy(ref).float().to(device).train(train)
        x = torch.randn(shape, dtype=torch.float64)
        g = torch.randn((shape[0], 3, *shape[2:]), dtype=torch.float64)
        xr = x.clone().requires_grad_()
        yr = ref(xr)
        yr.backward(g)
        xd = x.float().to(device).requires_grad_()
        yd = net(xd)
        yd.backward(g.float().to(device))
        grads = torch.cat([p.grad.flatten().double().cpu() for p in net.parameters()])
        grads_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
        chosen = backends.select("batch_norm_relu", bn_relu_op.IMPLEMENTATIONS, xd.device, (xd,))
        rows.append({"mode": "train" if train else "eval", "backend": chosen, "out_rel": rel(yd, yr),
                     "xgrad_rel": rel(xd.grad, xr.grad), "param_grad_rel": rel(grads, grads_ref)})
    return rows


def train_step_bench(device, smoke):
    try:
        from monai.networks.nets import AHNet as MonaiAHNet
    except ImportError:
        MonaiAHNet = None
    sizes = [(2, 1, 32, 32, 32)] if smoke else [(1, 1, 128, 128, 32), (1, 1, 256, 256, 64)]
    rows = []
    for shape in sizes:
        for amp in ("fp32", "bf16"):
            if amp == "bf16" and device.type != "cuda":
                continue
            nets = [("ahnet_fast", ahnet_fast.AHNet)] + ([("MONAI", MonaiAHNet)] if MonaiAHNet else [])
            for name, cls in nets:
                torch.manual_seed(0)
                kwargs = dict(out_channels=3, psp_block_num=0 if smoke else 4)
                if smoke:
                    kwargs["layers"] = (1, 1, 1, 1)
                net = cls(**kwargs).to(device)
                opt = torch.optim.SGD(net.parameters(), lr=1e-3)
                x = torch.randn(shape, device=device)
                target = torch.randint(0, 3, (shape[0], *shape[2:]), device=device)

                def step():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                        loss = F.cross_entropy(net(x).float(), target)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                try:
                    ms = median_ms(step, device, warmup=2, repeats=3 if smoke else 5)
                    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
                    rows.append({"shape": list(shape), "amp": amp, "net": name, "ms": ms, "peak_bytes": peak})
                except torch.cuda.OutOfMemoryError:
                    rows.append({"shape": list(shape), "amp": amp, "net": name, "ms": None, "peak_bytes": "OOM"})
                del net, opt
    return rows


def planner_check(device, smoke):
    """The memory planner on the GPU: estimate vs torch.cuda.max_memory_allocated of building AHNet +
    Adam and two training steps (bf16/fp32, checkpoint policies), and the issue's 512x512x64 bf16 slab.
    Off CUDA (smoke) it only runs the estimates."""
    from ahnet_fast.memory import estimate_training_memory

    configs = [((2, 1, 32, 32, 32), "none", "fp32")] if smoke else [
        ((1, 1, 128, 128, 32), "none", "fp32"), ((1, 1, 128, 128, 32), "all", "fp32"),
        ((1, 1, 128, 128, 32), "none", "bf16"), ((2, 1, 256, 256, 64), "none", "bf16"),
        ((1, 1, 256, 256, 64), "all", "fp32"), ((1, 1, 512, 512, 64), "none", "bf16"),
        ((1, 1, 512, 512, 64), "all", "bf16")]
    rows = []
    for shape, policy, precision in configs:
        kwargs = dict(in_channels=1, out_channels=3, psp_block_num=0 if smoke else 4, checkpoint=policy)
        if smoke:
            kwargs["layers"] = (1, 1, 1, 1)
        with torch.device("meta"):
            est = estimate_training_memory(ahnet_fast.AHNet(**kwargs), shape, dtype=precision)
        row = {"shape": list(shape), "checkpoint": policy, "precision": precision, "estimate": est.as_dict(),
               "measured": None, "ms": None}
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            try:
                net = ahnet_fast.AHNet(**kwargs).to(device)
                opt = torch.optim.Adam(net.parameters(), lr=1e-4)
                x = torch.randn(shape, device=device)
                target = torch.randint(0, 3, (shape[0], *shape[2:]), device=device)

                def step():
                    opt.zero_grad()
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                        out = net(x)
                    F.cross_entropy(out.float(), target).backward()
                    opt.step()

                step()
                sync(device)
                t0 = time.perf_counter()
                step()
                sync(device)
                row["ms"] = 1e3 * (time.perf_counter() - t0)
                row["measured"] = torch.cuda.max_memory_allocated() - base
                del net, opt, x, target
            except torch.cuda.OutOfMemoryError:
                row["measured"] = "OOM"
        rows.append(row)
        print("planner", json.dumps(row), flush=True)
    return rows


def focal_loss_bench(device, smoke, copy_gbps):
    from ahnet_fast.ops import focal_loss

    try:
        from monai.losses import FocalLoss as MonaiFocalLoss
    except ImportError:
        MonaiFocalLoss = None
    cases = [((2, 3, 16, 16, 8), True)] if smoke else [((2, 3, 192, 192, 64), True), ((2, 3, 192, 192, 64), False),
                                                        ((1, 8, 128, 128, 64), True)]
    rows = []
    for shape, softmax in cases:
        for dtype in (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,):
            g = torch.Generator().manual_seed(0)
            x = (torch.randn(shape, generator=g) * 2).to(dtype).to(device)
            labels = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g).to(device)
            xd = x.detach().double().requires_grad_()
            focal_loss(xd, labels, use_softmax=softmax, backend="reference").backward()
            impls = ["triton", "reference"] if device.type == "cuda" else ["reference"]
            if MonaiFocalLoss is not None and dtype == torch.float32:
                impls.append("MONAI")
            for impl in impls:
                if impl == "MONAI":
                    m = MonaiFocalLoss(use_softmax=softmax, to_onehot_y=True)
                    fn = lambda a: m(a, labels.unsqueeze(1))  # noqa: E731
                else:
                    fn = lambda a, impl=impl: focal_loss(a, labels, use_softmax=softmax, backend=impl)  # noqa: E731
                xi = x.detach().clone().requires_grad_()

                def step():
                    xi.grad = None
                    fn(xi).backward()

                step()
                err = rel(xi.grad, xd.grad)
                ms, extra = time_and_extra_peak(step, device, smoke)
                min_bytes = 2 * x.numel() * x.element_size() + labels.numel() * labels.element_size()
                gbps = min_bytes / ms / 1e6
                rows.append({"shape": list(shape), "softmax": softmax, "dtype": str(dtype), "impl": impl, "ms": ms,
                             "grad_rel_err": err, "extra_peak_bytes": extra, "GBps": gbps,
                             "fraction_of_copy": gbps / copy_gbps})
                print("focal_loss", json.dumps(rows[-1]), flush=True)
    return rows


def psp_bench(device, smoke, copy_gbps):
    try:
        from monai.networks.nets.ahnet import PSP as MonaiPSP
    except ImportError:
        MonaiPSP = None
    shape = (1, 6, 64, 64, 4) if smoke else (1, 124, 128, 128, 32)
    rows = []
    torch.manual_seed(0)
    module = ahnet_fast.PyramidVolumetricPooling(3, 4, shape[1], "transpose")
    for dtype in (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
        for concat in (False, True):
            exact = copy.deepcopy(module).double().to(device)
            exact.backend = "reference"
            xd = x.detach().double().requires_grad_()
            yd = exact(xd, concat_input=concat)
            gd = torch.randn(yd.shape, generator=torch.Generator().manual_seed(2)).double().to(device)
            yd.backward(gd)
            interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # --smoke on CPU: the Triton path too
            impls = ["triton", "reference"] if device.type == "cuda" or interpreted else ["reference"]
            if MonaiPSP is not None and dtype == torch.float32:
                impls.append("MONAI")
            for impl in impls:
                net = copy.deepcopy(module).to(dtype).to(device)
                if impl == "MONAI":
                    theirs = MonaiPSP(3, 4, shape[1], "transpose").to(dtype).to(device)
                    theirs.load_state_dict(net.state_dict())
                    fn = (lambda a: torch.cat((theirs(a), a), 1)) if concat else theirs
                else:
                    net.backend = impl
                    fn = lambda a, net=net: net(a, concat_input=concat)  # noqa: E731
                xi = x.detach().clone().requires_grad_()
                g = gd.to(dtype)

                def step():
                    xi.grad = None
                    fn(xi).backward(g)

                y = fn(xi)
                y.backward(g)
                out_err, grad_err = rel(y, yd), rel(xi.grad, xd.grad)
                del y
                ms, extra = time_and_extra_peak(step, device, smoke)
                x_bytes = x.numel() * x.element_size()
                out_bytes = x_bytes * (4 + (shape[1] if concat else 0)) // shape[1]
                gbps = 2 * (x_bytes + out_bytes) / ms / 1e6
                rows.append({"shape": list(shape), "concat": concat, "dtype": str(dtype), "impl": impl, "ms": ms,
                             "out_rel_err": out_err, "grad_rel_err": grad_err, "extra_peak_bytes": extra,
                             "GBps": gbps, "fraction_of_copy": gbps / copy_gbps})
                print("psp", json.dumps(rows[-1]), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device: tests this script")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "extension": ahnet_fast.extension_available()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    print(json.dumps(info), flush=True)
    result = {"info": info}
    path = os.path.join(args.out, "gpu_check.json")

    def save():  # after every section: a time-out later still leaves what was measured
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    result["ceilings"] = ceilings(device, args.smoke)
    print("ceilings", json.dumps(result["ceilings"]), flush=True)
    save()
    result["correctness"] = correctness(device, args.smoke)
    for r in result["correctness"]:
        print("correctness", json.dumps(r), flush=True)
    save()
    # the issue-6 planner check first among the benchmarks: it is the one a GPU is needed for most
    result["planner"] = planner_check(device, args.smoke)
    save()
    result["train_step"] = train_step_bench(device, args.smoke)
    save()
    result["focal_loss"] = focal_loss_bench(device, args.smoke, result["ceilings"]["copy_GBps"])
    save()
    result["psp"] = psp_bench(device, args.smoke, result["ceilings"]["copy_GBps"])
    save()
    from ahnet_fast.ops import aniso_conv

    result["conv_paths"] = aniso_conv.choices()  # which convolution path each shape took
    save()
    lines = [f"# GPU check: {info['device']}, torch {info['torch']}, triton {info['triton']}", "",
             f"copy {result['ceilings']['copy_GBps']:.0f} GB/s (read+write); matmul "
             f"{result['ceilings']['matmul_TFLOPs']:.0f} TFLOP/s ({result['ceilings']['matmul_dtype']})", "",
             "| mode | bn_relu backend | output rel err | input grad rel err | param grads rel err |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['backend']} | {r['out_rel']:.2e} | {r['xgrad_rel']:.2e} | {r['param_grad_rel']:.2e} |"
              for r in result["correctness"]]
    lines += ["", "| input | precision | network | ms/step (median) | peak allocated |", "|---|---|---|---|---|"]
    for r in result["train_step"]:
        peak = r["peak_bytes"]
        peak_s = "n/a" if peak is None else (peak if isinstance(peak, str) else f"{peak / 2**30:.2f} GiB")
        ms = "OOM" if r["ms"] is None else f"{r['ms']:.1f}"
        lines.append(f"| {tuple(r['shape'])} | {r['amp']} | {r['net']} | {ms} | {peak_s} |")
    lines += ["", "| planner: input | checkpoint | precision | estimated GiB | measured GiB (max_memory_allocated) | "
              "estimate / measured | ms/step |", "|---|---|---|---|---|---|---|"]
    for r in result["planner"]:
        m = r["measured"]
        est = r["estimate"]["total"]
        meas = "n/a" if m is None else (m if isinstance(m, str) else f"{m / 2**30:.2f}")
        ratio = f"{est / m:.2f}" if isinstance(m, int) and m else ""
        ms = "" if r["ms"] is None else f"{r['ms']:.0f}"
        lines.append(f"| {tuple(r['shape'])} | {r['checkpoint']} | {r['precision']} | {est / 2**30:.2f} | {meas} | "
                     f"{ratio} | {ms} |")
    lines += ["", "| focal loss | dtype | impl | ms (fwd+bwd) | grad rel err vs fp64 | extra peak | GB/s | of copy bw |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["focal_loss"]:
        extra = "n/a" if r["extra_peak_bytes"] is None else f"{r['extra_peak_bytes'] / 2**20:.0f} MiB"
        lines.append(f"| {tuple(r['shape'])} {'softmax' if r['softmax'] else 'sigmoid'} | {r['dtype']} | {r['impl']} | "
                     f"{r['ms']:.2f} | {r['grad_rel_err']:.1e} | {extra} | {r['GBps']:.0f} | "
                     f"{100 * r['fraction_of_copy']:.0f}% |")
    lines += ["", "| pyramid pooling | use | dtype | impl | ms (fwd+bwd) | out / grad rel err vs fp64 | extra peak | "
              "GB/s | of copy bw |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["psp"]:
        extra = "n/a" if r["extra_peak_bytes"] is None else f"{r['extra_peak_bytes'] / 2**20:.0f} MiB"
        lines.append(f"| {tuple(r['shape'])} | {'PSP+cat' if r['concat'] else 'PSP'} | {r['dtype']} | {r['impl']} | "
                     f"{r['ms']:.2f} | {r['out_rel_err']:.1e} / {r['grad_rel_err']:.1e} | {extra} | {r['GBps']:.0f} | "
                     f"{100 * r['fraction_of_copy']:.0f}% |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
