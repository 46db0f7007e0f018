"""The public ops: validate once, then call the torch.library op (library.py), which runs the backend.
Every backend sees only validated input.

Validation is complete before anything is allocated or changed, so a raised error leaves weight,
bias and momentum buffers bit-identical.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch

from . import library  # noqa: F401  (registers torch.ops.ff_kernels.*)
from .backends import FFStepOutput, select_backend
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
    *,
    dampening: float = 0.0,
    decoupled_weight_decay: bool = False,
    peer_mean: Optional[torch.Tensor] = None,
    skip_nonfinite: bool = False,
) -> FFStepOutput:
    """One FF layer's training step on positives ``x_pos`` [B+, K] and negatives ``x_neg`` [B-, K].

    Gradient mode (``lr=None``): returns grad_weight/grad_bias; weight and bias are untouched.
    Update mode: applies SGD to weight and bias in place, in PyTorch's convention (momentum,
    dampening, coupled weight decay) or, with ``decoupled_weight_decay=True``, Hinton's
    (p -= lr (buf + wd p)). ``momentum_buffers=(buf_w, buf_b)`` are updated in place, or created
    (zeros; PyTorch's first step sets buf = grad) and returned as ``out.momentum_buffers`` when None.
    Peer normalisation (``config.peer_norm`` != "none", both modes): ``peer_mean`` [N] is the
    layer's running mean of positive activities, updated in place, or created at 0.5 and returned
    as ``out.peer_mean`` when None.
    Non-finite values: ``out.nonfinite`` is a 0-dim bool tensor on the device, True when a NaN/inf
    entered the step (the loss is then NaN). With ``skip_nonfinite=True`` such a step changes
    nothing in place (weight, bias, buffers, peer mean keep their values), decided on the device
    without a host sync, so a training loop can read the flag when it likes and stop.
    """
    config = _check_config(config)
    _check_layer({"x_pos": x_pos, "x_neg": x_neg}, weight, bias)
    _check_config_range(config, weight)
    if config.loss == "symba" and x_pos.shape[0] != x_neg.shape[0]:
        raise ValueError(f"loss='symba' pairs rows by index and needs x_pos and x_neg of equal batch "
                         f"size, got {x_pos.shape[0]} and {x_neg.shape[0]}")
    acc = _accumulation_dtype(weight.dtype)
    momentum, weight_decay, dampening = (_real(name, value, acc) for name, value in (
        ("momentum", momentum), ("weight_decay", weight_decay), ("dampening", dampening)))
    if lr is not None:
        lr = _real("lr", lr, acc)
    _check_update_args(weight, bias, lr, momentum, weight_decay, momentum_buffers, dampening,
                       decoupled_weight_decay)
    _check_peer_mean(config, weight, peer_mean)
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"skip_nonfinite must be a bool, got {type(skip_nonfinite).__name__}")
    select_backend(backend, weight.device, weight.dtype)  # a clear error now, not inside the op

    buf_w = buf_b = None
    first_step = False
    if lr is not None and momentum != 0:
        if momentum_buffers is None:
            buf_w, buf_b = _new_buffers(weight, bias)
            first_step = True
        else:
            buf_w, buf_b = momentum_buffers
    written = [peer_mean] + ([weight, bias, buf_w, buf_b] if lr is not None else [])
    if not torch.compiler.is_compiling():  # fake tensors have no addresses; the op declares its writes
        _check_not_inference(written, _WRITTEN_NAMES)
        _check_no_aliasing(written, _WRITTEN_NAMES)
        # An input that shares memory with a tensor written in place is read as it was on entry.
        x_pos, x_neg = (_copy_if_overlapping(x, written) for x in (x_pos, x_neg))
    if config.peer_norm != "none" and peer_mean is None:
        peer_mean = torch.full((weight.shape[0],), 0.5, dtype=_accumulation_dtype(weight.dtype),
                               device=weight.device)

    cfg = config.op_string()
    with torch.no_grad():  # the ops are autograd-free: never a graph, whatever requires grad
        if lr is None:
            y, g, loss, nonfinite, grad_w, grad_b = torch.ops.ff_kernels.layer_step(
                x_pos, x_neg, weight, bias, peer_mean, cfg, skip_nonfinite, backend)
            grad_b = grad_b if bias is not None else None
        else:
            y, g, loss, nonfinite = torch.ops.ff_kernels.layer_step_update(
                x_pos, x_neg, weight, bias, buf_w, buf_b, peer_mean, cfg, lr, momentum, dampening,
                weight_decay, decoupled_weight_decay, first_step, skip_nonfinite, backend)
            grad_w = grad_b = None
    return FFStepOutput(y=y, g=g, loss=loss, n_pos=x_pos.shape[0], grad_weight=grad_w, grad_bias=grad_b,
                        nonfinite=nonfinite,
                        momentum_buffers=(buf_w, buf_b) if buf_w is not None else None,
                        peer_mean=peer_mean)


def sgd_update_(param: torch.Tensor, grad: torch.Tensor, momentum_buffer: Optional[torch.Tensor] = None,
                *, lr: float, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                decoupled_weight_decay: bool = False, skip: Optional[torch.Tensor] = None,
                backend: str = "auto") -> Optional[torch.Tensor]:
    """The layer step's fused SGD rule alone, in place on ``param`` (and its momentum buffer), for
    a gradient computed elsewhere, e.g. all-reduced across data-parallel ranks. Same conventions as
    ``ff_layer_step``; a None buffer with momentum is created (PyTorch's first step) and returned.
    ``skip``: a 0-dim bool tensor on the device; True leaves everything unchanged (no host sync)."""
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"param must be a torch.Tensor, got {type(param).__name__}")
    _check_tensor("param", param, param.dim())
    _check_tensor("grad", grad, param.dim())
    if grad.shape != param.shape or grad.dtype != param.dtype or grad.device != param.device:
        raise ValueError(f"grad must match param: got {tuple(grad.shape)} {grad.dtype} on {grad.device}, "
                         f"param is {tuple(param.shape)} {param.dtype} on {param.device}")
    if not param.is_contiguous():
        raise ValueError("param must be contiguous: it is updated in place")
    acc = _accumulation_dtype(param.dtype)
    lr = _real("lr", lr, acc)
    momentum, weight_decay, dampening = (_real(name, value, acc) for name, value in (
        ("momentum", momentum), ("weight_decay", weight_decay), ("dampening", dampening)))
    if dampening > 1:
        raise ValueError(f"dampening must be in [0, 1], got {dampening}")
    if not isinstance(decoupled_weight_decay, bool):
        raise TypeError(f"decoupled_weight_decay must be a bool, got {type(decoupled_weight_decay).__name__}")
    if momentum_buffer is not None:
        if momentum == 0:
            raise ValueError("momentum_buffer given but momentum is 0")
        _check_buffer("momentum_buffer", momentum_buffer, param)
    if skip is not None and (not isinstance(skip, torch.Tensor) or skip.dtype != torch.bool
                             or skip.dim() != 0 or skip.device != param.device):
        raise TypeError(f"skip must be a 0-dim bool tensor on {param.device}")
    select_backend(backend, param.device, param.dtype)
    first_step = momentum != 0 and momentum_buffer is None
    if first_step:
        momentum_buffer = _new_buffers(param, None)[0]
    if not torch.compiler.is_compiling():
        _check_not_inference([param, momentum_buffer], ("param", "momentum_buffer"))
        _check_no_aliasing([param, momentum_buffer], ("param", "momentum_buffer"))
        if _overlap(grad, param) or (momentum_buffer is not None and _overlap(grad, momentum_buffer)):
            grad = grad.clone()  # read as it was on entry
    grad = grad.contiguous()
    with torch.no_grad():
        torch.ops.ff_kernels.sgd_update(param, grad, momentum_buffer, lr, momentum, dampening,
                                        weight_decay, decoupled_weight_decay, first_step, skip, backend)
    return momentum_buffer


def ff_layer_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     config: Optional[FFConfig] = None, backend: str = "auto"):
    """Inference: (normalised output y [B, N], goodness g [B]). No update, no gradient."""
    config = _check_config(config)
    _check_layer({"x": x}, weight, bias)
    select_backend(backend, weight.device, weight.dtype)
    with torch.no_grad():
        return torch.ops.ff_kernels.layer_forward(x, weight, bias, config.op_string(), backend)


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
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
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


def _real(name: str, value, acc: torch.dtype) -> float:
    """A real scalar (Python, NumPy or a 0-dim tensor: read on the host) as a float, finite, >= 0
    and within the range of the compute dtype ``acc`` (so lr * grad cannot be inf from the start)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number or a 0-dim real tensor, got a tensor of "
                            f"shape {tuple(value.shape)} and dtype {value.dtype}")
        value = value.item()
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    elif not isinstance(value, (int, float)):
        value = float(value)  # NumPy scalars
    # comparisons, not math.isfinite: torch.compile(dynamic=True) may trace floats symbolically
    if not (value >= 0 and value <= torch.finfo(acc).max):  # False for NaN and inf too
        raise ValueError(f"{name} must be finite, >= 0 and at most {torch.finfo(acc).max:.3g} "
                         f"(the {acc} compute range), got {value}")
    return value


def _check_config_range(config: FFConfig, weight: torch.Tensor) -> None:
    """The config's values must be representable where the layer computes (float32, or float64)."""
    finfo = torch.finfo(_accumulation_dtype(weight.dtype))
    threshold = config.threshold(weight.shape[0])
    if abs(threshold) > finfo.max:
        raise ValueError(f"config.theta gives a threshold of {threshold:.3g}, beyond the {finfo.dtype} "
                         f"compute range ({finfo.max:.3g})")
    if config.alpha > finfo.max:
        raise ValueError(f"config.alpha={config.alpha:.3g} is beyond the {finfo.dtype} compute range")
    if config.eps < finfo.tiny:
        raise ValueError(f"config.eps={config.eps:.3g} is below the smallest normal {finfo.dtype} "
                         f"({finfo.tiny:.3g})")


_WRITTEN_NAMES = ("peer_mean", "weight", "bias", "momentum_buffers[0]", "momentum_buffers[1]")


def _check_not_inference(written, names) -> None:
    """Inference tensors cannot be updated in place outside torch.inference_mode: say so before
    anything is changed (torch would raise half-way through the update)."""
    if torch.is_inference_mode_enabled():
        return
    for name, t in zip(names, written):
        if t is not None and t.is_inference():
            raise ValueError(f"{name} is an inference tensor (made under torch.inference_mode) and is "
                             f"updated in place: clone it outside inference mode first")


def _check_update_args(weight, bias, lr, momentum, weight_decay, momentum_buffers, dampening,
                       decoupled_weight_decay) -> None:
    """Scalars arrive checked by _real; here: which combinations make sense, and the buffers."""
    if dampening > 1:
        raise ValueError(f"dampening must be in [0, 1], got {dampening}")
    if not isinstance(decoupled_weight_decay, bool):
        raise TypeError(f"decoupled_weight_decay must be a bool, got {type(decoupled_weight_decay).__name__}")
    if lr is None:
        for name, value in (("momentum", momentum), ("weight_decay", weight_decay),
                            ("dampening", dampening)):
            if value != 0:
                raise ValueError(f"{name}={value} needs lr: it applies only in update mode")
        if decoupled_weight_decay:
            raise ValueError("decoupled_weight_decay=True needs lr: it applies only in update mode")
        if momentum_buffers is not None:
            raise ValueError("momentum_buffers needs lr: it applies only in update mode")
        return
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
        _check_buffer(name, buf, param)


def _check_buffer(name: str, buf, param: torch.Tensor) -> None:
    """A momentum buffer for ``param``: same shape and device, float32 or param's dtype, contiguous."""
    if not isinstance(buf, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(buf).__name__}")
    if buf.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {buf.layout}")
    if buf.shape != param.shape:
        raise ValueError(f"{name} has shape {tuple(buf.shape)}, expected {tuple(param.shape)}")
    if buf.dtype not in (torch.float32, param.dtype):
        allowed = " or ".join(sorted({str(torch.float32), str(param.dtype)}))
        raise TypeError(f"{name} must be {allowed}, got {buf.dtype}")
    if buf.device != param.device:
        raise ValueError(f"{name} is on {buf.device} but its parameter is on {param.device}")
    if not buf.is_contiguous():
        raise ValueError(f"{name} must be contiguous: it is updated in place")


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_peer_mean(config: FFConfig, weight, peer_mean) -> None:
    if config.peer_norm == "none":
        if peer_mean is not None:
            raise ValueError("peer_mean given but config.peer_norm is 'none'")
        return
    if peer_mean is None:
        return
    if not isinstance(peer_mean, torch.Tensor):
        raise TypeError(f"peer_mean must be a torch.Tensor, got {type(peer_mean).__name__}")
    want = _accumulation_dtype(weight.dtype)
    if peer_mean.dtype != want:
        raise TypeError(f"peer_mean must be {want} for {weight.dtype} weights, got {peer_mean.dtype}")
    if peer_mean.shape != (weight.shape[0],):
        raise ValueError(f"peer_mean has shape {tuple(peer_mean.shape)}, expected ({weight.shape[0]},)")
    if peer_mean.device != weight.device:
        raise ValueError(f"peer_mean is on {peer_mean.device} but weight is on {weight.device}")
    if not peer_mean.is_contiguous():
        raise ValueError("peer_mean must be contiguous: it is updated in place")


def _memory_span(t: torch.Tensor):
    """(device, first byte, one past the last byte) that tensor t may touch; None when empty."""
    if t.numel() == 0:
        return None
    extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) + 1
    start = t.data_ptr()
    return t.device, start, start + extent * t.element_size()


def _overlap(a, b) -> bool:
    """Whether two tensors' memory ranges intersect (conservative for interleaved views)."""
    sa, sb = _memory_span(a), _memory_span(b)
    return sa is not None and sb is not None and sa[0] == sb[0] and sa[1] < sb[2] and sb[1] < sa[2]


def _check_no_aliasing(written, names) -> None:
    """Tensors written in place must not share memory: the result would depend on write order."""
    named = [(n, t) for n, t in zip(names, written) if t is not None]
    for i, (name_a, a) in enumerate(named):
        for name_b, b in named[i + 1:]:
            if _overlap(a, b):
                raise ValueError(f"{name_a} and {name_b} share memory: both are updated in place, "
                                 f"so they must be separate tensors")


def _copy_if_overlapping(x: torch.Tensor, written) -> torch.Tensor:
    return x.clone() if any(t is not None and _overlap(x, t) for t in written) else x


def _new_buffers(weight, bias):
    """Zero momentum buffers; float32 for half-precision weights so momentum does not round away."""
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    buf_b = None if bias is None else torch.zeros(bias.shape, dtype=dtype, device=bias.device)
    return torch.zeros(weight.shape, dtype=dtype, device=weight.device), buf_b
