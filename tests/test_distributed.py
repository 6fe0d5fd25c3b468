"""Many processes (torchrun, gloo on CPU) against one process with the same global batch.

The rule under test (TrainConfig, distributed.StepRunningStats): one process with ``--micro-batch =
batch / processes`` and that many processes compute the same optimizer step, parameters, optimizer
state and BatchNorm running statistics alike. SGD is the optimizer that shows a wrongly scaled
gradient (Adam's step barely depends on the gradient's scale), so the SGD comparison comes with its
own control: the step a sum over the ranks instead of a mean would make (SGD at twice the learning
rate) must fail the same comparison.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ahnet_fast.training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
# a tiny AH-Net on tiny synthetic volumes: every step is the real training step, in about a second
TINY = ["--stage", "finetune", "--patch", "64", "64", "32", "--psp-block-num", "0", "--train-cases", "2",
        "--val-cases", "1", "--synthetic-size", "64", "--spacing", "0", "--save-every", "1", "--no-progress",
        "--no-plots"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # what the `torchrun` script runs


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd, timeout=600):
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, f"{shlex.join(map(str, cmd))}\n{r.stderr[-3000:]}"
    return r


def _one_process(out, *extra):
    return _run([sys.executable, "-m", "ahnet_fast", "train", *TINY, "--steps", str(STEPS), "--batch", "2",
                 "--micro-batch", "1", "--out", str(out), *extra])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(out) -> dict:
    ckpt = load_checkpoint(Path(out) / "last.pt")
    state = {f"model.{k}": v for k, v in ckpt["model"].items()}
    for i, s in ckpt["optimizer"]["state"].items():
        state.update({f"optimizer.{i}.{k}": v for k, v in s.items() if torch.is_tensor(v)})
    return state


def _worst_difference(a: dict, b: dict) -> tuple[float, str]:
    """The largest difference between two runs' tensors, relative to each tensor's largest magnitude
    (at least 1, so near-zero tensors are judged absolutely); integer tensors must be equal."""
    assert a.keys() == b.keys()
    worst = (0.0, "")
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), f"{k}: {a[k]} vs {b[k]}"
            continue
        x, y = a[k].double(), b[k].double()
        d = ((x - y).abs().max() / max(x.abs().max().item(), 1.0)).item()
        worst = max(worst, (d, k))
    return worst


def _losses(out) -> list[float]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if json.loads(x)["kind"] == "train"]


def test_running_statistics_move_once_per_step_by_the_mean_update():
    """One process, a step of three micro-batches: r <- (1 - m) r + m mean_i(s_i), as many processes
    with one micro-batch each would end; the batch count counts micro-batches; an eval-mode (frozen)
    layer does not move at all."""
    from ahnet_fast.training.distributed import DistInfo, StepRunningStats

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.BatchNorm3d(4, momentum=0.3), torch.nn.BatchNorm3d(4)).double()
    model[1].eval()
    with torch.no_grad():
        model[0].running_mean.uniform_(-1, 1)
        model[0].running_var.uniform_(0.5, 2)
        model[1].running_mean.uniform_(-1, 1)
    r_mean, r_var = model[0].running_mean.clone(), model[0].running_var.clone()
    frozen = model[1].running_mean.clone()
    xs = [torch.randn(2, 4, 3, 5, 2, dtype=torch.float64) * (i + 1) + i for i in range(3)]
    stats = StepRunningStats(model, DistInfo(), micro_batches_per_rank=3)
    stats.begin_step()
    for x in xs:
        model(x)
        stats.after_micro_batch()
    stats.end_step()
    means = torch.stack([x.mean(dim=(0, 2, 3, 4)) for x in xs]).mean(0)
    variances = torch.stack([x.transpose(0, 1).reshape(4, -1).var(dim=1) for x in xs]).mean(0)  # unbiased
    torch.testing.assert_close(model[0].running_mean, 0.7 * r_mean + 0.3 * means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[0].running_var, 0.7 * r_var + 0.3 * variances, rtol=1e-12, atol=1e-12)
    assert int(model[0].num_batches_tracked) == 3 and int(model[1].num_batches_tracked) == 0
    assert torch.equal(model[1].running_mean, frozen)


def test_sgd_two_processes_equal_one_resume_under_torchrun_and_only_rank0_writes(tmp_path):
    """Two processes run 2 steps (every write audited), are stopped, and resume under torchrun to the
    end: the state equals one process's uninterrupted run, so both the two-process step and the
    resume are exact (either one wrong fails the comparison)."""
    one, two, wrong = tmp_path / "one", tmp_path / "two", tmp_path / "summed"
    sgd = ("--optimizer", "sgd", "--lr", "0.01")
    _one_process(one, *sgd)
    audit = tmp_path / "writes"
    _run([*TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "tests" / "_audit_writes.py"), str(two),
          str(audit), "train", *TINY, "--steps", "2", "--batch", "2", *sgd, "--out", str(two)])
    assert load_checkpoint(two / "last.pt")["step"] == 2

    # rank 0 alone writes the run's folder: the checkpoint lands by rename, the metrics are appended
    rank0, rank1 = (json.loads((audit / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank1 == [], f"rank 1 wrote into the run's folder: {rank1[:5]}"
    assert any(e[0] == "os.rename" and e[-1] == str(two / "last.pt") for e in rank0), rank0[:10]
    assert any(e[0] == "open" and e[1] == str(two / "metrics.jsonl") for e in rank0)

    r = _run([*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "ahnet_fast", "train", *TINY, "--batch", "2",
              *sgd, "--out", str(two), "--steps", str(STEPS), "--resume"])
    assert "resuming" in r.stderr
    assert sorted(p.name for p in two.iterdir()) == ["last.pt", "metrics.jsonl"]

    # every parameter, momentum buffer and BatchNorm statistic (running mean and variance, batch count)
    a, b = _state(one), _state(two)
    assert any(k.endswith("running_var") for k in a) and any(".momentum_buffer" in k for k in a)
    worst, where = _worst_difference(a, b)
    assert worst <= 1e-6, f"two processes (stopped and resumed) differ from one at {where}: {worst:.2e}"
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-6)

    # the control: the gradient summed over the two ranks (SGD at twice the rate) fails the comparison
    _one_process(wrong, "--optimizer", "sgd", "--lr", "0.02")
    worst, where = _worst_difference(_state(wrong), b)
    assert worst > 1e-3, f"a doubled gradient should not pass ({where}: {worst:.2e})"


def _readme_torchrun_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("torchrun ")]
    assert len(lines) == 2, lines
    return lines


def test_the_readme_torchrun_lines_run_as_written_and_train_like_one_process(tmp_path):
    """The README's two launch lines, with Adam (the default optimizer). The single-machine line runs as
    written, with only the run's length, its folder and the data made small (appended options win).
    The several-machines line runs as two torchrun agents on this machine ("nodes" of one CPU worker
    each) meeting at a rendezvous on localhost: only NODE0, JOB, OUT, the process count and the device
    are replaced, the rendezvous flags are the README's."""
    single, multi = _readme_torchrun_lines()
    small = [*TINY, "--steps", str(STEPS)]
    one = tmp_path / "one"
    _one_process(one)
    reference = _state(one)

    words = shlex.split(single)
    assert "--standalone" in words and "--batch" in words and words[words.index("--batch") + 1] == "2"
    two = tmp_path / "readme_single"
    _run([*TORCHRUN, *words[1:], *small, "--out", str(two)])
    worst, where = _worst_difference(reference, _state(two))
    assert worst <= 1e-6, f"the README's single-machine line differs from one process at {where}: {worst:.2e}"

    port = _free_port()
    line = (multi.replace("NODE0:29400", f"127.0.0.1:{port}").replace("JOB", "readme-test")
            .replace("--nproc_per_node=4", "--nproc_per_node=1").replace("--device cuda", "--device cpu"))
    assert re.search(r"--nnodes=2 .*--rdzv-backend=c10d", line), line
    nodes_out = tmp_path / "readme_multi"
    cmd = [*TORCHRUN, *shlex.split(line.replace("OUT", str(nodes_out)))[1:], *small, "--batch", "2"]
    procs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    worst, where = _worst_difference(reference, _state(nodes_out))
    assert worst <= 1e-6, f"the README's several-machines line differs from one process at {where}: {worst:.2e}"
