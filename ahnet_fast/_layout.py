"""The memory layouts and math precision the kernels use, in Python (the C++ twin is
csrc/cpu/layout.h): contiguous channel-first, or channels-last (channels_last / channels_last_3d: C
innermost). Anything else is made contiguous first. Shared by the op modules and the Triton
launchers."""
from __future__ import annotations

import torch


def is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() >= 3 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def trailing_contiguous(t: torch.Tensor, nd: int) -> bool:
    """Whether t's last nd axes are laid out as one contiguous row-major block (strides over axes of
    size 1 ignored): a map, or a band of rows of one, whose voxels a kernel can read as one run."""
    expected = 1
    for size, stride in zip(reversed(t.shape[t.dim() - nd:]), reversed(t.stride()[t.dim() - nd:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def readable(x: torch.Tensor) -> torch.Tensor:
    """``x`` in a layout the kernels read directly (contiguous or channels-last), copied if not."""
    return x if x.is_contiguous() or is_channels_last(x) else x.contiguous()


def channels_innermost(x: torch.Tensor) -> bool:
    """Kernels that take any strides (pyramid pooling) give their outputs the channels-last format
    when the input's channel stride is 1; the C++ kernel applies the same rule."""
    return x.stride(1) == 1 and x.shape[1] > 1


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the kernels compute in: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_like(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor laid out as the kernels lay out an output computed from ``x``."""
    if is_channels_last(x):
        return torch.empty_like(x.movedim(1, -1), memory_format=torch.contiguous_format).movedim(-1, 1)
    return x.new_empty(x.shape)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs convolutions in on ``x``'s device, or None when autocast is
    off. The custom ops are opaque to autocast, so their Python wrappers apply its policy themselves:
    convolution operands in this dtype, BatchNorm parameters and statistics kept in float32."""
    device_type = x.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type) and x.is_floating_point() and \
            x.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return None
