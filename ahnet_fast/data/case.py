"""The in-memory form of one CT case, shared by the loaders, the preprocessing and the samplers.

Volumes are kept in NIfTI voxel order (X, Y, Z) with Z the slice axis, the coarse one, because that
is how LiTS / Decathlon files are stored and how AH-Net's anisotropic kernels (k x k x 1 in-plane,
1 x 1 x k across slices) expect them: keeping the file's order means predictions can be written back
with the input's affine and header unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Case", "spacing_from_affine"]


def is_valid_affine(affine) -> bool:
    """A finite 4x4 voxel-to-world matrix whose 3x3 part is invertible."""
    affine = np.asarray(affine, dtype=np.float64)
    return affine.shape == (4, 4) and bool(np.all(np.isfinite(affine))) and abs(np.linalg.det(affine[:3, :3])) >= 1e-12


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along X, Y, Z: the lengths of the affine's first three columns.

    Read from the affine rather than the header's pixdim so that the spacing can never disagree
    with the geometry that is written back (preprocessing updates the affine's columns).
    """
    affine = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))


@dataclass
class Case:
    """One volume with its (optional) label map and geometry.

    ``image`` is float32 (X, Y, Z): Hounsfield units as loaded, [0, 1] after :func:`preprocess`.
    ``label`` is uint8 (X, Y, Z) with 0 background, 1 liver, 2 lesion, or None for unlabelled data.
    ``spacing`` is the voxel size in mm, ``affine`` the 4x4 voxel-to-world (RAS+ mm) matrix, and
    ``header`` the nibabel header of the source file (None for synthetic cases), kept so that
    outputs can be written with the input's header.
    """

    name: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]
    affine: np.ndarray
    header: object | None = None

    def __post_init__(self) -> None:
        # Checked here, once, so that every consumer (preprocessing, samplers, inference) can rely
        # on the shapes instead of failing later with an indexing error far from the cause.
        if not isinstance(self.image, np.ndarray) or self.image.ndim != 3:
            shape = getattr(self.image, "shape", type(self.image).__name__)
            raise ValueError(f"case {self.name!r}: image must be a 3D (X, Y, Z) numpy array, got {shape}")
        if self.label is not None:
            if not isinstance(self.label, np.ndarray) or self.label.shape != self.image.shape:
                shape = getattr(self.label, "shape", type(self.label).__name__)
                raise ValueError(
                    f"case {self.name!r}: label shape {shape} does not match image shape {self.image.shape}"
                )
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"case {self.name!r}: affine must be 4x4, got shape {affine.shape}")
        self.affine = affine
        if len(self.spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in self.spacing):
            raise ValueError(f"case {self.name!r}: spacing must be three positive numbers (mm), got {self.spacing}")
        self.spacing = tuple(float(s) for s in self.spacing)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(X, Y, Z) voxel counts."""
        return tuple(int(s) for s in self.image.shape)
