"""What a Triton launch that cannot run raises, importable without triton.

A kernel can fail to compile or launch on a user's machine for reasons no CPU test sees: a Triton
version that lowers it differently, a GPU without the instructions it needs, a compiler bug, a grid
larger than CUDA allows. :func:`ahnet_fast.kernels.triton._launch.launch` turns every such failure
into :class:`TritonKernelError`, naming the kernel, so that the op layer can run the op's
ATen/cuDNN composition instead (or raise, when Triton was forced). A variant that failed once is
remembered and not compiled again in this process.

Tests inject a failure with :func:`inject_failure` or ``AHNET_FAST_INJECT_TRITON_FAILURE=<kernel
name>[,...]`` (``*`` for every kernel).
"""
from __future__ import annotations

import os

ENV_INJECT = "AHNET_FAST_INJECT_TRITON_FAILURE"

_injected: set[str] = set()
_failed: dict[tuple, str] = {}


class TritonKernelError(RuntimeError):
    """A Triton kernel could not be compiled or launched."""

    def __init__(self, kernel: str, cause: str):
        super().__init__(f"Triton kernel {kernel} cannot run: {cause}")
        self.kernel = kernel
        self.cause = cause


class InjectedFailure(RuntimeError):
    """The failure :func:`inject_failure` asks for, raised where Triton would raise a compile error."""


def inject_failure(*kernels: str) -> None:
    """Make launches of these kernels (function names, e.g. ``conv_fwd_kernel``; ``*`` for all) fail
    as a compile error would, until :func:`clear_injected_failures`."""
    _injected.update(kernels)


def clear_injected_failures() -> None:
    """Forget injected failures and every remembered failed variant."""
    _injected.clear()
    _failed.clear()


def injected(kernel: str) -> bool:
    env = {k.strip() for k in os.environ.get(ENV_INJECT, "").split(",") if k.strip()}
    names = _injected | env
    return kernel in names or "*" in names


def remembered_failure(key: tuple) -> str | None:
    return _failed.get(key)


def any_remembered() -> bool:
    return bool(_failed)


def remember_failure(key: tuple, cause: str) -> None:
    _failed[key] = cause
