"""Whole-volume prediction from a network trained on patches: sliding windows with blending.

AH-Net is trained on crops (a full 512x512x800 CT does not fit next to its activations), so a
volume is predicted window by window and the windows' logits are stitched back together. Two
things decide the quality of the stitched result:

* **Overlap.** A convolutional network is least reliable near the borders of its input, where its
  receptive field runs into (zero) padding instead of anatomy. Overlapping windows give every
  voxel near one window's border a second opinion from a window in which it lies further inside.
* **Blending weights.** With ``blend="gaussian"`` each window's logits are weighted by a Gaussian
  centred on the window (:func:`gaussian_weight`), so a voxel's result comes mostly from the
  windows that see it near their centre, with the most context. ``blend="constant"`` averages the
  overlapping windows uniformly (cheaper to reason about, visibly seamier).

The result is ``sum_k w_k * logits_k / sum_k w_k`` per voxel, accumulated in float32 whatever the
network's precision. Window positions per axis are laid out by :func:`window_positions`.

Memory: only one batch of windows is on the compute device at a time; the accumulator (the
weighted logit sum, ``N * C_out * prod(spatial)`` float32, divided in place at the end by the
windows' weight sum, which is formed one slab of rows at a time) lives on the output device, which may be the CPU when the volume's logits do
not fit next to the network on the GPU (``output_device="auto"``, or forced with ``"cpu"``).

The approach (overlapping tiles, Gaussian importance weighting) is the one of MONAI's
``sliding_window_inference`` and nnU-Net's predictor; this implementation is independent.
"""
from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Sequence
from itertools import product

import torch
from torch import nn

__all__ = ["gaussian_weight", "sliding_window_inference", "window_positions"]

# Gaussian weights are clamped from below: the corners of a 3D window with the default
# sigma_scale fall to ~4e-11, and a smaller sigma_scale would underflow float32 to 0, leaving voxels
# covered only by window corners with a zero weight sum (0/0). The floor is far below the weights
# that matter (a voxel's well-centred window has weight ~1), so it does not change the blend.
MIN_GAUSSIAN_WEIGHT = 1e-4

# With output_device="auto" (or the default on a CUDA input), the accumulators are put on a CUDA
# device only if they take at most this fraction of its free memory, measured after the first
# window batch ran (so the network's working memory is already held by the caching allocator).
_CUDA_FREE_FRACTION = 0.8


def _as_tuple(value, ndim: int, what: str) -> tuple:
    scalar = isinstance(value, (numbers.Number, torch.Tensor)) and getattr(value, "ndim", 0) == 0
    if scalar and not isinstance(value, bool):
        return (value,) * ndim
    try:
        values = tuple(value)
    except TypeError:
        raise ValueError(f"{what} must be a number or a sequence of {ndim} numbers, got {value!r}") from None
    if len(values) != ndim:
        raise ValueError(f"{what} has {len(values)} entries but the input has {ndim} spatial dims: {value!r}")
    return values


def _check_window(window, ndim: int) -> tuple[int, ...]:
    sizes = []
    for s in _as_tuple(window, ndim, "window"):
        try:
            size = operator.index(s)  # ints, numpy integers, 0-dim integer tensors; not 8.0 or True
        except TypeError:
            size = None
        if size is None or isinstance(s, bool) or size < 1:
            raise ValueError(f"window sizes must be positive integers, got {window!r}")
        sizes.append(size)
    return tuple(sizes)


def _check_overlap(overlap, ndim: int) -> tuple[float, ...]:
    fractions = _as_tuple(overlap, ndim, "overlap")
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not (0.0 <= f < 1.0):
            raise ValueError(f"overlap must be a fraction in [0, 1) per axis, got {overlap!r}")
    return tuple(float(f) for f in fractions)


def window_positions(size: int, window: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis of length ``size``.

    If the axis fits in one window (``size <= window``) there is a single window at 0 (the caller
    pads the axis up to the window). Otherwise the nominal stride is ``window * (1 - overlap)`` and
    ``n = ceil((size - window) / stride) + 1`` windows are spread evenly from 0 to
    ``size - window``: the first flush with the start, the last flush with the end, neighbours at
    least ``overlap`` apart. Spreading them evenly (instead of stepping by the stride and
    shifting the last one back) keeps the overlap uniform, so no seam gets more or less context
    than the others. ``n`` is capped at ``size - window + 1`` so windows are never repeated.
    """
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    size = int(size)
    (window,) = _check_window(window, 1)
    (overlap,) = _check_overlap(overlap, 1)
    if size <= window:
        return [0]
    span = size - window
    stride = window * (1.0 - overlap)
    # the epsilon keeps a stride that divides the span exactly (e.g. 0.3 overlap, 5.6 voxels) from
    # gaining a spurious window through floating-point rounding
    n = min(math.ceil(span / stride - 1e-9) + 1, span + 1)
    return [i * span // (n - 1) for i in range(n)]


def gaussian_weight(
    window: Sequence[int] | int,
    *,
    sigma_scale: float | Sequence[float] = 0.125,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Blending weights for one window: a separable Gaussian centred on the window.

    ``sigma = sigma_scale * window`` per axis (the nnU-Net default 1/8 puts the window border at
    4 sigma, so a voxel's result comes almost only from the windows in which it sits deep inside).
    The centre is ``(window - 1) / 2``, so the map is exactly symmetric for odd and even sizes.
    The map is scaled to a maximum of exactly 1 and clamped below at ``MIN_GAUSSIAN_WEIGHT``
    (> 0) so that every voxel of a window contributes and weight sums never underflow to 0.
    Computed in float64, returned as float32 of shape ``window``.
    """
    if isinstance(window, numbers.Integral) and not isinstance(window, bool):
        window = (window,)
    window = _check_window(window, len(tuple(window)))
    scales = _as_tuple(sigma_scale, len(window), "sigma_scale")
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not (s > 0 and math.isfinite(s)):
            raise ValueError(f"sigma_scale must be positive and finite, got {sigma_scale!r}")
    weight = torch.ones((), dtype=torch.float64)
    for size, scale in zip(window, scales):
        coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
        g = torch.exp(-0.5 * (coords / (scale * size)) ** 2)
        weight = weight.unsqueeze(-1) * g  # outer product, axis by axis
    weight = weight / weight.max()
    weight = weight.clamp_(min=MIN_GAUSSIAN_WEIGHT)
    return weight.to(device=device, dtype=torch.float32)


def _default_device(predictor, inputs: torch.Tensor) -> torch.device:
    """Where the windows run: the predictor's own device if it has parameters or buffers."""
    if isinstance(predictor, nn.Module):
        for t in predictor.parameters():
            return t.device
        for t in predictor.buffers():
            return t.device
    return inputs.device


def _cuda_fits(device: torch.device, nbytes: int) -> bool:
    """Whether ``nbytes`` fit comfortably in the free memory of a CUDA device."""
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes <= _CUDA_FREE_FRACTION * free


def _stitch_device(
    output_device, inputs_device: torch.device, compute_device: torch.device, nbytes: int, fits=_cuda_fits
) -> torch.device:
    """Choose where the accumulators live.

    * an explicit device: used as given (the caller's choice, e.g. ``"cpu"`` to spare GPU memory);
    * ``None``: the inputs' device, unless it is a CUDA device the accumulators do not fit on;
    * ``"auto"``: the compute device if it is a CUDA device they fit on (adds run on the GPU and
      only the final result crosses the bus), else the inputs' device if that is a CUDA device they
      fit on, else the CPU.
    """
    if output_device is None:
        if inputs_device.type == "cuda" and not fits(inputs_device, nbytes):
            return torch.device("cpu")
        return inputs_device
    if isinstance(output_device, str) and output_device == "auto":
        for candidate in (compute_device, inputs_device):
            if candidate.type == "cuda" and fits(candidate, nbytes):
                return candidate
        return torch.device("cpu")
    return torch.device(output_device)


class _Tiling:
    """The window grid of one volume: per-axis positions, padding and the crop of each window.

    A window on an axis shorter than the window starts at ``-pad_before`` (the axis is padded
    symmetrically, so the content sits in the middle of the window as it did in training); its
    valid part is ``[0, size)`` of the volume and ``[pad_before, pad_before + size)`` of the window.
    """

    def __init__(self, spatial: tuple[int, ...], window: tuple[int, ...], overlap: tuple[float, ...]):
        self.spatial, self.window = spatial, window
        self.axes = []  # per axis: list of (volume slice, window slice, pad_before, pad_after)
        for size, w, ov in zip(spatial, window, overlap):
            if size < w:
                before = (w - size) // 2
                after = w - size - before
                self.axes.append([(slice(0, size), slice(before, before + size), before, after)])
            else:
                self.axes.append([(slice(p, p + w), slice(0, w), 0, 0) for p in window_positions(size, w, ov)])

    def __len__(self) -> int:
        return math.prod(len(a) for a in self.axes)

    def __iter__(self):
        """Per window: (volume slices, window slices, F.pad argument or None)."""
        for combo in product(*self.axes):
            vol = tuple(c[0] for c in combo)
            win = tuple(c[1] for c in combo)
            pad = []
            for c in reversed(combo):  # F.pad lists the last axis first
                pad += [c[2], c[3]]
            yield vol, win, (pad if any(pad) else None)


# The windows' weight sum is formed slab by slab along the first spatial axis, a slab at most this
# many bytes: a map of the whole volume would be as large as one channel of the output.
_NORMALISE_SLAB_BYTES = 16 * 2 ** 20


def _normalise(logit_sum: torch.Tensor, tiling: _Tiling, weight: torch.Tensor) -> None:
    """Divides the weighted logit sum by the sum of the weights of the windows covering each voxel
    (the same for every sample and channel), in place, one slab of rows at a time."""
    spatial = tuple(logit_sum.shape[2:])
    rows = max(1, min(spatial[0], _NORMALISE_SLAB_BYTES // (4 * math.prod(spatial[1:]))))
    for a in range(0, spatial[0], rows):
        b = min(a + rows, spatial[0])
        weight_sum = torch.zeros((b - a, *spatial[1:]), dtype=torch.float32, device=logit_sum.device)
        for vol, win, _pad in tiling:
            lo, hi = max(vol[0].start, a), min(vol[0].stop, b)
            if lo < hi:
                first = win[0].start + lo - vol[0].start
                weight_sum[(slice(lo - a, hi - a), *vol[1:])] += \
                    weight[(slice(first, first + hi - lo), *win[1:])].to(logit_sum.device)
        logit_sum[:, :, a:b].div_(weight_sum)


def sliding_window_inference(
    inputs: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    window: Sequence[int] | int,
    *,
    overlap: float | Sequence[float] = 0.25,
    window_batch: int = 1,
    blend: str = "gaussian",
    amp: torch.dtype | None = None,
    device: torch.device | str | None = None,
    output_device: torch.device | str | None = None,
    pad_value: float = 0.0,
    progress: bool = False,
) -> torch.Tensor:
    """Predict a whole volume (or image) window by window and blend the windows' logits.

    Args:
        inputs: ``(N, C, *spatial)`` floating-point tensor with 2 or 3 spatial dims (for AH-Net
            ``(N, C, X, Y, Z)``, Z the slice axis). It may stay on the CPU while the network runs on
            a GPU: windows are copied to ``device`` one batch at a time.
        predictor: maps ``(B, C, *window)`` to ``(B, C_out, *window)`` logits; an ``nn.Module``
            (used in the train/eval state it is in: put it in ``eval()`` yourself) or any callable.
        window: window size per spatial axis (an int means the same on every axis).
        overlap: fraction of a window shared with its neighbour, in ``[0, 1)``, per axis or one for
            all (see :func:`window_positions`).
        window_batch: windows per predictor call (windows of different samples may share a call).
        blend: ``"gaussian"`` (:func:`gaussian_weight`) or ``"constant"`` (plain average).
        amp: ``torch.float16`` or ``torch.bfloat16`` to run the predictor under
            ``torch.autocast(device.type, amp)``; its outputs are accumulated in float32 anyway.
        device: where the predictor runs; default the predictor's parameters' device if it is an
            ``nn.Module`` with parameters, else the inputs' device.
        output_device: where the logits are accumulated and returned. ``None``: the inputs'
            device, falling back to the CPU if that is a CUDA device without room for them;
            ``"auto"``: the compute or inputs' CUDA device if they fit there, else the CPU; a device
            (e.g. ``"cpu"``): exactly there.
        pad_value: value of the padding when an axis is shorter than the window (use the
            background intensity of the preprocessed image, e.g. 0 for windowed CT scaled to [0, 1]).
        progress: show a tqdm progress bar over the windows.

    Returns:
        ``(N, C_out, *spatial)`` float32 blended logits (softmax/argmax them afterwards: blending
        logits and blending probabilities differ slightly; logits keep the outputs' full range).

    Raises:
        ValueError: bad window, overlap, window_batch, blend, amp or input shape, NaN or infinite
            inputs, or a predictor output that is not ``(B, C_out, *window)`` or not finite.
    """
    if not isinstance(inputs, torch.Tensor):
        raise ValueError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.ndim not in (4, 5):
        raise ValueError(
            f"inputs must be (N, C, *spatial) with 2 or 3 spatial dims, got shape {tuple(inputs.shape)}"
        )
    if not inputs.is_floating_point():
        raise ValueError(f"inputs must be a floating-point tensor, got {inputs.dtype}")
    if inputs.numel() == 0:
        raise ValueError(f"inputs is empty: shape {tuple(inputs.shape)}")
    bad = int((~torch.isfinite(inputs)).sum())
    if bad:  # a NaN would spread through every window it touches and come out as a plausible argmax
        raise ValueError(f"inputs has {bad} NaN or infinite values of {inputs.numel()}; replace them first "
                         "(e.g. torch.nan_to_num with the background intensity)")
    if not callable(predictor):
        raise ValueError(f"predictor must be callable, got {type(predictor).__name__}")
    ndim = inputs.ndim - 2
    window = _check_window(window, ndim)
    overlap = _check_overlap(overlap, ndim)
    if isinstance(window_batch, bool) or not isinstance(window_batch, numbers.Integral) or window_batch < 1:
        raise ValueError(f"window_batch must be a positive integer, got {window_batch!r}")
    if blend not in ("gaussian", "constant"):
        raise ValueError(f"blend must be 'gaussian' or 'constant', got {blend!r}")
    if amp is not None and amp not in (torch.float16, torch.bfloat16):
        raise ValueError(f"amp must be None, torch.float16 or torch.bfloat16, got {amp!r}")
    if isinstance(output_device, str) and output_device != "auto":
        output_device = torch.device(output_device)

    from tqdm import tqdm  # lazy: only needed here

    compute_device = torch.device(device) if device is not None else _default_device(predictor, inputs)
    n_samples = inputs.shape[0]
    spatial = tuple(inputs.shape[2:])
    tiling = _Tiling(spatial, window, overlap)
    if blend == "gaussian":
        weight = gaussian_weight(window, device=compute_device)
    else:
        weight = torch.ones(window, dtype=torch.float32, device=compute_device)
    jobs = [(n, vol, win, pad) for n in range(n_samples) for vol, win, pad in tiling]

    logit_sum = None
    out_device = None
    with torch.no_grad(), tqdm(
        total=len(jobs), desc="sliding window", unit="window", disable=not progress, leave=False
    ) as bar:
        for start in range(0, len(jobs), window_batch):
            batch_jobs = jobs[start : start + window_batch]
            crops = []
            for n, vol, _win, pad in batch_jobs:
                crop = inputs[(n, slice(None), *vol)]
                if pad is not None:
                    crop = torch.nn.functional.pad(crop, pad, mode="constant", value=pad_value)
                crops.append(crop)
            batch = torch.stack(crops).to(compute_device)
            del crops
            if amp is not None:
                with torch.autocast(device_type=compute_device.type, dtype=amp):
                    logits = predictor(batch)
            else:
                logits = predictor(batch)
            del batch
            if not isinstance(logits, torch.Tensor):
                raise ValueError(
                    f"predictor must return a Tensor of logits, got {type(logits).__name__} "
                    "(wrap a network with several outputs in a function that returns the one to blend)"
                )
            if logits.ndim != ndim + 2 or logits.shape[0] != len(batch_jobs) or tuple(logits.shape[2:]) != window:
                raise ValueError(
                    f"predictor mapped a window batch of shape {(len(batch_jobs), inputs.shape[1], *window)} "
                    f"to {tuple(logits.shape)}; expected ({len(batch_jobs)}, C_out, *{window})"
                )
            if logit_sum is None:  # first batch: C_out is known now, and the network's memory is held
                c_out = logits.shape[1]
                nbytes = (n_samples * c_out + 1) * math.prod(spatial) * 4
                out_device = _stitch_device(output_device, inputs.device, compute_device, nbytes)
                logit_sum = torch.zeros((n_samples, c_out, *spatial), dtype=torch.float32, device=out_device)
            # weight on the compute device (fast there), then one copy of the valid part per window
            logits = logits.float()
            for b, (n, vol, win, _pad) in enumerate(batch_jobs):
                logit_sum[(n, slice(None), *vol)] += (logits[(b, slice(None), *win)] * weight[win]).to(out_device)
            del logits
            bar.update(len(batch_jobs))
    _normalise(logit_sum, tiling, weight)
    # max and min are NaN or infinite exactly when some value is, without a mask of the output's size
    if not (torch.isfinite(logit_sum.max()) and torch.isfinite(logit_sum.min())):
        # finite inputs, so the network did it: non-finite weights, or an overflow under amp
        bad = int((~torch.isfinite(logit_sum)).sum())
        raise ValueError(f"the predictor returned {bad} NaN or infinite logits of {logit_sum.numel()} (are its "
                         "weights finite? under fp16 autocast, does it overflow?)")
    return logit_sum
