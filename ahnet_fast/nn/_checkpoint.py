"""Activation checkpointing of model segments that keeps BatchNorm's bookkeeping exact.

``torch.utils.checkpoint`` (non-reentrant) runs a segment's forward a second time in backward to
rebuild what it dropped. A training-mode BatchNorm would then update its running statistics and
``num_batches_tracked`` twice per step, and the model would drift from the one without
checkpointing. :func:`checkpoint_segment` snapshots the segment's BatchNorm buffers before the
recomputation and puts them back after it; the recomputed values themselves are bitwise those of
the first forward (the kernels are deterministic, and the RNG state is restored by
``torch.utils.checkpoint``), so the gradients equal those of the model without checkpointing
(bitwise while every map fits one band of ``ahnet_fast.ops._bands``; on the CPU, where memory comes
first, the BatchNorm-ReLU-convolution units of wider maps run band by band, which rounds differently).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ahnet_fast import _scratch as scratch

POLICIES = ("none", "encoder", "decoder", "all", "auto")

# checkpoint="auto" asks the memory planner, which sits above the modules, for the cheapest policy
# that fits the memory budget: ahnet_fast.memory registers itself here when imported, and the
# package imports it (so the modules never import upward)
_auto_resolver: Callable | None = None


def set_auto_resolver(fn: Callable) -> None:
    global _auto_resolver
    _auto_resolver = fn


def resolve_auto(model: nn.Module, x: torch.Tensor) -> str:
    if _auto_resolver is None:
        raise RuntimeError("checkpoint='auto' needs the memory planner: import ahnet_fast (which imports "
                           "ahnet_fast.memory) before the first forward")
    return _auto_resolver(model, x)


_segment_depth = 0
_output_discarded = False


def output_discarded() -> bool:
    """True while a segment's function runs again in backward: non-reentrant checkpointing keeps what
    that run saves for backward and drops its output, which the function may then leave unbuilt where
    its saved tensors do not depend on it. Only the segment's own function may act on it: a segment
    nested inside may be run again within that run too (and then sees True); a function called
    without checkpointing inside it sees False."""
    return _output_discarded


def in_checkpoint_segment() -> bool:
    """True while a checkpointed segment's forward runs (first pass or recomputation), or inside
    :func:`prefer_recomputation`: modules then recompute rather than keep optional tensors (the
    dense block's bottleneck outputs)."""
    return _segment_depth > 0


@contextlib.contextmanager
def prefer_recomputation():
    """Within the block, modules behave as inside a checkpointed segment: the memory-lean choice."""
    global _segment_depth
    _segment_depth += 1
    try:
        yield
    finally:
        _segment_depth -= 1


def _bn_buffers(modules: tuple[nn.Module, ...]) -> list[torch.Tensor]:
    out = []
    for root in modules:
        for m in root.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                out += [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    return out


def checkpoint_segment(fn: Callable[..., torch.Tensor], modules: tuple[nn.Module, ...], *args: torch.Tensor):
    """``fn(*args)`` with its activations dropped after forward and recomputed in backward;
    ``modules`` are those ``fn`` runs (their BatchNorm buffers are restored after the recomputation)."""
    calls = [0]
    keep = scratch.keeping()  # the recomputation in backward keeps scratch buffers as this call did

    def run(*inputs):
        global _output_discarded
        calls[0] += 1
        snapshot = [(b, b.clone()) for b in _bn_buffers(modules)] if calls[0] > 1 else []
        scratch.push_keep(keep)
        discarded, _output_discarded = _output_discarded, calls[0] > 1
        try:
            with prefer_recomputation():
                return fn(*inputs)
        finally:
            _output_discarded = discarded
            scratch.pop_keep()
            with torch.no_grad():
                for buffer, value in snapshot:
                    buffer.copy_(value)

    if not torch.is_grad_enabled() or not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args) and \
            not any(p.requires_grad for m in modules for p in m.parameters()):
        # run as it is (inside another segment's recomputation, too): its output is used
        global _output_discarded
        discarded, _output_discarded = _output_discarded, False
        try:
            return fn(*args)
        finally:
            _output_discarded = discarded
    return checkpoint(run, *args, use_reentrant=False)
