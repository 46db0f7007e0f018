"""What every benchmark shares: the shapes, the eager baseline, the floor, and the timer.

The floor of one layer step (DESIGN.md section 5) is
    max(2 GEMMs x 2*M*K*N flops / matmul rate,  bytes(x read twice + W + y) / copy rate)
with both rates measured on this machine in this run, so "% of floor" means the same on any box.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import ff_kernels as ffk


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


# DESIGN.md section 5 on a GPU; the same aspect ratios shrunk for a 2-core CPU.
GPU_SHAPES = [Shape(50000, 784, 500, torch.float32), Shape(1024, 2000, 2000, torch.float32),
              Shape(8192, 4096, 4096, torch.float32), Shape(8192, 4096, 4096, torch.bfloat16)]
CPU_SHAPES = [Shape(5000, 784, 500, torch.float32), Shape(256, 1000, 1000, torch.float32),
              Shape(1024, 1024, 1024, torch.float32)]


def bench_device() -> torch.device:
    return torch.device(os.environ.get("FF_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))


def shapes_for(device: torch.device):
    return GPU_SHAPES if device.type == "cuda" else CPU_SHAPES


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    key = (str(device), dtype, torch.backends.cuda.matmul.allow_tf32)
    if key not in _RATES:
        s = 8192 if device.type == "cuda" else 2048
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


def make_inputs(shape: Shape, device: torch.device, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x_pos = torch.rand(shape.batch, shape.k, generator=gen).to(device, shape.dtype)
    x_neg = torch.rand(shape.batch, shape.k, generator=gen).to(device, shape.dtype)
    w = (torch.randn(shape.n, shape.k, generator=gen) / shape.k**0.5).to(device, shape.dtype)
    b = (torch.randn(shape.n, generator=gen) * 0.01).to(device, shape.dtype)
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
        forward_loss = torch.compile(forward_loss)

    def step():
        loss, normed = forward_loss(x_pos, x_neg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return normed

    return step


def fused_step(shape: Shape, device: torch.device, backend: str):
    """ff_layer_step on the same inputs, updating in place (lr given) like the eager recipe."""
    x_pos, x_neg, w, b = make_inputs(shape, device)
    return lambda: ffk.ff_layer_step(x_pos, x_neg, w, b, config=CONFIG, lr=LR, backend=backend)


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


def timed_backends(device: torch.device) -> list:
    """The fused backends that run here for this device (never the interpreter on a CPU)."""
    names = []
    for name in ffk.available_backends():
        b = ffk.backends.registered_backends()[name]
        if b.auto_device_types is None or device.type in b.auto_device_types:
            names.append(name)
    return names
