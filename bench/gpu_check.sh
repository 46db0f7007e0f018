#!/usr/bin/env bash
# The GPU check in one command (sized for < 5 min on an H100): build the CUDA extension, run the whole
# test suite on the GPU, optionally the sanitizers, then the benchmarks; prints a short table and
# leaves logs + JSON under $OUT (default bench/results/latest; 8 files at most, the device tool's limit).
#   OUT=/tmp/out bash bench/gpu_check.sh        SANITIZE=1 also runs bench/sanitizer.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/latest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
export FF_KERNELS_CUDA_ARCHS=${FF_KERNELS_CUDA_ARCHS:-90}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())" \
  | tee -a "$OUT/machine.txt"

t0=$SECONDS
FF_KERNELS_BUILD_CUDA=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16} \
  $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -60 "$OUT/build.log"; echo "gpu_check: build FAILED"; exit 1; }
echo "build: $((SECONDS - t0)) s (archs $FF_KERNELS_CUDA_ARCHS)" | tee -a "$OUT/machine.txt"

# Each group under its own time limit, so one slow group cannot hide the others' results.
rc_tests=0
for group in "reference:tests/test_reference.py tests/test_validation.py tests/test_nn.py tests/test_extension.py" \
             "triton:tests/test_triton_backend.py" "cuda:tests/test_cuda_backend.py"; do
  name=${group%%:*}; files=${group#*:}
  t0=$SECONDS
  FF_KERNELS_REQUIRE_EXTENSION=1 timeout "${TEST_TIMEOUT:-150}" $PY -m pytest $files -q -p no:cacheprovider \
    --durations=5 > "$OUT/tests_$name.log" 2>&1
  rc=$?; rc_tests=$(( rc_tests || rc ))
  grep -E "^(FAILED|ERROR)" "$OUT/tests_$name.log" | head -25
  echo "tests[$name]: rc=$rc in $((SECONDS - t0)) s: $(tail -1 "$OUT/tests_$name.log")"
done

rc_san=0
if [ "${SANITIZE:-0}" = 1 ] && [ -f bench/sanitizer.sh ]; then
  t0=$SECONDS
  timeout "${SANITIZE_TIMEOUT:-120}" bash bench/sanitizer.sh "$OUT/sanitizer.txt"; rc_san=$?
  tail -6 "$OUT/sanitizer.txt"
  echo "sanitizer: rc=$rc_san in $((SECONDS - t0)) s"
fi

t0=$SECONDS
FF_BENCH_JSON="$OUT/bench.json" timeout "${BENCH_TIMEOUT:-150}" \
  $PY -m pytest bench --benchmark-only -q -p no:cacheprovider > "$OUT/bench.log" 2>&1
rc_bench=$?
sed -n '/ff_kernels layer step/,/^wrote/p' "$OUT/bench.log"
[ $rc_bench = 0 ] || tail -30 "$OUT/bench.log"
echo "bench: rc=$rc_bench in $((SECONDS - t0)) s"
exit $(( rc_tests || rc_bench || rc_san ))
