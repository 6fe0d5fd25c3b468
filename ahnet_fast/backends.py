"""Backend selection, in one place for every op.

A backend is one implementation family: ``reference`` (pure PyTorch, always available; the test
oracle, with the arithmetic of the MONAI modules it replaces), ``cpp`` (the CPU path: the compiled
ops in csrc/, registered with TORCH_LIBRARY, and the ATen compositions measured faster than the
reference on a CPU) and ``triton`` (the GPU path: the Triton kernels, and where an op has none,
the ATen/cuDNN composition its table names; on CPU tensors only under ``TRITON_INTERPRET=1``).
``auto`` picks, per call, the first backend in the op's order of preference for that device that
can run the call and is not known to be slower for it.

Every op declares its implementations once, in its own module under ``ahnet_fast/ops/``, as a
table of :class:`Implementation` registered here (:func:`register`; :func:`registered` lists
them all); nothing above ``ops`` decides how an op runs.

Which backend is requested, highest priority first: an explicit ``backend=`` argument (e.g. on a
module), the innermost ``with ahnet_fast.backend(name):`` block, the ``AHNET_FAST_BACKEND``
environment variable, then ``auto``. Forcing a backend that cannot run a call raises
:class:`BackendUnavailableError` with every reason, instead of silently running something else.

A Triton kernel that fails to compile or launch at run time (a Triton version, GPU or compiler it
was never checked on) does not end the run under ``auto``: the op runs its ATen/cuDNN composition
instead, one warning names the kernel and the error, and :func:`fallback_report` lists every such
fallback. Forced (``backend="triton"``, ``with backend("triton")`` or the environment variable), the
failure raises :class:`BackendUnavailableError`.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ahnet_fast.kernels.errors import TritonKernelError

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


def check_backend_name(name: str | None, where: str = "backend=") -> str | None:
    """``name`` if it is None or one of :data:`BACKENDS`, else ValueError naming the choices."""
    return name if name is None else _validate(name, where)


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
    (an empty list when it can), an idea borrowed from xformers' operator dispatch.
    ``slower_reasons(*args)``, where given, says why ``auto`` should pass it over for a call it
    can run (measured slower there); a forced backend ignores it."""

    backend: str
    not_supported_reasons: Callable[..., list[str]]
    slower_reasons: Callable[..., list[str]] | None = None
    runs: str = ""  # what runs, in words (for the docs and explain())


_tables: dict[str, tuple[Implementation, ...]] = {}


def register(op: str, implementations: Sequence[Implementation]) -> tuple[Implementation, ...]:
    """Declares ``op``'s implementation table (once, where the op is defined); returns it."""
    table = tuple(implementations)
    names = [impl.backend for impl in table]
    if "reference" not in names or len(set(names)) != len(names) or not set(names) <= set(BACKENDS[1:]):
        raise ValueError(f"{op}: an implementation table needs one 'reference' and distinct backends out of "
                         f"{BACKENDS[1:]}, got {names}")
    _tables[op] = table
    return table


def registered() -> dict[str, tuple[Implementation, ...]]:
    """Every op's implementation table (op name -> implementations), as registered."""
    return dict(_tables)


def explain(op: str, device: torch.device, *args, explicit: str | None = None) -> dict:
    """For one call of ``op``: the backend that would run it and, for every implementation, why
    it cannot or why ``auto`` passes it over (empty lists where neither)."""
    table = _tables[op]
    out = {"op": op, "requested": requested_backend(explicit), "implementations": {}}
    for impl in table:
        out["implementations"][impl.backend] = {
            "runs": impl.runs,
            "not_supported": impl.not_supported_reasons(*args),
            "slower": impl.slower_reasons(*args) if impl.slower_reasons is not None else [],
        }
    try:
        out["chosen"] = _select(op, table, device, args, explicit)
    except BackendUnavailableError as exc:
        out["chosen"], out["error"] = None, str(exc)
    return out


def device_preference(device: torch.device) -> Sequence[str]:
    """Fastest-first order for ``auto`` on this device."""
    if device.type == "cuda":
        return ("triton", "cpp", "reference")
    return ("cpp", "reference")


# The tallies of the open recording() blocks, innermost last. Plain module state (not a ContextVar)
# so that torch.compile traces through the check.
_record: list[dict[str, dict[str, int]]] = []


@contextlib.contextmanager
def recording() -> Iterator[dict[str, dict[str, int]]]:
    """Within the block, counts which backend ran each op call: yields {op: {backend: calls}}
    (filled as the block runs; a Triton failure's fallback counts as ``"<backend> after triton
    failed"``). The benchmarks store it with every measurement: the backend that actually ran."""
    counts: dict[str, dict[str, int]] = {}
    _record.append(counts)
    try:
        yield counts
    finally:  # by identity: an enclosing block's tally may be equal to this one
        del _record[next(i for i, c in enumerate(_record) if c is counts)]


def _note(op: str, name: str) -> None:
    for counts in _record:
        per_op = counts.setdefault(op, {})
        per_op[name] = per_op.get(name, 0) + 1


def select(op: str, implementations: Sequence[Implementation], device: torch.device, args: tuple,
           explicit: str | None = None) -> str:
    """The backend that runs this call of ``op``: the requested one, or the best for ``auto``."""
    chosen = _select(op, implementations, device, args, explicit)
    if _record:
        _note(op, chosen)
    return chosen


def _select(op: str, implementations: Sequence[Implementation], device: torch.device, args: tuple,
            explicit: str | None = None) -> str:
    by_name = {impl.backend: impl for impl in implementations}
    wanted = requested_backend(explicit)
    if wanted == "auto":
        return _auto(implementations, device, args)
    impl = by_name.get(wanted)
    if impl is None:
        reasons = [f"{op} has no {wanted} implementation (it has: {', '.join(sorted(by_name))})"]
    else:
        reasons = impl.not_supported_reasons(*args)
    if reasons:
        raise BackendUnavailableError(f"backend {wanted!r} cannot run {op}: " + "; ".join(reasons))
    return wanted


def _auto(implementations: Sequence[Implementation], device: torch.device, args: tuple,
          skip: str | None = None) -> str:
    by_name = {impl.backend: impl for impl in implementations}
    for name in device_preference(device):
        impl = by_name.get(name)
        if name == skip or impl is None or impl.not_supported_reasons(*args):
            continue
        if impl.slower_reasons is not None and impl.slower_reasons(*args):
            continue
        return name
    return "reference"


# ---------------------------------------------------------------------------------------------
# Run-time Triton failures: fall back under auto, raise when forced.

_strict: list[bool] = []
_fallbacks: dict[tuple[str, str], dict] = {}


@contextlib.contextmanager
def triton_strictness(strict: bool) -> Iterator[None]:
    """Inside: whether a Triton failure raises (Triton was forced) or falls back (auto). Ops enter it
    around their Triton forward, and their backward re-enters what the forward saw."""
    _strict.append(bool(strict))
    try:
        yield
    finally:
        _strict.pop()


def triton_strict() -> bool:
    """True when a Triton failure here must raise: inside a forced call, or Triton requested by the
    context manager or the environment."""
    if _strict:
        return _strict[-1]
    return requested_backend() == "triton"


def note_fallback(op: str, error: TritonKernelError) -> None:
    """Records that ``op`` ran its composition because ``error.kernel`` failed; warns once per
    (op, kernel)."""
    key = (op, error.kernel)
    entry = _fallbacks.get(key)
    if entry is None:
        _fallbacks[key] = {"op": op, "kernel": error.kernel, "error": error.cause, "count": 1}
        warnings.warn(f"ahnet_fast: {op} falls back from Triton to its ATen composition: {error}. "
                      f"Results are the same, speed and memory are not; ahnet_fast.fallback_report() "
                      f"lists every fallback.", RuntimeWarning, stacklevel=3)
    else:
        entry["count"] += 1


def fallback_report() -> list[dict]:
    """Every (op, kernel) that fell back from Triton in this process: op, kernel, error, count."""
    return [dict(e) for e in _fallbacks.values()]


def clear_fallback_report() -> None:
    _fallbacks.clear()


def guarded(op: str, launcher: Callable, composition: Callable) -> Callable:
    """``launcher`` (a Triton kernel launcher), or under auto, when its kernel cannot run,
    ``composition``: an ATen function with the same arguments and results."""
    def call(*args, **kwargs):
        try:
            return launcher(*args, **kwargs)
        except TritonKernelError as exc:
            if triton_strict():
                raise BackendUnavailableError(f"backend 'triton' cannot run {op}: {exc}") from exc
            note_fallback(op, exc)
            return composition(*args, **kwargs)
    call.__name__ = getattr(launcher, "__name__", op)
    call.__doc__ = launcher.__doc__
    return call


def dispatch(op: str, implementations: Sequence[Implementation], device: torch.device, args: tuple,
             explicit: str | None, run: Callable[[str], object]):
    """``run(backend)`` for the backend :func:`select` picks; when that is Triton under auto and one
    of its kernels cannot run, warns (once) and runs the next backend that can."""
    chosen = select(op, implementations, device, args, explicit)
    if chosen != "triton":
        return run(chosen)
    forced = requested_backend(explicit) == "triton"
    _strict.append(forced)  # a plain push and pop, not a context manager: torch.compile traces it
    try:
        return run("triton")
    except TritonKernelError as exc:
        if forced:
            raise BackendUnavailableError(f"backend 'triton' cannot run {op}: {exc}") from exc
        note_fallback(op, exc)
    finally:
        _strict.pop()
    fallback = _auto(implementations, device, args, skip="triton")
    if _record:
        _note(op, f"{fallback} after triton failed")
    return run(fallback)
