"""The "torch" backend: DESIGN.md section 1 in plain PyTorch. This file is the executable spec.

It runs on any device and float dtype, accumulating in float32 (float64 for float64 inputs), and is
written for speed as well as reading: no autograd graph, one GEMM per half (positives, negatives)
writing straight into a shared [M, N] activation buffer, one GEMM pair for the weight gradient, the
activation buffer reused in place for dL/dz.
"""

from __future__ import annotations

import math

import torch

from .backends import FFStepOutput, PeerNorm, SGDUpdate, new_output
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
        # divide before summing: the mean is finite wherever every term is (theta ~ 1e38 in fp32)
        return (_softplus(t) / m).sum(), -sign * torch.sigmoid(t) / m
    t = -config.alpha * (g[:n_pos] - g[n_pos:])
    dg_pos = -config.alpha * torch.sigmoid(t) / n_pos
    return (_softplus(t) / n_pos).sum(), torch.cat([dg_pos, -dg_pos])


def _softplus(t: torch.Tensor) -> torch.Tensor:
    return torch.logaddexp(t, torch.zeros_like(t))


def _preactivations(xs, weight: torch.Tensor, bias, acc: torch.dtype) -> torch.Tensor:
    """z = x W^T + b for the row blocks ``xs`` stacked into one [M, N] tensor of dtype ``acc``."""
    w = weight.to(acc)
    b = None if bias is None else bias.to(acc)
    z = new_output((sum(x.shape[0] for x in xs), w.shape[0]), acc, w.device)
    row = 0
    for x in xs:
        out = z[row:row + x.shape[0]]
        if b is None:
            torch.mm(x.to(acc), w.t(), out=out)
        else:
            torch.addmm(b, x.to(acc), w.t(), out=out)
        row += x.shape[0]
    return z


def _goodness_and_output(h: torch.Tensor, config: FFConfig, out_dtype: torch.dtype):
    """Goodness g, normalised output y and row norms sqrt(q) of activations h (one reduction)."""
    n = h.shape[1]
    row_norm = torch.linalg.vector_norm(h, dim=1)  # sqrt(q) without an [M, N] temporary
    g = goodness_from_sumsq(row_norm.square(), config, n)
    scale = output_scale(row_norm, config, n)
    y = h.to(out_dtype, copy=True) if scale is None else (h * scale[:, None]).to(out_dtype)
    return g, y, row_norm


def _sgd_(param: torch.Tensor, grad: torch.Tensor, buf, update: SGDUpdate, keep_old=None) -> None:
    """SGDUpdate.coefficients()'s rule, in place on param and buf, computed in grad's dtype.
    ``keep_old``: a 0-dim bool tensor; where True, param and buf keep their values (no host sync)."""
    lr, keep, gain, wd_grad, wd_step = update.coefficients()
    p = param.to(grad.dtype)
    d = grad.add(p, alpha=wd_grad) if wd_grad != 0 else grad
    if buf is not None:
        d = buf.to(grad.dtype).mul(keep).add_(d, alpha=gain)
        buf.copy_(d if keep_old is None else torch.where(keep_old, buf, d))
    if wd_step != 0:
        d = d.add(p, alpha=wd_step)
    new = p.sub(d, alpha=lr)
    param.copy_(new if keep_old is None else torch.where(keep_old, p, new))


def _peer_norm_(h: torch.Tensor, grad_z: torch.Tensor, n_pos: int, peer: PeerNorm, keep_old=None):
    """Update the running mean with this batch's positive rows of h; add the peer term to the
    positive rows of dL/dz in place. ``keep_old`` as in _sgd_ (the mean keeps its value)."""
    batch_mean = h[:n_pos].sum(0).div_(n_pos)
    m = peer.mean.to(h.dtype).mul(peer.rho).add_(batch_mean, alpha=1.0 - peer.rho)
    peer.mean.copy_(m if keep_old is None else torch.where(keep_old, peer.mean, m))
    m = peer.mean.to(h.dtype)
    grad_z[:n_pos] += (m - m.mean()).mul_(peer.kappa)  # every unit, dead or alive: that revives them


@torch.no_grad()
def layer_step(x_pos, x_neg, weight, bias, config: FFConfig, update, peer=None,
               skip_nonfinite: bool = False) -> FFStepOutput:
    acc = accumulation_dtype(weight.dtype)
    n_pos, n = x_pos.shape[0], weight.shape[0]
    z = _preactivations((x_pos, x_neg), weight, bias, acc)
    # Every non-finite element of x, W or b makes some z NaN/inf (inf * 0 = NaN), also where the
    # ReLU would hide it (z = -inf): checking z and q catches every poisoned step.
    finite_z = torch.isfinite(z).all()
    h = z.relu_()  # NaN stays NaN
    g, y, row_norm = _goodness_and_output(h, config, weight.dtype)
    nonfinite = ~(finite_z & torch.isfinite(row_norm).all())
    loss, dg = loss_and_goodness_grad(g, n_pos, config, config.threshold(n))
    loss = torch.where(nonfinite, torch.nan, loss)  # a NaN/inf input always reaches the loss
    keep_old = nonfinite if skip_nonfinite else None

    coef = (dg * goodness_grad_factor(config, n))[:, None]
    if peer is None:
        # dL/dz = c_i h_ij (relu' is implied by h_ij = 0), built in h's storage: y already holds h's use.
        grad_z = h.mul_(coef)
    else:
        grad_z = h * coef  # h is still needed for the running mean
        _peer_norm_(h, grad_z, n_pos, peer, keep_old)
    grad_w = torch.mm(grad_z[:n_pos].t(), x_pos.to(acc))
    grad_w.addmm_(grad_z[n_pos:].t(), x_neg.to(acc))
    grad_b = None if bias is None else grad_z.sum(0)

    out = FFStepOutput(y=y, g=g, loss=loss, n_pos=n_pos, nonfinite=nonfinite)
    if update is None:
        out.grad_weight = grad_w.to(weight.dtype)
        out.grad_bias = None if bias is None else grad_b.to(weight.dtype)
        return out
    _sgd_(weight, grad_w, update.buf_weight, update, keep_old)
    if bias is not None:
        _sgd_(bias, grad_b, update.buf_bias, update, keep_old)
    return out


def sgd_update(param: torch.Tensor, grad: torch.Tensor, buf, update: SGDUpdate, skip=None) -> None:
    """The fused update alone, on a given gradient (e.g. all-reduced across ranks); ``skip``: a
    0-dim bool tensor, True leaves param and buf unchanged."""
    _sgd_(param, grad.to(accumulation_dtype(param.dtype)), buf, update, skip)


@torch.no_grad()
def layer_forward(x, weight, bias, config: FFConfig):
    h = _preactivations((x,), weight, bias, accumulation_dtype(weight.dtype)).relu_()
    g, y, _ = _goodness_and_output(h, config, weight.dtype)
    return y, g
