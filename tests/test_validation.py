"""Bad input raises a clear ValueError/TypeError naming the argument and changes nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ff_kernels as ffk
from tests.utils import make_layer


def _good():
    x_pos, x_neg, w, b = make_layer(6, 5, k=7, n=4)
    return dict(x_pos=x_pos, x_neg=x_neg, weight=w, bias=b, lr=0.1, momentum=0.9, weight_decay=0.01,
                momentum_buffers=(torch.randn_like(w), torch.randn_like(b)))


PEER = ffk.FFConfig.hinton()
WEIGHT_AND_BIAS = torch.randn(32)  # a weight [4, 7] and a bias that overlap in one storage
SHARED_BUFFER = torch.randn(32)


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
    "dampening above 1": (_replace(dampening=1.5), ValueError, "dampening"),
    "dampening nan": (_replace(dampening=math.nan), ValueError, "dampening"),
    "dampening without lr": (_replace(lr=None, momentum=0.0, weight_decay=0.0, momentum_buffers=None,
                                      dampening=0.5), ValueError, "dampening"),
    "decoupled not a bool": (_replace(decoupled_weight_decay="yes"), TypeError, "decoupled_weight_decay"),
    "decoupled without lr": (_replace(lr=None, momentum=0.0, weight_decay=0.0, momentum_buffers=None,
                                      decoupled_weight_decay=True), ValueError, "decoupled_weight_decay"),
    "peer_mean without peer norm": (_replace(peer_mean=torch.zeros(4)), ValueError, "peer_mean"),
    "peer_mean of wrong shape": (_replace(config=PEER, peer_mean=torch.zeros(5)), ValueError, "peer_mean"),
    "peer_mean of wrong dtype": (_replace(config=PEER, peer_mean=torch.zeros(4, dtype=torch.float64)),
                                 TypeError, "peer_mean"),
    "peer_mean not contiguous": (_replace(config=PEER, peer_mean=torch.zeros(8)[::2]), ValueError,
                                 "peer_mean"),
    "peer_mean not a tensor": (_replace(config=PEER, peer_mean=[0.5] * 4), TypeError, "peer_mean"),
    "buffer is the weight": (_replace(momentum_buffers=lambda kw: (kw["weight"], kw["momentum_buffers"][1])),
                             ValueError, "share memory"),
    "bias inside the weight's storage": (
        _replace(weight=lambda kw: WEIGHT_AND_BIAS[:28].view(4, 7), bias=lambda kw: WEIGHT_AND_BIAS[26:30],
                 momentum_buffers=None), ValueError, "share memory"),
    "buffers overlapping": (_replace(momentum_buffers=lambda kw: (SHARED_BUFFER[:28].view(4, 7),
                                                                  SHARED_BUFFER[24:28])),
                            ValueError, "share memory"),
    "peer_mean is the bias buffer": (_replace(config=PEER, peer_mean=lambda kw: kw["momentum_buffers"][1]),
                                     ValueError, "share memory"),
    "float64 on triton": (_replace(**{k: (lambda kw, k=k: kw[k].double() if kw[k] is not None else None)
                                      for k in ("x_pos", "x_neg", "weight", "bias")},
                                   momentum_buffers=None, momentum=0.0, backend="triton"),
                          TypeError, "float64"),
}


def _snapshot(kw):
    bufs = kw.get("momentum_buffers")
    bufs = [bufs] if isinstance(bufs, torch.Tensor) else list(bufs or ())
    tensors = [kw["weight"], kw["bias"], *bufs, kw.get("peer_mean")]
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


# ---------------------------------------------------------------- values beyond the compute dtype

def _inference_bias(kw):
    with torch.inference_mode():
        return kw["bias"].clone()


BAD_VALUES = {
    "lr beyond float32": (_replace(lr=1e39), ValueError, "lr"),
    "weight_decay beyond float32": (_replace(weight_decay=1e300), ValueError, "weight_decay"),
    "momentum a 1-D tensor": (_replace(momentum=torch.tensor([0.9])), TypeError, "momentum"),
    "lr complex": (_replace(lr=1j), TypeError, "lr"),
    "eps subnormal in float32": (_replace(config=ffk.FFConfig(eps=1e-40)), ValueError, "eps"),
    "theta beyond float32": (_replace(config=ffk.FFConfig(theta=1e39)), ValueError, "theta"),
    "threshold per unit beyond float32": (
        _replace(config=ffk.FFConfig(theta=1e38, theta_per_unit=True)), ValueError, "theta"),
    "alpha beyond float32": (_replace(config=ffk.FFConfig(alpha=1e39)), ValueError, "alpha"),
    "inference-mode bias updated in place": (_replace(bias=_inference_bias), ValueError, "bias"),
    "sparse x_pos": (_replace(x_pos=lambda kw: kw["x_pos"].to_sparse()), TypeError, "x_pos"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_raise_and_change_nothing(case):
    make, error, fragment = BAD_VALUES[case]
    kw = make()
    snapshot = _snapshot(kw)
    with pytest.raises(error) as info:
        ffk.ff_layer_step(**kw)
    assert fragment in str(info.value), f"message does not name {fragment!r}: {info.value}"
    for t, before in snapshot:
        assert torch.equal(t, before)


def test_float32_buffer_message_names_each_dtype_once():
    kw = _good()
    kw["momentum_buffers"] = (kw["momentum_buffers"][0].half(), kw["momentum_buffers"][1])
    with pytest.raises(TypeError) as info:
        ffk.ff_layer_step(**kw)
    assert str(info.value).count("torch.float32") == 1


@pytest.mark.parametrize("make_scalar", [float, np.float32, np.float64, np.float16, torch.tensor],
                         ids=["float", "np.float32", "np.float64", "np.float16", "0-dim tensor"])
def test_every_real_scalar_type_is_accepted_alike(make_scalar):
    x_pos, x_neg, w, b = make_layer(6, 5, k=7, n=4)
    want_w, got_w = w.clone(), w.clone()
    ffk.ff_layer_step(x_pos, x_neg, want_w, b.clone(), lr=0.5, momentum=0.0, weight_decay=1.0)
    ffk.ff_layer_step(x_pos, x_neg, got_w, b.clone(), lr=make_scalar(0.5), momentum=make_scalar(0),
                      weight_decay=np.int64(1) if make_scalar is np.float16 else make_scalar(1))
    assert torch.equal(got_w, want_w)


def test_threshold_near_float32_max_gives_a_finite_mean_loss():
    """Every softplus term ~1e38: summing first would overflow, the mean does not."""
    x_pos, x_neg, w, b = make_layer(40, 40, k=7, n=4)
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=ffk.FFConfig(theta=1e38, goodness="sum"))
    assert torch.isfinite(out.loss) and out.loss > 1e37


def _sgd_args():
    return dict(param=torch.randn(4, 3), grad=torch.randn(4, 3), momentum_buffer=torch.randn(4, 3),
                lr=0.1, momentum=0.9)


BAD_SGD_CALLS = {
    "grad of another shape": (dict(grad=torch.randn(3, 4)), ValueError, "grad"),
    "grad of another dtype": (dict(grad=torch.randn(4, 3, dtype=torch.float64)), ValueError, "grad"),
    "param not contiguous": (dict(param=torch.randn(3, 4).t(), grad=torch.randn(4, 3)), ValueError, "param"),
    "buffer of wrong shape": (dict(momentum_buffer=torch.randn(4)), ValueError, "momentum_buffer"),
    "buffer without momentum": (dict(momentum=0.0), ValueError, "momentum_buffer"),
    "buffer is the param": (dict(momentum_buffer=lambda kw: kw["param"]), ValueError, "share memory"),
    "lr negative": (dict(lr=-1.0), ValueError, "lr"),
    "skip not a bool tensor": (dict(skip=torch.tensor(1.0)), TypeError, "skip"),
    "dampening above 1": (dict(dampening=2.0), ValueError, "dampening"),
}


@pytest.mark.parametrize("case", list(BAD_SGD_CALLS))
def test_bad_sgd_update_raises_and_changes_nothing(case):
    changes, error, fragment = BAD_SGD_CALLS[case]
    kw = _sgd_args()
    kw.update({key: value(kw) if callable(value) else value for key, value in changes.items()})
    before = [(t, t.clone()) for t in (kw["param"], kw["momentum_buffer"]) if isinstance(t, torch.Tensor)]
    with pytest.raises(error) as info:
        ffk.sgd_update_(**kw)
    assert fragment in str(info.value)
    for t, old in before:
        assert torch.equal(t, old)


def test_skip_nonfinite_must_be_a_bool():
    x_pos, x_neg, w, b = make_layer(3, 3, k=4, n=2)
    with pytest.raises(TypeError, match="skip_nonfinite"):
        ffk.ff_layer_step(x_pos, x_neg, w, b, skip_nonfinite=1)


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(num_classes=0), ValueError, "num_classes"),
    (dict(num_classes=-3), ValueError, "num_classes"),
    (dict(num_classes=2.5), ValueError, "num_classes"),
    (dict(num_classes=True), ValueError, "num_classes"),
    (dict(method="votes"), ValueError, "method"),
])
def test_ffnet_predict_rejects_bad_arguments_by_name(kwargs, error, name):
    net = ffk.FFNet([20, 12], readout=True)
    with pytest.raises(error, match=name):
        net.predict(torch.rand(3, 20), **kwargs)


@pytest.mark.parametrize("x, error, name", [
    (torch.rand(3, 19), ValueError, "features"),
    (torch.rand(3, 20, dtype=torch.float64), TypeError, "dtype"),
    ([[0.0] * 20], TypeError, "torch.Tensor"),
])
def test_ffnet_predict_checks_the_batch(x, error, name):
    net = ffk.FFNet([20, 12], readout=True)
    for method in ("goodness", "readout"):
        with pytest.raises(error, match=name):
            net.predict(x, method=method)


@pytest.mark.parametrize("sizes", [[20, 0], [20], [0, 5], [20, -1], [20, 3.0]])
def test_ffnet_rejects_bad_sizes(sizes):
    with pytest.raises(ValueError, match="sizes"):
        ffk.FFNet(sizes)
