"""The backend registry: one small table that "torch", "triton" and "cuda" plug into.

A backend is a module with two functions of validated inputs (see ``ops.py``):

    layer_step(x_pos, x_neg, weight, bias, config, update) -> FFStepOutput
    layer_forward(x, weight, bias, config) -> (y, goodness)

``update`` is None (gradient mode) or an ``SGDUpdate`` whose tensors the backend changes in place
(weight, bias, momentum buffers); nothing else is mutated. Each op is therefore a pure function of
its inputs plus declared in-place updates, the shape ``torch.library`` needs to register it.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class SGDUpdate:
    """Fused SGD in PyTorch's convention: d = grad + wd * p; buf = mu * buf + d; p -= lr * buf."""

    lr: float
    momentum: float
    weight_decay: float
    buf_weight: Optional[torch.Tensor]  # None when momentum == 0
    buf_bias: Optional[torch.Tensor]  # None when momentum == 0 or there is no bias


@dataclass
class FFStepOutput:
    """What ``ff_layer_step`` returns. Gradients are None in update mode (lr given)."""

    y_pos: torch.Tensor
    y_neg: torch.Tensor
    g_pos: torch.Tensor
    g_neg: torch.Tensor
    loss: torch.Tensor
    grad_weight: Optional[torch.Tensor] = None
    grad_bias: Optional[torch.Tensor] = None
    momentum_buffers: Optional[tuple] = None


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # dotted path of the implementing module, imported on first use
    priority: int  # "auto" takes the highest-priority usable backend
    auto_device_types: Optional[tuple]  # device types "auto" may pick this backend for; None: any
    # None when the backend can run on this machine, else why not (no import of heavy deps needed
    # by the caller: the function does its own lazy checks).
    unavailable_reason: Callable[[], Optional[str]]
    # None when the backend handles tensors of this device and dtype, else why not.
    unsupported_reason: Callable[[torch.device, torch.dtype], Optional[str]]

    def impl(self):
        return importlib.import_module(self.module)


_REGISTRY: dict = {}

# Tests set this: every output a backend allocates through new_output() starts as NaN, so an element
# a kernel forgets to write shows up instead of passing by luck.
POISON_OUTPUTS = False


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty for op outputs and scratch (NaN-filled under POISON_OUTPUTS)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if POISON_OUTPUTS else t


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def registered_backends() -> dict:
    return dict(_REGISTRY)


def backend_status() -> dict:
    """Each registered backend's name -> "available" or the reason it is not."""
    return {name: (b.unavailable_reason() or "available") for name, b in _REGISTRY.items()}


def available_backends() -> list:
    """Names of the backends that run on this machine, fastest first."""
    usable = [b for b in _REGISTRY.values() if b.unavailable_reason() is None]
    return [b.name for b in sorted(usable, key=lambda b: -b.priority)]


def select_backend(name, device: torch.device, dtype: torch.dtype) -> Backend:
    """Resolve ``backend=`` for tensors of ``device``/``dtype``; ValueError/TypeError says why not."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority):
            if ((b.auto_device_types is None or device.type in b.auto_device_types)
                    and b.unavailable_reason() is None
                    and b.unsupported_reason(device, dtype) is None):
                return b
        raise ValueError(f"backend='auto': no backend handles {dtype} tensors on {device}")
    if name not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {sorted(_REGISTRY)}, got {name!r}")
    b = _REGISTRY[name]
    reason = b.unavailable_reason()
    if reason is not None:
        raise ValueError(f"backend={name!r} is not available here: {reason}")
    reason = b.unsupported_reason(device, dtype)
    if reason is not None:
        raise TypeError(f"backend={name!r} cannot run this input: {reason}")
    return b


# ---------------------------------------------------------------- the reference backend
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _torch_unsupported(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    return None if dtype in _FLOAT_DTYPES else f"dtype {dtype} is not a floating-point dtype"


register_backend(Backend(
    name="torch",
    module="ff_kernels.reference",
    priority=0,
    auto_device_types=None,
    unavailable_reason=lambda: None,
    unsupported_reason=_torch_unsupported,
))


# ---------------------------------------------------------------- the Triton backend
def _triton_interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)  # asked on every "auto" call; the answer is fixed per process
def _triton_unavailable() -> Optional[str]:
    import importlib.util
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if not torch.cuda.is_available() and not _triton_interpreting():
        return "no CUDA device (set TRITON_INTERPRET=1 before importing to run Triton on the CPU)"
    return None


def _triton_unsupported(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if device.type != "cuda" and not (device.type == "cpu" and _triton_interpreting()):
        return f"tensors on {device}: Triton runs on CUDA devices (or the CPU under TRITON_INTERPRET=1)"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype}: the Triton kernels take float16, bfloat16 or float32"
    return None


register_backend(Backend(
    name="triton",
    module="ff_kernels.triton_backend",
    # "auto" order = expected speed until the GPU benchmarks rank them: Triton's autotuned tl.dot
    # (wgmma on Hopper) ahead of the first, WMMA-based CUDA kernels.
    priority=30,
    auto_device_types=("cuda",),  # the interpreter is for tests: "auto" never picks it on the CPU
    unavailable_reason=_triton_unavailable,
    unsupported_reason=_triton_unsupported,
))


# ---------------------------------------------------------------- the CUDA C++ backend
@functools.lru_cache(maxsize=None)
def _cuda_unavailable() -> Optional[str]:
    """None when ff_kernels._C loaded and sees a CUDA device, else why not (never raises)."""
    from ._ext import load_extension
    mod, reason = load_extension()
    if mod is None:
        return reason
    count, why = mod.device_count()
    if count <= 0:
        return f"ff_kernels._C sees no CUDA device: {why or 'device count is 0'}"
    return None


def _cuda_unsupported(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if device.type != "cuda":
        return f"tensors on {device}: the CUDA backend runs on CUDA devices only"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype}: the CUDA kernels take float16, bfloat16 or float32"
    return None


register_backend(Backend(
    name="cuda",
    module="ff_kernels.cuda_backend",
    priority=20,
    auto_device_types=("cuda",),
    unavailable_reason=_cuda_unavailable,  # lazy: the extension loads on the first query, not at import
    unsupported_reason=_cuda_unsupported,
))
