#!/usr/bin/env bash
# The main job, from a fresh machine: set up, then AH-Net training steps on a synthetic CT-like
# volume, printing time per step and memory (and MONAI's, side by side, when MONAI is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${PYTHON:-python3}"
compare=""
if "$PY" -c "import monai" 2>/dev/null; then compare="--compare-monai"; fi
exec "$PY" -m ahnet_fast demo $compare "$@"
