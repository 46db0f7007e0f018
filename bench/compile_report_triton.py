"""Compile the Triton kernels for sm_90 on a machine without a GPU and report their structure.

For each kernel variant the tuned and untuned paths use: registers, stack frame and spill bytes per
thread (ptxas -v on triton's PTX), shared memory (triton's metadata), whether the dots run on
wgmma and how many wgmma groups stay in flight across loop iterations (the ``pendings`` of
``ttng.warp_group_dot_wait`` in the TTGIR: 0 means every wgmma is waited for before the next one
is issued, so the tensor cores idle while the loop computes the next operands).

    python bench/compile_report_triton.py                     # the current kernels, markdown table
    python bench/compile_report_triton.py --module PATH.py    # another version of triton_backend.py
    python bench/compile_report_triton.py --keep DIR          # also keep ttgir/ptx per variant
    python bench/compile_report_triton.py --odd-n             # N = 500 (y's rows not 16-aligned)

No GPU needed; TRITON_INTERPRET must be unset (the script clears it). Used by
tests/test_triton_backend.py::test_kernels_compile_for_hopper (spills, shared memory, pipelining).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

SM90_SMEM_PER_BLOCK = 227 * 1024

# Argument types by name (the kernels follow these names): fp32 scratch pointers, fp32 scalars;
# every other *_ptr has the input dtype, every other argument is an i32.
F32_PTRS = {"q_ptr", "g_ptr", "coef_ptr", "loss_ptr", "pw_ptr", "pb_ptr", "part_ptr", "bufw_ptr",
            "bufb_ptr", "buf_ptr", "stats_ptr", "peer_ptr", "mean_ptr"}
BOOL_PTRS = {"nonfinite_ptr", "flag_ptr"}  # torch.bool: the step's flag, sgd_update's skip
FLOATS = {"theta", "alpha", "eps", "loss_weight", "grad_scale", "lr", "momentum", "weight_decay",
          "keep", "gain", "wd_grad", "wd_step", "goodness_scale", "coef_scale", "norm_scale", "rho",
          "kappa", "inv_m_pos"}
BOOLS = {"no_norm", "finish_rows", "train", "peer", "rescale", "symba", "skip_nonfinite"}
UNIT_STRIDES = {"stride_xp_k", "stride_xn_k", "stride_w_k", "stride_b"}  # triton specialises 1
# Sizes and row strides compiled as multiples of 16 (K = 784, 2000, 4096; triton specialises that):
# 16-byte aligned rows let the loads vectorise and go to shared memory asynchronously. An odd N
# (500) leaves y's rows unaligned: the gradient kernel then loads y element by element.
ALIGNED_INTS = {"N", "K", "stride_xp_m", "stride_xn_m", "stride_w_n"}


def load_backend(path=None):
    """ff_kernels.triton_backend, or another version of that file loaded as part of the package."""
    if path is None:
        import ff_kernels.triton_backend as tb
        return tb
    spec = importlib.util.spec_from_file_location("ff_kernels._triton_backend_other", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_for_sm90(fn, dtype, constexprs, warps, stages, absent=(), strided=False):
    """triton.compile for sm_90 with 16-byte aligned pointers; ``absent`` pointers are None;
    ``strided``: the inner strides are runtime values too (a transposed x), not the unit stride.
    ``dtype``: the input dtype, or {pointer name: element type, "*": the input dtype} where a
    launch differs from the naming rule (sgd_update: the gradient in the parameter's dtype)."""
    overrides = dict(dtype) if isinstance(dtype, dict) else {}
    dtype = overrides.pop("*", dtype)
    while not isinstance(fn, JITFunction):  # an Autotuner wraps the JITFunction
        fn = fn.fn
    sig, attrs, consts = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in UNIT_STRIDES and not strided:
            consts[name] = 1
        if name in absent:
            consts[name] = None
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + overrides.get(name, "fp32" if name in F32_PTRS else "i1" if name in BOOL_PTRS
                                            else dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name in FLOATS else "i1" if name in BOOLS else "i32"
            if name in ALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages})


def _ptxas():
    """The ptxas triton itself assembles with (its PTX may be newer than the system's ptxas)."""
    try:
        from triton.backends.nvidia import compiler as nv
        try:
            return nv.get_ptxas(90).path  # triton >= 3.7 takes the arch
        except TypeError:
            return nv.get_ptxas().path
    except Exception:  # older triton layouts
        return os.environ.get("PTXAS") or shutil.which("ptxas") or "/usr/local/cuda/bin/ptxas"


def analyse(kernel):
    """Registers, stack, spills (ptxas -v), shared memory, wgmma use and pendings of a compiled kernel."""
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([_ptxas(), "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr

    def num(pattern):
        m = re.search(pattern, out)
        return int(m.group(1)) if m else 0

    ttgir = kernel.asm["ttgir"]
    pendings = sorted({int(p) for p in re.findall(r"warp_group_dot_wait.*?pendings = (\d+)", ttgir)})
    return dict(
        registers=num(r"Used (\d+) registers"),
        stack=num(r"(\d+) bytes stack frame"),
        spill_stores=num(r"(\d+) bytes spill stores"),
        spill_loads=num(r"(\d+) bytes spill loads"),
        shared=kernel.metadata.shared,
        wgmma=ptx.count("wgmma.mma_async"),
        pendings=pendings,
    )


_DEF = re.compile(r"^\s*(%[\w.#]+) = ([\w.]+) (.*)$")
_ADDPTR_I32 = re.compile(r"tt\.addptr %[\w.#]+, (%[\w.#]+) : [^,]+, (?:tensor<[^>]*xi32>|i32)")
# ops an index passes through unchanged in kind (shapes, selects, sums)
_PASS_THROUGH = {"arith.addi", "arith.subi", "arith.select", "tt.splat", "tt.broadcast", "tt.expand_dims",
                 "arith.remsi", "arith.divsi", "arith.minsi", "arith.maxsi", "tt.reshape"}


def i32_pointer_offsets(ttir):
    """The tt.addptr lines of a kernel's TTIR whose 32-bit offset comes from a product of two
    runtime values (row * stride, k * stride, split * numel, ...): such a product wraps past 2^31
    elements. Products with a constant (pid * BLOCK) index tiles and stay below the tensor's size."""
    defs = {}
    for line in ttir.splitlines():
        m = _DEF.match(line)
        if m:
            body = m.group(3).split(" : ")[0]
            defs[m.group(1)] = (m.group(2), re.findall(r"%[\w.#]+", body))

    def constant(v):
        op, args = defs.get(v, (None, ()))
        return op == "arith.constant" or (op in ("tt.splat", "tt.broadcast") and all(map(constant, args)))

    def runtime_product(v, depth=0):
        op, args = defs.get(v, (None, ()))
        if op == "arith.muli":
            return not any(map(constant, args))
        if op in _PASS_THROUGH and depth < 32:
            return any(runtime_product(a, depth + 1) for a in args)
        return False

    flagged = []
    for line in ttir.splitlines():
        m = _ADDPTR_I32.search(line)
        if m and runtime_product(m.group(1)):
            flagged.append(line.strip().split(" loc(")[0])
    return flagged


class _Arg:
    """Stands in for a tensor argument of the prune functions (they read the element size)."""

    def __init__(self, elem):
        self._elem = elem

    def element_size(self):
        return self._elem


# (label, dtype, dot precision, element size): bf16 stands for fp16 too (same structure)
PRECISIONS = [("fp32-tf32", "fp32", "tf32", 4), ("fp32-ieee", "fp32", "ieee", 4), ("bf16", "bf16", "tf32", 2)]
FULL_ROW_N = 512  # the widest full row on the GPU (N = 500, the MNIST recipe)


def _dedup(configs):
    unique = []
    for c in configs:
        if all(str(c) != str(u) for u in unique):
            unique.append(c)
    return unique


def _configs(tuned, untuned, prune, elem, **kwargs):
    """(config, "tuned" or "untuned") for the distinct configs the launcher can pick: the pruned
    tuning list and the untuned choice (the first untuned config that survives the pruning)."""
    named = {"xp_ptr": _Arg(elem)}
    choice = prune(untuned, named, **kwargs)[0]
    return [(c, "untuned" if str(c) == str(choice) else "tuned")
            for c in _dedup(list(prune(tuned, named, **kwargs)) + [choice])]


def _blocks(c):
    return "x".join(str(v) for v in c.kwargs.values())


def current_variants(tb):
    """(label, kernel, dtype, constexprs, warps, stages, absent pointers) for every config the
    launcher can pick on sm_90: each tuned and untuned config of each kernel, per precision and
    mode (with a bias: the larger kernels)."""
    out = []
    for plabel, dtype, prec, elem in PRECISIONS:
        base = dict(HAS_BIAS=True, DOT_PRECISION=prec, GROUP_M=8)
        for c, how in _configs(tb._FULL_ROW_CONFIGS, tb._FULL_ROW_UNTUNED, tb._prune_full_row, elem,
                               BLOCK_N=FULL_ROW_N, DOT_PRECISION=prec):
            out.append((f"forward full-row {plabel} {_blocks(c)}x{FULL_ROW_N} ({how})", tb._forward_kernel,
                        dtype, dict(base, FULL_ROW=True, BLOCK_N=FULL_ROW_N, **c.kwargs), c.num_warps,
                        c.num_stages, ()))
        for c, how in _configs(tb._TILED_CONFIGS, tb._TILED_UNTUNED, tb._prune_tiled, elem,
                               DOT_PRECISION=prec):
            out.append((f"forward tiled {plabel} {_blocks(c)} ({how})", tb._forward_kernel, dtype,
                        dict(base, FULL_ROW=False, **c.kwargs), c.num_warps, c.num_stages, ()))
        for mode, consts, absent in [
                ("grad", dict(UPDATE=False, HAS_MOMENTUM=False), ("w_ptr", "b_ptr", "bufw_ptr", "bufb_ptr")),
                ("update+momentum", dict(UPDATE=True, HAS_MOMENTUM=True), ("gw_ptr", "gb_ptr"))]:
            for c, how in _configs(tb._GRAD_CONFIGS, tb._GRAD_UNTUNED, tb._prune_grad, elem,
                                   DOT_PRECISION=prec):
                out.append((f"grad {mode} {plabel} {_blocks(c)} ({how})", tb._grad_kernel, dtype,
                            dict(HAS_BIAS=True, DOT_PRECISION=prec, **consts, **c.kwargs), c.num_warps,
                            c.num_stages, absent))
    out.append(("rows fp16 16x256", tb._rows_kernel, "fp16", dict(BLOCK_M=16, BLOCK_N=256), 4, 1, ()))
    out.append(("peer 1024", tb._peer_kernel, "fp32", dict(BLOCK=1024), 4, 1, ()))
    out.append(("split-reduce update fp16 1024", tb._split_reduce_kernel, "fp16",
                dict(UPDATE=True, HAS_MOMENTUM=True, BLOCK=1024), 4, 1, ("grad_ptr",)))
    if hasattr(tb, "sgd_update"):  # the same kernel on a given fp16 gradient with a bool skip
        out.append(("sgd-update fp16 1024", tb._split_reduce_kernel,
                    {"*": "fp16", "part_ptr": "fp16"},
                    dict(UPDATE=True, HAS_MOMENTUM=True, BLOCK=1024), 4, 1, ("grad_ptr",)))
    return out


def legacy_variants(tb):
    """The same enumeration for the kernels before this change
    (git show 5c476b7:ff_kernels/triton_backend.py): the math and the split count were constexprs
    then (one representative: mean goodness, l2, softplus; split 4 for the gradient, 1 for the
    update)."""
    out = []
    math = dict(GOODNESS_MEAN=True, NORM=0, SYMBA=False, TRAIN=True)
    for plabel, dtype, prec, elem in PRECISIONS:
        base = dict(HAS_BIAS=True, DOT_PRECISION=prec, GROUP_M=8, **math)
        named = {"xp_ptr": _Arg(elem)}
        for tuner, configs, full in [(tb._forward_full_row, tb._FULL_ROW_CONFIGS, True),
                                     (tb._forward_tiled, tb._TILED_CONFIGS, False)]:
            untuned = tb._UNTUNED[tuner][1] if not tb.INTERPRET else configs
            prune = tb._prune_full_row if full else tb._prune_tiled
            extra = dict(BLOCK_N=FULL_ROW_N) if full else {}
            for c in _dedup(prune(configs, named, **extra) + untuned[:1]):
                path = "full-row" if full else "tiled"
                out.append((f"forward {path} {plabel} {_blocks(c)}{'x512' if full else ''}",
                            tb._forward_kernel, dtype,
                            dict(base, FULL_ROW=full, FINISH_ROWS=full, **extra, **c.kwargs),
                            c.num_warps, c.num_stages, ()))
        for mode, consts in [("grad", dict(SPLIT=4, UPDATE=False, HAS_MOMENTUM=False)),
                             ("update+momentum", dict(SPLIT=1, UPDATE=True, HAS_MOMENTUM=True))]:
            for c in _dedup(tb._prune_grad(tb._GRAD_CONFIGS, named) + tb._UNTUNED[tb._grad][1][:1]):
                out.append((f"grad {mode} {plabel} {_blocks(c)}", tb._grad_kernel, dtype,
                            dict(HAS_BIAS=True, DOT_PRECISION=prec, **consts, **c.kwargs), c.num_warps,
                            c.num_stages, ()))
    return out


def variants(tb):
    return current_variants(tb) if hasattr(tb, "_TunedKernel") else legacy_variants(tb)


def report(tb, keep=None, only=None):
    rows = []
    for label, fn, dtype, consts, warps, stages, absent in variants(tb):
        if only and not re.search(only, label):
            continue
        kernel = compile_for_sm90(fn, dtype, consts, warps, stages, absent)
        info = analyse(kernel)
        rows.append((label, warps, stages, info))
        if keep:
            os.makedirs(keep, exist_ok=True)
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
            for ext in ("ttgir", "ptx"):
                with open(os.path.join(keep, f"{stem}.{ext}"), "w") as f:
                    f.write(kernel.asm[ext])
        print(format_row(label, warps, stages, info), flush=True)
    return rows


HEADER = ("| variant | warps/stages | regs | stack B | spill st/ld B | smem KB | wgmma | wait pendings |\n"
          "|---|---|---|---|---|---|---|---|")


def format_row(label, warps, stages, info):
    pend = ",".join(map(str, info["pendings"])) or "-"
    return (f"| {label} | {warps}/{stages} | {info['registers']} | {info['stack']} | "
            f"{info['spill_stores']}/{info['spill_loads']} | {info['shared'] / 1024:.1f} | "
            f"{'yes' if info['wgmma'] else 'no'} | {pend} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", help="path of a triton_backend.py to report instead of the installed one")
    parser.add_argument("--keep", help="directory for the ttgir/ptx of each variant")
    parser.add_argument("--only", help="regex on the variant label")
    parser.add_argument("--odd-n", action="store_true",
                        help="compile with N not a multiple of 16 (N = 500: y's rows unaligned)")
    args = parser.parse_args()
    if args.odd_n:
        ALIGNED_INTS.discard("N")
    tb = load_backend(args.module)
    print(HEADER)
    rows = report(tb, keep=args.keep, only=args.only)
    bad = [r for r in rows if r[3]["spill_stores"] or r[3]["shared"] > SM90_SMEM_PER_BLOCK]
    print(f"\n{len(rows)} variants, {len(bad)} with spills or over {SM90_SMEM_PER_BLOCK // 1024} KB "
          "shared memory",
          file=sys.stderr)


if __name__ == "__main__":
    main()
