"""End to end: every preset learns real data, and tracks an independent implementation of its source.

Short runs (CI time matters): scikit-learn's digits (ships offline) and a 6000-image subset of
Fashion-MNIST (skipped when the Debian package's IDX files are absent). The bars sit well below the
accuracies these runs reach (measured, in the comments) and far above chance (0.10): they fail when a
preset stops learning, not when it wobbles by a seed. The full comparison is bench/learning_table.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from ff_kernels.data import load_digits_split, load_idx_dir
from ff_kernels.train import build_net
from tests.support import train_hinton, train_loewex

FASHION_DIR = os.environ.get("FF_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not os.path.isfile(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz"))
    and not os.path.isfile(os.path.join(FASHION_DIR, "train-images-idx3-ubyte")),
    reason=f"Fashion-MNIST IDX files not found in {FASHION_DIR} (install the Debian package "
           f"dataset-fashion-mnist, or set FF_FASHION_MNIST_DIR)")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small shapes: one intra-op thread is as fast as two, and immune to a busy machine (two
    OpenMP threads on two shared cores wait on each other at every op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(seed=0)


@pytest.fixture(scope="module")
def fashion_subset():
    x_tr, y_tr, x_te, y_te = load_idx_dir(FASHION_DIR)
    return x_tr[:6000], y_tr[:6000], x_te[:1000], y_te[:1000]


def _train(preset, data, hidden, epochs, batch, seed=0):
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    net = build_net(preset, [x_tr.shape[1], *hidden], epochs)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        stats = net.train_epoch(x_tr, y_tr, batch, gen)
    assert torch.isfinite(stats["loss"]).all()
    methods = ("goodness", "readout") if net.readout is not None else ("goodness",)
    acc = {m: (net.predict(x_te, method=m) == y_te).float().mean().item() for m in methods}
    return acc, net.live_fraction(x_te, y_te).tolist()


# preset -> (hidden, epochs, batch, {method: bar}); measured at seeds 0, 1 in brackets
DIGITS = {
    "recipe": ([128, 128], 20, 32, {"goodness": 0.75}),                     # [0.86-0.93 at 20-25 epochs]
    "hinton": ([128, 128], 12, 64, {"readout": 0.85, "goodness": 0.75}),  # [0.92, 0.94], [0.86, 0.87]
    "loewex": ([128, 128], 12, 64, {"readout": 0.85, "goodness": 0.65}),  # [0.91, 0.92], [0.80, 0.84]
}


@pytest.mark.parametrize("preset", sorted(DIGITS))
def test_preset_learns_digits(digits, preset):
    hidden, epochs, batch, bars = DIGITS[preset]
    acc, live = _train(preset, digits, hidden, epochs, batch)
    for method, bar in bars.items():
        assert acc[method] >= bar, f"{preset} {method} accuracy {acc[method]:.3f} < {bar} ({acc})"
    if preset in ("hinton", "loewex"):  # peer normalisation keeps the units alive
        assert min(live) >= 0.5, f"{preset} live units per layer {live}"


@pytest.mark.parametrize("preset,independent", [("hinton", train_hinton), ("loewex", train_loewex)])
def test_preset_tracks_its_independent_implementation_on_digits(digits, preset, independent):
    """Same data, sizes, epochs, batch and seed: the readout accuracy within 4 points (a digits test
    set of 450 images: one seed's spread is about 1-2 points)."""
    acc, _ = _train(preset, digits, [128, 128], 12, 64)
    ref = independent(*digits, [128, 128], 12, 64, seed=0)
    assert abs(acc["readout"] - ref.accuracy["readout"]) <= 0.04, (acc, ref.accuracy)


@needs_fashion
@pytest.mark.parametrize("preset", ["hinton", "loewex"])
def test_preset_learns_a_fashion_mnist_subset(fashion_subset, preset):
    """784-200-200, 2 epochs of 6000 images, batch 100: readout [0.72-0.74 measured] >= 0.6."""
    acc, live = _train(preset, fashion_subset, [200, 200], 2, 100)
    assert acc["readout"] >= 0.6, acc
    assert min(live) >= 0.5, live
