"""The training pipeline: checkpoints, resume, the 2D->3D schedule, DDP, inference, CLI errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ahnet_fast.training import TrainConfig, train, train_schedule
from ahnet_fast.training.checkpoint import atomic_torch_save, load_checkpoint
from ahnet_fast.training.models import ENCODER

ROOT = Path(__file__).resolve().parents[1]

# A small AH-Net input (psp_block_num 0: in-plane and slice sizes multiples of 32; 64 in-plane so the
# deepest BatchNorm sees more than one value per channel) on small
# synthetic volumes kept at their native spacing: a step takes a fraction of a second.
TINY = dict(patch=(64, 64, 32), psp_block_num=0, train_cases=2, val_cases=1, synthetic_size_xy=64,
            spacing_xy=None, progress=False, plots=False, save_every=2)


def tiny(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(tmp_path / "run"), **kw})


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _tiny_args(out, steps=2, extra=()):
    return ["train", "--stage", "finetune", "--steps", str(steps), "--patch", "64", "64", "32", "--psp-block-num", "0",
            "--train-cases", "2", "--val-cases", "1", "--synthetic-size", "64", "--spacing", "0", "--save-every", "1",
            "--no-progress", "--no-plots", "--out", str(out), *extra]


# ---------------------------------------------------------------- checkpoints

def test_atomic_save_keeps_previous_checkpoint_when_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_torch_save({"model": {"w": torch.ones(2)}, "optimizer": {}, "step": 1, "config": {}}, path)

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"model": {"w": torch.zeros(2)}, "optimizer": {}, "step": 2, "config": {}}, path)
    monkeypatch.undo()
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "the temporary file must be removed"


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="nope.pt.*does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt.*cannot be read"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(1)}, other)
    with pytest.raises(ValueError, match="other.pt.*not an ahnet_fast training checkpoint"):
        load_checkpoint(other)


# ---------------------------------------------------------------- config errors

@pytest.mark.parametrize("kw, match", [
    (dict(stage="3d"), "--init"),
    (dict(patch=(48, 64, 32)), "axis 0"),
    (dict(patch=(64, 64, 40)), "axis 2"),
    (dict(amp="fp16"), "fp16"),
    (dict(batch=3, micro_batch=2), "micro-batch"),
    (dict(overlap=1.0), "overlap"),
    (dict(stage="2x"), "stage"),
    (dict(optimizer="lbfgs"), "optimizer"),
    (dict(optimizer="sgd", momentum=1.0), "momentum"),
])
def test_bad_configuration_raises_value_error(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(tmp_path, **kw).validate()


def test_cli_reports_bad_arguments_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ahnet_fast", "train", "--stage", "3d", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 2
    assert "--init" in r.stderr and "Traceback" not in r.stderr


def test_cli_help_of_every_subcommand():
    for cmd in ("train", "infer", "plan", "bench", "parity", "demo"):
        r = subprocess.run([sys.executable, "-m", "ahnet_fast", cmd, "--help"], capture_output=True, text=True,
                           env=_env(), timeout=120)
        assert r.returncode == 0 and "usage: ahnet-fast " + cmd in r.stdout, r.stderr
        if cmd == "train":
            text = " ".join(r.stdout.split())  # argparse wraps the help lines
            assert "(default: (128, 128, 32))" in text and "(default: 200)" in text, r.stdout


def test_bench_runs_from_any_folder(tmp_path):
    """The end-to-end benchmark is part of the package: it runs outside the repository (a fresh folder,
    as from an installed wheel), with its options listed by --help, and writes its JSON."""
    pytest.importorskip("monai")
    r = subprocess.run([sys.executable, "-m", "ahnet_fast", "bench", "--help"], capture_output=True, text=True,
                       env=_env(), timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and "--sizes" in r.stdout and "usage: ahnet-fast bench" in r.stdout, r.stderr
    out = tmp_path / "results" / "e2e.json"
    r = subprocess.run([sys.executable, "-m", "ahnet_fast", "bench", "--sizes", "128", "128", "32", "--modes", "infer",
                        "--repeats", "1", "--rounds", "1", "--profile", "--json", str(out)], capture_output=True,
                       text=True, env=_env(), timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads(out.read_text())
    records = record["results"]
    assert {rec["impl"] for rec in records} == {"MONAI", "ahnet_fast"} and all(rec["median_ms"] > 0 for rec in records)
    # --profile: where each row's time went, the step's FLOPs and the machine's ceilings
    assert record["ceilings"]["matmul_fp32_GFLOPs"] > 0 and record["ceilings"]["copy_GBps"] > 0
    by = {rec["impl"]: rec for rec in records}
    assert by["ahnet_fast"]["flops"] > 10 ** 10  # MONAI's model's products, one count for every row
    assert by["MONAI"]["profile"]["self_s"]["convolutions (oneDNN/ATen)"] > 0
    assert by["ahnet_fast"]["profile"]["matmul_gflop"] > 0 and by["ahnet_fast"]["profile"]["self_s"]["matrix products"] > 0


def test_profile_by_kind_sorts_time_by_kind_of_op():
    """The benchmark's profile: matrix products (with their FLOPs), convolutions, copies, elementwise,
    and everything inside an optimizer step as the optimizer's, whatever op it runs."""
    import torch

    from ahnet_fast.benchmark import profile_by_kind

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    w = torch.nn.Parameter(torch.randn(8, 4, 3, 3, 1))
    opt = torch.optim.Adam([w])
    x = torch.randn(1, 4, 16, 16, 4)

    def work():
        c = a @ b
        c.add_(1.0).clone()
        torch.nn.functional.conv3d(x, w, padding=(1, 1, 0)).sum().backward()
        opt.step()

    prof = profile_by_kind(work)
    from types import SimpleNamespace

    from ahnet_fast.benchmark import _kind_of

    def kind(name, parent=None):
        return _kind_of(SimpleNamespace(name=name, cpu_parent=parent))

    # ahnet_fast's composite ops' own time is glue, not elementwise work, whatever their name starts with
    assert kind("ahnet_fast::bn_relu_conv_backward") == kind("ahnet_fast::dense_block") \
        == "ahnet_fast ops' own time (glue around the products)"
    assert kind("ahnet_fast::bn_relu_apply_") == "BatchNorm, ReLU and other elementwise"
    assert kind("ahnet_fast::transposed_conv_unshuffle") == "copies and concatenation"
    assert kind("ahnet_fast::slice_max_pool") == "pooling"
    assert kind("## Call CompiledFxGraph fxe3lllika2qmbqe2zfx ##") == "compiled (Inductor) kernels"
    assert kind("Torch-Compiled Region: 0/0") == "other"  # the wrapper's own overhead
    assert kind("aten::mul_", parent=SimpleNamespace(name="Optimizer.step#Adam.step", cpu_parent=None)) == "optimizer"
    # ahnet_fast's product kernels count as products, FLOPs from their recorded shapes (channel_mm_conv_:
    # 2 x voxels x Co x Ci x taps)
    assert kind("ahnet_fast::channel_mm_conv_") == kind("ahnet_fast::channel_mm_") == "matrix products"
    from ahnet_fast.benchmark import _kernel_flops
    conv = SimpleNamespace(name="ahnet_fast::channel_mm_conv_",
                           input_shapes=[[20, 960], [20, 16, 3, 3, 1], [16, 960], [], [], [], []])
    assert _kernel_flops(conv) == 2 * 960 * 20 * 16 * 9
    assert _kernel_flops(SimpleNamespace(name="ahnet_fast::channel_mm_", input_shapes=[[8, 100], [8, 5], [5, 100]])) \
        == 2 * 8 * 100 * 5
    assert _kernel_flops(SimpleNamespace(name="ahnet_fast::channel_mm_nt_conv_",
                                         input_shapes=[[20, 144], [20, 960], [16, 960], [], [], []])) == 2 * 20 * 144 * 960
    spent = prof["self_s"]
    for kind in ("matrix products", "convolutions (oneDNN/ATen)", "copies and concatenation",
                 "BatchNorm, ReLU and other elementwise", "optimizer"):
        assert spent.get(kind, 0) > 0, (kind, spent)
    assert prof["matmul_gflop"] >= 2 * 256 ** 3 / 1e9 and prof["matmul_gflops_per_s"] > 0
    assert "aten::mm" in prof["top_ops_s"] and len(prof["top_ops_s"]) <= 20


def test_bench_rows_name_their_variant_and_compare_with_the_same_precision():
    """The benchmark's row names (checkpoint, extras, precision, layout) and the alternative each of
    ahnet_fast's rows is judged against: the fastest MONAI row of its own precision."""
    from ahnet_fast.benchmark import best_alternative, parse_impl

    assert parse_impl("ahnet_fast:all+fused_adam/bf16@channels_last_3d") == dict(
        name="ahnet_fast", checkpoint="all", extras={"fused_adam"}, precision="bf16", layout="channels_last_3d")
    assert parse_impl("MONAI+compile") == dict(name="MONAI", checkpoint="none", extras={"compile"}, precision=None,
                                               layout="contiguous")
    medians = {"MONAI": 10.0, "MONAI+compile": 8.0, "MONAI/bf16": 9.0, "ahnet_fast": 5.0, "ahnet_fast/bf16": 4.0}
    precision = {k: ("bf16" if k.endswith("/bf16") else "fp32") for k in medians}
    assert best_alternative("ahnet_fast", medians, precision) == "MONAI+compile"
    assert best_alternative("ahnet_fast/bf16", medians, precision) == "MONAI/bf16"  # not the faster fp32 row
    assert best_alternative("MONAI", medians, precision) is None


def test_train_keeps_an_earlier_run_unless_told(tmp_path, capsys):
    """A non-empty --out is refused before any work, naming the ways on; --resume with --overwrite too."""
    from ahnet_fast.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"an earlier run")
    assert main(_tiny_args(out)) == 2
    err = capsys.readouterr().err
    assert "already holds files (last.pt)" in err and "--resume" in err and "--overwrite" in err
    assert (out / "last.pt").read_bytes() == b"an earlier run"
    assert main(_tiny_args(out, extra=["--resume", "--overwrite"])) == 2
    assert "pass one of them" in capsys.readouterr().err


def test_patch_that_does_not_fit_is_refused_before_training_with_valid_sizes(capsys):
    from ahnet_fast.cli import main

    assert main(["train", "--patch", "96", "96", "32", "--out", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err
    assert "--patch size 96 on axis 0 (in-plane)" in err and "the smallest size that does: 128" in err
    assert "None" not in err
    assert main(["train", "--patch", "160", "128", "32", "--out", "/nonexistent/never-written"]) == 2
    assert "nearest sizes that do: 128 or 256" in capsys.readouterr().err


# ---------------------------------------------------------------- training, resume

def _final_state(out: Path) -> dict:
    return load_checkpoint(out / "last.pt")["model"]


def test_train_writes_checkpoint_metrics_and_plots(tmp_path):
    cfg = tiny(tmp_path, steps=3, plots=True, eval_every=2)
    result = train(cfg)
    out = Path(cfg.out)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 3 and set(ckpt) >= {"model", "optimizer", "step", "config", "model_spec"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["voxels_per_s"] > 0 for r in records if r["kind"] == "train")
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 3]
    assert {"dice_case/liver", "dice_case/lesion", "dice_global/liver", "dice_global/lesion"} <= set(evals[-1])
    assert 0.0 <= result["dice"]["dice_case/liver"] <= 1.0
    for name in ("curves.png", "montage.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_continues_exactly(tmp_path):
    straight = tiny(tmp_path / "a", steps=4)
    train(straight)
    interrupted = tiny(tmp_path / "b", steps=2)
    train(interrupted)
    resumed = tiny(tmp_path / "b", steps=4, resume=True)
    train(resumed)
    a, b = _final_state(Path(straight.out)), _final_state(Path(resumed.out))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    la = [json.loads(x)["loss"] for x in (Path(straight.out) / "metrics.jsonl").read_text().splitlines()
          if json.loads(x)["kind"] == "train"]
    lb = [json.loads(x)["loss"] for x in (Path(resumed.out) / "metrics.jsonl").read_text().splitlines()
          if json.loads(x)["kind"] == "train"]
    assert la == pytest.approx(lb, rel=1e-6, abs=0)


def test_resume_refuses_other_settings(tmp_path):
    train(tiny(tmp_path, steps=2))
    with pytest.raises(ValueError, match="lr"):
        train(tiny(tmp_path, steps=3, resume=True, lr=5e-4))
    with pytest.raises(ValueError, match="optimizer: checkpoint 'adam', now 'sgd'"):
        train(tiny(tmp_path, steps=3, resume=True, optimizer="sgd"))


def test_resume_reads_a_checkpoint_older_than_a_setting(tmp_path):
    """A checkpoint written before a setting existed (here the optimizer choice) had that setting's
    default, and resumes with it."""
    train(tiny(tmp_path, steps=1))
    path = Path(tmp_path) / "run" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    for key in ("optimizer", "momentum"):
        del ckpt["config"][key]
    torch.save(ckpt, path)
    assert train(tiny(tmp_path, steps=2, resume=True))["step"] == 2
    with pytest.raises(ValueError, match="optimizer"):
        train(tiny(tmp_path, steps=3, resume=True, optimizer="sgd"))


def test_killed_run_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL at several moments during training (steps, checkpoint writes): last.pt always loads
    with weights_only=True, and --resume finishes the run."""
    out = tmp_path / "run"
    rng = np.random.default_rng(0)
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "ahnet_fast", *_tiny_args(out, steps=20, extra=["--resume"])],
                                env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(float(rng.uniform(0.0, 1.5)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = load_checkpoint(out / "last.pt")
        assert 1 <= ckpt["step"] <= 20
    r = subprocess.run([sys.executable, "-m", "ahnet_fast", *_tiny_args(out, steps=20, extra=["--resume"])],
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_checkpoint(out / "last.pt")["step"] == 20
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == list(range(1, 21)), "each step logged exactly once across the kills"
    leftovers = [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert not leftovers, f"temporary files of the killed runs were not removed at the next start: {leftovers}"


def test_bf16_autocast_step_on_cpu(tmp_path):
    result = train(tiny(tmp_path, steps=1, amp="bf16"))
    assert np.isfinite(result["loss"])


# ---------------------------------------------------------------- the paper's schedule

def test_schedule_2d_then_3d_with_frozen_encoder_then_finetune(tmp_path):
    cfg = tiny(tmp_path, steps=2)
    r2d, r3d, rft = train_schedule(cfg, steps={"2d": 2, "3d": 2, "finetune": 1})
    net2d = load_checkpoint(r2d["checkpoint"])
    c3d = load_checkpoint(r3d["checkpoint"])
    assert net2d["model_spec"]["kind"] == "MCFCN" and c3d["model_spec"]["kind"] == "AHNet"
    assert c3d["frozen"] == list(ENCODER)
    # stage 3d: the encoder is the transferred 2D encoder, untouched by training (BN statistics too)
    from ahnet_fast import AHNet
    from ahnet_fast.training.models import build_from_spec

    net = build_from_spec(net2d["model_spec"])
    net.load_state_dict(net2d["model"])
    expected = AHNet(in_channels=1, out_channels=3, psp_block_num=0).copy_from(net).state_dict()
    for k, v in c3d["model"].items():
        if k.split(".")[0] in ENCODER:
            torch.testing.assert_close(v, expected[k], rtol=0, atol=0, msg=k)
    moved = [k for k, v in c3d["model"].items() if k.split(".")[0] not in ENCODER and v.is_floating_point()
             and not torch.equal(v, expected[k])]
    assert moved, "the decoder trains in stage 3d"
    # finetune starts from the 3d weights and changes the encoder too
    cft = load_checkpoint(rft["checkpoint"])
    assert not torch.equal(cft["model"]["layer1.0.conv1.weight"], c3d["model"]["layer1.0.conv1.weight"])


# ---------------------------------------------------------------- inference and parity

def test_train_with_its_defaults_runs_on_the_default_data(tmp_path):
    """`ahnet-fast train` as a new user first runs it: patch 128x128x32, psp_block_num 4, every stage,
    on the default synthetic data, whose volumes (about 123x123x44 after resampling to 1.6 mm) are
    smaller than the patch in-plane and get padded. Only the step count, the number of volumes and the
    output folder are set, to keep it short."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "ahnet_fast", "train", "--steps", "1", "--train-cases", "1",
                        "--val-cases", "1", "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, env=_env(), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("2d", "3d", "finetune"):
        ckpt = torch.load(out / stage / "last.pt", weights_only=True)
        assert ckpt["step"] == 1 and tuple(ckpt["config"]["patch"]) == (128, 128, 32), stage
        assert (out / stage / "curves.png").exists()


def test_infer_cli_writes_labels_on_the_input_grid(tmp_path):
    import nibabel as nib

    from ahnet_fast.data import make_synthetic_case, save_nifti

    train(tiny(tmp_path, steps=1, spacing_xy=1.2, synthetic_size_xy=96))
    case = make_synthetic_case(123, size_xy=40)  # ~27 voxels in-plane at 1.2 mm: smaller than one 64 window
    src = tmp_path / "ct.nii.gz"
    save_nifti(src, case.image, case.affine)
    dst, probs = tmp_path / "seg.nii.gz", tmp_path / "prob.nii.gz"
    r = subprocess.run([sys.executable, "-m", "ahnet_fast", "infer", "--model", str(tmp_path / "run" / "last.pt"),
                        str(src), str(dst), "--overlap", "0.5", "--window-batch", "2", "--stitch", "cpu",
                        "--probabilities", str(probs), "--no-progress"],
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote" in r.stdout
    seg = nib.load(str(dst))
    assert seg.shape == case.image.shape and seg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(seg.affine, nib.load(str(src)).affine, atol=1e-5)
    labels = np.asarray(seg.dataobj)
    assert labels.max() < 3
    p = np.asarray(nib.load(str(probs)).dataobj)
    assert p.shape == (*case.image.shape, 3)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(p.argmax(-1) == labels, True)


def test_infer_errors_name_the_file(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ahnet_fast", "infer", "--model", str(tmp_path / "missing.pt"),
                        str(tmp_path / "in.nii.gz"), str(tmp_path / "out.nii.gz")],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 2 and "missing.pt" in r.stderr and "Traceback" not in r.stderr


def test_parity_report_tiny(tmp_path):
    """Both criteria on a small AHNet for a few steps: in float64 the fast path equals MONAI to 1e-9
    (losses and final weights); in float32 MONAI is rerun under five rounding-level controls and the
    verdict compares ahnet_fast's distances with theirs. Report, Markdown and plot are written."""
    from ahnet_fast.training.parity import run_parity

    report = run_parity(steps=2, steps_fp64=3, patch=(64, 64, 32), psp_block_num=0, layers=(1, 1, 1, 1),
                        train_cases=1, val_cases=1, synthetic_size_xy=64, out=tmp_path, progress=False,
                        spacing_xy=None)
    f64, f32 = report["float64"], report["float32"]
    assert f64["against"] == "MONAI" and f64["passed"], report["summary"]
    assert f64["max_rel_loss_diff"] <= 1e-9 and f64["max_rel_weight_diff"] <= 1e-9
    assert len(f32["controls"]) == 5 and set(f32["runs"]) == {"ahnet_fast", "reference", "MONAI", *f32["controls"]}
    # the reference path computes MONAI's arithmetic: the same losses, bit for bit
    assert f32["runs"]["reference"]["losses"] == f32["runs"]["MONAI"]["losses"]
    assert all(f32["distances"][c]["max_rel_loss_diff"] > 0 for c in f32["controls"][:4])  # they do perturb
    assert f32["loss_bound"] == 2 * max(f32["distances"][c]["max_rel_loss_diff"] for c in f32["controls"])
    assert report["passed"] == (f64["passed"] and f32["passed"])
    assert (tmp_path / "parity.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "parity.md").read_text()
    assert "**Verdict:" in md and "| ahnet_fast |" in md and "weights +1 ulp" in md
    assert json.loads((tmp_path / "parity.json").read_text())["passed"] == report["passed"]


def test_parity_fails_a_kernel_that_rounds_to_float32(tmp_path, monkeypatch, capsys):
    """A deliberately wrong fast path: one op (every BN-ReLU-convolution) computing from its input
    rounded to float32, an error at the level of float32 rounding that float32 training could not
    tell from noise. The float64 criterion sees it, and `ahnet-fast parity` exits 1."""
    import ahnet_fast.ops
    from ahnet_fast.cli import main

    exact = ahnet_fast.ops.bn_relu_conv

    def rounds_to_float32(x, *args, **kwargs):
        return exact(x.float().to(x.dtype), *args, **kwargs)

    monkeypatch.setattr(ahnet_fast.ops, "bn_relu_conv", rounds_to_float32)
    code = main(["parity", "--parts", "float64", "--steps-fp64", "2", "--patch", "64", "64", "32",
                 "--psp-block-num", "0", "--layers", "1", "1", "1", "1", "--train-cases", "1", "--val-cases", "1",
                 "--synthetic-size", "64", "--spacing", "0", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1 and "FAILED" in out and "(FAIL)" in out
    report = json.loads((tmp_path / "parity.json").read_text())
    assert not report["float64"]["loss_ok"] and report["float64"]["max_rel_loss_diff"] > 1e-9
