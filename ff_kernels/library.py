"""The ops as torch.library custom ops: ``torch.ops.ff_kernels.{layer_forward, layer_step,
layer_step_update, sgd_update}``.

Registering them makes the ops real to PyTorch: ``torch.compile`` traces them as single nodes (no
graph break), fake implementations give output shapes without running anything, and the mutated
arguments of the update op are declared, so functionalization and CUDA graphs treat them right.

Dispatch, as bitsandbytes does it: each op is defined once with its fake. The default kernel
(any device, the CPU in practice) is the reference; the CUDA kernel picks among the backends that
run on CUDA tensors: "auto" takes the fastest (the registry's ranking, see backends.py), an explicit
``backend=`` is honoured. An explicit non-reference backend on the CPU (the Triton interpreter in
tests) is honoured too. The public functions in ops.py validate first and call these ops; the ops
themselves assume validated input.

The layer's config travels as one string (``FFConfig.op_string()``): it is static per layer, and a
single schema argument keeps the op signatures readable. Scalars that depend on the batch size
(1/M, the peer term's kappa) are derived inside the kernels from the tensors' shapes, so dynamic
batch sizes trace once.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import PeerNorm, SGDUpdate, select_backend
from .config import FFConfig


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _backend_module(name: str, device: torch.device, dtype: torch.dtype, device_kernel: bool):
    """The backend module that runs this call. The default kernel runs the reference unless a
    backend was named explicitly; the CUDA kernel resolves "auto" by the registry's ranking."""
    if not device_kernel and name in ("auto", "torch"):
        name = "torch"
    return select_backend(name, device, dtype).impl()


def _peer(config: FFConfig, peer_mean: Optional[Tensor], n: int, n_pos: int) -> Optional[PeerNorm]:
    if peer_mean is None:
        return None
    return PeerNorm(peer_mean, config.peer_rho, config.peer_kappa(n, n_pos))


# ------------------------------------------------------------------------------------------------
# layer_forward: (y, g) of one layer, no training
# ------------------------------------------------------------------------------------------------

def _forward(x, weight, bias, config, backend, device_kernel):
    module = _backend_module(backend, weight.device, weight.dtype, device_kernel)
    y, g = module.layer_forward(x, weight, bias, FFConfig.from_op_string(config))
    return y, g


@torch.library.custom_op("ff_kernels::layer_forward", mutates_args=())
def layer_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], config: str,
                  backend: str) -> tuple[Tensor, Tensor]:
    return _forward(x, weight, bias, config, backend, device_kernel=False)


@layer_forward.register_kernel("cuda")
def _layer_forward_cuda(x, weight, bias, config, backend):
    return _forward(x, weight, bias, config, backend, device_kernel=True)


@layer_forward.register_fake
def _layer_forward_fake(x, weight, bias, config, backend):
    m, n = x.shape[0], weight.shape[0]
    return (x.new_empty((m, n), dtype=weight.dtype),
            x.new_empty((m,), dtype=_accumulation_dtype(weight.dtype)))


# ------------------------------------------------------------------------------------------------
# layer_step: gradient mode (returns gradients; only the peer running mean changes)
# ------------------------------------------------------------------------------------------------

def _step(x_pos, x_neg, weight, bias, peer_mean, config, skip_nonfinite, backend, update, device_kernel):
    cfg = FFConfig.from_op_string(config)
    module = _backend_module(backend, weight.device, weight.dtype, device_kernel)
    peer = _peer(cfg, peer_mean, weight.shape[0], x_pos.shape[0])
    out = module.layer_step(x_pos, x_neg, weight, bias, cfg, update, peer, skip_nonfinite)
    grad_bias = out.grad_bias
    if update is None and grad_bias is None:  # custom ops cannot return None: an empty grad_bias
        grad_bias = weight.new_empty((0,))
    return out.y, out.g, out.loss, out.nonfinite, out.grad_weight, grad_bias


@torch.library.custom_op("ff_kernels::layer_step", mutates_args=("peer_mean",))
def layer_step(x_pos: Tensor, x_neg: Tensor, weight: Tensor, bias: Optional[Tensor],
               peer_mean: Optional[Tensor], config: str, skip_nonfinite: bool,
               backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _step(x_pos, x_neg, weight, bias, peer_mean, config, skip_nonfinite, backend, None, False)


@layer_step.register_kernel("cuda")
def _layer_step_cuda(x_pos, x_neg, weight, bias, peer_mean, config, skip_nonfinite, backend):
    return _step(x_pos, x_neg, weight, bias, peer_mean, config, skip_nonfinite, backend, None, True)


def _step_outputs_fake(x_pos, x_neg, weight):
    """y [M, N], g [M], loss [], nonfinite [] (bool)."""
    m, n = x_pos.shape[0] + x_neg.shape[0], weight.shape[0]
    acc = _accumulation_dtype(weight.dtype)
    return (x_pos.new_empty((m, n), dtype=weight.dtype), x_pos.new_empty((m,), dtype=acc),
            x_pos.new_empty((), dtype=acc), x_pos.new_empty((), dtype=torch.bool))


@layer_step.register_fake
def _layer_step_fake(x_pos, x_neg, weight, bias, peer_mean, config, skip_nonfinite, backend):
    grad_bias = torch.empty_like(bias) if bias is not None else weight.new_empty((0,))
    return (*_step_outputs_fake(x_pos, x_neg, weight), torch.empty_like(weight), grad_bias)


# ------------------------------------------------------------------------------------------------
# layer_step_update: update mode (fused SGD on weight, bias and momentum buffers, in place)
# ------------------------------------------------------------------------------------------------

_UPDATED = ("weight", "bias", "buf_weight", "buf_bias", "peer_mean")


def _update(buf_weight, buf_bias, lr, momentum, dampening, weight_decay, decoupled_weight_decay,
            first_step) -> SGDUpdate:
    return SGDUpdate(lr, momentum, weight_decay, buf_weight, buf_bias, dampening=dampening,
                     decoupled_weight_decay=decoupled_weight_decay, first_step=first_step)


@torch.library.custom_op("ff_kernels::layer_step_update", mutates_args=_UPDATED)
def layer_step_update(x_pos: Tensor, x_neg: Tensor, weight: Tensor, bias: Optional[Tensor],
                      buf_weight: Optional[Tensor], buf_bias: Optional[Tensor],
                      peer_mean: Optional[Tensor], config: str, lr: float, momentum: float,
                      dampening: float, weight_decay: float, decoupled_weight_decay: bool,
                      first_step: bool, skip_nonfinite: bool,
                      backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    update = _update(buf_weight, buf_bias, lr, momentum, dampening, weight_decay,
                     decoupled_weight_decay, first_step)
    return _step(x_pos, x_neg, weight, bias, peer_mean, config, skip_nonfinite, backend, update,
                 False)[:4]


@layer_step_update.register_kernel("cuda")
def _layer_step_update_cuda(x_pos, x_neg, weight, bias, buf_weight, buf_bias, peer_mean, config, lr,
                            momentum, dampening, weight_decay, decoupled_weight_decay, first_step,
                            skip_nonfinite, backend):
    update = _update(buf_weight, buf_bias, lr, momentum, dampening, weight_decay,
                     decoupled_weight_decay, first_step)
    return _step(x_pos, x_neg, weight, bias, peer_mean, config, skip_nonfinite, backend, update,
                 True)[:4]


@layer_step_update.register_fake
def _layer_step_update_fake(x_pos, x_neg, weight, bias, buf_weight, buf_bias, peer_mean, config, lr,
                            momentum, dampening, weight_decay, decoupled_weight_decay, first_step,
                            skip_nonfinite, backend):
    return _step_outputs_fake(x_pos, x_neg, weight)


# ------------------------------------------------------------------------------------------------
# sgd_update: the fused update alone, on a given gradient (data-parallel training applies it to
# the all-reduced gradient)
# ------------------------------------------------------------------------------------------------

def _sgd(param, grad, buf, lr, momentum, dampening, weight_decay, decoupled_weight_decay, first_step,
         skip, backend, device_kernel):
    module = _backend_module(backend, param.device, param.dtype, device_kernel)
    update = _update(buf, None, lr, momentum, dampening, weight_decay, decoupled_weight_decay,
                     first_step)
    module.sgd_update(param, grad, buf, update, skip)


@torch.library.custom_op("ff_kernels::sgd_update", mutates_args=("param", "buf"))
def sgd_update(param: Tensor, grad: Tensor, buf: Optional[Tensor], lr: float, momentum: float,
               dampening: float, weight_decay: float, decoupled_weight_decay: bool, first_step: bool,
               skip: Optional[Tensor], backend: str) -> None:
    _sgd(param, grad, buf, lr, momentum, dampening, weight_decay, decoupled_weight_decay, first_step,
         skip, backend, False)


@sgd_update.register_kernel("cuda")
def _sgd_update_cuda(param, grad, buf, lr, momentum, dampening, weight_decay, decoupled_weight_decay,
                     first_step, skip, backend):
    _sgd(param, grad, buf, lr, momentum, dampening, weight_decay, decoupled_weight_decay, first_step,
         skip, backend, True)


@sgd_update.register_fake
def _sgd_update_fake(param, grad, buf, lr, momentum, dampening, weight_decay, decoupled_weight_decay,
                     first_step, skip, backend):
    return None
