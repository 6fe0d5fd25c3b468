"""BatchNorm modules applied through the fused ops, with nn.BatchNorm's bookkeeping; the backend choice
of a module tree."""
from __future__ import annotations

import torch
from torch import nn

from ahnet_fast.backends import requested_backend
from ahnet_fast.ops import batch_norm_relu


def bn_relu(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """``relu(bn(x))`` through the fused op, updating ``bn``'s running statistics and
    ``num_batches_tracked`` exactly as ``bn.forward`` would."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep_running = not bn.training or bn.track_running_stats
    return batch_norm_relu(
        x,
        bn.running_mean if keep_running else None,
        bn.running_var if keep_running else None,
        bn.weight,
        bn.bias,
        use_batch_stats,
        momentum,
        bn.eps,
        backend=backend,
    )


def set_backend(root: nn.Module, backend: str | None) -> nn.Module:
    """Validates ``backend`` (None: follow the global choice) and sets it on ``root`` and on every
    submodule that calls the fused ops (those with a ``backend`` attribute)."""
    if backend is not None:
        requested_backend(backend)
    for m in root.modules():
        if m is root or hasattr(m, "backend"):
            m.backend = backend
    return root
