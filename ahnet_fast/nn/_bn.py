"""BatchNorm modules applied through the fused ops, with nn.BatchNorm's bookkeeping; the backend choice
of a module tree."""
from __future__ import annotations

import torch
from torch import nn

from ahnet_fast.backends import check_backend_name
from ahnet_fast.nn._checkpoint import in_checkpoint_segment
from ahnet_fast import ops


def _bn_state(bn: nn.modules.batchnorm._BatchNorm):
    """(running_mean, running_var, training, momentum) for the functional call, counting the batch in
    ``num_batches_tracked`` exactly as ``bn.forward`` does."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep_running = not bn.training or bn.track_running_stats
    return (bn.running_mean if keep_running else None, bn.running_var if keep_running else None, use_batch_stats,
            momentum)


def bn_relu(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """``relu(bn(x))`` through the fused op, updating ``bn``'s running statistics and
    ``num_batches_tracked`` exactly as ``bn.forward`` would."""
    running_mean, running_var, use_batch_stats, momentum = _bn_state(bn)
    return ops.bn_relu(x, running_mean, running_var, bn.weight, bn.bias, use_batch_stats, momentum, bn.eps,
                       backend=backend)


def bn_add_relu(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, residual: torch.Tensor,
                backend: str | None = None) -> torch.Tensor:
    """``relu(bn(x) + residual)`` through the fused op (a bottleneck's tail), with ``bn``'s
    bookkeeping."""
    running_mean, running_var, use_batch_stats, momentum = _bn_state(bn)
    return ops.bn_add_relu(x, residual, running_mean, running_var, bn.weight, bn.bias, use_batch_stats, momentum,
                           bn.eps, backend=backend)


def bn_relu_conv(bn: nn.modules.batchnorm._BatchNorm, conv: nn.modules.conv._ConvNd, x: torch.Tensor,
                 backend: str | None = None) -> torch.Tensor:
    """``conv(relu(bn(x)))`` through the op that keeps only ``x`` for backward (``conv`` without bias,
    groups 1, dilation 1, zero padding)."""
    if conv.bias is not None or conv.groups != 1 or any(d != 1 for d in conv.dilation) or \
            conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"bn_relu_conv: {conv} must have no bias, groups=1, dilation 1 and numeric zero padding")
    running_mean, running_var, use_batch_stats, momentum = _bn_state(bn)
    return ops.bn_relu_conv(x, running_mean, running_var, bn.weight, bn.bias, use_batch_stats, momentum, bn.eps,
                            conv.weight, list(conv.stride), list(conv.padding), backend=backend)


def dense_block(layers, x: torch.Tensor, backend: str | None = None, skip: torch.Tensor | None = None,
                grad_handover: bool = False) -> torch.Tensor:
    """A sequence of AH-Net dense layers (modules with bn1..bn4 / conv1..conv4) as the one-buffer op,
    applied to x (+ skip); each layer's bottleneck output is kept for backward except inside a
    checkpointed segment. grad_handover: as ``ops.dense_block``'s."""
    weights, means, variances, momenta, training = _dense_args(layers)
    return ops.dense_block(x, weights, means, variances, training, momenta, layers[0].bn1.eps, backend=backend,
                           keep_bottleneck=not in_checkpoint_segment(), skip=skip, grad_handover=grad_handover)


def dense_block_into(layers, buffer: torch.Tensor, channels0: int, backend: str | None = None) -> torch.Tensor:
    """Inference: the dense layers written into ``buffer`` after its first ``channels0`` channels
    (``ops.dense_block_into``); the BatchNorms must be in eval mode."""
    weights, means, variances, _, training = _dense_args(layers)
    if training:
        raise ValueError("dense_block_into: the block's BatchNorms must be in eval mode (running statistics)")
    return ops.dense_block_into(buffer, channels0, weights, means, variances, layers[0].bn1.eps, backend=backend)


def dense_block_input(layers, x: torch.Tensor, skip: torch.Tensor | None, front: int = 0) -> torch.Tensor:
    """The buffer :func:`dense_block_into` fills, x (+ skip) written after ``front`` channels left to
    the caller (``ops.dense_block_input``)."""
    weights = [t for layer in layers for bn, conv in _dense_units(layer) for t in (bn.weight, bn.bias, conv.weight)]
    return ops.dense_block_input(x, skip, weights, front=front)


def _dense_units(layer):
    return ((layer.bn1, layer.conv1), (layer.bn2, layer.conv2), (layer.bn3, layer.conv3), (layer.bn4, layer.conv4))


def _dense_args(layers):
    """(weights, running means, running variances, momenta, use_batch_stats) of dense layers, in the
    order ops.dense_block takes them, with each BatchNorm's bookkeeping (bn.forward's)."""
    weights, means, variances, momenta = [], [], [], []
    training = None
    for layer in layers:
        for bn, conv in _dense_units(layer):
            running_mean, running_var, use_batch_stats, momentum = _bn_state(bn)
            if training is not None and use_batch_stats != training:
                raise ValueError("dense_block: all BatchNorms of a block must be in the same mode (train/eval)")
            training = use_batch_stats
            weights += [bn.weight, bn.bias, conv.weight]
            means.append(running_mean)
            variances.append(running_var)
            momenta.append(momentum)
    return weights, means, variances, momenta, training


def set_backend(root: nn.Module, backend: str | None) -> nn.Module:
    """Validates ``backend`` (None: follow the global choice) and sets it on ``root`` and on every
    submodule that calls the fused ops (those with a ``backend`` attribute)."""
    check_backend_name(backend)
    for m in root.modules():
        if m is root or hasattr(m, "backend"):
            m.backend = backend
    return root


SCRIPT_OPS = ("fused", "aten")


def set_script_ops(root: nn.Module, ops: str) -> nn.Module:
    """What ``torch.jit.script`` compiles ``root`` and its ahnet_fast submodules to (applies to the
    next scripting; an existing scripted module keeps its code):

    - ``"fused"`` (the default): in eval mode, the fused ops of eager mode, as
      ``torch.ops.ahnet_fast.*_script`` calls, so the scripted module computes what the eager one does
      and as fast; a process loading the archive must ``import ahnet_fast`` first. In training mode
      the scripted module runs MONAI's arithmetic (autograd of ATen ops).
    - ``"aten"``: MONAI's arithmetic on ATen ops in every mode: an archive that loads without
      ahnet_fast (LibTorch, another machine), equal to eager mode up to rounding.
    """
    if ops not in SCRIPT_OPS:
        raise ValueError(f"set_script_ops: ops must be one of {SCRIPT_OPS}, got {ops!r}")
    for m in root.modules():
        if "script_fused" in getattr(type(m), "__constants__", ()):
            m.script_fused = ops == "fused"
    return root
