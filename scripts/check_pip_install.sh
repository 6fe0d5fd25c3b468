#!/usr/bin/env bash
# A plain `pip install .` (isolated build: no torch in the build environment, so no compiled
# extension in the wheel) in a fresh virtual environment, then `import ahnet_fast` from another
# folder: the kernels must be compiled just in time on that first import, load, and be found cached
# by the next process. Slow (a full compile); tests/test_extension_jit.py checks the same route
# quickly with two small sources.
#
#     bash scripts/check_pip_install.sh [WORKDIR]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d /tmp/ahnet_fast_pip.XXXXXX)}"
python3 -m venv "$work/venv"
source "$work/venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1 AHNET_FAST_CACHE="$work/cache"
python -m pip install -q "torch==2.13.0"
python -m pip install -q "$repo"
cd "$work"
probe='import time, torch
t = time.time()
import ahnet_fast
ok = ahnet_fast.extension_available()
print("origin:", ahnet_fast.extension_origin(), "| error:", ahnet_fast.extension_error(), f"| {time.time() - t:.0f} s")
assert ok and torch._C._dispatch_has_kernel_for_dispatch_key("ahnet_fast::focal_loss", "CPU")'
python -c "$probe"
python -c "$probe"   # the second process finds the build in the cache
