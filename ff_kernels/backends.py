"""The backend registry: one small table that "torch", "triton" and "cuda" plug into.

A backend is a module with three functions of validated inputs (see ``ops.py``):

    layer_step(x_pos, x_neg, weight, bias, config, update, peer, skip_nonfinite=False) -> FFStepOutput
    layer_forward(x, weight, bias, config) -> (y, goodness)
    sgd_update(param, grad, buf, update, skip) -> None

``update`` is None (gradient mode) or an ``SGDUpdate`` whose tensors the backend changes in place
(weight, bias, momentum buffers); ``peer`` is None or a ``PeerNorm`` whose running mean it updates
in place; with ``skip_nonfinite`` a step whose ``nonfinite`` flag is set changes nothing in place.
Nothing else is mutated, and x never overlaps a tensor written in place (ops.py copies it). Each
function is therefore a pure function of its inputs plus declared in-place updates, the shape
``torch.library`` needs (library.py registers them as custom ops).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class SGDUpdate:
    """The fused SGD step (DESIGN section 1.6), in PyTorch's convention or Hinton's.

    Coupled weight decay (PyTorch): g' = grad + wd p; buf = mu buf + (1 - d) g'; p -= lr buf.
    Decoupled (Hinton's code):      buf = mu buf + (1 - d) grad;  p -= lr (buf + wd p).
    ``first_step``: the op created the (zero) buffers this call; PyTorch's first step then sets
    buf = g' (no dampening). Hinton's form always starts from zero buffers: buf = (1 - d) grad.
    """

    lr: float
    momentum: float
    weight_decay: float
    buf_weight: Optional[torch.Tensor]  # None when momentum == 0
    buf_bias: Optional[torch.Tensor]  # None when momentum == 0 or there is no bias
    dampening: float = 0.0
    decoupled_weight_decay: bool = False
    first_step: bool = False

    def coefficients(self) -> tuple:
        """(lr, keep, gain, wd_grad, wd_step): the one rule every backend implements, in fp32
        (float64 for float64 parameters):
            d = grad + wd_grad * p
            with a buffer:  buf = keep * buf + gain * d;  d = buf
            p = p - lr * (d + wd_step * p)
        """
        keep, gain = self.momentum, 1.0 - self.dampening
        if self.first_step and not self.decoupled_weight_decay:
            keep, gain = 0.0, 1.0
        wd = self.weight_decay
        return (self.lr, keep, gain, 0.0 if self.decoupled_weight_decay else wd,
                wd if self.decoupled_weight_decay else 0.0)


@dataclass(frozen=True)
class PeerNorm:
    """Peer normalisation for one step (DESIGN section 1.7); ``mean`` [N] is updated in place:
        mean <- rho * mean + (1 - rho) * (sum of h over the positive rows) / B+
        dL/dz_ij += kappa * (mean_j - mean(mean))   for every positive row i, every unit j
    so grad_W += p (x) colsum(x_pos) and grad_b += B+ p, with p = kappa * (mean - mean(mean)).
    ``mean`` is float32 (float64 for float64 weights), contiguous, on the weight's device."""

    mean: torch.Tensor
    rho: float
    kappa: float


@dataclass
class FFStepOutput:
    """What ``ff_layer_step`` (and every backend's ``layer_step``) returns.

    y [M, N] and g [M] hold the positives' rows first, then the negatives'; ``y_pos``, ``y_neg``,
    ``g_pos``, ``g_neg`` are views of them. Gradients are None in update mode (lr given).
    ``nonfinite`` (0-dim bool, on the device) is True when a NaN/inf entered the step: some
    pre-activation z = x W^T + b or row sum of squares was not finite (every non-finite element of
    x, W or b makes one so); the loss is then NaN too."""

    y: torch.Tensor
    g: torch.Tensor
    loss: torch.Tensor
    n_pos: int
    grad_weight: Optional[torch.Tensor] = None
    grad_bias: Optional[torch.Tensor] = None
    nonfinite: Optional[torch.Tensor] = None
    momentum_buffers: Optional[tuple] = None
    peer_mean: Optional[torch.Tensor] = None  # the running mean (updated in place) when peer norm is on

    @property
    def y_pos(self) -> torch.Tensor:
        return self.y[:self.n_pos]

    @property
    def y_neg(self) -> torch.Tensor:
        return self.y[self.n_pos:]

    @property
    def g_pos(self) -> torch.Tensor:
        return self.g[:self.n_pos]

    @property
    def g_neg(self) -> torch.Tensor:
        return self.g[self.n_pos:]


def fp32_matmul_uses_tf32() -> bool:
    """Whether torch lets fp32 matmuls on CUDA use tf32 tensor cores; the fused backends follow.

    Reads the new API (``torch.backends.cuda.matmul.fp32_precision``) first: once a user (or the
    platform's defaults) set it, reading the legacy ``allow_tf32`` flag raises. "none" means unset
    (inherit), so the legacy flag decides."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision == "tf32":
        return True
    if precision == "ieee":
        return False
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # mixed legacy/new settings: torch refuses to say; exact fp32 is safe
        return False


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
    # dtype first: the same message on every machine, whatever the device
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype}: the Triton kernels take float16, bfloat16 or float32"
    if device.type != "cuda" and not (device.type == "cpu" and _triton_interpreting()):
        return f"tensors on {device}: Triton runs on CUDA devices (or the CPU under TRITON_INTERPRET=1)"
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
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype}: the CUDA kernels take float16, bfloat16 or float32"
    if device.type != "cuda":
        return f"tensors on {device}: the CUDA backend runs on CUDA devices only"
    return None


register_backend(Backend(
    name="cuda",
    module="ff_kernels.cuda_backend",
    priority=20,
    auto_device_types=("cuda",),
    unavailable_reason=_cuda_unavailable,  # lazy: the extension loads on the first query, not at import
    unsupported_reason=_cuda_unsupported,
))
