#!/usr/bin/env bash
# The whole test suite, from a fresh machine: set up with the test dependencies, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
PY="${PYTHON:-python3}"
"$PY" - <<'PYEOF'
import ahnet_fast, sys
# The suite must exercise the compiled ops: a silently missing build would only test the fallback.
sys.exit(0 if ahnet_fast.extension_available() else "the compiled extension did not build/load")
PYEOF
exec "$PY" -m pytest -q "$@"
