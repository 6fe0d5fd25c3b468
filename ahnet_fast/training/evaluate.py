"""Whole-volume prediction and held-out Dice, shared by training (evaluation) and ``ahnet-fast infer``."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ahnet_fast.inference import sliding_window_inference
from ahnet_fast.metrics import DiceTracker
from ahnet_fast.nn import FCN

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def slice_stacks(volume: torch.Tensor) -> torch.Tensor:
    """(X, Y, Z) -> (Z, 3, X, Y): each slice with its neighbours (z-1, z, z+1) as channels, the edge
    slices repeated: the 2D network's input for every slice of a volume."""
    z = volume.shape[-1]
    idx = torch.arange(z)
    neighbours = torch.stack([(idx - 1).clamp(0, z - 1), idx, (idx + 1).clamp(0, z - 1)], dim=1)  # (Z, 3)
    return volume.permute(2, 0, 1)[neighbours]  # (Z, 3, X, Y)


@torch.no_grad()
def predict_logits(model: nn.Module, image: np.ndarray | torch.Tensor, window: tuple[int, ...], *,
                   overlap: float = 0.25, window_batch: int = 1, amp: str = "off", device=None,
                   output_device=None, progress: bool = False) -> torch.Tensor:
    """Blended logits (C, X, Y, Z), float32, for a preprocessed (X, Y, Z) volume.

    A 3D network (AHNet) runs over 3D windows of size ``window``; a 2D network (MCFCN) over every
    slice with its two neighbours, in in-plane windows of ``window[:2]``. The model's train/eval
    state is restored afterwards."""
    vol = torch.as_tensor(np.asarray(image, dtype=np.float32) if not isinstance(image, torch.Tensor) else image)
    vol = vol.float()
    if vol.dim() != 3:
        raise ValueError(f"predict: expected an (X, Y, Z) volume, got shape {tuple(vol.shape)}")
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, FCN):
            stacks = slice_stacks(vol)  # (Z, 3, X, Y)
            logits = sliding_window_inference(stacks, model, tuple(window[:2]), overlap=overlap,
                                              window_batch=window_batch, amp=AMP_DTYPES[amp], device=device,
                                              output_device=output_device, progress=progress)
            return logits.permute(1, 2, 3, 0).contiguous()  # (C, X, Y, Z)
        logits = sliding_window_inference(vol[None, None], model, tuple(window), overlap=overlap,
                                          window_batch=window_batch, amp=AMP_DTYPES[amp], device=device,
                                          output_device=output_device, progress=progress)
        return logits[0]
    finally:
        model.train(was_training)


# A detection network's output is read as a logit offset by this prior, log(0.01 / 0.99): an untrained
# network (output ~0) then predicts a heat of 0.01 everywhere instead of 0.5. The heat map is ~0 in all
# but a few percent of the voxels, and starting at 0.5 the first hundreds of steps only push the
# background down (measured: a 3D stage whose loss starts at 0.93 had learnt nothing in 150 steps).
# The same prior as a detector's initial output bias (RetinaNet's); AH-Net's output layers have no bias.
HEATMAP_PRIOR_LOGIT = float(np.log(0.01 / 0.99))


def predict_heatmap(model: nn.Module, image, window, **kw) -> np.ndarray:
    """The detection network's heat map (X, Y, Z), float32 in [0, 1]: the sigmoid of its blended output
    plus :data:`HEATMAP_PRIOR_LOGIT`."""
    return torch.sigmoid(predict_logits(model, image, window, **kw)[0] + HEATMAP_PRIOR_LOGIT).cpu().numpy()


def evaluate_detection(model: nn.Module, cases, window, *, radius_mm: float, threshold: float, overlap=0.25,
                       window_batch=1, amp="off", device=None, progress=False, max_candidates: int = 100,
                       chance_seed: int = 0):
    """(FROC of the held-out ``cases``' heat-map peaks, the FROC of as many chance candidates
    (:func:`chance_candidates`, drawn with ``chance_seed``), the candidates). Each case is a
    :class:`ahnet_fast.data.dbt.DetectionCase` (its ``lesions`` are the truth)."""
    from ahnet_fast.detection import find_peaks, froc

    candidates = []
    for case in cases:
        heat = predict_heatmap(model, case.image, window, overlap=overlap, window_batch=window_batch, amp=amp,
                               device=device, progress=progress)
        candidates += find_peaks(heat, case.affine, radius_mm=radius_mm, threshold=threshold,
                                 max_candidates=max_candidates, case=case.name)
    lesions, names = [les for c in cases for les in c.lesions], [c.name for c in cases]
    chance = froc(chance_candidates(cases, candidates, seed=chance_seed), lesions, names)
    return froc(candidates, lesions, names), chance, candidates


def chance_candidates(cases, candidates, seed: int = 0):
    """The chance level of a FROC: as many candidates per volume as ``candidates`` has, with the same
    scores, at uniformly random voxels inside the imaged object (image > 0.05)."""
    from ahnet_fast.detection import Candidate

    rng = np.random.default_rng(seed)
    out = []
    for case in cases:
        mine = [c for c in candidates if c.case == case.name]
        inside = np.flatnonzero(case.image.reshape(-1) > 0.05)
        if not mine or inside.size == 0:
            continue
        for c, flat in zip(mine, rng.choice(inside, size=len(mine))):
            v = np.unravel_index(int(flat), case.image.shape)
            out.append(Candidate(case.name, tuple(float(x) for x in (case.affine @ np.r_[v, 1.0])[:3]), c.score))
    return out


def evaluate_cases(model: nn.Module, cases, window, *, num_classes: int, class_names, overlap=0.25,
                   window_batch=1, amp="off", device=None, progress=False) -> tuple[DiceTracker, list[np.ndarray]]:
    """Dice per class, per case and global on held-out cases; also returns the predicted label maps."""
    tracker = DiceTracker(num_classes, class_names=list(class_names))
    preds = []
    for case in cases:
        logits = predict_logits(model, case.image, window, overlap=overlap, window_batch=window_batch, amp=amp,
                                device=device, progress=progress)
        pred = logits.argmax(0).to(torch.uint8).cpu().numpy()
        tracker.update(pred, case.label, case=case.name)
        preds.append(pred)
    return tracker, preds
