#!/usr/bin/env bash
# The GPU check as one staged command, sized to end within 8 minutes on an H100, Triton's JIT included:
#
#   1. preflight   versions, the card, the packages and tools it needs, free GPU memory; fails fast
#   2. build       the CUDA extension (archs 90), timed; the Triton half of stage 3 runs alongside
#   3. verdict     both fused backends x dtypes x modes x configs x shapes vs the float64 reference
#   4. bench       section 5 shapes: fused, 2 GEMMs alone, eager, torch.compile; the whole network
#   5. tests       the GPU pytest groups, each under its own limit; SANITIZE=1: compute-sanitizer
#
#   OUT=/tmp/out bash bench/gpu_check.sh                   # on the GPU machine
#   SANITIZE=1 OUT=/tmp/out bash bench/gpu_check.sh        # plus bench/sanitizer.sh with the time left
#   FF_GPU_CHECK_DRY_RUN=1 OUT=/tmp/dry bash bench/gpu_check.sh
#       rehearses every stage on a CPU (CI): the emulator build, the Triton interpreter, the CUDA
#       emulator and tiny shapes; its numbers are CPU numbers and are labelled so.
#   python -m bench.gpu_report /tmp/out                    # afterwards: bench/results/<date>-<card>.{json,md}
#
# Every stage runs under its own `timeout -s INT` (pytest then still prints what failed and its summary)
# clipped to the time left of GPU_CHECK_BUDGET (470 s; 900 in the dry run), prints one result line,
# and appends it to $OUT/summary.md as it finishes, so a run cut short keeps what it did. $OUT holds
# at most 8 files:
#   preflight.txt build.log verdict.txt bench.jsonl bench.log tests.log sanitizer.txt summary.md
# Exit status: 0 when every stage that ran passed and none was cut or skipped for lack of time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/latest}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 FF_GPU_CHECK_DRY_RUN=${FF_GPU_CHECK_DRY_RUN:-0}
PY=${PYTHON:-python3}
DRY=$FF_GPU_CHECK_DRY_RUN
SANITIZE=${SANITIZE:-0}
BUDGET=${GPU_CHECK_BUDGET:-470}
START=$SECONDS
# nvcc and compute-sanitizer where the CUDA toolkit usually lives, when neither PATH nor CUDA_HOME says
if ! command -v nvcc > /dev/null && [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda PATH=/usr/local/cuda/bin:$PATH
fi

# Stage limits in seconds (a stage gets its limit or the time left, whichever is less). Expected on an
# H100: preflight 10, build 60 with the Triton verdict (90) alongside, the CUDA verdict (30) after the
# build, also alongside; bench 150; then the test groups with what is left, GPU-only groups first.
LIMIT_PREFLIGHT=30
LIMIT_BUILD=150
LIMIT_VERDICT_TRITON=150
LIMIT_VERDICT_CUDA=75
LIMIT_BENCH=150
LIMIT_SANITIZER=120
TEST_GROUPS=("triton|100|tests/test_triton_backend.py"
             "cuda|60|tests/test_cuda_backend.py tests/test_extension.py"
             "reference|40|tests/test_reference.py tests/test_validation.py"
             "nn|45|tests/test_nn.py")

if [ "$DRY" = 1 ]; then
  # The CPU does the GPU's work several times slower (the interpreter, the emulator, two cores that
  # CI shares with other jobs): the rehearsal gets longer limits, the same stages. (About 2 minutes
  # of CPU time in all; tests/test_gpu_check.py holds it to that, not to the wall clock.)
  BUDGET=${GPU_CHECK_BUDGET:-900}
  LIMIT_VERDICT_TRITON=400 LIMIT_VERDICT_CUDA=400 LIMIT_BENCH=300
  export TRITON_INTERPRET=1  # Triton on the CPU, set before anything imports it
  # one BLAS/OpenMP thread per process: the verdict runs two processes on a 2-core machine, and
  # spinning OpenMP threads of oversubscribed processes slow each other down many times over
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  DRY_ARG=--dry-run
  MODE_NOTE=" - DRY RUN on the CPU: CPU numbers, not GPU results"
else
  DRY_ARG=
  MODE_NOTE=
fi

{
  echo "# gpu_check $(date -u +%FT%TZ)$MODE_NOTE"
  echo
  echo "| stage | result | seconds | limit s | note |"
  echo "|---|---|---|---|---|"
} > "$OUT/summary.md"

# record NAME RESULT SECONDS LIMIT [NOTE]: one line on the console, one row in summary.md
record() {
  echo "stage $1: $2 in $3 s (limit $4 s)${5:+ - $5}"
  echo "| $1 | $2 | $3 | $4 | ${5:-} |" >> "$OUT/summary.md"
}

# stage NAME LIMIT MIN_SECONDS LOG CMD...: run CMD under timeout -s INT for LIMIT seconds or the time
# left, output appended to LOG ("-": the console); skipped when fewer than MIN_SECONDS are left.
# The limit is exported as STAGE_LIMIT (gpu_verdict.py sizes its soft time box from it).
stage() {
  local name=$1 limit=$2 min=$3 log=$4
  shift 4
  local left=$((BUDGET - (SECONDS - START)))
  ((left < limit)) && limit=$left
  if ((limit < min)); then
    record "$name" SKIPPED 0 "$limit" "only $left s of the $BUDGET s budget left"
    return 0
  fi
  local t0=$SECONDS rc
  if [ "$log" = - ]; then
    STAGE_LIMIT=$limit timeout -s INT -k 15 "$limit" "$@"
  else
    STAGE_LIMIT=$limit timeout -s INT -k 15 "$limit" "$@" >> "$log" 2>&1
  fi
  rc=$?
  local result=OK
  if ((rc == 124 || rc == 137)); then result=TIMEOUT
  elif ((rc == 3)); then result=INCOMPLETE  # gpu_verdict.py: no FAIL, but its time box left cases unrun
  elif ((rc != 0)); then result="FAIL (rc $rc)"
  fi
  record "$name" "$result" $((SECONDS - t0)) "$limit" "${STAGE_NOTE:-}"
  return $rc
}

# ------------------------------------------------------------------------------------------------
# 1. preflight: what this machine is, and whether everything the stages need is here
# ------------------------------------------------------------------------------------------------
read -r -d '' PREFLIGHT_PY <<'EOF'
import datetime, importlib, os, platform, shutil, subprocess, sys
dry = os.environ["FF_GPU_CHECK_DRY_RUN"] == "1"
report = open(sys.argv[1], "w")
missing = []

def say(key, value):
    line = f"{key}: {value}"
    print(line, flush=True)
    report.write(line + "\n")
    report.flush()

def version(module, needed):
    try:
        return getattr(importlib.import_module(module), "__version__", "present")
    except Exception as err:  # any import failure means: not usable here
        if needed:
            missing.append(module)
        return f"MISSING ({type(err).__name__}: {err})"

def tool(name, needed, *version_args):
    path = shutil.which(name)
    if path is None:
        if needed:
            missing.append(name)
        return "MISSING"
    lines = subprocess.run([path, *version_args], capture_output=True, text=True).stdout.splitlines()
    lines = [l for l in lines if "version" in l.lower() or "release" in l.lower()] or lines[-1:]
    return f"{path}: {lines[0].strip()}" if version_args and lines else path

say("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
say("mode", "DRY RUN on the CPU (Triton interpreter, CUDA emulator, tiny shapes): CPU numbers, "
            "not GPU results" if dry else "gpu")
say("host", f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
for module, needed in [("torch", True), ("triton", True), ("pytest", True), ("pytest_benchmark", True),
                       ("pybind11", True), ("hypothesis", False), ("numpy", False), ("sklearn", False)]:
    say(f"package {module}", version(module, needed))
if dry:
    say("tool g++", tool("g++", True, "--version"))
    say("card", "none: dry run on the CPU")
else:
    for name in ("nvcc", "cmake", "ninja"):
        say(f"tool {name}", tool(name, True, "--version"))
    # optional: only SANITIZE=1 uses it, with the time left; bench/sanitizer.sh also looks in CUDA_HOME
    san = tool("compute-sanitizer", False)
    cuda_home_san = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "compute-sanitizer")
    say("tool compute-sanitizer", cuda_home_san if san == "MISSING" and os.access(cuda_home_san, os.X_OK)
        else san)
    smi = tool("nvidia-smi", True)
    if smi != "MISSING":
        q = subprocess.run([smi, "--query-gpu=name,memory.total,memory.free,driver_version",
                            "--format=csv,noheader"], capture_output=True, text=True)
        say("nvidia-smi", q.stdout.strip() or q.stderr.strip())
    if "torch" not in missing:
        import torch
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            say("card", torch.cuda.get_device_name())
            say("cuda", f"torch built with CUDA {torch.version.cuda}, capability "
                        f"{torch.cuda.get_device_capability()}, free {free / 2**30:.1f} of "
                        f"{total / 2**30:.1f} GiB")
            if free < 8 * 2**30:  # the 8192 x 4096 verdict and benchmark cases need a few GiB
                missing.append(f"free GPU memory ({free / 2**30:.1f} GiB < 8 GiB)")
        else:
            missing.append("a CUDA device visible to torch")
say("preflight", "OK" if not missing else "FAIL: missing " + ", ".join(missing))
sys.exit(1 if missing else 0)
EOF
stage preflight $LIMIT_PREFLIGHT 5 - $PY -c "$PREFLIGHT_PY" "$OUT/preflight.txt"
if [ $? != 0 ]; then
  echo "gpu_check: preflight failed, nothing else runs (see $OUT/preflight.txt)"
  exit 1
fi

# ------------------------------------------------------------------------------------------------
# 2 + 3. build, and the verdict alongside
# ------------------------------------------------------------------------------------------------
# nvcc compiles three translation units, leaving most of the cores idle, and Triton's JIT needs no
# extension (each kernel variant compiles on one core): the Triton verdict starts first, in the
# background; the CUDA verdict starts as soon as the build is done. Both must end before the
# benchmark, which needs a quiet machine.
stage verdict-triton $LIMIT_VERDICT_TRITON 30 - \
  $PY -m bench.gpu_verdict --out "$OUT/verdict.txt" --backends triton $DRY_ARG &
verdict_triton=$!

if [ "$DRY" = 1 ]; then
  # the CPU emulation of the CUDA kernels (tests/cuda_emu), cached under build/cuda_emu/
  STAGE_NOTE="CPU emulation of csrc (g++), not nvcc" stage build $LIMIT_BUILD 10 "$OUT/build.log" \
    $PY -m tests.cuda_emu.build -v
else
  STAGE_NOTE="archs ${FF_KERNELS_CUDA_ARCHS:-90}" stage build $LIMIT_BUILD 30 "$OUT/build.log" \
    env FF_KERNELS_BUILD_CUDA=1 FF_KERNELS_CUDA_ARCHS=${FF_KERNELS_CUDA_ARCHS:-90} \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16} \
    $PY -m pip install --no-build-isolation --no-deps -v -e .
  [ $? = 0 ] || tail -40 "$OUT/build.log"
  $PY -c "from ff_kernels._ext import extension_status; print(extension_status())" 2>&1 \
    | tee -a "$OUT/build.log"
fi

stage verdict-cuda $LIMIT_VERDICT_CUDA 20 - \
  $PY -m bench.gpu_verdict --out "$OUT/verdict.txt" --backends cuda $DRY_ARG &
verdict_cuda=$!
wait $verdict_triton $verdict_cuda
echo "verdict: $(grep -c '^PASS' "$OUT/verdict.txt") PASS, $(grep -c '^FAIL' "$OUT/verdict.txt") FAIL" \
  "lines in $OUT/verdict.txt"

# ------------------------------------------------------------------------------------------------
# 4. benchmark: the pytest-benchmark suite, each result appended to bench.jsonl as it is measured
# ------------------------------------------------------------------------------------------------
stage bench $LIMIT_BENCH 30 "$OUT/bench.log" \
  env FF_BENCH_JSONL="$OUT/bench.jsonl" $PY -m pytest bench --benchmark-only -q -p no:cacheprovider \
  --benchmark-columns=median,iqr,rounds
awk '/ff_kernels layer step|whole network train_step/ {show = 1} /^-|^$/ {show = 0} show' "$OUT/bench.log"
grep -E "^(FAILED|ERROR|SKIPPED)" "$OUT/bench.log" | head -10

# ------------------------------------------------------------------------------------------------
# 5. the GPU test groups, each under its own limit (the dry run only collects them), then sanitizer
# ------------------------------------------------------------------------------------------------
for group in "${TEST_GROUPS[@]}"; do
  IFS='|' read -r name limit files <<< "$group"
  echo "=============== tests[$name]: $files" >> "$OUT/tests.log"
  first=$(($(wc -l < "$OUT/tests.log") + 1))
  if [ "$DRY" = 1 ]; then
    STAGE_NOTE="collect only (dry run)" stage "tests-$name" "$limit" 10 "$OUT/tests.log" \
      $PY -m pytest $files -q -p no:cacheprovider --collect-only
  else
    stage "tests-$name" "$limit" 15 "$OUT/tests.log" \
      env FF_KERNELS_REQUIRE_EXTENSION=1 $PY -m pytest $files -q -p no:cacheprovider --durations=5
  fi
  tail -n +"$first" "$OUT/tests.log" | grep -E "^(FAILED|ERROR)" | head -15
  tail -n +"$first" "$OUT/tests.log" | grep -E "passed|failed|error|collected|tests? " | tail -1
done

if [ "$SANITIZE" != 1 ]; then
  record sanitizer "NOT REQUESTED" 0 0 "SANITIZE=1 runs bench/sanitizer.sh"
elif [ "$DRY" = 1 ]; then
  record sanitizer SKIPPED 0 0 "compute-sanitizer needs a GPU"
else
  # bench/sanitizer.sh runs `python`: where only python3 exists, point `python` at $PY
  shim=$(mktemp -d)
  command -v python > /dev/null || ln -s "$(command -v "$PY")" "$shim/python"
  PATH=$shim:$PATH stage sanitizer $LIMIT_SANITIZER 40 - bash bench/sanitizer.sh "$OUT/sanitizer.txt"
  rm -rf "$shim"
fi

# ------------------------------------------------------------------------------------------------
# the per-stage seconds, and the verdict of the whole check
# ------------------------------------------------------------------------------------------------
total=$((SECONDS - START))
echo "" >> "$OUT/summary.md"
echo "total: $total s of the $BUDGET s budget" >> "$OUT/summary.md"
echo "----- gpu_check: $total s of $BUDGET s; $OUT: $(ls "$OUT" | tr '\n' ' ')"
grep '^| [a-z]' "$OUT/summary.md" | awk -F'|' '{printf "  %-16s %-14s %5s s\n", $2, $3, $4}'
# OK and NOT REQUESTED are fine; FAIL, TIMEOUT, INCOMPLETE and SKIPPED (no time left) are not
if grep -E '^\| [a-z-]+ \| (FAIL|TIMEOUT|INCOMPLETE|SKIPPED)' "$OUT/summary.md" | grep -qv "needs a GPU"; then
  echo "gpu_check: NOT all green (see $OUT/summary.md)"
  exit 1
fi
echo "gpu_check: all green"
