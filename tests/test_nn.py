"""Modules: FFLinear's training modes (fused SGD in both conventions, dampening, optimizers, peer
normalisation), FFReadout, FFNet's input normalisation, hard negatives, predict, presets, validation
before any change, the learning-rate schedule, and the training state (state_dict round trip,
bit-identical resume, .to/.half/.double)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ff_kernels as ffk
from ff_kernels import nn as ffnn
from ff_kernels.data import embed_labels, embed_neutral_label, load_digits_split, positive_negative
from tests.utils import make_layer


def _clone_params(layer):
    return [p.detach().clone() for p in layer.parameters()]


# ------------------------------------------------------------------------------------------- FFLinear
def test_fflinear_fused_sgd_equals_op_and_keeps_momentum():
    layer = ffk.FFLinear(9, 7, backend="torch")
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    bufs = None
    for _ in range(3):
        x_pos, x_neg, _, _ = make_layer(5, 4, k=9, n=7)
        layer.train_step(x_pos, x_neg, lr=0.1, momentum=0.9, weight_decay=0.01)
        out = ffk.ff_layer_step(x_pos, x_neg, w, b, layer.config, lr=0.1, momentum=0.9, weight_decay=0.01,
                                momentum_buffers=bufs, backend="torch")
        bufs = out.momentum_buffers
    assert torch.equal(layer.weight.detach(), w) and torch.equal(layer.bias.detach(), b)
    assert torch.equal(layer.momentum_buffers[0], bufs[0]) and torch.equal(layer.momentum_bias, bufs[1])
    assert "momentum_weight" in layer.state_dict()


def test_fflinear_with_torch_optimizer_equals_adam_on_returned_grads():
    layer = ffk.FFLinear(9, 7, backend="torch")
    shadow = torch.nn.Parameter(layer.weight.detach().clone())
    shadow_b = torch.nn.Parameter(layer.bias.detach().clone())
    opt = torch.optim.Adam(layer.parameters(), lr=0.01)
    ref_opt = torch.optim.Adam([shadow, shadow_b], lr=0.01)
    for _ in range(3):
        x_pos, x_neg, _, _ = make_layer(5, 4, k=9, n=7)
        out = ffk.ff_layer_step(x_pos, x_neg, shadow.detach(), shadow_b.detach(), layer.config,
                                backend="torch")
        shadow.grad, shadow_b.grad = out.grad_weight, out.grad_bias
        ref_opt.step()
        layer.train_step(x_pos, x_neg, optimizer=opt)
    assert torch.allclose(layer.weight.detach(), shadow.detach(), rtol=1e-6, atol=1e-7)
    assert torch.allclose(layer.bias.detach(), shadow_b.detach(), rtol=1e-6, atol=1e-7)


def test_fflinear_forward_returns_y_and_goodness_through_methods():
    layer = ffk.FFLinear(6, 5, bias=False, backend="torch")
    w = layer.weight.detach().clone()
    x_pos, x_neg, _, _ = make_layer(4, 4, k=6, n=5)
    out = layer.train_step(x_pos, x_neg)
    assert out.grad_weight is not None and out.grad_bias is None
    assert torch.equal(layer.weight.detach(), w)
    y = layer(x_pos)
    assert isinstance(y, torch.Tensor) and torch.equal(y, out.y_pos)
    assert torch.equal(layer.goodness(x_pos), out.g_pos)
    y2, g2 = layer.forward_with_goodness(x_pos)
    assert torch.equal(y2, y) and torch.equal(g2, out.g_pos)
    with pytest.raises(ValueError, match="not both"):
        layer.train_step(x_pos, x_neg, lr=0.1, optimizer=torch.optim.SGD(layer.parameters(), lr=0.1))


def test_fflinear_layers_compose_in_sequential():
    l1, l2 = ffk.FFLinear(8, 6, backend="torch"), ffk.FFLinear(6, 5, backend="torch")
    x = torch.rand(3, 8)
    assert torch.equal(torch.nn.Sequential(l1, l2)(x), l2(l1(x)))


@pytest.mark.parametrize("dampening,wd", [(0.5, 0.0), (0.9, 0.01), (0.0, 0.003)])
def test_fflinear_dampening_equals_torch_sgd(dampening, wd):
    """PyTorch's convention (the first step sets buf = grad, then buf = mu buf + (1 - d) grad')."""
    layer = ffk.FFLinear(7, 5, backend="torch", dtype=torch.float64)
    shadow = [torch.nn.Parameter(p.detach().clone()) for p in layer.parameters()]
    opt = torch.optim.SGD(shadow, lr=0.05, momentum=0.9, dampening=dampening, weight_decay=wd)
    for _ in range(4):
        x_pos, x_neg, _, _ = make_layer(6, 5, k=7, n=5, dtype=torch.float64)
        out = ffk.ff_layer_step(x_pos, x_neg, shadow[0].detach(), shadow[1].detach(), layer.config,
                                backend="torch")
        shadow[0].grad, shadow[1].grad = out.grad_weight, out.grad_bias
        opt.step()
        layer.train_step(x_pos, x_neg, lr=0.05, momentum=0.9, weight_decay=wd, dampening=dampening)
    for p, q in zip(layer.parameters(), shadow):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)
    assert torch.allclose(layer.momentum_weight, opt.state[shadow[0]]["momentum_buffer"], rtol=1e-12, atol=1e-14)


def test_fflinear_decoupled_weight_decay_is_hintons_formula():
    """buf = mu buf + (1 - d) grad (from zero); p -= lr (buf + wd p)."""
    lr, mu, d, wd = 0.02, 0.9, 0.9, 0.001
    layer = ffk.FFLinear(7, 5, backend="torch", dtype=torch.float64)
    params = [p.detach().clone() for p in layer.parameters()]
    bufs = [torch.zeros_like(p) for p in params]
    for _ in range(4):
        x_pos, x_neg, _, _ = make_layer(6, 6, k=7, n=5, dtype=torch.float64)
        out = ffk.ff_layer_step(x_pos, x_neg, params[0], params[1], layer.config, backend="torch")
        for p, buf, g in zip(params, bufs, (out.grad_weight, out.grad_bias)):
            buf.mul_(mu).add_((1 - d) * g)
            p.sub_(lr * (buf + wd * p))
        layer.train_step(x_pos, x_neg, lr=lr, momentum=mu, weight_decay=wd, dampening=d,
                         decoupled_weight_decay=True)
    for p, q in zip(layer.parameters(), params):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------ peer normalisation
class _ReLUFullGrad(torch.autograd.Function):
    """ReLU whose backward passes the gradient through everywhere (loeweX's peer term)."""

    @staticmethod
    def forward(ctx, z):
        return z.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _ff_loss(z_pos, z_neg, config, n):
    """L of DESIGN section 1 in autograd (softplus loss, either goodness)."""
    g = torch.cat([torch.relu(z_pos), torch.relu(z_neg)]).pow(2).sum(1)
    if config.goodness == "mean":
        g = g / n
    sign = torch.cat([torch.ones(len(z_pos)), -torch.ones(len(z_neg))]).to(g)
    return torch.nn.functional.softplus(-sign * (g - config.threshold(n))).mean()


@settings(max_examples=15, deadline=None)
@given(b_pos=st.integers(1, 6), b_neg=st.integers(1, 6), k=st.integers(2, 9), n=st.integers(2, 9),
       rho=st.sampled_from([0.0, 0.5, 0.9]), lam=st.sampled_from([0.03, 1.0, 30.0]),
       seed=st.integers(0, 2**31 - 1))
def test_loewex_peer_gradient_is_autograd_of_loss_plus_peer_loss(b_pos, b_neg, k, n, rho, lam, seed):
    """float64: the module's gradients = autograd of L + lambda mean_j (mean m - m_j)^2 through the
    running mean m = rho m0 + (1 - rho) mean_pos relu(z) (ReLU passed through), over two steps."""
    config = ffk.FFConfig(goodness="sum", theta=1.0, theta_per_unit=True, norm="rms", peer_norm="loewex",
                          peer_lambda=lam, peer_rho=rho)
    layer = ffk.FFLinear(k, n, config, backend="torch", dtype=torch.float64)
    with torch.no_grad():
        layer.peer_mean.uniform_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
    for step in range(2):
        x_pos, x_neg, _, _ = make_layer(b_pos, b_neg, k=k, n=n, dtype=torch.float64, seed=seed + step)
        m0 = layer.peer_mean.clone()
        w = layer.weight.detach().clone().requires_grad_()
        b = layer.bias.detach().clone().requires_grad_()
        z_pos, z_neg = x_pos @ w.t() + b, x_neg @ w.t() + b
        m = rho * m0 + (1 - rho) * _ReLUFullGrad.apply(z_pos).mean(0)
        loss = _ff_loss(z_pos, z_neg, config, n) + lam * (m.mean() - m).pow(2).mean()
        gw, gb = torch.autograd.grad(loss, (w, b))
        out = layer.train_step(x_pos, x_neg)
        assert torch.allclose(out.grad_weight, gw, rtol=1e-9, atol=1e-12)
        assert torch.allclose(out.grad_bias, gb, rtol=1e-9, atol=1e-12)
        assert torch.allclose(layer.peer_mean, m.detach(), rtol=1e-12, atol=1e-14)
        assert torch.allclose(out.loss, loss.detach() - lam * (m.mean() - m).pow(2).mean().detach(), rtol=1e-10)


@settings(max_examples=10, deadline=None)
@given(b_pos=st.integers(1, 6), b_neg=st.integers(1, 6), k=st.integers(2, 9), n=st.integers(2, 9),
       goodness=st.sampled_from(["sum", "mean"]), seed=st.integers(0, 2**31 - 1))
def test_hinton_peer_gradient_is_his_formula(b_pos, b_neg, k, n, goodness, seed):
    """float64: grad = autograd of L + sum_ij p_j z_ij over positive rows, p = (lambda / B+) (m - mean m)
    with m updated by this batch first (dead units included); Adam's step sees the same gradients."""
    config = ffk.FFConfig(goodness=goodness, theta=2.0, norm="rms", peer_norm="hinton", peer_lambda=0.03)
    layer = ffk.FFLinear(k, n, config, backend="torch", dtype=torch.float64)
    x_pos, x_neg, _, _ = make_layer(b_pos, b_neg, k=k, n=n, dtype=torch.float64, seed=seed)
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    z_pos, z_neg = x_pos @ w.t() + b, x_neg @ w.t() + b
    m = 0.9 * torch.full((n,), 0.5, dtype=torch.float64) + 0.1 * torch.relu(z_pos).detach().mean(0)
    p = 0.03 / b_pos * (m - m.mean())
    gw, gb = torch.autograd.grad(_ff_loss(z_pos, z_neg, config, n) + (z_pos * p).sum(), (w, b))
    out = layer.train_step(x_pos, x_neg)
    assert torch.allclose(out.grad_weight, gw, rtol=1e-9, atol=1e-12)
    assert torch.allclose(out.grad_bias, gb, rtol=1e-9, atol=1e-12)
    assert torch.allclose(layer.peer_mean, m)


def test_peer_mean_is_a_buffer_starting_at_half():
    layer = ffk.FFLinear(5, 4, ffk.FFConfig.hinton())
    assert "peer_mean" in dict(layer.named_buffers()) and torch.equal(layer.peer_mean, torch.full((4,), 0.5))
    assert ffk.FFLinear(5, 4).peer_mean is None
    net = ffk.FFNet.loewex([12, 6, 5], epochs=3)
    assert [l.peer_mean.shape for l in net.layers] == [(6,), (5,)]


# ---------------------------------------------------------------------------------- input norm
@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 5), k=st.integers(10, 20), norm=st.sampled_from(["l2", "rms"]),
       seed=st.integers(0, 2**31 - 1))
def test_ffnet_normalises_raw_rows_before_the_first_layer(b, k, norm, seed):
    config = ffk.FFConfig(goodness="sum", theta=3.0, norm=norm)
    net = ffk.FFNet([k, 6, 5], config=config, lr=0.0, backend="torch", dtype=torch.float64)
    x_pos, x_neg, _, _ = make_layer(b, b, k=k, n=6, dtype=torch.float64, seed=seed)
    scale = x_pos.norm(dim=1, keepdim=True) / (k ** 0.5 if norm == "rms" else 1.0)
    expect = x_pos / (scale + config.eps)
    assert torch.allclose(net.normalize_input(x_pos), expect, rtol=1e-12)
    outs = net.train_step(x_pos, x_neg)
    y1, g1 = net.layers[0].forward_with_goodness(expect)
    assert torch.allclose(outs[0].g_pos, g1, rtol=1e-10) and torch.allclose(outs[0].y_pos, y1, rtol=1e-10)
    y2, g2 = net.layers[1].forward_with_goodness(y1)
    assert torch.allclose(outs[1].g_pos, g2, rtol=1e-10)
    assert torch.allclose(net.goodness(x_pos), torch.stack([g1, g2], 1), rtol=1e-10)
    # a row's scale does not matter any more
    assert torch.allclose(net.goodness(3.0 * x_pos), net.goodness(x_pos), rtol=1e-3)
    assert ffk.FFNet([k, 4], config=config, input_norm="none").normalize_input(x_pos) is x_pos


@pytest.mark.parametrize("skip_first", [False, True])
def test_predict_picks_label_of_highest_goodness(skip_first):
    num_classes = 4
    net = ffk.FFNet([10, 12, 9], num_classes=num_classes, backend="torch")
    x = torch.rand(7, 10)
    scores = torch.stack([
        net.goodness(embed_labels(x, torch.full((7,), c), num_classes))[:, int(skip_first):].sum(1)
        for c in range(num_classes)], dim=1)
    assert torch.allclose(net.label_scores(x, skip_first), scores)
    pred = net.predict(x, num_classes, skip_first_goodness=skip_first)
    assert torch.equal(pred, scores.argmax(dim=1))


# ------------------------------------------------------------------------------------- readout
def test_readout_step_equals_torch_sgd_on_cross_entropy():
    """PyTorch's convention, float64: the same as nn.Linear + CrossEntropyLoss + torch.optim.SGD."""
    ro = ffnn.FFReadout(6, 3, lr=0.3, momentum=0.9, dampening=0.0, weight_decay=0.01,
                        decoupled_weight_decay=False, bias=True, dtype=torch.float64)
    with torch.no_grad():
        ro.weight.normal_()
    ref = torch.nn.Linear(6, 3, dtype=torch.float64)
    ref.load_state_dict({"weight": ro.weight.detach().clone(), "bias": ro.bias.detach().clone()})
    opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.9, weight_decay=0.01)
    for step in range(3):
        f = torch.randn(5, 6, dtype=torch.float64)
        y = torch.randint(0, 3, (5,))
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ref(f), y)
        logits_before = ref(f).detach()
        loss.backward()
        opt.step()
        logits, ro_loss = ro.train_step(f, y)
        assert torch.allclose(logits, logits_before) and torch.allclose(ro_loss, loss.detach())
        assert torch.allclose(ro.weight, ref.weight, rtol=1e-12) and torch.allclose(ro.bias, ref.bias, rtol=1e-12)


def test_readout_decoupled_is_hintons_rule():
    ro = ffnn.FFReadout(4, 3, dtype=torch.float64)  # Hinton's defaults: lr 0.1, smoothing 0.9, wc 0.003
    w, buf = torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64)
    for _ in range(3):
        f = torch.randn(6, 4, dtype=torch.float64)
        y = torch.randint(0, 3, (6,))
        p = torch.softmax(f @ w.t(), 1)
        grad = (p - torch.nn.functional.one_hot(y, 3)).t() @ f / 6
        buf = 0.9 * buf + 0.1 * grad
        w = w - 0.1 * (buf + 0.003 * w)
        ro.train_step(f, y)
    assert torch.allclose(ro.weight, w, rtol=1e-12)


def test_readout_reads_layers_above_the_first_in_rms_form_and_predicts():
    net = ffk.FFNet([12, 8, 6, 5], config=ffk.FFConfig(norm="l2"), readout=True, backend="torch")
    x = torch.rand(4, 12)
    feats = net.readout_features(embed_neutral_label(x, 10))
    outs = net.layer_outputs(embed_neutral_label(x, 10))
    assert feats.shape == (4, 11)
    assert torch.allclose(feats, torch.cat([outs[1][0] * 6 ** 0.5, outs[2][0] * 5 ** 0.5], 1))
    with torch.no_grad():
        net.readout.weight.normal_()
    assert torch.equal(net.predict(x, method="readout"), net.readout(feats).argmax(1))
    assert ffk.FFNet([12, 8], readout=True).readout.in_features == 8  # one layer: nothing to skip


def test_hard_negatives_come_from_the_readout_before_its_update():
    net = ffk.FFNet([12, 8, 6], readout=True, negatives="hard", backend="torch")
    with torch.no_grad():
        net.readout.weight.zero_()
        net.readout.weight[3] = 50.0  # label 3 dominates every row's logits
    x, y = torch.rand(16, 12), torch.tensor([3] * 4 + [0] * 12)
    out = net.train_labels(x, y, torch.Generator().manual_seed(0))
    assert (out.negative_labels[4:] == 3).all() and not (out.negative_labels[:4] == 3).any()
    assert out.readout_loss is not None and len(out.layers) == 2


def test_readout_free_hard_negatives_use_per_epoch_goodness(monkeypatch):
    calls = []
    real = ffnn.wrong_labels_from_scores

    def spy(scores, labels, generator=None):
        calls.append(scores.shape)
        return real(scores, labels, generator)

    monkeypatch.setattr(ffnn, "wrong_labels_from_scores", spy)
    net = ffk.FFNet([16, 8], negatives="hard", backend="torch")
    x, y = torch.rand(40, 16), torch.randint(0, 10, (40,))
    scores_seen = []
    monkeypatch.setattr(net, "label_scores", lambda xb, *a, **k: scores_seen.append(len(xb)) or torch.randn(len(xb), 10))
    net.train_epoch(x, y, 16, torch.Generator().manual_seed(0))
    assert sum(scores_seen) == 40  # once per epoch, over all images
    assert calls == [(16, 10), (16, 10), (8, 10)]


# ------------------------------------------------------------------------------------- presets
def test_presets_are_one_liners():
    recipe = ffk.FFNet.pytorch_recipe([784, 500, 500])
    assert recipe.optimizers is not None and recipe.layers[0].config == ffk.FFConfig.pytorch_recipe()
    assert recipe.input_norm == "l2" and not recipe.skip_first_goodness and recipe.readout is None
    hinton = ffk.FFNet.hinton([784, 1000, 1000, 1000], epochs=60)
    assert (hinton.lr, hinton.momentum, hinton.dampening, hinton.weight_decay) == (0.01, 0.9, 0.9, 0.001)
    assert hinton.decoupled_weight_decay and hinton.skip_first_goodness and hinton.optimizers is None
    assert hinton.layers[0].config == ffk.FFConfig.hinton() and hinton.input_norm == "rms"
    assert hinton.negatives == "hard" and hinton.readout_first == 1 and hinton.readout.bias is None
    assert (hinton.readout.lr, hinton.readout.dampening, hinton.readout.weight_decay) == (0.1, 0.9, 0.003)
    assert hinton.lr_schedule == "hinton" and hinton.layers[0].bias.abs().sum() == 0
    loewex = ffk.FFNet.loewex([784, 1000, 1000, 1000], epochs=100)
    assert (loewex.lr, loewex.momentum, loewex.weight_decay, loewex.decoupled_weight_decay) == (1e-3, 0.9, 3e-4, False)
    assert loewex.layers[0].config == ffk.FFConfig.loewex() and loewex.predict_method == "readout"
    assert (loewex.readout.lr, loewex.readout.weight_decay, loewex.readout.decoupled_weight_decay) == (1e-2, 3e-3, False)
    assert loewex.negatives == "uniform" and loewex.lr_schedule == "loewex"
    std = loewex.layers[1].weight.std().item()
    assert abs(std - 1000 ** -0.5) < 0.002  # N(0, 1/fan_out)


def test_lr_schedules():
    assert [ffnn.lr_gain("hinton", e, 10) for e in (1, 5, 6, 10)] == [1.0, 1.0, 0.9, 0.1]
    # loeweX: 0-based epoch i > E // 2: 2 (1 + E - i) / E
    assert [ffnn.lr_gain("loewex", e, 10) for e in (1, 6, 7, 10)] == [1.0, 1.0, 1.0, 0.4]
    net = ffk.FFNet([10, 6], lr=0.1, momentum=0.9, lr_schedule="hinton", epochs=4, backend="torch")
    for _ in range(3):
        net.start_epoch()
    assert net.current_lr_gain == 0.75
    x_pos, x_neg = torch.rand(3, 10), torch.rand(3, 10)
    w, b = net.layers[0].weight.detach().clone(), net.layers[0].bias.detach().clone()
    net.train_step(x_pos, x_neg)
    ffk.ff_layer_step(net.normalize_input(x_pos), net.normalize_input(x_neg), w, b, net.layers[0].config,
                      lr=0.075, momentum=0.9, backend="torch")
    assert torch.equal(net.layers[0].weight.detach(), w)
    adam = ffk.FFNet.pytorch_recipe([10, 6], lr_schedule="loewex", epochs=10)
    for _ in range(10):
        adam.start_epoch()
    assert adam.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.03 * 0.4)
    with pytest.raises(ValueError, match="epochs"):
        ffk.FFNet([10, 6], lr_schedule="hinton")


# ---------------------------------------------------------------------------------- validation
def test_ffnet_checks_every_layer_before_changing_any():
    configs = [ffk.FFConfig(peer_norm="hinton"), ffk.FFConfig(loss="symba")]
    net = ffk.FFNet([8, 6, 5], config=configs, lr=0.1, momentum=0.9, backend="torch")
    net.train_step(torch.rand(4, 8), torch.rand(4, 8))
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match="symba"):
        net.train_step(torch.rand(4, 8), torch.rand(3, 8))
    for name, value in net.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, before[name]), name
    with pytest.raises(ValueError, match="features"):
        net.train_step(torch.rand(4, 7), torch.rand(4, 7))
    with pytest.raises(TypeError, match="dtype"):
        net.train_step(torch.rand(4, 8, dtype=torch.float64), torch.rand(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty"):
        net.train_step(torch.rand(0, 8), torch.rand(4, 8))
    with pytest.raises(ValueError, match="labels"):
        net.train_labels(torch.rand(4, 8), torch.rand(4))
    for bad in (dict(lr=-1.0), dict(momentum=float("nan")), dict(dampening=2.0), dict(negatives="x"),
                dict(predict="readout"), dict(input_norm="bad"), dict(num_classes=1)):
        with pytest.raises((ValueError, TypeError)):
            ffk.FFNet([8, 6], **bad)


def test_train_step_reads_nothing_back_to_the_host(monkeypatch):
    """A later change compiles and graph-captures train_step: no .item()/.tolist()/bool() of tensors."""
    net = ffk.FFNet.hinton([20, 8, 6], epochs=4)
    x, y = torch.rand(6, 20), torch.randint(0, 10, (6,))
    net.train_labels(x, y)  # first step creates the momentum buffers

    def forbidden(*args, **kwargs):
        raise AssertionError("host read inside a training step")

    for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    net.train_labels(x, y, torch.Generator().manual_seed(0))
    net.train_step(embed_labels(x, y, 10), embed_labels(x, (y + 1) % 10, 10))


# ------------------------------------------------------------------------------- training state
def _train_some(net, steps, gen, x, y):
    for _ in range(steps):
        net.train_labels(x, y, gen)


@pytest.mark.parametrize("preset", ["hinton", "loewex", "recipe"])
def test_resume_from_state_dict_is_bit_identical(preset):
    make = {"hinton": lambda: ffk.FFNet.hinton([20, 8, 6], epochs=4),
            "loewex": lambda: ffk.FFNet.loewex([20, 8, 6], epochs=4),
            "recipe": lambda: ffk.FFNet.pytorch_recipe([20, 8, 6], readout=True)}[preset]
    torch.manual_seed(0)
    x, y = torch.rand(10, 20), torch.randint(0, 10, (10,))
    net = make()
    gen = torch.Generator().manual_seed(1)
    net.start_epoch()
    _train_some(net, 3, gen, x, y)
    net.start_epoch(), net.start_epoch()  # into the schedule's second half
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    gen_state = gen.get_state()
    _train_some(net, 3, gen, x, y)

    torch.manual_seed(123)  # a different initialisation, overwritten by the load
    fresh = make()
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    assert fresh.epoch == 3 and fresh.current_lr_gain == net.current_lr_gain
    gen2 = torch.Generator()
    gen2.set_state(gen_state)
    _train_some(fresh, 3, gen2, x, y)
    for (name, a), (_, b) in zip(net.state_dict().items(), fresh.state_dict().items()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    if net.optimizers is not None:
        sa, sb = net.optimizers[0].state_dict()["state"], fresh.optimizers[0].state_dict()["state"]
        assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)


def test_state_dict_holds_all_training_state():
    net = ffk.FFNet.hinton([20, 8, 6], epochs=4)
    net.train_labels(torch.rand(5, 20), torch.randint(0, 10, (5,)))
    keys = set(net.state_dict())
    for i in range(2):
        assert {f"layers.{i}.momentum_weight", f"layers.{i}.momentum_bias", f"layers.{i}.peer_mean"} <= keys
    assert {"readout.weight", "readout.momentum_weight", "_extra_state"} <= keys
    # a net that never stepped loads a stepped one's state (momentum buffers are recreated) and back
    fresh = ffk.FFNet.hinton([20, 8, 6], epochs=4)
    fresh.load_state_dict(net.state_dict())
    assert torch.equal(fresh.layers[1].momentum_weight, net.layers[1].momentum_weight)
    fresh.load_state_dict(ffk.FFNet.hinton([20, 8, 6], epochs=4).state_dict())
    assert fresh.layers[1].momentum_weight is None


def test_to_half_double_move_training_state():
    net = ffk.FFNet.pytorch_recipe([20, 8, 6], config=ffk.FFConfig(peer_norm="hinton"), readout=True)
    net.train_labels(torch.rand(5, 20), torch.randint(0, 10, (5,)))
    peer = net.layers[0].peer_mean.clone()
    net.double()
    assert net.layers[0].weight.dtype == torch.float64 and net.layers[0].peer_mean.dtype == torch.float64
    assert net.readout.momentum_weight.dtype == torch.float64
    assert all(v["exp_avg"].dtype == torch.float64 for v in net.optimizers[0].state.values())
    net.train_labels(torch.rand(5, 20, dtype=torch.float64), torch.randint(0, 10, (5,)))  # still trains
    sgd = ffk.FFNet.hinton([20, 8, 6], epochs=4)
    sgd.train_labels(torch.rand(5, 20), torch.randint(0, 10, (5,)))
    peer, mom = sgd.layers[0].peer_mean.clone(), sgd.layers[0].momentum_weight.clone()
    sgd.half()
    assert sgd.layers[0].weight.dtype == torch.float16
    # state stays float32 (as the op keeps it for half weights), bit-exact
    assert torch.equal(sgd.layers[0].peer_mean, peer) and torch.equal(sgd.layers[0].momentum_weight, mom)
    sgd.float()
    assert sgd.layers[0].peer_mean.dtype == torch.float32 and sgd.layers[0].momentum_weight.dtype == torch.float32


# ------------------------------------------------------------------------------------ learning
def test_ffnet_learns_digits_through_train_step():
    """The raw train_step path (caller-made negatives, fused SGD) learns a real task (bar >= 0.85).
    input_norm="none": the settings were measured on raw rows (the presets' tests normalise)."""
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=0)
    net = ffk.FFNet([64, 128, 128], config=ffk.FFConfig(goodness="sum", theta=10.0, norm="l2"),
                    optimizer="sgd", lr=0.05, momentum=0.9, backend="torch", input_norm="none")
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        order = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(x_tr), 64):
            idx = order[i:i + 64]
            net.train_step(*positive_negative(x_tr[idx], y_tr[idx], 10, gen))
    acc = (net.predict(x_te, 10) == y_te).float().mean().item()
    assert acc >= 0.85, f"test accuracy {acc:.3f}"
