"""Helpers shared by the op modules: is a compiled kernel there for this device?

Availability is looked up once per op when its module is imported, and kept in a plain dict, so
that backend selection stays traceable by torch.compile (dynamo cannot trace the dispatcher query).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import torch

from ahnet_fast import _scratch as scratch, backends
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


# The Triton versions every kernel is compiled against (scripts/compile_matrix.sh): those that
# torch 2.9 to 2.14 bring. A newer Triton is tried (a failure falls back at run time); an older one
# is not used: its lowering differs enough (tl.dot's minimum sizes, register use) to fail or spill.
OLDEST_TRITON = (3, 5)
_triton_version: tuple[int, int] | None = None


def triton_available() -> bool:
    """True when triton can be imported (looked up once)."""
    global _triton
    if _triton is None:
        _triton = importlib.util.find_spec("triton") is not None
    return _triton


def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton, read from its package metadata (not by importing it)."""
    global _triton_version
    if _triton_version is None:
        try:
            text = importlib.metadata.version("triton")
        except importlib.metadata.PackageNotFoundError:
            import triton

            text = triton.__version__
        parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in text.split(".")[:2]]
        _triton_version = (parts[0], parts[1] if len(parts) > 1 else 0)
    return _triton_version


KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def dtype_reasons(dtype: torch.dtype) -> list[str]:
    """Why the compiled and Triton kernels cannot take tensors of this dtype (empty if they can)."""
    return [] if dtype in KERNEL_DTYPES else [f"dtype {dtype} is not a floating type the kernels handle"]


def triton_reasons(device: torch.device, dtype: torch.dtype, *, interpreter_bf16: bool = False) -> list[str]:
    """Why the Triton kernels cannot run on tensors of this device and dtype (empty if they can)."""
    reasons = []
    if not triton_available():
        reasons.append("triton is not installed (it comes with CUDA builds of torch >= 2.9)")
    elif triton_version() < OLDEST_TRITON:
        reasons.append(f"Triton {'.'.join(map(str, triton_version()))} is older than "
                       f"{'.'.join(map(str, OLDEST_TRITON))}, the oldest the kernels are compiled against")
    elif device.type == "cpu" and not triton_interpreted():
        reasons.append("Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before "
                       "importing ahnet_fast")
    elif device.type not in ("cpu", "cuda"):
        reasons.append(f"the Triton kernels run on CUDA tensors, not {device.type}")
    elif device.type == "cuda" and cuda_capability(device) < (8, 0):
        major, minor = cuda_capability(device)
        reasons.append(f"the GPU is sm_{major}{minor}; the Triton kernels need sm_80 or newer (bf16 dots, "
                       f"the tiles they are compiled for)")
    if dtype == torch.float64 and device.type == "cuda":
        reasons.append("float64 runs on ATen/cuDNN on a GPU: the kernels are compiled for fp32 (TF32), bf16 "
                       "and fp16 there (float64 Triton runs in the interpreter, for the tests)")
    # The interpreter keeps bf16 as raw 16-bit integers: kernels that only convert bf16 to fp32 and
    # back run correctly there (interpreter_bf16), those with bf16 dots, constants or comparisons do not
    if dtype == torch.bfloat16 and triton_interpreted() and not interpreter_bf16:
        reasons.append("the Triton interpreter computes bfloat16 dots, constants and comparisons on raw bits")
    return reasons


def gpu_composition_reasons(device: torch.device) -> list[str]:
    """Why the ``triton`` entry of an op without a Triton kernel (its GPU path is an ATen/cuDNN
    composition) cannot run on ``device``: only the device matters, not Triton or the dtype."""
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
        return []
    if device.type == "cpu":
        return ["the triton backend is the GPU path: CUDA tensors (CPU tensors only with TRITON_INTERPRET=1, "
                "for the tests)"]
    return [f"the triton backend runs on CUDA tensors, not {device.type}"]


def cpu_reasons(device: torch.device) -> list[str]:
    """Why the ``cpp`` entry of an op whose CPU path is an ATen composition cannot run on ``device``."""
    return [] if device.type == "cpu" else [f"the cpp backend is the CPU path; this tensor is on {device.type}"]


_capabilities: dict[int, tuple[int, int]] = {}


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of a CUDA device (looked up once per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capabilities:
        _capabilities[index] = tuple(torch.cuda.get_device_capability(index))
    return _capabilities[index]


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
    inner = make_backward(backward_overload)

    # The backward runs under the choices in force at the forward, which has returned by then: its
    # Triton launches fall back or raise as the forward's did (a forced Triton stays forced), and
    # it keeps or frees scratch buffers as the forward's caller asked (scratch.push_keep).
    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.triton_strict = backends.triton_strict()
        ctx.scratch_keep = scratch.keeping()

    def backward(ctx, *grads):
        scratch.push_keep(ctx.scratch_keep)
        try:
            with backends.triton_strictness(ctx.triton_strict):
                return inner(ctx, *grads)
        finally:
            scratch.pop_keep()

    forward_op.register_autograd(backward, setup_context=setup)
    return getattr(torch.ops.ahnet_fast, forward_op._name).default, backward_overload


# Ops defined from Python beside the compiled ones (a fragment of the same namespace); kept alive here.
_SCRIPT_LIBRARY = torch.library.Library("ahnet_fast", "FRAGMENT")


def define_script_entry(name: str, schema: str, fn) -> None:
    """``ahnet_fast::<name><schema>``: one dispatcher op running ``fn``, an op's Python function
    (its backend dispatch included), registered as a CompositeImplicitAutograd kernel.

    TorchScript holds a call to a registered op but not the Python around it: these entries let a
    scripted module call the same dispatch, and so the same kernels, as the eager module, and get
    the same numbers. CompositeImplicitAutograd: autograd records what ``fn`` runs (the fused ops'
    own autograd), so the entry needs no formula of its own. The entries are registered on import of
    ahnet_fast, which a process loading such a scripted archive must do first."""
    _SCRIPT_LIBRARY.define(name + schema)
    _SCRIPT_LIBRARY.impl(name, fn, "CompositeImplicitAutograd")
