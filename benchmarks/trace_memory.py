"""Where an AH-Net forward (or training step) reaches its memory peak on CPU: a per-op timeline.

Every op the dispatcher runs (ATen's and ahnet_fast's registered ops alike) is wrapped by a
TorchDispatchMode that resets the process's high-water mark before it (/proc/self/clear_refs) and reads
the resident set after it: per op, the RSS before, the high-water mark inside it (its transient
workspace shows here) and the RSS after, over the RSS taken once the model and the input exist and
one warm-up step has run (pools and caches as a user has them). The ops nearest the peak say which
tensors must coexist there: the starting point of a memory floor (issue 25).

glibc must hand freed blocks back (MALLOC_MMAP_THRESHOLD_=65536), or the RSS only grows; the script
re-runs itself with it when it is not set. Reading /proc around each op slows the traced step.

    python benchmarks/trace_memory.py [--impl ahnet_fast|MONAI] [--size 256 256 32] [--mode infer|train]
        [--psp-block-num 4] [--layers 3 4 6 3] [--checkpoint none|encoder|decoder|all] [--precision fp32|bf16]
        [--top 15]
        [--json PATH]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

from _common import rss_bytes, write_json  # benchmarks/ is the script's folder, first on sys.path

MiB = 2 ** 20


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def trace(impl: str, size, mode: str, psp_block_num: int, layers, checkpoint: str = "none",
          precision: str = "fp32") -> dict:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    kwargs = dict(in_channels=1, out_channels=3, psp_block_num=psp_block_num, layers=tuple(layers))
    if impl == "MONAI":
        from monai.networks.nets import AHNet
    else:
        from ahnet_fast import AHNet
    if checkpoint != "none":
        if impl == "MONAI":
            raise ValueError("trace_memory: --checkpoint is an ahnet_fast option; MONAI's AHNet has none")
        kwargs["checkpoint"] = checkpoint
    net = AHNet(**kwargs)
    x = torch.randn(1, 1, *size)
    y = torch.randint(0, 3, (1, *size))
    opt = torch.optim.Adam(net.parameters(), lr=1e-4) if mode == "train" else None

    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        if mode == "infer":
            net.eval()
            with torch.no_grad(), amp:
                return net(x)
        net.train()
        opt.zero_grad(set_to_none=True)
        with amp:
            out = net(x)
        loss = torch.nn.functional.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        return loss

    step()  # warm-up: optimizer state, pools, caches

    rows = []

    class Trace(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            _reset_peak()
            before = rss_bytes("VmRSS")
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else [out]
            shapes = [list(o.shape) for o in outs if isinstance(o, torch.Tensor)][:2]
            rows.append(dict(op=str(func), before=before, high=rss_bytes("VmHWM"), after=rss_bytes("VmRSS"), shapes=shapes))
            return out

    base = rss_bytes("VmRSS")
    with Trace():
        step()
    for r in rows:
        for k in ("before", "high", "after"):
            r[k] = (r[k] - base) / MiB
    return dict(impl=impl, size=list(size), mode=mode, checkpoint=checkpoint, precision=precision, psp_block_num=psp_block_num, layers=list(layers),
                base_MiB=base / MiB, peak_MiB=max((r["high"] for r in rows), default=0.0), ops=rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", default="ahnet_fast", choices=("ahnet_fast", "MONAI"))
    p.add_argument("--size", type=int, nargs=3, default=(256, 256, 32), metavar=("H", "W", "D"))
    p.add_argument("--mode", default="infer", choices=("infer", "train"))
    p.add_argument("--psp-block-num", type=int, default=4)
    p.add_argument("--layers", type=int, nargs=4, default=(3, 4, 6, 3))
    p.add_argument("--checkpoint", default="none", choices=("none", "encoder", "decoder", "all"),
                   help="ahnet_fast's activation checkpointing policy (training)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: under CPU autocast")
    p.add_argument("--top", type=int, default=15, help="print this many ops with the highest high-water mark")
    p.add_argument("--json", default=None, help="write the whole timeline here")
    args = p.parse_args(argv)
    if not os.path.exists("/proc/self/clear_refs"):
        raise SystemExit("trace_memory: needs Linux's /proc/self/clear_refs")
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # before any large allocation: re-run with it
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])], env)
    import torch

    record = trace(args.impl, args.size, args.mode, args.psp_block_num, args.layers, args.checkpoint,
                   args.precision)
    print(f"{args.impl} {args.mode} 1x1x{'x'.join(map(str, args.size))}: {len(record['ops'])} ops, peak "
          f"{record['peak_MiB']:.0f} MiB over the model, input and warm-up ({record['base_MiB']:.0f} MiB)")
    print(f"{'#':>5} {'op':<44} {'before':>8} {'inside':>8} {'after':>8}  output")
    top = sorted(range(len(record["ops"])), key=lambda i: -record["ops"][i]["high"])[:args.top]
    for i in sorted(top):
        r = record["ops"][i]
        print(f"{i:>5} {r['op'][:44]:<44} {r['before']:>8.0f} {r['high']:>8.0f} {r['after']:>8.0f}  {r['shapes']}")
    if args.json:
        record.update(date=datetime.date.today().isoformat(), device=f"CPU ({platform.machine()})",
                      torch=torch.__version__, threads=torch.get_num_threads())
        write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
