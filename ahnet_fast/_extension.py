"""Loads the compiled operators (`ahnet_fast._C`) once, and says clearly when they are missing.

Without the extension every op runs its pure-PyTorch reference: the results are the same, only
slower and larger. Importing the package warns about it once; `extension_error()` says why.
"""
from __future__ import annotations

import warnings

_loaded: bool | None = None
_error: str | None = None


def load_extension() -> bool:
    """Imports `ahnet_fast._C` (registering torch.ops.ahnet_fast.*); True when it is available."""
    global _loaded, _error
    if _loaded is not None:
        return _loaded
    import torch  # noqa: F401  (loads libtorch/libc10, which _C links against)

    try:
        from ahnet_fast import _C  # noqa: F401  (importing registers the TORCH_LIBRARY ops)

        _loaded = True
    except (ImportError, OSError) as exc:  # OSError: a stale build against another torch
        _loaded = False
        _error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "ahnet_fast: the compiled extension ahnet_fast._C could not be loaded "
            f"({_error}); every op falls back to its pure-PyTorch reference (same results, "
            "slower, more memory). Rebuild with `pip install --no-build-isolation -e .` "
            "after installing torch.",
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
