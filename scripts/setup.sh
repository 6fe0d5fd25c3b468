#!/usr/bin/env bash
# Installs what ahnet_fast needs into the current Python and builds its compiled extension.
#   bash scripts/setup.sh          # the library
#   bash scripts/setup.sh test     # plus the test dependencies (pytest, MONAI 1.6.1)
# torch: an installed torch (>= 2.9) is kept, e.g. a CUDA build on a GPU machine; without one,
# torch==2.13.0 is installed (set AHNET_FAST_TORCH to another requirement to override). A plain
# `pip install torch` could pull a multi-GB CUDA build, hence the pin.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ -n "${AHNET_FAST_TORCH:-}" ]; then
  "$PY" -m pip install "$AHNET_FAST_TORCH"
elif ! "$PY" -c "import torch, sys; sys.exit(0 if tuple(int(v) for v in torch.__version__.split('+')[0].split('.')[:2]) >= (2, 9) else 1)" 2>/dev/null; then
  "$PY" -m pip install "torch==2.13.0"
fi
# build requirements: the extension is built against the torch above, so no isolated build env
"$PY" -m pip install "setuptools>=64" wheel ninja numpy
extras=""
if [ "${1:-}" = "test" ]; then
  extras="[test]"
fi
# The package in editable mode, then its extension built in place with ninja, whose objects stay in
# build/: a second run (the demo, then the tests) recompiles only what changed, where a pip build
# would start from scratch each time.
AHNET_FAST_NO_EXTENSION=1 "$PY" -m pip install --no-build-isolation -e ".${extras}"
MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py -q build_ext --inplace
"$PY" - <<'PYEOF'
import torch, ahnet_fast
print(f"ahnet_fast {ahnet_fast.__version__} on torch {torch.__version__}: compiled extension "
      f"{'loaded' if ahnet_fast.extension_available() else 'NOT loaded (reference path)'}")
PYEOF
