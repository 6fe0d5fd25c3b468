"""The pytest-benchmark microbenchmarks (benchmarks/test_bench_*.py) stay runnable: each is run on
tiny shapes with timing off, which still runs the check of every implementation's result against
its reference that precedes the timing, and the roofline script runs end to end on tiny sizes."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _ops() -> set[str]:
    """The op modules of ahnet_fast/ops/ (one per op, by the project's layout)."""
    return {f[:-3] for f in os.listdir(os.path.join(ROOT, "ahnet_fast", "ops")) if f.endswith(".py") and f[0] != "_"}


def test_every_op_has_a_microbenchmark():
    missing = [op for op in sorted(_ops()) if not os.path.exists(os.path.join(BENCH, f"test_bench_{op}.py"))]
    assert not missing, f"ops without a pytest-benchmark file in benchmarks/: {missing}"


def test_microbenchmarks_run_and_check_their_results():
    pytest.importorskip("pytest_benchmark")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                          "-W", "ignore::pytest_benchmark.logger.PytestBenchmarkWarning", BENCH],
                         capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, AHNET_FAST_BENCH_SMOKE="1"), timeout=900)
    tail = out.stdout[-3000:] + out.stderr[-2000:]
    assert out.returncode == 0, tail
    summary = out.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary


def test_roofline_script_measures_every_op_and_the_step(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(BENCH, "roofline.py"), "--smoke", "--repeats", "1",
                          "--json", str(tmp_path / "roof.json"), "--out", str(tmp_path / "roof.md")],
                         capture_output=True, text=True, cwd=BENCH, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "roof.json").read_text())
    assert report["ceilings"]["copy_GBps"] > 0 and report["ceilings"]["matmul_fp32_GFLOPs"] > 0
    by_op = {r["op"].split()[0]: r for r in report["results"]}
    assert _ops() <= set(by_op), f"ops missing from the roofline: {_ops() - set(by_op)}"
    step = by_op["training"]
    # convolutions and the step do FLOPs (FlopCounterMode over the reference path); BN/pooling/loss
    # count none; every op moves bytes and has a finite, positive fraction of the roof. No upper
    # bound: that would be a timed assert (the smoke shapes stay in cache, and the ceilings are
    # measured on a shared machine: a loaded CI run saw bn_relu_conv at 1.64x a depressed copy roof)
    assert by_op["aniso_conv"]["flops"] > 0 and by_op["dense_block"]["flops"] > 0 and step["flops"] > 0
    assert by_op["bn_relu"]["flops"] == 0 and by_op["bn_relu"]["bound"] == "memory"
    for r in report["results"]:
        assert r["min_bytes"] > 0 and 0 < r["fraction_of_roof"] < float("inf"), r
    assert "training step" in (tmp_path / "roof.md").read_text()


def test_memory_trace_names_the_ops_at_the_peak(tmp_path):
    """benchmarks/trace_memory.py on a tiny AHNet: every op of the traced forward is in the timeline,
    the peak is one of them, and the output map's op is there (the timeline is the forward's)."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs")
    out = tmp_path / "trace.json"
    r = subprocess.run([sys.executable, os.path.join(BENCH, "trace_memory.py"), "--size", "64", "64", "32",
                        "--psp-block-num", "0", "--layers", "1", "1", "1", "1", "--top", "3", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads(out.read_text())
    assert len(record["ops"]) > 50 and record["peak_MiB"] == max(op["high"] for op in record["ops"])
    assert any(op["shapes"] and op["shapes"][0] == [1, 3, 64, 64, 32] for op in record["ops"])
    assert "peak" in r.stdout and len(r.stdout.strip().splitlines()) == 2 + 3 + 1


def test_sliding_window_benchmark_compares_like_with_like(tmp_path):
    """benchmarks/bench_sliding_window.py on a tiny AHNet and volume (windows laid out alike by both
    implementations): the two blends agree within float32, and the record carries what the README's
    block and the results rows read (times, peaks, the floor, the profile)."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs")
    pytest.importorskip("monai")
    out = tmp_path / "sw.json"
    r = subprocess.run([sys.executable, os.path.join(BENCH, "bench_sliding_window.py"), "--size", "96", "96", "40",
                        "--window", "64", "64", "32", "--repeats", "1", "--psp-block-num", "0", "--layers", "1", "1",
                        "1", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["outputs"]["equal"], record["outputs"]
    assert record["outputs"]["argmax_voxels"] == 96 * 96 * 40
    for impl in ("ahnet_fast", "MONAI"):
        summary = record["summary"][impl]
        assert summary["median_s"] > 0 and summary["peak_MiB"] > 0 and summary["window_peak_MiB"] > 0
    assert record["floor"]["output_MiB"] == 3 * 96 * 96 * 40 * 4 / 2**20
    assert record["runs"]["ahnet_fast"]["time"][0]["window_profile"]["matmul_gflop"] > 0
