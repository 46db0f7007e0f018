"""Correctness verdict of the fused backends against the float64 reference, one flushed line per case.

    python -m bench.gpu_verdict --out OUT/verdict.txt [--backends triton,cuda] [--jobs 4] [--budget 100]
    python -m bench.gpu_verdict --dry-run ...     # CPU: Triton interpreter, CUDA emulator, tiny shapes

Stage 3 of bench/gpu_check.sh. Every case runs one fused step (backend "triton" or "cuda") and the
reference (backend "torch") on float64 copies of the same inputs on the same device, and compares
every output with tests/utils.py's per-dtype tolerance (norm-wise relative error, the reference
rounded to the output's dtype first, as the test suite does):

    PASS backend=triton dtype=tf32 mode=update config=sum-rms-symba shape=67+67x97->523 tol=2.0e-03
         worst=3.1e-04(weight_step) errs=y:1.2e-04,g:2.0e-05,... seed=123 time=0.04s
    FAIL backend=cuda dtype=fp32 mode=update config=hinton shape=... tol=2.0e-05 error=RuntimeError: ...
    SKIP backend=triton dtype=bf16 mode=* config=* shape=* cases=47 reason=...

(one line each). A case that raises is a FAIL with the exception's first line, never a crash.

The plan, per fused backend x dtype (fp32 exact, tf32, fp16, bf16):
  * every config family (tests/utils.py's 12 goodness/norm/loss combinations, FFConfig.hinton() and
    FFConfig.loewex() with peer normalisation) x every mode (gradient; update with momentum 0.9 and
    weight decay; update with dampening 0.9 and decoupled weight decay) on one odd small shape;
  * the section 5 shapes (50000x784->500, 1024x2000->2000, 8192x4096->4096) in fp32, tf32 and bf16
    for one config per family (the popular recipe in both modes everywhere; SymBa, Hinton's and
    loeweX's at 1024x2000->2000): big shapes cost seconds each, and the config-specific code is
    the same at every size, so the small shape carries the configs and the big ones the tiling;
  * ff_layer_forward for three norms, NaN propagation to the loss, and 20 training steps of a small
    two-layer net against the reference backend in the same dtype;
  * the benchmark's own steps (its shapes and dtypes, plain SGD), Triton autotuned.
The Triton kernels run untuned (one config per kernel: one compile per kernel variant, not a dozen)
except in those last cases. The dry run shrinks every shape, runs Triton in fp32 and
fp16 only (bf16 tl.dot gives garbage in the interpreter, which also has no tf32) and the CUDA
kernels through tests/cuda_emu on CPU tensors.

Each (backend, dtype) group runs in its own process, --jobs at a time: Triton compiles dozens of
kernel variants per group and a compile keeps one CPU core busy, so the groups compile side by side.
The groups append to one file, a whole line per write. --budget is a soft time box: a group stops
starting cases when it runs out and says how many it left (SKIP ... reason=time box).

Exit status: 0 every planned case passed; 1 a case failed; 3 no failure, but cases were left unrun.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass

STARTED = time.time()  # the time box counts from here, before the imports (seconds, on a loaded CPU)

DRY_RUN = "--dry-run" in sys.argv or os.environ.get("FF_GPU_CHECK_DRY_RUN") == "1"
if DRY_RUN:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch  # noqa: E402

import ff_kernels as ffk  # noqa: E402
from ff_kernels.backends import PeerNorm, SGDUpdate  # noqa: E402
from bench.common import DRY_RUN_SHAPES, GPU_SHAPES  # noqa: E402
from tests.utils import ALL_CONFIGS, TOLERANCE, config_id, float64_reference  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = torch.device("cpu" if DRY_RUN else "cuda")

# ================================================================ the plan

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS = ("triton", "cuda")
FAMILIES = {config_id(c): c for c in ALL_CONFIGS}
FAMILIES["hinton"] = ffk.FFConfig.hinton()
FAMILIES["loewex"] = ffk.FFConfig.loewex()
RECIPE = "mean-l2-softplus"  # ALL_CONFIGS' popular-recipe member: theta 0.3 for unit-variance inputs
MODES = {
    "grad": {},
    "update": dict(lr=0.5, momentum=0.9, weight_decay=0.05),  # PyTorch's SGD (coupled weight decay)
    "update-hinton": dict(lr=0.5, momentum=0.9, dampening=0.9, weight_decay=0.05,
                          decoupled_weight_decay=True),  # Hinton's gradient smoothing and weight cost
    "sgd": dict(lr=0.5),  # plain SGD, the benchmark's step (bench/common.py's fused_step)
}
FAMILY_MODES = ("grad", "update", "update-hinton")  # every config family runs these
# (B+, B-, K, N). Small: nothing a multiple of a tile; on the GPU N > 512 takes Triton's tiled path
# (the 50000x784->500 shape takes its full-row path); in the interpreter N <= 64 is a full row.
SMALL = (21, 19, 40, 36) if DRY_RUN else (67, 61, 97, 523)
BIG = [(35, 41, 50, 80)] if DRY_RUN else [(50000, 50000, 784, 500), (1024, 1024, 2000, 2000),
                                           (8192, 8192, 4096, 4096)]
BIG_DTYPES = ("fp32", "tf32", "bf16")  # DESIGN section 5: fp32 (tf32) and bf16; exact fp32 too
FAMILY_AT_BIG = [("sum-rms-symba", "grad"), ("hinton", "update-hinton"), ("loewex", "update")]
# stage 4's layer-step shapes and dtypes (fp32 runs as tf32 there; the interpreter has no tf32)
BENCH_STEPS = [((sh.batch, sh.batch, sh.k, sh.n),
                "bf16" if sh.dtype == torch.bfloat16 else ("fp32" if DRY_RUN else "tf32"))
               for sh in (DRY_RUN_SHAPES if DRY_RUN else GPU_SHAPES)]
FORWARD_CONFIGS = ["mean-l2-softplus", "sum-rms-softplus", "mean-none-softplus"]
# 20 steps against the reference backend in the same dtype: rounding differences compound, and 16-bit
# weights round every step (tests/test_triton_backend.py's twenty-step test uses the same bounds).
TRAIN_SIZES, TRAIN_BATCH, TRAIN_STEPS = ([40, 36, 36], 21, 20) if DRY_RUN else ([97, 256, 256], 128, 20)
# The Triton interpreter takes a fraction of a second a step: there the dry run rehearses 5 steps.
INTERPRETER_TRAIN_STEPS = 5
TRAIN_TOL = {"fp32": 1e-4, "tf32": 1e-2, "fp16": 3e-2, "bf16": 3e-2}


def dry_run_skip_reason(backend: str, dtype: str):
    """Why a group does not run in the dry run (None: it runs)."""
    if DRY_RUN and backend == "triton" and dtype == "bf16":
        return "bf16 tl.dot gives garbage in the Triton interpreter (DESIGN section 4): GPU only"
    if DRY_RUN and backend == "triton" and dtype == "tf32":
        return "the Triton interpreter has no tf32 (its dots are exact fp32): GPU only"
    return None


@dataclass(frozen=True)
class Case:
    backend: str
    dtype: str
    mode: str  # a MODES key, "forward", "nan" or "train"
    config: str  # a FAMILIES key
    shape: tuple  # (B+, B-, K, N); for "train" (batch, batch, sizes[0], sizes[-1])
    autotune: bool = False  # Triton: the autotuner picks the configs (else one fixed config a kernel)

    def __str__(self):
        mp, mn, k, n = self.shape
        return (f"backend={self.backend} dtype={self.dtype} mode={self.mode} config={self.config} "
                f"shape={mp}+{mn}x{k}->{n}" + (" autotune=on" if self.autotune else ""))

    @property
    def seed(self) -> int:
        return zlib.crc32(str(self).encode())  # fixed per case: a failure replays


def symba_shape(shape, config):
    """SymBa pairs rows by index: B- = B+."""
    mp, mn, k, n = shape
    return (mp, mp, k, n) if config.loss == "symba" else shape


def plan(backend: str, dtype: str) -> list:
    cases = [Case(backend, dtype, mode, name, symba_shape(SMALL, cfg))
             for name, cfg in FAMILIES.items() for mode in FAMILY_MODES]
    cases += [Case(backend, dtype, "forward", name, SMALL) for name in FORWARD_CONFIGS]
    cases += [Case(backend, dtype, "nan", RECIPE, SMALL)]
    cases += [Case(backend, dtype, "train", RECIPE, (TRAIN_BATCH, TRAIN_BATCH, TRAIN_SIZES[0],
                                                     TRAIN_SIZES[-1]))]
    if dtype in BIG_DTYPES:
        cases += [Case(backend, dtype, mode, RECIPE, shape) for shape in BIG for mode in ("grad", "update")]
        at = BIG[1] if len(BIG) > 1 else BIG[0]
        cases += [Case(backend, dtype, mode, name, symba_shape(at, FAMILIES[name]))
                  for name, mode in FAMILY_AT_BIG]
    # Last, the benchmark's own steps (shape, dtype, plain SGD), Triton autotuned: this checks the
    # configs the autotuner picks there, and compiles every candidate into Triton's on-disk cache
    # while the machine is busy building anyway, so that stage 4 only times them.
    cases += [Case(backend, dtype, "sgd", RECIPE, shape, autotune=backend == "triton")
              for shape, bench_dtype in BENCH_STEPS if bench_dtype == dtype]
    return cases


def tolerance(dtype: str) -> float:
    return TOLERANCE["tf32"] if dtype == "tf32" else TOLERANCE[DTYPES[dtype]]


# ================================================================ inputs and errors

def round_to_tf32(t):
    """t rounded to TF32 (10-bit mantissa, nearest, ties away), as tests/test_cuda_emulated.py does."""
    i = t.contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def layer_inputs(case: Case, cfg):
    """x_pos, x_neg, W, b drawn on the device (a CPU generator is seconds at 50000 x 784), scaled as
    tests/utils.py's make_layer: about half the ReLUs active, goodness O(1). tf32 on the small
    shape: x and W TF32-representable, so that the forward GEMM is exact and only the gradient GEMM's
    operand rounding remains; with a few dozen rows the raw rounding (2^-11 per product) need not
    average out below the tolerance, which would say nothing about the kernels (the tests do the
    same). The big shapes take raw fp32: their errors average out."""
    mp, mn, k, n = case.shape
    gen = torch.Generator(device=DEVICE).manual_seed(case.seed)
    x_pos = torch.randn(mp, k, generator=gen, device=DEVICE)
    x_neg = torch.randn(mn, k, generator=gen, device=DEVICE)
    w = torch.randn(n, k, generator=gen, device=DEVICE) / k ** 0.5
    b = torch.randn(n, generator=gen, device=DEVICE) * 0.1
    if case.dtype == "tf32" and mp + mn < 1000:
        x_pos, x_neg, w = round_to_tf32(x_pos), round_to_tf32(x_neg), round_to_tf32(w)
    dtype = DTYPES[case.dtype]
    return x_pos.to(dtype), x_neg.to(dtype), w.to(dtype), b.to(dtype)


def rel_err(out, ref) -> float:
    """tests/utils.py's rel_err_in_dtype, computed on the device: |out - ref| / |ref| with the
    float64 reference rounded to the output's dtype first (the best a kernel can return)."""
    ref = ref.to(out.dtype).double()
    denom = ref.norm().item()
    return (out.double() - ref).norm().item() / (denom if denom > 0 else 1.0)


def step_err(new, old, ref_new) -> float:
    """Relative error of an in-place update (new - old) against the reference's, less what rounding
    the parameter to its own dtype explains (tests/test_triton_backend.py's measure)."""
    step = new.double() - old.double()
    ref_step = ref_new.double() - old.double()
    rounding = torch.finfo(new.dtype).eps * ref_new.double().norm().item()
    return max(0.0, (step - ref_step).norm().item() - rounding) / max(ref_step.norm().item(), 1e-300)


# ================================================================ running a backend

def emulated(backend: str) -> bool:
    return DRY_RUN and backend == "cuda"


def fused_step(backend, x_pos, x_neg, w, b, cfg, mode_kw, bufs, peer_mean):
    """One step on the fused backend: the public op on the GPU; in the dry run the CUDA backend's
    layer_step directly on CPU tensors, with the emulated module standing in for ff_kernels._C and
    the SGDUpdate / PeerNorm built as ops.py builds them (buffers given: not a first step)."""
    if not emulated(backend):
        return ffk.ff_layer_step(x_pos, x_neg, w, b, config=cfg, backend=backend, momentum_buffers=bufs,
                                 peer_mean=peer_mean, **mode_kw)
    from bench.common import emulated_cuda_backend
    from ff_kernels import cuda_backend
    update = peer = None
    if mode_kw:
        update = SGDUpdate(mode_kw["lr"], mode_kw.get("momentum", 0.0), mode_kw.get("weight_decay", 0.0),
                           *(bufs or (None, None)),
                           dampening=mode_kw.get("dampening", 0.0),
                           decoupled_weight_decay=mode_kw.get("decoupled_weight_decay", False))
    if peer_mean is not None:
        peer = PeerNorm(peer_mean, cfg.peer_rho, cfg.peer_kappa(w.shape[0], x_pos.shape[0]))
    with emulated_cuda_backend():
        return cuda_backend.layer_step(x_pos, x_neg, w, b, cfg, update, peer)


def fused_forward(backend, x, w, b, cfg):
    if not emulated(backend):
        return ffk.ff_layer_forward(x, w, b, config=cfg, backend=backend)
    from bench.common import emulated_cuda_backend
    from ff_kernels import cuda_backend
    with emulated_cuda_backend():
        return cuda_backend.layer_forward(x, w, b, cfg)


# ================================================================ the checks

def check_step(case: Case) -> dict:
    """One layer step, every output against the float64 reference. Returns {output: error}."""
    cfg = FAMILIES[case.config]
    mode_kw = MODES[case.mode]
    x_pos, x_neg, w, b = layer_inputs(case, cfg)
    n, k = w.shape
    bufs = peer_mean = None
    if mode_kw.get("momentum"):  # buffers as a previous step leaves them: not a first step
        gen = torch.Generator(device=DEVICE).manual_seed(case.seed + 1)
        bufs = (torch.randn(n, k, generator=gen, device=DEVICE) * 1e-2,
                torch.randn(n, generator=gen, device=DEVICE) * 1e-2)
    if cfg.peer_norm != "none":  # a running mean some steps in, not the 0.5 it starts at
        peer_mean = 0.5 + 0.1 * torch.rand(n, generator=torch.Generator(device=DEVICE).manual_seed(
            case.seed + 2), device=DEVICE)
    ref_kw = dict(mode_kw)
    if bufs is not None:
        ref_kw["momentum_buffers"] = bufs
    if peer_mean is not None:
        ref_kw["peer_mean"] = peer_mean.double().clone()
    ref, w_ref, b_ref = float64_reference(x_pos, x_neg, w, b, cfg, **ref_kw)

    w0, b0 = w.clone(), b.clone()
    out = fused_step(case.backend, x_pos, x_neg, w, b, cfg, mode_kw, bufs, peer_mean)
    if out.y_pos.dtype != w.dtype or out.g_pos.dtype != torch.float32 or out.loss.dim() != 0:
        raise AssertionError(f"output dtypes/shapes: y {out.y_pos.dtype}, g {out.g_pos.dtype}, "
                             f"loss dim {out.loss.dim()}")
    errs = {"y": rel_err(torch.cat([out.y_pos, out.y_neg]), torch.cat([ref.y_pos, ref.y_neg])),
            "g": rel_err(torch.cat([out.g_pos, out.g_neg]), torch.cat([ref.g_pos, ref.g_neg])),
            "loss": rel_err(out.loss, ref.loss)}
    if not mode_kw:
        errs["grad_weight"] = rel_err(out.grad_weight, ref.grad_weight)
        errs["grad_bias"] = rel_err(out.grad_bias, ref.grad_bias)
        errs["weight_unchanged"] = 0.0 if torch.equal(w, w0) else float("inf")
    else:
        errs["weight_step"] = step_err(w, w0, w_ref)
        errs["bias_step"] = step_err(b, b0, b_ref)
        if bufs is not None:
            errs["buf_weight"] = rel_err(bufs[0], ref.momentum_buffers[0])
            errs["buf_bias"] = rel_err(bufs[1], ref.momentum_buffers[1])
    if peer_mean is not None:
        errs["peer_mean"] = rel_err(peer_mean, ref.peer_mean)
    return errs


def check_forward(case: Case) -> dict:
    cfg = FAMILIES[case.config]
    x, _, w, b = layer_inputs(case, cfg)
    y, g = fused_forward(case.backend, x, w, b, cfg)
    y_ref, g_ref = ffk.ff_layer_forward(x.double(), w.double(), b.double(), config=cfg, backend="torch")
    return {"y": rel_err(y, y_ref), "g": rel_err(g, g_ref)}


def check_nan(case: Case) -> dict:
    """NaN in one input element must reach the loss (DESIGN section 2): error 0 if it does, inf if
    a backend turned it into a finite number."""
    cfg = FAMILIES[case.config]
    x_pos, x_neg, w, b = layer_inputs(case, cfg)
    x_pos[1, 2] = float("nan")
    out = fused_step(case.backend, x_pos, x_neg, w, b, cfg, {}, None, None)
    return {"loss_is_nan": 0.0 if torch.isnan(out.loss).item() else float("inf")}


def check_training(case: Case) -> dict:
    """TRAIN_STEPS SGD steps (lr 0.5, momentum 0.9, weight decay) of a two-layer net, every layer on the
    previous one's output, on the fused backend and on the reference backend in the same dtype from
    the same start: the weights' total change and the losses must agree."""
    cfg = FAMILIES[case.config]
    dtype = DTYPES[case.dtype]
    gen = torch.Generator(device=DEVICE).manual_seed(case.seed)
    start = [(torch.randn(n, k, generator=gen, device=DEVICE) / k ** 0.5,
              torch.randn(n, generator=gen, device=DEVICE) * 0.1)
             for k, n in zip(TRAIN_SIZES[:-1], TRAIN_SIZES[1:])]
    start = [(w.to(dtype), b.to(dtype)) for w, b in start]
    params = {name: [(w.clone(), b.clone()) for w, b in start] for name in ("fused", "torch")}
    # zero buffers given from the first step on: the same as PyTorch's first step without dampening
    bufs = {name: [(torch.zeros(w.shape, device=DEVICE), torch.zeros(b.shape, device=DEVICE))
                   for w, b in start] for name in params}
    losses = {name: [] for name in params}
    steps = INTERPRETER_TRAIN_STEPS if DRY_RUN and case.backend == "triton" else TRAIN_STEPS
    # lr 0.5: 16-bit weights must move by many of their own ulps, or the comparison measures
    # rounding noise (lr 0.05 over 5 steps: 5e-2 for bf16 on the emulator; lr 0.5 over 20: 7e-3)
    mode_kw = dict(lr=0.5, momentum=0.9, weight_decay=1e-3)
    for _ in range(steps):
        x_pos = torch.randn(TRAIN_BATCH, TRAIN_SIZES[0], generator=gen, device=DEVICE).to(dtype)
        x_neg = (torch.randn(TRAIN_BATCH, TRAIN_SIZES[0], generator=gen, device=DEVICE) * 0.5).to(dtype)
        for name in params:
            xp, xn = x_pos, x_neg
            for (w, b), buf in zip(params[name], bufs[name]):
                if name == "fused":
                    out = fused_step(case.backend, xp, xn, w, b, cfg, mode_kw, buf, None)
                else:
                    out = ffk.ff_layer_step(xp, xn, w, b, config=cfg, backend="torch",
                                            momentum_buffers=buf, **mode_kw)
                losses[name].append(out.loss.float())
                xp, xn = out.y_pos, out.y_neg
    delta = lambda name: torch.cat([(p - p0).double().flatten()  # noqa: E731
                                    for (w, b), (w0, b0) in zip(params[name], start)
                                    for p, p0 in ((w, w0), (b, b0))])
    return {"weight_change": rel_err(delta("fused"), delta("torch")),
            "losses": rel_err(torch.stack(losses["fused"]), torch.stack(losses["torch"]))}


CHECKS = {"forward": check_forward, "nan": check_nan, "train": check_training}  # else check_step


def run_case(case: Case) -> str:
    tol = TRAIN_TOL[case.dtype] if case.mode == "train" else tolerance(case.dtype)
    t0 = time.perf_counter()
    try:
        check = CHECKS.get(case.mode, check_step)
        if case.autotune:
            from ff_kernels import triton_backend
            triton_backend.set_autotune(True)
        try:
            errs = check(case)
        finally:
            if case.autotune:
                triton_backend.set_autotune(False)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()  # an asynchronous kernel fault belongs to this case
    except Exception as err:  # a backend that raises is a FAIL with its message, never a crash
        message = (str(err).strip().splitlines() or [""])[0][:300]
        return f"FAIL {case} tol={tol:.1e} seed={case.seed} error={type(err).__name__}: {message}"
    worst = max(errs, key=lambda k: errs[k] if errs[k] == errs[k] else float("inf"))  # NaN is worst
    ok = all(v <= tol for v in errs.values())  # "not <=" also catches NaN
    listed = ",".join(f"{k}:{v:.1e}" for k, v in errs.items())
    return (f"{'PASS' if ok else 'FAIL'} {case} tol={tol:.1e} worst={errs[worst]:.1e}({worst}) "
            f"errs={listed} seed={case.seed} time={time.perf_counter() - t0:.2f}s")


# ================================================================ one group, in its own process

class Sink:
    """Appends whole lines to the verdict file, one write(2) per line (O_APPEND: the groups' lines
    never interleave) so a run cut short keeps every line it finished. ``echo`` also prints the line
    (the console gets the FAIL lines, up to ECHO_FAILS per group: the file has them all)."""

    ECHO_FAILS = 4

    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.fails_echoed = 0

    def line(self, text: str, echo: bool = False) -> None:
        os.write(self.fd, (text + "\n").encode())
        if echo and text.startswith("FAIL"):
            self.fails_echoed += 1
            if self.fails_echoed > self.ECHO_FAILS:
                return
            if self.fails_echoed == self.ECHO_FAILS:
                text += "\n  (more FAIL lines of this group in the verdict file only)"
        if echo:
            os.write(sys.stdout.fileno(), (text + "\n").encode())


def run_group(backend: str, dtype: str, sink: Sink, deadline: float) -> int:
    if dtype == "tf32" or dtype == "fp32":
        from bench.common import set_fp32_matmul_tf32
        set_fp32_matmul_tf32(dtype == "tf32")  # read by both fused backends and by cuBLAS
    if backend == "triton":
        from ff_kernels import triton_backend
        triton_backend.set_autotune(False)
    cases = plan(backend, dtype)
    if not emulated(backend):  # is the backend there at all? one line instead of a FAIL per case
        try:
            ffk.backends.select_backend(backend, DEVICE, DTYPES[dtype])
        except Exception as err:
            sink.line(f"FAIL backend={backend} dtype={dtype} mode=* config=* shape=* cases={len(cases)} "
                      f"error={type(err).__name__}: {err}", echo=True)
            return 1
    failed = False
    for i, case in enumerate(cases):
        reason = "time box reached" if time.time() > deadline else None
        if reason is None:
            try:
                line = run_case(case)
            except KeyboardInterrupt:
                reason = "interrupted (stage time limit)"
        if reason:
            sink.line(f"SKIP backend={backend} dtype={dtype} mode=* config=* shape=* "
                      f"cases={len(cases) - i} reason={reason}", echo=True)
            return 1 if failed else (3 if reason == "time box reached" else 124)
        failed |= line.startswith("FAIL")
        sink.line(line, echo=line.startswith("FAIL"))
    return 1 if failed else 0


# ================================================================ the driver

def count(path: str, backends) -> dict:
    """{status: number of cases} over the file's verdict lines of these backends (the other stage
    appends to the same file); a SKIP line counts its cases."""
    totals = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    with open(path) as f:
        for line in f:
            status = line.split(" ", 1)[0]
            if status in totals and line.split(" ", 2)[1].removeprefix("backend=") in backends:
                n = [t for t in line.split() if t.startswith("cases=")]
                totals[status] += int(n[0][6:]) if n and status == "SKIP" else 1
    return totals


GROUP_START_S = 20  # a group process's start (imports, CUDA context) on a busy machine


def main() -> int:
    # timeout(1) sends SIGINT; a background job of a non-interactive shell starts with SIGINT
    # ignored, so install Python's handler explicitly (and treat SIGTERM alike).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="verdict file, appended to")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--jobs", type=int, default=2 if DRY_RUN else 4, help="groups run at once")
    # the soft time box: bench/gpu_check.sh exports its stage limit; keep 15 % (20 s at least) of it
    # to finish the cases under way and wrap up
    limit = float(os.environ.get("STAGE_LIMIT", 0))
    ap.add_argument("--budget", type=float, default=limit - max(20.0, 0.15 * limit) if limit else 1e9,
                    help="seconds after which no new case starts (default: 85 %% of $STAGE_LIMIT)")
    ap.add_argument("--dry-run", action="store_true", help="CPU: Triton interpreter, CUDA emulator")
    ap.add_argument("--group", help=argparse.SUPPRESS)  # BACKEND:DTYPE, run by the driver
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # epoch seconds
    args = ap.parse_args()
    sink = Sink(args.out)
    if args.group:
        backend, dtype = args.group.split(":")
        try:
            return run_group(backend, dtype, sink, args.deadline)
        except KeyboardInterrupt:  # still starting up: no case ran
            sink.line(f"SKIP backend={backend} dtype={dtype} mode=* config=* shape=* "
                      f"cases={len(plan(backend, dtype))} reason=interrupted (stage time limit)", echo=True)
            return 124

    t0 = STARTED
    deadline = t0 + args.budget
    where = ("CPU dry run: Triton interpreter, CUDA emulator (tests/cuda_emu), tiny shapes"
             if DRY_RUN else torch.cuda.get_device_name())
    sink.line(f"# verdict of {args.backends} vs the float64 reference on {where}; torch {torch.__version__}")
    groups, backends = [], args.backends.split(",")
    for backend in backends:
        for dtype in args.dtypes.split(","):
            reason = dry_run_skip_reason(backend, dtype)
            if reason:
                sink.line(f"SKIP backend={backend} dtype={dtype} mode=* config=* shape=* "
                          f"cases={len(plan(backend, dtype))} reason={reason}", echo=True)
            else:
                groups.append((backend, dtype))
    # Triton first: its groups are the long ones (JIT), so they must not wait for the others.
    groups.sort(key=lambda g: g[0] != "triton")
    if DRY_RUN and "cuda" in backends:  # the emulator, built (or found cached) once, not per group
        from tests.cuda_emu import build as emu_build
        emu_build.build()
    running, rcs = {}, {}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        while groups or running:
            while groups and len(running) < args.jobs:
                backend, dtype = groups.pop(0)
                if time.time() > deadline - GROUP_START_S:  # it would only import and stop
                    sink.line(f"SKIP backend={backend} dtype={dtype} mode=* config=* shape=* "
                              f"cases={len(plan(backend, dtype))} reason=time box reached before the "
                              f"group started", echo=True)
                    rcs[(backend, dtype)] = 3
                    continue
                cmd = [sys.executable, "-m", "bench.gpu_verdict", "--out", args.out, "--group",
                       f"{backend}:{dtype}", "--deadline", str(deadline)] + (["--dry-run"] if DRY_RUN else [])
                running[(backend, dtype)] = (subprocess.Popen(cmd, cwd=ROOT, env=env), time.time())
            for group, (proc, started) in list(running.items()):
                if proc.poll() is not None:
                    rcs[group] = proc.returncode
                    del running[group]
                    sink.line(f"# group {group[0]}/{group[1]} finished: exit status {proc.returncode} in "
                              f"{time.time() - started:.0f} s", echo=True)
            time.sleep(0.2)
    except KeyboardInterrupt:
        for proc, _ in running.values():
            try:
                proc.wait(timeout=10)  # they got the same SIGINT and write their SKIP lines
            except subprocess.TimeoutExpired:
                proc.kill()
        totals = count(args.out, backends)
        sink.line(f"# verdict INTERRUPTED after {time.time() - t0:.0f} s: {totals}", echo=True)
        return 124
    # a group that died without a FAIL line of its own (e.g. a crash of the interpreter) fails too
    crashed = [g for g, rc in rcs.items() if rc not in (0, 1, 3)]
    for backend, dtype in crashed:
        sink.line(f"FAIL backend={backend} dtype={dtype} mode=* config=* shape=* cases=0 "
                  f"error=group process exited with status {rcs[(backend, dtype)]}", echo=True)
    totals = count(args.out, backends)
    sink.line(f"# verdict: {totals['PASS']} PASS, {totals['FAIL']} FAIL, {totals['SKIP']} not run "
              f"in {time.time() - t0:.0f} s", echo=True)
    if totals["FAIL"]:
        return 1
    return 3 if any(rc == 3 for rc in rcs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
