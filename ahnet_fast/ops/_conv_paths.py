"""The CPU convolution algorithms ("paths") that :mod:`ahnet_fast.ops.aniso_conv` chooses between.

Each path computes ``conv(a, weight, stride, padding)`` (no bias, dilation 1, groups 1) forward
(:func:`forward`) and its two gradients (:func:`backward`), with the same result up to rounding:

- ``aten``: ``torch.ops.aten.convolution`` / ``convolution_backward`` (oneDNN on CPU, cuDNN
  ``conv3d`` on CUDA).
- ``matmul`` (1x1x1, stride 1): a batched matrix product (on CPU ATen sends these convolutions,
  batch < 16, to an unfold-based path).
- ``shift`` (stride 1, same-size padding, channel-first): all T kernel taps in one matrix product
  Z = W_all (T*Co x Ci) @ X (Ci x S), then the output is the sum of the T tap maps shifted into
  place; backward stacks the T shifted copies of the output gradient (T*Co rows) and does two
  matrix products. It pays where Co is small (the final 3-class 3x3x1 convolution, the dense
  layers' 3x3x1 with Co = 20). Where ops.channel_mm's convolution kernel runs (float32 on AVX-512,
  Co >= 8) the forward is that kernel instead, the taps read in place and no tap map written (it
  then beats oneDNN at every Co AH-Net has), and the backward its two gradient kernels, without the
  shifted copies.
- ``folded`` (kernel k x k x 1 or 1 x 1 x k, stride 1, contiguous): a 2D convolution on a view with
  the slice axis folded away (k x k x 1 as a (k, k) convolution dilated by D along W*D; 1 x 1 x k
  as (1, k) on (H*W, D)), no copy.
- ``slice_fold`` (a kernel k x k x kd over few input channels, slice stride 1: AH-Net's stem, conv1
  7x7x3 on the image): the kd slice taps folded into input channels, a 2D convolution over the
  slices as a batch, (N * Do, Ci * kd, H, W) -> (N * Do, Co, Ho, Wo): the paper's own view of
  conv1 (three adjacent slices as the three channels of a 2D network). The folded input is kd
  times the input (small: Ci * kd <= SLICE_FOLD_MAX_CHANNELS); the result is the 3D output viewed
  on that memory (slice axis outermost). On CPU PyTorch sends this conv3d to its unfold-based
  slow path (oneDNN declines one input channel); the fold runs oneDNN's 2D kernels.

Which path is faster for which shape is measured in ``benchmarks/bench_aniso_conv.py`` (results in
``benchmarks/results/aniso_conv_cpu.md``); the choice itself is made in ``aniso_conv``.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Sequence

import torch

from ahnet_fast import _scratch as scratch
from ahnet_fast._layout import is_channels_last, trailing_contiguous
from ahnet_fast.ops import channel_mm

# The fold copies the input kd times: a candidate only while that stays small.
SLICE_FOLD_MAX_CHANNELS = 16


def output_format(x: torch.Tensor) -> torch.memory_format:
    """The convolution output is channels-last exactly when the input is, else contiguous."""
    if is_channels_last(x):
        return torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    return torch.contiguous_format





def fusable(path: str, a: torch.Tensor) -> bool:
    """Whether :func:`forward` can take ``scale`` and ``shift`` for this path and input: apply a
    BatchNorm-ReLU (relu(a * scale + shift) per channel) while ops.channel_mm's kernel reads a,
    instead of writing the activation out first. Paths matmul and shift, channel-first maps whose
    spatial axes are laid out as one block (a band of rows of a map qualifies), float32 on a CPU where
    the kernel runs."""
    return path in ("matmul", "shift") and channel_mm.kernel_takes(a) and not is_channels_last(a) \
        and trailing_contiguous(a, a.dim() - 2)


def forward(path: str, a: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
            scale: torch.Tensor | None = None, shift: torch.Tensor | None = None):
    """conv(a) by ``path``; with ``scale`` and ``shift`` (where :func:`fusable`), conv(relu(a * scale
    + shift)), the activation applied as the product reads a."""
    if scale is not None:
        if not fusable(path, a):
            raise ValueError(f"conv path {path!r} cannot apply the activation for this input")
        if path == "shift":
            return _shift_forward(a, weight, scale, shift)
        y = channel_mm.mm_batched(weight.view(weight.shape[0], weight.shape[1]), a.flatten(2), scale=scale,
                                  shift=shift)
        return y.view(a.shape[0], weight.shape[0], *a.shape[2:])
    if path == "slice_fold":
        return slice_fold_forward(a, weight, None, stride, padding).contiguous(memory_format=output_format(a))
    if path == "matmul":
        w = weight.view(weight.shape[0], weight.shape[1])
        m, cl = _as_matrix(a)
        return _from_matrix(torch.matmul(m, w.t()) if cl else channel_mm.mm_batched(w, m), a, weight.shape[0], cl)
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
        grad_w = _weight_grad(gm, m)
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
        channel_mm.mm_into(out.view(like.shape[1], -1), w.t(), gm[0])
        return out
    grad_a = torch.matmul(gm, w) if cl else channel_mm.mm_batched(w.t(), gm)
    return _from_matrix(grad_a, like, like.shape[1], cl)


def _weight_grad(g: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """sum over the batch of g[n] @ m[n]^T (g: (N, Co, S) output gradients, m: (N, Ci, S) inputs), on
    ops.channel_mm's kernel where it runs."""
    if g.shape[0] == 1:
        return channel_mm.mm_nt(g[0], m[0])
    out = m.new_empty((g.shape[1], m.shape[1]))
    for i in range(g.shape[0]):
        channel_mm.mm_nt_into(out, g[i], m[i], accumulate=i > 0)
    return out


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


def _shift_forward(a: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
                   shift: torch.Tensor | None = None) -> torch.Tensor:
    """y = sum over taps t of shift_t(W_t a): one matrix product for every tap (z, taps x Co
    channels, a temporary: in a pooled scratch buffer at batch 1), then each tap's map added at its
    offset. The additions run over the flattened maps (long contiguous runs, where per-axis slices
    of a 1x1x3 kernel are runs of D - 1 values). In the flat sum, output p reads z_t at flat(p) + flat(offset):
    that is z_t[p + offset] when p + offset is inside the map, and otherwise a value r whose own
    r - offset is outside the map (flat indices are one-to-one inside it), which no output reads
    legitimately: those values lie in the strips zeroed first, so a wrapped read adds zero.

    Where ops.channel_mm's convolution kernel takes it (float32, AVX-512, at least 8 output
    channels), none of that: the kernel reads each tap's shifted rows of a into its panel and writes
    y once (no tap maps, which at batch 1 would otherwise fault in fresh pages wherever the scratch
    pool is not kept, as in lean inference)."""
    y = channel_mm.conv_batched(weight, a, scale=scale, shift=shift)
    if y is not None:
        return y
    n = a.shape[0]
    co, spatial = weight.shape[0], a.shape[2:]
    nd = len(spatial)
    taps = _taps(weight)
    wall = _tap_matrix(weight)
    # at batch 1 the tap maps go into a pooled buffer (at larger batches into a fresh tensor)
    with _scratch(a, wall.shape[0] * math.prod(spatial)) if n == 1 else contextlib.nullcontext() as buffer:
        # with scale and shift the activation is applied as the product reads a (see fusable)
        z = channel_mm.mm_batched(wall, a.flatten(2), scale=scale, shift=shift,
                                  out=buffer.view(1, wall.shape[0], -1) if n == 1 else None)
        z = z.view(n, len(taps), co, *spatial)
        centre = taps.index(tuple(0 for _ in spatial))
        y = z[:, centre].clone()
        for t, offset in enumerate(taps):
            if t == centre:
                continue
            zt = z[:, t]
            if trailing_contiguous(y, nd) and trailing_contiguous(zt, nd):
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
    if trailing_contiguous(dst, nd) and trailing_contiguous(src, nd):
        # One shifted copy of the flattened trailing block: long contiguous runs, where the
        # per-axis slices below copy runs of the last axis's length (AH-Net's depth axis: 1x1x3
        # shifts copy 7 of every 8 values in short runs, which copy slowly). The values that wrap across a row land
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


def _accumulate_tap_group(grad_a, grad_wall, wall, rows, g, m, out=None):
    """One group of taps: g (N, rows' taps * Co, S) their shifted output gradients. Adds the group's
    share to grad_a (allocating it on the first group, or writing it into the flat ``out`` at batch
    1) and writes its rows of grad_wall."""
    n = g.shape[0]
    w_t = wall[rows].t()
    if grad_a is None and out is not None and n == 1 and out.numel() >= w_t.shape[0] * g.shape[2] \
            and out.dtype == g.dtype:
        grad_a = out[:w_t.shape[0] * g.shape[2]].view(1, w_t.shape[0], g.shape[2])
        channel_mm.mm_into(grad_a[0], w_t, g[0])
    elif grad_a is None:
        grad_a = channel_mm.mm_batched(w_t, g)
    elif n == 1:
        channel_mm.mm_into(grad_a[0], w_t, g[0], accumulate=True)
    else:
        grad_a.baddbmm_(w_t.expand(n, -1, -1), g)
    grad_wall[rows] = _weight_grad(g, m)
    return grad_a


def _shift_backward(grad_y: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, chunks: int | None = None,
                    out: torch.Tensor | None = None):
    # where ops.channel_mm's kernels take it: both gradients without a shifted copy of grad_y (the
    # input gradient a convolution with the flipped weight, the weight gradient each tap's rows of a
    # read in place)
    if chunks is None:
        on_kernels = channel_mm.conv_backward(grad_y, a, weight, out=out)
        if on_kernels is not None:
            return on_kernels
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
    The copies are a third of the grouped path's and the buffer the size of one group (timed in
    benchmarks/bench_aniso_conv.py)."""
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
