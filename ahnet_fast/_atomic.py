"""Atomic file writes, for everything ahnet_fast writes that a reader may see half-done.

The content goes to a fresh hidden name beside the target (the same file system, so the rename is
atomic), is flushed to disk, and is renamed over the target: a reader, or a run killed at any
moment, sees the previous complete file or the new complete one, never a torn one.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path to write to (ending in ``suffix``, for writers that infer the format
    from the name); on a clean exit it replaces ``path``, on an exception it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.name[: -len(suffix)] if suffix and path.name.endswith(suffix) else path.name
    tmp = path.parent / f".{stem}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp{suffix}"
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the bytes reach the disk before the name points at them
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # and the rename itself is durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
