#!/usr/bin/env bash
# The whole test suite, from a fresh machine: set up with the test dependencies, then the Triton
# compile matrix (every kernel variant for sm_80/sm_90 under the oldest supported Triton, 3.6 and the
# newest, each installed beside the package) and pytest. With arguments, only pytest runs, with them.
set -euo pipefail
cd "$(dirname "$0")/.."
# phase markers (seconds since the epoch) for scripts/time_clean_clone.sh
echo "[ahnet_fast phase] setup $(date +%s)"
bash scripts/setup.sh test
PY="${PYTHON:-python3}"
"$PY" - <<'PYEOF'
import ahnet_fast, sys
# The suite must exercise the compiled ops: a silently missing build would only test the fallback.
sys.exit(0 if ahnet_fast.extension_available() else "the compiled extension did not build/load")
PYEOF
matrix_rc=0
if [ $# -eq 0 ]; then
  echo "[ahnet_fast phase] compile_matrix $(date +%s)"
  bash scripts/compile_matrix.sh || matrix_rc=$?
fi
echo "[ahnet_fast phase] pytest $(date +%s)"
# One pytest-xdist worker per core (at most 4), each computing on one thread (tests/conftest.py): the
# many small tests that run Triton's interpreter are single-threaded Python, so two workers finish
# the suite in about two thirds of the time one process with two threads takes on 2 cores.
workers="${AHNET_FAST_TEST_WORKERS:-$(nproc)}"
[ "$workers" -gt 4 ] && workers=4
xdist=()
if [ "$workers" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
  xdist=(-n "$workers" --dist worksteal)
fi
pytest_rc=0
"$PY" -m pytest -q --durations=25 "${xdist[@]}" "$@" || pytest_rc=$?
echo "[ahnet_fast phase] end $(date +%s)"
if [ "$matrix_rc" -ne 0 ]; then
  echo "scripts/compile_matrix.sh failed (exit $matrix_rc): see its output above" >&2
  exit "$matrix_rc"
fi
exit "$pytest_rc"
