"""Modules: FFLinear's three training modes, FFNet's layer-local training, predict, and real learning."""

from __future__ import annotations

import json

import pytest
import torch

import ff_kernels as ffk
from ff_kernels import train
from ff_kernels.data import embed_labels, load_digits_split, positive_negative
from tests.utils import make_layer, rel_err


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
    assert torch.equal(layer.momentum_buffers[0], bufs[0])


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


def test_fflinear_gradient_mode_changes_nothing_and_forward_matches_op():
    layer = ffk.FFLinear(6, 5, bias=False, backend="torch")
    w = layer.weight.detach().clone()
    x_pos, x_neg, _, _ = make_layer(4, 4, k=6, n=5)
    out = layer.train_step(x_pos, x_neg)
    assert out.grad_weight is not None and out.grad_bias is None
    assert torch.equal(layer.weight.detach(), w)
    y, g = layer(x_pos)
    assert torch.equal(y, out.y_pos) and torch.equal(g, out.g_pos)
    with pytest.raises(ValueError, match="not both"):
        layer.train_step(x_pos, x_neg, lr=0.1, optimizer=torch.optim.SGD(layer.parameters(), lr=0.1))


def test_ffnet_layers_train_on_previous_normalised_output():
    net = ffk.FFNet([8, 6, 5], optimizer="sgd", lr=0.0, backend="torch")  # lr 0: outputs comparable
    x_pos, x_neg, _, _ = make_layer(4, 4, k=8, n=6)
    outs = net.train_step(x_pos, x_neg)
    y1_pos, _ = net.layers[0](x_pos)
    y2_pos, g2_pos = net.layers[1](y1_pos)
    assert torch.allclose(outs[1].g_pos, g2_pos) and torch.allclose(outs[1].y_pos, y2_pos)
    assert net.goodness(x_pos).shape == (4, 2)


@pytest.mark.parametrize("skip_first", [False, True])
def test_predict_picks_label_of_highest_goodness(skip_first):
    num_classes = 4
    net = ffk.FFNet([10, 12, 9], backend="torch")
    x = torch.rand(7, 10)
    scores = torch.stack([
        net.goodness(embed_labels(x, torch.full((7,), c), num_classes))[:, int(skip_first):].sum(1)
        for c in range(num_classes)], dim=1)
    pred = net.predict(x, num_classes, skip_first_goodness=skip_first)
    assert torch.equal(pred, scores.argmax(dim=1))


def test_presets_are_one_liners():
    recipe = ffk.FFNet.pytorch_recipe([784, 500, 500])
    assert recipe.optimizers is not None and recipe.layers[0].config == ffk.FFConfig.pytorch_recipe()
    hinton = ffk.FFNet.hinton([784, 2000, 2000, 2000, 2000])
    assert (hinton.lr, hinton.momentum, hinton.weight_decay) == (0.01, 0.9, 0.001)
    assert hinton.skip_first_goodness and hinton.optimizers is None


def test_ffnet_learns_digits():
    """A small FFNet with the fused SGD path must learn a real task (stated bar: >= 0.85)."""
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=0)
    net = ffk.FFNet([64, 128, 128], config=ffk.FFConfig(goodness="sum", theta=10.0, norm="l2"),
                    optimizer="sgd", lr=0.05, momentum=0.9, backend="torch")
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        order = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(x_tr), 64):
            idx = order[i:i + 64]
            net.train_step(*positive_negative(x_tr[idx], y_tr[idx], 10, gen))
    acc = (net.predict(x_te, 10) == y_te).float().mean().item()
    assert acc >= 0.85, f"test accuracy {acc:.3f}"


def test_train_main_job_reaches_its_bar(capsys):
    """The README's main job, shortened: prints one JSON line with the stated fields."""
    result = train.main(["--epochs", "20", "--no-progress"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line) == result
    assert set(result) == {"test_accuracy", "train_seconds", "samples_per_second", "backend", "device",
                           "config"}
    assert result["backend"] == "torch" and result["device"] == "cpu"
    assert result["test_accuracy"] >= 0.85


def test_train_idx_without_files_says_what_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="train-images-idx3-ubyte"):
        train.main(["--dataset", "idx", "--data-dir", str(tmp_path), "--no-progress"])
    with pytest.raises(SystemExit, match="--data-dir"):
        train.main(["--dataset", "idx", "--no-progress"])


def test_train_main_job_on_idx_files(tmp_path, capsys):
    """--dataset idx end to end on a tiny synthetic IDX directory (gzipped), default 'mnist' preset."""
    import numpy as np

    from tests.test_data import _write_idx
    rng = np.random.default_rng(0)
    for name, shape in (("train-images-idx3-ubyte", (40, 4, 4)), ("train-labels-idx1-ubyte", (40,)),
                        ("t10k-images-idx3-ubyte", (12, 4, 4)), ("t10k-labels-idx1-ubyte", (12,))):
        high = 10 if "labels" in name else 256
        _write_idx(tmp_path / f"{name}.gz", rng.integers(0, high, shape), gz=True)
    result = train.main(["--dataset", "idx", "--data-dir", str(tmp_path), "--epochs", "2", "--sizes", "8",
                         "--no-progress"])
    assert result["config"]["preset"] == "mnist" and result["config"]["sizes"] == [16, 8]
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["samples_per_second"] > 0
