"""The "torch" backend: DESIGN.md section 1 in plain PyTorch. This file is the executable spec.

It runs on any device and float dtype, accumulating in float32 (float64 for float64 inputs), and is
written for speed as well as reading: no autograd graph, one GEMM per half (positives, negatives)
writing straight into a shared [M, N] activation buffer, one GEMM pair for the weight gradient, the
activation buffer reused in place for dL/dz.
"""

from __future__ import annotations

import math

import torch

from .backends import FFStepOutput, SGDUpdate, new_output
from .config import FFConfig


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def goodness_from_sumsq(q: torch.Tensor, config: FFConfig, n: int) -> torch.Tensor:
    return q if config.goodness == "sum" else q / n


def goodness_grad_factor(config: FFConfig, n: int) -> float:
    """dg/dq times 2: dL/dz_ij = dL/dg_i * factor * h_ij."""
    return 2.0 if config.goodness == "sum" else 2.0 / n


def output_scale(row_norm: torch.Tensor, config: FFConfig, n: int):
    """Per-row factor turning h into y (None for norm="none"); row_norm = sqrt(q)."""
    if config.norm == "l2":
        return 1.0 / (row_norm + config.eps)
    if config.norm == "rms":
        return 1.0 / (row_norm / math.sqrt(n) + config.eps)
    return None


def loss_and_goodness_grad(g: torch.Tensor, n_pos: int, config: FFConfig, threshold: float):
    """Loss (0-dim) and dL/dg for goodness g of rows [positives; negatives].

    softplus: L = mean_i softplus(-s_i (g_i - theta)), dL/dg_i = -s_i sigmoid(-s_i (g_i - theta)) / M.
    symba:    L = mean_i softplus(-alpha d_i), d_i = g+_i - g-_i, dL/dg+_i = -alpha sigmoid(-alpha d_i) / B.
    softplus(t) = logaddexp(t, 0) = max(t, 0) + log1p(exp(-|t|)): finite for any finite t, and exact
    (F.softplus switches to t above 20, off by exp(-20) relative, and its gradient to exactly 1).
    """
    m = g.shape[0]
    if config.loss == "softplus":
        sign = torch.ones_like(g)
        sign[n_pos:] = -1.0
        t = -sign * (g - threshold)
        return _softplus(t).sum() / m, -sign * torch.sigmoid(t) / m
    t = -config.alpha * (g[:n_pos] - g[n_pos:])
    dg_pos = -config.alpha * torch.sigmoid(t) / n_pos
    return _softplus(t).mean(), torch.cat([dg_pos, -dg_pos])


def _softplus(t: torch.Tensor) -> torch.Tensor:
    return torch.logaddexp(t, torch.zeros_like(t))


def _relu_activations(xs, weight: torch.Tensor, bias, acc: torch.dtype) -> torch.Tensor:
    """relu(x W^T + b) for the row blocks ``xs`` stacked into one [M, N] tensor of dtype ``acc``."""
    w = weight.to(acc)
    b = None if bias is None else bias.to(acc)
    h = new_output((sum(x.shape[0] for x in xs), w.shape[0]), acc, w.device)
    row = 0
    for x in xs:
        out = h[row:row + x.shape[0]]
        if b is None:
            torch.mm(x.to(acc), w.t(), out=out)
        else:
            torch.addmm(b, x.to(acc), w.t(), out=out)
        row += x.shape[0]
    return h.relu_()


def _goodness_and_output(h: torch.Tensor, config: FFConfig, out_dtype: torch.dtype):
    """Goodness g and normalised output y of activations h; both share the row reduction q."""
    n = h.shape[1]
    row_norm = torch.linalg.vector_norm(h, dim=1)  # sqrt(q) without an [M, N] temporary
    g = goodness_from_sumsq(row_norm.square(), config, n)
    scale = output_scale(row_norm, config, n)
    y = h.to(out_dtype, copy=True) if scale is None else (h * scale[:, None]).to(out_dtype)
    return g, y


def _sgd_(param: torch.Tensor, grad: torch.Tensor, buf, update: SGDUpdate) -> None:
    """torch.optim.SGD's step (dampening 0, no nesterov), in place on param and buf."""
    if update.weight_decay != 0:
        grad = grad.add(param, alpha=update.weight_decay)
    if update.momentum != 0:
        buf.mul_(update.momentum).add_(grad)
        grad = buf
    param.add_(grad, alpha=-update.lr)


@torch.no_grad()
def layer_step(x_pos, x_neg, weight, bias, config: FFConfig, update) -> FFStepOutput:
    acc = accumulation_dtype(weight.dtype)
    n_pos, n = x_pos.shape[0], weight.shape[0]
    h = _relu_activations((x_pos, x_neg), weight, bias, acc)
    g, y = _goodness_and_output(h, config, weight.dtype)
    loss, dg = loss_and_goodness_grad(g, n_pos, config, config.threshold(n))

    # dL/dz = c_i h_ij (relu' is implied by h_ij = 0), built in h's storage: y already holds h's use.
    grad_z = h.mul_((dg * goodness_grad_factor(config, n))[:, None])
    grad_w = torch.mm(grad_z[:n_pos].t(), x_pos.to(acc))
    grad_w.addmm_(grad_z[n_pos:].t(), x_neg.to(acc))
    grad_b = None if bias is None else grad_z.sum(0)

    out = FFStepOutput(y_pos=y[:n_pos], y_neg=y[n_pos:], g_pos=g[:n_pos], g_neg=g[n_pos:], loss=loss)
    if update is None:
        out.grad_weight = grad_w.to(weight.dtype)
        out.grad_bias = None if bias is None else grad_b.to(weight.dtype)
        return out
    _sgd_(weight, grad_w, update.buf_weight, update)
    if bias is not None:
        _sgd_(bias, grad_b, update.buf_bias, update)
    return out


@torch.no_grad()
def layer_forward(x, weight, bias, config: FFConfig):
    h = _relu_activations((x,), weight, bias, accumulation_dtype(weight.dtype))
    g, y = _goodness_and_output(h, config, weight.dtype)
    return y, g
