#!/usr/bin/env bash
# The README's test command as CI runs it, timed: a clean clone of the committed HEAD, a fresh virtual
# environment, `.ci/run`; writes benchmarks/results/ci_clean_clone_<date>.json (the phases' minutes,
# which the README shows through benchmarks/report.py) and keeps the log beside it in /tmp.
#
#     bash scripts/time_clean_clone.sh [WORKDIR]     # WORKDIR: where to clone (default: a new temp dir)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d /tmp/ahnet_fast_clean.XXXXXX)}"
log="$work/ci.log"
git clone -q "$repo" "$work/clone"
commit="$(git -C "$work/clone" rev-parse HEAD)"
python3 -m venv "$work/venv"
# the compile matrix downloads its Triton versions once into ~/.cache/ahnet_fast: say whether they were there
warm=false
ls "$HOME"/.cache/ahnet_fast/triton-*/.complete >/dev/null 2>&1 && warm=true
start=$(date +%s)
rc=0
( source "$work/venv/bin/activate" && cd "$work/clone" && PYTHON=python bash .ci/run ) >"$log" 2>&1 || rc=$?
end=$(date +%s)
out="$repo/benchmarks/results/ci_clean_clone_$(date +%F).json"
python3 - "$log" "$start" "$end" "$rc" "$commit" "$out" "$warm" <<'PYEOF'
import json, os, platform, sys
log, start, end, rc, commit, out, warm = sys.argv[1:]
marks = []
with open(log, errors="replace") as f:
    for line in f:
        if line.startswith("[ahnet_fast phase] "):
            name, stamp = line.split()[2:4]
            marks.append((name, int(stamp)))
marks.append(("end", int(end)))
phases = {}
for (name, t0), (_, t1) in zip(marks, marks[1:]):
    if name != "end":
        phases[name] = t1 - t0
record = dict(date=__import__("datetime").date.today().isoformat(), commit=commit,
              device=platform.processor() or platform.machine(), cpus=os.cpu_count(), phases=phases,
              total_s=int(end) - int(start), exit_status=int(rc), command=".ci/run (bash scripts/test.sh)",
              triton_cache_warm=warm == "true")
tmp = out + ".tmp"
with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
os.replace(tmp, out)
print(json.dumps(record, indent=1))
PYEOF
echo "log: $log"
exit "$rc"
