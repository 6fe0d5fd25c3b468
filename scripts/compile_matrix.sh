#!/usr/bin/env bash
# Compiles every Triton kernel variant for sm_80 and sm_90 under each supported Triton, with no GPU:
# 0 compile errors and 0 register spills, or a non-zero exit.
#   bash scripts/compile_matrix.sh                 # the versions CI checks: oldest, 3.6, newest
#   bash scripts/compile_matrix.sh 3.7.1 3.8.0     # any others
# Each version is installed beside the package, not into the environment
# (pip install --no-deps --target $AHNET_FAST_TRITON_CACHE/triton-X), so the environment's own Triton
# and torch stay as they are. Why several: each Triton lowers the same kernel differently (3.5 and
# 3.6 reject fp32 dots with K < 16 that 3.8 accepts, and need twice the registers for a tile), so a
# check against one version proves nothing about another. The supported range is Triton 3.5-3.9,
# what torch 2.9-2.14 bring; ahnet_fast/ops/_registry.py refuses older ones at run time.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
CACHE="${AHNET_FAST_TRITON_CACHE:-$HOME/.cache/ahnet_fast}"
JOBS="${AHNET_FAST_COMPILE_JOBS:-$(nproc)}"
versions=("$@")
if [ ${#versions[@]} -eq 0 ]; then
  versions=(3.5.1 3.6.0 3.9.0)
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
failed=()
for v in "${versions[@]}"; do
  site="$CACHE/triton-$v"
  if [ ! -f "$site/.complete" ]; then
    echo "== installing triton==$v into $site"
    rm -rf "$site"
    if ! "$PY" -m pip install -q --no-deps --target "$site" "triton==$v"; then
      echo "compile_matrix: could not install triton==$v" >&2
      failed+=("$v (install)")
      continue
    fi
    touch "$site/.complete"
  fi
  echo "== Triton $v"
  start=$(date +%s)
  if "$PY" -m ahnet_fast.kernels.compile_check --triton-site "$site" --jobs "$JOBS" > "$CACHE/compile_check-$v.log" 2>&1; then
    tail -n 1 "$CACHE/compile_check-$v.log"
  else
    grep -E "ERROR|SPILLS" "$CACHE/compile_check-$v.log" | head -40
    tail -n 3 "$CACHE/compile_check-$v.log"
    failed+=("$v")
  fi
  echo "   ($(( $(date +%s) - start )) s; full log: $CACHE/compile_check-$v.log)"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "compile_matrix: FAILED for Triton ${failed[*]}"
  exit 1
fi
echo "compile_matrix: every kernel variant compiles without spills under Triton ${versions[*]}"
