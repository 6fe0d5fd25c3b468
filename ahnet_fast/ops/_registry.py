"""Helpers shared by the op modules: is a compiled kernel there for this device?"""
from __future__ import annotations

import torch

from ahnet_fast._extension import extension_available, extension_error

_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


def cpp_kernel_reasons(qualname: str, device: torch.device) -> list[str]:
    """Why the compiled kernel `ahnet_fast::<qualname>` cannot run on `device` (empty if it can)."""
    if not extension_available():
        return [f"the compiled extension is not loaded ({extension_error()})"]
    key = _DISPATCH_KEY.get(device.type)
    if key is None or not torch._C._dispatch_has_kernel_for_dispatch_key(f"ahnet_fast::{qualname}", key):
        return [f"ahnet_fast::{qualname} has no compiled kernel for {device.type} tensors in this build"]
    return []
