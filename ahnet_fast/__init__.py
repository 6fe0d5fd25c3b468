"""ahnet_fast: a MONAI-compatible 3D Anisotropic Hybrid Network (Liu et al., MICCAI 2018) on fused kernels."""
from ahnet_fast._extension import extension_available, extension_error, extension_origin, load_extension

# registers torch.ops.ahnet_fast.* (building the kernels on first use where the install has none), or
# warns once that the reference path is used
load_extension()

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
    "extension_error",
    "extension_origin",
    "fallback_report",
]
