"""Unsupervised FF as the paper does it: hybrid-image negatives (data.hybrid_mask/hybrid_images/
partner_indices), FFNet(unsupervised=True) trained without labels with a softmax readout on the layers
above the first, and the CLI's --mode unsupervised."""

from __future__ import annotations

import json

import pytest
import torch

from ff_kernels import train
from ff_kernels.data import hybrid_blurs, hybrid_images, hybrid_mask, load_digits_split, partner_indices
from ff_kernels.nn import FFNet


@pytest.fixture(scope="module", autouse=True)
def _warm_ops():
    # the ops' first call in a process costs seconds (lazy registration, ~17 s on the loaded 2-core
    # machine): pay it once here rather than inside the first training test's time
    torch.set_num_threads(1)
    net = FFNet.hinton([16, 8, 8], epochs=1, unsupervised=True)
    net.train_unsupervised_epoch(torch.rand(8, 16), torch.randint(0, 10, (8,)), 4)
    net.predict(torch.rand(2, 16))


def _neighbour_agreement(mask, side):
    m = mask.view(-1, side, side).float()
    return torch.cat([(m[:, :, 1:] == m[:, :, :-1]).flatten(), (m[:, 1:] == m[:, :-1]).flatten()]).float().mean()


@pytest.mark.parametrize("side", [28, 8])
def test_mask_half_ones_in_large_regions(side):
    mask = hybrid_mask(4000, (side, side), generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (4000, side * side)
    assert abs(mask.float().mean().item() - 0.5) < 0.02
    # independent bits agree with a neighbour half the time; large regions far more often
    agree = _neighbour_agreement(mask, side).item()
    assert agree > (0.85 if side == 28 else 0.75), agree
    # and every mask is a mixture, not all ones or zeros, most of the time at 28x28
    if side == 28:
        per_image = mask.float().mean(1)
        assert ((per_image > 0.05) & (per_image < 0.95)).float().mean() > 0.8


def test_blur_count_scales_with_image_size():
    assert hybrid_blurs((28, 28)) == 6
    assert hybrid_blurs((8, 8)) == 2
    assert hybrid_blurs((4, 4)) == 1
    few = _neighbour_agreement(hybrid_mask(2000, (28, 28), blurs=1, generator=torch.Generator().manual_seed(0)), 28)
    many = _neighbour_agreement(hybrid_mask(2000, (28, 28), blurs=6, generator=torch.Generator().manual_seed(0)), 28)
    assert many > few + 0.05


def test_hybrid_takes_every_pixel_from_a_or_b():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(64, 784, generator=g) + 2.0  # a in [2, 3), b in [0, 1): the source of a pixel is plain
    b = torch.rand(64, 784, generator=g)
    h = hybrid_images(a, b, generator=g)
    from_a, from_b = h == a, h == b
    assert bool((from_a | from_b).all())
    share_a = from_a.float().mean().item()
    assert 0.4 < share_a < 0.6
    # regions, not salt and pepper
    assert _neighbour_agreement(from_a, 28) > 0.85


def test_partners_are_different_images_and_classes():
    g = torch.Generator().manual_seed(0)
    p = partner_indices(500, generator=g)
    assert not bool((p == torch.arange(500)).any()) and p.min() >= 0 and p.max() < 500
    labels = torch.randint(0, 10, (500,), generator=g)
    q = partner_indices(500, labels, generator=g)
    assert not bool((labels[q] == labels).any())
    assert len(torch.unique(q)) > 250  # drawn at random, not a fixed shift
    # a class that fills the batch falls back to a different image of that class
    same = partner_indices(6, torch.full((6,), 3), generator=g)
    assert not bool((same == torch.arange(6)).any())
    # hybrids within a batch mix images of different classes
    x = labels[:, None].float().repeat(1, 64) + 1.0  # each image's pixels hold its class + 1
    h = hybrid_images(x, labels=labels, generator=g)
    mixed = torch.tensor([torch.unique(row).numel() for row in h])
    assert (mixed <= 2).all() and (mixed == 2).float().mean() > 0.5


def test_reproducible_with_a_generator():
    x = torch.rand(32, 64)
    one = hybrid_images(x, generator=torch.Generator().manual_seed(5))
    two = hybrid_images(x, generator=torch.Generator().manual_seed(5))
    other = hybrid_images(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(one, two) and not torch.equal(one, other)


@pytest.mark.parametrize("call, name", [
    (lambda: hybrid_mask(0, (8, 8)), "batch"),
    (lambda: hybrid_mask(4, (8, 0)), "image_shape"),
    (lambda: hybrid_mask(4, (8, 8), blurs=0), "blurs"),
    (lambda: hybrid_mask(4, (8, 8), generator=3), "generator"),
    (lambda: hybrid_images(torch.rand(4, 10)), "image_shape"),
    (lambda: hybrid_images(torch.rand(4, 64), torch.rand(3, 64)), "b"),
    (lambda: hybrid_images(torch.rand(1, 64)), "a"),
    (lambda: hybrid_images(torch.rand(4, 64), labels=torch.zeros(3, dtype=torch.long)), "labels"),
    (lambda: partner_indices(1), "n"),
])
def test_bad_arguments_are_one_line_errors_naming_them(call, name):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    msg = str(info.value)
    assert msg.startswith(name) and "\n" not in msg


def _readout_accuracy(train_layers, epochs=8):
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=0)
    torch.manual_seed(0)
    # narrow layers: random features of this width are poor, so what FF learns shows (+7 to +8 points
    # measured: 0.827 / 0.816 against 0.744 / 0.742 for seeds 0 / 1)
    net = FFNet.hinton([64, 48, 48, 48], epochs=epochs, unsupervised=True, lr=0.03)
    g = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        stats = net.train_unsupervised_epoch(x_tr, y_tr, 128, g, train_layers=train_layers)
    return (net.predict(x_te) == y_te).float().mean().item(), stats


def test_unsupervised_ff_beats_the_untrained_network_on_digits():
    torch.set_num_threads(1)
    trained, stats = _readout_accuracy(True)
    untrained, base_stats = _readout_accuracy(False)
    assert base_stats["loss"] is None and stats["loss"].shape == (3,)
    assert not stats["nonfinite_steps"].any()
    assert trained > untrained + 0.03, (trained, untrained)
    assert trained > 0.75


def test_unsupervised_net_never_takes_labels_in_its_input():
    net = FFNet.hinton([64, 16, 16], epochs=2, unsupervised=True)
    x, y = torch.rand(8, 64), torch.randint(0, 10, (8,))
    with pytest.raises(ValueError, match="unsupervised"):
        net.train_labels(x, y)
    with pytest.raises(ValueError, match="readout"):
        net.predict(x, method="goodness")
    with pytest.raises(ValueError, match="predict='readout'"):
        FFNet([64, 16], unsupervised=True)
    with pytest.raises(ValueError, match="unsupervised=True"):
        FFNet.hinton([64, 16, 16], epochs=2).train_unsupervised(x)
    # the readout reads the plain image: changing the first pixels changes the features
    before = net.readout_features(x)
    x2 = x.clone()
    x2[:, :10] = 0
    assert not torch.equal(before, net.readout_features(x2))
    assert net.predict(x).shape == (8,)


def test_cli_unsupervised_short_run_reports_readout_accuracy(capsys):
    result = train.main(["--mode", "unsupervised", "--preset", "hinton", "--sizes", "32,32,32", "--epochs", "2",
                         "--threads", "1", "--no-progress"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["test_accuracy"] == result["test_accuracy"] == line["test_accuracy_by_method"]["readout"]
    assert list(line["test_accuracy_by_method"]) == ["readout"]
    assert len(line["history"]) == 2 and all("readout" in h["test_accuracy_by_method"] for h in line["history"])
    assert line["config"]["mode"] == "unsupervised" and line["config"]["blurs"] == 2
    assert line["config"]["negatives"] == "hybrid" and line["test_accuracy"] > 0.3


def test_cli_unsupervised_with_the_recipe_preset(capsys):
    result = train.main(["--mode", "unsupervised", "--preset", "recipe", "--sizes", "16,16", "--epochs", "1",
                         "--threads", "1", "--no-progress", "--blurs", "1", "--jitter", "1"])
    assert result["config"]["predict"] == "readout" and result["config"]["blurs"] == 1


@pytest.mark.parametrize("argv, name", [
    (["--mode", "unsupervised", "--predict", "goodness"], "--predict"),
    (["--mode", "unsupervised", "--negatives", "hard"], "--negatives"),
    (["--blurs", "3"], "--blurs"),
    (["--mode", "unsupervised", "--blurs", "0"], "--blurs"),
    (["--mode", "self"], "--mode"),
])
def test_cli_mistakes_are_one_line_errors(capsys, argv, name):
    with pytest.raises(SystemExit) as info:
        train.main(argv)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and "Traceback" not in lines[0]
