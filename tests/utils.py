"""Shared test helpers: fresh inputs, the float64 reference, relative errors and per-dtype tolerances."""

from __future__ import annotations

import itertools

import torch

import ff_kernels as ffk
from ff_kernels import reference

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


def rel_err_in_dtype(out, ref, scale=None):
    """rel_err against the float64 reference rounded to the output's dtype: the best a kernel can
    return. Rounding costs nothing against the tolerances (2^-11 for fp16 against 1e-2) but keeps
    values the dtype cannot hold from failing a right kernel: a saturated loss (g far above theta,
    likely with a single row) gives gradients ~1e-8, below fp16's smallest subnormal (6e-8), so an
    fp16 grad_bias of -0 against -2e-8 would be a relative error of 1.0.
    scale: the norm to divide by instead of the reference's own (see gradient_term_norms)."""
    ref = ref.to(out.dtype)
    if scale is None:
        return rel_err(out, ref)
    return (out.double() - ref.double()).norm().item() / max(scale, 1e-300)


FEW_ROWS = 16


def gradient_term_norms(x_pos, x_neg, w, b, config):
    """Norms of |G|^T |X| and sum_i |G_i| (G = dL/dz, float64): grad_weight and grad_bias as they
    would be if no two rows' contributions cancelled. Rounding the GEMM operands (tf32: 2^-11 per
    term; fp16/bf16 y) errs relative to the terms, not to their sum, so with a handful of rows a
    near-cancelling pair (say a positive and a negative row pulling one weight almost equally) can
    leave a right kernel several tolerances off the sum (seen: 5.6e-3 against 2e-3 for tf32 on
    1+1x1->1). For M <= FEW_ROWS the gradients are measured against these norms, the rigorous
    bound for a sum of rounded terms; for more rows against the reference's own norm, as on the GPU."""
    n = w.shape[0]
    x = torch.cat([x_pos, x_neg]).double()
    h = (x @ w.double().t() + (0.0 if b is None else b.double())).clamp_min(0.0)
    g = reference.goodness_from_sumsq(h.square().sum(1), config, n)
    _, dg = reference.loss_and_goodness_grad(g, x_pos.shape[0], config, config.threshold(n))
    gz = (dg * reference.goodness_grad_factor(config, n))[:, None] * h
    return (gz.abs().t() @ x.abs()).norm().item(), gz.abs().sum(0).norm().item()


def assert_step_close(out, ref, tol, what="", grad_scales=(None, None)):
    """Every output of a fused step within ``tol`` of the float64 reference step ``ref`` (NaN fails)."""
    assert out.g_pos.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert out.loss.dim() == 0
    errs = {
        "y": rel_err_in_dtype(torch.cat([out.y_pos, out.y_neg]), torch.cat([ref.y_pos, ref.y_neg])),
        "g": rel_err_in_dtype(torch.cat([out.g_pos, out.g_neg]), torch.cat([ref.g_pos, ref.g_neg])),
        "loss": rel_err_in_dtype(out.loss, ref.loss),
    }
    if ref.grad_weight is not None:
        errs["grad_weight"] = rel_err_in_dtype(out.grad_weight, ref.grad_weight, grad_scales[0])
    if ref.grad_bias is not None:
        errs["grad_bias"] = rel_err_in_dtype(out.grad_bias, ref.grad_bias, grad_scales[1])
    bad = {k: v for k, v in errs.items() if not v <= tol}  # "not <=" also catches NaN
    assert not bad, f"{what} errors above {tol}: {bad} (all: {errs})"


def fp16_range_inputs(case: str):
    """The fp16 range cases (DESIGN 6), in float32 on the CPU: "u0-255-rms"/"u0-255-l2" (x ~ U(0, 255),
    |h| in the hundreds), "huge-h" (|h| ~ 1e5 > 65504, y normalised to O(1)), "tiny-h" (|h| ~ 1e-6,
    below fp16's normal range). Returns (x_pos, x_neg, w, b, config)."""
    gen = torch.Generator().manual_seed(7)
    m_pos, k, n = 24, 64, 40
    norm = "l2" if case.endswith("l2") else "rms"
    x = torch.rand(2 * m_pos + 1, k, generator=gen) * 255
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    b = torch.randn(n, generator=gen) * 0.1
    config = ffk.FFConfig(goodness="mean", norm=norm, theta=2e4)
    if case == "huge-h":
        w = torch.rand(n, k, generator=gen) * 24
        b = b * 1e3
        config = ffk.FFConfig(goodness="mean", norm="rms", theta=1e10)
    elif case == "tiny-h":
        x = torch.rand(2 * m_pos + 1, k, generator=gen)
        w, b = w * 1e-6, b * 1e-6
        config = ffk.FFConfig(goodness="mean", norm="rms", theta=3e-12, eps=1e-12)
    return x[:m_pos], x[m_pos:], w, b, config
