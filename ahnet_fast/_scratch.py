"""Reused CPU scratch buffers for the ops' large temporaries.

On CPU a tensor of 32 MiB or more is a fresh ``mmap`` from glibc every time it is allocated, and
smaller ones often are too once the heap has been trimmed: every 4 KiB page of it then costs a page
fault (the kernel zeroes it) on first touch, which costs many times the write itself. AH-Net's last
dense block and final block recompute activations of tens of megabytes in every training step, so the ops borrow those
temporaries from here instead: one flat buffer per (thread, slot, dtype), kept between calls, grown
when a larger one is needed. The CUDA caching allocator already does this for GPU tensors, so only
CPU requests are served from the pool.

What is kept is at most one buffer per slot (the largest request so far); :func:`release` drops
them all (and ``AHNET_FAST_SCRATCH=0`` turns the pool off: every borrow is then a fresh tensor).
The pool is per thread: each thread that runs the ops keeps its own buffers, and :func:`release`
frees the calling thread's; :func:`set_keep` (False) makes every borrow a fresh tensor, freed when
returned, where memory comes first. A model that puts memory first for one call says so with
:func:`push_keep` / :func:`pop_keep` around it (AHNet under activation checkpointing); the ops keep
what was in force at their forward for their backward (``ops._registry``), so two models in one
process do not change each other's behaviour. A borrowed buffer is the borrower's until the ``with`` block
ends; nothing that outlives the block may be a view of it (the ops hand out only tensors computed
from it). A nested borrow of a slot
already out gets a fresh tensor, so nesting is safe, merely not pooled.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import torch

__all__ = ["borrow", "release", "pooled_bytes", "enabled", "set_keep", "keeping", "push_keep", "pop_keep"]

_local = threading.local()
_keep = True  # see set_keep
# Per-call choices (push_keep/pop_keep), innermost last. A plain list, not a context manager or a
# thread-local, so that torch.compile traces a model's forward through it (as backends._stack).
_keep_stack: list[bool] = []


def enabled() -> bool:
    return os.environ.get("AHNET_FAST_SCRATCH", "1") != "0"


def set_keep(keep: bool) -> None:
    """Whether borrowed buffers are kept for the next borrow (the default) or freed when returned.
    Keeping trades memory (the pool's buffers, held between steps) for time; a model that puts
    memory first (AHNet with activation checkpointing) turns it off, and every thread's pool then
    drops its buffers at its next borrow."""
    global _keep
    _keep = bool(keep)


def keeping() -> bool:
    """Whether borrowed buffers are kept now: the innermost push_keep, else set_keep's default."""
    return _keep_stack[-1] if _keep_stack else _keep


def push_keep(keep: bool) -> None:
    """Until the matching :func:`pop_keep`: keep borrowed buffers (True) or free them (False)."""
    _keep_stack.append(bool(keep))


def pop_keep() -> None:
    _keep_stack.pop()


def _pool() -> dict:
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = {}
    return pool


@contextmanager
def borrow(slot: str, numel: int, dtype: torch.dtype, device: torch.device):
    """A flat tensor of ``numel`` elements (uninitialised) for the duration of the block: the
    pooled buffer of ``slot`` on CPU, a fresh tensor elsewhere or when the slot is already out."""
    device = torch.device(device)
    if device.type != "cpu" or not enabled():
        yield torch.empty(numel, dtype=dtype, device=device)
        return
    pool = _pool()
    if not keeping():
        pool.clear()
        yield torch.empty(numel, dtype=dtype, device=device)
        return
    key = (slot, dtype)
    buf = pool.pop(key, None)  # taken out while borrowed: a nested borrow of the slot cannot share it
    if buf is None or buf.numel() < numel:
        buf = None  # the smaller buffer is freed before the larger one is allocated
        # never an inference tensor: one made under torch.inference_mode() could not be written
        # (out=) by a later training step
        with torch.inference_mode(False):
            buf = torch.empty(numel, dtype=dtype, device=device)
    try:
        yield buf[:numel]
    finally:
        kept = pool.get(key)
        if kept is None or kept.numel() < buf.numel():
            pool[key] = buf


def release() -> None:
    """Frees this thread's pooled buffers (they are allocated again when next needed)."""
    _pool().clear()


def pooled_bytes() -> int:
    """Bytes this thread's pool holds now."""
    return sum(t.numel() * t.element_size() for t in _pool().values())
