"""Faults a hostile but realistic user meets: NaN voxels, diverging runs, outputs that would replace
inputs, full and read-only disks, kills and Ctrl-C, stale temporary files, changed data under a resumed
run. Each test asserts that nothing was lost and that the message is the one a user should see.

Tests run as root, where permissions do not stop writes: file-system refusals are simulated by
monkeypatching the calls that would meet them (the probe in check_writable, nibabel's and torch's
writers), raising what the kernel or torch raises."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import ahnet_fast._atomic as atomic
from ahnet_fast.cli import main
from ahnet_fast.data import GeometryWarning, load_nifti, make_synthetic_case, save_nifti
from ahnet_fast.inference import sliding_window_inference
from ahnet_fast.training import train
from ahnet_fast.training.checkpoint import load_checkpoint
from tests.test_training import _env, _tiny_args, tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-step checkpoint and a small CT volume (about 27 x 27 voxels at the 1.2 mm it resamples to:
    one window)."""
    root = tmp_path_factory.mktemp("faults")
    train(tiny(root, steps=1, spacing_xy=1.2, synthetic_size_xy=96))
    case = make_synthetic_case(321, size_xy=40)
    ct = root / "ct.nii.gz"
    save_nifti(ct, case.image, case.affine)
    return root / "run" / "last.pt", ct, case


def _infer(model, src, dst, *extra):
    return main(["infer", "--model", str(model), str(src), str(dst), "--no-progress", *extra])


def _no_temps(folder: Path):
    left = [p.name for p in folder.iterdir() if ".tmp" in p.name]
    assert not left, f"temporary files left: {left}"


def _strict_json_lines(path: Path) -> list[dict]:
    def refuse(name):
        raise AssertionError(f"{path} holds a bare {name}, which JSON does not allow")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- NaN in, nothing quiet out

def test_infer_refuses_nan_voxels_or_replaces_them_when_asked(trained, tmp_path, capsys):
    model, _, case = trained
    image = case.image.copy()
    image[3, 4, 5] = np.nan
    image[0, 0, 0] = np.inf
    src = tmp_path / "nan_ct.nii.gz"
    save_nifti(src, image, case.affine)
    dst = tmp_path / "seg.nii.gz"
    assert _infer(model, src, dst) == 2
    err = capsys.readouterr().err
    assert f"{src}: 2 of {image.size} voxels are NaN or infinite" in err and "--replace-nonfinite" in err
    assert "Traceback" not in err and not dst.exists()
    with pytest.warns(UserWarning, match="2 NaN or infinite voxels replaced by -1024"):
        assert _infer(model, src, dst, "--replace-nonfinite", "-1024") == 0
    assert nib.load(str(dst)).shape == image.shape


def test_sliding_window_inference_refuses_non_finite_inputs_and_outputs():
    x = torch.zeros(1, 1, 8, 8, 4)
    x[0, 0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="inputs has 1 NaN or infinite values of 256"):
        sliding_window_inference(x, lambda w: w, (4, 4, 4))
    with pytest.raises(ValueError, match="predictor returned 256 NaN or infinite logits"):
        sliding_window_inference(torch.zeros(1, 1, 8, 8, 4), lambda w: w / 0.0, (4, 4, 4))


def test_training_refuses_a_nan_voxel_naming_the_file(tmp_path):
    from ahnet_fast.data import CasePaths, load_case

    arr = np.zeros((6, 6, 4), np.float32)
    arr[2, 2, 2] = np.nan
    path = tmp_path / "ct.nii"
    save_nifti(path, arr, np.eye(4))
    with pytest.raises(ValueError, match=r"ct.nii: 1 of 144 voxels are NaN or infinite"):
        load_case(CasePaths("c", path, None), num_classes=3)


# ---------------------------------------------------------------- divergence

def test_divergence_keeps_the_last_finite_checkpoint_and_infer_refuses_non_finite_weights(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_tiny_args(out, steps=6, extra=["--lr", "1e6"])) == 1
    err = capsys.readouterr().err
    assert "training diverged" in err and "Traceback" not in err
    ckpt = load_checkpoint(out / "last.pt")
    assert f"holds step {ckpt['step']}, the last finite state" in err
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    records = _strict_json_lines(out / "metrics.jsonl")
    assert all(r["step"] <= ckpt["step"] + 1 for r in records)

    # a checkpoint that does hold NaN (written by another tool, or by an older version) is refused
    ckpt["model"]["final.conv.weight"] = ckpt["model"]["final.conv.weight"] * float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(ckpt, bad)
    src = tmp_path / "ct.nii.gz"
    save_nifti(src, np.zeros((40, 40, 32), np.float32), np.eye(4))
    assert _infer(bad, src, tmp_path / "seg.nii.gz") == 2
    assert "1 weight tensor(s) hold NaN or infinite values (final.conv.weight)" in capsys.readouterr().err
    assert not (tmp_path / "seg.nii.gz").exists()


# ---------------------------------------------------------------- geometry

def test_geometry_comes_from_the_affine_and_a_disagreeing_header_is_reported(trained, tmp_path):
    model, ct, case = trained
    good = tmp_path / "good.nii.gz"
    save_nifti(good, case.image, case.affine)
    # the same volume whose header pixdim says 1 mm while the affine (sform) says the real spacing
    img = nib.load(str(good))
    img.header.set_zooms((1.0, 1.0, 1.0))
    img.set_sform(case.affine, code=1)
    img.set_qform(None, code=0)
    liar = tmp_path / "liar.nii.gz"
    nib.save(img, str(liar))
    with pytest.warns(GeometryWarning, match=r"liar.nii.gz: the header's voxel size \(pixdim\) 1 x 1 x 1 mm "
                                             r"disagrees with its affine's"):
        load_nifti(liar)
    with pytest.warns(GeometryWarning):
        assert _infer(model, liar, tmp_path / "a.nii.gz") == 0
    assert _infer(model, good, tmp_path / "b.nii.gz") == 0
    a, b = (np.asarray(nib.load(str(tmp_path / n)).dataobj) for n in ("a.nii.gz", "b.nii.gz"))
    np.testing.assert_array_equal(a, b)  # resampled by the affine's spacing both times

    # a zero pixdim that nibabel repairs to 1 mm is a guess, and said to be one
    raw = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.diag([0.8, 0.8, 3.0, 1.0]))
    raw.header["pixdim"][1:4] = [0.8, 0.0, 3.0]
    raw.set_sform(None, code=0)
    raw.set_qform(None, code=0)
    zero = tmp_path / "zero.nii"
    raw.to_filename(str(zero))
    with pytest.warns(GeometryWarning, match=r"zero.nii: .*zero or invalid along Y; nibabel assumed 1 mm"):
        load_nifti(zero)


# ---------------------------------------------------------------- nothing overwritten unless asked

def test_infer_never_replaces_its_input_nor_an_existing_output_without_overwrite(trained, tmp_path, capsys):
    model, ct, case = trained
    src = tmp_path / "ct.nii.gz"
    src.write_bytes(ct.read_bytes())
    before = src.read_bytes()
    for dst in (src, tmp_path / "." / "ct.nii.gz", model):
        assert _infer(model, src, dst) == 2
    err = capsys.readouterr().err
    assert "is the input: it would be replaced" in err and ".pt must end in .nii or .nii.gz" in err
    assert src.read_bytes() == before
    out = tmp_path / "seg.nii.gz"
    assert _infer(model, src, out, "--probabilities", str(out)) == 2
    assert "the labels and --probabilities are the same file" in capsys.readouterr().err
    out.write_bytes(b"an earlier result")
    assert _infer(model, src, out) == 2
    assert f"output {out} exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier result"
    assert _infer(model, src, out, "--overwrite") == 0
    assert nib.load(str(out)).shape == case.image.shape


def test_train_out_that_is_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "run"
    blocker.write_text("not a folder")
    assert main(_tiny_args(blocker, steps=1)) == 2
    err = capsys.readouterr().err
    assert f"--out {blocker} is a file" in err and "Traceback" not in err
    assert blocker.read_text() == "not a folder"


def test_train_refuses_a_finished_run_folder_without_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_tiny_args(out, steps=1)) == 0
    before = (out / "last.pt").read_bytes(), (out / "metrics.jsonl").read_text()
    assert main(_tiny_args(out, steps=1)) == 2
    assert "already holds files" in capsys.readouterr().err
    assert ((out / "last.pt").read_bytes(), (out / "metrics.jsonl").read_text()) == before


# ---------------------------------------------------------------- outputs checked before any work

@pytest.fixture
def no_inference(monkeypatch):
    """Fails the test if inference starts: the checks must come first."""
    import ahnet_fast.training.infer as infer_mod

    def forbidden(*a, **k):
        raise AssertionError("inference ran before the output was checked")
    monkeypatch.setattr(infer_mod, "predict_logits", forbidden)
    monkeypatch.setattr(infer_mod, "load_trained_model", forbidden)


@pytest.mark.parametrize("code, reason", [(errno.EROFS, "read-only file system"),
                                          (errno.EACCES, "permission denied"),
                                          (errno.ENOSPC, "no space left on the device")])
def test_infer_finds_an_unwritable_output_folder_before_any_work(trained, tmp_path, capsys, monkeypatch,
                                                                 no_inference, code, reason):
    model, ct, _ = trained
    real_open = os.open

    def refusing_open(path, flags, *a, **k):
        if str(path).startswith(str(tmp_path / "out")) and flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *a, **k)
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(atomic.os, "open", refusing_open)
    assert _infer(model, ct, tmp_path / "out" / "seg.nii.gz") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ahnet-fast infer: cannot write {tmp_path / 'out' / 'seg.nii.gz'}: {reason}"), err
    assert len(err.splitlines()) == 1


def test_train_finds_an_unwritable_out_before_any_work(tmp_path, capsys, monkeypatch):
    import ahnet_fast.training.loop as loop

    real_open = os.open

    def read_only(path, flags, *a, **k):
        if str(path).startswith(str(tmp_path)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(atomic.os, "open", read_only)
    monkeypatch.setattr(loop, "load_datasets", lambda *a, **k: pytest.fail("training started"))
    assert main(_tiny_args(tmp_path / "run", steps=1)) == 1
    assert capsys.readouterr().err.strip() == \
        f"ahnet-fast train: cannot write {tmp_path / 'run' / 'last.pt'}: read-only file system"


def test_infer_output_paths_that_cannot_be_files(trained, tmp_path, capsys, no_inference):
    model, ct, _ = trained
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is needed")
    assert _infer(model, ct, blocker / "sub" / "seg.nii.gz") == 1
    assert f"{blocker} is a file, not a folder" in capsys.readouterr().err
    (tmp_path / "folder.nii.gz").mkdir()
    assert _infer(model, ct, tmp_path / "folder.nii.gz") == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
    assert _infer(model, ct, tmp_path / "seg.nrrd") == 2
    assert "must end in .nii or .nii.gz" in capsys.readouterr().err


def test_a_full_disk_while_writing_leaves_neither_labels_nor_probabilities(trained, tmp_path, capsys, monkeypatch):
    """The labels are written, then the probabilities meet a full disk: neither lands, the earlier files
    stay as they were, no temporary file is left."""
    model, ct, _ = trained
    seg, prob = tmp_path / "seg.nii.gz", tmp_path / "prob.nii.gz"
    seg.write_bytes(b"earlier labels")
    prob.write_bytes(b"earlier probabilities")
    real_save = nib.save
    calls = []

    def filling_save(img, filename):
        calls.append(filename)
        if len(calls) == 2:
            with open(filename, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save(img, filename)
    monkeypatch.setattr(nib, "save", filling_save)
    assert _infer(model, ct, seg, "--probabilities", str(prob), "--overwrite") == 1
    err = capsys.readouterr().err
    assert f"cannot write {prob}: no space left on the device" in err and "Traceback" not in err
    assert seg.read_bytes() == b"earlier labels" and prob.read_bytes() == b"earlier probabilities"
    _no_temps(tmp_path)


def test_ctrl_c_during_inference_exits_130_without_a_traceback_or_output(trained, tmp_path, capsys, monkeypatch):
    import ahnet_fast.training.infer as infer_mod

    def interrupted(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the signal arrives first
        raise AssertionError("SIGINT did not interrupt")
    monkeypatch.setattr(infer_mod, "predict_logits", interrupted)
    model, ct, _ = trained
    assert _infer(model, ct, tmp_path / "seg.nii.gz") == 130
    assert capsys.readouterr().err.strip() == "ahnet-fast infer: interrupted by SIGINT"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- checkpoints on a full disk

def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    calls = []

    def filling_save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:  # what torch's writer says when the disk fills under it
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04 partial")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4416 vs 4352")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", filling_save)
    assert main(_tiny_args(out, steps=3)) == 1
    err = capsys.readouterr().err
    assert f"cannot write {out / 'last.pt'}: no space left on the device" in err and "Traceback" not in err
    assert load_checkpoint(out / "last.pt")["step"] == 1
    _no_temps(out)


# ---------------------------------------------------------------- kills, signals, leftovers

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporary_files_are_removed_at_the_next_start(tmp_path, capsys, trained):
    out = tmp_path / "run"
    assert main(_tiny_args(out, steps=1)) == 0
    stale = out / f".last.pt.{_dead_pid()}.0123456789ab.tmp"
    stale.write_bytes(b"\0" * 4096)
    mine = out / f".last.pt.{os.getpid()}.0123456789ab.tmp"  # a live process's: not touched
    mine.write_bytes(b"x")
    capsys.readouterr()
    assert main(_tiny_args(out, steps=2, extra=["--resume"])) == 0
    assert not stale.exists() and mine.exists()
    assert f"removed 1 temporary file(s) (0 MiB) that a killed run left in {out}: {stale.name}" in \
        capsys.readouterr().err
    mine.unlink()
    # the same in an inference output folder
    model, ct, _ = trained
    stale = tmp_path / f".seg.{_dead_pid()}.0123456789ab.tmp.nii.gz"
    stale.write_bytes(b"\0")
    assert _infer(model, ct, tmp_path / "seg.nii.gz") == 0
    assert not stale.exists()


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_training_saves_that_step_and_exits_cleanly(tmp_path, sig, code):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ahnet_fast", *_tiny_args(out, steps=40,
                                                                             extra=["--save-every", "100"])],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while (not metrics.exists() or not metrics.read_text()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    step = load_checkpoint(out / "last.pt")["step"]
    assert 1 <= step < 40
    assert f"stopped by {signal.Signals(sig).name} after step {step}: {out / 'last.pt'} holds it" in err
    _no_temps(out)
    r = subprocess.run([sys.executable, "-m", "ahnet_fast", *_tiny_args(out, steps=step + 1,
                                                                       extra=["--resume"])],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"resuming {out / 'last.pt'} at step {step}" in r.stderr


# ---------------------------------------------------------------- arguments and data

@pytest.mark.parametrize("extra, message", [
    (["--val-cases", "-1"], "--val-cases must be >= 1"),
    (["--val-cases", "0"], "--val-cases must be >= 1"),
    (["--train-cases", "0"], "--train-cases must be >= 1"),
    (["--max-cases", "1"], "--max-cases must leave at least one training case"),
])
def test_counts_are_validated(tmp_path, capsys, extra, message):
    assert main(_tiny_args(tmp_path / "run", extra=extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _decathlon(root: Path, n=3, size=64) -> Path:
    entries = []
    for i in range(n):
        case = make_synthetic_case(1000 + i, size_xy=size)
        save_nifti(root / "imagesTr" / f"liver_{i}.nii.gz", case.image, case.affine)
        save_nifti(root / "labelsTr" / f"liver_{i}.nii.gz", case.label, case.affine)
        entries.append({"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"training": entries}))
    return root


def test_dataset_json_paths_stay_inside_the_dataset_folder(tmp_path):
    from ahnet_fast.data import discover_cases

    root = _decathlon(tmp_path / "Task03", n=1, size=32)
    other = _decathlon(tmp_path / "Other", n=1, size=32)
    spec = json.loads((root / "dataset.json").read_text())
    spec["training"][0]["image"] = "../Other/imagesTr/liver_0.nii.gz"
    (root / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"path '../Other/imagesTr/liver_0.nii.gz' leads outside the dataset "
                                         r"folder .*write it as an absolute path"):
        discover_cases(root)
    spec["training"][0]["image"] = str(other / "imagesTr" / "liver_0.nii.gz")  # absolute: on purpose
    (root / "dataset.json").write_text(json.dumps(spec))
    assert discover_cases(root)[0].image == other / "imagesTr" / "liver_0.nii.gz"


def test_resume_on_real_data_checks_the_data_not_the_spelling(tmp_path, capsys, monkeypatch):
    data = _decathlon(tmp_path / "Task03")
    out = tmp_path / "run"
    args = ["train", "--stage", "finetune", "--patch", "64", "64", "32", "--psp-block-num", "0", "--val-cases", "1",
            "--spacing", "0", "--save-every", "1", "--no-progress", "--no-plots"]
    assert main([*args, "--data", str(data), "--steps", "1", "--out", str(out)]) == 0
    # the same folder spelled another way, and a synthetic-only setting that real data does not use
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--data", "./Task03/", "--steps", "2", "--synthetic-size", "32", "--resume",
                 "--out", "run"]) == 0
    assert load_checkpoint(out / "last.pt")["step"] == 2
    # a label changed under the same path: refused, naming it
    case = make_synthetic_case(999, size_xy=64)
    save_nifti(data / "labelsTr" / "liver_1.nii.gz", case.label, case.affine)
    capsys.readouterr()
    assert main([*args, "--data", str(data), "--steps", "3", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"the data in {data} is not what {out / 'last.pt'} was trained on (changed: labelsTr/liver_1.nii.gz)" in err


def test_a_resume_with_nothing_left_reports_the_checkpoint_step(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_tiny_args(out, steps=2)) == 0
    capsys.readouterr()
    assert main(_tiny_args(out, steps=1, extra=["--resume"])) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1], parse_constant=lambda c: pytest.fail(c))
    assert result["step"] == 2 and np.isfinite(result["loss"])
    assert "already at step 2 of 1: nothing to train" in captured.err
    _strict_json_lines(out / "metrics.jsonl")


def test_infer_patch_is_the_window_and_a_bad_one_is_refused_before_reading(trained, tmp_path, capsys):
    """--patch sets the sliding window (the one `ahnet-fast plan --infer` picks); a size the network
    cannot take is a clear error, before the volume is read or anything written."""
    model, ct, _ = trained
    dst = tmp_path / "seg.nii.gz"
    assert _infer(model, ct, dst, "--patch", "64", "64", "40") == 2
    err = capsys.readouterr().err
    assert "--patch 64 64 40" in err and "spatial axis 2 (slice)" in err and "Traceback" not in err
    assert not dst.exists()
    assert _infer(model, ct, dst, "--patch", "64", "64", "32") == 0
    assert nib.load(str(dst)).shape == nib.load(str(ct)).shape
