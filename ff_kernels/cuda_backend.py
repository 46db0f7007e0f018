"""The "cuda" backend: the fused layer step of csrc/ff_layer.cu through the pybind11 module _C.

The compiled module knows nothing of torch: this file allocates every output and scratch tensor
(through ``new_output``), passes data pointers, strides in elements, config values and the current
stream of the tensors' device, and the kernels run asynchronously on that stream (no host sync).
Four launches per step (see csrc/ff_layer_kernels.cuh): forward GEMM with bias/relu/row-sum
epilogue, row finalise (goodness, loss, coefficient, normalisation), weight-gradient GEMM split over
the batch, and gradient write-out or the fused SGD update.
"""

from __future__ import annotations

import torch

from ._ext import load_extension
from .backends import FFStepOutput, new_output
from .config import FFConfig

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_NORMS = {"l2": 0, "rms": 1, "none": 2}
_LOSSES = {"softplus": 0, "symba": 1}


def _ext():
    mod, reason = load_extension()
    if mod is None:
        raise RuntimeError(f"backend='cuda' is not available: {reason}")
    return mod


def _tf32_allowed() -> bool:
    """torch's own switch for fp32 matmuls (``torch.backends.cuda.matmul.allow_tf32``)."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def _base_args(_C, mode, weight, bias, config: FFConfig, x_pos, x_neg):
    dev = weight.device
    a = _C.FFLayerArgs()
    a.dtype = _DTYPES[weight.dtype]
    a.allow_tf32 = int(weight.dtype == torch.float32 and _tf32_allowed())
    a.device = dev.index if dev.index is not None else torch.cuda.current_device()
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


def _zeroed_f32(_C, m, n, k, mode, device):
    ws = new_output((_C.ff_layer_workspace_floats(m, n, k, mode),), torch.float32, device)
    return ws.zero_()  # on the current stream of `device`, which the kernels use too


@torch.no_grad()
def layer_step(x_pos, x_neg, weight, bias, config: FFConfig, update) -> FFStepOutput:
    _C = _ext()
    dev, dtype = weight.device, weight.dtype
    n, k = weight.shape
    n_pos = x_pos.shape[0]
    m = n_pos + x_neg.shape[0]
    mode = _C.FF_MODE_GRADIENT if update is None else _C.FF_MODE_UPDATE
    a = _base_args(_C, mode, weight, bias, config, x_pos, x_neg)

    y = new_output((m, n), dtype, dev)
    g = new_output((m,), torch.float32, dev)
    loss = new_output((), torch.float32, dev).zero_()
    ws = _zeroed_f32(_C, m, n, k, mode, dev)
    a.y, a.g, a.loss_out, a.workspace = y.data_ptr(), g.data_ptr(), loss.data_ptr(), ws.data_ptr()

    grad_w = grad_b = None
    if update is None:
        grad_w = new_output((n, k), dtype, dev)
        a.grad_weight = grad_w.data_ptr()
        if bias is not None:
            grad_b = new_output((n,), dtype, dev)
            a.grad_bias = grad_b.data_ptr()
    else:  # weight, bias and buffers are contiguous (ops.py checked)
        a.lr, a.momentum, a.weight_decay = update.lr, update.momentum, update.weight_decay
        if update.buf_weight is not None:
            a.buf_weight = update.buf_weight.data_ptr()
            a.buf_weight_f32 = int(update.buf_weight.dtype == torch.float32)
        if update.buf_bias is not None:
            a.buf_bias = update.buf_bias.data_ptr()
            a.buf_bias_f32 = int(update.buf_bias.dtype == torch.float32)
    _C.ff_layer_run(a)
    # ws is released to the caching allocator on return; the allocator is stream-ordered, so a later
    # allocation on this stream cannot overwrite it before the kernels above have run.
    return FFStepOutput(y_pos=y[:n_pos], y_neg=y[n_pos:], g_pos=g[:n_pos], g_neg=g[n_pos:],
                        loss=loss, grad_weight=grad_w, grad_bias=grad_b)


@torch.no_grad()
def layer_forward(x, weight, bias, config: FFConfig):
    _C = _ext()
    dev, dtype = weight.device, weight.dtype
    n, k = weight.shape
    m = x.shape[0]
    mode = _C.FF_MODE_FORWARD
    a = _base_args(_C, mode, weight, bias, config, x, None)
    y = new_output((m, n), dtype, dev)
    g = new_output((m,), torch.float32, dev)
    ws = _zeroed_f32(_C, m, n, k, mode, dev)
    a.y, a.g, a.workspace = y.data_ptr(), g.data_ptr(), ws.data_ptr()
    _C.ff_layer_run(a)
    return y, g
