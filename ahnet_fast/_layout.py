"""The memory layouts the kernels read directly, in Python (the C++ twin is csrc/cpu/layout.h):
contiguous channel-first, or channels-last (channels_last / channels_last_3d: C innermost).
Anything else is made contiguous first."""
from __future__ import annotations

import torch


def is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() >= 3 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def output_like(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor laid out as the kernels lay out an output computed from ``x``."""
    if is_channels_last(x):
        return torch.empty_like(x.movedim(1, -1), memory_format=torch.contiguous_format).movedim(-1, 1)
    return x.new_empty(x.shape)
