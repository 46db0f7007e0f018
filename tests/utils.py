"""Shared test helpers: fresh inputs, the float64 reference, relative errors and per-dtype tolerances."""

from __future__ import annotations

import itertools

import torch

import ff_kernels as ffk

# Norm-wise relative error |out - ref| / |ref| allowed against the float64 reference, per input dtype.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    "tf32": 2e-3,
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,
}

ALL_CONFIGS = [
    ffk.FFConfig(goodness=g, norm=n, loss=l, theta=theta, alpha=1.5)
    for g, n, l in itertools.product(("sum", "mean"), ("l2", "rms", "none"), ("softplus", "symba"))
    # thresholds near the typical goodness so the sigmoid weights are neither 0 nor 1
    for theta in [3.0 if g == "sum" else 0.3]
]


def config_id(c: ffk.FFConfig) -> str:
    return f"{c.goodness}-{c.norm}-{c.loss}"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def make_layer(m_pos, m_neg, k, n, dtype=torch.float32, device="cpu", bias=True, seed=None):
    """Fresh random inputs (never zeros): x_pos, x_neg, weight, bias, scaled so that about half the
    ReLUs are active and goodness is O(1)."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2**31, ()).item())
    x_pos = torch.randn(m_pos, k, generator=gen)
    x_neg = torch.randn(m_neg, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    b = torch.randn(n, generator=gen) * 0.1 if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return cast(x_pos), cast(x_neg), cast(w), cast(b)


def float64_reference(x_pos, x_neg, weight, bias, config, **kw):
    """The reference backend on the same values in float64."""
    up = lambda t: None if t is None else t.detach().double().clone()
    bufs = kw.pop("momentum_buffers", None)
    if bufs is not None:
        kw["momentum_buffers"] = tuple(up(b) for b in bufs)
    w, b = up(weight), up(bias)
    out = ffk.ff_layer_step(up(x_pos), up(x_neg), w, b, config=config, backend="torch", **kw)
    return out, w, b


def poison_(*tensors) -> None:
    """Fill tensors with NaN so any element a kernel fails to write shows up."""
    for t in tensors:
        if t is not None:
            t.fill_(float("nan"))
