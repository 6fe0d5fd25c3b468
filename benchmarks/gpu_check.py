"""The sections of the GPU check, one per process (driven by benchmarks/gpu_check.sh).

A lent GPU machine may come once, for minutes, and the run is blind: so every section runs in its
own process under the shell's `timeout` (a hang, a crash or a CUDA error that poisons the context
costs that section only), and each writes its result, or its traceback, with the seconds it took,
into $OUT/gpu_check.json (atomically) before the next one starts. Rows are saved as they are
measured, so a section cut short by its budget still leaves what it measured.

Sections, in order (SECTIONS holds them with their time budgets):
  env           the environment: GPU, versions, TF32/cuDNN flags, git commit, extension, MONAI.
  train_step    a training step (forward, loss, backward, SGD), bf16 autocast and fp32, ahnet_fast
                vs MONAI in the same process: time (CUDA events, median) and peak memory.
  planner       ahnet_fast.memory.estimate_training_memory against torch.cuda.max_memory_allocated
                (AHNet + Adam, two steps; fp32/bf16, checkpoint policies).
  slab          the 512x512x64 bf16 training step with checkpoint="auto" (then "all" if it runs out
                of memory): the policy chosen, time, peak, and the planner's estimate for it.
  correctness   AHNet fp32 on the device against float64 on the CPU: output, input gradient,
                parameter gradients, in train and eval mode.
  aniso_conv    benchmarks/bench_aniso_conv.py: every AH-Net convolution shape, Triton vs cuDNN.
  focal_loss    focal loss forward+backward: Triton vs reference (and MONAI), error against
                float64, time, extra peak memory, fraction of the measured copy bandwidth.
  pyramid_pool  pyramid volumetric pooling (alone and with AH-Net's concatenation), the same.
  roofline      benchmarks/roofline.py: every op and the step against the measured ceilings.
  pytest        the Triton kernels' test files on this device, --maxfail=10, log in pytest.log.

Commands (the shell script calls them; by hand they help to rerun one section):
  gpu_check.py plan [--smoke] [--sections a,b] [--total-s N]  the plan, one "name budget" a line
  gpu_check.py begin --out DIR ...                             a fresh gpu_check.json with the plan
  gpu_check.py run SECTION --out DIR --budget S [--smoke]      one section, in this process
  gpu_check.py finalize SECTION --out DIR --rc RC --wall-s S   after the shell: timeouts, crashes
  gpu_check.py summary --out DIR                               the table of sections; gpu_check.md

Test hooks (tests/test_gpu_check.py): AHNET_FAST_GPU_CHECK_FAIL="section[:hang],..." makes those
sections raise (or hang until their timeout) inside their try block;
AHNET_FAST_GPU_CHECK_BUDGETS="section=seconds,..." overrides budgets.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import faulthandler
import gc
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

_T0 = time.monotonic()  # the shell's timeout counts from the process start, imports included

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
JSON_NAME = "gpu_check.json"
MD_NAME = "gpu_check.md"
FAIL_VAR = "AHNET_FAST_GPU_CHECK_FAIL"
BUDGETS_VAR = "AHNET_FAST_GPU_CHECK_BUDGETS"
SCRATCH_VAR = "AHNET_FAST_GPU_CHECK_SCRATCH"
MONAI_VAR = "AHNET_FAST_GPU_CHECK_MONAI"
COMMIT_VAR = "AHNET_FAST_GIT_COMMIT"

# (name, budget in seconds on the GPU, budget with --smoke on a CPU, what it measures). The GPU
# budgets add up to 450 s so that the whole run, Triton's JIT compilation and the process starts
# included, ends inside TOTAL_S, under the 8 minutes the run is given. env's budget covers the first
# import of torch and CUDA's start on a fresh machine.
SECTIONS = (
    ("env", 25, 30, "environment record"),
    ("train_step", 90, 60, "training step, ahnet_fast vs MONAI, bf16 autocast and fp32"),
    ("planner", 45, 40, "memory planner estimate vs torch.cuda.max_memory_allocated"),
    ("slab", 45, 40, "512x512x64 bf16 training step, checkpoint policy that fits"),
    ("correctness", 40, 60, "AHNet fp32 on the device vs float64 on the CPU"),
    ("aniso_conv", 50, 40, "per-shape anisotropic convolutions, Triton vs cuDNN (bench_aniso_conv.py)"),
    ("focal_loss", 25, 30, "focal loss: error, time, bandwidth"),
    ("pyramid_pool", 25, 30, "pyramid pooling: error, time, bandwidth"),
    ("roofline", 35, 40, "roofline of every op and the step (roofline.py)"),
    ("pytest", 70, 60, "Triton test files, --maxfail=10"),
)
TOTAL_S = 470
# The last section may also use the time the others left before the overall deadline: more tests
# run, and nothing after it waits.
TAKES_THE_REST = ("pytest",)
# --smoke: caps, not estimates: on a small CPU that others share, a step of the smoke model takes
# from 1 s to 10 s or more, with how loaded the machine is
SMOKE_TOTAL_S = 300

# The pytest section: every tests/test_*triton*.py (their module names match -k triton; the
# convolutions' first, as they matter most), then the Triton tests inside these files.
PYTEST_FIRST = "tests/test_aniso_conv_triton.py"
PYTEST_ALSO = ("tests/test_bn_relu_conv.py", "tests/test_dense_block.py")
PYTEST_SELECT = "triton and not compile_check"  # compile_check needs no GPU: CI runs it
# --smoke on a CPU: tests/conftest.py runs Triton in its interpreter there, so only the quick checks
# of bad arguments
PYTEST_SMOKE_FILES = ("tests/test_aniso_conv_triton.py", "tests/test_focal_loss_triton.py")
PYTEST_SMOKE_SELECT = "bad"

STATUSES = ("ok", "error", "skipped", "timeout", "crashed")


# ----------------------------------------------------------------------------------------------
# the JSON record


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_atomic(path: str, text: str) -> None:
    """Writes text to path through a temporary file and a rename: a kill mid-write leaves the old file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # SIGTERM mid-write included: no stray file in $OUT (8 files come back)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def load(out: str) -> dict:
    path = os.path.join(out, JSON_NAME)
    if not os.path.exists(path):
        return {"sections": {}}
    with open(path) as f:
        return json.load(f)


def save(out: str, data: dict) -> None:
    write_atomic(os.path.join(out, JSON_NAME), json.dumps(data, indent=1, default=str) + "\n")


def update_section(out: str, name: str, record: dict) -> None:
    data = load(out)
    data.setdefault("sections", {})[name] = record
    save(out, data)


def error_record(exc: BaseException) -> dict:
    return {"type": type(exc).__name__, "message": str(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}


def _parse_pairs(text: str, var: str) -> dict[str, str]:
    """'a=1,b:hang,c' -> {'a': '1', 'b': 'hang', 'c': ''}; names checked against SECTIONS."""
    names = [s[0] for s in SECTIONS]
    pairs = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = item.replace("=", ":", 1).partition(":")
        if name not in names:
            raise ValueError(f"{var}: unknown section {name!r}; sections are {', '.join(names)}")
        pairs[name] = value
    return pairs


def plan(smoke: bool, sections: str | None = None,
         total_s: int | None = None) -> tuple[int, list[tuple[str, int, str]]]:
    """(overall deadline in seconds, [(name, budget seconds, title)]) after the overrides."""
    budgets = _parse_pairs(os.environ.get(BUDGETS_VAR, ""), BUDGETS_VAR)
    for name, mode in _parse_pairs(os.environ.get(FAIL_VAR, ""), FAIL_VAR).items():
        if mode not in ("", "hang"):
            raise ValueError(f"{FAIL_VAR}: {name!r} takes no mode or ':hang', got {mode!r}")
    chosen = _parse_pairs(sections, "--sections") if sections else None
    rows = []
    for name, gpu_s, smoke_s, title in SECTIONS:
        if chosen is not None and name not in chosen:
            continue
        budget = smoke_s if smoke else gpu_s
        if name in budgets:
            try:
                budget = int(budgets[name])
            except ValueError:
                raise ValueError(f"{BUDGETS_VAR}: budget of {name!r} must be whole seconds, got {budgets[name]!r}") \
                    from None
            if budget <= 0:
                raise ValueError(f"{BUDGETS_VAR}: budget of {name!r} must be positive, got {budget}")
        rows.append((name, budget, title))
    total = total_s if total_s is not None else (SMOKE_TOTAL_S if smoke else TOTAL_S)
    if total <= 0:
        raise ValueError(f"--total-s must be positive, got {total}")
    return total, rows


def _fallbacks():
    """ahnet_fast.fallback_report() (which ops left Triton at run time, and why), when this version has it."""
    mod = sys.modules.get("ahnet_fast")
    if mod is None:
        return {"unavailable": "ahnet_fast was not imported"}
    report = getattr(mod, "fallback_report", None)
    if report is None:
        return {"unavailable": "this ahnet_fast has no fallback_report()"}
    try:
        return list(report())
    except Exception as exc:  # the record must survive a broken report
        return {"unavailable": f"fallback_report() raised {type(exc).__name__}: {exc}"}


class SectionTimeout(BaseException):
    """SIGTERM from the shell's timeout. A BaseException, so that the per-row guards do not swallow it."""


class Section:
    """One section's record: rows saved to the JSON as they come, the budget, the device."""

    def __init__(self, name: str, out: str, budget: float, smoke: bool):
        self.name, self.out, self.budget, self.smoke = name, out, budget, smoke
        self.title = dict((s[0], s[3]) for s in SECTIONS)[name]
        self.result: dict = {}
        self.row_errors = 0
        self.device = None
        self.record = {"title": self.title, "status": "running", "started": _now(), "budget_s": budget,
                       "result": self.result}

    def left(self) -> float:
        """Seconds before the shell's timeout (counted from this process's start), less a margin to save."""
        return self.budget - (time.monotonic() - _T0) - 3

    def has_time(self, seconds: float) -> bool:
        return self.left() >= seconds

    def save(self) -> None:
        self.record["seconds"] = round(time.monotonic() - _T0, 2)
        update_section(self.out, self.name, self.record)

    @property
    def rows(self) -> list:
        return self.result.setdefault("rows", [])

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(self.name, json.dumps(row, default=str), flush=True)
        self.save()

    def skip_row(self, meta: dict, seconds: float) -> bool:
        """Adds a skipped row and returns True when fewer than `seconds` are left in the budget."""
        if self.has_time(seconds):
            return False
        self.add({**meta, "skipped": f"section budget nearly spent ({self.left():.0f} s left, ~{seconds} s needed)"})
        return True

    @contextlib.contextmanager
    def row(self, meta: dict):
        """A row whose failure is recorded (with its traceback) instead of ending the section; out of
        memory is a result, not an error. The row is saved either way."""
        row = dict(meta)
        try:
            yield row
        except Exception as exc:
            import torch

            if isinstance(exc, torch.cuda.OutOfMemoryError):
                row["oom"] = str(exc).split("\n")[0]
            else:
                self.row_errors += 1
                row["error"] = error_record(exc)
                traceback.print_exc()
        finally:
            gc.collect()
            if self.device is not None and self.device.type == "cuda":
                import torch

                torch.cuda.empty_cache()
        self.add(row)


def _fail_hook(name: str, budget: float) -> None:
    hooks = _parse_pairs(os.environ.get(FAIL_VAR, ""), FAIL_VAR)
    if name not in hooks:
        return
    if hooks[name] == "hang":
        time.sleep(10 * budget + 60)  # until the shell's timeout
    raise RuntimeError(f"failure injected into section {name!r} by {FAIL_VAR}={os.environ[FAIL_VAR]!r}")


def run_section(name: str, out: str, budget: float, smoke: bool) -> int:
    sec = Section(name, out, budget, smoke)
    sec.save()  # "running": if this process dies, finalize knows which section it was in

    def on_term(signum, frame):
        raise SectionTimeout(f"stopped by the shell's timeout after {budget:.0f} s")

    signal.signal(signal.SIGTERM, on_term)
    # a hang in C code never returns to the SIGTERM handler: the stacks go to the log before the kill
    faulthandler.enable()
    faulthandler.dump_traceback_later(max(budget - 1, 1), exit=False)
    rc = 0
    try:
        import torch

        sec.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        sec.record["device"] = str(sec.device)
        if name != "env":  # env records the defaults; the baselines run with cuDNN's autotuner
            torch.backends.cudnn.benchmark = True
        _fail_hook(name, budget)
        SECTION_FUNCTIONS[name](sec)
        if sec.row_errors:
            first = next(r["error"] for r in sec.rows if "error" in r)
            sec.record["status"] = "error"
            sec.record["error"] = {"type": "RowErrors",
                                   "message": f"{sec.row_errors} of {len(sec.rows)} rows failed; first: "
                                              f"{first['type']}: {first['message']}",
                                   "traceback": first["traceback"]}
        elif sec.record["status"] == "running":
            sec.record["status"] = "ok"
    except SectionTimeout as exc:
        sec.record.update(status="timeout", error=error_record(exc))
        rc = 124
    except Exception as exc:
        traceback.print_exc()
        sec.record.update(status="error", error=error_record(exc))
        rc = 1
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sec.record["fallbacks"] = _fallbacks()
        sec.save()
    print(f"[{name}] {sec.record['status']} in {sec.record['seconds']:.1f} s", flush=True)
    return rc


def finalize(name: str, out: str, rc: int, wall_s: float, budget: float, skipped: str | None) -> None:
    """After the section's process: its exit status and wall time; a timeout or a crash that left the
    record "running" (or none) is recorded as such."""
    data = load(out)
    sections = data.setdefault("sections", {})
    rec = sections.get(name) or {"title": dict((s[0], s[3]) for s in SECTIONS)[name], "result": {}}
    rec["budget_s"] = budget
    if skipped is not None:
        rec.update(status="skipped", skipped=skipped, seconds=0.0)
    else:
        rec["rc"] = rc
        rec["wall_s"] = round(wall_s, 2)
        if rc in (124, 137) and rec.get("status") in ("ok", "error"):
            # finished and saved, then killed on the way out (a slow exit): the record is complete
            rec["note"] = f"the process was still exiting at the {budget:.0f} s timeout (exit status {rc})"
        elif rc in (124, 137) and rec.get("status") != "timeout":
            prior = rec.get("error")
            rec["status"] = "timeout"
            rec["error"] = {"type": "Timeout",
                            "message": f"killed by the shell's timeout after {budget:.0f} s (exit status {rc}); "
                                       "the stacks at the deadline are in gpu_check.log",
                            "traceback": prior["traceback"] if prior else ""}
        elif rec.get("status") in (None, "running"):
            why = f"signal {rc - 128}" if rc > 128 else f"exit status {rc}"
            rec["status"] = "crashed"
            rec["error"] = {"type": "Crashed", "message": f"the section's process ended ({why}) without recording a "
                                                          "result; its output is in gpu_check.log", "traceback": ""}
        rec.setdefault("seconds", round(wall_s, 2))
    sections[name] = rec
    save(out, data)
    write_markdown(out, data)
    note = rec.get("skipped") or (rec.get("error") or {}).get("message", "")
    print(f"== [{name}] {rec['status']}: {rec.get('seconds', 0):.1f} s in the section, {wall_s:.1f} s wall, "
          f"budget {budget:.0f} s{'; ' + note.splitlines()[0] if note else ''}", flush=True)


def summary(out: str) -> int:
    data = load(out)
    sections = data.get("sections", {})
    data["finished"] = _now()
    fallbacks, reported = [], False
    for name, rec in sections.items():
        if isinstance(rec.get("fallbacks"), list):
            reported = True
            fallbacks += [{"section": name, **(f if isinstance(f, dict) else {"report": f})} for f in rec["fallbacks"]]
    # every section's report, or why there is none (an ahnet_fast without fallback_report())
    data["fallbacks"] = fallbacks if reported else next(
        (rec["fallbacks"] for rec in sections.values() if rec.get("fallbacks")), {"unavailable": "no section ran"})
    save(out, data)
    write_markdown(out, data)
    print("\nsection        status    seconds  budget")
    bad = 0
    for entry in data.get("plan", []):
        rec = sections.get(entry["name"], {})
        status = rec.get("status", "missing")
        bad += status not in ("ok", "skipped")
        print(f"{entry['name']:<14} {status:<9} {rec.get('seconds', 0):>7.1f} {entry['budget_s']:>7}")
    print(f"Triton fallbacks: {json.dumps(data['fallbacks'], default=str)}")
    print(f"results: {os.path.join(out, JSON_NAME)}, {os.path.join(out, MD_NAME)}")
    return 1 if bad else 0


# ----------------------------------------------------------------------------------------------
# measuring


def timed_ms(fn, device, warmup: int = 2, repeats: int = 5) -> tuple[float, list[float]]:
    """(median ms, every sample) of fn() after `warmup` calls: CUDA events around each call on the
    GPU, perf_counter on the CPU."""
    import torch

    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        samples = [start.elapsed_time(end) for start, end in events]
    else:
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(samples), [round(s, 4) for s in samples]


def reset_peak(device) -> int:
    """Empties the allocator's cache and resets the peak; the bytes allocated now (0 off CUDA)."""
    import torch

    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_bytes(device):
    import torch

    return torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def rel(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def copy_gbps(device, smoke: bool) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (GB/s): the memory roof."""
    import torch

    n = (1 << 20) if smoke else (1 << 28)  # 1 GiB of fp32 on the GPU
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms, _ = timed_ms(lambda: dst.copy_(src), device, warmup=2, repeats=7)
    return 2 * src.numel() * 4 / ms / 1e6


def monai_attr(module: str, attr: str):
    """(MONAI's class, None) or (None, why it is missing)."""
    try:
        import importlib

        return getattr(importlib.import_module(module), attr), None
    except Exception as exc:
        return None, f"MONAI not importable ({type(exc).__name__}: {exc}); {os.environ.get(MONAI_VAR, '')}".rstrip("; ")


# --smoke: one block per layer and one pyramid level, every code path of the model at a CPU-sized cost;
# batch 2, so that training-mode BatchNorm has two values per channel where the maps are 1x1x1
SMOKE_SHAPE = (2, 1, 32, 32, 32)


def smoke_ahnet_kwargs() -> dict:
    return dict(layers=(1, 1, 1, 1), psp_block_num=1)


# bf16 autocast on a CPU: the 3D convolutions and batched matmuls take seconds a step in bf16 on a
# small CPU, and measure nothing about the GPU
CPU_BF16 = "bf16 on a CPU: seconds a step, and nothing the GPU run needs; the GPU run has this row"


def steps(smoke: bool, warmup: int, repeats: int) -> dict:
    """timed_ms's counts: one step with --smoke (a CPU step takes seconds there), else these."""
    return dict(warmup=0, repeats=1) if smoke else dict(warmup=warmup, repeats=repeats)


# ----------------------------------------------------------------------------------------------
# the sections


def sec_env(sec: Section) -> None:
    import torch

    env = sec.result
    env.update(python=sys.version.split()[0], executable=sys.executable, platform=platform.platform(),
               cpu_count=os.cpu_count(), torch=torch.__version__, torch_cuda=torch.version.cuda,
               cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_name=props.name, gpu_capability=f"{props.major}.{props.minor}",
                   gpu_memory_bytes=props.total_memory, gpu_multiprocessors=props.multi_processor_count,
                   gpu_count=torch.cuda.device_count())
    else:
        env.update(gpu_name=None, gpu_capability=None, gpu_memory_bytes=None, gpu_note="no CUDA device")
    env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    for key, get in (("matmul_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32),
                     ("cudnn_allow_tf32", lambda: torch.backends.cudnn.allow_tf32),
                     ("cudnn_benchmark", lambda: torch.backends.cudnn.benchmark),
                     ("float32_matmul_precision", torch.get_float32_matmul_precision)):
        try:
            env[key] = get()
        except Exception as exc:  # the newer fp32_precision API refuses the old flags when mixed
            env[key] = f"unreadable: {type(exc).__name__}: {exc}"
    env["cudnn_benchmark_in_sections"] = True
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:
        env["triton"] = None
        env["triton_error"] = f"{type(exc).__name__}: {exc}"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            env["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=10)
            env["git_dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
        else:
            env["git_commit"] = None
            env["git_error"] = (commit.stderr.strip() or f"git exited with {commit.returncode}")[:500]
    except Exception as exc:  # no git on the machine, or no .git in the copy
        env["git_commit"] = None
        env["git_error"] = f"{type(exc).__name__}: {exc}"
    if env["git_commit"] is None and os.environ.get(COMMIT_VAR):
        # the device tool copies the working tree without .git: the caller passes the commit along
        env["git_commit"] = os.environ[COMMIT_VAR]
        env["git_commit_from"] = COMMIT_VAR
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
        env["nvidia_smi"] = (smi.stdout or smi.stderr).strip()
    except Exception as exc:
        env["nvidia_smi"] = f"unavailable: {type(exc).__name__}: {exc}"
    for mod in ("numpy", "pytest"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:
            env[mod] = f"unavailable: {type(exc).__name__}: {exc}"
    try:
        import monai

        env["monai"] = monai.__version__
        env["monai_path"] = os.path.dirname(monai.__file__)
    except Exception as exc:
        env["monai"] = None
        env["monai_error"] = f"{type(exc).__name__}: {exc}"
    env["monai_install"] = os.environ.get(MONAI_VAR, "not set: run through benchmarks/gpu_check.sh")
    env["environment_variables"] = {k: v for k, v in os.environ.items()
                                    if k.startswith(("AHNET_FAST", "TRITON", "CUDA", "TORCH", "PYTHONPATH"))}
    sec.save()
    # last, so that a broken package still leaves the rest of the record
    import ahnet_fast
    from ahnet_fast._extension import extension_error

    env.update(ahnet_fast=ahnet_fast.__version__, ahnet_fast_path=os.path.dirname(ahnet_fast.__file__),
               extension_loaded=ahnet_fast.extension_available(), extension_error=extension_error(),
               fallbacks=_fallbacks())
    print(json.dumps(env, indent=1, default=str), flush=True)


def sec_train_step(sec: Section) -> None:
    import torch
    import torch.nn.functional as F

    import ahnet_fast

    device, smoke = sec.device, sec.smoke
    MonaiAHNet, why = monai_attr("monai.networks.nets", "AHNet")
    sizes = [SMOKE_SHAPE] if smoke else [(1, 1, 128, 128, 32), (1, 1, 256, 256, 64)]
    kwargs = dict(out_channels=3, **(smoke_ahnet_kwargs() if smoke else dict(psp_block_num=4)))
    need = 3 if smoke else 12

    def one(cls, shape, amp):
        torch.manual_seed(0)
        net = cls(**kwargs).to(device)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)
        x = torch.randn(shape, device=device)
        target = torch.randint(0, 3, (shape[0], *shape[2:]), device=device)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                loss = F.cross_entropy(net(x).float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        reset_peak(device)
        ms, samples = timed_ms(step, device, **steps(smoke, 2, 5))
        return {"ms": ms, "ms_samples": samples, "peak_bytes": peak_bytes(device)}

    for amp in ("bf16", "fp32"):  # bf16 at both sizes first: the numbers the GPU run is for
        for shape in sizes:
            for name, cls in (("ahnet_fast", ahnet_fast.AHNet), ("MONAI", MonaiAHNet)):
                meta = {"shape": list(shape), "amp": amp, "net": name}
                if cls is None or (amp == "bf16" and device.type == "cpu"):
                    sec.add({**meta, "skipped": why or CPU_BF16})
                    continue
                if sec.skip_row(meta, need * (1 if shape[2] <= 128 else 3)):
                    continue
                with sec.row(meta) as row:
                    row.update(one(cls, shape, amp))
    ratios = []
    for amp in ("bf16", "fp32"):
        for shape in sizes:
            ours, theirs = ({r["net"]: r for r in sec.rows if r["shape"] == list(shape) and r["amp"] == amp}.get(n)
                            for n in ("ahnet_fast", "MONAI"))
            if ours and theirs and ours.get("ms") and theirs.get("ms"):
                peak = (theirs["peak_bytes"] / ours["peak_bytes"]) if ours.get("peak_bytes") else None
                ratios.append({"shape": list(shape), "amp": amp, "speedup_vs_monai": theirs["ms"] / ours["ms"],
                               "monai_peak_over_ours": peak})
    sec.result["vs_monai"] = ratios
    print("train_step vs MONAI", json.dumps(ratios), flush=True)


def sec_planner(sec: Section) -> None:
    import torch
    import torch.nn.functional as F

    import ahnet_fast
    from ahnet_fast.memory import estimate_training_memory

    device, smoke = sec.device, sec.smoke
    configs = [(SMOKE_SHAPE, "all", "fp32")] if smoke else [
        ((1, 1, 128, 128, 32), "none", "fp32"), ((1, 1, 128, 128, 32), "all", "fp32"),
        ((1, 1, 128, 128, 32), "none", "bf16"), ((1, 1, 256, 256, 64), "none", "bf16"),
        ((1, 1, 256, 256, 64), "all", "bf16"), ((2, 1, 256, 256, 64), "none", "bf16")]
    base_kwargs = dict(in_channels=1, out_channels=3, **(smoke_ahnet_kwargs() if smoke else dict(psp_block_num=4)))
    if device.type != "cuda":
        sec.result["measured_note"] = "no CUDA device: torch.cuda.max_memory_allocated needs one (the step still runs)"

    def one(shape, policy, precision):
        kwargs = dict(base_kwargs, checkpoint=policy)
        with torch.device("meta"):
            est = estimate_training_memory(ahnet_fast.AHNet(**kwargs), shape, dtype=precision)
        row = {"estimate": est.as_dict()}
        base = reset_peak(device)
        net = ahnet_fast.AHNet(**kwargs).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        x = torch.randn(shape, device=device)
        target = torch.randint(0, 3, (shape[0], *shape[2:]), device=device)

        def step():
            opt.zero_grad()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = net(x)
            F.cross_entropy(out.float(), target).backward()
            opt.step()

        # two steps on the GPU: Adam's state exists in the second
        row["ms"], _ = timed_ms(step, device, **steps(smoke, 1, 1))
        if device.type == "cuda":
            measured = torch.cuda.max_memory_allocated() - base
            row.update(measured_bytes=measured, estimate_over_measured=est.total / measured)
        return row

    for shape, policy, precision in configs:
        meta = {"shape": list(shape), "checkpoint": policy, "precision": precision}
        if sec.skip_row(meta, 3 if smoke else (5 if shape[2] <= 128 else 10)):
            continue
        with sec.row(meta) as row:
            row.update(one(shape, policy, precision))


def sec_slab(sec: Section) -> None:
    import torch
    import torch.nn.functional as F

    import ahnet_fast
    from ahnet_fast.memory import estimate_training_memory

    device, smoke = sec.device, sec.smoke
    shape = SMOKE_SHAPE if smoke else (1, 1, 512, 512, 64)
    # the slab is a bf16 step; on a CPU (--smoke) fp32, see CPU_BF16
    precision = "bf16" if device.type == "cuda" else "fp32"
    sec.result["precision"] = precision
    kwargs = dict(in_channels=1, out_channels=3, **(smoke_ahnet_kwargs() if smoke else dict(psp_block_num=4)))

    def estimate(policy):
        with torch.device("meta"):
            return estimate_training_memory(ahnet_fast.AHNet(**kwargs), shape, dtype=precision, checkpoint=policy)

    budget = None
    if device.type != "cuda":
        # The CPU has memory for any policy: a budget just under the estimate without checkpointing makes
        # "auto" choose one, so that a checkpointed step runs here as it will on the GPU.
        budget = estimate("none").total - 1
        sec.result["memory_budget_note"] = "CPU: memory_budget just under the estimate without checkpointing"
        sec.save()

    def one(policy):
        base = reset_peak(device)
        free = torch.cuda.mem_get_info()[0] if device.type == "cuda" else None
        torch.manual_seed(0)
        net = ahnet_fast.AHNet(**kwargs, checkpoint=policy, memory_budget=budget).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        x = torch.randn(shape, device=device)
        target = torch.randint(0, 3, (shape[0], *shape[2:]), device=device)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = net(x)
            F.cross_entropy(out.float(), target).backward()
            opt.step()

        ms, samples = timed_ms(step, device, **steps(smoke, 1, 3))
        if net.auto_choices:  # checkpoint="auto": the policy it chose, and the estimates it compared
            choice = next(iter(net.auto_choices.values()))
            chosen, est = choice["policy"], choice["estimates"][choice["policy"]]
            tried = {"budget_bytes": choice["budget"], "estimates_bytes": choice["estimates"]}
        else:
            chosen, est, tried = policy, estimate(policy).total, None
        row = {"policy_chosen": chosen, "ms": ms, "ms_samples": samples, "free_bytes_before": free,
               "estimate_bytes": est, "auto": tried}
        if device.type == "cuda":
            measured = torch.cuda.max_memory_allocated() - base
            row.update(peak_bytes=measured, estimate_over_measured=est / measured)
        return row

    for policy in ("auto", "all"):
        meta = {"shape": list(shape), "precision": precision, "checkpoint": policy}
        if sec.skip_row(meta, 3 if smoke else 15):
            break
        with sec.row(meta) as row:
            row.update(one(policy))
        if "oom" not in row:
            break  # "all" only when "auto" ran out of memory


def sec_correctness(sec: Section) -> None:
    import torch

    import ahnet_fast

    device, smoke = sec.device, sec.smoke
    shape = SMOKE_SHAPE if smoke else (1, 1, 128, 128, 32)
    kwargs = dict(out_channels=3, **(smoke_ahnet_kwargs() if smoke else dict(psp_block_num=4)))
    sec.result["reference"] = "the same network in float64 on the CPU"

    def one(train):
        torch.manual_seed(0)
        ref = ahnet_fast.AHNet(**kwargs).double().train(train)
        net = copy.deepcopy(ref).float().to(device).train(train)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(shape, dtype=torch.float64, generator=g)
        grad = torch.randn((shape[0], 3, *shape[2:]), dtype=torch.float64, generator=g)
        xr = x.clone().requires_grad_()
        yr = ref(xr)
        yr.backward(grad)
        xd = x.float().to(device).requires_grad_()
        yd = net(xd)
        yd.backward(grad.float().to(device))
        grads = torch.cat([p.grad.flatten().double().cpu() for p in net.parameters() if p.grad is not None])
        grads_ref = torch.cat([p.grad.flatten() for p in ref.parameters() if p.grad is not None])
        # per tensor, against at least 1e-4 of the whole gradient's norm: a bias followed by BatchNorm has a
        # gradient that is zero up to rounding, and its relative error would mean nothing
        floor = 1e-4 * grads_ref.norm().item()
        per_param = {n: (p.grad.double().cpu() - q.grad).norm().item() / max(q.grad.norm().item(), floor)
                     for (n, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()) if q.grad is not None}
        worst = max(per_param.items(), key=lambda kv: kv[1]) if per_param else (None, None)
        return {"out_rel": rel(yd, yr), "xgrad_rel": rel(xd.grad, xr.grad), "param_grad_rel": rel(grads, grads_ref),
                "param_grad_worst": {"name": worst[0], "rel": worst[1]}}

    for train in (True, False):
        meta = {"shape": list(shape), "mode": "train" if train else "eval", "dtype": "float32"}
        if sec.skip_row(meta, 3 if smoke else 10):
            continue
        with sec.row(meta) as row:
            row.update(one(train))


def _scratch() -> str:
    path = os.environ.get(SCRATCH_VAR) or os.path.join(tempfile.gettempdir(), "ahnet_fast_gpu_check")
    os.makedirs(path, exist_ok=True)
    return path


def _run_script(sec: Section, script: str, argv: list[str]) -> None:
    """Runs a benchmark script in this process (its __main__, with these arguments), so that this section's
    fallback report covers it."""
    import runpy

    saved = sys.argv
    sys.argv = [script] + argv
    sec.result["command"] = " ".join(["python", os.path.join("benchmarks", script)] + argv)
    sec.save()
    try:
        runpy.run_path(os.path.join(HERE, script), run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"{script} exited with status {exc.code}") from exc
    finally:
        sys.argv = saved


def sec_aniso_conv(sec: Section) -> None:
    out_json = os.path.join(sec.out, "aniso_conv.json")
    md = os.path.join(_scratch(), "aniso_conv.md")
    sec.result.update(json="aniso_conv.json", markdown_file=md)
    args = ["--repeats", "1", "--max-shapes", "2"] if sec.smoke else ["--large", "--repeats", "3"]
    try:
        _run_script(sec, "bench_aniso_conv.py", args + ["--out", md, "--json", out_json])
    finally:  # the script writes its JSON after every shape: a timeout still leaves those rows
        _summarize_aniso_conv(sec, out_json)


def _summarize_aniso_conv(sec: Section, out_json: str) -> None:
    if not os.path.exists(out_json):
        return
    with open(out_json) as f:
        data = json.load(f)
    rows = []
    for s in data["shapes"]:
        ms = s["ms"]
        best = min(ms, key=lambda p: sum(ms[p]))
        row = {"input": s["input"], "x": s["x"], "weight": s["weight"], "stride": s["stride"], "best": best,
               "aten_ms": sum(ms["aten"])}
        if "triton" in ms:
            row.update(triton_ms=sum(ms["triton"]), triton_speedup_vs_aten=sum(ms["aten"]) / sum(ms["triton"]))
        rows.append(row)
    sec.result.update(shapes=len(rows), rows=rows, matmul_peak_gflops=data.get("matmul_peak_gflops"))
    sec.save()


def sec_focal_loss(sec: Section) -> None:
    import torch

    from ahnet_fast.ops import focal_loss

    device, smoke = sec.device, sec.smoke
    MonaiFocalLoss, why = monai_attr("monai.losses", "FocalLoss")
    sec.result["copy_GBps"] = bw = copy_gbps(device, smoke)
    sec.save()
    cases = [((2, 3, 16, 16, 8), True)] if smoke else [((2, 3, 192, 192, 64), True), ((2, 3, 192, 192, 64), False),
                                                        ((1, 8, 128, 128, 64), True)]
    impls = (["triton", "reference"] if device.type == "cuda" else ["reference"]) + ["MONAI"]
    for shape, softmax in cases:
        for dtype in (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,):
            g = torch.Generator().manual_seed(0)
            x = (torch.randn(shape, generator=g) * 2).to(dtype).to(device)
            labels = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g).to(device)
            xd = x.detach().double().requires_grad_()
            focal_loss(xd, labels, use_softmax=softmax, backend="reference").backward()
            for impl in impls:
                meta = {"shape": list(shape), "softmax": softmax, "dtype": str(dtype), "impl": impl}
                if impl == "MONAI" and MonaiFocalLoss is None:
                    sec.add({**meta, "skipped": why})
                    continue
                if impl == "MONAI" and dtype != torch.float32:
                    continue
                if sec.skip_row(meta, 2 if smoke else 4):
                    continue
                with sec.row(meta) as row:
                    if impl == "MONAI":
                        m = MonaiFocalLoss(use_softmax=softmax, to_onehot_y=True)
                        fn = lambda a: m(a, labels.unsqueeze(1))  # noqa: E731
                    else:
                        fn = lambda a, impl=impl: focal_loss(a, labels, use_softmax=softmax, backend=impl)  # noqa: E731
                    xi = x.detach().clone().requires_grad_()

                    def step():
                        xi.grad = None
                        fn(xi).backward()

                    step()
                    err = rel(xi.grad, xd.grad)
                    base = reset_peak(device)
                    ms, samples = timed_ms(step, device, **steps(smoke, 2, 20))
                    peak = peak_bytes(device)
                    min_bytes = 2 * x.numel() * x.element_size() + labels.numel() * labels.element_size()
                    gbps = min_bytes / ms / 1e6
                    row.update(ms=ms, grad_rel_err=err, extra_peak_bytes=None if peak is None else peak - base,
                               GBps=gbps, fraction_of_copy=gbps / bw)


def sec_pyramid_pool(sec: Section) -> None:
    import torch

    import ahnet_fast

    device, smoke = sec.device, sec.smoke
    MonaiPSP, why = monai_attr("monai.networks.nets.ahnet", "PSP")
    sec.result["copy_GBps"] = bw = copy_gbps(device, smoke)
    sec.save()
    shape = (1, 6, 64, 64, 4) if smoke else (1, 124, 128, 128, 32)
    torch.manual_seed(0)
    module = ahnet_fast.PyramidVolumetricPooling(3, 4, shape[1], "transpose")
    impls = (["triton", "reference"] if device.type == "cuda" else ["reference"]) + ["MONAI"]
    for dtype in (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
        for concat in (False, True):
            exact = copy.deepcopy(module).double().to(device)
            exact.backend = "reference"
            xd = x.detach().double().requires_grad_()
            yd = exact(xd, concat_input=concat)
            gd = torch.randn(yd.shape, generator=torch.Generator().manual_seed(2)).double().to(device)
            yd.backward(gd)
            for impl in impls:
                meta = {"shape": list(shape), "concat": concat, "dtype": str(dtype), "impl": impl}
                if impl == "MONAI" and MonaiPSP is None:
                    sec.add({**meta, "skipped": why})
                    continue
                if impl == "MONAI" and dtype != torch.float32:
                    continue
                if sec.skip_row(meta, 2 if smoke else 4):
                    continue
                with sec.row(meta) as row:
                    net = copy.deepcopy(module).to(dtype).to(device)
                    if impl == "MONAI":
                        theirs = MonaiPSP(3, 4, shape[1], "transpose").to(dtype).to(device)
                        theirs.load_state_dict(net.state_dict())
                        fn = (lambda a: torch.cat((theirs(a), a), 1)) if concat else theirs
                    else:
                        net.backend = impl
                        fn = lambda a, net=net: net(a, concat_input=concat)  # noqa: E731
                    xi = x.detach().clone().requires_grad_()
                    g = gd.to(dtype)

                    def step():
                        xi.grad = None
                        fn(xi).backward(g)

                    y = fn(xi)
                    y.backward(g)
                    out_err, grad_err = rel(y, yd), rel(xi.grad, xd.grad)
                    del y
                    base = reset_peak(device)
                    ms, samples = timed_ms(step, device, **steps(smoke, 2, 20))
                    peak = peak_bytes(device)
                    x_bytes = x.numel() * x.element_size()
                    out_bytes = x_bytes * (4 + (shape[1] if concat else 0)) // shape[1]
                    gbps = 2 * (x_bytes + out_bytes) / ms / 1e6
                    row.update(ms=ms, out_rel_err=out_err, grad_rel_err=grad_err,
                               extra_peak_bytes=None if peak is None else peak - base, GBps=gbps,
                               fraction_of_copy=gbps / bw)


def _roofline_ops_only(sec: Section, out_json: str) -> None:
    """--smoke: the ceilings and every op's row through roofline.py's own functions, without the training
    step (AH-Net's full layers take most of a minute a step on a small CPU; tests/test_benchmarks.py
    runs roofline.py --smoke end to end)."""
    import runpy

    ns = runpy.run_path(os.path.join(HERE, "roofline.py"), run_name="roofline")
    sec.result["note"] = "--smoke: the ops without the training step"
    roof = ns["ceilings"](sec.device, True)
    rows = []
    for case in ns["op_cases"](sec.device, True):
        ms = 1e3 * ns["median_seconds"](case["run"], 1)
        rows.append({"op": case["op"], "shape": case["shape"], "flops": ns["count_flops"](case["reference"]),
                     "min_bytes": case["min_bytes"], "ms": ms})
        print("roofline", json.dumps(rows[-1]), flush=True)
    write_atomic(out_json, json.dumps({"ceilings": roof, "results": rows, "note": sec.result["note"]}, indent=1))


def sec_roofline(sec: Section) -> None:
    out_json = os.path.join(sec.out, "roofline.json")
    if sec.smoke:
        _roofline_ops_only(sec, out_json)
    else:
        md = os.path.join(_scratch(), "roofline.md")
        sec.result.update(json="roofline.json", markdown_file=md)
        try:
            _run_script(sec, "roofline.py", ["--repeats", "5", "--out", md, "--json", out_json])
        finally:  # written after every row: a timeout still leaves those
            _summarize_roofline(sec, out_json)
        return
    _summarize_roofline(sec, out_json)


def _summarize_roofline(sec: Section, out_json: str) -> None:
    if not os.path.exists(out_json):
        return
    with open(out_json) as f:
        data = json.load(f)
    sec.result.update(ceilings=data.get("ceilings"), rows=[
        {k: r.get(k) for k in ("op", "shape", "ms", "fraction_of_roof", "bound", "speedup")} for r in data["results"]])
    sec.save()


def pytest_files(smoke: bool) -> list[str]:
    if smoke:
        return list(PYTEST_SMOKE_FILES)
    import glob

    found = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "test_*triton*.py")))
    ordered = [PYTEST_FIRST] + [f for f in found if f != PYTEST_FIRST] + list(PYTEST_ALSO)
    return [f for f in ordered if os.path.exists(os.path.join(ROOT, f))]


def sec_pytest(sec: Section) -> None:
    files, select = pytest_files(sec.smoke), PYTEST_SMOKE_SELECT if sec.smoke else PYTEST_SELECT
    log = os.path.join(sec.out, "pytest.log")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--maxfail=10",
           "--continue-on-collection-errors", "-rfE", *files, "-k", select]
    sec.result.update(command=" ".join(["python"] + cmd[1:]), log="pytest.log")
    sec.save()
    timeout = max(sec.left() - 2, 1)
    with open(log, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
    with open(log) as f:
        text = f.read()
    print(text, flush=True)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)(?: - (.*))?$", text, flags=re.M)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)",
                                                text.strip().splitlines()[-1] if text.strip() else "")}
    sec.result.update(rc=rc, counts=counts, failed=[{"test": t, "message": m} for t, m in failed],
                      summary=text.strip().splitlines()[-1] if text.strip() else "")
    if rc is None:
        sec.record.update(status="timeout", error={"type": "Timeout", "message": f"pytest killed after {timeout:.0f} s "
                                                   "(the section's budget); the partial output is in pytest.log",
                                                   "traceback": ""})
    elif rc == 5:
        sec.record.update(status="error", error={"type": "NoTestsSelected", "message": f"pytest selected no tests with "
                                                 f"-k {select!r} in {' '.join(files)}", "traceback": ""})
    elif rc != 0:
        sec.record.update(status="error", error={"type": "TestsFailed", "message": f"pytest exit status {rc}: "
                                                 f"{sec.result['summary']}",
                                                 "traceback": "\n".join(f"{t} - {m}" for t, m in failed)})


SECTION_FUNCTIONS = {"env": sec_env, "train_step": sec_train_step, "planner": sec_planner, "slab": sec_slab,
                     "correctness": sec_correctness, "aniso_conv": sec_aniso_conv, "focal_loss": sec_focal_loss,
                     "pyramid_pool": sec_pyramid_pool, "roofline": sec_roofline, "pytest": sec_pytest}
assert tuple(SECTION_FUNCTIONS) == tuple(s[0] for s in SECTIONS)


# ----------------------------------------------------------------------------------------------
# gpu_check.md


def _gib(b) -> str:
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


def _f(v, fmt=".2f") -> str:
    return "—" if v is None else format(v, fmt)


def _row_state(r: dict) -> str | None:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    if "oom" in r:
        return "out of memory"
    if "error" in r:
        return f"{r['error']['type']}: {r['error']['message'][:200]}"
    return None


def _md_table(header, rows, lead, values):
    """A markdown table: per row its leading cells, then its values, or, for a row that failed or was
    skipped, what happened (the remaining cells left empty)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        first, state = lead(r), _row_state(r)
        rest = [state] + [""] * (len(header) - len(first) - 1) if state else values(r)
        lines.append("| " + " | ".join(first + rest) + " |")
    return lines


def _md_env(rec):
    e = rec["result"]
    keys = ("gpu_name", "gpu_capability", "gpu_memory_bytes", "torch", "torch_cuda", "cudnn", "triton",
            "matmul_allow_tf32", "cudnn_allow_tf32", "cudnn_benchmark", "float32_matmul_precision", "git_commit",
            "git_dirty", "ahnet_fast", "extension_loaded", "extension_error", "monai", "monai_install", "nvidia_smi")
    return ["| field | value |", "|---|---|"] + [f"| {k} | {e.get(k)} |" for k in keys if k in e]


def _md_train_step(rec):
    lines = _md_table(["input", "precision", "network", "ms/step (median)", "peak allocated"],
                      rec["result"].get("rows", []), lambda r: [str(tuple(r["shape"])), r["amp"], r["net"]],
                      lambda r: [f"{r['ms']:.1f}", _gib(r.get("peak_bytes"))])
    for v in rec["result"].get("vs_monai", []):
        peak = v.get("monai_peak_over_ours")
        lines.append(f"\n{tuple(v['shape'])} {v['amp']}: {v['speedup_vs_monai']:.2f}x MONAI's speed"
                     + (f", MONAI's peak / ours {peak:.2f}" if peak else ""))
    return lines


def _md_planner(rec):
    return _md_table(["input", "checkpoint", "precision", "estimated", "measured (max_memory_allocated)",
                      "estimate / measured", "ms/step"], rec["result"].get("rows", []),
                     lambda r: [str(tuple(r["shape"])), r["checkpoint"], r["precision"]],
                     lambda r: [_gib(r["estimate"]["total"]), _gib(r.get("measured_bytes")),
                                _f(r.get("estimate_over_measured")), _f(r.get("ms"), ".0f")])


def _md_slab(rec):
    return _md_table(["input", "asked", "chosen", "ms/step", "peak", "estimate", "estimate / peak"],
                     rec["result"].get("rows", []),
                     lambda r: [f"{tuple(r['shape'])} {r.get('precision', '')}", r["checkpoint"]],
                     lambda r: [r["policy_chosen"], f"{r['ms']:.0f}", _gib(r.get("peak_bytes")),
                                _gib(r["estimate_bytes"]), _f(r.get("estimate_over_measured"))])


def _md_correctness(rec):
    def values(r):
        w = r.get("param_grad_worst") or {}
        return [f"{r['out_rel']:.2e}", f"{r['xgrad_rel']:.2e}", f"{r['param_grad_rel']:.2e}",
                f"{w.get('name')} {_f(w.get('rel'), '.2e')}"]

    return _md_table(["input", "mode", "output rel err", "input grad rel err", "param grads rel err",
                      "worst parameter"], rec["result"].get("rows", []),
                     lambda r: [str(tuple(r["shape"])), r["mode"]], values)


def _md_file(rec):
    """The script's own table when it wrote one, else the rows this section kept."""
    path = rec["result"].get("markdown_file")
    if path and os.path.exists(path):
        with open(path) as f:
            return f.read().rstrip("\n").splitlines()
    rows = rec["result"].get("rows", [])
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return ([rec["result"]["note"], ""] if "note" in rec["result"] else []) + (
        ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] +
        ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows] if rows else ["(no rows)"])


def _md_bandwidth(rec, cols):
    def values(r):
        err = (f"{r['out_rel_err']:.1e} / " if "out_rel_err" in r else "") + (f"{r['grad_rel_err']:.1e}"
                                                                               if "grad_rel_err" in r else "")
        extra = "n/a" if r.get("extra_peak_bytes") is None else f"{r['extra_peak_bytes'] / 2**20:.0f} MiB"
        return [f"{r['ms']:.3f}", err, extra, f"{r['GBps']:.0f}", f"{100 * r['fraction_of_copy']:.0f}%"]

    return [f"copy bandwidth measured: {_f(rec['result'].get('copy_GBps'), '.0f')} GB/s (read + write)", ""] + \
        _md_table(["case", "dtype", "impl", "ms (fwd+bwd)", "rel err vs fp64", "extra peak", "GB/s", "of copy bw"],
                  rec["result"].get("rows", []),
                  lambda r: [" ".join(f"{c}={r[c]}" for c in cols), str(r["dtype"]), str(r["impl"])], values)


def _md_pytest(rec):
    res = rec["result"]
    lines = [f"`{res.get('command', '')}`", "", f"summary: {res.get('summary', '')}"]
    lines += [f"- FAILED {f['test']}: {f['message']}" for f in res.get("failed", [])]
    return lines


MD_RENDERERS = {"env": _md_env, "train_step": _md_train_step, "planner": _md_planner, "slab": _md_slab,
                "correctness": _md_correctness, "aniso_conv": _md_file,
                "focal_loss": lambda r: _md_bandwidth(r, ("shape", "softmax")),
                "pyramid_pool": lambda r: _md_bandwidth(r, ("shape", "concat")), "roofline": _md_file,
                "pytest": _md_pytest}


def write_markdown(out: str, data: dict) -> None:
    sections = data.get("sections", {})
    env = sections.get("env", {}).get("result", {})
    lines = [f"# GPU check: {env.get('gpu_name') or 'no GPU'}, torch {env.get('torch')}, triton {env.get('triton')}"
             + (" (--smoke)" if data.get("smoke") else ""), "",
             f"started {data.get('started')}, finished {data.get('finished', '(running)')}, "
             f"commit {env.get('git_commit')}", "",
             "| section | status | seconds | budget | note |", "|---|---|---|---|---|"]
    for entry in data.get("plan", []):
        rec = sections.get(entry["name"], {})
        note = rec.get("skipped") or (rec.get("error") or {}).get("message", "")
        note = note.splitlines()[0][:200] if note else ""
        lines.append(f"| {entry['name']} | {rec.get('status', 'not run')} | {_f(rec.get('seconds'), '.1f')} | "
                     f"{entry['budget_s']} | {note} |")
    for entry in data.get("plan", []):
        rec = sections.get(entry["name"])
        if not rec or rec.get("status") == "skipped":
            continue
        lines += ["", f"## {entry['name']}: {rec.get('title', '')}", ""]
        try:
            lines += MD_RENDERERS[entry["name"]](rec)
        except Exception as exc:  # a partial record must not cost the rest of the report
            lines.append(f"(table not rendered: {type(exc).__name__}: {exc})")
        if rec.get("error"):
            lines += ["", f"**{rec['status']}**: {rec['error']['type']}: {rec['error']['message']}"]
            if rec["error"].get("traceback"):
                lines += ["", "```", rec["error"]["traceback"].rstrip(), "```"]
        if rec.get("fallbacks"):
            lines += ["", f"Triton fallbacks: {json.dumps(rec['fallbacks'], default=str)}"]
    write_atomic(os.path.join(out, MD_NAME), "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd in ("plan", "begin"):
        p = sub.add_parser(cmd)
        p.add_argument("--smoke", action="store_true")
        p.add_argument("--sections", default=None, help="comma-separated subset, in the plan's order")
        p.add_argument("--total-s", type=int, default=None, help="overall deadline in seconds")
        if cmd == "begin":
            p.add_argument("--out", required=True)
    p = sub.add_parser("run")
    p.add_argument("section", choices=[s[0] for s in SECTIONS])
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, required=True)
    p.add_argument("--smoke", action="store_true")
    p = sub.add_parser("finalize")
    p.add_argument("section", choices=[s[0] for s in SECTIONS])
    p.add_argument("--out", required=True)
    p.add_argument("--rc", type=int, default=0)
    p.add_argument("--wall-s", type=float, default=0.0)
    p.add_argument("--budget", type=float, required=True)
    p.add_argument("--skipped", default=None, help="the reason the shell did not start the section")
    p = sub.add_parser("summary")
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    if args.command == "plan":
        total, rows = plan(args.smoke, args.sections, args.total_s)
        print(f"TOTAL {total}")
        for name, budget, _ in rows:
            print(f"{name} {budget}" + (" rest" if name in TAKES_THE_REST else ""))
        return 0
    if args.command == "begin":
        total, rows = plan(args.smoke, args.sections, args.total_s)
        os.makedirs(args.out, exist_ok=True)
        for stale in ("aniso_conv.json", "roofline.json", "pytest.log", MD_NAME):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(args.out, stale))
        save(args.out, {"started": _now(), "smoke": args.smoke, "total_s": total,
                        "plan": [{"name": n, "budget_s": b, "title": t} for n, b, t in rows], "sections": {}})
        print(f"plan: {len(rows)} sections, {sum(b for _, b, _ in rows)} s of budgets, overall deadline {total} s"
              + (" (--smoke)" if args.smoke else ""))
        for name, budget, title in rows:
            more = " (and whatever the sections before it left of the overall deadline)" \
                if name in TAKES_THE_REST else ""
            print(f"  {name:<14} {budget:>4} s  {title}{more}")
        return 0
    if args.command == "run":
        return run_section(args.section, args.out, args.budget, args.smoke)
    if args.command == "finalize":
        finalize(args.section, args.out, args.rc, args.wall_s, args.budget, args.skipped)
        return 0
    return summary(args.out)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as exc:  # a bad --sections or override: one line, not a traceback
        print(f"gpu_check.py: {exc}", file=sys.stderr)
        sys.exit(2)
