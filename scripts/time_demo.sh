#!/usr/bin/env bash
# The README's main command timed as a new user meets it: a clean clone of the committed HEAD, a
# fresh virtual environment, `bash scripts/demo.sh` (set-up, then training); then the training part
# again in the same environment (a second run, set-up already done). Writes
# benchmarks/results/demo_<date>.json (minutes per phase, disk used by runs/demo, the final Dice),
# which the README shows through benchmarks/report.py.
#
#     bash scripts/time_demo.sh [WORKDIR]     # WORKDIR: where to clone (default: a new temp dir)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d /tmp/ahnet_fast_demo.XXXXXX)}"
git clone -q "$repo" "$work/clone"
commit="$(git -C "$work/clone" rev-parse HEAD)"
python3 -m venv "$work/venv"
for run in first second; do
  start=$(date +%s)
  ( source "$work/venv/bin/activate" && cd "$work/clone" && PYTHON=python bash scripts/demo.sh ) \
    >"$work/demo_$run.log" 2>&1
  echo "[ahnet_fast phase] end $(date +%s)" >>"$work/demo_$run.log"
  echo "$start" >"$work/demo_$run.start"
done
out="$repo/benchmarks/results/demo_$(date +%F).json"
python3 - "$work" "$commit" "$out" <<'PYEOF'
import datetime, json, os, platform, subprocess, sys
work, commit, out = sys.argv[1:]
runs = {}
for run in ("first", "second"):
    marks, finals = [], []
    with open(os.path.join(work, f"demo_{run}.log"), errors="replace") as f:
        for line in f:
            if line.startswith("[ahnet_fast phase] "):
                name, stamp = line.split()[2:4]
                marks.append((name, int(stamp)))
            elif line.startswith('{"out": '):
                finals.append(json.loads(line))
    phases = {name: t1 - t0 for (name, t0), (_, t1) in zip(marks, marks[1:])}
    runs[run] = dict(phases=phases, total_s=marks[-1][1] - marks[0][1], final=finals)
demo = os.path.join(work, "clone", "runs", "demo")
disk = int(subprocess.run(["du", "-sb", demo], capture_output=True, text=True, check=True).stdout.split()[0])
record = dict(date=datetime.date.today().isoformat(), commit=commit, device=platform.processor() or platform.machine(),
              cpus=os.cpu_count(), command="bash scripts/demo.sh", runs=runs, disk_bytes=disk)
tmp = out + ".tmp"
with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
os.replace(tmp, out)
print(json.dumps(record, indent=1))
PYEOF
