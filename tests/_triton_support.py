"""Shared by the Triton kernel tests (tests/test_*_triton.py): where they run, bfloat16 in Triton's
interpreter, and the check of each file's branch -> test coverage table.

bfloat16 in the interpreter
---------------------------
Triton 3.8's interpreter (triton/runtime/interpreter.py) keeps bfloat16 data as raw uint16 bits
(``_get_np_dtype``) and converts them only in casts to and from float32. Run on bfloat16 tensors,
our kernels then go wrong in three ways:

- ``tl.dot`` of bfloat16 operands: ``InterpreterBuilder.create_dot`` calls ``np.matmul`` on the
  uint16 bit patterns, silently (aniso_conv's three GEMM kernels: results off by ~1e10);
- a bfloat16 constant, ``tl.full([BLOCK], float("-inf"), tl.bfloat16)`` in pyramid_pool_pool0_kernel, raises
  ``AttributeError: 'InterpreterBuilder' object has no attribute 'get_bf16'``; and comparisons and
  ``tl.maximum``/``tl.where`` between bfloat16 values compare the bit patterns as unsigned integers
  (a negative number beats every positive one: pyramid_pool_coarsen_kernel's maximum);
- float32 -> bfloat16 casts (every bfloat16 store) truncate (``_convert_float`` called with no
  rounding mode) where the GPU rounds to nearest even: twice the rounding error.

Loads, stores and float32 math on loaded-then-converted values are right: the kernels that only
convert bfloat16 to float32 and back (bn_relu, focal_loss, and pyramid pooling's projection,
upsampling and routing) give correct results there but for the truncating stores.

:func:`enable_interpreter_bf16` fixes the three, for tests, by storing bfloat16 as
``ml_dtypes.bfloat16`` (a numpy dtype with bfloat16's arithmetic, comparisons and round-to-nearest-
even conversions) instead of uint16: a dot multiplies bfloat16 values exactly in float32 and
accumulates in float32 (what a bfloat16 ``tl.dot`` with a float32 accumulator computes, up to the
order of the sum), constants are bfloat16 numbers, casts round to nearest even. It patches three
InterpreterBuilder methods and ``_get_np_dtype`` for the duration of one test (monkeypatch);
nothing else changes. Needs ``ml_dtypes``; without it the bfloat16 tests skip, saying so.
"""
from __future__ import annotations

import ast
import inspect
import os
import re

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"
runs_here = pytest.mark.skipif(INTERPRETED and os.environ.get("TRITON_INTERPRET") != "1",
                               reason="needs a GPU or TRITON_INTERPRET=1")

def _patch_interpreter_bf16(monkeypatch) -> None:
    import ml_dtypes
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as it

    bf16 = np.dtype(ml_dtypes.bfloat16)
    get_np_dtype = it._get_np_dtype
    cast = it.InterpreterBuilder.cast_impl
    fp_to_fp = it.InterpreterBuilder.create_fp_to_fp

    def _get_np_dtype(tt_dtype):
        scalar = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        return bf16 if scalar == tl.bfloat16 else get_np_dtype(tt_dtype)

    def get_bf16(self, value):
        return it.TensorHandle(np.array([value], dtype=bf16), tl.bfloat16)

    def cast_impl(self, src, dst_type):
        if tl.bfloat16 in (src.dtype.scalar, dst_type.scalar):  # numpy's astype: round to nearest even
            return it.TensorHandle(src.data.astype(_get_np_dtype(dst_type)), dst_type.scalar)
        return cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if tl.bfloat16 in (src.dtype.scalar, dst_type.scalar) and rounding_mode in (None, it._ir.ROUNDING_MODE.RTNE):
            return cast_impl(self, src, dst_type)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    monkeypatch.setattr(it, "_get_np_dtype", _get_np_dtype)
    monkeypatch.setattr(it.InterpreterBuilder, "get_bf16", get_bf16, raising=False)
    monkeypatch.setattr(it.InterpreterBuilder, "cast_impl", cast_impl)
    monkeypatch.setattr(it.InterpreterBuilder, "create_fp_to_fp", create_fp_to_fp)


def enable_interpreter_bf16(monkeypatch, required: bool = True) -> None:
    """Makes bfloat16 tensors run through the interpreted kernels as on a GPU (see the module
    docstring) until the calling test ends; nothing to do on a GPU. Without ml_dtypes: skips the
    test, or (``required=False``: kernels that only convert bfloat16 to float32 and back, right in
    the stock interpreter but for its truncating stores) lets it run on the stock interpreter."""
    if not INTERPRETED:
        return
    try:
        _patch_interpreter_bf16(monkeypatch)
    except ImportError as e:
        if required:
            pytest.skip(f"bfloat16 in Triton's interpreter needs ml_dtypes (pip install ml_dtypes): {e}")


def allow_bf16(monkeypatch, op_module, required: bool = True) -> None:
    """Lets an op module pick its Triton kernels for bfloat16 under the interpreter: drops the one
    reason ``ahnet_fast.ops._registry.triton_reasons`` gives against it (its other reasons stay),
    and enables bfloat16 in the interpreter (see enable_interpreter_bf16)."""
    enable_interpreter_bf16(monkeypatch, required)
    original = op_module.triton_reasons

    def reasons(*args, **kwargs):
        return [r for r in original(*args, **kwargs) if "bfloat16" not in r]

    monkeypatch.setattr(op_module, "triton_reasons", reasons)


def low_precision_ok(got, ref_low, truth, atol, what=""):
    """flash-attention's rule: the error of ``got`` against the float64 ``truth`` is at most twice
    that of ``ref_low`` (PyTorch's own computation in the same low precision) plus ``atol``."""
    from tests.conftest import rel_err

    err, bound = rel_err(got, truth), 2 * rel_err(ref_low, truth) + atol
    assert err <= bound, f"{what}: error {err:.3e} > 2 x torch's {rel_err(ref_low, truth):.3e} + {atol:g}"


# ---------------------------------------------------------------------------------------------
# Launch records: which kernels and constexpr values a test ran, and on what grid.


class Launches:
    """Every launch of a Triton kernel inside the block: (kernel name, grid, constexprs dict)."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []

    def grids(self, kernel: str, **constexprs) -> list[tuple]:
        """The grids of the launches of ``kernel`` with these constexpr values."""
        return [g for k, g, c in self.calls if k == kernel and all(c.get(n) == v for n, v in constexprs.items())]

    def max_grid(self, kernel: str, **constexprs) -> tuple:
        """Per grid axis, the most programs any such launch had ((0,) * 3 when none ran)."""
        grids = [tuple(g) + (1,) * (3 - len(g)) for g in self.grids(kernel, **constexprs)]
        return tuple(max(axis) for axis in zip(*grids)) if grids else (0, 0, 0)

    def values(self, kernel: str, name: str) -> set:
        return {c[name] for k, _, c in self.calls if k == kernel and name in c}


@pytest.fixture
def launches(monkeypatch):
    """Records the launches made through ``ahnet_fast.kernels.triton._launch.launch`` (every
    launcher uses it); the kernels still run."""
    from ahnet_fast.kernels.triton import _launch

    rec = Launches()
    real = _launch.launch

    def recording(fn, grid, *args, **kwargs):
        constexprs = {k: v for k, v in kwargs.items() if k != "num_warps"}
        rec.calls.append((_launch._name(fn), tuple(int(g) for g in grid), constexprs))
        return real(fn, grid, *args, **kwargs)

    # the kernel modules imported the function by name: patch it where they look it up
    from ahnet_fast.kernels.triton import aniso_conv, bn_relu, focal_loss, pyramid_pool
    for module in (aniso_conv, bn_relu, focal_loss, pyramid_pool):
        monkeypatch.setattr(module, "launch", recording)
    return rec


# ---------------------------------------------------------------------------------------------
# Coverage tables: each test file's docstring lists, one line per constexpr, the values each
# kernel's branches take and the tests that run them:
#
#     kernel_name  NAME=value|value  -> test_one, test_two
#
# A value ``*`` stands for "every value the launcher picks" (tile sizes read from the module's
# tile tables, which the named test iterates).

_LINE = re.compile(r"^\s*(\w+_kernel)\s+(\w+)=(\S+)\s+->\s+(.+?)\s*$")


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def coverage_table(doc: str) -> dict[tuple[str, str], tuple[set, list[str]]]:
    """{(kernel, name): (values, tests)} parsed from a docstring."""
    table = {}
    for line in doc.splitlines():
        m = _LINE.match(line)
        assert m or not re.match(r"^\s+\w+_kernel\s", line), f"coverage line not understood: {line!r}"
        if m:
            kernel, name, values, tests = m.groups()
            table[(kernel, name)] = ({_value(v) for v in values.split("|")},
                                     [t.strip() for t in tests.split(",") if t.strip()])
    return table


def constexpr_names(kernel) -> list[str]:
    fn = getattr(kernel, "fn", kernel)  # JITFunction and the interpreter's InterpretedFunction
    names = []
    for name, p in inspect.signature(fn).parameters.items():
        ann = p.annotation
        if ann is not inspect.Parameter.empty and (getattr(ann, "__name__", None) == "constexpr" or
                                                   str(ann).endswith("constexpr")):
            names.append(name)
    return names


def check_coverage(doc: str, kernel_module, test_namespace: dict) -> None:
    """Every kernel of ``kernel_module`` and each constexpr value of its ``compile_specs()`` (both
    values of a boolean) is in the docstring's table, and each test named there exists."""
    table = coverage_table(doc)
    assert table, "no coverage table in the module docstring"
    specs = kernel_module.compile_specs()
    kernels = {getattr(fn, "fn", fn).__name__: fn for _, fn, _, _, _ in specs}
    missing = []
    for _, fn, _, consts, _ in specs:
        kname = getattr(fn, "fn", fn).__name__
        for name, value in consts.items():
            entry = table.get((kname, name))
            if entry is None or not ({value, "*"} & entry[0]):
                missing.append(f"{kname} {name}={value}")
    for kname, fn in kernels.items():
        for name in constexpr_names(fn):
            entry = table.get((kname, name))
            if entry is None:
                missing.append(f"{kname} {name} (a constexpr with no line)")
            elif any(isinstance(v, bool) for v in entry[0]) and not {True, False} <= entry[0]:
                missing.append(f"{kname} {name}: both True and False")
    assert not missing, "branches with no test in the coverage table: " + "; ".join(sorted(set(missing)))
    listed = {k for k, _ in table}
    assert listed <= set(kernels), f"table names kernels that compile_specs does not build: {listed - set(kernels)}"
    for (kname, name), (_, tests) in table.items():
        assert tests, f"{kname} {name}: no test named"
        for t in tests:
            assert callable(test_namespace.get(t)), f"{kname} {name}: no test function {t}"
