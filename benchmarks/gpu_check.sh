#!/usr/bin/env bash
# The GPU check: what ahnet_fast can only measure on a GPU, in one blind run of under 8 minutes
# (Triton's JIT compilation included), for a lent GPU machine that may come once: torch with CUDA
# and Triton, no network, no MONAI, and this checkout copied there but neither installed nor built.
#
#   bash benchmarks/gpu_check.sh                          # on the GPU machine; results under $OUT
#   bash benchmarks/gpu_check.sh --smoke                  # tiny sizes on a CPU: tests this script
#   bash benchmarks/gpu_check.sh --sections slab,pytest   # only these sections
#   bash benchmarks/gpu_check.sh --total-s 300            # another overall deadline (default 470 s)
# The device tool copies the working tree without .git: pass the commit the tree is based on along,
# e.g. AHNET_FAST_GIT_COMMIT=<output of `git rev-parse HEAD` here> bash benchmarks/gpu_check.sh.
#
# Sections, in this order (benchmarks/gpu_check.py SECTIONS lists them with their time budgets; the
# plan is printed first): env (the environment record), train_step (bf16 and fp32, ahnet_fast vs
# MONAI), planner (estimate vs torch.cuda.max_memory_allocated), slab (the 512x512x64 bf16 step),
# correctness (fp32 on the GPU vs float64 on the CPU), aniso_conv (Triton vs cuDNN per convolution
# shape), focal_loss and pyramid_pool (bandwidth), roofline, pytest (the Triton test files).
# Each section runs in its own Python process under `timeout`, so a hang, a crash or a CUDA error
# that poisons the context costs that section alone; its result, or its traceback, and its seconds
# are in gpu_check.json before the next one starts. A section is not started when the overall
# deadline is too near; it is recorded as skipped, with the reason.
#
# What comes back in $OUT (default ./gpu_check_out): six files (the device tool returns 8 at most).
#   gpu_check.json   every section: status (ok, error, skipped, timeout, crashed), seconds, result
#                    or error (type, message, traceback), Triton fallbacks; the plan; the environment
#   gpu_check.md     the same as tables, with bench_aniso_conv.py's and roofline.py's tables
#   gpu_check.log    everything printed, untruncated (a hung section's stacks too)
#   aniso_conv.json  bench_aniso_conv.py's rows        roofline.json   roofline.py's rows
#   pytest.log       the Triton tests' output
# To keep the results, copy them under benchmarks/results/ with the GPU and the date in the name
# and commit them with the change they measured, e.g. from the repository root:
#   tag=h100_$(date +%F)   # or h200_...
#   for f in gpu_check.json gpu_check.md aniso_conv.json roofline.json; do
#     cp "$OUT/$f" "benchmarks/results/${f%.*}_$tag.${f##*.}"; done
# (gpu_check.log and pytest.log as well when they explain a failure).
#
# MONAI, the baseline, comes from the committed wheel benchmarks/wheels/monai-*.whl (pure Python;
# torch and numpy are there), installed with --no-deps --no-index into a temporary directory put on
# PYTHONPATH: the machine's site-packages are not touched. If that fails, the MONAI rows say why
# and everything else still runs. The C++ extension is not built there: building costs minutes of
# device time and measures nothing on the GPU (the CPU ops use the reference path; `env` says so).
# Test hooks (tests/test_gpu_check.py): AHNET_FAST_GPU_CHECK_FAIL=section[:hang],... makes sections
# fail or hang; AHNET_FAST_GPU_CHECK_BUDGETS=section=seconds,... overrides their budgets.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

SMOKE=""
SECTIONS=""
TOTAL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE="--smoke" ;;
    --sections) SECTIONS="${2:?--sections needs a comma-separated list}"; shift ;;
    --sections=*) SECTIONS="${1#*=}" ;;
    --total-s) TOTAL="${2:?--total-s needs seconds}"; shift ;;
    --total-s=*) TOTAL="${1#*=}" ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (expected --smoke, --sections a,b, --total-s N)" >&2; exit 2 ;;
  esac
  shift
done

OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
CHECK="$ROOT/benchmarks/gpu_check.py"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Triton's interpreter is for the CPU test suite: here kernels are compiled (GPU) or not called at all
# (--smoke on a CPU, where interpreting them would take minutes). tests/conftest.py sets it again
# for the pytest section's own process when there is no GPU.
unset TRITON_INTERPRET
# the package from this checkout: it is not installed on the device machine
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
export AHNET_FAST_GPU_CHECK_SCRATCH="$SCRATCH"

plan_args=($SMOKE)
[ -n "$SECTIONS" ] && plan_args+=(--sections "$SECTIONS")
[ -n "$TOTAL" ] && plan_args+=(--total-s "$TOTAL")

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

install_monai() {
  local wheels=("$ROOT"/benchmarks/wheels/monai-*.whl)
  if [ ! -f "${wheels[0]}" ]; then
    export AHNET_FAST_GPU_CHECK_MONAI="MONAI not installed: no wheel at benchmarks/wheels/monai-*.whl"
  elif "$PY" -m pip install --quiet --no-deps --no-index --no-compile --target "$SCRATCH/monai_site" \
      "${wheels[@]}"; then
    export PYTHONPATH="$PYTHONPATH:$SCRATCH/monai_site"
    export AHNET_FAST_GPU_CHECK_MONAI="installed from $(basename "${wheels[0]}") into a temporary --target directory"
  else
    export AHNET_FAST_GPU_CHECK_MONAI="MONAI not installed: pip install --no-deps --no-index of \
$(basename "${wheels[0]}") failed (see gpu_check.log)"
  fi
  echo "== MONAI: $AHNET_FAST_GPU_CHECK_MONAI"
}

main() {
  local start deadline plan total name budget rest left t s0 rc
  start=$(now_ms)
  echo "== gpu_check.sh $SMOKE ${SECTIONS:+--sections $SECTIONS} on $(hostname) at $(date -u +%FT%TZ); OUT=$OUT"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  # the plan first: a bad --sections or budget override stops here, before any device time is spent
  if ! plan="$("$PY" "$CHECK" plan "${plan_args[@]}")"; then
    echo "gpu_check.sh: no plan (see the error above)"
    return 2
  fi
  "$PY" "$CHECK" begin --out "$OUT" "${plan_args[@]}" || return 2
  install_monai
  total=$(sed -n 's/^TOTAL //p' <<<"$plan")
  deadline=$(( start + 1000 * total ))
  while read -r name budget rest; do
    left=$(( (deadline - $(now_ms)) / 1000 ))
    if [ "$left" -lt "$MIN_START_S" ] && [ "$left" -lt "$budget" ]; then
      "$PY" "$CHECK" finalize "$name" --out "$OUT" --budget "$budget" \
        --skipped "the overall deadline (${total} s) was ${left} s away"
      continue
    fi
    t=$(( budget < left ? budget : left ))
    [ "$rest" = rest ] && t=$left
    echo
    echo "== [$name] starts, budget ${t} s ($(( ($(now_ms) - start) / 1000 )) s into the run)"
    s0=$(now_ms)
    timeout -k 10 "$t" "$PY" -u "$CHECK" run "$name" --out "$OUT" --budget "$t" $SMOKE </dev/null
    rc=$?
    "$PY" "$CHECK" finalize "$name" --out "$OUT" --rc "$rc" --budget "$t" \
      --wall-s "$(( $(now_ms) - s0 ))e-3"
  done < <(grep -v '^TOTAL ' <<<"$plan")
  "$PY" "$CHECK" summary --out "$OUT"
  rc=$?
  echo "== gpu_check.sh done in $(( ($(now_ms) - start) / 1000 )) s"
  return $rc
}

MIN_START_S=8  # seconds: less is not worth a process start; budgets below it still start
main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
