"""ahnet_fast: a MONAI-compatible 3D Anisotropic Hybrid Network (Liu et al., MICCAI 2018) on fused kernels."""
from ahnet_fast._extension import extension_available, load_extension

load_extension()  # registers torch.ops.ahnet_fast.*, or warns once that the reference path is used

from ahnet_fast.backends import BACKENDS, BackendUnavailableError, backend, fallback_report  # noqa: E402
from ahnet_fast.nn import AHNet, FCN, MCFCN, FocalLoss, PyramidVolumetricPooling  # noqa: E402
from ahnet_fast import memory  # noqa: E402  (also resolves AHNet(checkpoint="auto"))

__version__ = "0.1.0"
__all__ = [
    "AHNet",
    "FCN",
    "FocalLoss",
    "MCFCN",
    "PyramidVolumetricPooling",
    "BACKENDS",
    "BackendUnavailableError",
    "backend",
    "extension_available",
    "fallback_report",
]
