"""End to end: an AH-Net training step (forward + focal loss + backward + optimizer) and inference,
ahnet_fast vs MONAI's AHNet + FocalLoss, side by side in one run.

Each (implementation, size) runs in two fresh processes, each building the model (MONAI's
initialisation, loaded into ahnet_fast's with strict=True, so both start from the same weights) and
the batch, then one warm-up step (it also creates the optimizer state):
- time: ``--repeats`` steps timed, with the default allocator settings;
- peak: glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=65536, so freed blocks go back to the
  system the same way every run; it also makes every large allocation fault fresh pages, which is
  why time is measured separately), the peak of one step = VmHWM after it minus the RSS before it
  (/proc/self/clear_refs); on CUDA torch.cuda.max_memory_allocated minus memory_allocated.
  ahnet_fast's pooled CPU scratch buffers (ahnet_fast._scratch) are released before that step, so
  they count in its peak rather than in what existed before it.
Inference: forward under no_grad in eval mode, same measurements.

With ``--alternatives``, also what a user would pick instead of ahnet_fast, each its own rows:
``MONAI+compile`` (``torch.compile`` of MONAI's AHNet; its warm-up step, which compiles, is reported
apart as the compile time, and the timed steps come after it), ``MONAI/bf16`` (MONAI under
``torch.autocast(bfloat16)``) and ``ahnet_fast/bf16``; ``--compile-ours`` adds ``ahnet_fast+compile``.
Each row's "vs best alternative" is its speed against the fastest MONAI row of the same precision
(fp32: eager, compiled, channels-last; bf16: autocast) in the same run.

With ``--profile``, each row's first timing process profiles one more step (torch.profiler self
time by kind of op: matrix products, oneDNN/ATen convolutions, ahnet_fast's own loops, elementwise,
copies, pooling, optimizer), the run counts the step's FLOPs (MONAI's model under FlopCounterMode)
and measures the machine's fp32 matmul and copy ceilings: how far each step is from its roof, and
where the rest of its time goes.

    ahnet-fast bench [--sizes 128 128 32 [256 256 32 ...]] [--repeats 5] [--device cpu|cuda]
        [--amp off|bf16] [--out e2e_cpu.md] [--json PATH]
    (python benchmarks/e2e.py ... in a source checkout is the same)

Part of the package (not of benchmarks/) so that it runs from any installation; it needs MONAI
(pip install monai==1.6.1) as the baseline.
"""
from __future__ import annotations

import argparse
import atexit
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from ahnet_fast import _json
from ahnet_fast._atomic import atomic_path


def rss_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status ("VmRSS", "VmHWM"), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _cpu_model() -> str | None:
    """The host CPU's model name (/proc/cpuinfo): CPU timings differ by vendor and generation, and
    the machines these runs are made on change."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def run_info(device: str, name: str) -> dict:
    """The header of every results JSON: what ran where (device name and type, torch and triton
    versions, date, threads)."""
    import importlib.util

    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    import ahnet_fast

    return dict(device=name, device_type=device, cpu=_cpu_model(), torch=torch.__version__, triton=triton_version,
                date=str(datetime.date.today()), threads=torch.get_num_threads(),
                extension=ahnet_fast.extension_available(), requested_backend=ahnet_fast.backends.requested_backend())


# What a step spends its time on, by kind of op (torch.profiler self time). Names are ATen's and
# ahnet_fast's; a kind lists the ops whose self time is that kind of work. Time inside the
# optimizer's step counts as "optimizer" whatever op it is (Adam is elementwise arithmetic).
PROFILE_KINDS = (
    ("matrix products", ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm",
                         "ahnet_fast::channel_mm_", "ahnet_fast::channel_mm_nt_", "ahnet_fast::channel_mm_conv_",
                         "ahnet_fast::channel_mm_nt_conv_")),
    ("convolutions (oneDNN/ATen)", ("aten::mkldnn_convolution", "aten::convolution_backward",
                                    "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward",
                                    "aten::slow_conv3d_forward", "aten::slow_conv_dilated2d",
                                    "aten::slow_conv_dilated3d", "aten::slow_conv_transpose3d",
                                    "aten::mkldnn_convolution_backward", "aten::cudnn_convolution",
                                    "aten::cudnn_convolution_transpose")),
    ("copies and concatenation", ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::_to_copy")),
    ("pooling", ("aten::max_pool3d_with_indices", "aten::max_pool3d_with_indices_backward",
                 "aten::avg_pool3d", "aten::avg_pool3d_backward", "aten::upsample_trilinear3d",
                 "aten::upsample_trilinear3d_backward")),
    ("BatchNorm, ReLU and other elementwise", ("aten::native_batch_norm", "aten::native_batch_norm_backward",
                                               "aten::batch_norm", "aten::threshold_backward", "aten::relu",
                                               "aten::relu_", "aten::clamp_min", "aten::clamp_min_", "aten::add",
                                               "aten::add_", "aten::mul", "aten::mul_", "aten::div", "aten::div_",
                                               "aten::sub", "aten::sub_", "aten::where")),
)
# ahnet_fast's ops by what their self time is: the composite ops (the dense block, BN-ReLU-conv,
# the convolutions) spend theirs in the Python and C++ glue around the products and kernels they
# call (the products themselves count as matrix products or convolutions); checked in this order
_OWN_KINDS = (("copies and concatenation", ("shuffle",)),
              ("ahnet_fast ops' own time (glue around the products)", ("conv", "dense_block", "stem")),
              ("pooling", ("pool",)),
              ("BatchNorm, ReLU and other elementwise", ("bn_", "loss", "softmax")))


def _kind_of(event) -> str:
    parent = event
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return "optimizer"
        parent = parent.cpu_parent
    for kind, names in PROFILE_KINDS:
        if event.name in names:
            return kind
    if event.name.startswith("ahnet_fast::"):
        op = event.name[len("ahnet_fast::"):]
        for kind, words in _OWN_KINDS:
            if any(w in op for w in words):
                return kind
    # torch.compile's generated code: its kernels run inside the "## Call CompiledFxGraph <hash> ##"
    # record (on CPU they have no records of their own; on CUDA they are triton_* kernels), fusing
    # the elementwise work with whatever surrounds it
    if event.name.startswith("## Call CompiledFxGraph") or "cpp_fused" in event.name or \
            event.name.startswith("triton_"):
        return "compiled (Inductor) kernels"
    return "other"


def _kernel_flops(event) -> int:
    """FLOPs of ahnet_fast's product kernels (the profiler counts ATen's only), from the recorded
    shapes: channel_mm_(out (M, N), weight (M, K), ...), channel_mm_nt_(out (M, K), a (M, L), ...),
    channel_mm_conv_(out (Co, S), weight (Co, Ci, *kernel), ...) and channel_mm_nt_conv_(out (Co, Ci * T),
    a (Co, S), ...)."""
    shapes = event.input_shapes or []
    if event.name == "ahnet_fast::channel_mm_conv_" and len(shapes) >= 2 and len(shapes[0]) == 2 \
            and len(shapes[1]) >= 3:
        return 2 * shapes[0][1] * math.prod(shapes[1])
    if event.name == "ahnet_fast::channel_mm_nt_conv_" and len(shapes) >= 2 and len(shapes[0]) == 2 \
            and len(shapes[1]) == 2:  # out (M, Ci * T), a (M, S)
        return 2 * shapes[0][0] * shapes[0][1] * shapes[1][1]
    if event.name in ("ahnet_fast::channel_mm_", "ahnet_fast::channel_mm_nt_") and len(shapes) >= 2 \
            and len(shapes[0]) == 2 and len(shapes[1]) == 2:
        return 2 * shapes[0][0] * shapes[0][1] * shapes[1][1]
    return 0


def profile_by_kind(fn, device: str = "cpu") -> dict:
    """Run ``fn()`` once under torch.profiler: self time per kind of op (PROFILE_KINDS; the rest is
    "other"), the profiled wall time, and the matrix products' FLOPs and rate (the profiler counts
    FLOPs of aten::mm/addmm; oneDNN's convolutions it does not). On CUDA the kinds are the ops' own
    device time (the host's is launch overhead) and the wall time waits for the device. Profiling
    costs time, so the wall time here is above a timed step's."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with profile(activities=activities, with_flops=True, record_shapes=True) as prof:
        fn()
        sync()
    wall = time.perf_counter() - t0
    seconds: dict[str, float] = {}
    by_name: dict[str, float] = {}
    mm_flops = 0
    for e in prof.events():
        kind = _kind_of(e)
        spent = (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6
        seconds[kind] = seconds.get(kind, 0.0) + spent
        by_name[e.name] = by_name.get(e.name, 0.0) + spent
        if kind == "matrix products":
            mm_flops += e.flops or _kernel_flops(e)
    mm_s = seconds.get("matrix products", 0.0)
    # the ops that took the most, by name: what a kind is made of, and the record a later
    # reading can sort differently
    top = dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:20])
    return dict(profiled_wall_s=wall, self_s=seconds, top_ops_s=top, matmul_gflop=mm_flops / 1e9,
                matmul_gflops_per_s=mm_flops / 1e9 / mm_s if mm_s else None)


def machine_ceilings(device: str = "cpu") -> dict:
    """The machine's fp32 matmul rate (a 2048^3 GEMM on CPU, 8192^3 on CUDA, with torch's matmul
    settings as they are: no TF32 by default, while cuDNN's convolutions may use it, so a CUDA step
    can exceed this roof; on an AVX-512 CPU also ahnet_fast's product kernel's, kernel_fp32_GFLOPs)
    and copy bandwidth (a 256 MiB / 1 GiB copy, read + write), medians of five:
    the roofs a step's time is judged against."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def median_s(fn):
        fn()
        sync()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    n = 1 << 26 if dev.type == "cpu" else 1 << 28
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    copy_gbps = 2 * src.numel() * 4 / median_s(lambda: dst.copy_(src)) / 1e9
    del src, dst
    m = 2048 if dev.type == "cpu" else 8192
    a, b = torch.randn(m, m, device=dev), torch.randn(m, m, device=dev)
    out = {"copy_GBps": copy_gbps, "matmul_fp32_GFLOPs": 2 * m ** 3 / median_s(lambda: a @ b) / 1e9}
    # (through torch.ops, not ahnet_fast.ops: this layer calls the model, not the ops)
    if dev.type == "cpu" and hasattr(torch.ops.ahnet_fast, "channel_mm_isa") and \
            torch.ops.ahnet_fast.channel_mm_isa() == "avx512":
        # ahnet_fast's own product kernel on the same product: on AMD CPUs MKL's torch.mm runs AVX2
        # code, and this is the rate the machine reaches with AVX-512
        c = torch.empty(m, m)
        out["kernel_fp32_GFLOPs"] = 2 * m ** 3 / median_s(
            lambda: torch.ops.ahnet_fast.channel_mm_(c, a, b, None, None, False)) / 1e9
    return out


def fp32_product_ceiling(ceilings: dict) -> float:
    """The faster of torch.mm's and ahnet_fast's kernel's fp32 rate on the ceiling's square product."""
    return max(ceilings["matmul_fp32_GFLOPs"], ceilings.get("kernel_fp32_GFLOPs") or 0.0)


def step_flops(size, mode: str, out_channels: int = 3) -> int:
    """FLOPs of MONAI's AHNet step at 1x1xsize (torch.utils.flop_counter: convolutions and matrix
    products, forward, and in training the backward too; elementwise work counts 0), counted by
    running that step once on the CPU. ahnet_fast computes the same products (its lean training
    recomputes some in backward: not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    net, loss_fn, x, y = _build("MONAI", size, out_channels, "cpu")
    with FlopCounterMode(display=False) as counter:
        if mode == "train":
            net.train()
            loss_fn(net(x), y).backward()
        else:
            net.eval()
            with torch.no_grad():
                net(x)
    return int(counter.get_total_flops())


def backends_that_ran(fn) -> tuple[object, dict]:
    """``fn()`` and {op: {backend: calls}}: which backend ran each ahnet_fast op call in it (the
    record every measurement of ahnet_fast carries, see ahnet_fast.backends.recording)."""
    from ahnet_fast import backends

    with backends.recording() as record:
        out = fn()
    return out, record

def _build(impl, size, out_channels, device, seed=0, checkpoint="none"):
    """(model, loss) of one implementation with the same initial weights and the same batch."""
    from monai.networks.nets import AHNet as MonaiAHNet

    torch.manual_seed(seed)
    monai_net = MonaiAHNet(in_channels=1, out_channels=out_channels, psp_block_num=4)
    if impl == "MONAI":
        from monai.losses import FocalLoss as MonaiFocalLoss

        net, loss = monai_net, MonaiFocalLoss(to_onehot_y=True, use_softmax=True)
    else:
        import ahnet_fast

        net = ahnet_fast.AHNet(in_channels=1, out_channels=out_channels, psp_block_num=4, checkpoint=checkpoint)
        net.load_state_dict(monai_net.state_dict(), strict=True)
        loss = ahnet_fast.FocalLoss(to_onehot_y=True, use_softmax=True)
        del monai_net
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, 1, *size, generator=g)
    y = torch.randint(0, out_channels, (1, 1, *size), generator=g)
    return net.to(device), loss, x.to(device), y.to(device)


def parse_impl(impl: str) -> dict:
    """A row's name, ``name[:checkpoint][+extra...][/precision][@layout]`` (e.g. ``ahnet_fast:all``,
    ``MONAI+compile``, ``ahnet_fast/bf16``, ``MONAI@channels_last_3d``), as its parts."""
    rest, _, layout = impl.partition("@")
    rest, _, precision = rest.partition("/")
    head, *extras = rest.split("+")
    name, _, checkpoint = head.partition(":")
    return dict(name=name, checkpoint=checkpoint or "none", extras=set(extras), precision=precision or None,
                layout=layout or "contiguous")


def run_one(impl, size, mode, repeats, device, amp, out_channels=3, checkpoint="none", layout="contiguous",
            fused_adam=False, compile_model=False, profile=False):
    """In a fresh process: {"ms": [...], "peak_bytes": int, "first_loss": float, "warmup_s": float}
    (repeats = 0: peak only). ``compile_model``: the model under torch.compile (its warm-up step
    compiles it). ``profile``: after the timed steps, one more under torch.profiler
    (profile_by_kind: where the time goes)."""
    device = torch.device(device)
    net, loss_fn, x, y = _build(impl, size, out_channels, device, checkpoint=checkpoint)
    if layout == "channels_last_3d":  # model and input, as a user would switch it
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    if compile_model:
        net = torch.compile(net)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")
    if mode == "train":
        net.train()
        # torch's default Adam for both (a for-loop over the parameters on CPU); fused_adam: the
        # single-kernel Adam that ahnet_fast's training loop uses (rows '+fused_adam')
        opt = torch.optim.Adam(net.parameters(), lr=1e-4, **({"fused": True} if fused_adam else {}))

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast:
                out = net(x)
            loss = loss_fn(out.float(), y)
            loss.backward()
            opt.step()
            return loss.detach()
    else:
        net.eval()

        def step():
            with torch.no_grad(), autocast:
                return net(x).float().mean()

    # warm-up (and the optimizer state; under torch.compile the compilation), recording which backend
    # ran each of ahnet_fast's ops
    t0 = time.perf_counter()
    first, ran = (step(), {}) if impl == "MONAI" else backends_that_ran(step)
    first = float(first)
    sync()
    warmup_s = time.perf_counter() - t0
    if repeats:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
        result = {"ms": [t * 1e3 for t in times], "first_loss": first, "backends": ran, "warmup_s": warmup_s}
        if profile:
            result["profile"] = profile_by_kind(step, device.type)
        return result
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        if impl != "MONAI":  # the reused scratch buffers count in the step's peak, not in what precedes it
            from ahnet_fast import _scratch

            _scratch.release()
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = rss_bytes("VmRSS")
        step()
        peak = rss_bytes("VmHWM") - before
    return {"peak_bytes": peak, "first_loss": first, "backends": ran, "warmup_s": warmup_s}


def best_alternative(impl: str, medians: dict, precision: dict) -> str | None:
    """For an ahnet_fast row: the fastest MONAI row of its precision (what a user would pick instead)."""
    if parse_impl(impl)["name"] != "ahnet_fast":
        return None
    same = [i for i in medians if parse_impl(i)["name"] == "MONAI" and precision[i] == precision[impl]]
    return min(same, key=medians.get) if same else None


def _quantile(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 128, 32], help="H W D [H W D ...]")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="timing processes per implementation, alternated")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="off", choices=("off", "bf16"))
    parser.add_argument("--modes", nargs="+", default=["train", "infer"], choices=("train", "infer"))
    parser.add_argument("--checkpoint", nargs="+", default=["none"], choices=("none", "encoder", "decoder", "all"),
                        help="ahnet_fast's checkpoint policies to run (each its own rows)")
    parser.add_argument("--channels-last", action="store_true",
                        help="also MONAI and ahnet_fast with model and input in channels_last_3d (rows '@channels_last_3d')")
    parser.add_argument("--fused-adam", action="store_true",
                        help="also ahnet_fast with Adam(fused=True), its training loop's optimizer (rows '+fused_adam'; "
                             "MONAI keeps torch's default Adam, so these rows compare more than the model)")
    parser.add_argument("--alternatives", action="store_true",
                        help="also what a user would pick instead: torch.compile(MONAI) ('MONAI+compile'), MONAI under "
                             "bf16 autocast ('MONAI/bf16'), and ahnet_fast in bf16 ('ahnet_fast/bf16')")
    parser.add_argument("--compile-ours", action="store_true", help="also ahnet_fast under torch.compile")
    parser.add_argument("--profile", action="store_true",
                        help="also where each row's time goes (one step under torch.profiler, by kind of op), the "
                             "step's FLOPs and this machine's matmul and copy ceilings: the roof a step is judged against")
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # internal: impl size mode repeats
    args = parser.parse_args(argv)
    if args.one:
        impl, size, mode, repeats = args.one
        part = parse_impl(impl)
        print(json.dumps(run_one(part["name"], tuple(json.loads(size)), mode, int(repeats), args.device,
                                 part["precision"] or args.amp, checkpoint=part["checkpoint"], layout=part["layout"],
                                 fused_adam="fused_adam" in part["extras"], compile_model="compile" in part["extras"],
                                 profile=args.profile)))
        return 0
    if len(args.sizes) % 3:
        parser.error("--sizes takes H W D triples")
    import importlib.util

    if importlib.util.find_spec("monai") is None:
        raise ValueError("bench compares with MONAI's AHNet, and MONAI is not installed: pip install monai==1.6.1")
    sizes = [tuple(args.sizes[i:i + 3]) for i in range(0, len(args.sizes), 3)]
    name = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    # torch.compile's caches start empty in every run (one folder for its processes): the first compiled
    # process compiles as a user's first run would, the later ones reuse its kernels
    compile_cache = tempfile.mkdtemp(prefix="ahnet_fast_bench_inductor_")
    atexit.register(shutil.rmtree, compile_cache, True)  # also when a run fails part-way
    timing_env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=compile_cache)
    env = dict(timing_env, MALLOC_MMAP_THRESHOLD_="65536")
    lines = [f"# AH-Net end to end, ahnet_fast vs MONAI — {datetime.date.today()}, {name} ({args.device}), torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads, amp {args.amp}", "",
             "Training step = forward + focal loss (softmax, 3 classes) + backward + Adam (torch's default, for both; "
             "'+fused_adam': ahnet_fast with Adam(fused=True), its training loop's optimizer), batch 1; inference = "
             f"forward under no_grad. Median of {args.rounds} x {args.repeats} steps (20th-80th percentile), "
             "fresh processes alternating the implementations; peak = memory the step adds over what exists before it (CPU: VmHWM - RSS with "
             "MALLOC_MMAP_THRESHOLD_=65536; CUDA: max_memory_allocated - memory_allocated). Same initial "
             "weights and batch: 'first loss' is the warm-up step's loss of each.", "",
             "| mode | input | impl | ms (p20-p80) | voxels/s | speed vs MONAI | vs best alternative | peak MiB | "
             "peak vs MONAI | first loss (infer: mean output) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    records = []
    for mode in args.modes:
        for size in sizes:
            impls = ["MONAI"] + [f"ahnet_fast:{c}" if c != "none" else "ahnet_fast" for c in args.checkpoint
                                 if mode == "train" or c == "none"]
            if args.channels_last:
                impls += ["MONAI@channels_last_3d", "ahnet_fast@channels_last_3d"]
            if args.fused_adam and mode == "train":
                impls.append("ahnet_fast+fused_adam")
            if args.alternatives:
                impls += ["MONAI+compile", "MONAI/bf16", "ahnet_fast/bf16"]
            if args.compile_ours:
                impls.append("ahnet_fast+compile")
            res = {impl: {"ms": []} for impl in impls}

            def one(impl, repeats, environment, profile=False):
                cmd = [sys.executable, "-m", "ahnet_fast.benchmark", "--device", args.device, "--amp", args.amp, "--one", impl,
                       json.dumps(list(size)), mode, str(repeats)] + (["--profile"] if profile else [])
                out = subprocess.run(cmd, capture_output=True, text=True, env=environment)
                if out.returncode != 0:
                    raise RuntimeError(f"{impl} {mode} {size} failed:\n{out.stderr[-3000:]}")
                return json.loads(out.stdout.strip().splitlines()[-1])

            # timing rounds alternate the implementations, so that a slow spell of a shared machine
            # falls on both; the peak is measured once each, in its own process
            for round_ in range(args.rounds):
                for impl in impls:
                    r = one(impl, args.repeats, timing_env, profile=args.profile and round_ == 0)
                    if "profile" in r:
                        res[impl]["profile"] = r["profile"]
                    res[impl]["ms"] += r["ms"]
                    res[impl]["first_loss"] = r["first_loss"]
                    res[impl]["backends"] = r["backends"]
                    res[impl].setdefault("warmup_s", []).append(r["warmup_s"])
            for impl in impls:
                res[impl]["peak_bytes"] = one(impl, 0, env)["peak_bytes"]
            base = res["MONAI"]
            flops = step_flops(size, mode) if args.profile else None
            voxels = size[0] * size[1] * size[2]
            medians = {impl: statistics.median(res[impl]["ms"]) for impl in impls}
            precision = {impl: parse_impl(impl)["precision"] or ("bf16" if args.amp == "bf16" else "fp32")
                         for impl in impls}
            for impl in impls:
                r, med = res[impl], medians[impl]
                best = best_alternative(impl, medians, precision)
                # compile time: the warm-up steps (the first compiles, the later ones may hit the cache)
                # less one step's time; reported for the compiled rows
                compile_s = (max(r["warmup_s"]) - med / 1e3) if "compile" in parse_impl(impl)["extras"] else None
                lines.append(f"| {mode} | 1x1x{size[0]}x{size[1]}x{size[2]} | {impl}"
                             f"{f' (compile {compile_s:.0f} s)' if compile_s is not None else ''} | {med:.0f} "
                             f"({_quantile(r['ms'], 0.2):.0f}-{_quantile(r['ms'], 0.8):.0f}) | "
                             f"{voxels / med * 1e3 / 1e6:.2f} M | {statistics.median(base['ms']) / med:.2f}x | "
                             f"{f'{medians[best] / med:.2f}x vs {best}' if best else '—'} | "
                             f"{r['peak_bytes'] / 2**20:.0f} | {r['peak_bytes'] / base['peak_bytes']:.2f}x | "
                             f"{r['first_loss']:.6f} |")
                print(lines[-1], flush=True)
                records.append(dict(mode=mode, shape=[1, 1, *size], impl=impl, median_ms=med,
                                    p20_ms=_quantile(r["ms"], 0.2), p80_ms=_quantile(r["ms"], 0.8), ms=r["ms"],
                                    peak_bytes=r["peak_bytes"], first_loss=r["first_loss"], precision=precision[impl],
                                    warmup_s=r["warmup_s"], compile_s=compile_s,
                                    backends=r["backends"] or None,  # None: MONAI, no ahnet_fast op ran
                                    **({"profile": r["profile"]} if "profile" in r else {}),
                                    **({"flops": flops} if args.profile else {})))
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text("\n".join(lines) + "\n")
    if args.json:
        with atomic_path(args.json) as tmp:
            extra = {"ceilings": machine_ceilings(args.device)} if args.profile else {}
            tmp.write_text(_json.dumps(dict(run_info(args.device, name), amp=args.amp, results=records, **extra), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
