"""The ops as PyTorch sees them: torch.library custom ops that pass opcheck and compile whole."""

from __future__ import annotations

import re

import pytest
import torch

import ff_kernels as ffk
from tests.utils import ALL_CONFIGS, config_id, make_layer

FAMILIES = ALL_CONFIGS + [ffk.FFConfig.hinton(), ffk.FFConfig.loewex()]


def _id(config):
    return config_id(config) + ("" if config.peer_norm == "none" else f"-peer-{config.peer_norm}")


def _layer(config, bias, dtype=torch.float32):
    x_pos, x_neg, w, b = make_layer(6, 6 if config.loss == "symba" else 5, k=9, n=7, dtype=dtype, bias=bias)
    peer_mean = torch.rand(7, dtype=torch.float32 if dtype != torch.float64 else dtype)
    return x_pos, x_neg, w, b, peer_mean if config.peer_norm != "none" else None


def test_ops_are_registered_in_the_ff_kernels_namespace():
    for name in ("layer_forward", "layer_step", "layer_step_update", "sgd_update"):
        assert hasattr(torch.ops.ff_kernels, name)
    schema = str(torch.ops.ff_kernels.layer_step_update.default._schema)
    for mutated in ("weight", "bias", "buf_weight", "buf_bias", "peer_mean"):
        assert re.search(rf"Tensor\(a\d+!\)\?? {mutated}\b", schema), (mutated, schema)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("config", FAMILIES, ids=_id)
def test_opcheck_gradient_mode(config, bias):
    x_pos, x_neg, w, b, peer_mean = _layer(config, bias)
    torch.library.opcheck(torch.ops.ff_kernels.layer_step.default,
                          (x_pos, x_neg, w, b, peer_mean, config.op_string(), False, "auto"))


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["sgd", "momentum"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("config", FAMILIES, ids=_id)
def test_opcheck_update_mode(config, bias, momentum):
    x_pos, x_neg, w, b, peer_mean = _layer(config, bias)
    buf_w = torch.randn_like(w) if momentum else None
    buf_b = torch.randn_like(b) if momentum and bias else None
    torch.library.opcheck(
        torch.ops.ff_kernels.layer_step_update.default,
        (x_pos, x_neg, w, b, buf_w, buf_b, peer_mean, config.op_string(), 0.01, momentum, 0.1,
         1e-3, False, False, True, "auto"))


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["sgd", "momentum"])
@pytest.mark.parametrize("skip", [None, False, True], ids=["noskip", "skip-false", "skip-true"])
def test_opcheck_sgd_update(momentum, skip):
    w, grad = torch.randn(7, 9), torch.randn(7, 9)
    buf = torch.randn(7, 9) if momentum else None
    flag = None if skip is None else torch.tensor(skip)
    torch.library.opcheck(torch.ops.ff_kernels.sgd_update.default,
                          (w, grad, buf, 0.01, momentum, 0.5, 1e-3, True, False, flag, "auto"))


@pytest.mark.parametrize("config", [ALL_CONFIGS[0], ALL_CONFIGS[7]], ids=_id)
def test_opcheck_forward(config):
    x_pos, _, w, b, _ = _layer(config, True)
    torch.library.opcheck(torch.ops.ff_kernels.layer_forward.default,
                          (x_pos, w, b, config.op_string(), "auto"))


def test_config_string_round_trips_every_field():
    for config in FAMILIES + [ffk.FFConfig(theta=0.1 + 0.2, eps=1e-7, alpha=1 / 3)]:
        assert ffk.FFConfig.from_op_string(config.op_string()) == config


class CompileCounter:
    """A torch.compile backend that counts the graphs it is given and runs them eagerly."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _train_and_infer(x_pos, x_neg, w, b, bufs, peer_mean, config):
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, lr=0.01, momentum=0.9,
                            momentum_buffers=bufs, peer_mean=peer_mean, dampening=0.9,
                            decoupled_weight_decay=True)
    y, g = ffk.ff_layer_forward(x_pos, w, b, config=config)
    return out.loss, out.y_neg, out.g_pos, y, g


def _state(config, k=5, n=7):
    w, b = torch.randn(n, k), torch.randn(n)
    return [w, b, (torch.zeros(n, k), torch.zeros(n)), torch.full((n,), 0.5)]


@pytest.mark.parametrize("config", [ffk.FFConfig.hinton(), ALL_CONFIGS[0]], ids=_id)
def test_compile_fullgraph_matches_eager(config):
    eager_state = _state(config)
    compiled_state = [t.clone() if isinstance(t, torch.Tensor) else tuple(u.clone() for u in t)
                      for t in eager_state]
    if config.peer_norm == "none":
        eager_state[3] = compiled_state[3] = None
    step = torch.compile(_train_and_infer, fullgraph=True, backend="eager")
    for m in (4, 6):
        x_pos, x_neg = torch.randn(m, 5), torch.randn(m, 5)
        want = _train_and_infer(x_pos, x_neg, *eager_state, config)
        got = step(x_pos, x_neg, *compiled_state, config)
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled_state, eager_state):
        if isinstance(a, tuple):
            assert all(torch.allclose(u, v, rtol=1e-5, atol=1e-6) for u, v in zip(a, b))
        elif a is not None:
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_compile_does_not_recompile_per_batch_size():
    counter = CompileCounter()
    config = ffk.FFConfig.hinton()
    state = _state(config)
    step = torch.compile(_train_and_infer, fullgraph=True, backend=counter, dynamic=True)
    for m in (3, 5, 8, 13):
        step(torch.randn(m, 5), torch.randn(m + 1, 5), *state, config)
    assert counter.graphs == 1


def test_compile_with_inductor_runs_the_op_unchanged():
    """The default backend (inductor) treats the op as an opaque node around generated code."""
    config = ALL_CONFIGS[2]
    x_pos, x_neg, w, b = make_layer(6, 5, k=9, n=7)

    def fn(x_pos, x_neg, w, b):
        out = ffk.ff_layer_step(x_pos * 2.0, x_neg, w, b, config=config)
        return out.loss + 1.0, out.grad_weight.abs().sum()

    want = fn(x_pos, x_neg, w, b)
    got = torch.compile(fn, fullgraph=True)(x_pos, x_neg, w, b)
    for a, b_ in zip(got, want):
        assert torch.allclose(a, b_, rtol=1e-5)
