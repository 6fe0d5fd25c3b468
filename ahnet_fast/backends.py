"""Backend selection, in one place for every op.

A backend is one implementation family: ``reference`` (pure PyTorch, always available; the test
oracle), ``cpp`` (the compiled ops in csrc/, registered with TORCH_LIBRARY) and ``triton`` (GPU
kernels; on CPU tensors only under ``TRITON_INTERPRET=1``). ``auto`` picks, per call, the first
backend in the op's order of preference for that device that can run the call.

Which backend is requested, highest priority first: an explicit ``backend=`` argument (e.g. on a
module), the innermost ``with ahnet_fast.backend(name):`` block, the ``AHNET_FAST_BACKEND``
environment variable, then ``auto``. Forcing a backend that cannot run a call raises
:class:`BackendUnavailableError` with every reason, instead of silently running something else.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "reference", "cpp", "triton")
ENV_VAR = "AHNET_FAST_BACKEND"

# Stack of `with backend(...)` choices. A plain list (not a ContextVar) so that torch.compile can
# trace backend selection; it is process-wide, like torch's own global flags.
_stack: list[str] = []


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this call; the message lists why."""


def _validate(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def requested_backend(explicit: str | None = None) -> str:
    """The backend asked for: explicit argument, then context manager, then environment, then auto."""
    if explicit is not None:
        return _validate(explicit, "backend=")
    if _stack:
        return _stack[-1]
    env = os.environ.get(ENV_VAR)
    if env:
        return _validate(env.strip().lower(), ENV_VAR)
    return "auto"


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """``with ahnet_fast.backend("reference"): ...`` forces a backend for the ops called inside."""
    _stack.append(_validate(name, "ahnet_fast.backend"))
    try:
        yield
    finally:
        _stack.pop()


@dataclass(frozen=True)
class Implementation:
    """One backend of one op. ``not_supported_reasons(*args)`` returns why it cannot run a call
    (an empty list when it can), an idea borrowed from xformers' operator dispatch."""

    backend: str
    not_supported_reasons: Callable[..., list[str]]


def device_preference(device: torch.device) -> Sequence[str]:
    """Fastest-first order for ``auto`` on this device."""
    if device.type == "cuda":
        return ("triton", "cpp", "reference")
    return ("cpp", "reference")


def select(op: str, implementations: Sequence[Implementation], device: torch.device, args: tuple,
           explicit: str | None = None) -> str:
    """The backend that runs this call of ``op``: the requested one, or the best for ``auto``."""
    by_name = {impl.backend: impl for impl in implementations}
    wanted = requested_backend(explicit)
    if wanted == "auto":
        for name in device_preference(device):
            impl = by_name.get(name)
            if impl is not None and not impl.not_supported_reasons(*args):
                return name
        return "reference"
    impl = by_name.get(wanted)
    if impl is None:
        reasons = [f"{op} has no {wanted} implementation (it has: {', '.join(sorted(by_name))})"]
    else:
        reasons = impl.not_supported_reasons(*args)
    if reasons:
        raise BackendUnavailableError(f"backend {wanted!r} cannot run {op}: " + "; ".join(reasons))
    return wanted
