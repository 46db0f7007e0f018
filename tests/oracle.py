"""An independent float64 oracle of one Forward-Forward layer step (DESIGN.md section 1).

The property tests (tests/test_property.py) compare every backend, the reference included, with
this file. It is written from DESIGN.md alone, the obvious way, and shares no code with
ff_kernels/reference.py: the loss is built as a float64 autograd graph and the gradients are
whatever torch.autograd says they are, so a mistake in a hand-derived gradient (the reference's or
a kernel's) cannot hide by being copied here. Only FFConfig is read from the package (its field
values: the public API), never its helper methods (threshold, peer_kappa): those are re-derived.

Nothing here is fast or clever; it is meant to be read next to DESIGN section 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class OracleStep:
    """Everything one layer step produces, in float64 (rows: positives first, then negatives)."""

    y: torch.Tensor  # [M, N] normalised output
    g: torch.Tensor  # [M] goodness
    loss: torch.Tensor  # 0-dim: the FF loss L only (the peer loss is not part of the reported loss)
    grad_weight: torch.Tensor  # [N, K] dL/dW (+ the peer term)
    grad_bias: Optional[torch.Tensor]  # [N] or None without a bias
    grad_z: torch.Tensor  # [M, N] dL/dz (+ the peer term): the per-row terms of the gradients
    peer_mean: Optional[torch.Tensor]  # [N] the running mean after this step, or None


def softplus(t: torch.Tensor) -> torch.Tensor:
    """log(1 + e^t), exact for every finite t (torch.nn.functional.softplus switches to t above 20)."""
    return torch.logaddexp(t, torch.zeros_like(t))


def _f64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(torch.float64).clone()


def forward(x, weight, bias, config):
    """(y, g) of a layer applied to rows x, DESIGN 1 steps 1, 2 and 5, in float64."""
    with torch.no_grad():
        x, w, b = _f64(x), _f64(weight), _f64(bias)
        z = x @ w.T
        if b is not None:
            z = z + b
        h = torch.relu(z)
        return _normalised(h, config), _goodness(h, config)


def _goodness(h, config):
    n = h.shape[1]
    q = (h * h).sum(dim=1)
    return q if config.goodness == "sum" else q / n


def _normalised(h, config):
    n = h.shape[1]
    q = (h * h).sum(dim=1, keepdim=True)
    if config.norm == "l2":
        return h / (q.sqrt() + config.eps)
    if config.norm == "rms":
        return h / ((q / n).sqrt() + config.eps)
    return h.clone()


def layer_step(x_pos, x_neg, weight, bias, config, peer_mean=None, goodness_shift=None) -> OracleStep:
    """One layer step in gradient mode. ``peer_mean``: the running mean before the step (used only
    when config.peer_norm != "none"; None means the op's initial value, 0.5 everywhere).

    ``goodness_shift`` [M] (a constant, default none): the loss is evaluated at g + shift instead
    of g, everything else unchanged. With a backend's own goodness error as the shift, this is the
    step that backend must return given its goodness (the loss and its gradient can be far more
    sensitive to g than g is accurate: a saturated SymBa pair at t = -30 turns a 7e-7 error of g
    into 2e-5 of the gradient). The goodness itself is then judged against the unshifted oracle."""
    xp, xn = _f64(x_pos), _f64(x_neg)
    b_pos = xp.shape[0]
    w = _f64(weight).requires_grad_(True)
    b = None if bias is None else _f64(bias).requires_grad_(True)
    n = w.shape[0]

    # 1. z = x W^T + b on the rows [x_pos; x_neg], h = relu(z)
    x = torch.cat([xp, xn])
    z = x @ w.T
    if b is not None:
        z = z + b
    z.retain_grad()  # dL/dz: the per-row terms the few-row tolerance is measured against
    h = torch.relu(z)  # autograd's relu'(0) = 0, as DESIGN requires

    # 2. goodness
    g = _goodness(h, config)

    # 3. the loss
    g_loss = g if goodness_shift is None else g + _f64(goodness_shift)
    if config.loss == "softplus":
        threshold = config.theta * n if config.theta_per_unit else config.theta
        sign = torch.cat([torch.ones(b_pos, dtype=torch.float64),
                          -torch.ones(xn.shape[0], dtype=torch.float64)])
        loss = softplus(-sign * (g_loss - threshold)).mean()
    else:  # SymBa: rows paired by index
        d = g_loss[:b_pos] - g_loss[b_pos:]
        loss = softplus(-config.alpha * d).mean()

    # 7. peer normalisation: the running mean is updated with this batch first
    total = loss
    new_mean = None
    if config.peer_norm != "none":
        rho, lam = config.peer_rho, config.peer_lambda
        old_mean = torch.full((n,), 0.5, dtype=torch.float64) if peer_mean is None else _f64(peer_mean)
        if config.peer_norm == "hinton":
            # Hinton's code adds kappa (m_j - mean m) to dL/dz_ij of every positive row and every
            # unit (dead or alive), kappa = lambda / B+: a direct term, not the gradient of a loss.
            # Written as the formula: sum_ij p_j z_ij has exactly that gradient with respect to z.
            new_mean = rho * old_mean + (1 - rho) * h[:b_pos].detach().mean(dim=0)
            kappa = lam / b_pos
            p = kappa * (new_mean - new_mean.mean())
            total = total + (p * z[:b_pos]).sum()
        else:
            # loeweX: autograd of lambda * mean_j (mean(m) - m_j)^2 through the running mean, with
            # the ReLU's gradient passed through (value relu(z), gradient 1), so dead units revive.
            h_through = z + (torch.relu(z) - z).detach()
            m = rho * old_mean + (1 - rho) * h_through[:b_pos].mean(dim=0)
            total = total + lam * ((m.mean() - m) ** 2).mean()
            new_mean = m.detach()

    total.backward()
    with torch.no_grad():
        return OracleStep(
            y=_normalised(h.detach(), config), g=g.detach(), loss=loss.detach(),
            grad_weight=w.grad, grad_bias=None if b is None else b.grad, grad_z=z.grad,
            peer_mean=new_mean)


def sgd(param, grad, buf, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, decoupled=False):
    """One SGD step (DESIGN 1 step 6) in float64: returns (new param, new momentum buffer or None).

    ``buf`` is the momentum buffer before the step, or None where the op creates it this step.
    PyTorch's convention (coupled weight decay):
        g' = grad + wd p;  buf = mu buf + (1 - d) g'  (buf = g' on the step that creates it);
        p <- p - lr buf    (p - lr g' without momentum)
    Hinton's (decoupled weight decay), from zero buffers when created:
        buf = mu buf + (1 - d) grad;  p <- p - lr (buf + wd p)   (p - lr (grad + wd p) without momentum)
    """
    p, grad = _f64(param), _f64(grad)
    if not decoupled:
        grad = grad + weight_decay * p
    if momentum != 0:
        if buf is None and not decoupled:
            buf = grad.clone()
        else:
            buf = torch.zeros_like(p) if buf is None else _f64(buf)
            buf = momentum * buf + (1 - dampening) * grad
        step = buf
    else:
        buf = None
        step = grad
    if decoupled:
        step = step + weight_decay * p
    return p - lr * step, buf
