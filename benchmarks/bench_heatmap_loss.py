"""Does the detection heat-map loss show in a training step's profile? (Issue 22: a fused loss path
only if it does.)

For each stage's network at the detection run's shapes (2d: MCFCN on a batch of slice stacks; 3d:
AHNet on a patch), the median time of a whole training step (forward, loss, backward, Adam) and of
the loss alone (forward + backward of ``heatmap_loss`` on the step's output), and the loss's share.
Also the loss's minimum bytes (read logits and target, write the gradient: 12 bytes per voxel in
float32) over its time, against a same-size tensor copy in the same run: how far the unfused
PyTorch loss is from the memory roof a fused kernel would be bound by.

    python benchmarks/bench_heatmap_loss.py [--repeats 5] [--json benchmarks/results/heatmap_loss_cpu_DATE.json]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform

import torch
from _common import median_seconds  # benchmarks/ is the script's folder, first on sys.path

from ahnet_fast import _json
from ahnet_fast.nn import AHNet, MCFCN
from ahnet_fast.training.loop import heatmap_loss

# (stage, network, input shape): the README's detection run (--patch 64 64 32 --batch 4 --psp-block-num 0)
# and the default patch (128 128 32, batch 1)
CASES = [
    ("2d", "MCFCN", (4, 3, 64, 64)),
    ("3d", "AHNet psp0", (4, 1, 64, 64, 32)),
    ("3d", "AHNet psp4", (1, 1, 128, 128, 32)),
]


def build(name: str):
    if name == "MCFCN":
        return MCFCN(in_channels=3, out_channels=1)
    return AHNet(spatial_dims=3, in_channels=1, out_channels=1, psp_block_num=int(name[-1]), upsample_mode="transpose")


def measure(stage, name, shape, repeats):
    torch.manual_seed(0)
    net = build(name).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x = torch.rand(shape)
    out_shape = net(x).shape
    target = torch.rand(out_shape) ** 8  # mostly ~0, a few peaks: a heat map's statistics

    def step():
        opt.zero_grad(set_to_none=True)
        heatmap_loss(net(x), target).backward()
        opt.step()

    logits = torch.randn(out_shape, requires_grad=True)

    def loss_only():
        logits.grad = None
        heatmap_loss(logits, target).backward()

    src = torch.randn(out_shape)
    dst = torch.empty_like(src)
    t_step = median_seconds(step, repeats)
    t_loss = median_seconds(loss_only, max(repeats, 9) * 3)
    t_copy = median_seconds(lambda: dst.copy_(src), max(repeats, 9) * 3)
    voxels = src.numel()
    return {"stage": stage, "network": name, "input": list(shape), "output": list(out_shape),
            "step_s": t_step, "loss_s": t_loss, "loss_share": t_loss / t_step,
            "loss_min_bytes": 12 * voxels, "loss_GBps": 12 * voxels / t_loss / 1e9,
            "copy_GBps": 8 * voxels / t_copy / 1e9}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = []
    for case in CASES:
        r = measure(*case, args.repeats)
        rows.append(r)
        print(f"{r['stage']:>3} {r['network']:<11} {'x'.join(map(str, r['input'])):>16}: step {r['step_s'] * 1e3:8.1f} ms, "
              f"loss fwd+bwd {r['loss_s'] * 1e3:6.2f} ms = {100 * r['loss_share']:.2f}% of the step; loss moves "
              f"{r['loss_GBps']:.1f} GB/s of its minimum bytes, a copy {r['copy_GBps']:.1f} GB/s", flush=True)
    record = {"date": datetime.date.today().isoformat(), "device": f"CPU ({platform.machine()})",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": args.repeats,
              "cases": rows, "max_loss_share": max(r["loss_share"] for r in rows)}
    if args.json:
        from ahnet_fast._atomic import atomic_path

        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with atomic_path(args.json) as tmp, open(tmp, "w") as f:
            f.write(_json.dumps(record, indent=1))
        print(f"wrote {args.json}")
    return record


if __name__ == "__main__":
    main()
