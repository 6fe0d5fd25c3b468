"""Data for training and evaluating AH-Net on liver CT: cases, NIfTI I/O and dataset discovery
(Medical Segmentation Decathlon Task03 and LiTS layouts), a synthetic abdominal CT phantom,
preprocessing (in-plane resampling, HU windowing) and deterministic, DDP-shardable samplers; for the
detection task, synthetic breast tomosynthesis volumes (:mod:`ahnet_fast.data.dbt`) and real DBT
folders, NIfTI or DICOM with a CSV of lesion boxes, Duke BCS-DBT's layout included
(:mod:`ahnet_fast.data.dbt_files`).

Volumes are (X, Y, Z) numpy arrays in NIfTI voxel order, Z the slice axis; labels 0 background,
1 liver, 2 lesion.
"""
from ahnet_fast.data.case import Case, spacing_from_affine
from ahnet_fast.data.nifti import (CasePaths, GeometryWarning, check_finite, discover_cases, load_case, load_nifti,
                                   save_nifti, save_niftis)
from ahnet_fast.data.preprocess import Preprocessing, preprocess, resampled_shape, restore_inplane, window_scale
from ahnet_fast.data.sampling import PatchLocation, PatchSampler, SliceSampler
from ahnet_fast.data.synthetic import derive_case_seed, make_synthetic_case, synthetic_cases

__all__ = [
    "Case",
    "CasePaths",
    "GeometryWarning",
    "PatchLocation",
    "PatchSampler",
    "Preprocessing",
    "SliceSampler",
    "check_finite",
    "derive_case_seed",
    "discover_cases",
    "load_case",
    "load_nifti",
    "make_synthetic_case",
    "preprocess",
    "resampled_shape",
    "restore_inplane",
    "save_nifti",
    "save_niftis",
    "spacing_from_affine",
    "synthetic_cases",
    "window_scale",
]
