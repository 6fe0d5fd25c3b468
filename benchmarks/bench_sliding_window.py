"""Whole-volume sliding-window inference: ahnet_fast against MONAI's ``sliding_window_inference`` with
MONAI's AHNet, same weights, window, overlap and Gaussian weights (issue 25).

Each implementation runs in fresh processes that build the network, load the shared weights and make
the volume. Memory: one process with glibc returning freed blocks (MALLOC_MMAP_THRESHOLD_=65536)
reads its resident set (the base), resets the high-water mark (/proc/self/clear_refs) and runs the
whole volume once: the peak is VmHWM over that base, what a user sees (the stitched logits, the
accumulators, the network's working memory, pools and caches, libraries loaded on first use). Time:
another process, with glibc's default allocator settings (as a user runs; returning every freed
block to the system makes each window pay its page faults again), runs the volume ``--repeats``
times. Processes alternate between the implementations ``--rounds`` times; times are medians over
every run of every round.

The weights are MONAI's initialisation with every BatchNorm's running statistics set to those of
one training-mode forward on a window of the volume: eval mode with the initial statistics (mean 0,
variance 1) lets the activations grow layer by layer to logits of 1e6-1e8, where the softmax of two
float32 computations of the same blend can differ by 1 on near-ties; calibrated, the logits are of
order one, as a trained network's.

Same windows: MONAI's are ``int(window * (1 - overlap))`` apart, the last one flush with the end;
ahnet_fast spreads them evenly. At 512x512x128 with 128x128x32 windows and overlap 0.25 the two
layouts coincide (every 96 in-plane, every 24 across slices), and MONAI is given ahnet_fast's
Gaussian weights (``roi_weight_map``), so the two compute the same blend of the same windows. The
outputs are compared (blended logits relative error, softmax difference, argmax agreement; an
argmax may only differ where the top two probabilities are within the probability tolerance).

    python benchmarks/bench_sliding_window.py [--size 512 512 128] [--window 128 128 32]
        [--overlap 0.25] [--repeats 2] [--rounds 1] [--psp-block-num 4] [--layers 3 4 6 3] [--json PATH]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

MiB = 2 ** 20
IMPLS = ("ahnet_fast", "MONAI")
PROBABILITY_TOLERANCE = 1e-4  # float32 logits blended in different orders, then softmaxed


def _child(impl: str, weights: str, size, window, overlap: float, repeats: int, out: str | None,
           measure: str, model: dict) -> dict:
    import torch

    from _common import rss_bytes  # benchmarks/ is first on sys.path

    torch.manual_seed(0)
    state = torch.load(weights, weights_only=True)
    if impl == "MONAI":
        from monai.inferers import sliding_window_inference as monai_swi
        from monai.networks.nets import AHNet
    else:
        from ahnet_fast import AHNet
    from ahnet_fast.inference import gaussian_weight, sliding_window_inference

    net = AHNet(**model)
    net.load_state_dict(state)
    net.eval()
    volume = torch.randn(1, 1, *size, generator=torch.Generator().manual_seed(1))
    if impl == "MONAI":
        weight_map = gaussian_weight(window)

        def run():
            with torch.no_grad():
                return monai_swi(volume, window, 1, net, overlap=overlap, mode="gaussian", roi_weight_map=weight_map)
    else:
        def run():
            return sliding_window_inference(volume, net, window, overlap=overlap, blend="gaussian")

    if measure == "window":  # one window's forward alone: the network's share of the whole-volume peak
        crop = volume[:, :, :window[0], :window[1], :window[2]].contiguous()
        base = rss_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        with torch.no_grad():
            net(crop)
        return dict(impl=impl, window_peak_MiB=(rss_bytes("VmHWM") - base) / MiB)
    if measure == "memory":
        base = rss_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        logits = run()
        peak = rss_bytes("VmHWM") - base
        if out:
            torch.save(logits, out)
        return dict(impl=impl, peak_MiB=peak / MiB, base_MiB=base / MiB)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits = run()
        times.append(time.perf_counter() - t0)
        del logits
    crop = volume[:, :, :window[0], :window[1], :window[2]].contiguous()
    return dict(impl=impl, times=times, window_profile=_profile(net, crop))


def _profile(net, crop) -> dict:
    """Where one window's forward spends its time, by kind of op (after a warm-up), and the matrix
    products' FLOP rate: ahnet_fast.benchmark.profile_by_kind."""
    import torch

    from ahnet_fast.benchmark import profile_by_kind

    with torch.no_grad():
        net(crop)
        return profile_by_kind(lambda: net(crop))


def _calibrated_weights(size, window, model: dict):
    """MONAI's AHNet initialisation, each BatchNorm's running statistics those of one training-mode
    forward on the volume's first window (see the module docstring)."""
    import torch
    from monai.networks.nets import AHNet

    torch.manual_seed(0)
    net = AHNet(**model)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    volume = torch.randn(1, 1, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        net.train()(volume[:, :, :window[0], :window[1], :window[2]])
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    return net.state_dict()


def _float32_noise(weights: str, size, window, model: dict) -> dict:
    """MONAI's own float32 error on one window (the volume's centre) against the same network in
    float64, and ahnet_fast's: the yardstick for the two whole-volume results' difference (a random
    network amplifies rounding; MONAI and ahnet_fast each carry about this much of it)."""
    import torch
    from monai.networks.nets import AHNet as MonaiAHNet

    import ahnet_fast

    state = torch.load(weights, weights_only=True)
    volume = torch.randn(1, 1, *size, generator=torch.Generator().manual_seed(1))
    start = [(n - w) // 2 for n, w in zip(size, window)]
    crop = volume[:, :, start[0]:start[0] + window[0], start[1]:start[1] + window[1],
                  start[2]:start[2] + window[2]].contiguous()
    theirs = MonaiAHNet(**model).eval()
    ours = ahnet_fast.AHNet(**model).eval()
    theirs.load_state_dict(state)
    ours.load_state_dict(state)
    with torch.no_grad():
        truth = theirs.double()(crop.double())
        theirs.float()
        monai32, ours32 = theirs(crop).double(), ours(crop).double()
    p_truth = truth.softmax(1)
    return dict(monai_logits_rel_error=((monai32 - truth).norm() / truth.norm()).item(),
                ahnet_fast_logits_rel_error=((ours32 - truth).norm() / truth.norm()).item(),
                monai_probability_max_error=(monai32.softmax(1) - p_truth).abs().max().item(),
                ahnet_fast_probability_max_error=(ours32.softmax(1) - p_truth).abs().max().item())


def _compare(a_path: str, b_path: str, noise: dict) -> dict:
    """ahnet_fast's blended logits (a) against MONAI's (b): equal when their difference is within 3x
    MONAI's own float32 error (logits, relative) and the argmax differs only on near-ties, voxels whose
    top two probabilities are closer than twice MONAI's own probability error."""
    import torch

    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    rel = ((a.double() - b.double()).norm() / b.double().norm()).item()
    pa, pb = a.softmax(1), b.softmax(1)
    del a, b
    prob = (pa - pb).abs().max().item()
    differ = pa.argmax(1) != pb.argmax(1)
    top2 = pb.topk(2, dim=1).values
    gap = (top2[:, 0] - top2[:, 1])[differ]
    tie = 2 * noise["monai_probability_max_error"]
    only_ties = bool((gap <= tie).all()) if gap.numel() else True
    return dict(logits_rel_error=rel, probability_max_abs_diff=prob, argmax_differ=int(differ.sum()),
                argmax_voxels=differ.numel(), largest_gap_where_argmax_differs=gap.max().item() if gap.numel() else 0.0,
                tie_band=tie, argmax_differ_only_at_ties=only_ties, float32_noise=noise,
                equal=rel <= 3 * noise["monai_logits_rel_error"] and only_ties)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, nargs=3, default=(512, 512, 128), metavar=("H", "W", "D"))
    p.add_argument("--window", type=int, nargs=3, default=(128, 128, 32), metavar=("H", "W", "D"))
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=2, help="whole-volume runs per process")
    p.add_argument("--rounds", type=int, default=1, help="processes per implementation, alternated")
    p.add_argument("--psp-block-num", type=int, default=4)
    p.add_argument("--layers", type=int, nargs=4, default=(3, 4, 6, 3))
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)  # internal: impl weights out memory|window|time
    args = p.parse_args(argv)
    model = dict(in_channels=1, out_channels=3, psp_block_num=args.psp_block_num, layers=tuple(args.layers))
    if args.child:
        impl, weights, out, measure = args.child
        record = _child(impl, weights, tuple(args.size), tuple(args.window), args.overlap, args.repeats,
                        out if out != "-" else None, measure, model)
        print("RESULT " + json.dumps(record))
        return 0

    import torch

    from ahnet_fast.benchmark import machine_ceilings, run_info

    def child(impl, weights, out, measure):
        env = dict(os.environ)
        if measure in ("memory", "window"):
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        else:
            env.pop("MALLOC_MMAP_THRESHOLD_", None)
        cmd = [sys.executable, __file__, "--child", impl, weights, out, measure, "--size", *map(str, args.size),
               "--window", *map(str, args.window), "--overlap", str(args.overlap), "--repeats", str(args.repeats),
               "--psp-block-num", str(args.psp_block_num), "--layers", *map(str, args.layers)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"{impl} {measure} run failed (exit {proc.returncode})")
        return json.loads(lines[-1][len("RESULT "):])

    with tempfile.TemporaryDirectory(prefix="bench_sw_") as tmp:
        weights = os.path.join(tmp, "weights.pt")
        torch.save(_calibrated_weights(tuple(args.size), tuple(args.window), model), weights)
        runs = {impl: {"memory": [], "time": [], "window": []} for impl in IMPLS}
        outputs = {}
        for r in range(args.rounds):
            for impl in IMPLS:
                out = os.path.join(tmp, f"{impl}.pt") if r == 0 else "-"
                mem = child(impl, weights, out, "memory")
                runs[impl]["memory"].append(mem)
                if r == 0:
                    outputs[impl] = out
                runs[impl]["window"].append(child(impl, weights, "-", "window"))
                timed = child(impl, weights, "-", "time")
                runs[impl]["time"].append(timed)
                print(f"{impl:10s} round {r + 1}: {', '.join(f'{t:.1f}' for t in timed['times'])} s, "
                      f"peak {mem['peak_MiB']:.0f} MiB over the model and volume", flush=True)
        comparison = _compare(outputs["ahnet_fast"], outputs["MONAI"],
                              _float32_noise(weights, tuple(args.size), tuple(args.window), model))

    summary = {}
    for impl, recs in runs.items():
        summary[impl] = dict(median_s=statistics.median(t for rec in recs["time"] for t in rec["times"]),
                             peak_MiB=statistics.median(rec["peak_MiB"] for rec in recs["memory"]),
                             window_peak_MiB=statistics.median(rec["window_peak_MiB"] for rec in recs["window"]))
    # The floor of any whole-volume inference that returns the blended float32 logits: the logits
    # themselves (N x C_out x voxels x 4 bytes, written in place, the weight sum formed a slab at a time)
    # while one window's forward runs (its own peak, measured alone in a fresh process above).
    output_MiB = 3 * args.size[0] * args.size[1] * args.size[2] * 4 / MiB
    floor = dict(output_MiB=output_MiB, window_forward_MiB=summary["ahnet_fast"]["window_peak_MiB"],
                 floor_MiB=output_MiB + summary["ahnet_fast"]["window_peak_MiB"])
    floor["ahnet_fast_peak_vs_floor"] = summary["ahnet_fast"]["peak_MiB"] / floor["floor_MiB"]
    floor["target_MiB"] = 0.5 * summary["MONAI"]["peak_MiB"]
    floor["target_below_output"] = floor["target_MiB"] < output_MiB
    speedup = summary["MONAI"]["median_s"] / summary["ahnet_fast"]["median_s"]
    memory = summary["ahnet_fast"]["peak_MiB"] / summary["MONAI"]["peak_MiB"]
    print(f"ahnet_fast {speedup:.2f}x faster than MONAI's sliding_window_inference, peak {memory:.2f}x MONAI's; "
          f"outputs: logits rel. error {comparison['logits_rel_error']:.1e}, softmax max diff "
          f"{comparison['probability_max_abs_diff']:.1e}, argmax differs at {comparison['argmax_differ']} of "
          f"{comparison['argmax_voxels']} voxels (only at ties: {comparison['argmax_differ_only_at_ties']}); "
          f"MONAI's own float32 error on a window {comparison['float32_noise']['monai_logits_rel_error']:.1e} "
          f"(ahnet_fast's {comparison['float32_noise']['ahnet_fast_logits_rel_error']:.1e}): "
          f"{'equal' if comparison['equal'] else 'NOT equal'} within float32")
    record = dict(run_info("cpu", platform.processor() or platform.machine()), benchmark="sliding_window",
                  machine=f"{platform.machine()} ({os.cpu_count()} CPUs)", size=list(args.size),
                  window=list(args.window), overlap=args.overlap, repeats=args.repeats, rounds=args.rounds,
                  model=dict(model, layers=list(model["layers"])),
                  blend="gaussian (ahnet_fast's weights given to MONAI as roi_weight_map)",
                  runs=runs, summary=summary, speedup_vs_monai=speedup, peak_ratio_vs_monai=memory, floor=floor,
                  outputs=comparison, targets=dict(speedup=1.5, peak_ratio=0.5),
                  ceilings=machine_ceilings("cpu"))  # the profile's matmul rate is judged against this run's
    record["date"] = str(datetime.date.today())
    if args.json:
        from ahnet_fast._atomic import atomic_path

        with atomic_path(args.json) as tmp_path, open(tmp_path, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    raise SystemExit(main())
