"""Atomic file writes, for everything ahnet_fast writes that a reader may see half-done.

The content goes to a fresh hidden name beside the target (the same file system, so the rename is
atomic), is flushed to disk, and is renamed over the target: a reader, or a run killed at any
moment, sees the previous complete file or the new complete one, never a torn one.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

# .<name>.<pid>.<12 hex>.tmp<suffix>: the temporary names _temp_path makes
_TEMP_RE = re.compile(r"^\.(?P<stem>.+)\.(?P<pid>\d+)\.[0-9a-f]{12}\.tmp(?P<suffix>.*)$")


def _temp_path(folder: Path, stem: str, suffix: str = "") -> Path:
    """A fresh hidden name in ``folder`` that names this process (remove_stale_temps reads it back)."""
    return folder / f".{stem}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp{suffix}"


class WriteError(OSError):
    """A file could not be written: one line naming the file and the reason (no space, read-only file
    system, permission, a file where a folder should be). Nothing half-written is left behind."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]" prefix
        return str(self.strerror)


def _reason(exc: BaseException, folder: Path) -> str:
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC or "unexpected pos" in str(exc) or "iostream error" in str(exc):
        # torch.save's C++ writer reports a full disk as a stream error, without errno
        try:
            free = shutil.disk_usage(folder).free
            return f"no space left on the device ({free / 2**20:.0f} MiB free in {folder})"
        except OSError:
            return "no space left on the device"
    if code == errno.EROFS:
        return "read-only file system"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if code == errno.ENOTDIR:
        return "a path component is a file, not a folder"
    if code == errno.EISDIR:
        return "it is a folder"
    return f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}"


def _as_write_error(path: Path, exc: BaseException) -> WriteError:
    return WriteError(getattr(exc, "errno", None) or errno.EIO, f"cannot write {path}: {_reason(exc, path.parent)}")


def check_writable(path: str | os.PathLike, *, overwrite: bool = False, what: str = "output") -> Path:
    """Checks before any work that ``path`` can be written: not a folder, not an existing file unless
    ``overwrite``, and its folder (or the nearest existing folder above it, where the rest will be
    created) is a folder that accepts a new file (probed by creating and removing one, which catches
    read-only file systems and permissions as they apply to this process). Returns the path; raises
    ValueError for what the user asked for (an existing file, a folder), WriteError for the file
    system's refusals."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise ValueError(f"{what} {path} exists; pass --overwrite to replace it")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise WriteError(errno.ENOTDIR, f"cannot write {path}: {folder} is a file, not a folder")
    probe = _temp_path(folder, path.name)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
    except OSError as exc:
        raise _as_write_error(path, exc) from None
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return path


def remove_stale_temps(folder: str | os.PathLike) -> list[tuple[Path, int]]:
    """Removes the temporary files that atomic_path left in ``folder`` when its process was killed
    (SIGKILL leaves no chance to clean up): those whose process id no longer runs. Returns (path,
    bytes) of each removed file."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _TEMP_RE.match(entry.name)
        if not m or not entry.is_file() or _alive(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            size = entry.stat().st_size
            entry.unlink()
            removed.append((entry, size))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path to write to (ending in ``suffix``, for writers that infer the format
    from the name); on a clean exit it replaces ``path``, on an exception it is removed. A file
    system failure (no space, read-only, permission; also torch.save's stream errors on a full disk)
    becomes a :class:`WriteError` naming ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _as_write_error(path, exc) from None
    stem = path.name[: -len(suffix)] if suffix and path.name.endswith(suffix) else path.name
    tmp = _temp_path(path.parent, stem, suffix)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the bytes reach the disk before the name points at them
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # on a read-only file system the temp never existed
            os.unlink(tmp)
        if isinstance(exc, WriteError):
            raise
        if isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and _reason(exc, path.parent).startswith("no space")):
            raise _as_write_error(path, exc) from exc
        raise
    with contextlib.suppress(OSError):  # and the rename itself is durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
