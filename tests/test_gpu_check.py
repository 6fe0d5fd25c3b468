"""benchmarks/gpu_check.sh, the blind run on a lent GPU: with --smoke it runs on this CPU, and every
section of its plan must leave a record (a result, or its error, or why it was skipped), also when
one section fails or hangs."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
ENV_FIELDS = ("gpu_name", "gpu_capability", "gpu_memory_bytes", "torch", "torch_cuda", "cudnn", "triton",
              "matmul_allow_tf32", "cudnn_allow_tf32", "cudnn_benchmark", "git_commit", "extension_loaded",
              "fallbacks")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


GPU_CHECK = _module()
SECTION_NAMES = [s[0] for s in GPU_CHECK.SECTIONS]


def _run(out, *args, timeout=420, **env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env.update(OUT=str(out), PYTHON=sys.executable, **env_extra)
    return subprocess.run(["bash", SCRIPT, "--smoke", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _load(out):
    with open(os.path.join(out, "gpu_check.json")) as f:
        return json.load(f)


def _check_record(name, rec):
    """A finished record of one of the statuses, with what that status needs."""
    assert rec.get("status") in GPU_CHECK.STATUSES, f"{name}: status {rec.get('status')!r}"
    assert isinstance(rec.get("seconds"), (int, float)), f"{name}: no seconds"
    if rec["status"] == "ok":
        assert rec.get("result"), f"{name}: ok without a result"
    elif rec["status"] == "skipped":
        assert rec.get("skipped"), f"{name}: skipped without a reason"
    else:
        assert rec.get("error", {}).get("type") and "message" in rec["error"] and "traceback" in rec["error"], \
            f"{name}: {rec['status']} without an error record"


def _failures(data):
    return {n: r.get("error") or r.get("skipped") for n, r in data["sections"].items() if r.get("status") != "ok"}


def test_smoke_run_records_every_section(tmp_path):
    proc = _run(tmp_path)
    assert os.path.exists(tmp_path / "gpu_check.log"), proc.stdout + proc.stderr
    data = _load(tmp_path)
    assert [p["name"] for p in data["plan"]] == SECTION_NAMES
    assert set(data["sections"]) == set(SECTION_NAMES), f"sections without a record: " \
                                                        f"{set(SECTION_NAMES) - set(data['sections'])}"
    for name in SECTION_NAMES:
        _check_record(name, data["sections"][name])
    # on a CPU every section has a small variant: all of them must run, none may be skipped
    assert not _failures(data), json.dumps(_failures(data), indent=1)[:4000]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    env = data["sections"]["env"]["result"]
    missing = [k for k in ENV_FIELDS if k not in env]
    assert not missing, f"environment record lacks {missing}"
    assert "monai" in env and "monai_install" in env
    # what the device tool returns: at most 8 files, none deeper than $OUT/a/b/file
    files = sorted(os.listdir(tmp_path))
    assert len(files) <= 8 and all(os.path.isfile(tmp_path / f) for f in files), files
    for name in ("gpu_check.log", "gpu_check.md", "aniso_conv.json", "roofline.json", "pytest.log"):
        assert name in files, files
    log = (tmp_path / "gpu_check.log").read_text()
    assert "plan: 10 sections" in log and "== gpu_check.sh done" in log
    md = (tmp_path / "gpu_check.md").read_text()
    assert all(f"## {name}:" in md for name in SECTION_NAMES)


def test_a_failing_and_a_hanging_section_are_recorded_and_the_rest_runs(tmp_path):
    sections = "env,focal_loss,pyramid_pool"
    proc = _run(tmp_path, "--sections", sections, AHNET_FAST_GPU_CHECK_FAIL="env,focal_loss:hang",
                AHNET_FAST_GPU_CHECK_BUDGETS="focal_loss=8")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = _load(tmp_path)
    recs = data["sections"]
    assert set(recs) == set(sections.split(","))
    for name, rec in recs.items():
        _check_record(name, rec)
    env = recs["env"]
    assert env["status"] == "error" and env["error"]["type"] == "RuntimeError"
    assert "AHNET_FAST_GPU_CHECK_FAIL" in env["error"]["message"]
    assert "_fail_hook" in env["error"]["traceback"] and "Traceback" in env["error"]["traceback"]
    hung = recs["focal_loss"]
    assert hung["status"] == "timeout" and hung["rc"] == 124, hung
    assert "SectionTimeout" in hung["error"]["traceback"]  # where it was when the timeout came
    assert recs["pyramid_pool"]["status"] == "ok" and recs["pyramid_pool"]["result"]["rows"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "RuntimeError" in md and "timeout" in md


def test_sections_past_the_overall_deadline_are_skipped_with_the_reason(tmp_path):
    proc = _run(tmp_path, "--sections", "env,train_step", "--total-s", "1", timeout=120)
    data = _load(tmp_path)
    for name in ("env", "train_step"):
        rec = data["sections"][name]
        _check_record(name, rec)
        assert rec["status"] == "skipped" and "deadline" in rec["skipped"], rec
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("var, value", [("AHNET_FAST_GPU_CHECK_BUDGETS", "nope=3"),
                                        ("AHNET_FAST_GPU_CHECK_BUDGETS", "env=soon"),
                                        ("AHNET_FAST_GPU_CHECK_FAIL", "nope"),
                                        ("AHNET_FAST_GPU_CHECK_FAIL", "env:later")])
def test_bad_overrides_stop_before_any_section(tmp_path, var, value):
    proc = _run(tmp_path, timeout=60, **{var: value})
    assert proc.returncode == 2
    assert var in proc.stdout + proc.stderr
    assert not os.path.exists(tmp_path / "gpu_check.json")


def test_gpu_budgets_fit_the_eight_minutes():
    total, rows = GPU_CHECK.plan(smoke=False)
    assert sum(b for _, b, _ in rows) <= total <= 8 * 60 - 10
