"""Shared by the benchmark scripts: medians of repeated runs after a warm-up, and writing the report."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

# shared with the end-to-end benchmark, which lives in the package (ahnet-fast bench)
from ahnet_fast.benchmark import backends_that_ran, rss_bytes, run_info  # noqa: F401


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


def saved_bytes(f: Callable[[], object], exclude=()) -> tuple[int, int]:
    """(bytes, int64 bytes) of the distinct storages autograd keeps for the backward of ``f()``
    (torch.autograd.graph.saved_tensors_hooks; a storage saved twice counts once). Tensors in
    ``exclude`` (parameters: they exist whether or not backward runs) are not counted."""
    import torch

    seen = {}
    skip = {(t.device.type, t.untyped_storage().data_ptr()) for t in exclude}

    def pack(t):
        if t.untyped_storage().nbytes() and (t.device.type, t.untyped_storage().data_ptr()) not in skip:
            seen[(t.device.type, t.untyped_storage().data_ptr())] = (t.untyped_storage().nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = f()
    del y
    total = sum(b for b, _ in seen.values())
    int64 = sum(b for b, dt in seen.values() if dt == torch.int64)
    return total, int64


def finish_report(lines: list[str], path: str | None) -> None:
    """Writes the markdown report (the lines already printed as they were measured) when asked to."""
    if path:
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")


def write_json(path: str, record: dict) -> None:
    """Writes a results record atomically (a crash leaves the previous file or none, never half of
    one) and says where."""
    import json

    from ahnet_fast._atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {path}")


def smoke() -> bool:
    """AHNET_FAST_BENCH_SMOKE=1: the pytest-benchmark files run tiny shapes (tests/test_benchmarks.py
    runs them so, with --benchmark-disable, to keep them working; the timings mean nothing then)."""
    import os

    return os.environ.get("AHNET_FAST_BENCH_SMOKE", "") == "1"


def assert_matches(ours, reference, what: str, rtol: float = 1e-4) -> None:
    """Before timing an implementation, its result against the reference (normwise, float32): a
    benchmark of a wrong answer must fail, not report a speed."""
    import torch

    pairs = list(zip(ours, reference)) if isinstance(ours, (tuple, list)) else [(ours, reference)]
    for i, (a, b) in enumerate(pairs):
        if a is None and b is None:
            continue
        err = (a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)
        if not torch.isfinite(err) or err > rtol:
            raise AssertionError(f"{what}[{i}]: relative error {float(err):.2e} > {rtol:.0e}")


def backend_summary(record: dict | None, extension: bool | None = None) -> str:
    """One line for a report: the backend that ran every op, or each op's where they differ."""
    if not record:
        return "not recorded"
    per_backend: dict[str, list[str]] = {}
    for op, counts in sorted(record.items()):
        for name in counts:
            per_backend.setdefault(name, []).append(op)
    ext = "" if extension is None else (", extension loaded" if extension else ", extension NOT loaded")
    if len(per_backend) == 1:
        return f"{next(iter(per_backend))} (every op{ext})"
    main = max(per_backend, key=lambda k: len(per_backend[k]))
    mixed = {op for op, counts in record.items() if len(counts) > 1}
    others = "; ".join(f"{k} for " + ", ".join(f"{op} (some calls)" if op in mixed else op for op in v)
                       for k, v in sorted(per_backend.items()) if k != main)
    return f"{main}, and {others}{ext}"
