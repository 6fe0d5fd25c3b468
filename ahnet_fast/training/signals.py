"""Ctrl-C and SIGTERM without tracebacks or lost work, and the error for a diverged run.

The command line runs under :func:`exit_on_signals`: SIGINT or SIGTERM raises :class:`Interrupted`
where the program is, so every ``atomic_path`` write in progress removes its temporary file, and the
command exits 130 (SIGINT) or 143 (SIGTERM) with one line instead of a traceback. The training loop
narrows that with :func:`deferred_signals`: the first signal only asks the loop to stop, which it does
after the current step, with a checkpoint of that step; a second signal interrupts at once (the
previous checkpoint is complete either way).
"""
from __future__ import annotations

import contextlib
import signal
import threading

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(BaseException):
    """SIGINT or SIGTERM. A BaseException, as KeyboardInterrupt is, so that ``except Exception``
    clean-up code does not swallow it."""

    def __init__(self, signum: int, message: str | None = None):
        self.signum = signum
        self.exit_code = EXIT_CODES.get(signum, 128 + signum)
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite; the message names the last finite checkpoint."""


def _raise(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def exit_on_signals():
    """SIGINT and SIGTERM raise :class:`Interrupted` inside the block (main thread only; elsewhere the
    handlers cannot be set and the block runs unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in EXIT_CODES}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class StopRequest:
    """Set by the first SIGINT / SIGTERM inside :func:`deferred_signals`."""

    def __init__(self):
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def deferred_signals(on_first=None):
    """Yields a :class:`StopRequest`. The first SIGINT / SIGTERM sets it (and calls ``on_first(signum)``,
    e.g. to print that the run will stop after this step); a second raises :class:`Interrupted`."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.requested:
            raise Interrupted(signum)
        stop.signum = signum
        if on_first is not None:
            on_first(signum)

    previous = {s: signal.signal(s, handler) for s in EXIT_CODES}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
