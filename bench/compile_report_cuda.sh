#!/usr/bin/env bash
# The CUDA kernels' compiled artifacts, before and after, without a GPU: per kernel for one arch
# (default sm_90) the registers, spills, static shared memory (ptxas -v) and SASS instruction
# counts (cuobjdump -sass: cp.async, vector/scalar global and shared accesses, barriers, MMAs),
# the nvcc time of csrc/ff_layer.cu for archs 80 and 90, and the launches and scratch bytes of one
# step for DESIGN.md section 5's shapes on 132 SMs (H100). "Before" is csrc/ at BASE_REV, "after"
# the working tree.
#
#   bash bench/compile_report_cuda.sh [OUT.md]   (default bench/results/2026-11-27-sm90-compiled-cuda.md)
#
# Env: BASE_REV (default 5c476b7, the last commit before the GPU-readiness rework), ARCH (90),
# NVCC (nvcc), CUOBJDUMP (cuobjdump on PATH, else the copy in the triton wheel), PYTHON (python3;
# "after" launch plans come from its ff_kernels._C, so build the extension first).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/2026-11-27-sm90-compiled-cuda.md}
BASE_REV=${BASE_REV:-5c476b7}
ARCH=${ARCH:-90}
NVCC=${NVCC:-nvcc}
PY=${PYTHON:-python3}
CUOBJDUMP=${CUOBJDUMP:-$(command -v cuobjdump || $PY -c "import triton, os; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))")}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

mkdir -p "$TMP/before" "$TMP/after"
for f in $(git ls-tree --name-only "$BASE_REV" csrc/); do git show "$BASE_REV:$f" > "$TMP/before/$(basename "$f")"; done
cp csrc/* "$TMP/after/"

FLAGS=(-std=c++17 -O3 --expt-relaxed-constexpr)  # CMakeLists.txt's CUDA flags (-lineinfo aside)
for side in before after; do
  "$NVCC" "${FLAGS[@]}" -arch=sm_$ARCH -cubin -Xptxas -v -I"$TMP/$side" -o "$TMP/$side.cubin" \
    "$TMP/$side/ff_layer.cu" > "$TMP/$side.ptxas" 2>&1
  "$CUOBJDUMP" -sass "$TMP/$side.cubin" > "$TMP/$side.sass"
  t0=$(date +%s.%N)
  "$NVCC" "${FLAGS[@]}" -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -c -I"$TMP/$side" -o "$TMP/$side.o" "$TMP/$side/ff_layer.cu"
  echo "$(date +%s.%N) - $t0" | bc > "$TMP/$side.time"
done

cat > "$TMP/notes.md" <<'NOTES'
## Reading the tables

Columns: `loop BAR` and `loop MMA/FMA` are the barriers and the MMA (or FMA) instructions of the
loop holding the most of them, the GEMM main loop (one iteration = one reduction step: 32 deep
before; 16 fp32 / 32 fp16 and bf16 after). The other columns count SASS instructions in the whole
kernel: `cp.async 16B` = LDGSTS.128; `LDG`/`STG` by width (the `<=4B` ones after the rework are
the element fallback for strided or misaligned inputs and matrix edges, and the scalar tails of
4-element groups); `STS`/`LDS` shared stores/loads (LDSM = ldmatrix, used by wmma fp16 loads).

What the rework changed, as these artifacts show it:

- Copies: before, every operand element went global -> registers -> shared by a scalar load
  (`LDG <=4B`, 16 per thread per operand and step) and the main loop had two barriers per step.
  After, the x and W tiles (and x in the weight gradient) move by 16-byte cp.async into a second
  shared-memory stage while the current one is multiplied, one barrier per step; the weight
  gradient's computed operand (f y + p) is read as 16-byte vectors (`LDG 16B`) during the MMAs
  and stored after them. Strided or misaligned x and W still work (element loads; tested).
- Shared-memory banks: before, the transposed register -> shared stores wrote 32 lanes at a
  36-word pitch (8 distinct banks: 4-way conflicts). After, tiles keep the global layout with rows
  padded by 16 bytes: a quarter-warp's 16-byte stores cover 128 contiguous bytes, or one 16-byte
  chunk of 8 rows at an 80-byte pitch; 8-row fragment loads hit 8 different bank groups.
- y stores: before, a warp store instruction wrote 2 elements in each of 16 rows (`STG <=4B`).
  After, 8 lanes write 32 consecutive columns of one row as 4-element vectors (`STG 8B` for
  fp16/bf16, `STG 16B` for fp32); the same for grad_weight, W and the momentum buffers.
- Registers: before 170-254 per thread in the GEMM kernels (one 256-thread block per SM); after
  <= 128 with no spills (`__launch_bounds__(256, 2)`: two blocks, 16 warps per SM).
- Scratch and launches: when the N x K output tiles fill the GPU (rule: split the batch only
  when tiles < SMs), the weight-gradient kernel owns its tiles and finishes them in its epilogue
  (gradient in the weight dtype, or the SGD step in place): no N x K scratch, no zeroing of it,
  no float32 atomics, no apply launch, and a deterministic weight gradient. The 50000-row shape
  (28 tiles on 132 SMs) still splits the batch, over 10 chunks.
- Non-finite steps and the SGD entry point (a later change, same structure): the forward
  epilogue keeps one per-thread predicate (some z not finite) and stores a flag byte once at the
  end, the finalise checks q_i; the loss is summed into the workspace and written out (NaN when
  flagged) by block 0 of the weight-gradient kernel, which also leaves at once when an update step
  skips a flagged batch; the apply kernel reads its gradient as float32 (split scratch) or the
  weight dtype (ff_sgd_update), a run-time switch, so it is still one instantiation per dtype
  (15 kernels in all). The GEMM kernels keep their registers (<= 128), no spills, their shared
  memory and main loops; the flag and loss add one to two stores each; the apply kernels gain
  the weight-dtype gradient loads (29-31 -> 30-32 registers), the peer kernel the kept-mean
  branch (29 -> 32 registers). Build time: the two nvcc lines were measured on a machine
  loaded by other builds (load average ~8 on 2 cores): compare them with each other only.
- Build time (the two `nvcc` lines above, measured back to back): the weight-gradient kernel now
  inlines the gradient write-out and the SGD step into its fully unrolled epilogue (16 copies per
  instantiation; its PTX grew from about 3.2k to 12.9k lines), so ptxas and cicc take about 3x
  longer on this file. A rolled epilogue loop compiled faster but made ptxas spill inside the main
  loop at 128 registers; runtime won.

Expected on the GPU, not measured (no GPU ran this): the large shapes should gain from the
2-stage cp.async pipeline, half the barriers and twice the resident warps; the 8192 shape saves
about 4 x 67 MB of memory traffic (zeroing, atomics, the apply kernel's read and write), the
1024-row shape the split's 16 MB and a launch. The GEMMs are still wmma (mma.sync) on a
128 x 128 tile: on an H100 they cannot reach the wgmma/TMA rates cuBLAS uses, so DESIGN.md
section 5's bars (1) and (2) are not expected from this backend yet; bench/ on a GPU decides.
NOTES

$PY - "$TMP" "$OUT" "$BASE_REV" "$ARCH" <<'EOF'
import re, subprocess, sys
from collections import Counter
tmp, out, base_rev, arch = sys.argv[1:5]

def demangle(names):
    res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
    return res.split("\n")

def short(name):
    m = re.search(r"ffl::(\w+)(?:<([^>]*)>)?\(", name)
    if not m:
        return name
    kernel, targs = m.group(1), m.group(2) or ""
    args = [a.strip() for a in targs.split(",") if a.strip()]
    dt = {"float": "fp32", "__half": "fp16", "__nv_bfloat16": "bf16"}
    kind = {"0": "simt", "1": "tc"}
    label = "/".join([dt.get(args[0], args[0])] + [kind.get(a, a) for a in args[1:]]) if args else ""
    return f"{kernel}<{label}>" if label else kernel

def ptxas(path):
    """kernel -> (registers, spill stores, spill loads, stack, smem)."""
    res, cur = {}, None
    for line in open(path):
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            cur = m.group(1)
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            res.setdefault(cur, {}).update(stack=int(m.group(1)), spill_st=int(m.group(2)),
                                           spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?$", line.strip())
        if m and cur:
            res.setdefault(cur, {}).update(regs=int(m.group(1)), smem=int(m.group(2) or 0))
    return res

GROUPS = [  # (column, SASS opcode prefixes)
    ("cp.async 16B", ["LDGSTS.E.BYPASS.128", "LDGSTS.E.128"]),
    ("LDG 16B", ["LDG.E.128"]), ("LDG 8B", ["LDG.E.64"]), ("LDG <=4B", ["LDG.E.U16", "LDG.E.S8", "LDG.E "]),
    ("STG 16B", ["STG.E.128"]), ("STG 8B", ["STG.E.64"]), ("STG <=4B", ["STG.E.U16", "STG.E.U8", "STG.E "]),
    ("STS 16B", ["STS.128"]), ("STS <=8B", ["STS.64", "STS "]), ("LDS/LDSM", ["LDS", "LDSM"]),
    ("BAR", ["BAR.SYNC"]), ("MMA", ["HMMA"]), ("RED/ATOM", ["RED", "ATOM"]), ("SHFL", ["SHFL"]),
]

def main_loop(instrs):
    """The outermost loop (a backward branch and its target) holding the most MMA/FMA
    instructions, i.e. the GEMM's reduction-step loop, not an unrolled inner loop of the step:
    (barriers in it, MMA/FMA in it); (0, 0) without one."""
    best = (0, 0, 0, 0)
    for addr, op, text in instrs:
        m = re.search(r"BRA[^;]*?(0x[0-9a-f]+)", text)
        if not (op.startswith("BRA") and m):
            continue
        target = int(m.group(1), 16)
        if target >= addr:
            continue
        body = [o for a, o, _ in instrs if target <= a <= addr]
        mma = sum(o.startswith(("HMMA", "FFMA")) for o in body)
        if (mma, addr - target) > (best[2], best[3]):
            best = (sum(o.startswith("BAR.SYNC") for o in body), target, mma, addr - target)
    return best[0], best[2]


def sass(path):
    txt = open(path).read()
    res = {}
    for f in re.split(r"\n\s+Function : ", txt)[1:]:
        name = f.split("\n")[0].strip()
        instrs = []
        for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)([^;]*;)", f):
            instrs.append((int(m.group(1), 16), m.group(2), m.group(2) + m.group(3)))
        c = Counter()
        for _, op, text in instrs:
            op = op + (" " if text[len(op):len(op) + 1] in (" ", ";") else "")
            for col, prefixes in GROUPS:
                if any(op.startswith(p) for p in prefixes):
                    c[col] += 1
                    break
        c["loop BAR"], c["loop MMA/FMA"] = main_loop(instrs)
        res[name] = c
    return res

lines = []
w = lines.append
w(f"# CUDA kernels, compiled for sm_{arch}: before and after the GPU-readiness rework (2026-11-27)\n")
w("No GPU ran any of this: these are the compiler's artifacts (nvcc 13.0, ptxas -v, cuobjdump -sass) and")
w("the launch plans; nothing here is a measured speed. Regenerate with")
w("`bash bench/compile_report_cuda.sh` (before = csrc/ at " + base_rev + ", after = the working tree;")
w("the launch plans need the built extension).\n")
for side in ("before", "after"):
    p, s = ptxas(f"{tmp}/{side}.ptxas"), sass(f"{tmp}/{side}.sass")
    names = sorted(p)
    readable = dict(zip(names, demangle(names)))
    w(f"## {side}: per kernel (sm_{arch})\n")
    cols = ["loop BAR", "loop MMA/FMA"] + [g for g, _ in GROUPS]
    w("| kernel | regs | spill st/ld B | smem B | " + " | ".join(cols) + " |")
    w("|---|" + "---|" * (4 + len(cols)))
    rows = []
    for n in names:
        d = p[n]
        c = s.get(n, Counter())
        rows.append((short(readable[n]), f"| {short(readable[n])} | {d.get('regs', '?')} | "
                     f"{d.get('spill_st', 0)}/{d.get('spill_ld', 0)} | {d.get('smem', 0)} | "
                     + " | ".join(str(c.get(col, 0)) for col in cols) + " |"))
    for _, row in sorted(rows):
        w(row)
    w("")
    w(f"nvcc -O3 of csrc/ff_layer.cu for sm_80 + sm_90 (one process, this machine): "
      f"{float(open(f'{tmp}/{side}.time').read()):.1f} s\n")

# ---- launches and scratch per step, DESIGN.md section 5 shapes, 132 SMs
SHAPES = [(50000, 784, 500), (1024, 2000, 2000), (8192, 4096, 4096)]
w("## Launches and scratch per step (DESIGN.md section 5 shapes, B+ = B-, 132 SMs, bias, no peer norm)\n")
w("Scratch = the zeroed float32 workspace (before: a fresh tensor per step, `ws.zero_()` in Python;")
w("after: cached per (device, stream) by cuda_backend.py and zeroed by one cudaMemsetAsync in")
w("ff_layer_run, not counted in the launches, which are kernels); before: q, f, max|f|,")
w("gb and the N x K float32 gradient for every shape (4 launches); after: `ff_layer_plan`.\n")
w("| shape (B, K -> N) | mode | before: launches | before: scratch MB | after: launches | "
  "after: wgrad chunks | after: scratch MB |")
w("|---|---|---|---|---|---|---|")
try:
    import ff_kernels._C as C
except ImportError as e:
    C = None
    w(f"\n(after: ff_kernels._C not importable: {e})\n")
ceil_div = lambda a, b: (a + b - 1) // b
for b, k, n in SHAPES:
    m = 2 * b
    before = (2 * m + 4 + ceil_div(n, 4) * 4 + n * k) * 4 / 1e6
    for mode in (1, 2):
        after = ("?", "?", "?")
        if C is not None:
            a = C.FFLayerArgs()
            a.mode, a.sm_count, a.dtype = mode, 132, 0
            a.m_pos = a.m_neg = b
            a.n, a.k, a.weight_stride_row, a.weight_stride_col = n, k, k, 1
            a.bias, a.bias_stride = 1, 1
            plan = C.ff_layer_plan(a)
            after = (plan.launches, plan.wgrad_splits, f"{plan.workspace_floats * 4 / 1e6:.2f}")
        w(f"| {b}, {k} -> {n} | {'gradient' if mode == 1 else 'update'} | 4 | {before:.2f} | "
          f"{after[0]} | {after[1]} | {after[2]} |")
w("")
w(open(f"{tmp}/notes.md").read())
open(out, "w").write("\n".join(lines) + "\n")
print("wrote", out)
EOF
