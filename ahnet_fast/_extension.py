"""Loads the compiled operators once, building them just in time when the package has none that fit.

The extension normally comes with the install (``pip install --no-build-isolation .``, or
``scripts/setup.sh``): ``ahnet_fast._C``. A package installed without it (a plain ``pip install .``
or a wheel from ``python -m build``, whose isolated build had no torch), or one whose ``_C`` was
built for another torch, compiles the same sources on first import with torch's C++ extension
loader: once per torch version, C++ ABI, Python and source set, cached under
``$AHNET_FAST_CACHE`` (default ``~/.cache/ahnet_fast``); processes started together (torchrun) wait
for the one that builds. ``AHNET_FAST_JIT=0`` turns this off.

Without any extension every op runs its pure-PyTorch reference: the same results, slower and
larger. Importing the package then warns once, saying why; ``extension_error()`` returns it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import warnings

_loaded: bool | None = None
_error: str | None = None
_origin: str | None = None


def _cache_root() -> str:
    return os.environ.get("AHNET_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ahnet_fast")


def jit_build_directory(source_files: list[str]) -> str:
    """Where the just-in-time build for this torch, ABI, Python and source set lives."""
    import torch

    digest = hashlib.sha256()
    for path in source_files:
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    tag = f"torch{torch.__version__.replace('+', '_')}-abi{abi}-py{sys.version_info[0]}{sys.version_info[1]}"
    return os.path.join(_cache_root(), "extension", f"{tag}-{digest.hexdigest()[:12]}")


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _jit_build(why: str) -> None:
    """Compiles csrc/ with torch.utils.cpp_extension.load and loads it (registering the ops)."""
    import torch
    from torch.utils import cpp_extension

    from ahnet_fast import _build

    root = _build.source_root()
    if root is None:
        raise RuntimeError("the C++ sources are not in this installation (ahnet_fast/_csrc or ../csrc)")
    if _compiler() is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++) to build the kernels just in time")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja) to build the kernels just in time")
    files = _build.sources(root)
    subset = os.environ.get("AHNET_FAST_JIT_SOURCES")  # tests build a few small sources only
    if subset:
        keep = set(subset.split(","))
        files = [f for f in files if os.path.basename(f) in keep]
    directory = jit_build_directory(files + _build.headers(root))
    os.makedirs(directory, exist_ok=True)
    built = os.path.join(directory, "ahnet_fast_C.so")
    start = time.monotonic()
    if not os.path.exists(built):
        cores = os.cpu_count() or 1
        print(f"ahnet_fast: {why}; compiling the CPU kernels for torch {torch.__version__} (once, cached in "
              f"{directory}; a few minutes on {cores} core{'s' if cores > 1 else ''})...", file=sys.stderr,
              flush=True)
    # load() takes a lock in the build folder: a process that finds another building waits for it
    cpp_extension.load(name="ahnet_fast_C", sources=files, extra_cflags=_build.compile_flags(),
                       extra_ldflags=_build.LINK_FLAGS, extra_include_paths=[root], build_directory=directory,
                       is_python_module=False, verbose=os.environ.get("AHNET_FAST_JIT_VERBOSE") == "1")
    elapsed = time.monotonic() - start
    if elapsed > 5:
        print(f"ahnet_fast: compiled kernels ready ({elapsed:.0f} s)", file=sys.stderr, flush=True)


def load_extension() -> bool:
    """Loads the compiled operators (registering torch.ops.ahnet_fast.*); True when they are there."""
    global _loaded, _error, _origin
    if _loaded is not None:
        return _loaded
    import torch  # noqa: F401  (loads libtorch/libc10, which the extension links against)

    prebuilt_error = None
    if os.environ.get("AHNET_FAST_IGNORE_PREBUILT") == "1":  # tests of the just-in-time path
        prebuilt_error = "the prebuilt extension is ignored (AHNET_FAST_IGNORE_PREBUILT=1)"
    else:
        try:
            from ahnet_fast import _C  # noqa: F401  (importing registers the TORCH_LIBRARY ops)

            _loaded, _origin = True, "prebuilt"
            return True
        except ImportError as exc:  # absent, or (undefined symbols) built for another torch
            missing = isinstance(exc, ModuleNotFoundError) or "cannot import name '_C'" in str(exc)
            prebuilt_error = "the package was installed without its compiled extension" if missing else \
                f"its compiled extension does not load with torch {torch.__version__} ({exc})"
        except OSError as exc:
            prebuilt_error = f"its compiled extension does not load with torch {torch.__version__} ({exc})"
    if os.environ.get("AHNET_FAST_JIT", "1") == "0":
        _error = f"{prebuilt_error}, and AHNET_FAST_JIT=0 turns the just-in-time build off"
    else:
        try:
            _jit_build(prebuilt_error)
            _loaded, _origin = True, "just in time"
            return True
        except Exception as exc:  # noqa: BLE001  (any build failure means: the reference path)
            _error = f"{prebuilt_error}, and building it failed: {type(exc).__name__}: {str(exc).strip()[:2000]}"
    _loaded = False
    warnings.warn(
        f"ahnet_fast: no compiled kernels ({_error}). Every op falls back to its pure-PyTorch reference "
        "(same results, slower, more memory). To build them at install time: pip install setuptools ninja && "
        "pip install --no-build-isolation . (with the torch you run installed first).",
        RuntimeWarning,
        stacklevel=3,
    )
    return _loaded


def extension_available() -> bool:
    return load_extension()


def extension_error() -> str | None:
    """Why the extension is unavailable, or None when it loaded."""
    load_extension()
    return _error


def extension_origin() -> str | None:
    """"prebuilt" (installed with the package), "just in time" (built on first import), or None."""
    load_extension()
    return _origin
