"""``ahnet-fast infer``: a trained checkpoint applied to whole volumes.

The checkpoint carries the network description and the preprocessing it was trained with, so a
volume is resampled in-plane and scaled exactly as the training data were. A segmentation
checkpoint's label map is mapped back onto the input grid and written with the input's affine and
header (:func:`infer_file`); a detection checkpoint's heat map gives lesion candidates in the
volume's world millimetres, written as a CSV that ``ahnet-fast froc`` scores (:func:`detect_volumes`).
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


def checkpoint_task(path) -> str:
    """The task ("segmentation" or "detection") a training checkpoint was trained for."""
    # memory-mapped: the weights and optimizer state are not read for the few bytes of config
    return TrainConfig.from_dict(load_checkpoint(path, mmap=True)["config"]).task


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
               progress: bool = True, overwrite: bool = False, replace_nonfinite: float | None = None,
               patch: tuple[int, int, int] | None = None) -> dict:
    """Segments ``in_path`` into ``out_path`` (uint8 labels); optionally writes the class
    probabilities (float32, classes on a 4th axis) to ``probabilities``. Returns a summary dict.
    ``patch``: the sliding window (H, W, D), by default the checkpoint's training patch; it must be a
    size the network takes (checked before the volume is read).

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
        raise ValueError(f"{model_path} is a detection checkpoint (a heat map per lesion), not a segmentation one: "
                         "its candidates come from detect_volumes (ahnet-fast infer writes them as a .csv)")
    window = cfg.patch if patch is None else _check_patch(model, patch)
    image, affine, header = load_nifti(in_path)
    image = check_finite(image, in_path, replace_nonfinite)
    # the spacing from the affine, exactly as training reads it (load_case)
    case = Case(name=Path(in_path).name, image=image, label=None, spacing=spacing_from_affine(affine), affine=affine,
                header=header)
    prep = preprocess(case, Preprocessing(spacing_xy=cfg.spacing_xy, window=tuple(cfg.window)))
    output_device = {"auto": "auto", "device": None, "cpu": "cpu"}[stitch]
    logits = predict_logits(model, prep.image, window, overlap=cfg.overlap if overlap is None else overlap,
                            window_batch=window_batch, amp=amp, device=torch.device(device),
                            output_device=output_device, progress=progress)
    # Probabilities, not labels, are brought back to the input grid (linear in-plane), then the
    # argmax: smoother boundaries than nearest-neighbour labels, and the written labels are exactly
    # the argmax of the written probabilities. In slabs of slices to bound the memory (the softmax
    # too: a second volume of class probabilities would be as large as the logits).
    labels = np.empty(image.shape, dtype=np.uint8)
    probs_full = np.empty((*image.shape, cfg.num_classes), dtype=np.float32) if probabilities else None
    for z0 in range(0, image.shape[2], 16):
        probs_lowres = torch.softmax(logits[..., z0:z0 + 16].float(), 0).cpu().numpy()
        slab = restore_inplane(probs_lowres, image.shape[:2], is_label=False)
        labels[..., z0:z0 + 16] = slab.argmax(0)
        if probs_full is not None:
            probs_full[..., z0:z0 + 16, :] = np.moveaxis(slab, 0, -1)
    save_niftis([(out_path, labels, affine, header)]
                + ([(probabilities, probs_full, affine, header)] if probabilities else []))
    counts = np.bincount(labels.ravel(), minlength=cfg.num_classes)
    return {"input": str(in_path), "output": str(out_path), "shape": tuple(image.shape),
            "seconds": time.perf_counter() - t0,
            "voxels": {name: int(n) for name, n in zip(cfg.class_names, counts)}}


def _check_patch(model, patch) -> tuple[int, int, int]:
    """``patch`` as a window the checkpoint's network takes (AH-Net's size rule), else ValueError."""
    from ahnet_fast.nn.shapes import check_ahnet_input

    patch = tuple(int(p) for p in patch)
    if len(patch) != 3 or any(p < 1 for p in patch):
        raise ValueError(f"--patch takes three positive sizes H W D, got {patch}")
    if getattr(model, "spatial_dims", None) == 3 and hasattr(model, "psp_block_num"):
        try:
            check_ahnet_input(torch.empty((1, model.in_channels, *patch), device="meta"), 3, model.in_channels,
                              model.psp_block_num, model.upsample_mode)
        except ValueError as exc:
            raise ValueError(f"--patch {' '.join(map(str, patch))}: {exc}") from None
    return patch


def detection_preparation(cfg: TrainConfig) -> tuple[float | None, bool]:
    """(in-plane spacing in mm, whether to scale by percentiles) with which a detection checkpoint's
    training volumes were prepared: the synthetic DBT set is made at its working spacing with
    intensities already in [0, 1]; real DBT folders are resampled to ``spacing_xy`` and scaled."""
    from ahnet_fast.data.dbt import DBT_SPACING_XY

    return (DBT_SPACING_XY, False) if cfg.data == "synthetic" else (cfg.spacing_xy, True)


def detect_volumes(model_path, inputs, out_csv, *, file_paths=None, view: str | None = None,
                   radius_mm: float | None = None, threshold: float | None = None, max_candidates: int = 100,
                   overlap: float | None = None, window_batch: int = 1, amp: str = "off", device: str = "cpu",
                   progress: bool = True, overwrite: bool = False) -> dict:
    """Lesion candidates of every volume in ``inputs`` (one volume file, or a DBT folder as
    :func:`ahnet_fast.data.dbt_files.discover_dbt` reads it, with Duke's ``file_paths`` table if given)
    written to ``out_csv`` (case, x_mm, y_mm, z_mm, score: world millimetres, see
    :mod:`ahnet_fast.data.dbt_files`), found by :func:`ahnet_fast.detection.find_peaks` on the
    whole-volume heat map with the checkpoint's radius and threshold unless given. ``view`` (lcc, rmlo,
    ...) orients a single DICOM file as Duke's boxes are drawn. Returns a summary dict.

    Refused before any work: an output that is not a .csv, that is the checkpoint or an input, that
    exists (without ``overwrite``), or whose folder cannot be written; a segmentation checkpoint."""
    from tqdm.auto import tqdm

    from ahnet_fast.data.dbt_files import DbtVolume, discover_dbt, prepare_volume, read_volume, volume_name
    from ahnet_fast.detection import find_peaks, write_candidates
    from ahnet_fast.training.evaluate import predict_heatmap

    if amp not in ("off", "bf16", "fp16"):
        raise ValueError(f"--amp must be off, bf16 or fp16, got {amp!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to this torch")
    out_csv, inputs = Path(out_csv), Path(inputs)
    if out_csv.suffix.lower() != ".csv":
        raise ValueError(f"output {out_csv}: detection writes candidates as a CSV file (name it .csv)")
    if not inputs.exists():
        raise ValueError(f"input {inputs}: no such file or folder")
    for name, other in (("the checkpoint", Path(model_path)), ("the input", inputs)):
        if _same_file(out_csv, other):
            raise ValueError(f"output {out_csv} is {name}: it would be replaced; choose another name")
    if inputs.is_dir():
        volumes = discover_dbt(inputs, None, file_paths)
        if view is not None:
            raise ValueError("--view orients one DICOM file; a folder's views come from its --file-paths table")
    else:
        if file_paths is not None:
            raise ValueError("--file-paths lists the volumes of a folder: give the folder as the input")
        try:
            name = volume_name(inputs)
        except ValueError:
            raise ValueError(f"input {inputs}: not a volume this reader knows (.nii.gz, .nii or .dcm) nor a folder") \
                from None
        volumes = [DbtVolume(name, inputs, view.lower() if view else None)]
    for v in volumes:
        if _same_file(out_csv, v.path):
            raise ValueError(f"output {out_csv} is the input volume {v.path}: choose another name")
    check_writable(out_csv, overwrite=overwrite, what="output")
    remove_stale_temps(out_csv.parent)
    if max_candidates < 1:
        raise ValueError(f"--max-candidates must be >= 1, got {max_candidates}")
    t0 = time.perf_counter()
    model, cfg = load_trained_model(model_path, device)
    if cfg.task != "detection":
        raise ValueError(f"{model_path} is a {cfg.task} checkpoint: detection needs one trained with --task detection")
    radius_mm = cfg.det_radius_mm if radius_mm is None else radius_mm
    threshold = cfg.det_threshold if threshold is None else threshold
    if not (radius_mm > 0 and 0 <= threshold < 1):
        raise ValueError(f"--det-radius-mm must be positive and --det-threshold in [0, 1), got {radius_mm} and "
                         f"{threshold}")
    spacing_xy, normalise = detection_preparation(cfg)
    candidates = []
    bar = tqdm(volumes, desc="detecting", unit="volume", disable=not progress or len(volumes) < 2)
    for v in bar:
        image, affine = read_volume(v.path, v.view)
        image, affine = prepare_volume(image, affine, spacing_xy, normalise=normalise)
        heat = predict_heatmap(model, image, cfg.patch, overlap=cfg.overlap if overlap is None else overlap,
                               window_batch=window_batch, amp=amp, device=torch.device(device),
                               progress=progress and len(volumes) == 1)
        candidates += find_peaks(heat, affine, radius_mm=radius_mm, threshold=threshold,
                                 max_candidates=max_candidates, case=v.name)
    write_candidates(out_csv, candidates)
    return {"inputs": str(inputs), "output": str(out_csv), "volumes": len(volumes), "candidates": len(candidates),
            "radius_mm": radius_mm, "threshold": threshold, "seconds": time.perf_counter() - t0}
