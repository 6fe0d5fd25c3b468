"""AH-Net's pseudo-3D dense block as one op, with one concatenation buffer and recomputation.

A block of L dense layers maps x (N, C0, ...) to cat(x, f1, ..., fL) with g channels per f_i; layer
i reads the first C_i = C0 + i*g channels of that concatenation and computes

    c1 = conv1x1(relu(bn1(prefix)))   (4g channels)     a = conv3x3x1(relu(bn2(c1)))   (g)
    b  = conv1x1x3(relu(bn3(a)))                        f = conv1x1(relu(bn4(a + b)))  (g)

In eager PyTorch (MONAI) every layer writes a new concatenation (a copy of everything before it),
and every BatchNorm keeps its input while the convolution after it keeps the normalised copy. Here
(Pleiss et al., "Memory-Efficient Implementation of DenseNets", 2017):

- the block's output is allocated once, x is copied into its first channels, and each layer reads
  its prefix in place and writes its g new channels after it;
- each BN-ReLU-conv unit's input is the buffer prefix, c1, a or a + b; of these only the buffer and
  a are kept (with the batch statistics): the normalised activations, c1 = conv1x1(...) and
  a + b are recomputed in backward (1x1x1 and 1x1x3 convolutions, the layer's cheapest);
- backward runs on one gradient buffer of the output's shape: layer i's new channels hold their
  complete gradient once layers i+1..L are done, and layer i adds its prefix's gradient in place.

Without ``keep_bottleneck`` (inside activation checkpointing, where memory comes first), the C++
engine on the CPU runs every unit in bands of rows (ahnet_fast.ops._bands), in forward and in
backward: each BatchNorm's batch statistics over its whole input first, then the activation and the
convolution a band at a time, so that no activation of the prefix's or c1's size is ever written
(those were the block's largest temporaries, next to its output and the prefix gradient); there
the block keeps no a either (the backward recomputes each layer's from c1's rows, one at a time).

What the block keeps for backward is the output buffer plus g channels per layer (a), against
about three copies of every prefix plus 7g channels per layer in eager mode; with
``keep_bottleneck`` (the AH-Net module's choice outside activation checkpointing) also c1 (4g
channels per layer) and a + b (g channels), trading memory for the recomputation of c1 and of the
1x1x3 convolution. The units run on an
engine of ``ahnet_fast.ops.bn_relu_conv`` (C++ BatchNorm + the convolution path
``ahnet_fast.ops.aniso_conv`` picks per shape, or Triton with BatchNorm fused into the
convolution's operand load). Registered as ``ahnet_fast::dense_block`` /
``dense_block_backward`` (and ``..._triton``): opaque to torch.compile, which sees no graph break.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ahnet_fast import _scratch as scratch, backends
from ahnet_fast._extension import extension_available
from ahnet_fast._layout import autocast_dtype, opmath_dtype
from ahnet_fast.ops import _bands as bands, _conv_paths as conv_paths, aniso_conv
from ahnet_fast.ops._handover import gradient_handed_over, handed_over
from ahnet_fast.ops._registry import define_script_entry, register_triton_pair
from ahnet_fast.ops.bn_relu import update_running_stats
from ahnet_fast.ops.bn_relu_conv import IMPLEMENTATIONS as UNIT_IMPLEMENTATIONS, SCRATCH_SLOT, ENGINES, output_format, \
    same_padding

__all__ = ["dense_block", "dense_block_input", "dense_block_into", "dense_block_reference", "PARAMS_PER_LAYER", "BNS_PER_LAYER"]

# The block runs the BatchNorm+ReLU+convolution unit's engines: the same implementations and reasons.
IMPLEMENTATIONS = backends.register("dense_block", UNIT_IMPLEMENTATIONS)

# Per layer: (bn1.weight, bn1.bias, conv1.weight, bn2..., conv2, bn3..., conv3, bn4..., conv4).
PARAMS_PER_LAYER = 12
BNS_PER_LAYER = 4


def _split(weights: Sequence[torch.Tensor]):
    """Per layer, four (bn_weight, bn_bias, conv_weight) units."""
    return [[tuple(weights[i + 3 * u: i + 3 * u + 3]) for u in range(4)]
            for i in range(0, len(weights), PARAMS_PER_LAYER)]


def _channels(channels0, layers):
    """The concatenation's channel count before each layer and after the last: [C0, C0 + g1, ...]."""
    channels = [channels0]
    for units in layers:
        channels.append(channels[-1] + units[3][2].shape[0])
    return channels


def dense_block_reference(x, weights, running_means, running_vars, training, momenta, eps):
    """MONAI's sequence of modules, as functions: the oracle."""
    conv = F.conv3d if x.dim() == 5 else F.conv2d
    for layer, (rms, rvs, moms) in enumerate(zip(_chunks(running_means), _chunks(running_vars), _chunks(momenta))):
        units = _split(weights)[layer]

        def unit(t, u):
            bw, bb, cw = units[u]
            a = F.relu(F.batch_norm(t, rms[u], rvs[u], bw, bb, training, moms[u], eps))
            return conv(a, cw, None, 1, same_padding(cw))

        a = unit(unit(x, 0), 1)
        f = unit(a + unit(a, 2), 3)
        x = torch.cat([x, f], 1)
    return x


def _chunks(seq):
    return [list(seq[i:i + BNS_PER_LAYER]) for i in range(0, len(seq), BNS_PER_LAYER)]


def _check(x, weights, running_means, running_vars, momenta):
    if x.dim() not in (4, 5):
        raise ValueError(f"dense_block: input must be (N, C, H, W) or (N, C, H, W, D), got {tuple(x.shape)}")
    if len(weights) == 0 or len(weights) % PARAMS_PER_LAYER:
        raise ValueError(f"dense_block: weights must hold {PARAMS_PER_LAYER} tensors per layer, got {len(weights)}")
    layers = len(weights) // PARAMS_PER_LAYER
    for name, seq in (("running_means", running_means), ("running_vars", running_vars), ("momenta", momenta)):
        if len(seq) != BNS_PER_LAYER * layers:
            raise ValueError(f"dense_block: {name} must hold {BNS_PER_LAYER} entries per layer ({BNS_PER_LAYER * layers}),"
                             f" got {len(seq)}")
    channels = x.shape[1]
    for i, units in enumerate(_split(weights)):
        width = units[0][2].shape[0]
        growth = units[3][2].shape[0]
        expected_in = (channels, width, growth, growth)
        for u, (bw, bb, cw) in enumerate(units):
            if cw.dim() != x.dim() or cw.shape[1] != expected_in[u]:
                raise ValueError(f"dense_block: layer {i + 1} convolution {u + 1} has weight {tuple(cw.shape)}, but "
                                 f"its input has {expected_in[u]} channels" +
                                 (f" (block input of shape {tuple(x.shape)})" if i == 0 and u == 0 else ""))
            if bw.numel() != expected_in[u] or bb.numel() != expected_in[u]:
                raise ValueError(f"dense_block: layer {i + 1} BatchNorm {u + 1} has {bw.numel()} channels, expected "
                                 f"{expected_in[u]}")
        if units[1][2].shape[0] != growth or units[2][2].shape[0] != growth:
            raise ValueError(f"dense_block: layer {i + 1} convolutions 2-4 must all give {growth} channels")
        channels += growth
    if x.numel() // max(x.shape[1], 1) <= 1:
        raise ValueError(f"dense_block: expected more than 1 value per channel, got input of shape {tuple(x.shape)}")


def dense_block(x: torch.Tensor, weights: Sequence[torch.Tensor], running_means: Sequence[torch.Tensor | None],
                running_vars: Sequence[torch.Tensor | None], training: bool, momenta: Sequence[float], eps: float,
                *, backend: str | None = None, keep_bottleneck: bool = False,
                skip: torch.Tensor | None = None, grad_handover: bool = False) -> torch.Tensor:
    """``cat(x, f_1, ..., f_L)`` of AH-Net's pseudo-3D dense layers (see the module docstring).

    weights: per layer bn1.weight, bn1.bias, conv1.weight, bn2.weight, bn2.bias, conv2.weight,
    bn3..., conv3.weight, bn4..., conv4.weight (12 per layer). running_means / running_vars /
    momenta: per layer one per BatchNorm (4 per layer); the running statistics are updated in
    place in training, as ``F.batch_norm`` does.

    keep_bottleneck: also keep each layer's c1 = conv1x1(relu(bn1(prefix))) (4g channels) and
    a + b (g channels) for backward instead of recomputing them there (for c1 a BatchNorm+ReLU pass
    over the prefix and the block's largest 1x1x1 product per layer; for a + b the 1x1x3
    convolution and the sum). The AH-Net module turns
    it on outside activation checkpointing (inside it, memory is the priority).

    skip: the block is applied to ``x + skip`` (AH-Net's decoder stages add the encoder's feature
    map to the upsampled one), the sum written straight into the block's buffer instead of a tensor
    of its own; both get the gradient of the sum.

    grad_handover: the caller promises that the gradient reaching this output's backward is seen by
    nothing else (``ahnet_fast.ops._handover``); the backward then adds the layers' prefix gradients
    into it, and the input's gradient is its first channels, instead of a buffer of the block's
    width beside it.
    """
    _check(x, weights, running_means, running_vars, momenta)
    cast = autocast_dtype(x)
    if skip is not None:
        if skip.shape != x.shape or skip.device != x.device:
            raise ValueError(f"dense_block: skip must have the input's shape and device, got {tuple(skip.shape)} "
                             f"on {skip.device} for {tuple(x.shape)} on {x.device}")
        if skip.dtype != x.dtype or cast is not None:
            # the sum as eager PyTorch forms it (type promotion; under autocast before the cast)
            x, skip = x + skip, None
    if cast is not None:  # convolutions under autocast: input and convolution weights in the low precision
        x = x.to(cast)
        weights = [w.to(cast) if i % 3 == 2 else w for i, w in enumerate(weights)]

    def run(chosen):
        if chosen == "reference":
            return dense_block_reference(x if skip is None else x + skip, list(weights), list(running_means),
                                         list(running_vars), training, list(momenta), eps)
        have_running = all(t is not None for t in running_means) and all(t is not None for t in running_vars)
        use_batch_stats = training or not have_running
        means = list(running_means) if not use_batch_stats else []
        variances = list(running_vars) if not use_batch_stats else []
        if bands.no_backward(x, skip, *weights):
            # Nothing will ask for a gradient (inference): the block runs without keeping what its
            # backward would read, each layer's temporaries freed before the next layer's exist; with
            # the running statistics, in bands of rows (ops._bands).
            if not use_batch_stats:
                out = dense_block_input(x, skip, weights)
                return _fill_banded(ENGINES[chosen], out, x.shape[1], list(weights), means, variances, eps)
            out, stats = _forward(ENGINES[chosen], x, list(weights), means, variances, use_batch_stats, eps,
                                  False, skip, keep_for_backward=False)
        else:
            op = torch.ops.ahnet_fast.dense_block if chosen == "cpp" else _triton_op()
            with handed_over(grad_handover):
                out, saved = op(x, list(weights), means, variances, use_batch_stats, eps, keep_bottleneck, skip)
            stats = _split_saved(saved, len(weights) // PARAMS_PER_LAYER)[3]
        if training and have_running:
            count = x.numel() // x.shape[1]  # every unit keeps the spatial size
            for u, (rm, rv, mom) in enumerate(zip(running_means, running_vars, momenta)):
                update_running_stats(rm, rv, stats[2 * u], stats[2 * u + 1], training, mom, count)
        return out

    return backends.dispatch("dense_block", IMPLEMENTATIONS, x.device, (x,), backend, run)


def dense_block_into(buffer: torch.Tensor, channels0: int, weights: Sequence[torch.Tensor],
                     running_means: Sequence[torch.Tensor], running_vars: Sequence[torch.Tensor], eps: float, *,
                     backend: str | None = None) -> torch.Tensor:
    """Inference (eval-mode BatchNorm, no autograd): the block's layers written into ``buffer`` in
    place, ``buffer[:, channels0:]`` computed from ``buffer[:, :channels0]`` (the block's input, which
    the caller wrote there), and ``buffer`` returned. What :func:`dense_block` computes, without the
    input as a tensor of its own: a caller that forms the input in the buffer (AH-Net's last stage:
    upsampled map + skip) frees its parts before the block runs. Runs in bands of rows
    (ahnet_fast.ops._bands); ``buffer`` may be a channel slice of a larger tensor."""
    layers = _split(weights)
    if buffer.dim() not in (4, 5) or not 0 < channels0 <= buffer.shape[1]:
        raise ValueError(f"dense_block_into: buffer must be (N, C, H, W[, D]) with 0 < channels0 <= C, got "
                         f"{tuple(buffer.shape)} and channels0={channels0}")
    total = _channels(channels0, layers)[-1] if layers else None
    if total != buffer.shape[1]:
        raise ValueError(f"dense_block_into: {len(layers)} layers on {channels0} input channels give {total} "
                         f"channels, but the buffer has {buffer.shape[1]}")
    if any(t is None for t in (*running_means, *running_vars)):
        raise ValueError("dense_block_into: inference needs every BatchNorm's running statistics")
    x = buffer[:, :channels0]
    _check(x, weights, running_means, running_vars, [0.0] * len(running_means))
    if not bands.no_backward(buffer, *weights):
        raise ValueError("dense_block_into is for inference: run it under torch.no_grad() (or with nothing "
                         "that requires a gradient)")
    if autocast_dtype(x) is not None and buffer.dtype != autocast_dtype(x):
        raise ValueError(f"dense_block_into: under autocast the buffer must be {autocast_dtype(x)}, got {buffer.dtype}")
    if autocast_dtype(x) is not None:
        weights = [w.to(buffer.dtype) if i % 3 == 2 else w for i, w in enumerate(weights)]

    def run(chosen):
        if chosen == "reference":
            buffer[:, channels0:].copy_(dense_block_reference(x, list(weights), list(running_means), list(running_vars),
                                                              False, [0.0] * len(running_means), eps)[:, channels0:])
            return buffer
        return _fill_banded(ENGINES[chosen], buffer, channels0, list(weights), list(running_means),
                            list(running_vars), eps)

    return backends.dispatch("dense_block", IMPLEMENTATIONS, x.device, (x,), backend, run)


def dense_block_input(x: torch.Tensor, skip: torch.Tensor | None, weights: Sequence[torch.Tensor], *,
                      front: int = 0) -> torch.Tensor:
    """The buffer :func:`dense_block_into` fills: (N, front + C0 + L*g, ...) laid out as x, in the
    dtype the block computes in (autocast's, else x's, or x + skip's), with x (+ skip) written into
    channels [front, front + C0). The first ``front`` channels are the caller's: AH-Net puts its
    pyramid pooling's channels there, in front of the block's, as its final block reads them."""
    if skip is not None and (skip.shape != x.shape or skip.device != x.device):
        raise ValueError(f"dense_block_input: skip must have the input's shape and device, got {tuple(skip.shape)} "
                         f"on {skip.device} for {tuple(x.shape)} on {x.device}")
    if front < 0:
        raise ValueError(f"dense_block_input: front must be >= 0, got {front}")
    dtype = autocast_dtype(x) or (x.dtype if skip is None else torch.result_type(x, skip))
    total = front + _channels(x.shape[1], _split(weights))[-1]
    buffer = torch.empty((x.shape[0], total, *x.shape[2:]), dtype=dtype, device=x.device,
                         memory_format=output_format(x))
    _write_input(buffer[:, front:], x, skip)
    return buffer


def _write_input(out, x, skip):
    """The block's input (x, or x + skip) into out's first channels."""
    if skip is None:
        out[:, :x.shape[1]].copy_(x)
    else:
        torch.add(x, skip, out=out[:, :x.shape[1]])


def _fill_banded(engine, out, channels0, weights, running_means, running_vars, eps):
    """out[:, channels0:] from out[:, :channels0] in eval mode, each layer in bands of rows: a band of
    a layer's new channels needs its 1x1x1 bottleneck c1 on the band plus the 3x3x1 unit's halo
    (ahnet_fast.ops._bands), so c1, a and a + b exist one band at a time instead of for the whole
    map, and the units' activations and convolution workspaces are a band's size."""
    layers = _split(weights)
    channels = _channels(channels0, layers)
    size = out.shape[2]
    widest = _widest(channels, layers)
    rows = bands.band_rows(out, widest)
    reach = max(sum(bands.halo(u[2]) for u in units) for units in layers)
    workspace = bands.workspace_for(out, widest, rows, reach)
    for i, units in enumerate(layers):
        params = [(bw, bb, running_means[4 * i + u], running_vars[4 * i + u], cw) for u, (bw, bb, cw) in enumerate(units)]
        r = [bands.halo(cw) for *_, cw in params]

        def unit(t, t_lo, lo, hi, u):
            bw, bb, rm, rv, cw = params[u]
            return bands.unit_rows(engine, t, t_lo, lo, hi, bw, bb, rm, rv, eps, cw, workspace)

        for h0 in range(0, size, rows):
            h1 = min(h0 + rows, size)
            # rows each unit's output is needed on, from the last unit back to the block's prefix
            s_lo, s_hi = bands.extend(h0, h1, r[3], size)
            a_lo, a_hi = bands.extend(s_lo, s_hi, r[2], size)
            c_lo, c_hi = bands.extend(a_lo, a_hi, r[1], size)
            p_lo, p_hi = bands.extend(c_lo, c_hi, r[0], size)
            c1 = unit(out[:, :channels[i], p_lo:p_hi], p_lo, c_lo, c_hi, 0)
            a = unit(c1, c_lo, a_lo, a_hi, 1)
            del c1
            s = unit(a, a_lo, s_lo, s_hi, 2)
            s.add_(a[:, :, s_lo - a_lo: s_hi - a_lo])
            del a
            out[:, channels[i]:channels[i + 1], h0:h1].copy_(unit(s, s_lo, h0, h1, 3))
            del s
    return out


# ---------------------------------------------------------------------------------------------
# The op: forward keeps a per layer (none in bands) and the statistics; backward recomputes the rest.


def _split_saved(saved, layers):
    """(a per layer, c1 per layer or nothing, a + b per layer or nothing, mean and variance per
    BatchNorm) from the op's saved list."""
    n_stats = 2 * BNS_PER_LAYER * layers
    kept = saved[layers:len(saved) - n_stats]
    return saved[:layers], kept[:layers], kept[layers:], saved[len(saved) - n_stats:]


def _empty(x, channels):
    """(N, channels, *x's spatial) laid out as x (channels-last stays channels-last)."""
    return torch.empty((x.shape[0], channels, *x.shape[2:]), dtype=x.dtype, device=x.device,
                       memory_format=output_format(x))


# The pool slot of the 3x3x1 units' input gradients in backward (the activations use SCRATCH_SLOT).
GRADIENT_SLOT = "dense_block.bottleneck_gradient"


def _scratch(out, channels, slot=SCRATCH_SLOT):
    """A pooled CPU buffer for ``channels`` channels of out's spatial size (ahnet_fast._scratch): the
    units' activations, one at a time; nothing on other devices (the Triton engine needs none)."""
    if out.device.type != "cpu":
        return contextlib.nullcontext()
    return scratch.borrow(slot, out.numel() // out.shape[1] * channels, out.dtype, out.device)


def _forward(engine, x, weights, running_means, running_vars, use_batch_stats, eps, keep_bottleneck, skip=None,
             keep_for_backward=True):
    """(out, saved) as the op returns them; without ``keep_for_backward`` (inference) (out, the
    BatchNorm statistics) only, each layer's temporaries released before the next layer's exist."""
    layers = _split(weights)
    channels = _channels(x.shape[1], layers)
    out = _empty(x, channels[-1])
    if skip is None:
        out[:, :channels[0]].copy_(x)
    else:
        torch.add(x, skip, out=out[:, :channels[0]])
    widest = _widest(channels, layers)
    # Where memory comes first (no kept bottleneck), the units run in bands of rows on the CPU
    # (_training_band_rows): each unit's batch statistics over its whole input first, then its
    # activation and convolution a band at a time, so no activation of a prefix's or c1's size exists.
    rows = out.shape[2] if keep_for_backward and keep_bottleneck else _training_band_rows(engine, out, widest)
    banded = rows < out.shape[2]
    # Otherwise one buffer for the units' activations (each lives only until its convolution has read
    # it) instead of a fresh tensor per unit: on CPU fresh pages cost a page fault each, and at
    # AH-Net's last block the prefixes' activations were 16-28 MiB apiece.
    pool = contextlib.nullcontext(_band_workspace(out, layers, widest, rows)) if banded else _scratch(out, widest)
    with pool as workspace:
        inner, bottlenecks, sums, stats = [], [], [], []
        for i, units in enumerate(layers):
            rms = running_means[4 * i: 4 * i + 4] if running_means else [None] * 4
            rvs = running_vars[4 * i: 4 * i + 4] if running_vars else [None] * 4

            def unit(t, u, into=None):
                """The unit on the whole map: its output, or written into ``into``."""
                bw, bb, cw = units[u]
                y, mean, var = engine.forward(t, bw, bb, rms[u], rvs[u], use_batch_stats, eps, cw,
                                              [1] * cw[0, 0].dim(), same_padding(cw), workspace)
                stats.extend((mean, var))
                return y if into is None else into.copy_(y)

            if banded:
                # Neither c1 nor a + b exists whole: each unit's batch statistics from its input's
                # bands, then the unit from those rows made again where each band needs them (the
                # 1x1x1 and 1x1x3 products twice: the price of the layer's largest maps)
                a = _a_from_c1_rows(engine, out[:, :channels[i]], units, rms, rvs, use_batch_stats, eps, rows,
                                    workspace, stats)
                if keep_for_backward:  # recomputed by the banded backward, from c1's rows
                    inner.append(_dropped(a))
                _last_unit_from_sum_rows(engine, a, units, rms, rvs, use_batch_stats, eps, rows, workspace, stats,
                                         out[:, channels[i]:channels[i + 1]])
                del a
                continue
            c1 = unit(out[:, :channels[i]], 0)
            a = unit(c1, 1)
            if not (keep_for_backward and keep_bottleneck):
                del c1  # read by the 3x3x1 unit only: gone before the next layer makes its own
            s = unit(a, 2)
            s.add_(a)
            if keep_for_backward:
                # a + b is recomputed in backward (1x1x3 convolution), and c1 unless kept
                inner.append(a)
                if keep_bottleneck:
                    bottlenecks.append(c1)
                    sums.append(s)
            del a
            unit(s, 3, into=out[:, channels[i]:channels[i + 1]])
            del s
        if not keep_for_backward:
            return out, stats
        return out, inner + bottlenecks + sums + stats


def _running_stats(rm, rv, sd):
    """The running statistics as the engine hands them back in eval: copies in the statistics dtype."""
    return rm.to(sd).clone(), rv.to(sd).clone()


def _unit_stats(t, use_batch_stats, rm, rv, sd):
    """A unit's statistics over a map that exists whole: its batch statistics, or the running ones."""
    return torch.ops.ahnet_fast.bn_relu_stats(t) if use_batch_stats else _running_stats(rm, rv, sd)


def _batch_stats_in_bands(t_rows, shape, rows, sd):
    """The batch statistics of a map of ``shape`` given by its rows (``t_rows(lo, hi)``), accumulated
    band by band as the C++ kernel accumulates them: deviations from a first value per channel in the
    compute dtype, their sums and squares in float64 (float64 copies of a band would be the largest
    temporaries of the block)."""
    size = shape[2]
    dims = [d for d in range(len(shape)) if d != 1]
    total = first = total_sq = None
    for h0 in range(0, size, rows):
        band = t_rows(h0, min(h0 + rows, size)).to(sd)
        if first is None:  # a copy, not a view of the band (written over below)
            first = band[(0, slice(None), *([0] * (band.dim() - 2)))].clone()
            total = torch.zeros(first.shape, dtype=torch.float64)
            total_sq = torch.zeros(first.shape, dtype=torch.float64)
        dev = band.sub_(first.view(1, -1, *([1] * (band.dim() - 2))))
        total += dev.sum(dims, dtype=torch.float64)
        total_sq += dev.square_().sum(dims, dtype=torch.float64)
        del band, dev
    count = math.prod(shape) // shape[1]
    shift = total / count
    return (first.double() + shift).to(sd), (total_sq / count - shift * shift).clamp_(min=0).to(sd)


def _a_from_c1_rows(engine, prefix, units, rms, rvs, use_batch_stats, eps, rows, workspace, stats):
    """A layer's a = unit1(unit0(prefix)) in bands without c1 = unit0(prefix) ever written whole; the
    two units' statistics are appended to ``stats``."""
    sd = opmath_dtype(prefix.dtype)
    (bw0, bb0, cw0), (bw1, bb1, cw1) = units[0], units[1]
    mean0, var0 = _unit_stats(prefix, use_batch_stats, rms[0], rvs[0], sd)

    def c1_rows(lo, hi):  # a 1x1x1 unit: rows of c1 from the same rows of the prefix
        return bands.unit_rows(engine, prefix[:, :, lo:hi], lo, lo, hi, bw0, bb0, mean0, var0, eps, cw0, workspace)

    c1_shape = (prefix.shape[0], cw0.shape[0], *prefix.shape[2:])
    mean1, var1 = (_batch_stats_in_bands(c1_rows, c1_shape, rows, sd) if use_batch_stats
                   else _running_stats(rms[1], rvs[1], sd))
    stats.extend((mean0, var0, mean1, var1))
    return bands.unit_banded(engine, prefix, bw1, bb1, mean1, var1, eps, cw1, rows, workspace, source=c1_rows)


def _last_unit_from_sum_rows(engine, a, units, rms, rvs, use_batch_stats, eps, rows, workspace, stats, into):
    """The layer's new channels, unit3(a + unit2(a)), written into ``into`` band by band without a + b
    ever written whole (unit 2 is 1x1x3: a band of a + b needs the same rows of a only); the two
    units' statistics appended to ``stats``."""
    sd = opmath_dtype(a.dtype)
    (bw2, bb2, cw2), (bw3, bb3, cw3) = units[2], units[3]
    mean2, var2 = _unit_stats(a, use_batch_stats, rms[2], rvs[2], sd)

    def sum_rows(lo, hi):
        return bands.unit_rows(engine, a[:, :, lo:hi], lo, lo, hi, bw2, bb2, mean2, var2, eps, cw2,
                               workspace).add_(a[:, :, lo:hi])

    mean3, var3 = (_batch_stats_in_bands(sum_rows, a.shape, rows, sd) if use_batch_stats
                   else _running_stats(rms[3], rvs[3], sd))
    stats.extend((mean2, var2, mean3, var3))
    bands.unit_banded(engine, a, bw3, bb3, mean3, var3, eps, cw3, rows, workspace, out=into, source=sum_rows)


def _widest(channels, layers):
    """Channels of the widest activation the block's units write: the last layer's prefix or a
    bottleneck (what the band height and the workspace are sized by)."""
    return max(channels[-2], *(units[0][2].shape[0] for units in layers))


def _dropped(t):
    """A contiguous tensor of t's dtype with no rows, standing in the saved list for a map that the
    backward recomputes: the list keeps its length and each entry's channels, none of its data."""
    return torch.empty((t.shape[0], t.shape[1], 0, *t.shape[3:]), dtype=t.dtype, device=t.device)


def _training_band_rows(engine, out, widest):
    """Rows per band of the block's units where memory comes first (ahnet_fast.ops._bands): without
    keep_bottleneck (inside activation checkpointing), with the C++ engine on the CPU, bands of about
    BAND_BYTES of the widest activation; otherwise the whole map. The bands cost time (the halo rows
    recomputed, a call per band: measured +10-30% on the block at AH-Net's last-block sizes), which
    keep_bottleneck, the choice for speed, does not pay. The Triton engine normalises while it loads
    and writes no activation to band."""
    if engine is not ENGINES["cpp"] or out.device.type != "cpu":
        return out.shape[2]
    return bands.band_rows(out, widest)


def _band_workspace(out, layers, widest, rows):
    reach = max(bands.halo(cw) for units in layers for _, _, cw in units)
    return bands.workspace_for(out, widest, rows, reach)


def _backward_banded(engine, grad_out, out, layers, channels, inner, stats, use_batch_stats, eps, rows, widest,
                     in_place=False):
    """_backward of the lean block (nothing kept but the output and the statistics, as inside
    activation checkpointing) with every unit's activation recomputed a band at a time
    (ahnet_fast.ops._bands): the last two units' gradients band by band (conv_backward_banded); a
    recomputed by the banded 3x3x1 unit from c1's rows (the forward saved it as _dropped), a + b by
    the 1x1x3 unit from a; c1 only ever as a band (see below); the first two units together in three
    passes over the bands (_bottleneck_backward_streamed), so that neither the bottleneck gradient
    nor c1's exists whole. What exists whole: the prefix gradient, and one layer's a, a + b and
    their g-channel gradients (a is freed before the first two units' backward). in_place: as
    _backward's."""
    workspace = _band_workspace(out, layers, widest, rows)
    grad = grad_out if in_place else None
    grads_w: list[torch.Tensor] = [None] * (PARAMS_PER_LAYER * len(layers))  # type: ignore[list-item]
    for i in reversed(range(len(layers))):
        units = layers[i]
        prefix = out[:, :channels[i]]
        bw0, bb0, cw0 = units[0]

        def unit_stats(u):
            return stats[2 * (4 * i + u)], stats[2 * (4 * i + u) + 1]

        # c1 never exists whole: its 1x1x1 unit needs no halo rows, so any rows of it are recomputed
        # from the same rows of the prefix, where a band needs them (for a, and in two of the first
        # units' three passes): the extra 1x1x1 products buy the largest tensor of the layer's backward
        def c1_rows(lo, hi):
            return bands.unit_rows(engine, prefix[:, :, lo:hi], lo, lo, hi, bw0, bb0, *unit_stats(0), eps, cw0,
                                   workspace)

        def conv_grad(g, t, u, into):
            """The activation's gradient into ``into``, returned."""
            bw, bb, cw = units[u]
            gcw = bands.conv_backward_banded(g, t, bw, bb, *unit_stats(u), eps, cw, rows, workspace, into)
            grads_w[PARAMS_PER_LAYER * i + 3 * u + 2] = gcw.contiguous()
            return into

        def bn_grad(g, t, u, out=None, accumulate=False):
            bw, bb, _ = units[u]
            gx, gbw, gbb = engine.bn_backward(g, t, bw, bb, *unit_stats(u), use_batch_stats, eps, out, accumulate)
            base = PARAMS_PER_LAYER * i + 3 * u
            grads_w[base], grads_w[base + 1] = gbw, gbb
            return gx

        def recompute(t, u):
            bw, bb, cw = units[u]
            return bands.unit_banded(engine, t, bw, bb, *unit_stats(u), eps, cw, rows, workspace)

        a = inner[i]
        if a.shape[2] != out.shape[2]:  # not kept (_dropped): the 3x3x1 unit again, from c1's rows
            bw1, bb1, cw1 = units[1]
            a = bands.unit_banded(engine, prefix, bw1, bb1, *unit_stats(1), eps, cw1, rows, workspace,
                                  source=c1_rows)
        s = recompute(a, 2).add_(a)
        last = i == len(layers) - 1
        g = conv_grad((grad_out if last else grad)[:, channels[i]:channels[i + 1]], s, 3, torch.empty_like(s))
        grad_s = bn_grad(g, s, 3, out=g)
        del s
        g = conv_grad(grad_s, a, 2, torch.empty_like(a))
        grad_a = bn_grad(g, a, 2, out=grad_s, accumulate=True)  # d(a) = its own + d(a + b)
        del g, grad_s, a

        # units 1 and 0 together, a band at a time: neither the bottleneck gradient nor c1's exists
        # whole (_bottleneck_backward_streamed); the prefix gradient is written (last layer: the
        # buffer is new) or added into its channels
        fresh = last and not in_place
        if fresh:
            grad = _empty(out, channels[i])
        base = PARAMS_PER_LAYER * i
        grads_w[base:base + 6] = _bottleneck_backward_streamed(
            grad_a, prefix, units[0], units[1], unit_stats(0), unit_stats(1), use_batch_stats, eps, rows, workspace,
            c1_rows, grad[:, :channels[i]], fresh=fresh)
        del grad_a
        if fresh:
            grad.add_(grad_out[:, :channels[i]])
    return grad[:, :channels[0]], grads_w


def _bottleneck_backward_streamed(grad_a, prefix, unit0, unit1, stats0, stats1, use_batch_stats: bool, eps: float,
                                  rows: int, workspace, c1_rows, dest, fresh: bool) -> list[torch.Tensor]:
    """The backward of a layer's first two units, c1 = conv0(relu(bn0(prefix))) (1x1x1) and
    a = conv1(relu(bn1(c1))) (a halo of r rows), from a's gradient, in bands of rows: neither the
    gradient of unit 1's activation (the bottleneck gradient, c1's width) nor c1's own gradient ever
    exists whole. Returns the six parameter gradients (bn0 weight, bias, conv0, bn1 weight, bias,
    conv1); the prefix's gradient is written into ``dest`` (``fresh``) or added to it.

    Batch statistics couple every row of a BatchNorm's input gradient to two per-channel sums over
    the whole map, dx = k * gm + alpha + beta * (x - mean) (gm: the incoming gradient under the ReLU's
    mask), and every step in between is linear, so three passes over the bands suffice:
    A. the bottleneck gradient row by row, exactly (bottleneck_rows: each band's transposed
       convolution on its own output rows, overlapped and added with its neighbours' over the
       halo), with c1's rows recomputed: BN1's sums, and conv1's weight gradient;
    B. the same rows again, now c1's exact gradient (alpha1, beta1 known): conv0's weight gradient,
       and the prefix's k0 * gm0 into ``dest`` with BN0's sums;
    C. alpha0 + beta0 * (prefix - mean0) added into ``dest``, band by band (BN0's sums known).
    Against a whole bottleneck gradient this runs conv1's backward and c1's recomputation twice
    instead of once, conv0's input gradient once instead of twice. The arithmetic of the C++
    bn_relu_backward (mask from x * scale + shift, sums in float64); bands half the caller's height,
    because each pass holds several maps of c1's width a band at a time."""
    (bw0, bb0, cw0), (bw1, bb1, cw1) = unit0, unit1
    (mean0, var0), (mean1, var1) = stats0, stats1
    size, nd = prefix.shape[2], cw1.dim() - 2
    r, pad, ones = bands.halo(cw1), [(k - 1) // 2 for k in cw1.shape[2:]], [1] * nd
    band = max(1, rows // 2)
    sd, dtype = mean1.dtype, prefix.dtype
    count = prefix.numel() // prefix.shape[1]

    def per_channel(v, like):
        return v.view((1, -1) + (1,) * (like.dim() - 2))

    def terms(bw, bb, mean, var):
        invstd = torch.rsqrt(var.to(sd) + eps)
        scale = bw.to(sd) * invstd
        return invstd, scale, bb.to(sd) - mean.to(sd) * scale

    def masked(g, x, scale, shift, mean):
        """(gm, x - mean) in the statistics' dtype, fresh (g and x are never written)."""
        xs = x.to(sd, copy=True)
        gm = g.to(sd, copy=True)
        gm.mul_(torch.addcmul(per_channel(shift, xs), xs, per_channel(scale, xs)).gt_(0))
        return gm, xs.sub_(per_channel(mean.to(sd), xs))

    def sums(gm, centred):
        dims = [0] + list(range(2, gm.dim()))
        return gm.sum(dims, dtype=torch.float64), (gm * centred).sum(dims, dtype=torch.float64)

    grad_cw1: list[torch.Tensor] = []  # conv1's weight gradient, set by bottleneck_rows(weight_grad=True)
    masked_rows = torch.empty((grad_a.shape[0], grad_a.shape[1], min(band + 2 * r, size), *grad_a.shape[3:]),
                              dtype=grad_a.dtype, device=grad_a.device)

    def bottleneck_rows(weight_grad: bool):
        """(j0, j1, rows [j0, j1) of the bottleneck gradient, c1's same rows), in order over the
        map. Each band's transposed convolution takes a's gradient on the band's own output rows
        only (zero on the halo rows: each output row counts once, in conv1's weight gradient too)
        and spreads it over the band and its halo; a row's gradient is complete once the bands on
        both sides have added theirs, so the last r rows of a band wait for the next one."""
        pending = None
        for h0, h1 in spans:
            lo, hi = bands.extend(h0, h1, r, size)
            c1 = c1_rows(lo, hi)
            act = bands.activation_in(workspace, c1, bw1, bb1, mean1, var1, eps)
            g = bands.own_rows(masked_rows, grad_a, lo, hi, h0, h1)
            partial, gw = conv_paths.backward(aniso_conv.choose("backward", act, cw1, ones, pad), g, act, cw1, ones,
                                              pad)
            del act
            if weight_grad:
                grad_cw1[:] = [bands.summed(grad_cw1[0] if grad_cw1 else None, gw)]
            del gw
            if pending is not None:  # rows [lo, lo + pending rows): the previous band's share added
                partial[:, :, :pending.shape[2]].add_(pending)
            done = hi if h1 == size else h1 - r
            pending = partial[:, :, done - lo:]
            yield lo, done, partial[:, :, :done - lo], c1[:, :, :done - lo]
            del partial, c1

    invstd1, k1, shift1 = terms(bw1, bb1, mean1, var1)
    invstd0, k0, shift0 = terms(bw0, bb0, mean0, var0)
    spans = [(h0, min(h0 + band, size)) for h0 in range(0, size, band)]
    # A: BN1's sums and conv1's weight gradient
    sum_g1 = torch.zeros(mean1.numel(), dtype=torch.float64, device=mean1.device)
    sum_gd1 = torch.zeros_like(sum_g1)
    for _, _, g1, c1 in bottleneck_rows(weight_grad=True):
        gm, centred = masked(g1, c1, k1, shift1, mean1)
        del g1, c1
        sg, sgd = sums(gm, centred)
        sum_g1 += sg
        sum_gd1 += sgd
        del gm, centred
    if use_batch_stats:
        alpha1 = (-k1.double() * sum_g1 / count).to(sd)
        beta1 = (-k1.double() * invstd1.double() ** 2 * sum_gd1 / count).to(sd)
    # B: c1's gradient, conv0's weight gradient, the prefix's k0 * gm0 and BN0's sums
    sum_g0 = torch.zeros(mean0.numel(), dtype=torch.float64, device=mean0.device)
    sum_gd0 = torch.zeros_like(sum_g0)
    grad_cw0 = None
    for j0, j1, g1, c1 in bottleneck_rows(weight_grad=False):
        gm, centred = masked(g1, c1, k1, shift1, mean1)
        del g1, c1
        grad_c1 = gm.mul_(per_channel(k1, gm))
        if use_batch_stats:
            grad_c1.add_(centred.mul_(per_channel(beta1, centred))).add_(per_channel(alpha1, grad_c1))
        del centred
        grad_c1 = grad_c1.to(dtype)
        x = prefix[:, :, j0:j1]
        act = bands.activation_in(workspace, x, bw0, bb0, mean0, var0, eps)
        part = conv_paths.matmul_weight_grad(grad_c1, act, cw0)
        grad_cw0 = bands.summed(grad_cw0, part)
        gm, centred = masked(conv_paths.matmul_input_grad(grad_c1, act, cw0), x, k0, shift0, mean0)
        del grad_c1, act, part
        sg, sgd = sums(gm, centred)
        sum_g0 += sg
        sum_gd0 += sgd
        del centred
        part = gm.mul_(per_channel(k0, gm)).to(dtype)
        (dest[:, :, j0:j1].copy_ if fresh else dest[:, :, j0:j1].add_)(part)
        del gm, part
    del masked_rows
    # C: BN0's terms that need its sums
    if use_batch_stats:
        alpha0 = (-k0.double() * sum_g0 / count).to(sd)
        beta0 = (-k0.double() * invstd0.double() ** 2 * sum_gd0 / count).to(sd)
        for h0, h1 in spans:
            x = prefix[:, :, h0:h1]
            fix = x.to(sd, copy=True).sub_(per_channel(mean0.to(sd), x)).mul_(per_channel(beta0, x))
            dest[:, :, h0:h1].add_(fix.add_(per_channel(alpha0, x)).to(dtype))
            del fix
    return [(sum_gd0 * invstd0.double()).to(bw0.dtype), sum_g0.to(bb0.dtype), grad_cw0.to(cw0.dtype).contiguous(),
            (sum_gd1 * invstd1.double()).to(bw1.dtype), sum_g1.to(bb1.dtype), grad_cw1[0].to(cw1.dtype).contiguous()]


def _backward(engine, grad_out, out, channels0, weights, saved, use_batch_stats, eps, in_place=False):
    """(the block input's gradient, the parameters' gradients). in_place (the output's gradient handed
    over, see dense_block's grad_handover): the prefix gradients are added into grad_out itself, whose
    first channels0 channels are then the input's gradient, instead of into a buffer of the block's
    width beside it."""
    layers = _split(weights)
    inner, kept, kept_sums, stats = _split_saved(saved, len(layers))
    channels = _channels(channels0, layers)
    widest = _widest(channels, layers)
    rows = out.shape[2] if kept else _training_band_rows(engine, out, widest)
    if any(a.shape[2] != out.shape[2] for a in inner) and rows >= out.shape[2]:
        # the forward ran in bands (and saved no a) and the backward would not: only if the band
        # size changed in between (ops._bands.BAND_BYTES), which the two must share
        raise ValueError("dense_block backward: the forward ran in bands and kept no inner maps, but the band "
                         "size changed before the backward (ahnet_fast.ops._bands.BAND_BYTES must stay the same "
                         "from a forward to its backward)")
    if rows < out.shape[2]:
        return _backward_banded(engine, grad_out, out, layers, channels, inner, stats, use_batch_stats, eps, rows,
                                widest, in_place)
    # The prefix gradient accumulates layer by layer in a buffer of the channels before the last
    # layer's (channels[-2]); the last layer's own channels are read from grad_out (no clone of
    # grad_out: one pass fewer). The last layer's BatchNorm gradient is written into the new buffer,
    # grad_out's share added to it; each earlier layer's is added in place.
    grad = grad_out if in_place else None
    grads_w: list[torch.Tensor] = [None] * len(weights)  # type: ignore[list-item]
    # One buffer for every activation the units' weight gradients recompute (one at a time), rather
    # than a fresh tensor per unit: at AH-Net's last block that was 12 allocations of 5-27 MB, each
    # paid again in page faults on CPU. Its size: the widest of the last layer's prefix and c1 (the
    # forward's buffer: the pool hands the same one back). The first unit's input gradient goes
    # there too (consumed at once by its BatchNorm's).
    # A second buffer takes the 3x3x1 unit's input gradient (c1's width): consumed by the BatchNorm
    # gradient written over it and the first unit's backward, before the next layer needs it.
    bottleneck = max(units[0][2].shape[0] for units in layers)
    with _scratch(out, widest) as workspace, _scratch(out, bottleneck, GRADIENT_SLOT) as grad_buffer:
        # The order below frees each temporary as soon as it is used. Held longer, the last layer's
        # normalised prefix, c1, c1's activation and their gradients were alive together with the 3x3x1
        # unit's shifted gradient copies (conv_paths._shift_backward): that was the block's peak. So
        # the normalised prefix is recomputed for the first unit's backward (one BatchNorm+ReLU pass)
        # rather than kept through the 3x3x1 unit's, and each gradient is dropped once consumed.
        for i in reversed(range(len(layers))):
            units = layers[i]
            a = inner[i]
            prefix = out[:, :channels[i]]

            def args(u):
                bw, bb, cw = units[u]
                return bw, bb, stats[2 * (4 * i + u)], stats[2 * (4 * i + u) + 1]

            def conv_grad(g, t, u, activation, grad_in_workspace=False):
                bw, bb, mean, var = args(u)
                cw = units[u][2]
                gt, gcw = engine.conv_backward(g, t, bw, bb, mean, var, eps, cw, [1] * cw[0, 0].dim(),
                                               same_padding(cw), activation, workspace, grad_in_workspace,
                                               grad_buffer if u == 1 else None)
                grads_w[PARAMS_PER_LAYER * i + 3 * u + 2] = gcw
                return gt

            def bn_grad(g, t, u, out=None, accumulate=False):
                bw, bb, mean, var = args(u)
                gx, gbw, gbb = engine.bn_backward(g, t, bw, bb, mean, var, use_batch_stats, eps, out, accumulate)
                base = PARAMS_PER_LAYER * i + 3 * u
                grads_w[base], grads_w[base + 1] = gbw, gbb
                return gx

            def recompute(t, u, keep_activation=True):
                bw, bb, mean, var = args(u)
                cw = units[u][2]
                return engine.recompute(t, bw, bb, mean, var, eps, cw, [1] * cw[0, 0].dim(), same_padding(cw),
                                        keep_activation)

            if kept_sums:  # a + b kept: bn_relu(a) is recomputed inside the 1x1x3 unit's conv_backward
                s, act_a = kept_sums[i], None
            else:
                b, act_a = recompute(a, 2)
                s = b.add_(a)
                del b
            # Each BatchNorm gradient is written over the convolution gradient it comes from (which it
            # consumes), or added into its destination: no fresh tensor per unit.
            last = i == len(layers) - 1
            g = conv_grad((grad_out if last else grad)[:, channels[i]:channels[i + 1]], s, 3, None)
            grad_s = bn_grad(g, s, 3, out=g)
            del g, s
            g = conv_grad(grad_s, a, 2, act_a)
            del act_a
            grad_a = bn_grad(g, a, 2, out=grad_s, accumulate=True)  # d(a) = its own + d(a + b)
            del g, grad_s
            c1 = kept[i] if kept else recompute(prefix, 0, keep_activation=False)[0]
            g = conv_grad(grad_a, c1, 1, None)
            del grad_a
            grad_c1 = bn_grad(g, c1, 1, out=g)
            del g, c1
            g = conv_grad(grad_c1, prefix, 0, None, grad_in_workspace=True)
            del grad_c1
            if last and not in_place:
                grad = _empty(out, channels[i])
                bn_grad(g, prefix, 0, out=grad)
                grad.add_(grad_out[:, :channels[i]])
            else:
                bn_grad(g, prefix, 0, out=grad[:, :channels[i]], accumulate=True)
            del g
        return grad[:, :channels0], grads_w


def _forward_fake(engine, x, weights, running_means, running_vars, use_batch_stats, eps, keep_bottleneck, skip):
    layers = _split(weights)
    channels = _channels(x.shape[1], layers)
    out = _empty(x, channels[-1])
    # the real forward's choice, from the same shapes: in bands, each a is saved as _dropped
    widest = _widest(channels, layers)
    banded = not keep_bottleneck and _training_band_rows(engine, out, widest) < out.shape[2]
    inner, bottlenecks, sums, stats = [], [], [], []
    sd = opmath_dtype(x.dtype)
    c = x.shape[1]
    for units in layers:
        width, growth = units[0][2].shape[0], units[3][2].shape[0]
        # each unit's output takes its input's format (bn_relu_conv.output_format); the first reads a
        # prefix of the buffer, which is channels-last only when it is the whole buffer
        like = out[:, :c]
        fmt = output_format(like)
        a = torch.empty((x.shape[0], growth, *x.shape[2:]), dtype=x.dtype, device=x.device, memory_format=fmt)
        inner.append(_dropped(a) if banded else a)
        if keep_bottleneck:
            bottlenecks.append(torch.empty((x.shape[0], width, *x.shape[2:]), dtype=x.dtype, device=x.device,
                                           memory_format=fmt))
            sums.append(torch.empty((x.shape[0], growth, *x.shape[2:]), dtype=x.dtype, device=x.device,
                                    memory_format=fmt))
        for n in (c, width, growth, growth):
            stats += [x.new_empty(n, dtype=sd), x.new_empty(n, dtype=sd)]
        c += growth
    return out, inner + bottlenecks + sums + stats


def _backward_fake(grad_out, out, channels0, weights, saved, use_batch_stats, eps):
    # the real backward's buffer holds the channels before the last layer's
    last_growth = weights[-1].shape[0]
    grad = torch.empty((out.shape[0], out.shape[1] - last_growth, *out.shape[2:]), dtype=out.dtype,
                       device=out.device, memory_format=output_format(out))
    return grad[:, :channels0], [torch.empty_like(w) for w in weights]


def _setup_context(ctx, inputs, output):
    x, weights, running_means, running_vars, use_batch_stats, eps, _keep, skip = inputs
    out, saved = output
    ctx.save_for_backward(out, *weights, *saved)
    # the saved list is an output only to reach backward: its gradient is always None, and
    # materialising it would fill zeros the size of every kept tensor, every step
    ctx.set_materialize_grads(False)
    ctx.args = (x.shape[1], len(weights), use_batch_stats, eps, len(running_means), len(running_vars),
                skip is not None)
    ctx.handed_over = gradient_handed_over()


def _takes_over(grad_out, out) -> bool:
    """Whether the in-place backward can write into grad_out: out's dtype and layout but for the
    batch stride (a channel slice of a wider gradient, as the pyramid pooling's hands on)."""
    return (grad_out.dtype == out.dtype and grad_out.stride()[1:] == out.stride()[1:] and
            (grad_out.shape[0] == 1 or grad_out.stride(0) >= out.stride(0)))


def _make_backward(backward_op, in_place_op):
    def backward(ctx, grad_out, _grad_saved):
        channels0, n_weights, use_batch_stats, eps, n_means, n_vars, has_skip = ctx.args
        if grad_out is None:  # the block's output took no part in the loss
            return None, [None] * n_weights, [None] * n_means, [None] * n_vars, None, None, None, None
        out, *rest = ctx.saved_tensors
        weights, saved = rest[:n_weights], rest[n_weights:]
        if ctx.handed_over and _takes_over(grad_out, out):
            # the gradient is ours (dense_block's grad_handover): the prefix gradients added into it
            grads_w = [torch.empty_like(w) for w in weights]
            in_place_op(grad_out, out, channels0, weights, saved, use_batch_stats, eps, grads_w)
            # a compact copy: a view would hold all of grad_out for as long as the input's gradient
            # waits for its other share (AH-Net: the skip's, until the stem's backward)
            grad_x = grad_out[:, :channels0].clone()
        else:
            grad_x, grads_w = backward_op(grad_out, out, channels0, weights, saved, use_batch_stats, eps)
        # x + skip: the same gradient for both
        return grad_x, grads_w, [None] * n_means, [None] * n_vars, None, None, None, grad_x if has_skip else None

    return backward


def _define(name: str, engine):
    @torch.library.custom_op(f"ahnet_fast::{name}_backward", mutates_args=())
    def backward_op(grad_out: torch.Tensor, out: torch.Tensor, channels0: int, weights: list[torch.Tensor],
                    saved: list[torch.Tensor], use_batch_stats: bool, eps: float
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return _backward(engine, grad_out, out, channels0, weights, saved, use_batch_stats, eps)

    # The backward with the output's gradient handed over: the input's gradient is left in grad_out's
    # first channels (outputs may not alias inputs, so the caller takes it from there), the
    # parameters' gradients written into grads_w (functionalization takes no list output from an op
    # that mutates: they are mutated arguments too, a few kilobytes).
    @torch.library.custom_op(f"ahnet_fast::{name}_backward_", mutates_args=("grad_out", "grads_w"))
    def backward_in_place(grad_out: torch.Tensor, out: torch.Tensor, channels0: int, weights: list[torch.Tensor],
                          saved: list[torch.Tensor], use_batch_stats: bool, eps: float,
                          grads_w: list[torch.Tensor]) -> None:
        computed = _backward(engine, grad_out, out, channels0, weights, saved, use_batch_stats, eps, in_place=True)[1]
        for dst, src in zip(grads_w, computed):
            dst.copy_(src)

    @backward_in_place.register_fake
    def _(grad_out, out, channels0, weights, saved, use_batch_stats, eps, grads_w):
        return None

    @torch.library.custom_op(f"ahnet_fast::{name}", mutates_args=())
    def forward_op(x: torch.Tensor, weights: list[torch.Tensor], running_means: list[torch.Tensor],
                   running_vars: list[torch.Tensor], use_batch_stats: bool, eps: float, keep_bottleneck: bool,
                   skip: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out, saved = _forward(engine, x, weights, running_means, running_vars, use_batch_stats, eps,
                              keep_bottleneck, skip)
        # outputs must not alias inputs (eval mode hands back the running statistics)
        ids = {id(t) for t in running_means} | {id(t) for t in running_vars}
        return out, [t.clone() if id(t) in ids else t for t in saved]

    def forward_fake(x, weights, running_means, running_vars, use_batch_stats, eps, keep_bottleneck, skip):
        return _forward_fake(engine, x, weights, running_means, running_vars, use_batch_stats, eps, keep_bottleneck,
                             skip)

    in_place = getattr(torch.ops.ahnet_fast, backward_in_place._name).default
    return register_triton_pair(forward_op, backward_op, forward_fake, _backward_fake,
                                lambda op: _make_backward(op, in_place), _setup_context)[0]


_TRITON_OP = None


def _triton_op():
    global _TRITON_OP
    if _TRITON_OP is None:
        _TRITON_OP = _define("dense_block_triton", ENGINES["triton"])
    return _TRITON_OP


if extension_available():
    _define("dense_block", ENGINES["cpp"])

# TorchScript's entry to the op (see define_script_entry): the same dispatch as a Python call.
# Eval mode: the running statistics where given (all of them), the batch's where not.
define_script_entry(
    "dense_block_script",
    "(Tensor x, Tensor[] weights, Tensor?[] running_means, Tensor?[] running_vars, float eps, Tensor? skip, "
    "str? backend) -> Tensor",
    lambda x, weights, running_means, running_vars, eps, skip, backend: dense_block(
        x, weights, running_means, running_vars, any(m is None for m in running_means + running_vars),
        [0.0] * len(running_means), eps, backend=backend, skip=skip))
