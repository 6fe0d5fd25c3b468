"""Builds the compiled operators `ahnet_fast._C` from csrc/.

The sources are csrc/ops.cpp (the schemas) and csrc/cpu/*.cpp (the CPU kernels); the GPU kernels are
Triton's (ahnet_fast/kernels/triton) and need no build step. The build must see the torch the package
will run with: install with `pip install --no-build-isolation .` (an isolated build would pull a
multi-GB CUDA torch). Without torch at build time (a plain `pip install .`, `python -m build`), or
with AHNET_FAST_NO_EXTENSION=1, the package is installed without the extension: the sources are
shipped inside it (ahnet_fast/_csrc) and ahnet_fast builds them just in time, on first import, for
the torch it finds (ahnet_fast/_extension.py).
"""
import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("ahnet_fast_build", os.path.join(ROOT, "ahnet_fast", "_build.py"))
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


class BuildPyWithSources(build_py):
    """Also copies csrc/ into the built package as ahnet_fast/_csrc, for the just-in-time build."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "ahnet_fast", "_csrc")
        if os.path.isdir(target):
            shutil.rmtree(target)
        root = os.path.join(ROOT, "csrc")
        for path in build.sources(root) + build.headers(root):
            dest = os.path.join(target, os.path.relpath(path, root))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(path, dest)


def _extensions():
    if os.environ.get("AHNET_FAST_NO_EXTENSION") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("ahnet_fast: torch is not importable at build time; the package is built without the compiled "
              "extension and compiles it on first import", file=sys.stderr)
        return [], {}
    sources = [os.path.relpath(p, ROOT) for p in build.sources(os.path.join(ROOT, "csrc"))]
    cxx = build.compile_flags(os.environ.get("AHNET_FAST_DEBUG") == "1") + ["-fdiagnostics-color=always"]
    ext = CppExtension("ahnet_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=build.LINK_FLAGS)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
