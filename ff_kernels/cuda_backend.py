"""The "cuda" backend: the fused layer step of csrc/ff_layer.cu through the pybind11 module _C.

The compiled module knows nothing of torch: this file allocates every output (through
``new_output``), keeps the scratch workspace (its size comes from ``_C.ff_layer_plan``), passes data
pointers, strides in elements, config values, the SGD coefficients and the current stream of the
tensors' device, and the kernels run asynchronously on that stream (no host sync). One step is a
memset of the workspace and three to five launches (see csrc/ff_layer_kernels.cuh): forward GEMM
with bias/relu/row-sum epilogue, row finalise (goodness, loss, coefficient, normalisation), peer
normalisation when on, and the weight-gradient GEMM that writes the gradients or applies the SGD
step in its epilogue (plus a finishing kernel when the batch is split over the GPU).

Workspace: one float32 tensor per (device, stream), kept between calls and grown when a call needs
more; ff_layer_run zeroes the part it uses with a memset on the step's stream, so a steady-state
step allocates only its outputs. It is never shared between streams (the stream orders its reuse),
and a lock makes each call's memset + launches one unit, so threads sharing a stream cannot
interleave them. Under CUDA graph capture a call takes a fresh workspace from the graph's pool
instead (the graph keeps its memory; a cached one could be grown and freed under a live graph).
``release_workspaces()`` frees the cached ones.
"""

from __future__ import annotations

import threading

import torch

from ._ext import load_extension
from .backends import FFStepOutput, fp32_matmul_uses_tf32, new_output
from .config import FFConfig

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_NORMS = {"l2": 0, "rms": 1, "none": 2}
_LOSSES = {"softplus": 0, "symba": 1}

# (device type, device index, stream handle) -> float32 workspace tensor, and the lock that serialises the
# calls enqueueing on that stream with it.
_WORKSPACES: dict = {}
_LOCKS: dict = {}


def _ext():
    mod, reason = load_extension()
    if mod is None:
        raise RuntimeError(f"backend='cuda' is not available: {reason}")
    return mod


def _device_index(dev: torch.device) -> int:
    return dev.index if dev.index is not None else torch.cuda.current_device()


def _base_args(_C, mode, weight, bias, config: FFConfig, x_pos, x_neg):
    dev = weight.device
    a = _C.FFLayerArgs()
    a.dtype = _DTYPES[weight.dtype]
    a.allow_tf32 = int(weight.dtype == torch.float32 and fp32_matmul_uses_tf32())
    a.device = _device_index(dev)
    a.stream = torch.cuda.current_stream(dev).cuda_stream
    a.mode = mode
    a.x_pos, a.m_pos = x_pos.data_ptr(), x_pos.shape[0]
    a.x_pos_stride_row, a.x_pos_stride_col = x_pos.stride()
    if x_neg is not None:
        a.x_neg, a.m_neg = x_neg.data_ptr(), x_neg.shape[0]
        a.x_neg_stride_row, a.x_neg_stride_col = x_neg.stride()
    n, k = weight.shape
    a.weight, a.n, a.k = weight.data_ptr(), n, k
    a.weight_stride_row, a.weight_stride_col = weight.stride()
    if bias is not None:
        a.bias, a.bias_stride = bias.data_ptr(), bias.stride(0)
    a.goodness_mean = int(config.goodness == "mean")
    a.norm = _NORMS[config.norm]
    a.loss = _LOSSES[config.loss]
    a.threshold = float(config.threshold(n))
    a.eps = float(config.eps)
    a.alpha = float(config.alpha)
    return a


def _capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream is being captured into a graph (never for CPU tensors: the
    emulated backend in tests)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _run(_C, a, device):
    """Enqueue the step with a workspace of at least the plan's size: this stream's cached one
    (grown when too small), or a fresh one while capturing a CUDA graph. ff_layer_run zeroes it."""
    need = _C.ff_layer_plan(a).workspace_floats
    if _capturing(device):
        ws = new_output((need,), torch.float32, device)  # from the graph's private pool
        a.workspace, a.workspace_floats = ws.data_ptr(), need
        _C.ff_layer_run(a)
        return  # freeing ws during capture is stream-ordered within the graph's pool
    key = (device.type, a.device, a.stream)
    lock = _LOCKS.get(key) or _LOCKS.setdefault(key, threading.Lock())
    with lock:  # memset + launches of one call are one unit on this stream
        ws = _WORKSPACES.get(key)
        if ws is None or ws.numel() < need:
            # The old one (if any) goes back to the caching allocator, which reuses it only for
            # later work on this same stream: after the kernels already enqueued here.
            ws = _WORKSPACES[key] = new_output((need,), torch.float32, device)
        a.workspace, a.workspace_floats = ws.data_ptr(), ws.numel()
        _C.ff_layer_run(a)


def release_workspaces() -> None:
    """Drop the cached per-stream workspaces (their memory returns to torch's caching allocator;
    the next call on each stream allocates a new one)."""
    _WORKSPACES.clear()


@torch.no_grad()
def layer_step(x_pos, x_neg, weight, bias, config: FFConfig, update, peer=None,
               skip_nonfinite: bool = False) -> FFStepOutput:
    _C = _ext()
    dev, dtype = weight.device, weight.dtype
    n, k = weight.shape
    n_pos = x_pos.shape[0]
    m = n_pos + x_neg.shape[0]
    mode = _C.FF_MODE_GRADIENT if update is None else _C.FF_MODE_UPDATE
    a = _base_args(_C, mode, weight, bias, config, x_pos, x_neg)
    a.skip_nonfinite = int(bool(skip_nonfinite))

    y = new_output((m, n), dtype, dev)
    g = new_output((m,), torch.float32, dev)
    loss = new_output((), torch.float32, dev)  # written by the kernels (no zeroing)
    nonfinite = new_output((), torch.bool, dev)
    a.y, a.g, a.loss_out, a.nonfinite_out = y.data_ptr(), g.data_ptr(), loss.data_ptr(), nonfinite.data_ptr()

    grad_w = grad_b = None
    if update is None:
        grad_w = new_output((n, k), dtype, dev)
        a.grad_weight = grad_w.data_ptr()
        if bias is not None:
            grad_b = new_output((n,), dtype, dev)
            a.grad_bias = grad_b.data_ptr()
    else:  # weight, bias and buffers are contiguous (ops.py checked)
        a.lr, a.keep, a.gain, a.wd_grad, a.wd_step = update.coefficients()
        if update.buf_weight is not None:
            a.buf_weight = update.buf_weight.data_ptr()
            a.buf_weight_f32 = int(update.buf_weight.dtype == torch.float32)
        if update.buf_bias is not None:
            a.buf_bias = update.buf_bias.data_ptr()
            a.buf_bias_f32 = int(update.buf_bias.dtype == torch.float32)
    if peer is not None:  # float32, contiguous, on the weight's device (ops.py checked)
        a.peer_mean, a.peer_rho, a.peer_kappa = peer.mean.data_ptr(), peer.rho, peer.kappa
    _run(_C, a, dev)
    return FFStepOutput(y=y, g=g, loss=loss, n_pos=n_pos, grad_weight=grad_w, grad_bias=grad_b,
                        nonfinite=nonfinite)


@torch.no_grad()
def sgd_update(param, grad, buf, update, skip=None) -> None:
    """``update.coefficients()``'s rule on a given gradient, in place on param and buf: the step's
    own update code (csrc ff_sgd_update -> ff_apply_kernel -> finish4). grad has param's dtype and
    is contiguous, as is param; buf is None or float32/param's dtype, contiguous; skip None or a
    0-dim bool tensor on the device (True: nothing changes, decided on the device)."""
    _C = _ext()
    dev = param.device
    a = _C.FFSgdArgs()
    a.dtype = _DTYPES[param.dtype]
    a.device = _device_index(dev)
    a.stream = torch.cuda.current_stream(dev).cuda_stream
    a.param, a.grad, a.numel = param.data_ptr(), grad.data_ptr(), param.numel()
    if buf is not None:
        a.buf, a.buf_f32 = buf.data_ptr(), int(buf.dtype == torch.float32)
    a.lr, a.keep, a.gain, a.wd_grad, a.wd_step = update.coefficients()
    if skip is not None:
        a.skip = skip.data_ptr()
    _C.ff_sgd_update(a)


@torch.no_grad()
def layer_forward(x, weight, bias, config: FFConfig):
    _C = _ext()
    dev, dtype = weight.device, weight.dtype
    n, k = weight.shape
    m = x.shape[0]
    a = _base_args(_C, _C.FF_MODE_FORWARD, weight, bias, config, x, None)
    y = new_output((m, n), dtype, dev)
    g = new_output((m,), torch.float32, dev)
    a.y, a.g = y.data_ptr(), g.data_ptr()
    _run(_C, a, dev)
    return y, g
