#!/usr/bin/env bash
# The main job, from a fresh machine: set up, then a short run of the paper's schedule on synthetic
# CT-like volumes (2D network on slices -> 3D decoder on the transferred encoder -> end to end).
# Prints the held-out Dice of each stage and writes checkpoints (about 1 GB: each stage's last.pt
# holds the weights and Adam's state), metrics and plots (curves.png, montage.png) under
# runs/demo/{2d,3d,finetune}. How long it takes, from a clean clone and once set up, is in the
# README (scripts/time_demo.sh measures it).
# Extra arguments go to `ahnet-fast train` (e.g. --steps 300 --out runs/longer --device cuda).
# Running it again replaces the previous demo's output (--overwrite), unless --resume is given.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "[ahnet_fast phase] setup $(date +%s)"  # phase markers for scripts/time_demo.sh
bash scripts/setup.sh
PY="${PYTHON:-python3}"
replace=(--overwrite)
for arg in "$@"; do
  [ "$arg" = "--resume" ] && replace=()
done
echo "[ahnet_fast phase] train $(date +%s)"
exec "$PY" -m ahnet_fast train --stage all --patch 96 96 32 --psp-block-num 2 \
  --steps-2d 100 --steps-3d 100 --steps 150 --eval-every 50 --out runs/demo "${replace[@]}" "$@"
