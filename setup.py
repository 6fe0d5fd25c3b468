"""Builds the compiled operators `ahnet_fast._C` from csrc/.

The sources are csrc/ops.cpp (the schemas) and csrc/cpu/*.cpp (the CPU kernels); the GPU kernels are
Triton's (ahnet_fast/kernels/triton) and need no build step. torch must already be installed, and the
build must see it: install with `pip install --no-build-isolation .` (an isolated build would pull
a multi-GB CUDA torch). With no torch at build time, or AHNET_FAST_NO_EXTENSION=1, the package is
installed without the extension and runs on its pure-PyTorch reference path.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("AHNET_FAST_NO_EXTENSION") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("ahnet_fast: torch is not importable at build time; building without the extension", file=sys.stderr)
        return [], {}

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    debug = os.environ.get("AHNET_FAST_DEBUG") == "1"
    # -g0: Python's own CFLAGS add -g; the debug information of the kernels' template instances
    # made up a quarter of the build time and most of the library's size
    cxx = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # -fno-trapping-math / -fno-math-errno: lets GCC turn selects and min/max into vector code
    # (results are unchanged: no reassociation, IEEE semantics otherwise kept). -ffp-contract=off: no
    # a * b + c fused into one rounding where a function is also compiled for a CPU with FMA, so
    # results do not depend on the CPU the kernels run on.
    cxx += ["-fopenmp", "-std=c++17", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=off",
            "-fdiagnostics-color=always"]
    ext = CppExtension("ahnet_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
