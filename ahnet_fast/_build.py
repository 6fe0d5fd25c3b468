"""How the compiled extension is built: its sources and compiler flags, shared by setup.py (ahead of
time) and ahnet_fast._extension (just in time). Imports nothing at module level, so setup.py can
load this file without importing torch or the package."""
from __future__ import annotations

import glob
import os

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def compile_flags(debug: bool = False) -> list[str]:
    # -g0: Python's own CFLAGS add -g; the debug information of the kernels' template instances made
    # up a quarter of the build time and most of the library's size.
    # -fno-trapping-math / -fno-math-errno: lets GCC turn selects and min/max into vector code
    # (results are unchanged: no reassociation, IEEE semantics otherwise kept). -ffp-contract=off: no
    # a * b + c fused into one rounding where a function is also compiled for a CPU with FMA, so
    # results do not depend on the CPU the kernels run on.
    flags = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    return flags + ["-fopenmp", "-std=c++17", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=off"]


LINK_FLAGS = ["-fopenmp"]


def source_root() -> str | None:
    """The folder holding ops.cpp and cpu/: the copy inside an installed package (``_csrc``, put there
    by setup.py), or the repository's ``csrc`` beside a source checkout; None when neither is there."""
    for root in (os.path.join(PACKAGE_DIR, "_csrc"), os.path.join(os.path.dirname(PACKAGE_DIR), "csrc")):
        if os.path.isfile(os.path.join(root, "ops.cpp")):
            return root
    return None


def sources(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "*.cpp"))) + sorted(glob.glob(os.path.join(root, "cpu", "*.cpp")))


def headers(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "**", "*.h"), recursive=True))
