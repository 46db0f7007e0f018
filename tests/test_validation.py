"""Bad input raises a clear ValueError/TypeError naming the argument and changes nothing."""

from __future__ import annotations

import math

import pytest
import torch

import ff_kernels as ffk
from tests.utils import make_layer


def _good():
    x_pos, x_neg, w, b = make_layer(6, 5, k=7, n=4)
    return dict(x_pos=x_pos, x_neg=x_neg, weight=w, bias=b, lr=0.1, momentum=0.9, weight_decay=0.01,
                momentum_buffers=(torch.randn_like(w), torch.randn_like(b)))


def _replace(**changes):
    def make():
        kw = _good()
        for key, value in changes.items():
            kw[key] = value(kw) if callable(value) else value
        return kw
    return make


BAD_STEP_CALLS = {
    "x_pos not a tensor": (_replace(x_pos=lambda kw: kw["x_pos"].tolist()), TypeError, "x_pos"),
    "x_neg integer dtype": (_replace(x_neg=lambda kw: kw["x_neg"].long()), TypeError, "x_neg"),
    "weight integer dtype": (_replace(weight=lambda kw: kw["weight"].int()), TypeError, "weight"),
    "x_pos 1-D": (_replace(x_pos=lambda kw: kw["x_pos"][0]), ValueError, "x_pos"),
    "x_neg 3-D": (_replace(x_neg=lambda kw: kw["x_neg"][None]), ValueError, "x_neg"),
    "weight 1-D": (_replace(weight=lambda kw: kw["weight"][0]), ValueError, "weight"),
    "bias 2-D": (_replace(bias=lambda kw: kw["bias"][None]), ValueError, "bias"),
    "K mismatch x_pos": (_replace(x_pos=lambda kw: torch.randn(6, 8)), ValueError, "x_pos"),
    "K mismatch x_neg": (_replace(x_neg=lambda kw: torch.randn(5, 6)), ValueError, "x_neg"),
    "bias of wrong length": (_replace(bias=lambda kw: torch.randn(5)), ValueError, "bias"),
    "mixed dtypes": (_replace(x_neg=lambda kw: kw["x_neg"].double()), TypeError, "x_neg"),
    "mixed dtype bias": (_replace(bias=lambda kw: kw["bias"].half()), TypeError, "bias"),
    "mixed devices": (_replace(x_pos=lambda kw: kw["x_pos"].to("meta")), ValueError, "x_pos"),
    "empty positive batch": (_replace(x_pos=lambda kw: torch.randn(0, 7)), ValueError, "x_pos"),
    "empty negative batch": (_replace(x_neg=lambda kw: torch.randn(0, 7)), ValueError, "x_neg"),
    "empty weight": (_replace(weight=lambda kw: torch.randn(0, 7), bias=None, momentum_buffers=None),
                     ValueError, "weight"),
    "symba with B+ != B-": (_replace(config=ffk.FFConfig(loss="symba")), ValueError, "symba"),
    "lr negative": (_replace(lr=-0.1), ValueError, "lr"),
    "lr nan": (_replace(lr=math.nan), ValueError, "lr"),
    "lr inf": (_replace(lr=math.inf), ValueError, "lr"),
    "lr a string": (_replace(lr="0.1"), TypeError, "lr"),
    "weight_decay negative": (_replace(weight_decay=-1.0), ValueError, "weight_decay"),
    "weight_decay nan": (_replace(weight_decay=math.nan), ValueError, "weight_decay"),
    "momentum negative": (_replace(momentum=-0.5), ValueError, "momentum"),
    "momentum without lr": (_replace(lr=None, momentum_buffers=None), ValueError, "momentum"),
    "weight_decay without lr": (_replace(lr=None, momentum=0.0, momentum_buffers=None), ValueError,
                                "weight_decay"),
    "buffers without momentum": (_replace(momentum=0.0), ValueError, "momentum_buffers"),
    "buffers not a pair": (_replace(momentum_buffers=lambda kw: kw["momentum_buffers"][0]), TypeError,
                           "momentum_buffers"),
    "buffer of wrong shape": (_replace(momentum_buffers=lambda kw: (torch.zeros(4, 6), kw["momentum_buffers"][1])),
                              ValueError, "momentum_buffers[0]"),
    "buffer of wrong dtype": (_replace(momentum_buffers=lambda kw: (kw["momentum_buffers"][0].double(),
                                                                    kw["momentum_buffers"][1])),
                              TypeError, "momentum_buffers[0]"),
    "bias buffer without bias": (_replace(bias=None), ValueError, "momentum_buffers[1]"),
    "non-contiguous weight in update mode": (
        _replace(weight=lambda kw: kw["weight"].t().contiguous().t()), ValueError, "contiguous"),
    "config of wrong type": (_replace(config={"goodness": "sum"}), TypeError, "config"),
    "unknown backend": (_replace(backend="cudnn"), ValueError, "backend"),
    "backend not a string": (_replace(backend=3), TypeError, "backend"),
    "float64 on triton": (_replace(**{k: (lambda kw, k=k: kw[k].double() if kw[k] is not None else None)
                                      for k in ("x_pos", "x_neg", "weight", "bias")},
                                   momentum_buffers=None, momentum=0.0, backend="triton"),
                          TypeError, "float64"),
}


def _snapshot(kw):
    bufs = kw.get("momentum_buffers")
    bufs = [bufs] if isinstance(bufs, torch.Tensor) else list(bufs or ())
    tensors = [kw["weight"], kw["bias"], *bufs]
    return [(t, t.clone()) for t in tensors if isinstance(t, torch.Tensor) and t.device.type != "meta"]


@pytest.mark.parametrize("case", list(BAD_STEP_CALLS))
def test_bad_step_input_raises_and_changes_nothing(case):
    make, error, fragment = BAD_STEP_CALLS[case]
    kw = make()
    snapshot = _snapshot(kw)
    with pytest.raises(error, match=None) as info:
        ffk.ff_layer_step(**kw)
    assert fragment in str(info.value), f"message does not name {fragment!r}: {info.value}"
    for t, before in snapshot:
        assert torch.equal(t, before)


BAD_FORWARD_CALLS = {
    "x integer": (lambda w, b: dict(x=torch.ones(3, 7, dtype=torch.long), weight=w, bias=b), TypeError, "x"),
    "x K mismatch": (lambda w, b: dict(x=torch.randn(3, 6), weight=w, bias=b), ValueError, "x"),
    "x empty": (lambda w, b: dict(x=torch.randn(0, 7), weight=w, bias=b), ValueError, "x"),
    "x 3-D": (lambda w, b: dict(x=torch.randn(2, 3, 7), weight=w, bias=b), ValueError, "x"),
    "weight mixed dtype": (lambda w, b: dict(x=torch.randn(3, 7), weight=w.half(), bias=b), TypeError, "x has dtype"),
}


@pytest.mark.parametrize("case", list(BAD_FORWARD_CALLS))
def test_bad_forward_input_raises(case):
    make, error, fragment = BAD_FORWARD_CALLS[case]
    _, _, w, b = make_layer(1, 1, k=7, n=4)
    with pytest.raises(error) as info:
        ffk.ff_layer_forward(**make(w, b))
    assert fragment in str(info.value)


@pytest.mark.parametrize("field,value,error", [
    ("goodness", "max", ValueError), ("norm", "l1", ValueError), ("loss", "hinge", ValueError),
    ("theta", math.nan, ValueError), ("theta", math.inf, ValueError), ("alpha", 0.0, ValueError),
    ("alpha", -1.0, ValueError), ("alpha", math.nan, ValueError), ("eps", 0.0, ValueError),
    ("eps", -1e-4, ValueError), ("theta", "2", TypeError), ("theta_per_unit", 1, TypeError),
])
def test_config_rejects_bad_fields(field, value, error):
    with pytest.raises(error, match=f"FFConfig.{field}"):
        ffk.FFConfig(**{field: value})


def test_config_is_frozen_and_presets_are_one_liners():
    cfg = ffk.FFConfig.pytorch_recipe()
    assert (cfg.goodness, cfg.theta, cfg.norm, cfg.eps) == ("mean", 2.0, "l2", 1e-4)
    hinton = ffk.FFConfig.hinton()
    assert (hinton.goodness, hinton.norm) == ("sum", "rms") and hinton.threshold(2000) == 2000.0
    with pytest.raises(AttributeError):
        cfg.theta = 3.0


def test_unavailable_backend_names_reason():
    status = ffk.backend_status()
    assert set(ffk.available_backends()) == {n for n, s in status.items() if s == "available"}
    for name, reason in status.items():
        if reason != "available":
            x_pos, x_neg, w, b = make_layer(2, 2, k=3, n=2)
            with pytest.raises(ValueError, match="not available"):
                ffk.ff_layer_step(x_pos, x_neg, w, b, backend=name)
