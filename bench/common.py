"""What every benchmark shares: the shapes, the baselines, the floor, the timer and the result rows.

Both ways of running the benchmarks use this file and nothing else for timing, floors and rows:
`pytest bench --benchmark-only` (users; pytest-benchmark's statistics) and stage 4 of
bench/gpu_check.sh, which is that same pytest run with FF_BENCH_JSONL set, so that every result is
appended to a JSON-lines file as soon as it is measured.

The floor of one layer step (DESIGN.md section 5) is
    max(2 GEMMs x 2*M*K*N flops / matmul rate,  bytes(x read twice + W + y) / copy rate)
with both rates measured on this machine in this run, so "% of floor" means the same on any box.

Every time is wall time per call with the device synchronised after each call: host overhead
(Python, launches) is included, as a training loop without CUDA graphs pays it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import ff_kernels as ffk
from ff_kernels.backends import fp32_matmul_uses_tf32

HOST_OVERHEAD = "included: wall time per call, device synchronised after every call"

# FF_GPU_CHECK_DRY_RUN=1 (bench/gpu_check.sh's CPU rehearsal): tiny shapes, the Triton interpreter
# and the CUDA emulator stand in for the GPU. Their numbers are CPU numbers and are labelled so.
DRY_RUN = os.environ.get("FF_GPU_CHECK_DRY_RUN") == "1"


# ================================================================ TF32

def set_fp32_matmul_tf32(enabled: bool) -> None:
    """Let fp32 matmuls use tf32 tensor cores (or not), through the new API when this torch has it:
    once the new API is set, touching the legacy allow_tf32 flag raises."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32" if enabled else "ieee"
    else:
        matmul.allow_tf32 = enabled


# ================================================================ shapes

@dataclass(frozen=True)
class Shape:
    batch: int  # B+ = B-; M = 2 * batch rows
    k: int
    n: int
    dtype: torch.dtype

    @property
    def m(self) -> int:
        return 2 * self.batch

    @property
    def id(self) -> str:
        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        return f"{self.batch}x{self.k}->{self.n}-{name}"

    def flops(self) -> float:
        return 2 * (2.0 * self.m * self.k * self.n)  # forward GEMM + weight-gradient GEMM

    def bytes(self) -> float:
        e = torch.finfo(self.dtype).bits // 8
        return e * (2 * self.m * self.k + self.n * self.k + self.m * self.n)


# DESIGN.md section 5 on a GPU; the same aspect ratios shrunk for a 2-core CPU; tiny for the dry run.
GPU_SHAPES = [Shape(50000, 784, 500, torch.float32), Shape(1024, 2000, 2000, torch.float32),
              Shape(8192, 4096, 4096, torch.float32), Shape(8192, 4096, 4096, torch.bfloat16)]
CPU_SHAPES = [Shape(5000, 784, 500, torch.float32), Shape(256, 1000, 1000, torch.float32),
              Shape(1024, 1024, 1024, torch.float32)]
DRY_RUN_SHAPES = [Shape(48, 40, 36, torch.float32), Shape(40, 64, 80, torch.float32)]


def bench_device() -> torch.device:
    return torch.device(os.environ.get("FF_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))


def shapes_for(device: torch.device):
    if DRY_RUN:
        return DRY_RUN_SHAPES
    return GPU_SHAPES if device.type == "cuda" else CPU_SHAPES


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ================================================================ timer and floor

def median_ms(fn, device, warmup: int = 3, iters: int = 20, stat=None) -> float:
    """Median (or ``stat``) wall time of fn() in ms, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return stat(times) if stat else sorted(times)[len(times) // 2]


_RATES: dict = {}


def measured_rates(device: torch.device, dtype: torch.dtype) -> tuple:
    """(matmul FLOP/s for dtype, copy bytes/s) measured here; tf32 counts for fp32 when enabled."""
    key = (str(device), dtype, fp32_matmul_uses_tf32())
    if key not in _RATES:
        s = 8192 if device.type == "cuda" else (512 if DRY_RUN else 2048)
        a = torch.randn(s, s, device=device).to(dtype)
        # the best of several runs: the floor is what the hardware can do, not a typical run
        mm_ms = median_ms(lambda: a @ a, device, iters=10, stat=min)
        src = torch.empty(64 * 2**20 if device.type == "cuda" else 8 * 2**20, device=device)
        dst = torch.empty_like(src)
        copy_ms = median_ms(lambda: dst.copy_(src), device, iters=10, stat=min)
        _RATES[key] = (2.0 * s**3 / (mm_ms / 1e3), 2.0 * src.numel() * 4 / (copy_ms / 1e3))
    return _RATES[key]


def floor_ms(shape: Shape, device: torch.device) -> float:
    flop_rate, copy_rate = measured_rates(device, shape.dtype)
    return 1e3 * max(shape.flops() / flop_rate, shape.bytes() / copy_rate)


def peak_extra_mb(fn, device: torch.device) -> float:
    """Peak GPU memory one call allocates beyond what was live before it (MB); NaN off CUDA."""
    if device.type != "cuda":
        return float("nan")
    fn()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# ================================================================ the variants of one layer step

def make_inputs(shape: Shape, device: torch.device, seed: int = 0):
    """Inputs drawn on the device itself (a CPU generator takes seconds at 50000 x 784)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x_pos = torch.rand(shape.batch, shape.k, generator=gen, device=device).to(shape.dtype)
    x_neg = torch.rand(shape.batch, shape.k, generator=gen, device=device).to(shape.dtype)
    w = (torch.randn(shape.n, shape.k, generator=gen, device=device) / shape.k**0.5).to(shape.dtype)
    b = (torch.randn(shape.n, generator=gen, device=device) * 0.01).to(shape.dtype)
    return x_pos, x_neg, w, b


CONFIG = ffk.FFConfig.pytorch_recipe()
LR = 1e-3


def eager_recipe(shape: Shape, device: torch.device, compile: bool = False):
    """The popular recipe's layer step: autograd over linear/relu/pow/mean/softplus, SGD step, and
    the l2-normalised output for the next layer. Returns a zero-argument step function."""
    x_pos, x_neg, w, b = make_inputs(shape, device)
    layer = torch.nn.Linear(shape.k, shape.n, device=device, dtype=shape.dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    opt = torch.optim.SGD(layer.parameters(), lr=LR)

    def forward_loss(x_pos, x_neg):
        h_pos, h_neg = F.relu(layer(x_pos)), F.relu(layer(x_neg))
        g_pos, g_neg = h_pos.pow(2).mean(1), h_neg.pow(2).mean(1)
        loss = F.softplus(torch.cat([CONFIG.theta - g_pos, g_neg - CONFIG.theta])).mean()
        normed = [h.detach() / (h.detach().norm(dim=1, keepdim=True) + CONFIG.eps) for h in (h_pos, h_neg)]
        return loss, normed

    if compile:
        forward_loss = compiled(forward_loss)

    def step():
        loss, normed = forward_loss(x_pos, x_neg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return normed

    return step


def compile_backend() -> str:
    """torch.compile's backend for the "compile" baselines: inductor, except in the dry run, where
    "eager" rehearses the dynamo capture in seconds (inductor's C++ codegen takes minutes on 2 cores;
    the rows say which backend ran)."""
    return "eager" if DRY_RUN else "inductor"


def with_compile(device: torch.device) -> bool:
    """torch.compile is a baseline on the GPU (and rehearsed in the dry run); on a 2-core CPU
    inductor's compile time dwarfs the run: opt in with FF_BENCH_COMPILE=1."""
    return device.type == "cuda" or DRY_RUN or os.environ.get("FF_BENCH_COMPILE") == "1"


def compiled(fn):
    return torch.compile(fn, backend=compile_backend())


def two_gemms(shape: Shape, device: torch.device):
    """The two cuBLAS GEMMs a layer step cannot avoid, alone: the forward H = X W^T ([M, K] x [K, N])
    and the weight gradient G^T X ([N, M] x [M, K]), into preallocated outputs. The "fusion is free"
    bar (DESIGN section 5) compares the fused step with this."""
    x_pos, x_neg, w, _ = make_inputs(shape, device)
    x = torch.cat([x_pos, x_neg])
    h = torch.empty(shape.m, shape.n, device=device, dtype=shape.dtype)
    g = torch.randn(shape.m, shape.n, device=device).to(shape.dtype)
    grad_w = torch.empty_like(w)

    def step():
        torch.mm(x, w.t(), out=h)
        torch.mm(g.t(), x, out=grad_w)

    return step


def fused_step(shape: Shape, device: torch.device, backend: str):
    """ff_layer_step on the same inputs, updating in place (lr given) like the eager recipe. On CPU
    tensors backend "cuda" means the CUDA emulator (dry run only)."""
    x_pos, x_neg, w, b = make_inputs(shape, device)
    if backend == "cuda" and device.type == "cpu":
        from ff_kernels import cuda_backend
        from ff_kernels.backends import SGDUpdate
        update = SGDUpdate(LR, 0.0, 0.0, None, None)

        def step():
            with emulated_cuda_backend():
                return cuda_backend.layer_step(x_pos, x_neg, w, b, CONFIG, update)
        return step
    return lambda: ffk.ff_layer_step(x_pos, x_neg, w, b, config=CONFIG, lr=LR, backend=backend)


def timed_backends(device: torch.device) -> list:
    """The fused backends that run here for this device (never the interpreter on a CPU, except in
    the dry run, which rehearses both fused backends: Triton interpreted, CUDA emulated)."""
    if DRY_RUN and device.type == "cpu":
        return ["triton", "cuda"]
    names = []
    for name in ffk.available_backends():
        b = ffk.backends.registered_backends()[name]
        if b.auto_device_types is None or device.type in b.auto_device_types:
            names.append(name)
    return names


# ================================================================ the CUDA emulator as the backend

_EMULATED_MODULE = None


@contextlib.contextmanager
def emulated_cuda_backend(sm_count: int = 132):
    """Inside this block ff_kernels.cuda_backend runs csrc's kernels on CPU tensors: the module
    built by tests/cuda_emu stands in for ff_kernels._C (as tests/test_cuda_emulated.py does), and
    the two torch.cuda queries the wrapper makes for a tensor's device (current stream, current
    device) answer for the emulated device. Call ``cuda_backend.layer_step`` / ``layer_forward``
    directly: ff_layer_step still refuses CPU tensors for backend="cuda", as it must. Everything
    is restored on exit. sm_count: the SM count the launchers see (132: an H100 SXM)."""
    global _EMULATED_MODULE
    from ff_kernels import cuda_backend
    from tests.cuda_emu import build as emu_build
    if _EMULATED_MODULE is None:
        _EMULATED_MODULE = emu_build.load(emu_build.build())  # cached under build/cuda_emu/
    saved = (cuda_backend.load_extension, torch.cuda.current_stream, torch.cuda.current_device,
             {k: os.environ.get(k) for k in ("FF_EMU_SM_COUNT", "FF_EMU_WORKERS")})
    cuda_backend.load_extension = lambda: (_EMULATED_MODULE, "")
    torch.cuda.current_stream = lambda device=None: types.SimpleNamespace(cuda_stream=0x5EED0)
    torch.cuda.current_device = lambda: 0
    os.environ["FF_EMU_SM_COUNT"] = str(sm_count)
    os.environ.setdefault("FF_EMU_WORKERS", "2")
    try:
        yield _EMULATED_MODULE
    finally:
        cuda_backend.load_extension, torch.cuda.current_stream, torch.cuda.current_device = saved[:3]
        for k, v in saved[3].items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ================================================================ result rows

def device_label(device: torch.device, variant: str = "") -> str:
    """What produced a number: the GPU's name, or "cpu" and how a GPU backend was stood in for."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if variant.endswith("triton"):
        return "cpu (triton interpreter)"
    if variant.endswith("cuda"):
        return "cpu (cuda emulator)"
    return "cpu"


def run_info(device: torch.device) -> dict:
    """Fields every row carries: the machine and the software that produced it."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(card=torch.cuda.get_device_name(device) if device.type == "cuda" else
                f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                torch=torch.__version__, triton=triton_version, tf32=fp32_matmul_uses_tf32(),
                host_overhead=HOST_OVERHEAD, dry_run=DRY_RUN)


# ms of the two GEMMs alone per shape id, filled by the "2gemm" rows (bench/conftest.py runs them
# first), read by every other row of the shape for its "x of 2-GEMM time".
TWO_GEMM_MS: dict = {}


def layer_row(shape: Shape, variant: str, ms: float, device: torch.device, step, rounds: int,
              **extra) -> dict:
    """One benchmark result of a layer step: time, throughput, floor, the 2-GEMM ratio, memory."""
    if variant == "2gemm":
        TWO_GEMM_MS[shape.id] = ms
    floor = floor_ms(shape, device)
    gemm = TWO_GEMM_MS.get(shape.id)
    return dict(kind="layer", shape=shape.id, batch=shape.batch, k=shape.k, n=shape.n,
                dtype=shape.id.rsplit("-", 1)[1], variant=variant, device=device_label(device, variant),
                ms=ms, tflops=shape.flops() / (ms / 1e3) / 1e12, floor_ms=floor,
                pct_of_floor=100 * floor / ms, x_2gemm=ms / gemm if gemm else float("nan"),
                peak_extra_mb=peak_extra_mb(step, device), rounds=rounds, **extra, **run_info(device))


def append_jsonl(row: dict) -> None:
    """Append one row to $FF_BENCH_JSONL (when set) and flush: a run cut short keeps what it had."""
    path = os.environ.get("FF_BENCH_JSONL")
    if path:
        strict = {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}  # NaN: null
        with open(path, "a") as f:
            f.write(json.dumps(strict) + "\n")
            f.flush()
