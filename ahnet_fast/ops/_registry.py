"""Helpers shared by the op modules: is a compiled kernel there for this device?

Availability is looked up once per op when its module is imported, and kept in a plain dict, so
that backend selection stays traceable by torch.compile (dynamo cannot trace the dispatcher query).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ahnet_fast._extension import extension_available, extension_error

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_compiled: dict[tuple[str, str], bool] = {}
_triton: bool | None = None


def note_compiled_kernels(qualname: str) -> None:
    """Records for which device types `ahnet_fast::<qualname>` has a compiled kernel."""
    for device_type, key in _DISPATCH_KEYS.items():
        _compiled[(qualname, device_type)] = extension_available() and \
            torch._C._dispatch_has_kernel_for_dispatch_key(f"ahnet_fast::{qualname}", key)


def cpp_kernel_reasons(qualname: str, device: torch.device) -> list[str]:
    """Why the compiled kernel `ahnet_fast::<qualname>` cannot run on `device` (empty if it can)."""
    if not extension_available():
        return [f"the compiled extension is not loaded ({extension_error()})"]
    if not _compiled.get((qualname, device.type), False):
        return [f"ahnet_fast::{qualname} has no compiled kernel for {device.type} tensors in this build"]
    return []


def triton_available() -> bool:
    """True when triton can be imported (looked up once)."""
    global _triton
    if _triton is None:
        _triton = importlib.util.find_spec("triton") is not None
    return _triton


KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def dtype_reasons(dtype: torch.dtype) -> list[str]:
    """Why the compiled and Triton kernels cannot take tensors of this dtype (empty if they can)."""
    return [] if dtype in KERNEL_DTYPES else [f"dtype {dtype} is not a floating type the kernels handle"]


def triton_reasons(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why the Triton kernels cannot run on tensors of this device and dtype (empty if they can)."""
    reasons = []
    if not triton_available():
        reasons.append("triton is not installed (pip install 'triton>=3.1')")
    elif device.type == "cpu" and not triton_interpreted():
        reasons.append("Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before "
                       "importing ahnet_fast")
    elif device.type not in ("cpu", "cuda"):
        reasons.append(f"the Triton kernels run on CUDA tensors, not {device.type}")
    if dtype == torch.bfloat16 and triton_interpreted():
        reasons.append("the Triton interpreter has no bfloat16")
    return reasons


def triton_interpreted() -> bool:
    """True when Triton kernels run in the interpreter (CPU tensors): TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET") == "1"



def register_compiled_pair(forward: str, backward: str, forward_fake, backward_fake, make_backward,
                           setup_context) -> None:
    """Fakes and autograd of a compiled forward op `ahnet_fast::<forward>` whose gradient is the
    compiled op `ahnet_fast::<backward>` (schemas in csrc/ops.cpp)."""
    note_compiled_kernels(forward)
    torch.library.register_fake(f"ahnet_fast::{forward}")(forward_fake)
    torch.library.register_fake(f"ahnet_fast::{backward}")(backward_fake)
    torch.library.register_autograd(f"ahnet_fast::{forward}", make_backward(getattr(torch.ops.ahnet_fast, backward)),
                                    setup_context=setup_context)


def register_triton_pair(forward_op, backward_op, forward_fake, backward_fake, make_backward, setup_context):
    """The same for a pair of Python custom ops (torch.library.custom_op objects: the Triton kernels,
    and the ops composed in Python such as bn_relu_conv and dense_block); returns their OpOverloads
    (forward, backward)."""
    backward_op.register_fake(backward_fake)
    forward_op.register_fake(forward_fake)
    backward_overload = getattr(torch.ops.ahnet_fast, backward_op._name).default
    forward_op.register_autograd(make_backward(backward_overload), setup_context=setup_context)
    return getattr(torch.ops.ahnet_fast, forward_op._name).default, backward_overload
