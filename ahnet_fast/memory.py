"""How much memory an AH-Net training step needs, before running it, and which configuration fits.

:func:`estimate_training_memory` traces one forward of the model's configuration on fake tensors
(``FakeTensorMode``: shapes only, no memory, ~2 s), with the same fused ops, backend and
checkpoint policy the real step would use, and counts what autograd keeps for backward
(``saved_tensors_hooks``, each storage once, parameters excluded). With checkpointing, the
segments' insides are dropped by ``torch.utils.checkpoint`` and only their boundaries are counted;
the largest segment is rebuilt during backward, so its inside (counted in a second trace, per
segment) is added. The workspace term covers what the trace does not see: backward's transients
and forward temporaries alive next to the kept tensors, by a calibration on the CPU step (see
``STEP_FACTOR``) checked against measured peaks (``benchmarks/bench_memory.py``,
``benchmarks/results/memory_cpu.md``); under autocast it includes the 16-bit weight copies.

Parameters, gradients and optimizer state are counted exactly (float32 master weights; Adam keeps
two moments, SGD with momentum one, plain SGD none). Under bf16/fp16 autocast the activations are
traced in that dtype.

:func:`plan` searches precision x checkpoint policy x batch size for the fastest configuration that
fits a budget; ``ahnet-fast plan --budget 16GB --shape 512 512 64`` prints it as a table.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["MemoryEstimate", "InferenceEstimate", "estimate_training_memory", "estimate_inference_memory", "plan",
           "plan_inference", "parse_bytes", "training_floor", "live_set_tracker", "WORKSPACE_FACTOR"]

# The step's peak over the traced bytes kept for backward: backward's transients (1.7x the largest
# kept tensor: an input gradient next to its tensor, a recomputed activation), then 1.11x that plus
# 42 MiB for what the trace does not see (forward temporaries alive next to the kept tensors,
# allocator fragmentation, library workspaces). Calibrated on the CPU step at 1x1x128x128x32 and
# 1x1x256x256x32 without checkpointing (two points, two constants); validated on the other
# configurations of benchmarks/bench_memory.py (benchmarks/results/memory_cpu.md). Recalibrated when
# the dense block's backward stopped holding its widest temporaries together (the factor was 1.47),
# and when the dense block's backward stopped allocating zero gradients and a copy of its output
# gradient and the stem stopped allocating its convolution's whole output (it was 1.2x + 56 MiB,
# which then overestimated by up to 17%).
WORKSPACE_FACTOR = 1.7
STEP_FACTOR = 1.11
STEP_OVERHEAD = 42 * 2**20
# What those constants were fitted on: the model of benchmarks/bench_memory.py (MONAI's default AHNet,
# 3 classes, psp_block_num=4; Adam; two training steps) at these (input shape, checkpoint, precision).
# tests/test_memory.py judges the planner's accuracy on configurations other than these.
CALIBRATION_MODEL = {"in_channels": 1, "out_channels": 3, "psp_block_num": 4}
CALIBRATION_POINTS = (((1, 1, 128, 128, 32), "none", "fp32"), ((1, 1, 256, 256, 32), "none", "fp32"),
                      ((1, 1, 128, 128, 32), "all", "fp32"), ((1, 1, 256, 256, 32), "all", "fp32"))
# checkpoint="all" has a model of its own, because its peak has a known shape: it comes in the last
# stage's backward (benchmarks/trace_memory.py --checkpoint all), where every segment boundary is
# held (the traced bytes checkpointing keeps, the final block's input among them) with that input's
# gradient (the largest kept tensor's size again) and the last dense block's own working set (one
# layer's a, band buffers), which grows with the same maps:
# peak = ALL_FACTOR * (kept + largest) + ALL_OVERHEAD (band buffers, the loss, library state).
# Refitted after the gradient handover and the narrower stage boundaries, on the fp32 steps of
# benchmarks/results/memory_scaling_cpu_2026-12-06g.json (128, 256, 384 in-plane) and the bf16
# 512x512x256 slab of memory_slab_cpu_2026-12-06d.json: the pair that never underestimates any of them
# with the least largest error (1.00x, 1.14x, 1.14x, 1.00x). A line through two points alone does
# worse: 128 and 384 predict the slab at 0.81x (the small step's peak is not the last stage's).
# (Before: 1.51 and 156 MiB, which overestimated the new 256 and 384 steps by 1.19x; 1.68 and 158 MiB
# until the lean dense block stopped saving a.)
ALL_FACTOR = 1.44
ALL_OVERHEAD = 126 * 2**20
ALL_FIT_POINTS = (((1, 1, 128, 128, 32), "all", "fp32"), ((1, 1, 256, 256, 32), "all", "fp32"),
                  ((1, 1, 384, 384, 32), "all", "fp32"), ((1, 1, 512, 512, 256), "all", "bf16"))
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd": 0, "sgd_momentum": 1}
# relative step time of each choice (measured on CPU, benchmarks/results/e2e_cpu.md; on GPUs bf16 is
# the faster precision): the planner's order of preference, fastest first
# (benchmarks/results/e2e_cpu_2026-12-06d.json, 128x128x32 and 256x256x32, after the lean dense block's
# forward stopped writing c1 and a + b whole (their units run twice from rows): "encoder" 1.20x and 1.24x
# "none", "decoder" 1.72x and 1.72x, "all" 1.84x and 1.94x. Before that (e2e_cpu_2026-12-06c, the
# products and the 3x3x1 / 1x1x3 convolutions on the AVX-512 kernels of ops.channel_mm) 1.11/1.29,
# 1.49/1.81, 1.75/2.02; "none" gained more from those kernels than the recomputations did. Before them (e2e_cpu_2026-12-06b)
# 1.16/1.35, 1.47/1.76, 1.62/1.95; before the product kernels 1.19/1.34, 1.69/1.75, 2.00/1.99)
CHECKPOINT_COST = {"none": 1.0, "encoder": 1.2, "decoder": 1.7, "all": 1.9}
PRECISION_COST = {"bf16": 0.5, "fp16": 0.5, "fp32": 1.0}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step; ``total`` is what the process needs at its peak."""

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    workspace: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.activations + self.workspace

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def parse_bytes(text: str | int) -> int:
    """'16GB', '16 GiB', '512MB', '1.5e9' or an int -> bytes (GB = GiB = 2**30 here, as GPUs are sold)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    for suffix, scale in (("TIB", 2**40), ("TB", 2**40), ("GIB", 2**30), ("GB", 2**30), ("G", 2**30),
                          ("MIB", 2**20), ("MB", 2**20), ("M", 2**20), ("KIB", 2**10), ("KB", 2**10), ("B", 1)):
        if s.endswith(suffix):
            try:
                return int(float(s[:-len(suffix)]) * scale)
            except ValueError:
                break
    try:
        return int(float(s))
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size: use e.g. '16GB', '512MB' or a number of bytes") from None


def _config(model: nn.Module) -> dict:
    from ahnet_fast.nn.ahnet import AHNet

    if not isinstance(model, AHNet):
        raise ValueError(f"estimate_training_memory takes an ahnet_fast.AHNet, got {type(model).__name__}")
    return dict(layers=tuple(len(getattr(model, f"layer{i}")) for i in range(1, 5)), spatial_dims=model.spatial_dims,
                in_channels=model.in_channels, out_channels=model.out_channels, psp_block_num=model.psp_block_num,
                upsample_mode=model.upsample_mode)


def _checked_shape(config: dict, shape, what: str) -> tuple[int, ...]:
    """``shape`` as (N, in_channels, *spatial) ints that the configuration takes (AH-Net's size rule),
    else ValueError starting with ``what``."""
    from ahnet_fast.nn.shapes import check_ahnet_input

    shape = tuple(int(s) for s in shape)
    if len(shape) != config["spatial_dims"] + 2 or shape[1] != config["in_channels"]:
        raise ValueError(f"{what} must be (N, {config['in_channels']}, {config['spatial_dims']} spatial sizes), "
                         f"got {shape}")
    check_ahnet_input(torch.empty(shape, device="meta"), config["spatial_dims"], config["in_channels"],
                      config["psp_block_num"], config["upsample_mode"])
    return shape


def _trace(config: dict, shape: tuple[int, ...], dtype: torch.dtype, checkpoint: str, per_segment: bool = False):
    """(bytes kept outside checkpointed segments, largest kept tensor, {segment: bytes kept inside})."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ahnet_fast.nn.ahnet import AHNet

    seen: dict[int, int] = {}
    largest = [0]
    inside: dict[str, int] = {}
    current: list[str] = []
    # fake CPU tensors: the CUDA path's ops keep the same tensors (same custom ops, other kernels), and
    # this way a machine without a GPU can plan for one
    with FakeTensorMode(), torch.device("cpu"):
        net = AHNet(**config, checkpoint=checkpoint).train()
        params = {p.untyped_storage()._cdata for p in net.parameters()}
        x = torch.empty(shape, requires_grad=True)
        # autocast keeps activations in its 16-bit dtype (statistics and indices keep theirs): traced in
        # float32 and counted at the 16-bit size
        scale = 0.5 if dtype in (torch.bfloat16, torch.float16) else 1.0

        def pack(t):
            storage = t.untyped_storage()
            key = storage._cdata
            if key not in params and key not in seen:
                n = int(storage.nbytes() * scale) if t.dtype == torch.float32 and t.dim() > 1 else storage.nbytes()
                seen[key] = n
                largest[0] = max(largest[0], n)
                if current:
                    inside[current[-1]] = inside.get(current[-1], 0) + n
            return t

        hooks = []
        if per_segment:
            for name, module in net.named_modules():
                segment = _segment_of(name)
                if segment is not None:
                    hooks.append(module.register_forward_pre_hook(lambda m, a, n=segment: current.append(n)))
                    hooks.append(module.register_forward_hook(lambda m, a, o: current.pop() and None))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(x)
        for h in hooks:
            h.remove()
    return sum(seen.values()), largest[0], inside


_STAGE_OF = {"up0": "stage0", "dense0": "stage0", "up1": "stage1", "dense1": "stage1", "up2": "stage2",
             "dense2": "stage2", "trans1": "stage3", "dense3": "stage3", "up3": "stage4", "dense4": "stage4",
             "psp": "head", "final": "head", "conv1": "stem", "bn0": "stem"}


def _segment_of(name: str) -> str | None:
    """The checkpoint segment (AHNet.forward's) a top-level module or bottleneck block belongs to."""
    parts = name.split(".")
    if len(parts) == 2 and parts[0].startswith("layer"):
        return name
    return _STAGE_OF.get(name) if len(parts) == 1 else None


_SEGMENT_GROUPS = {
    "encoder": lambda n: n.startswith("layer"),
    "decoder": lambda n: n.startswith(("stage", "head")),
    "stem": lambda n: n == "stem",
}


def estimate_training_memory(model: nn.Module, input_shape, *, dtype: str | torch.dtype = "fp32",
                             checkpoint: str | None = None, optimizer: str = "adam") -> MemoryEstimate:
    """Bytes of a training step of ``model``'s configuration on an input of ``input_shape`` (N, C, ...).

    dtype: "fp32", or "bf16" / "fp16" for autocast (master weights stay float32).
    checkpoint: the policy ("none", "encoder", "decoder", "all"); None takes the model's own.
    optimizer: "adam", "adamw", "sgd" or "sgd_momentum".

    The same tensors are kept for backward on CPU and CUDA; framework overheads (cuDNN workspaces, the
    CUDA context, allocator rounding) are not included. checkpoint="all" is modelled on the CPU step,
    whose dense blocks and units run in bands inside segments (ahnet_fast.ops._bands); the CUDA
    path does not band, so its last dense block's backward holds more than this estimate assumes
    (unmeasured: no GPU run yet).
    """
    config = _config(model)
    precision = _precision_name(dtype)
    policy = model.checkpoint if checkpoint is None else checkpoint
    from ahnet_fast.nn._checkpoint import POLICIES

    if policy not in POLICIES or policy == "auto":
        raise ValueError(f"estimate_training_memory: checkpoint must be one of {POLICIES[:-1]}, got {policy!r}")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"estimate_training_memory: optimizer must be one of {tuple(OPTIMIZER_STATES)}, got "
                         f"{optimizer!r}")
    shape = _checked_shape(config, input_shape, "estimate_training_memory: input_shape")
    params = sum(p.numel() * 4 for p in model.parameters())
    kept, largest, _ = _trace(config, shape, PRECISIONS[precision], policy)
    rebuilt = 0
    if policy != "none":
        _, _, inside = _trace(config, shape, PRECISIONS[precision], "none", per_segment=True)
        groups = ["encoder", "decoder", "stem"] if policy == "all" else [policy]
        rebuilt = max((b for name, b in inside.items() if any(_SEGMENT_GROUPS[g](name) for g in groups)), default=0)
    activations = kept + rebuilt
    step_peak = STEP_FACTOR * (activations + WORKSPACE_FACTOR * largest) + STEP_OVERHEAD
    if policy == "all":
        # the peak's own model (ALL_FACTOR): the general one overestimates the banded step as the maps
        # grow (1.2x at 256x256x32, 1.5x at 512x512x256), while the fitted line's constant makes it
        # the larger of the two on small inputs, where the general one was within tolerance
        activations = kept
        step_peak = min(step_peak, ALL_FACTOR * (kept + largest) + ALL_OVERHEAD)
    if precision != "fp32":  # autocast keeps a 16-bit copy of every weight for the step
        step_peak += params // 2
    return MemoryEstimate(parameters=params, gradients=params,
                          optimizer_state=OPTIMIZER_STATES[optimizer] * params,
                          activations=activations, workspace=int(step_peak) - activations)


def training_floor(model: nn.Module, input_shape, *, dtype: str | torch.dtype = "fp32",
                   optimizer: str = "adam") -> dict:
    """The least memory a training step of ``model`` with activation checkpointing can take without
    tiling the maps, and its arithmetic: when the last dense block's backward ends, these must
    coexist, whatever the implementation:

    - parameters, gradients and optimizer state;
    - every segment boundary (what checkpoint="all" keeps: the later-recomputed segments' inputs and
      the skips; traced as :func:`estimate_training_memory` traces them), the final block's input
      among them (the pyramid levels and the last dense block's output in one tensor, recomputed
      for that block's backward: the same size);
    - the gradient of that input (its size again; the dense block's output gradient is part of it,
      handed over in place);
    - the gradient of the block's input, which the block's backward produces (its input channels).

    Returns a dict of the terms in bytes and their ``total``. Anything a measured peak holds beyond
    it is the implementation's: recomputed temporaries, band buffers, library workspaces."""
    config = _config(model)
    precision = _precision_name(dtype)
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"training_floor: optimizer must be one of {tuple(OPTIMIZER_STATES)}, got {optimizer!r}")
    shape = _checked_shape(config, input_shape, "training_floor: input_shape")
    params = sum(p.numel() * 4 for p in model.parameters())
    kept, largest, _ = _trace(config, shape, PRECISIONS[precision], "all")
    last = list(model.dense4.children())
    channels_in = last[0].bn1.num_features
    channels_out = channels_in + sum(layer.conv4.out_channels for layer in last)
    terms = dict(parameters=params, gradients=params, optimizer_state=OPTIMIZER_STATES[optimizer] * params,
                 boundaries=kept, last_block_output_gradient=largest,
                 last_block_input_gradient=largest // (channels_out + model.psp_block_num) * channels_in)
    return {**terms, "total": sum(terms.values())}


def _precision_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        for name, dt in PRECISIONS.items():
            if dt == dtype:
                return name
    elif dtype in PRECISIONS:
        return dtype
    raise ValueError(f"dtype must be one of {tuple(PRECISIONS)} (or the torch dtypes), got {dtype!r}")


def plan(budget_bytes, input_shape, *, model: nn.Module | None = None, precisions=("bf16", "fp32"),
         checkpoints=("none", "encoder", "decoder", "all"), max_batch: int = 8, optimizer: str = "adam") -> dict:
    """The fastest (precision, checkpoint policy, batch size) whose estimated peak fits the budget.

    ``input_shape`` is one sample's (C, *spatial) or (*spatial) with one input channel. Returns a dict
    with "precision", "checkpoint", "batch", "estimate" (a :class:`MemoryEstimate`) and "table" (every
    configuration tried, fitting or not); raises ValueError when nothing fits, saying the smallest need.
    Faster = more samples per second by the relative costs measured for precision and checkpointing
    (``PRECISION_COST``, ``CHECKPOINT_COST``)."""
    from ahnet_fast.nn.ahnet import AHNet

    budget = parse_bytes(budget_bytes)
    if model is None:
        with torch.device("meta"):
            model = AHNet(in_channels=1, out_channels=3, psp_block_num=4)
    sample = tuple(int(s) for s in input_shape)
    if len(sample) == model.spatial_dims:
        sample = (model.in_channels, *sample)
    table = []
    best = None
    for precision in precisions:
        for policy in checkpoints:
            for batch in range(1, max_batch + 1):
                est = estimate_training_memory(model, (batch, *sample), dtype=precision, checkpoint=policy,
                                               optimizer=optimizer)
                fits = est.total <= budget
                speed = batch / (PRECISION_COST[precision] * CHECKPOINT_COST[policy])
                table.append(dict(precision=precision, checkpoint=policy, batch=batch, total=est.total, fits=fits,
                                  relative_speed=speed))
                if not fits:
                    break  # a larger batch needs more
                if best is None or speed > best[0]:
                    best = (speed, dict(precision=precision, checkpoint=policy, batch=batch, estimate=est))
    if best is None:
        smallest = min(table, key=lambda r: r["total"])
        raise ValueError(f"plan: nothing fits {budget / 2**30:.2f} GiB; the smallest configuration "
                         f"({smallest['precision']}, checkpoint={smallest['checkpoint']}, batch 1) needs "
                         f"{smallest['total'] / 2**30:.2f} GiB")
    return {**best[1], "table": table}



# Inference (``estimate_inference_memory``): the peak of the eval-mode forward as a user measures it
# (VmHWM over the model and the input, a fresh process, MALLOC_MMAP_THRESHOLD_=65536) over the live
# set traced on fake tensors. The trace counts a tensor from its allocation, where the CPU pays for a
# page only once it is written (the last stage's buffer fills channel by channel), and it does not see
# the libraries and caches a first forward loads or the convolutions' band-sized workspaces: a factor
# and a constant, fitted on the CPU forward at the two sizes of INFER_CALIBRATION_POINTS (measured
# 88 and 232 MiB, traced 92 and 256 MiB), judged on others (tests/test_memory.py; 1x1x128x128x64 and
# 1x1x256x128x32 measured 133 and 127 MiB when fitted, estimated 0.91x and 0.95x of that). Refitted
# when the bands' BatchNorm-ReLU moved into the product kernel (ops.channel_mm: no activation written;
# before: 0.845 and 58 MiB on 123 and 274 MiB measured).
INFER_FACTOR = 0.88
INFER_OVERHEAD = 7 * 2**20
INFER_CALIBRATION_POINTS = ((1, 1, 128, 128, 32), (1, 1, 256, 256, 32))


def live_set_tracker():
    """A TorchDispatchMode that follows the bytes alive at once: every op's outputs counted from
    their creation until the last tensor sharing their storage (a view included) is gone; ``.peak``
    is the largest sum seen after an op. Works on fake tensors (planning) and real ones (tests)."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    class LiveSet(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.storages: dict[int, tuple[int, list]] = {}
            self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for key in [k for k, (_, refs) in self.storages.items() if all(r() is None for r in refs)]:
                del self.storages[key]
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    self.storages.setdefault(storage._cdata, (storage.nbytes(), []))[1].append(weakref.ref(t))
            self.peak = max(self.peak, sum(n for n, _ in self.storages.values()))
            return out

    return LiveSet()


def _trace_inference(config: dict, shape: tuple[int, ...]) -> int:
    """The largest live set (bytes) of the eval-mode forward without autograd (AHNet's inference path)
    on fake tensors (:func:`live_set_tracker`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ahnet_fast.nn.ahnet import AHNet

    with FakeTensorMode(), torch.device("cpu"):
        net = AHNet(**config).eval()
        x = torch.empty(shape)
        live = live_set_tracker()
        with torch.no_grad(), live:
            net(x)
    return live.peak


@dataclass(frozen=True)
class InferenceEstimate:
    """Bytes of whole-volume inference: one window's forward and the stitched logits of the volume."""

    parameters: int
    forward: int
    stitching: int

    @property
    def total(self) -> int:
        """Peak over the model and the input (the parameters are counted apart, in ``parameters``)."""
        return self.forward + self.stitching


def estimate_inference_memory(model: nn.Module, window_shape, *, dtype: str | torch.dtype = "fp32",
                              volume=None) -> InferenceEstimate:
    """Bytes of inference with ``model``'s configuration: the eval-mode forward of one window of
    ``window_shape`` (N, C, ...) (AHNet's inference path, traced on fake tensors, see
    ``INFER_FACTOR``; N is the windows per forward), and with ``volume`` (the spatial sizes of one
    whole volume) the blended float32 logits that :func:`ahnet_fast.inference.sliding_window_inference`
    returns for it (C_out x voxels; the weight sum is formed a slab at a time). Calibrated on the CPU: as a user measures the
    peak (over the model and the input, libraries loaded by the first forward included)."""
    config = _config(model)
    precision = _precision_name(dtype)
    if precision != "fp32":
        # Under autocast the weights' 16-bit copies and the activations' sizes do not follow the fp32
        # calibration (measured bf16 peaks were 0.81x and 0.71x the fp32 ones at 1x1x256x256x32 and
        # 1x1x128x128x64, where halving the traced activations predicted 0.61x and 0.64x): the fp32
        # estimate is an upper bound for them, and what is calibrated.
        raise ValueError(f"estimate_inference_memory: calibrated for fp32 only, got {precision}; the fp32 "
                         "estimate bounds a bf16/fp16 forward from above")
    shape = _checked_shape(config, window_shape, "estimate_inference_memory: window_shape")
    forward = int(INFER_FACTOR * _trace_inference(config, shape) + INFER_OVERHEAD)
    stitching = 0
    if volume is not None:
        volume = tuple(int(v) for v in volume)
        if len(volume) != config["spatial_dims"] or any(v < 1 for v in volume):
            raise ValueError(f"estimate_inference_memory: volume must be {config['spatial_dims']} positive sizes, "
                             f"got {volume}")
        stitching = config["out_channels"] * math.prod(volume) * 4
    params = sum(p.numel() * 4 for p in model.parameters())
    return InferenceEstimate(parameters=params, forward=forward, stitching=stitching)


def plan_inference(budget_bytes, volume, *, model: nn.Module | None = None) -> dict:
    """The largest window (most voxels; square in-plane, the sizes AH-Net takes, none larger than the
    volume needs) whose whole-volume fp32 inference fits the budget (a bf16 run needs less). Returns a
    dict with "window", "precision", "estimate" (an :class:`InferenceEstimate`) and "table" (every
    window tried); raises ValueError when not even the smallest window fits, saying what it needs."""
    from ahnet_fast.nn.ahnet import AHNet
    from ahnet_fast.nn.shapes import ahnet_size_ok, nearest_ahnet_sizes

    budget = parse_bytes(budget_bytes)
    if model is None:
        with torch.device("meta"):
            model = AHNet(in_channels=1, out_channels=3, psp_block_num=4)
    if model.spatial_dims != 3:
        raise ValueError("plan_inference plans 3D windows; this AHNet has spatial_dims=2")
    volume = tuple(int(v) for v in volume)
    if len(volume) != 3 or any(v < 1 for v in volume):
        raise ValueError(f"plan_inference: volume must be three positive sizes H W D, got {volume}")

    def sizes(limit, kind):
        # the multiples of 32 AH-Net takes, up to the first that covers `limit` (a larger one is padding)
        def ok(n):
            return ahnet_size_ok(n, kind, model.psp_block_num, model.upsample_mode)

        top = limit if limit % 32 == 0 and ok(limit) else nearest_ahnet_sizes(limit, kind, model.psp_block_num,
                                                                              model.upsample_mode)[1]
        return [n for n in range(32, top + 1, 32) if ok(n)]

    inplane = sizes(max(volume[0], volume[1]), "in-plane")
    depth = sizes(volume[2], "slice")
    table, best = [], None
    for d in depth:
        for s_ in inplane:
            est = estimate_inference_memory(model, (1, model.in_channels, s_, s_, d), volume=volume)
            fits = est.total <= budget
            table.append(dict(precision="fp32", window=[s_, s_, d], forward=est.forward, stitching=est.stitching,
                              total=est.total, fits=fits))
            if not fits:
                break  # a larger in-plane window needs more
            if best is None or s_ * s_ * d > best[0]:
                best = (s_ * s_ * d, dict(window=(s_, s_, d), precision="fp32", estimate=est))
    if best is None:
        smallest = min(table, key=lambda r: r["total"])
        raise ValueError(f"plan_inference: nothing fits {budget / 2**30:.2f} GiB for a {volume} volume; the smallest "
                         f"window {tuple(smallest['window'])} needs "
                         f"{smallest['total'] / 2**30:.2f} GiB, of which the volume's logits "
                         f"{smallest['stitching'] / 2**30:.2f} GiB")
    return {**best[1], "table": table}


def device_budget(device: torch.device) -> int:
    """Memory a training step may use on ``device``: CUDA total memory, or on CPU the memory available
    plus this process's resident set; 10% kept free."""
    if device.type == "cuda":
        return int(0.9 * torch.cuda.get_device_properties(device).total_memory)
    info = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    with open("/proc/self/status") as fh:
        rss = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))
    return int(0.9 * (info.get("MemAvailable", info.get("MemFree", 0)) + rss))


def auto_checkpoint_policy(model: nn.Module, x: torch.Tensor) -> str:
    """checkpoint="auto": the cheapest policy (none, encoder, decoder, all) whose estimated peak fits
    ``model.memory_budget`` (default :func:`device_budget`) for this input and autocast precision,
    assuming Adam; "all" with a warning when nothing fits. Cached per (shape, dtype, device)."""
    device_type = x.device.type
    precision = "fp32"
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        precision = _precision_name(torch.get_autocast_dtype(device_type))
    key = (tuple(x.shape), precision, str(x.device))
    hit = model.auto_choices.get(key)
    if hit is not None:
        return hit["policy"]
    budget = parse_bytes(model.memory_budget) if model.memory_budget is not None else device_budget(x.device)
    tried = {}
    for policy in ("none", "encoder", "decoder", "all"):
        est = estimate_training_memory(model, tuple(x.shape), dtype=precision, checkpoint=policy)
        tried[policy] = est.total
        if est.total <= budget:
            break
    else:
        import warnings

        warnings.warn(f"AHNet(checkpoint='auto'): no policy fits {budget / 2**30:.2f} GiB for input {tuple(x.shape)} "
                      f"({precision}); the smallest, 'all', is estimated at {tried['all'] / 2**30:.2f} GiB. Using it.",
                      stacklevel=3)
    model.auto_choices[key] = {"policy": policy, "budget": budget, "estimates": tried}
    return policy


def _register():
    from ahnet_fast.nn._checkpoint import set_auto_resolver

    set_auto_resolver(auto_checkpoint_policy)


_register()
