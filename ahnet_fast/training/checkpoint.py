"""Checkpoints that survive a kill at any moment.

A checkpoint is a plain dict (tensors, numbers, strings, lists, dicts) so that
``torch.load(path, weights_only=True)`` reads it: no pickled classes, nothing executed on load.
It is written to a temporary file in the same folder, flushed and fsync'ed, then renamed over the
old one (``os.replace`` is atomic on POSIX and Windows): a reader sees either the previous complete
checkpoint or the new complete one, never a torn file.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ahnet_fast._atomic import atomic_path

FORMAT_VERSION = 1
REQUIRED_KEYS = ("model", "optimizer", "step", "config")


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` through a temporary file and a rename; returns the path."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def nonfinite_tensors(tree, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a (nested) dict/list of tensors that hold NaN or inf."""
    bad = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            bad += nonfinite_tensors(v, f"{prefix}{k}.")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            bad += nonfinite_tensors(v, f"{prefix}{i}.")
    elif torch.is_tensor(tree) and tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
        bad.append(prefix.rstrip("."))
    return bad


def load_checkpoint(path: str | os.PathLike, *, map_location="cpu", mmap: bool = False) -> dict:
    """Reads a training checkpoint with ``weights_only=True``; ValueError naming the file when it is
    missing, unreadable or not an ahnet_fast training checkpoint. ``mmap``: tensors are mapped from
    the file, not read (for a look at the config or step of a large checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"checkpoint {str(path)!r} is not an ahnet_fast training checkpoint: it needs the keys "
                         f"{list(REQUIRED_KEYS)}, it has {have}")
    return ckpt
