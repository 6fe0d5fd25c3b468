"""How each anisotropic convolution of AH-Net is computed: the choice among the paths of
:mod:`ahnet_fast.ops._conv_paths` (``aten``, ``matmul``, ``shift``, ``folded``, ``slice_fold``) and the
Triton engine's own convolution (``triton``), per shape.

The convolutions behind a BatchNorm+ReLU (``ops.bn_relu_conv``, ``ops.dense_block``) and the stem's
(``ops.stem_conv_pool``) ask :func:`choose` which path computes them. Every path has an entry in
:data:`PATH_TABLE` with the reasons it cannot compute a call; among those that can, a static rule
from the CPU measurements (``benchmarks/results/aniso_conv_cpu.md``) picks, unless measuring is on
(``AHNET_FAST_CONV_TUNE=1`` or :func:`set_tuning`), which times every candidate once per (device,
dtype, shapes, layout, stride, padding, direction, engine candidates) and keeps the fastest. Every
choice is recorded with its reason (:func:`choices`); :func:`save_choices` / :func:`load_choices`
write and read them as JSON, so a run can be repeated with the same paths. ``use_path(name)``
forces a path wherever it is a candidate (``use_path("aten")``: eager PyTorch's arithmetic).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ahnet_fast._layout import is_channels_last
from ahnet_fast.ops import channel_mm
from ahnet_fast.ops._conv_paths import SLICE_FOLD_MAX_CHANNELS, backward, forward

__all__ = ["PATHS", "PATH_TABLE", "candidates", "path_reasons", "choose", "choices", "save_choices",
           "load_choices", "clear_choices", "set_tuning", "use_path", "forced_path"]

_choices: dict[str, dict] = {}
_tuning: bool | None = None
_forced: str | None = None


@contextlib.contextmanager
def use_path(path: str | None):
    """Within the block every convolution takes ``path`` where it is a candidate (else ``aten``),
    nothing recorded: e.g. ``use_path("aten")`` reproduces eager PyTorch's arithmetic exactly."""
    global _forced
    if path is not None and path not in PATHS:
        raise ValueError(f"use_path: unknown path {path!r}; the paths are {PATHS}")
    previous, _forced = _forced, path
    try:
        yield
    finally:
        _forced = previous


def forced_path() -> str | None:
    """The path forced by the innermost :func:`use_path` block, or None."""
    return _forced


def set_tuning(enabled: bool | None) -> None:
    """Measure candidates (True), use the static rule (False), or follow AHNET_FAST_CONV_TUNE (None)."""
    global _tuning
    _tuning = enabled


def tuning() -> bool:
    return _tuning if _tuning is not None else os.environ.get("AHNET_FAST_CONV_TUNE", "0") == "1"


def _same_size(weight, padding) -> bool:
    return all(k % 2 == 1 and p == (k - 1) // 2 for k, p in zip(weight.shape[2:], padding))


@dataclass(frozen=True)
class ConvPath:
    """One path: ``not_supported_reasons(a, weight, stride, padding)`` says why it cannot compute
    a convolution (empty when it can)."""

    name: str
    not_supported_reasons: Callable[..., list[str]]


def _matmul_reasons(a, weight, stride, padding):
    reasons = []
    if any(s != 1 for s in stride):
        reasons.append("strided (the strided 1x1x1 is ops.pointwise_conv's)")
    if any(k != 1 for k in weight.shape[2:]) or any(padding):
        reasons.append("not a 1x1x1 kernel without padding")
    return reasons


def _shift_reasons(a, weight, stride, padding):
    reasons = []
    if any(s != 1 for s in stride) or not _same_size(weight, padding):
        reasons.append("needs stride 1 and same-size padding")
    if is_channels_last(a):
        reasons.append("needs a channel-first input")
    if all(k == 1 for k in weight.shape[2:]):
        reasons.append("a 1x1x1 kernel has one tap")
    return reasons


def _folded_reasons(a, weight, stride, padding):
    kernel = tuple(weight.shape[2:])
    if a.dim() != 5 or not a.is_contiguous():
        return ["needs a contiguous 5D input (the fold is a view)"]
    reasons = []
    if any(s != 1 for s in stride) or not _same_size(weight, padding):
        reasons.append("needs stride 1 and same-size padding")
    if not (kernel[2] == 1 or kernel[:2] == (1, 1)) or all(k == 1 for k in kernel):
        reasons.append(f"the kernel {kernel} is not k x k x 1 or 1 x 1 x k")
    return reasons


def _slice_fold_reasons(a, weight, stride, padding):
    if a.dim() != 5 or weight.dim() != 5:
        return ["needs a 5D input"]
    reasons = []
    if weight.shape[4] == 1:
        reasons.append("no slice taps to fold")
    if stride[2] != 1:
        reasons.append("strided along the slices")
    if not 0 <= padding[2] < weight.shape[4]:
        reasons.append("slice padding as wide as the kernel")
    if a.shape[1] * weight.shape[4] > SLICE_FOLD_MAX_CHANNELS:
        reasons.append(f"{a.shape[1]} x {weight.shape[4]} folded channels > {SLICE_FOLD_MAX_CHANNELS}")
    return reasons


# The table of paths, in the order they are tried when measuring. ``triton`` is not here: it is
# the Triton engine's own convolution (ops.bn_relu_conv.TritonEngine), offered as an extra candidate.
PATH_TABLE = (
    ConvPath("aten", lambda *args: []),
    ConvPath("matmul", _matmul_reasons),
    ConvPath("shift", _shift_reasons),
    ConvPath("folded", _folded_reasons),
    ConvPath("slice_fold", _slice_fold_reasons),
)
PATHS = tuple(p.name for p in PATH_TABLE) + ("triton",)


def candidates(a: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int]) -> list[str]:
    """The paths of :data:`PATH_TABLE` that can compute this convolution."""
    return [p.name for p in PATH_TABLE if not p.not_supported_reasons(a, weight, stride, padding)]


def path_reasons(a: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int]
                 ) -> dict[str, list[str]]:
    """For every path, why it cannot compute this convolution (empty list: it can)."""
    return {p.name: p.not_supported_reasons(a, weight, stride, padding) for p in PATH_TABLE}


def rule(direction: str, a: torch.Tensor, weight: torch.Tensor, paths: list[str]) -> str:
    """The static choice, from the CPU measurements (benchmarks/results/aniso_conv_cpu.md)."""
    if a.device.type != "cpu":
        return "aten"
    if "slice_fold" in paths:
        return "slice_fold"
    if "matmul" in paths:
        return "matmul"
    if "shift" in paths:
        # where ops.channel_mm's convolution kernel runs the shift forward (no tap maps) it beats
        # oneDNN's 3D convolution about twice over on the larger maps (the encoder's 64- and 128-channel
        # 3x3x1 at 32x32x8 and up: 1.7 vs 2.9 and 4.9 vs 8.1 ms with the BatchNorm-ReLU in its panel),
        # and matches oneDNN's 2D one over folded slices on the small maps
        if direction == "forward" and channel_mm.conv_takes(weight, a):
            return "shift"
        # the backward likewise where both gradient kernels run (up to 2^16 weight-gradient elements: the
        # encoder's 64-channel 3x3x1 at 32x32x8, 3.3 vs 5.6 ms for oneDNN's)
        if direction == "backward" and channel_mm.conv_backward_takes(weight, a):
            return "shift"
        taps_x_out = weight.shape[0] * weight[0, 0].numel()
        # the forward's one product is the shift path's work; on ops.channel_mm's AVX-512 kernel (float32)
        # it beats oneDNN up to the dense layers' 3x3x1 (9 taps x 20 outputs: 4.5 vs 5.6 ms over a band of
        # the last block), on MKL's torch.mm only up to 64 rows. Not under autocast: there the kernel
        # steps aside and aten's convolution runs oneDNN's bf16 kernels
        if taps_x_out <= (64 if direction == "forward" and not channel_mm.kernel_takes(a) else 192):
            return "shift"
    # Small inputs (the encoder's layer2-4 and the early decoder blocks): oneDNN's 3D convolution
    # has more fixed cost than the 2D one over folded slices; past FOLDED_MAX_BYTES it is as fast
    # or faster (benchmarks/results/aniso_conv_cpu.md)
    if "folded" in paths and a.numel() * a.element_size() <= (FOLDED_MAX_BYTES[direction]):
        return "folded"
    return "aten"


# Input sizes up to which the static rule prefers "folded" over "aten" (see _rule).
FOLDED_MAX_BYTES = {"forward": 1 << 20, "backward": 512 << 10}


def _key(direction, a, weight, stride, padding) -> str:
    layout = "channels_last" if is_channels_last(a) else "contiguous" if a.is_contiguous() else "strided"
    device = torch.cuda.get_device_name(a.device) if a.is_cuda else a.device.type
    # under CPU autocast the rule differs (aniso_conv.rule): a choice made there is its own
    amp = "|autocast" if a.device.type == "cpu" and torch.is_autocast_enabled("cpu") else ""
    return (f"{direction}|{device}|{str(a.dtype).replace('torch.', '')}|{tuple(a.shape)}|{layout}|"
            f"{tuple(weight.shape)}|s{tuple(stride)}|p{tuple(padding)}{amp}")


def choose(direction: str, a: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
           extra: dict[str, Callable[[], object]] | None = None) -> str:
    """The path for this call ("forward" or "backward"). ``extra`` adds engine-level candidates
    (name -> a function running that candidate once), measured with the others when tuning."""
    if _forced is not None:
        if _forced == "triton" and extra and "triton" in extra:
            return "triton"
        return _forced if _forced in candidates(a, weight, stride, padding) else "aten"
    # the engine's own candidates are part of the key: a call that offers the Triton convolution
    # must not reuse the choice made for one that did not (another backend, same shape)
    key = _key(direction, a, weight, stride, padding) + "".join(f"|+{name}" for name in sorted(extra or {}))
    hit = _choices.get(key)
    if hit is not None:
        return hit["path"]
    paths = candidates(a, weight, stride, padding) + list(extra or {})
    if tuning() and len(paths) > 1:
        times = {p: _measure(direction, p, a, weight, stride, padding, extra) for p in paths}
        path = min(times, key=times.get)
        _choices[key] = {"path": path, "reason": "measured", "ms": {p: round(t * 1e3, 3) for p, t in times.items()}}
    else:
        path = "triton" if extra and "triton" in extra else rule(direction, a, weight, paths)
        _choices[key] = {"path": path, "reason": "rule"}
    return path


def _measure(direction, path, a, weight, stride, padding, extra, repeats=3) -> float:
    """Median seconds of one call on fresh data of the same shape (never the caller's tensors)."""
    if extra and path in extra:
        run = extra[path]
    else:
        x = torch.randn_like(a)
        w = torch.randn_like(weight)
        if direction == "forward":
            def run():
                return forward(path, x, w, stride, padding)
        else:
            g = forward("aten", x, w, stride, padding).normal_()

            def run():
                return backward(path, g, x, w, stride, padding)
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    run()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def choices() -> dict[str, dict]:
    """Every choice made so far: key -> {"path", "reason" ("rule", "measured" or "loaded"), "ms"?}."""
    return {k: dict(v) for k, v in _choices.items()}


def save_choices(path: str) -> None:
    """Writes the choices as JSON (atomically: a temporary file, then a rename)."""
    from ahnet_fast._atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(_choices, f, indent=1, sort_keys=True)


def load_choices(path: str) -> int:
    """Reads choices saved by :func:`save_choices` (they take precedence over rule and tuning);
    returns how many were loaded. ValueError on a file that is not such a table."""
    with open(path) as f:
        table = json.load(f)
    if not isinstance(table, dict) or not all(isinstance(v, dict) and v.get("path") in PATHS for v in table.values()):
        raise ValueError(f"{path} is not a table of convolution paths (expected key -> {{'path': one of {PATHS}}})")
    for key, value in table.items():
        _choices[key] = {**value, "reason": "loaded"}
    return len(table)


def clear_choices() -> None:
    _choices.clear()
