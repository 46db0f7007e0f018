"""The public ops: validate once, pick a backend, run it. Every backend sees only validated input.

Validation is complete before anything is allocated or changed, so a raised error leaves weight,
bias and momentum buffers bit-identical.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .backends import FFStepOutput, SGDUpdate, select_backend
from .config import FFConfig

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def ff_layer_step(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    config: Optional[FFConfig] = None,
    lr: Optional[float] = None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    momentum_buffers=None,
    backend: str = "auto",
) -> FFStepOutput:
    """One FF layer's training step on positives ``x_pos`` [B+, K] and negatives ``x_neg`` [B-, K].

    Gradient mode (``lr=None``): returns grad_weight/grad_bias, changes nothing.
    Update mode: applies SGD (momentum, weight decay; PyTorch's convention) to weight and bias in
    place; ``momentum_buffers=(buf_w, buf_b)`` are updated in place, or created (zeros, as
    torch.optim.SGD's first step) and returned as ``out.momentum_buffers`` when None.
    """
    config = _check_config(config)
    _check_layer({"x_pos": x_pos, "x_neg": x_neg}, weight, bias)
    if config.loss == "symba" and x_pos.shape[0] != x_neg.shape[0]:
        raise ValueError(f"loss='symba' pairs rows by index and needs x_pos and x_neg of equal batch "
                         f"size, got {x_pos.shape[0]} and {x_neg.shape[0]}")
    _check_update_args(weight, bias, lr, momentum, weight_decay, momentum_buffers)
    chosen = select_backend(backend, weight.device, weight.dtype)

    update = None
    if lr is not None:
        buf_w, buf_b = None, None
        if momentum != 0:
            buf_w, buf_b = momentum_buffers if momentum_buffers is not None else _new_buffers(weight, bias)
        update = SGDUpdate(float(lr), float(momentum), float(weight_decay), buf_w, buf_b)
    with torch.no_grad():
        out = chosen.impl().layer_step(x_pos, x_neg, weight, bias, config, update)
    if update is not None and update.buf_weight is not None:
        out.momentum_buffers = (update.buf_weight, update.buf_bias)
    return out


def ff_layer_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     config: Optional[FFConfig] = None, backend: str = "auto"):
    """Inference: (normalised output y [B, N], goodness g [B]). No update, no gradient."""
    config = _check_config(config)
    _check_layer({"x": x}, weight, bias)
    chosen = select_backend(backend, weight.device, weight.dtype)
    with torch.no_grad():
        return chosen.impl().layer_forward(x, weight, bias, config)


# ---------------------------------------------------------------- validation

def _check_config(config) -> FFConfig:
    if config is None:
        return FFConfig()
    if not isinstance(config, FFConfig):
        raise TypeError(f"config must be an ff_kernels.FFConfig, got {type(config).__name__}")
    return config


def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating-point dtype "
                        f"(float16, bfloat16, float32, float64), got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_layer(inputs: dict, weight, bias) -> None:
    """Ranks, dtypes, devices and shapes of the inputs, weight [N, K] and bias [N] agree."""
    _check_tensor("weight", weight, 2)
    n, k = weight.shape
    if n == 0 or k == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    named = dict(inputs)
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        _check_tensor(name, t, 1 if name == "bias" else 2)
        if t.dtype != weight.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but weight has {weight.dtype}: "
                            f"all tensors of one layer share a dtype")
        if t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but weight is on {weight.device}")
    for name, x in inputs.items():
        if x.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)})")
        if x.shape[1] != k:
            raise ValueError(f"{name} has {x.shape[1]} features but weight expects K={k} "
                             f"(weight shape {tuple(weight.shape)})")
    if bias is not None and bias.shape[0] != n:
        raise ValueError(f"bias has shape {tuple(bias.shape)} but weight has N={n} rows")


def _check_scalar(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")


def _check_update_args(weight, bias, lr, momentum, weight_decay, momentum_buffers) -> None:
    _check_scalar("momentum", momentum)
    _check_scalar("weight_decay", weight_decay)
    if lr is None:
        for name, value in (("momentum", momentum), ("weight_decay", weight_decay)):
            if value != 0:
                raise ValueError(f"{name}={value} needs lr: it applies only in update mode")
        if momentum_buffers is not None:
            raise ValueError("momentum_buffers needs lr: it applies only in update mode")
        return
    _check_scalar("lr", lr)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous in update mode (lr given): it is updated in place")
    if momentum_buffers is None:
        return
    if momentum == 0:
        raise ValueError("momentum_buffers given but momentum is 0")
    if not isinstance(momentum_buffers, (tuple, list)) or len(momentum_buffers) != 2:
        raise TypeError("momentum_buffers must be a pair (buf_weight, buf_bias)")
    for name, buf, param in (("momentum_buffers[0]", momentum_buffers[0], weight),
                             ("momentum_buffers[1]", momentum_buffers[1], bias)):
        if param is None:
            if buf is not None:
                raise ValueError(f"{name} must be None when bias is None")
            continue
        if not isinstance(buf, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(buf).__name__}")
        if buf.shape != param.shape:
            raise ValueError(f"{name} has shape {tuple(buf.shape)}, expected {tuple(param.shape)}")
        if buf.dtype not in (torch.float32, param.dtype):
            raise TypeError(f"{name} must be float32 or {param.dtype}, got {buf.dtype}")
        if buf.device != param.device:
            raise ValueError(f"{name} is on {buf.device} but weight is on {param.device}")
        if not buf.is_contiguous():
            raise ValueError(f"{name} must be contiguous: it is updated in place")


def _new_buffers(weight, bias):
    """Zero momentum buffers; float32 for half-precision weights so momentum does not round away."""
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    buf_b = None if bias is None else torch.zeros(bias.shape, dtype=dtype, device=bias.device)
    return torch.zeros(weight.shape, dtype=dtype, device=weight.device), buf_b
