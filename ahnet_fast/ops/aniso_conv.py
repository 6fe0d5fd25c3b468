"""How each anisotropic convolution of AH-Net is computed: one of several paths, chosen per shape.

The convolutions that follow a BatchNorm+ReLU (``ahnet_fast.ops.bn_relu_conv`` and the dense
block) call :func:`forward` / :func:`backward` here with the path :func:`choose` picks. Paths:

- ``aten``: ``torch.ops.aten.convolution`` / ``convolution_backward`` (oneDNN on CPU, cuDNN
  ``conv3d`` on CUDA).
- ``matmul`` (1x1x1, stride 1): a batched matrix product. On CPU ATen sends these convolutions
  (batch < 16) to an unfold-based path; the matrix product measured 1.2-5.3x faster (forward +
  backward) on every 1x1x1 shape of AH-Net at a 128x128x32 input, 1.5-9.4x at 512x512x64.
- ``shift`` (stride 1, same-size padding, channel-first): all T kernel taps in one matrix product
  Z = W_all (T*Co x Ci) @ X (Ci x S), then the output is the sum of the T tap maps shifted into
  place; backward stacks the T shifted copies of the output gradient (T*Co rows) and does two
  matrix products. It wins where Co is small (AH-Net's final 3-class 3x3x1 convolution: 5.6x
  forward, 3.0x backward at 128x128x32) and, for the backward, on the dense layers' 3x3x1 (Co = 20).
- ``folded`` (kernel k x k x 1 or 1 x 1 x k, stride 1, contiguous): a 2D convolution on a view with
  the slice axis folded away (k x k x 1 as a (k, k) convolution dilated by D along W*D; 1 x 1 x k
  as (1, k) on (H*W, D)), no copy. Measured slower than ``aten`` on CPU at AH-Net's large maps;
  a candidate on CUDA, where cuDNN's 2D kernels are the most tuned.
- ``slice_fold`` (a kernel k x k x kd over few input channels, slice stride 1: AH-Net's stem, conv1
  7x7x3 on the image): the kd slice taps folded into input channels, a 2D convolution over the
  slices as a batch, (N * Do, Ci * kd, H, W) -> (N * Do, Co, Ho, Wo), the paper's own view of conv1
  (three adjacent slices as the three channels of a 2D network). The folded input is kd times the
  input (small: Ci * kd <= 16); the result is returned as the 3D output viewed on that memory (slice
  axis outermost), which the stem's slice pooling reads directly. On CPU PyTorch sends this conv3d
  to its unfold-based slow path (oneDNN declines one input channel); the fold runs oneDNN's 2D
  kernels. As the stem runs it (image needs no gradient, output left slice-major for the pooling)
  conv + pooling forward + backward went 140 -> 66 ms at a 128x128x32 input; as a stand-alone
  convolution with contiguous output and input gradient 1.11x (benchmarks/results/aniso_conv_cpu.md).
- ``triton`` (CUDA): the Triton kernel with the BatchNorm+ReLU on its operand load
  (:class:`ahnet_fast.ops.bn_relu_conv.TritonEngine`); chosen by the engine, not run here.

Choice: a static rule from the CPU measurements (``benchmarks/results/aniso_conv_cpu.md``) unless
measuring is on (``AHNET_FAST_CONV_TUNE=1`` or :func:`set_tuning`), which times every candidate
once per (device, dtype, shapes, stride, direction) and keeps the fastest. Every choice is
recorded with its reason (:func:`choices`); :func:`save_choices` / :func:`load_choices` write and
read them as JSON, so a run can be repeated with the same paths.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Sequence

import torch

from ahnet_fast import _scratch as scratch
from ahnet_fast._layout import is_channels_last

__all__ = ["PATHS", "candidates", "conv3d", "pointwise_conv", "forward", "backward", "choose", "slice_fold_forward", "choices",
           "save_choices", "load_choices", "set_tuning", "use_path"]

PATHS = ("aten", "matmul", "shift", "folded", "slice_fold", "triton")

# The fold copies the input kd times: a candidate only while that stays small.
SLICE_FOLD_MAX_CHANNELS = 16

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


def output_format(x: torch.Tensor) -> torch.memory_format:
    """The convolution output is channels-last exactly when the input is, else contiguous."""
    if is_channels_last(x):
        return torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    return torch.contiguous_format


def _same_size(weight, padding) -> bool:
    return all(k % 2 == 1 and p == (k - 1) // 2 for k, p in zip(weight.shape[2:], padding))


def candidates(a: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int]) -> list[str]:
    """The paths of this module that can compute this convolution (``triton`` is the engine's)."""
    kernel = tuple(weight.shape[2:])
    unit_stride = all(s == 1 for s in stride)
    out = ["aten"]
    if unit_stride and all(k == 1 for k in kernel) and not any(padding):
        out.append("matmul")
    if unit_stride and _same_size(weight, padding) and not is_channels_last(a) and any(k > 1 for k in kernel):
        out.append("shift")
    if unit_stride and a.dim() == 5 and a.is_contiguous() and _same_size(weight, padding) and \
            (kernel[2] == 1 or kernel[:2] == (1, 1)) and any(k > 1 for k in kernel):
        out.append("folded")
    if _slice_foldable(a, weight, stride, padding):
        out.append("slice_fold")
    return out


def _slice_foldable(a, weight, stride, padding) -> bool:
    return a.dim() == 5 and weight.dim() == 5 and weight.shape[4] > 1 and stride[2] == 1 and \
        0 <= padding[2] < weight.shape[4] and a.shape[1] * weight.shape[4] <= SLICE_FOLD_MAX_CHANNELS


def _rule(direction: str, a: torch.Tensor, weight: torch.Tensor, paths: list[str]) -> str:
    """The static choice, from the CPU measurements (benchmarks/results/aniso_conv_cpu.md)."""
    if a.device.type != "cpu":
        return "aten"
    if "slice_fold" in paths:
        return "slice_fold"
    if "matmul" in paths:
        return "matmul"
    if "shift" in paths:
        taps_x_out = weight.shape[0] * weight[0, 0].numel()
        if taps_x_out <= (64 if direction == "forward" else 192):
            return "shift"
    # Small inputs (the encoder's layer2-4 and the early decoder blocks): oneDNN's 3D convolution
    # has more fixed cost than the 2D one over folded slices (e.g. 1.65 vs 1.12 ms forward at
    # 1x128x16x16x4, 2.33 vs 1.80 ms backward at 1x256x8x8x2); past FOLDED_MAX_BYTES it is as fast or
    # faster (1x64x32x32x8, 2 MiB: 2.4 vs 3.5 ms forward).
    if "folded" in paths and a.numel() * a.element_size() <= (FOLDED_MAX_BYTES[direction]):
        return "folded"
    return "aten"


# Input sizes up to which the static rule prefers "folded" over "aten" (see _rule).
FOLDED_MAX_BYTES = {"forward": 1 << 20, "backward": 512 << 10}


def _key(direction, a, weight, stride, padding) -> str:
    layout = "channels_last" if is_channels_last(a) else "contiguous" if a.is_contiguous() else "strided"
    device = torch.cuda.get_device_name(a.device) if a.is_cuda else a.device.type
    return (f"{direction}|{device}|{str(a.dtype).replace('torch.', '')}|{tuple(a.shape)}|{layout}|"
            f"{tuple(weight.shape)}|s{tuple(stride)}|p{tuple(padding)}")


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
        path = "triton" if extra and "triton" in extra else _rule(direction, a, weight, paths)
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


# ---------------------------------------------------------------------------------------------
# The paths


def forward(path: str, a: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int]):
    if path == "slice_fold":
        return slice_fold_forward(a, weight, None, stride, padding).contiguous(memory_format=output_format(a))
    if path == "matmul":
        w = weight.view(weight.shape[0], weight.shape[1])
        m, cl = _as_matrix(a)
        return _from_matrix(torch.matmul(m, w.t()) if cl else _left_mm(w, m), a, weight.shape[0], cl)
    if path == "shift":
        return _shift_forward(a, weight)
    if path == "folded":
        xf, wf, pad, dil = _fold(a, weight)
        return torch.ops.aten.convolution(xf, wf, None, [1, 1], pad, dil, False, [0, 0], 1).view(
            a.shape[0], weight.shape[0], *a.shape[2:])
    nd = a.dim() - 2
    y = torch.ops.aten.convolution(a, weight, None, list(stride), list(padding), [1] * nd, False, [0] * nd, 1)
    return y.contiguous(memory_format=output_format(a))


def backward(path: str, grad_y: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
             padding: Sequence[int], out: torch.Tensor | None = None):
    """(grad_a, grad_weight). ``out``: a flat buffer of at least a.numel() elements of a's dtype (a
    caller's reused scratch) that the shift path writes grad_a into at batch 1 (then grad_a is a view
    of it); the other paths ignore it."""
    if path == "slice_fold":
        return _slice_fold_backward(grad_y, a, weight, stride, padding)
    if path == "matmul":
        return matmul_input_grad(grad_y, a, weight), matmul_weight_grad(grad_y, a, weight)
    if path == "shift":
        return _shift_backward(grad_y, a, weight, out=out)
    if path == "folded":
        xf, wf, pad, dil = _fold(a, weight)
        gf = grad_y.contiguous().view(a.shape[0], weight.shape[0], *xf.shape[2:])
        grad_a, grad_w, _ = torch.ops.aten.convolution_backward(gf, xf, wf, None, [1, 1], pad, dil, False, [0, 0], 1,
                                                                [True, True, False])
        return grad_a.view(a.shape), grad_w.view(weight.shape)
    nd = a.dim() - 2
    grad_a, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_y, a, weight, None, list(stride), list(padding), [1] * nd, False, [0] * nd, 1, [True, True, False])
    return grad_a, grad_w


def matmul_weight_grad(grad_y: torch.Tensor, a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The 1x1x1 convolution's weight gradient (path "matmul"): g a^T summed over the batch. Apart
    from :func:`matmul_input_grad`, so that a caller that owns ``a`` can free it before the input
    gradient is allocated (the dense block's backward does)."""
    m, cl = _as_matrix(a)
    gm, _ = _as_matrix(grad_y.contiguous(memory_format=output_format(a)))
    if cl:  # rows are positions
        grad_w = gm[0].t() @ m[0] if m.shape[0] == 1 else torch.matmul(gm.transpose(1, 2), m).sum(0)
    else:  # columns are positions
        grad_w = gm[0] @ m[0].t() if m.shape[0] == 1 else torch.matmul(gm, m.transpose(1, 2)).sum(0)
    return grad_w.view_as(weight)


def matmul_input_grad(grad_y: torch.Tensor, like: torch.Tensor, weight: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """The 1x1x1 convolution's input gradient (path "matmul"), shaped and laid out as ``like`` (the
    input, or any tensor of its shape and layout). ``out``: a contiguous tensor of like's shape and
    dtype to write it into (a caller's reused buffer), used when like is contiguous with batch 1."""
    w = weight.view(weight.shape[0], weight.shape[1])
    cl = is_channels_last(like)
    gm, _ = _as_matrix(grad_y.contiguous(memory_format=output_format(like)))
    if out is not None and not cl and like.shape[0] == 1 and out.is_contiguous() and out.shape == like.shape \
            and out.dtype == gm.dtype:
        torch.mm(w.t(), gm[0], out=out.view(like.shape[1], -1))
        return out
    grad_a = torch.matmul(gm, w) if cl else _left_mm(w.t(), gm)
    return _from_matrix(grad_a, like, like.shape[1], cl)


def _as_matrix(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """t (N, C, *spatial) as a batch of matrices, without a copy where the layout allows: (N, C, S)
    channel-first, or (N, S, C) channels-last (the bool says which)."""
    if is_channels_last(t):
        return t.movedim(1, -1).reshape(t.shape[0], -1, t.shape[1]), True
    return t.reshape(t.shape[0], t.shape[1], -1), False


def _from_matrix(m: torch.Tensor, like: torch.Tensor, channels: int, channels_last: bool) -> torch.Tensor:
    if channels_last:
        return m.view(like.shape[0], *like.shape[2:], channels).movedim(-1, 1)
    return m.view(like.shape[0], channels, *like.shape[2:])


def _left_mm(w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """w @ m[n] for every n (torch.matmul would fold the batch into rows by copying m transposed)."""
    if m.shape[0] == 1:
        return (w @ m[0]).unsqueeze(0)
    return torch.bmm(w.expand(m.shape[0], -1, -1), m)


def _taps(weight: torch.Tensor) -> list[tuple[int, ...]]:
    """Offsets of the kernel taps from the centre, in the weight's (row-major) tap order."""
    ks = weight.shape[2:]
    return [tuple(i - (k - 1) // 2 for i, k in zip(idx, ks)) for idx in itertools.product(*[range(k) for k in ks])]


def _shifted(size: int, offset: int) -> tuple[slice, slice]:
    """Destination and source ranges along one axis for out[p] += z[p + offset] (inside bounds;
    empty when the offset is as long as the axis)."""
    n = max(0, size - abs(offset))
    dst, src = (max(0, -offset), max(0, offset)) if n else (0, 0)
    return slice(dst, dst + n), slice(src, src + n)


def _tap_matrix(weight: torch.Tensor) -> torch.Tensor:
    """(T * Co, Ci): the taps' weight matrices stacked, tap-major."""
    co, ci = weight.shape[:2]
    return weight.reshape(co, ci, -1).permute(2, 0, 1).reshape(-1, ci)


def _shift_forward(a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = sum over taps t of shift_t(W_t a): one matrix product for every tap (z, taps x Co
    channels, a temporary: in a pooled scratch buffer at batch 1), then each tap's map added at its
    offset. The additions run over the flattened maps (long contiguous runs, where per-axis slices
    of a 1x1x3 kernel are runs of D - 1 values). In the flat sum, output p reads z_t at flat(p) + flat(offset):
    that is z_t[p + offset] when p + offset is inside the map, and otherwise a value r whose own
    r - offset is outside the map (flat indices are one-to-one inside it), which no output reads
    legitimately: those values lie in the strips zeroed first, so a wrapped read adds zero."""
    n, ci = a.shape[:2]
    co, spatial = weight.shape[0], a.shape[2:]
    nd = len(spatial)
    taps = _taps(weight)
    wall = _tap_matrix(weight)
    # at batch 1 the tap maps go into a pooled buffer (a larger batch's matrix product has no out=)
    with _scratch(a, wall.shape[0] * math.prod(spatial)) if n == 1 else contextlib.nullcontext() as buffer:
        if n == 1:
            z = torch.mm(wall, a.reshape(ci, -1), out=buffer.view(wall.shape[0], -1))
        else:
            z = _left_mm(wall, a.reshape(n, ci, -1))
        z = z.view(n, len(taps), co, *spatial)
        centre = taps.index(tuple(0 for _ in spatial))
        y = z[:, centre].clone()
        for t, offset in enumerate(taps):
            if t == centre:
                continue
            zt = z[:, t]
            if _trailing_contiguous(y, nd) and _trailing_contiguous(zt, nd):
                _zero_strips(zt, offset)
                runs = _flat_runs(y, zt, [-o for o in offset])  # y[p] += zt[p + offset]
                if runs is not None:
                    runs[0].add_(runs[1])
            else:
                dst, src = zip(*(_shifted(size, o) for size, o in zip(spatial, offset)))
                y[(slice(None), slice(None), *dst)] += zt[(slice(None), slice(None), *src)]
    return y


SHIFT_CHUNK_BYTES = 16 << 20


def _copy_shifted(dst: torch.Tensor, src: torch.Tensor, offset: Sequence[int]) -> None:
    """dst[..., q] = src[..., q - offset] over the trailing len(offset) axes, zero where q - offset
    falls outside; only the strips the shifted copy does not reach are zeroed (a full zero fill
    costs as much as the copy)."""
    nd = len(offset)
    lead = (slice(None),) * (dst.dim() - nd)
    sizes = dst.shape[dst.dim() - nd:]
    if _trailing_contiguous(dst, nd) and _trailing_contiguous(src, nd):
        # One shifted copy of the flattened trailing block: long contiguous runs, where the
        # per-axis slices below copy runs of the last axis's length (AH-Net's depth axis: 1x1x3
        # shifts copy 7 of every 8 values, at ~1 GB/s). The values that wrap across a row land
        # in the strips zeroed below.
        runs = _flat_runs(dst, src, offset)
        if runs is not None:
            runs[0].copy_(runs[1])
    else:
        dst_idx, src_idx = zip(*(_shifted(size, -o) for size, o in zip(sizes, offset)))
        dst[(*lead, *dst_idx)] = src[(*lead, *src_idx)]
    _zero_strips(dst, offset)


def _flat_runs(dst: torch.Tensor, src: torch.Tensor, offset: Sequence[int]):
    """(dst run, src run): views of the flattened trailing len(offset) axes (contiguous there, of
    the same sizes) pairing dst at flat(q) with src at flat(q) - flat(offset); None when the offset
    moves everything out. Positions whose q - offset leaves an axis pair with wrapped values."""
    nd = len(offset)
    sizes = dst.shape[dst.dim() - nd:]
    shift = sum(o * math.prod(sizes[i + 1:]) for i, o in enumerate(offset))
    length = math.prod(sizes)
    if abs(shift) >= length:
        return None
    d, f = (dst.flatten(-nd), src.flatten(-nd)) if nd > 1 else (dst, src)
    return d[..., max(0, shift):length + min(0, shift)], f[..., max(0, -shift):length - max(0, shift)]


def _zero_strips(t: torch.Tensor, offset: Sequence[int]) -> None:
    """Zeroes t[..., q] (trailing len(offset) axes) wherever q - offset leaves some axis."""
    nd = len(offset)
    lead = (slice(None),) * (t.dim() - nd)
    for axis, (size, o) in enumerate(zip(t.shape[t.dim() - nd:], offset)):
        if o:
            index = [slice(None)] * nd
            index[axis] = slice(0, o) if o > 0 else slice(max(0, size + o), size)
            t[(*lead, *index)] = 0


def _scratch(like: torch.Tensor, numel: int):
    """A pooled flat buffer of like's dtype and device for the shift path's temporaries: the
    backward's shifted copies of the output gradient, the forward's tap maps (ahnet_fast._scratch:
    on CPU a fresh one would fault in every page each call; at AH-Net's last dense block 15 MiB per
    unit). Never both at once: no shift forward runs inside a shift backward."""
    return scratch.borrow("aniso_conv.shift", numel, like.dtype, like.device)


def _trailing_contiguous(t: torch.Tensor, nd: int) -> bool:
    """Whether t's last nd axes are laid out as one contiguous block (row-major)."""
    expected = 1
    for size, stride in zip(reversed(t.shape[t.dim() - nd:]), reversed(t.stride()[t.dim() - nd:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _accumulate_tap_group(grad_a, grad_wall, wall, rows, g, m, out=None):
    """One group of taps: g (N, rows' taps * Co, S) their shifted output gradients. Adds the group's
    share to grad_a (allocating it on the first group, or writing it into the flat ``out`` at batch
    1) and writes its rows of grad_wall."""
    n = g.shape[0]
    w_t = wall[rows].t()
    if grad_a is None and out is not None and n == 1 and out.numel() >= w_t.shape[0] * g.shape[2] \
            and out.dtype == g.dtype:
        grad_a = out[:w_t.shape[0] * g.shape[2]].view(1, w_t.shape[0], g.shape[2])
        torch.mm(w_t, g[0], out=grad_a[0])
    elif grad_a is None:
        grad_a = _left_mm(w_t, g)
    elif n == 1:
        grad_a[0].addmm_(w_t, g[0])
    else:
        grad_a.baddbmm_(w_t.expand(n, -1, -1), g)
    grad_wall[rows] = g[0] @ m[0].t() if n == 1 else torch.matmul(g, m.transpose(1, 2)).sum(0)
    return grad_a


def _shift_backward(grad_y: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, chunks: int | None = None,
                    out: torch.Tensor | None = None):
    n, ci = a.shape[:2]
    co, spatial = weight.shape[0], a.shape[2:]
    taps = _taps(weight)
    # stacked[t][q] = grad_y[q - offset_t] (zero outside), so grad_a = W_all^T stacked and
    # grad_W_t = stacked_t a^T. All taps at once, the stacked copy is taps x grad_y (9x for a 3x3x1
    # kernel): the largest temporary of a dense layer's backward. Past SHIFT_CHUNK_BYTES the taps go
    # in groups, grad_a accumulating in place (measured: as fast or faster at those sizes, the
    # groups' GEMMs staying large; below it one group is faster), and where the kernel's first axis
    # is longer than 1 the groups are its rows, read as views (_shift_backward_by_rows).
    if chunks is None:
        stacked_bytes = grad_y.numel() * grad_y.element_size() * len(taps)
        chunks = max(1, min(len(taps), -(-stacked_bytes // SHIFT_CHUNK_BYTES)))
        if chunks > 1 and weight.shape[2] > 1:
            return _shift_backward_by_rows(grad_y, a, weight, out)
    m = a.reshape(n, ci, -1)
    wall = _tap_matrix(weight)
    grad_wall = weight.new_empty((len(taps) * co, ci))
    grad_a = None
    per = -(-len(taps) // chunks)
    shape = (n, per, co, *spatial)
    with _scratch(grad_y, math.prod(shape)) as buffer:
        for first in range(0, len(taps), per):
            group = taps[first:first + per]
            stacked = buffer[:math.prod(shape) // per * len(group)].view(n, len(group), co, *spatial)
            for j, offset in enumerate(group):
                _copy_shifted(stacked[:, j], grad_y, offset)
            grad_a = _accumulate_tap_group(grad_a, grad_wall, wall, slice(first * co, (first + len(group)) * co),
                                           stacked.view(n, len(group) * co, -1), m, out)
            del stacked
    grad_w = grad_wall.view(len(taps), co, ci).permute(1, 2, 0).contiguous().view(weight.shape)
    return grad_a.view(a.shape), grad_w


def _shift_backward_by_rows(grad_y: torch.Tensor, a: torch.Tensor, weight: torch.Tensor,
                            out: torch.Tensor | None = None):
    """The shift backward in groups of taps sharing their offset along the first spatial axis (a
    3x3x1 kernel: three groups of three), without a shifted copy per tap: grad_y is copied once per
    tap of the other axes (3 for 3x3x1, not 9) into a buffer padded by (kh - 1) / 2 zero rows along
    the first axis, and each group's operand is a view of that buffer starting at its row offset
    (a matrix with a leading dimension longer than its rows, which the GEMMs read in place).
    Measured at AH-Net's largest dense layer (80 -> 20 channels, 64x64x16): 29 -> 22 ms, the
    copies a third of the grouped path's and the buffer the size of one group."""
    n, ci = a.shape[:2]
    co, spatial = weight.shape[0], a.shape[2:]
    kh = weight.shape[2]
    ph = (kh - 1) // 2
    h, rest = spatial[0], spatial[1:]
    rest_size = math.prod(rest)
    rest_taps = [offset[1:] for offset in _taps(weight[:, :, :1])]  # offsets along the other axes
    r = len(rest_taps)
    with _scratch(grad_y, n * r * co * (h + 2 * ph) * rest_size) as buffer:
        padded = buffer.view(n, r, co, h + 2 * ph, *rest)
        padded[:, :, :, :ph] = 0
        padded[:, :, :, ph + h:] = 0
        for j, offset in enumerate(rest_taps):
            _copy_shifted(padded[:, j, :, ph:ph + h], grad_y, offset)
        flat = padded.view(n, r * co, -1)
        m = a.reshape(n, ci, -1)
        wall = _tap_matrix(weight)  # tap-major, taps row-major over the kernel: row i's taps adjacent
        grad_wall = weight.new_empty((kh * r * co, ci))
        grad_a = None
        for i in range(kh):  # offset i - ph along the first axis: output row p reads grad_y row p - i + ph
            start = (2 * ph - i) * rest_size
            grad_a = _accumulate_tap_group(grad_a, grad_wall, wall, slice(i * r * co, (i + 1) * r * co),
                                           flat[:, :, start:start + h * rest_size], m, out)
        del padded, flat
    grad_w = grad_wall.view(kh * r, co, ci).permute(1, 2, 0).contiguous().view(weight.shape)
    return grad_a.view(a.shape), grad_w


def _fold(a: torch.Tensor, weight: torch.Tensor):
    """(input view, weight view, padding, dilation) of the 2D convolution equal to this one."""
    n, c, h, w, d = a.shape
    kh, kw, kd = weight.shape[2:]
    if kd == 1:  # (kh, kw) over (H, W*D), W-neighbours D apart
        return a.view(n, c, h, w * d), weight.view(*weight.shape[:2], kh, kw), [(kh - 1) // 2, (kw - 1) // 2 * d], \
            [1, d]
    return a.view(n, c, h * w, d), weight.view(*weight.shape[:2], 1, kd), [0, (kd - 1) // 2], [1, 1]


# ---------------------------------------------------------------------------------------------
# slice_fold: the slice taps as input channels of a 2D convolution over the slices


def _fold_slices(a: torch.Tensor, kd: int, pd: int) -> torch.Tensor:
    """(N, Ci, H, W, D) -> (N * Do, Ci * kd, H, W): channel (c, t) of slice z is a[..., z + t - pd]
    (zero outside). One copy of kd x the input."""
    n, c, h, w, d = a.shape
    padded = torch.nn.functional.pad(a, (pd, pd)) if pd else a
    windows = padded.unfold(-1, kd, 1)  # (N, Ci, H, W, Do, kd)
    d_out = windows.shape[4]
    # contiguous, not a view: with N = 1 reshape could return an overlapping view, which oneDNN would
    # read as channels-last and answer with a channels-last output
    return windows.permute(0, 4, 1, 5, 2, 3).contiguous().view(n * d_out, c * kd, h, w)


def _fold_weight(weight: torch.Tensor) -> torch.Tensor:
    co, ci, kh, kw, kd = weight.shape
    # contiguous for the same reason as _fold_slices: a channels-last-strided weight view (Ci = 1)
    # makes the convolution answer channels-last
    return weight.permute(0, 1, 4, 2, 3).contiguous().view(co, ci * kd, kh, kw)


def slice_fold_forward(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
                       padding: Sequence[int]) -> torch.Tensor:
    """conv3d(a, weight, bias, stride, padding) by path ``slice_fold``, differentiable (autograd
    through torch ops). The result is (N, Co, Ho, Wo, Do) viewed on (N, Do, Co, Ho, Wo) memory: the
    slice axis outermost, as the 2D convolution wrote it (call ``.contiguous()`` for the standard
    layout; the stem's slice pooling reads this one directly)."""
    n = a.shape[0]
    kd = weight.shape[4]
    folded = _fold_slices(a, kd, padding[2])
    y = torch.nn.functional.conv2d(folded, _fold_weight(weight), bias, tuple(stride[:2]), tuple(padding[:2]))
    return y.unflatten(0, (n, -1)).permute(0, 2, 3, 4, 1)


def _slice_fold_backward(grad_y, a, weight, stride, padding):
    n, ci, h, w, d = a.shape
    co, _, kh, kw, kd = weight.shape
    pd = padding[2]
    folded = _fold_slices(a, kd, pd)
    g2 = grad_y.permute(0, 4, 1, 2, 3).reshape(-1, co, *grad_y.shape[2:4])
    grad_f, grad_wf, _ = torch.ops.aten.convolution_backward(
        g2, folded, _fold_weight(weight), None, list(stride[:2]), list(padding[:2]), [1, 1], False, [0, 0], 1,
        [True, True, False])
    grad_w = grad_wf.view(co, ci, kd, kh, kw).permute(0, 1, 3, 4, 2).contiguous()
    # grad_f (N * Do, Ci * kd, H, W): tap t of output slice z came from padded slice z + t
    taps = grad_f.view(n, -1, ci, kd, h, w)
    d_out = taps.shape[1]
    grad_padded = a.new_zeros((n, ci, h, w, d + 2 * pd))
    for t in range(kd):
        grad_padded[..., t:t + d_out] += taps[:, :, :, t].permute(0, 2, 3, 4, 1)
    grad_a = grad_padded[..., pd:pd + d] if pd else grad_padded
    return grad_a.contiguous(memory_format=output_format(a)), grad_w


def conv3d(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
           padding: Sequence[int]) -> torch.Tensor:
    """A plain (not BatchNorm-fused) 3D convolution, zero padding, dilation 1, groups 1, by the path
    :func:`choose` picks among ``aten`` and ``slice_fold`` (the stem's conv1), differentiable.
    A ``slice_fold`` result has its slice axis outermost in memory (see :func:`slice_fold_forward`)."""
    stride, padding = list(stride), list(padding)
    if _slice_foldable(a, weight, stride, padding):
        if torch.compiler.is_compiling() and _forced is None:  # no recording or measuring while tracing
            path = _rule("forward", a, weight, candidates(a, weight, stride, padding))
        else:  # (a forced path is neither recorded nor measured)
            path = choose("forward", a, weight, stride, padding)
        if path == "slice_fold":
            return slice_fold_forward(a, weight, bias, stride, padding)
    return torch.nn.functional.conv3d(a, weight, bias, stride, padding)


def pointwise_conv(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   stride: Sequence[int]) -> torch.Tensor:
    """A plain (not BatchNorm-fused) 1x1x1 (2D: 1x1) convolution without padding, any stride,
    differentiable: the encoder's first bottleneck convolutions and its strided downsampling
    projections. On CPU by path ``matmul``: a strided convolution only reads every s-th voxel, so
    the input is subsampled first (a strided view copied once), then one matrix product. ATen sends
    these convolutions to oneDNN at batch 1; the product measured 1.3-3.3x faster forward+backward on
    the encoder's shapes at a 128x128x32 input, 1.7-3.2x on the three strided ones
    (benchmarks/results/aniso_conv_cpu.md). Elsewhere, and
    inside ``use_path`` with any other path, ATen's convolution."""
    nd = a.dim() - 2
    stride = [int(s) for s in stride]
    if weight.dim() != a.dim() or any(k != 1 for k in weight.shape[2:]) or weight.shape[1] != a.shape[1]:
        raise ValueError(f"pointwise_conv: weight {tuple(weight.shape)} is not a 1x1 kernel for input "
                         f"{tuple(a.shape)}")
    if len(stride) != nd or any(s < 1 for s in stride):
        raise ValueError(f"pointwise_conv: stride must be {nd} positive integers, got {stride!r}")
    if a.device.type != "cpu" or _forced not in (None, "matmul"):
        conv = torch.nn.functional.conv3d if nd == 3 else torch.nn.functional.conv2d
        return conv(a, weight, bias, stride)
    if any(s != 1 for s in stride):
        fmt = output_format(a)  # the subsampled copy keeps the input's layout
        a = a[(slice(None), slice(None), *(slice(None, None, s) for s in stride))].contiguous(memory_format=fmt)
    w = weight.view(weight.shape[0], weight.shape[1])
    m, cl = _as_matrix(a)
    if cl:
        y = torch.matmul(m, w.t())
    elif m.shape[0] == 1:  # squeeze, not m[0]: select's backward would fill a zero tensor and copy into it
        y = (w @ m.squeeze(0)).unsqueeze(0)
    else:
        y = _left_mm(w, m)
    y = _from_matrix(y, a, weight.shape[0], cl)
    if bias is not None:
        y = y + bias.to(y.dtype).view(1, -1, *([1] * nd))
    return y



# ---------------------------------------------------------------------------------------------
# The stem: slice_fold convolution and slice max pooling over chunks of slices

SLICE_CHUNK_BYTES = 8 << 20


def slice_fold_conv_pool(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
                         padding: Sequence[int], k: int) -> torch.Tensor:
    """``max_pool3d(conv3d(a, weight, bias, stride, padding), (1, 1, k))`` (AH-Net's conv1 and pool1)
    through the ``slice_fold`` convolution and the compiled slice pooling, a band of output rows at a
    time: the convolution's output, twice the pooled map and 32 MiB at a 128x128x32 input (the size
    at which glibc maps every allocation freshly, a page fault per 4 KiB, twice per step), only ever
    exists as a band of about SLICE_CHUNK_BYTES. Bands of rows, not of slices: a band's pooled
    result is a block of whole rows of the output (contiguous runs of W x D values), where a chunk
    of slices would be written, and its gradient gathered, in runs of D / chunks values (4 at AH-Net's
    input: ~1.5 ms per 4 MB copy). Backward, band by band, routes the gradient through the kept
    window positions and accumulates the weight gradient; ``a`` gets no gradient (the image), so
    callers use this only where it needs none. CPU, compiled extension."""
    if a.requires_grad:
        raise ValueError("slice_fold_conv_pool: the input must not need a gradient (it is the image)")
    return _SliceFoldConvPool.apply(a, weight, bias, tuple(stride), tuple(padding), int(k))


def _row_bands(n: int, rows: int, per_row_bytes: int):
    """(sample, first output row, rows) bands covering every output row of every sample."""
    per = max(1, SLICE_CHUNK_BYTES // max(1, per_row_bytes))
    return [(i, r0, min(per, rows - r0)) for i in range(n) for r0 in range(0, rows, per)]


def _band_input(padded, i, d_out, r0, r, stride_h, kh):
    """The input rows (already padded along H) that output rows r0..r0+r-1 of sample i read."""
    return padded[i * d_out:(i + 1) * d_out, :, r0 * stride_h:(r0 + r - 1) * stride_h + kh]


class _SliceFoldConvPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, weight, bias, stride, padding, k):
        n = a.shape[0]
        co, kh = weight.shape[0], weight.shape[2]
        folded = _fold_slices(a, weight.shape[4], padding[2])  # (N * Do, Ci * kd, H, W)
        # padded along H once (a copy of the folded slices, kd times the image), so that every band
        # is a plain slice
        padded = torch.nn.functional.pad(folded, (0, 0, padding[0], padding[0])) if padding[0] else folded
        wf = _fold_weight(weight)
        d_out = folded.shape[0] // n
        d_pool = d_out // k
        ho = (padded.shape[2] - kh) // stride[0] + 1
        wo = (a.shape[3] + 2 * padding[1] - weight.shape[3]) // stride[1] + 1
        pooled = a.new_empty((n, co, ho, wo, d_pool))
        positions = []
        bands = _row_bands(n, ho, d_out * co * wo * a.element_size())
        for i, r0, r in bands:
            y = torch.nn.functional.conv2d(_band_input(padded, i, d_out, r0, r, stride[0], kh), wf, bias,
                                           stride[:2], (0, padding[1]))  # (Do, Co, r, Wo)
            out, position = torch.ops.ahnet_fast.slice_max_pool(y.permute(1, 2, 3, 0).unsqueeze(0), k)
            pooled[i:i + 1, :, r0:r0 + r] = out
            positions.append(position)
        ctx.save_for_backward(padded, weight, *positions)
        ctx.args = (bands, stride, padding, k, d_out, bias is not None)
        return pooled

    @staticmethod
    def backward(ctx, grad):
        padded, weight, *positions = ctx.saved_tensors
        bands, stride, padding, k, d_out, has_bias = ctx.args
        co, ci, kh, kw, kd = weight.shape
        wf = _fold_weight(weight)
        wo = grad.shape[3]
        grad_wf = grad_b = None
        for (i, r0, r), position in zip(bands, positions):
            g = grad[i:i + 1, :, r0:r0 + r].contiguous()
            # the band's convolution output layout: (Do, Co, r, Wo) memory seen as (1, Co, r, Wo, Do)
            gy = torch.ops.ahnet_fast.slice_max_pool_backward(g, position, k, [1, co, r, wo, d_out],
                                                               [d_out * co * r * wo, r * wo, wo, 1, co * r * wo])
            gy = gy.squeeze(0).permute(3, 0, 1, 2)
            _, gw, gb = torch.ops.aten.convolution_backward(
                gy, _band_input(padded, i, d_out, r0, r, stride[0], kh), wf, [co] if has_bias else None,
                list(stride[:2]), [0, padding[1]], [1, 1], False, [0, 0], 1, [False, True, has_bias])
            grad_wf = gw if grad_wf is None else grad_wf.add_(gw)
            if has_bias:
                grad_b = gb if grad_b is None else grad_b.add_(gb)
        grad_w = grad_wf.view(co, ci, kd, kh, kw).permute(0, 1, 3, 4, 2).contiguous()
        return None, grad_w, grad_b, None, None, None
