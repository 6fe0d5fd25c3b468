"""``ahnet-fast infer``: a trained checkpoint applied to a whole NIfTI volume.

The checkpoint carries the network description and the preprocessing it was trained with, so the
volume is resampled in-plane and windowed exactly as the training data were; the label map is mapped
back onto the input grid and written with the input's affine and header.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ahnet_fast._atomic import check_writable, remove_stale_temps
from ahnet_fast.data import (Case, Preprocessing, check_finite, load_nifti, preprocess, restore_inplane, save_niftis,
                             spacing_from_affine)
from ahnet_fast.data.nifti import _nifti_suffix
from ahnet_fast.training.checkpoint import load_checkpoint, nonfinite_tensors
from ahnet_fast.training.config import TrainConfig
from ahnet_fast.training.evaluate import predict_logits
from ahnet_fast.training.models import build_from_spec


def load_trained_model(path, device="cpu"):
    """(model in eval mode on ``device``, its TrainConfig) from a training checkpoint."""
    ckpt = load_checkpoint(path)
    if "model_spec" not in ckpt:
        raise ValueError(f"{path}: the checkpoint does not describe its network (no 'model_spec')")
    bad = nonfinite_tensors(ckpt["model"])
    if bad:
        raise ValueError(f"{path}: {len(bad)} weight tensor(s) hold NaN or infinite values ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}): the run that wrote it diverged; use an earlier checkpoint")
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_from_spec(ckpt["model_spec"], backend=cfg.backend)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def check_outputs(in_path, model_path, out_path, probabilities=None, *, overwrite: bool = False) -> None:
    """Every output checked before any work: a NIfTI name, not the input or the checkpoint, the two
    outputs different, an existing file only with ``overwrite``, and a folder this process can write."""
    outputs = [("output", Path(out_path))] + ([("--probabilities", Path(probabilities))] if probabilities else [])
    for what, path in outputs:
        if not _nifti_suffix(path):
            raise ValueError(f"{what} {path} must end in .nii or .nii.gz")
        for name, other in (("the input", Path(in_path)), ("the checkpoint", Path(model_path))):
            if _same_file(path, other):
                raise ValueError(f"{what} {path} is {name}: it would be replaced; choose another name")
    if len(outputs) == 2 and _same_file(outputs[0][1], outputs[1][1]):
        raise ValueError(f"the labels and --probabilities are the same file {out_path}")
    for what, path in outputs:
        check_writable(path, overwrite=overwrite, what=what)


def infer_file(model_path, in_path, out_path, *, overlap: float | None = None, window_batch: int = 1,
               amp: str = "off", device: str = "cpu", stitch: str = "auto", probabilities: str | None = None,
               progress: bool = True, overwrite: bool = False, replace_nonfinite: float | None = None) -> dict:
    """Segments ``in_path`` into ``out_path`` (uint8 labels); optionally writes the class
    probabilities (float32, classes on a 4th axis) to ``probabilities``. Returns a summary dict.

    Refused before any work: an output that is the input, an existing output without ``overwrite``,
    an output folder that cannot be written. Refused after reading: an input with NaN or infinite
    voxels (unless ``replace_nonfinite`` gives the value, in HU, to put there), a checkpoint with
    non-finite weights. The geometry (spacing) is the input's affine, as in training; the labels and
    the probabilities are written together or not at all."""
    if stitch not in ("auto", "device", "cpu"):
        raise ValueError(f"--stitch must be auto, device or cpu, got {stitch!r}")
    if amp not in ("off", "bf16", "fp16"):
        raise ValueError(f"--amp must be off, bf16 or fp16, got {amp!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to this torch")
    check_outputs(in_path, model_path, out_path, probabilities, overwrite=overwrite)
    for folder in {Path(out_path).parent} | ({Path(probabilities).parent} if probabilities else set()):
        remove_stale_temps(folder)
    t0 = time.perf_counter()
    model, cfg = load_trained_model(model_path, device)
    if cfg.task == "detection":  # one heat-map channel: its argmax would be an all-background label map
        raise ValueError(f"{model_path} is a detection checkpoint (a heat map per lesion); `infer` writes "
                         "segmentations. Detection inference (candidates CSV) is not in `infer` yet: use "
                         "ahnet_fast.training.evaluate.predict_heatmap and ahnet_fast.detection.find_peaks")
    image, affine, header = load_nifti(in_path)
    image = check_finite(image, in_path, replace_nonfinite)
    # the spacing from the affine, exactly as training reads it (load_case)
    case = Case(name=Path(in_path).name, image=image, label=None, spacing=spacing_from_affine(affine), affine=affine,
                header=header)
    prep = preprocess(case, Preprocessing(spacing_xy=cfg.spacing_xy, window=tuple(cfg.window)))
    output_device = {"auto": "auto", "device": None, "cpu": "cpu"}[stitch]
    logits = predict_logits(model, prep.image, cfg.patch, overlap=cfg.overlap if overlap is None else overlap,
                            window_batch=window_batch, amp=amp, device=torch.device(device),
                            output_device=output_device, progress=progress)
    # Probabilities, not labels, are brought back to the input grid (linear in-plane), then the
    # argmax: smoother boundaries than nearest-neighbour labels, and the written labels are exactly
    # the argmax of the written probabilities. In slabs of slices to bound the memory.
    probs_lowres = torch.softmax(logits.float(), 0).cpu().numpy()
    labels = np.empty(image.shape, dtype=np.uint8)
    probs_full = np.empty((*image.shape, cfg.num_classes), dtype=np.float32) if probabilities else None
    for z0 in range(0, image.shape[2], 16):
        slab = restore_inplane(probs_lowres[..., z0:z0 + 16], image.shape[:2], is_label=False)
        labels[..., z0:z0 + 16] = slab.argmax(0)
        if probs_full is not None:
            probs_full[..., z0:z0 + 16, :] = np.moveaxis(slab, 0, -1)
    save_niftis([(out_path, labels, affine, header)]
                + ([(probabilities, probs_full, affine, header)] if probabilities else []))
    counts = np.bincount(labels.ravel(), minlength=cfg.num_classes)
    return {"input": str(in_path), "output": str(out_path), "shape": tuple(image.shape),
            "seconds": time.perf_counter() - t0,
            "voxels": {name: int(n) for name, n in zip(cfg.class_names, counts)}}
