"""The "torch" backend is the spec: it must equal torch.autograd on the FF loss, and torch.optim.SGD."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ff_kernels as ffk
from tests.conftest import requires_cuda
from tests.utils import (ALL_CONFIGS, TOLERANCE, config_id, float64_reference, make_layer,
                         rel_err)


def softplus(t):
    # exact everywhere; F.softplus's threshold (t > 20 -> t, gradient 1) is off by exp(-20)
    return torch.logaddexp(t, torch.zeros_like(t))


def autograd_step(x_pos, x_neg, weight, bias, config):
    """DESIGN.md section 1 written the obvious way, differentiated by autograd."""
    w = weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    x = torch.cat([x_pos, x_neg])
    h = F.relu(F.linear(x, w, b))
    n = h.shape[1]
    q = (h ** 2).sum(dim=1)
    g = q if config.goodness == "sum" else q / n
    theta = config.threshold(n)
    if config.loss == "softplus":
        sign = torch.cat([torch.ones(len(x_pos)), -torch.ones(len(x_neg))]).to(g)
        loss = softplus(-sign * (g - theta)).mean()
    else:
        loss = softplus(-config.alpha * (g[:len(x_pos)] - g[len(x_pos):])).mean()
    if config.norm == "l2":
        y = h / (q.sqrt() + config.eps)[:, None]
    elif config.norm == "rms":
        y = h / ((q / n).sqrt() + config.eps)[:, None]
    else:
        y = h
    loss.backward()
    return dict(loss=loss.detach(), g=g.detach(), y=y.detach(), grad_weight=w.grad,
                grad_bias=None if b is None else b.grad)


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=config_id)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_autograd_float64(config, bias):
    b = 23
    shapes = (b, b) if config.loss == "symba" else (b, 17)
    x_pos, x_neg, w, bvec = make_layer(*shapes, k=37, n=29, dtype=torch.float64, bias=bias)
    want = autograd_step(x_pos, x_neg, w, bvec, config)
    w0, b0 = w.clone(), None if bvec is None else bvec.clone()
    out = ffk.ff_layer_step(x_pos, x_neg, w, bvec, config=config, backend="torch")

    assert torch.allclose(out.loss, want["loss"], rtol=1e-12, atol=0)
    assert out.loss.dim() == 0 and out.loss.dtype == torch.float64
    assert torch.allclose(torch.cat([out.g_pos, out.g_neg]), want["g"], rtol=1e-12, atol=0)
    assert torch.allclose(torch.cat([out.y_pos, out.y_neg]), want["y"], rtol=1e-12, atol=1e-15)
    assert rel_err(out.grad_weight, want["grad_weight"]) < 1e-12
    if bias:
        assert rel_err(out.grad_bias, want["grad_bias"]) < 1e-12
    else:
        assert out.grad_bias is None
    assert out.momentum_buffers is None
    # gradient mode changes nothing
    assert torch.equal(w, w0) and (bvec is None or torch.equal(bvec, b0))
    # the gradient is not trivially zero: the test would pass on a dead layer otherwise
    assert out.grad_weight.abs().max() > 1e-6


@pytest.mark.parametrize("config", ALL_CONFIGS[:4], ids=config_id)
def test_forward_matches_step_outputs(config):
    x_pos, x_neg, w, b = make_layer(19, 19, k=21, n=33, dtype=torch.float64)
    step = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, backend="torch")
    y, g = ffk.ff_layer_forward(x_neg, w, b, config=config, backend="torch")
    assert torch.equal(y, step.y_neg) and torch.equal(g, step.g_neg)


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.0, 0.01), (0.8, 0.003)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fused_sgd_equals_torch_optim_sgd(momentum, weight_decay, bias):
    """Four fused steps equal autograd gradients fed to torch.optim.SGD for four steps."""
    config = ffk.FFConfig(goodness="sum", theta=3.0, norm="l2")
    lr = 0.05
    _, _, w, b = make_layer(1, 1, k=13, n=11, dtype=torch.float64, bias=bias)
    w_opt = torch.nn.Parameter(w.clone())
    b_opt = None if b is None else torch.nn.Parameter(b.clone())
    params = [p for p in (w_opt, b_opt) if p is not None]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    buffers = None
    for _ in range(4):
        x_pos, x_neg, _, _ = make_layer(9, 7, k=13, n=11, dtype=torch.float64)
        want = autograd_step(x_pos, x_neg, w_opt, b_opt, config)
        w_opt.grad, opt_b = want["grad_weight"], want["grad_bias"]
        if b_opt is not None:
            b_opt.grad = opt_b
        opt.step()
        out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, lr=lr, momentum=momentum,
                                weight_decay=weight_decay, momentum_buffers=buffers, backend="torch")
        assert out.grad_weight is None and out.grad_bias is None
        buffers = out.momentum_buffers
        assert (buffers is None) == (momentum == 0)
    assert rel_err(w, w_opt) < 1e-12
    if bias:
        assert rel_err(b, b_opt) < 1e-12
    if momentum:
        assert rel_err(buffers[0], opt.state[w_opt]["momentum_buffer"]) < 1e-12
        assert (buffers[1] is None) == (not bias)


def test_given_momentum_buffers_are_updated_in_place():
    x_pos, x_neg, w, b = make_layer(8, 8, k=6, n=5, dtype=torch.float32)
    buf_w, buf_b = torch.randn_like(w), torch.randn_like(b)
    ptrs = (buf_w.data_ptr(), buf_b.data_ptr())
    before = buf_w.clone()
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, lr=0.1, momentum=0.5, momentum_buffers=(buf_w, buf_b),
                            backend="torch")
    assert (out.momentum_buffers[0].data_ptr(), out.momentum_buffers[1].data_ptr()) == ptrs
    assert not torch.equal(buf_w, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [ALL_CONFIGS[0], ALL_CONFIGS[9]], ids=config_id)
def test_low_precision_within_tolerance_of_float64(dtype, config):
    """Inputs in dtype vs the float64 result on the same values; also no worse than plain
    PyTorch autograd computing in that dtype (by more than a small margin)."""
    x_pos, x_neg, w, b = make_layer(41, 41, k=53, n=47, dtype=dtype)
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, backend="torch")
    ref, _, _ = float64_reference(x_pos, x_neg, w, b, config)
    plain = autograd_step(x_pos, x_neg, w, b, config)  # autograd in dtype itself
    assert out.g_pos.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert out.y_pos.dtype == dtype and out.grad_weight.dtype == dtype
    tol = TOLERANCE[dtype]
    pairs = {
        "loss": (out.loss, ref.loss, plain["loss"]),
        "g": (torch.cat([out.g_pos, out.g_neg]), torch.cat([ref.g_pos, ref.g_neg]), plain["g"]),
        "y": (torch.cat([out.y_pos, out.y_neg]), torch.cat([ref.y_pos, ref.y_neg]), plain["y"]),
        "grad_weight": (out.grad_weight, ref.grad_weight, plain["grad_weight"]),
        "grad_bias": (out.grad_bias, ref.grad_bias, plain["grad_bias"]),
    }
    for name, (got, want, eager) in pairs.items():
        err = rel_err(got, want)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"
        assert err <= 1.5 * rel_err(eager, want) + 1e-3, f"{name}: worse than plain PyTorch in {dtype}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", ["softplus", "symba"])
@pytest.mark.parametrize("theta", [1e6, -1e6])
def test_extreme_goodness_gives_finite_loss_and_gradients(dtype, loss, theta):
    """|g - theta| ~ 1e6 (and SymBa's |g+ - g-| ~ 1e6): softplus must not overflow."""
    config = ffk.FFConfig(goodness="sum", theta=theta, loss=loss, alpha=2.0)
    x_pos, x_neg, w, b = make_layer(6, 6, k=9, n=7, dtype=torch.float32)
    x_pos = x_pos * 300.0  # positive goodness ~ 1e5..1e6, negatives O(1): SymBa's d is huge too
    x_pos, x_neg, w, b = (t.to(dtype) for t in (x_pos, x_neg, w, b))
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, backend="torch")
    for name in ("loss", "g_pos", "g_neg", "y_pos", "y_neg", "grad_weight", "grad_bias"):
        assert torch.isfinite(getattr(out, name)).all(), name
    if loss == "softplus":
        assert out.loss > 1e4  # one side is 1e6 on the wrong side of theta


@settings(max_examples=40, deadline=None)
@given(
    m_pos=st.integers(1, 40), m_neg=st.integers(1, 40), k=st.integers(1, 50), n=st.integers(1, 50),
    config_index=st.integers(0, len(ALL_CONFIGS) - 1), bias=st.booleans(), update=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_float32_matches_float64(m_pos, m_neg, k, n, config_index, bias, update, seed):
    config = ALL_CONFIGS[config_index]
    if config.loss == "symba":
        m_neg = m_pos
    x_pos, x_neg, w, b = make_layer(m_pos, m_neg, k, n, dtype=torch.float32, bias=bias, seed=seed)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.01) if update else {}
    ref, w_ref, b_ref = float64_reference(x_pos, x_neg, w, b, config, **kw)
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, backend="torch", **kw)
    tol = 1e-4  # tiny shapes have near-cancelling sums; well under the 1e-4 fp32 bar on typical ones
    assert rel_err(out.loss, ref.loss) < tol
    assert rel_err(torch.cat([out.y_pos, out.y_neg]), torch.cat([ref.y_pos, ref.y_neg])) < tol
    assert rel_err(torch.cat([out.g_pos, out.g_neg]), torch.cat([ref.g_pos, ref.g_neg])) < tol
    if update:
        assert rel_err(w, w_ref) < tol and (b is None or rel_err(b, b_ref) < tol)
    else:
        assert rel_err(out.grad_weight, ref.grad_weight) < tol


def test_strided_inputs_equal_contiguous():
    x_pos, x_neg, w, b = make_layer(12, 10, k=30, n=9, dtype=torch.float32)
    wide = torch.randn(12, 60)
    wide[:, ::2] = x_pos
    out_strided = ffk.ff_layer_step(wide[:, ::2], x_neg.t().contiguous().t(), w.t().contiguous().t(), b,
                                    backend="torch")
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, backend="torch")
    # the same math; BLAS may sum in another order for another layout, so fp32 rounding, not bits
    for name in ("grad_weight", "grad_bias", "y_pos", "y_neg", "g_pos", "loss"):
        assert rel_err(getattr(out_strided, name), getattr(out, name)) < 1e-5, name


def test_ops_build_no_autograd_graph():
    x_pos, x_neg, w, b = make_layer(5, 5, k=4, n=3)
    w.requires_grad_()
    out = ffk.ff_layer_step(x_pos.requires_grad_(), x_neg, w, b, backend="torch")
    assert all(t.grad_fn is None and not t.requires_grad
               for t in (out.y_pos, out.loss, out.grad_weight, out.g_pos))


def test_auto_picks_reference_on_cpu():
    assert "torch" in ffk.available_backends()
    x_pos, x_neg, w, b = make_layer(5, 5, k=4, n=3)
    auto = ffk.ff_layer_step(x_pos, x_neg, w, b)
    ref = ffk.ff_layer_step(x_pos, x_neg, w, b, backend="torch")
    assert torch.equal(auto.grad_weight, ref.grad_weight)
    assert ffk.backend_status()["torch"] == "available"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_on_cuda_matches_float64(dtype):
    config = ALL_CONFIGS[3]
    x_pos, x_neg, w, b = make_layer(301, 301, k=257, n=263, dtype=dtype, device="cuda")
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, backend="torch")
    ref, _, _ = float64_reference(x_pos, x_neg, w, b, config)
    tol = TOLERANCE["tf32"] if dtype == torch.float32 else TOLERANCE[dtype]
    assert rel_err(out.grad_weight, ref.grad_weight) < tol
    assert rel_err(out.y_pos, ref.y_pos) < tol


# ---------------------------------------------------------------- SGD conventions (DESIGN 1.6)

@pytest.mark.parametrize("momentum,dampening,weight_decay", [(0.9, 0.9, 0.0), (0.9, 0.5, 0.01),
                                                             (0.5, 0.1, 0.003), (0.0, 0.5, 0.01)])
def test_dampening_equals_torch_optim_sgd(momentum, dampening, weight_decay):
    """PyTorch's convention, first step included (the op creates the buffers: buf = grad)."""
    config = ffk.FFConfig(goodness="sum", theta=3.0, norm="rms")
    lr = 0.05
    _, _, w, b = make_layer(1, 1, k=13, n=11, dtype=torch.float64)
    w_opt, b_opt = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
    opt = torch.optim.SGD([w_opt, b_opt], lr=lr, momentum=momentum, dampening=dampening,
                          weight_decay=weight_decay)
    buffers = None
    for _ in range(4):
        x_pos, x_neg, _, _ = make_layer(9, 7, k=13, n=11, dtype=torch.float64)
        want = autograd_step(x_pos, x_neg, w_opt, b_opt, config)
        w_opt.grad, b_opt.grad = want["grad_weight"], want["grad_bias"]
        opt.step()
        out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, lr=lr, momentum=momentum,
                                weight_decay=weight_decay, dampening=dampening,
                                momentum_buffers=buffers, backend="torch")
        buffers = out.momentum_buffers
    assert rel_err(w, w_opt) < 1e-12 and rel_err(b, b_opt) < 1e-12
    if momentum:
        assert rel_err(buffers[0], opt.state[w_opt]["momentum_buffer"]) < 1e-12


@pytest.mark.parametrize("given_buffers", [False, True], ids=["created", "given"])
def test_decoupled_weight_decay_is_hintons_rule(given_buffers):
    """Hinton's code: buf = mu buf + (1 - d) grad from zero buffers; p -= lr (buf + wd p)."""
    config = ffk.FFConfig(goodness="sum", theta=3.0, norm="rms")
    lr, mu, d, wd = 0.05, 0.9, 0.9, 0.001
    _, _, w, b = make_layer(1, 1, k=13, n=11, dtype=torch.float64)
    w_want, b_want = w.clone(), b.clone()
    buf_w, buf_b = torch.zeros_like(w), torch.zeros_like(b)
    buffers = (buf_w.clone(), buf_b.clone()) if given_buffers else None
    for _ in range(3):
        x_pos, x_neg, _, _ = make_layer(9, 7, k=13, n=11, dtype=torch.float64)
        want = autograd_step(x_pos, x_neg, w_want, b_want, config)
        for p, buf, grad in ((w_want, buf_w, want["grad_weight"]), (b_want, buf_b, want["grad_bias"])):
            buf.mul_(mu).add_((1 - d) * grad)
            p.sub_(lr * (buf + wd * p))
        out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, lr=lr, momentum=mu, dampening=d,
                                weight_decay=wd, decoupled_weight_decay=True,
                                momentum_buffers=buffers, backend="torch")
        buffers = out.momentum_buffers
    assert rel_err(w, w_want) < 1e-12 and rel_err(b, b_want) < 1e-12
    assert rel_err(buffers[0], buf_w) < 1e-12 and rel_err(buffers[1], buf_b) < 1e-12


# ---------------------------------------------------------------- peer normalisation (DESIGN 1.7)

def _loewex_oracle(x_pos, x_neg, weight, bias, config, mean0):
    """loeweX's peer loss lambda * mean_j (mean(m) - m_j)^2 on the running mean updated with this
    batch, through a ReLU whose gradient passes unchanged (dead units too), added to the FF loss."""
    ff = autograd_step(x_pos, x_neg, weight, bias, config)
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_()
    z = F.linear(x_pos, w, b)
    h_full_grad = z + (F.relu(z) - z).detach()  # value relu(z), gradient 1 everywhere
    m = config.peer_rho * mean0 + (1 - config.peer_rho) * h_full_grad.mean(0)
    peer_loss = config.peer_lambda * (m.mean() - m).square().mean()
    peer_loss.backward()
    return ff, ff["grad_weight"] + w.grad, ff["grad_bias"] + b.grad, m.detach()


@pytest.mark.parametrize("n_pos,n_neg", [(9, 7), (12, 12)])
def test_loewex_peer_norm_equals_autograd_of_both_losses(n_pos, n_neg):
    config = ffk.FFConfig.loewex()
    x_pos, x_neg, w, b = make_layer(n_pos, n_neg, k=19, n=23, dtype=torch.float64)
    w = w * 2.0 - 0.05  # some units dead for every row: the peer term must still reach them
    mean0 = torch.rand(23, dtype=torch.float64)
    ff, grad_w, grad_b, mean_want = _loewex_oracle(x_pos, x_neg, w, b, config, mean0)
    peer_mean = mean0.clone()
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, peer_mean=peer_mean, backend="torch")
    assert out.peer_mean is peer_mean
    assert rel_err(peer_mean, mean_want) < 1e-12
    assert rel_err(out.grad_weight, grad_w) < 1e-12 and rel_err(out.grad_bias, grad_b) < 1e-12
    assert rel_err(out.loss, ff["loss"]) < 1e-12  # the FF loss only: the peer loss is not reported
    # the peer term is not negligible here (else the test could not fail)
    assert rel_err(ff["grad_weight"], grad_w) > 1e-6


def test_hinton_peer_norm_equals_its_formula():
    """Hinton's code adds kappa (m - mean m) to dL/dz of every positive row, kappa = lambda / B+."""
    config = ffk.FFConfig.hinton()
    n_pos, n = 11, 17
    x_pos, x_neg, w, b = make_layer(n_pos, 8, k=13, n=n, dtype=torch.float64)
    mean0 = torch.rand(n, dtype=torch.float64)
    ff = autograd_step(x_pos, x_neg, w, b, config)
    h_pos = F.relu(F.linear(x_pos, w, b))
    m = config.peer_rho * mean0 + (1 - config.peer_rho) * h_pos.mean(0)
    p = config.peer_lambda / n_pos * (m - m.mean())
    peer_mean = mean0.clone()
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, peer_mean=peer_mean, backend="torch")
    assert rel_err(peer_mean, m) < 1e-12
    assert rel_err(out.grad_weight, ff["grad_weight"] + torch.outer(p, x_pos.sum(0))) < 1e-12
    assert rel_err(out.grad_bias, ff["grad_bias"] + n_pos * p) < 1e-12


def test_peer_mean_created_at_one_half_and_update_mode_uses_the_peer_gradient():
    config = ffk.FFConfig.hinton()
    x_pos, x_neg, w, b = make_layer(10, 10, k=9, n=7, dtype=torch.float64)
    grad = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, backend="torch")
    fresh = torch.full((7,), 0.5, dtype=torch.float64)
    again = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, peer_mean=fresh, backend="torch")
    assert torch.equal(grad.peer_mean, fresh) and torch.equal(grad.grad_weight, again.grad_weight)
    w_up, b_up = w.clone(), b.clone()
    ffk.ff_layer_step(x_pos, x_neg, w_up, b_up, config=config, lr=0.1, backend="torch")
    assert rel_err(w_up, w - 0.1 * grad.grad_weight) < 1e-12
    assert rel_err(b_up, b - 0.1 * grad.grad_bias) < 1e-12


# ---------------------------------------------------------------- memory shared with updated tensors

def test_input_overlapping_updated_weight_reads_it_as_on_entry():
    """x_pos a view of the weight being updated: the same result as a separate copy."""
    config = ffk.FFConfig(goodness="sum", theta=3.0, norm="l2")
    _, x_neg, w, b = make_layer(6, 6, k=6, n=6)
    w_alias, w_copy = w.clone(), w.clone()
    out_alias = ffk.ff_layer_step(w_alias[:4], x_neg, w_alias, b.clone(), config=config, lr=0.1,
                                  backend="torch")
    out_copy = ffk.ff_layer_step(w[:4].clone(), x_neg, w_copy, b.clone(), config=config, lr=0.1,
                                 backend="torch")
    assert torch.equal(w_alias, w_copy) and torch.equal(out_alias.loss, out_copy.loss)


# ---------------------------------------------------------------- torch's tf32 switch

@pytest.fixture
def restore_tf32():
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    yield matmul
    matmul.fp32_precision = saved


@pytest.mark.parametrize("setting,want", [("tf32", True), ("ieee", False)])
def test_tf32_switch_read_from_the_new_api(restore_tf32, setting, want):
    restore_tf32.fp32_precision = setting
    assert ffk.backends.fp32_matmul_uses_tf32() is want


@pytest.mark.parametrize("legacy", [True, False])
def test_tf32_switch_read_from_the_legacy_flag(restore_tf32, legacy):
    restore_tf32.fp32_precision = "none"
    restore_tf32.allow_tf32 = legacy
    assert ffk.backends.fp32_matmul_uses_tf32() is legacy


# ---------------------------------------------------------------- non-finite inputs (DESIGN 2, 6)

def _poison(kw, name, value):
    t = kw[name].clone()
    t.view(-1)[t.numel() // 2] = value
    kw[name] = t
    return kw


@pytest.mark.parametrize("name", ["x_pos", "x_neg", "weight", "bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_input_reaches_the_loss_and_the_flag(name, value):
    x_pos, x_neg, w, b = make_layer(7, 6, k=9, n=5)
    kw = _poison(dict(x_pos=x_pos, x_neg=x_neg, weight=w, bias=b), name, value)
    out = ffk.ff_layer_step(**kw, config=ALL_CONFIGS[0], backend="torch")
    assert out.nonfinite.dtype == torch.bool and out.nonfinite.dim() == 0 and bool(out.nonfinite)
    assert torch.isnan(out.loss)
    clean = ffk.ff_layer_step(x_pos, x_neg, w, b, config=ALL_CONFIGS[0], backend="torch")
    assert not bool(clean.nonfinite) and torch.isfinite(clean.loss)


def test_inf_hidden_by_a_dead_relu_still_flags_the_step():
    """x = +inf against a negative weight row gives z = -inf, h = 0: finite outputs, poisoned gradient."""
    x_pos, x_neg, w, b = make_layer(4, 4, k=3, n=2)
    w = -w.abs()
    x_pos = x_pos.abs()
    x_pos[0, 0] = float("inf")
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, backend="torch")
    assert bool(out.nonfinite) and torch.isnan(out.loss)


@pytest.mark.parametrize("lr", [None, 0.1], ids=["grad", "update"])
def test_skip_nonfinite_leaves_every_written_tensor_unchanged(lr):
    config = ffk.FFConfig.hinton()
    x_pos, x_neg, w, b = make_layer(8, 8, k=9, n=5)
    x_pos[3, 2] = float("nan")
    bufs = (torch.randn_like(w), torch.randn_like(b)) if lr else None
    peer_mean = torch.rand(5)
    before = [t.clone() for t in (w, b, peer_mean, *(bufs or ()))]
    kw = dict(lr=lr, momentum=0.9, momentum_buffers=bufs) if lr else {}
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, peer_mean=peer_mean, skip_nonfinite=True,
                            backend="torch", **kw)
    assert bool(out.nonfinite)
    for t, old in zip((w, b, peer_mean, *(bufs or ())), before):
        assert torch.equal(t, old)


def test_skip_nonfinite_changes_nothing_on_a_finite_step():
    config = ffk.FFConfig.hinton()
    x_pos, x_neg, w, b = make_layer(8, 8, k=9, n=5)
    w_skip, b_skip, pm_skip, pm = w.clone(), b.clone(), torch.rand(5), None
    pm = pm_skip.clone()
    ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, lr=0.1, momentum=0.9, peer_mean=pm, backend="torch")
    ffk.ff_layer_step(x_pos, x_neg, w_skip, b_skip, config=config, lr=0.1, momentum=0.9, peer_mean=pm_skip,
                      skip_nonfinite=True, backend="torch")
    assert torch.equal(w, w_skip) and torch.equal(b, b_skip) and torch.equal(pm, pm_skip)


# ---------------------------------------------------------------- the update alone (sgd_update_)

@pytest.mark.parametrize("decoupled", [False, True], ids=["pytorch", "hinton"])
def test_sgd_update_on_given_gradients_equals_the_fused_step(decoupled):
    config = ffk.FFConfig(goodness="sum", theta=3.0, norm="rms")
    kw = dict(lr=0.05, momentum=0.9, dampening=0.5, weight_decay=0.01, decoupled_weight_decay=decoupled)
    _, _, w, b = make_layer(1, 1, k=13, n=11, dtype=torch.float64)
    w_sep, b_sep = w.clone(), b.clone()
    bufs, buf_w, buf_b = None, None, None
    for _ in range(3):
        x_pos, x_neg, _, _ = make_layer(9, 7, k=13, n=11, dtype=torch.float64)
        grads = ffk.ff_layer_step(x_pos, x_neg, w_sep, b_sep, config=config, backend="torch")
        buf_w = ffk.sgd_update_(w_sep, grads.grad_weight, buf_w, backend="torch", **kw)
        buf_b = ffk.sgd_update_(b_sep, grads.grad_bias, buf_b, backend="torch", **kw)
        bufs = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, momentum_buffers=bufs, backend="torch",
                                 **kw).momentum_buffers
    assert rel_err(w_sep, w) < 1e-12 and rel_err(b_sep, b) < 1e-12
    assert rel_err(buf_w, bufs[0]) < 1e-12 and rel_err(buf_b, bufs[1]) < 1e-12


def test_sgd_update_with_a_true_skip_flag_changes_nothing():
    w, grad, buf = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    w0, buf0 = w.clone(), buf.clone()
    ffk.sgd_update_(w, grad, buf, lr=0.1, momentum=0.9, skip=torch.tensor(True))
    assert torch.equal(w, w0) and torch.equal(buf, buf0)
    ffk.sgd_update_(w, grad, buf, lr=0.1, momentum=0.9, skip=torch.tensor(False))
    assert not torch.equal(w, w0)
