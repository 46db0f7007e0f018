#!/usr/bin/env bash
# compute-sanitizer memcheck + racecheck of the CUDA backend on a reduced test run (needs a GPU).
#
#   bench/sanitizer.sh REPORT_FILE [PYTEST_K_EXPRESSION]
#
# Runs `pytest tests/test_cuda_backend.py -k "<expr>"` (default: the odd-shape, peer-norm,
# skip_nonfinite tests and Hinton's two rules of the sgd_update test (aligned and misaligned
# params), in fp16 and fp32-tf32 and exact fp32: every kernel instantiation family on small grids, the peer
# kernel, both weight-gradient finishes (epilogue and split + apply), cp.async and the element
# fallback at the matrix edges; skip_nonfinite and sgd_update: the flag byte, the skipped update
# and the apply kernel on a param-dtype gradient) under
#   1. compute-sanitizer --tool memcheck   (out-of-bounds / misaligned global+shared accesses)
#   2. compute-sanitizer --tool racecheck  (shared-memory hazards)
# and appends both reports to REPORT_FILE. Exit status: 0 when both tools report no errors and the
# tests pass, 1 otherwise. The caching allocator is disabled (PYTORCH_NO_CUDA_MEMORY_CACHING=1) so
# that every tensor is its own allocation and memcheck sees an overrun past a tensor's end.
set -u
REPORT=${1:?usage: bench/sanitizer.sh REPORT_FILE [PYTEST_K_EXPRESSION]}
KEXPR=${2:-"((odd or peer_norm or skip_nonfinite) or (sgd_update_matches and hinton)) and (fp16 or fp32) and not large"}
cd "$(dirname "$0")/.."
SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ ! -x "$SAN" ]; then
  echo "compute-sanitizer not found (PATH or \$CUDA_HOME/bin)" | tee -a "$REPORT"
  exit 1
fi
# Check only our kernels (ff_forward_kernel, ff_finalize_kernel, ff_peer_kernel, ff_wgrad_kernel,
# ff_apply_kernel)
# when this compute-sanitizer can filter by kernel name; torch's own kernels then run unchecked.
FILTER=()
if "$SAN" --help 2>&1 | grep -q -- "--kernel-name"; then
  FILTER=(--kernel-name kns=ff_)
fi
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
status=0
for tool in memcheck racecheck; do
  {
    echo "=== compute-sanitizer --tool $tool ${FILTER[*]} : pytest -k \"$KEXPR\" ($(date -u +%FT%TZ))"
  } >> "$REPORT"
  "$SAN" --tool "$tool" ${FILTER[@]+"${FILTER[@]}"} --error-exitcode 99 \
    python -m pytest -q -x -p no:cacheprovider tests/test_cuda_backend.py -k "$KEXPR" >> "$REPORT" 2>&1
  rc=$?
  echo "=== $tool exit status $rc" >> "$REPORT"
  [ $rc -ne 0 ] && status=1
done
grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed|=== " "$REPORT" | tail -n 12
exit $status
