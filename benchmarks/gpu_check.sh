#!/usr/bin/env bash
# The prepared GPU check (issue brief: run once per session that is lent a GPU; < 8 minutes).
# On the device machine (torch with CUDA, triton, no network), from the repository root:
#   bash benchmarks/gpu_check.sh            # results under $OUT (the device tool's output folder)
#   bash benchmarks/gpu_check.sh --smoke    # tiny sizes on any device: tests this script on CPU
# It runs the Triton kernels' tests on CUDA (when MONAI is importable: the test modules use it) and
# benchmarks/gpu_check.py (Triton kernels and the reference path need no compiled
# extension). Building the C++ extension there costs minutes of device time and measures nothing on
# the GPU, so it is skipped unless AHNET_FAST_GPU_BUILD=1 (then the CPU op tests run there too).
# Time caps (s): Triton tests 110 + focal/pyramid tests 70 + convolution shapes 80 + gpu_check.py 160 + roofline 40 = 460,
# under the 8-minute rule; gpu_check.py writes its JSON after every section, so a cap still leaves
# what was measured. Commit $OUT's gpu_check.md/json, aniso_conv.md/json and roofline.md/json under benchmarks/results/. MONAI is not on the device image: carry a wheel in .device_wheels/ (ignored)
# with `pip download --no-deps -d .device_wheels monai==1.6.1` to get MONAI rows too.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
# the package from this checkout (it is not installed on the device machine)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
  if ls .device_wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install --no-deps --no-index .device_wheels/*.whl 2>&1 | tail -1
  fi
  if [ "${AHNET_FAST_GPU_BUILD:-0}" = "1" ]; then
    echo "== build"
    start=$(date +%s)
    "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 && echo "built in $(( $(date +%s) - start )) s" \
      || { echo "BUILD FAILED (tail of build.log):"; tail -20 "$OUT/build.log"; }
    echo "== CPU op tests on this machine's torch"
    timeout 180 "$PY" -m pytest -q -x tests/test_bn_relu.py 2>&1 | tail -3
  fi
  echo "== Triton kernels against the reference on CUDA: anisotropic convolutions, BN-ReLU-conv, dense block"
  timeout 110 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_aniso_conv_triton.py tests/test_bn_relu_conv.py \
    tests/test_dense_block.py -k "triton or Triton or aniso" 2>&1 | tail -5
  if "$PY" -c "import monai" 2>/dev/null; then
    echo "== Triton focal loss and pyramid pooling against the reference on CUDA (fp32/fp16; bf16 where the tests take it)"
    timeout 70 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_focal_loss_triton.py tests/test_pyramid_pool.py \
      -k "triton and not compile_check" 2>&1 | tail -5
  else
    echo "== (no MONAI on this machine: the focal-loss/pyramid Triton pytest checks need it; gpu_check.py still compares to the reference)"
  fi
  echo "== every AH-Net convolution shape: Triton vs cuDNN conv3d vs folded conv2d"
  if [ "${1:-}" = "--smoke" ]; then conv_args="--max-shapes 3"; else conv_args="--large"; fi
  timeout 80 "$PY" benchmarks/bench_aniso_conv.py $conv_args --repeats 3 --out "$OUT/aniso_conv.md" \
    --json "$OUT/aniso_conv.json" 2>&1 | tail -12
  echo "== GPU check"
  timeout 160 "$PY" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tail -40
  echo "== roofline: every op and the training step against the measured matmul rate and copy bandwidth"
  if [ "${1:-}" = "--smoke" ]; then roof_args="--smoke --repeats 1"; else roof_args="--repeats 5"; fi
  timeout 40 "$PY" benchmarks/roofline.py $roof_args --out "$OUT/roofline.md" --json "$OUT/roofline.json" 2>&1 | tail -14
} 2>&1 | tee "$OUT/gpu_check.log"
