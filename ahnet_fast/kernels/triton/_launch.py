"""Every Triton launch of the package goes through :func:`launch`.

It does three things a bare ``kernel[grid](...)`` does not:

- failures become :class:`~ahnet_fast.kernels.errors.TritonKernelError` naming the kernel (a compile
  error on this Triton, ptxas out of registers, a GPU the kernel cannot run on, a grid past CUDA's
  limits), so that the op layer can run the op's ATen composition instead; a variant that failed
  once is not compiled again;
- the grid is checked against CUDA's limits (2**31 - 1 programs along axis 0, 65535 along axes 1
  and 2) before anything is compiled, so that a huge volume falls back by reason, not by a launch
  error;
- under :func:`record_launches`, each launch's *specialisation key* is recorded: what Triton keys
  its compiled-kernel cache on (constexpr values, warps, pointer dtypes and 16-byte alignment, and
  for integer arguments that are specialised, whether they equal 1 or are divisible by 16). The
  number of distinct keys is the number of kernels a run compiles; tests bound it.

Kernels declare the integer arguments that vary from layer to layer (sizes, geometry) with
``@kernel(do_not_specialize=...)`` (:func:`kernel`): one compiled kernel then serves every layer.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
import triton

from ahnet_fast.kernels.errors import (InjectedFailure, TritonKernelError, any_remembered, injected,
                                       remember_failure, remembered_failure)

MAX_GRID = (2 ** 31 - 1, 65535, 65535)

_not_specialized: dict[str, frozenset[str]] = {}
_params: dict[str, tuple[str, ...]] = {}
_recorders: list[set] = []
_dry: list[bool] = []


def kernel(do_not_specialize: tuple[str, ...] = ()):
    """``triton.jit`` with the names of the integer arguments Triton must not specialise on (sizes
    and geometry that differ between layers), remembered for the launch keys."""
    def wrap(fn):
        names = tuple(inspect.signature(fn).parameters)
        unknown = set(do_not_specialize) - set(names)
        if unknown:
            raise ValueError(f"{fn.__name__}: do_not_specialize names unknown arguments {sorted(unknown)}")
        _not_specialized[fn.__name__] = frozenset(do_not_specialize)
        _params[fn.__name__] = names
        return triton.jit(fn, do_not_specialize=list(do_not_specialize) or None)
    return wrap


def _name(fn) -> str:
    return getattr(fn, "__name__", None) or fn.fn.__name__


def _int_key(v: int, specialized: bool):
    width = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
    if not specialized:
        return width
    return "1" if v == 1 else f"{width}:16" if v % 16 == 0 else width


def _arg_key(v, specialized: bool):
    if isinstance(v, torch.Tensor):
        # meta tensors (a dry run) have no address: allocations are 16-byte aligned
        return (str(v.dtype), v.device.type == "meta" or v.data_ptr() % 16 == 0)
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return _int_key(v, specialized)
    if isinstance(v, float):
        return "fp32"
    return type(v).__name__


def specialization_key(fn, args: tuple, constexprs: dict, num_warps: int) -> tuple:
    """What Triton keys a compiled kernel on for this launch (the rule of Triton 3.5-3.9: pointers by
    dtype and 16-byte alignment; specialised ints by ==1 / divisible by 16 / width)."""
    name = _name(fn)
    names = _params.get(name, ())
    skip = _not_specialized.get(name, frozenset())
    key = tuple(_arg_key(v, i >= len(names) or names[i] not in skip) for i, v in enumerate(args))
    return (name, tuple(sorted((k, v) for k, v in constexprs.items())), num_warps, key)


def _variant(fn, args: tuple, constexprs: dict, num_warps: int) -> tuple:
    """A failure is remembered by kernel, constexprs, warps and operand dtypes (not sizes)."""
    dtypes = tuple(str(v.dtype) for v in args if isinstance(v, torch.Tensor))
    return (_name(fn), tuple(sorted(constexprs.items())), num_warps, dtypes)


@contextlib.contextmanager
def record_launches(execute: bool = True) -> Iterator[set]:
    """Collects the specialisation key of every launch inside the block. With ``execute=False`` no
    kernel runs (a dry run, e.g. a whole training step on meta tensors, to count what it would
    compile)."""
    keys: set = set()
    _recorders.append(keys)
    _dry.append(not execute)
    try:
        yield keys
    finally:
        _recorders.remove(keys)
        _dry.pop()


def launch(fn, grid: tuple, *args, num_warps: int = 4, **constexprs) -> None:
    """``fn[grid](*args, **constexprs, num_warps=num_warps)``, with the checks described above."""
    name = _name(fn)
    grid = tuple(int(g) for g in grid)
    for axis, (g, cap) in enumerate(zip(grid, MAX_GRID)):
        if g > cap:
            raise TritonKernelError(name, f"grid axis {axis} needs {g} programs, CUDA allows {cap}")
    if min(grid, default=1) <= 0:
        return  # nothing to compute
    for rec in _recorders:
        rec.add(specialization_key(fn, args, constexprs, num_warps))
    if _dry and _dry[-1]:
        return
    if any_remembered():  # the variant key is built only once something has failed
        earlier = remembered_failure(_variant(fn, args, constexprs, num_warps))
        if earlier is not None:
            raise TritonKernelError(name, earlier)
    try:
        if injected(name):
            raise InjectedFailure(f"injected compile failure of {name}")
        fn[grid](*args, **constexprs, num_warps=num_warps)
    except Exception as exc:  # whatever Triton raises: compile, ptxas, resources, driver
        lines = str(exc).strip().splitlines()
        cause = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
        remember_failure(_variant(fn, args, constexprs, num_warps), cause)
        raise TritonKernelError(name, cause) from exc
