"""Runs ``ahnet_fast`` (the command line) under an audit hook that records every write into a folder:
``python tests/_audit_writes.py WATCHED LOG_DIR train ...``. Each process writes
LOG_DIR/rank<RANK>.json: the files it opened for writing, renamed, removed or created under WATCHED.
Used as torchrun's script to see which ranks write a run's output (only rank 0 may)."""
import atexit
import json
import os
import sys

watched = os.path.realpath(sys.argv[1])
log_dir = sys.argv[2]
events = []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _under(path) -> bool:
    try:
        p = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False  # a file descriptor, not a path
    return p == watched or p.startswith(watched + os.sep)


def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writes = (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & WRITE_FLAGS)
        if writes and _under(path):
            events.append([event, os.fsdecode(path)])
    elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate", "shutil.rmtree"):
        paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        if any(_under(p) for p in paths):
            events.append([event, *map(os.fsdecode, paths)])


def dump():
    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(events, f)


atexit.register(dump)
sys.addaudithook(hook)

from ahnet_fast.cli import main  # noqa: E402

sys.exit(main(sys.argv[3:]))
