"""Shared by the benchmark scripts: medians of repeated runs after a warm-up, and writing the report."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1,
                   sync: Callable[[], object] | None = None) -> float:
    """Median wall time of fn() over `repeats` runs; `sync` (e.g. torch.cuda.synchronize) is called
    before reading the clock, so asynchronous device work is inside the measurement."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rss_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status ("VmRSS", "VmHWM"), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def finish_report(lines: list[str], path: str | None) -> None:
    """Writes the markdown report (the lines already printed as they were measured) when asked to."""
    if path:
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
