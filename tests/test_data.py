"""Data helpers: label embedding, wrong labels, IDX reading."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from ff_kernels.data import (embed_labels, load_digits_split, load_idx_dir, positive_negative, read_idx,
                             wrong_labels)


def test_embed_labels_one_hot_scaled_to_row_max():
    x = torch.rand(5, 20) + 0.1
    labels = torch.tensor([0, 3, 9, 9, 1])
    out = embed_labels(x, labels, 10)
    assert torch.equal(out[:, 10:], x[:, 10:])
    expect = torch.zeros(5, 10)
    expect[torch.arange(5), labels] = x.amax(dim=1)
    assert torch.equal(out[:, :10], expect)
    assert not torch.equal(out, x)  # the input itself is not modified
    zero_row = embed_labels(torch.zeros(1, 12), torch.tensor([2]), 10)
    assert zero_row[0, 2] == 1.0


def test_wrong_labels_never_true_and_uniform():
    labels = torch.randint(0, 10, (20000,))
    wrong = wrong_labels(labels, 10, torch.Generator().manual_seed(1))
    assert not (wrong == labels).any()
    # each of the 9 other labels is drawn ~1/9 of the time
    for c in range(10):
        counts = torch.bincount(wrong[labels == c], minlength=10).float()
        share = counts / counts.sum()
        assert share[c] == 0 and (share.sum() - share[c] - 9 * (1 / 9)).abs() < 1e-6
        others = torch.cat([share[:c], share[c + 1:]])
        assert (others - 1 / 9).abs().max() < 0.04


def test_positive_negative_share_images():
    x = torch.rand(8, 16)
    y = torch.randint(0, 10, (8,))
    x_pos, x_neg = positive_negative(x, y, 10)
    assert torch.equal(x_pos[:, 10:], x_neg[:, 10:])
    assert torch.equal(x_pos[:, :10].argmax(1), y) and not (x_neg[:, :10].argmax(1) == y).any()


def test_digits_split_is_stratified_and_scaled():
    x_tr, y_tr, x_te, y_te = load_digits_split()
    assert x_tr.shape[1] == 64 and len(x_tr) + len(x_te) == 1797
    assert 0 <= x_tr.min() and x_tr.max() <= 1
    assert set(y_te.tolist()) == set(range(10))


def _write_idx(path, array, gz):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [False, True])
def test_idx_directory_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (7, 4, 5)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, (7,)),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 4, 5)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, (3,))}
    for name, a in arrays.items():
        _write_idx(tmp_path / (name + (".gz" if gz else "")), a, gz)
    x_tr, y_tr, x_te, y_te = load_idx_dir(str(tmp_path))
    assert x_tr.shape == (7, 20) and x_te.shape == (3, 20)
    assert torch.allclose(x_tr * 255, torch.from_numpy(arrays["train-images-idx3-ubyte"].reshape(7, 20)).float())
    assert torch.equal(y_te, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())


def test_read_idx_rejects_truncated_file(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(struct.pack(">HBB", 0, 0x08, 1) + struct.pack(">I", 10) + b"\x01\x02")
    with pytest.raises(ValueError, match="header"):
        read_idx(str(path))


# ---------------------------------------------------------------------------------------------------
# neutral label, all-label batches, hard negatives, jitter

from ff_kernels.data import embed_all_labels, embed_neutral_label, jitter, wrong_labels_from_scores  # noqa: E402


def test_neutral_label_is_a_tenth_of_the_row_max_and_all_labels_stack_candidates():
    x = torch.rand(4, 15) + 0.2
    out = embed_neutral_label(x, 10)
    assert torch.equal(out[:, 10:], x[:, 10:])
    assert torch.allclose(out[:, :10], (x.amax(1) / 10)[:, None].expand(4, 10))
    stacked = embed_all_labels(x, 3)
    assert stacked.shape == (12, 15)
    for c in range(3):
        assert torch.equal(stacked[4 * c:4 * (c + 1)], embed_labels(x, torch.full((4,), c), 3))


def test_hard_wrong_labels_follow_softmax_of_scores_over_wrong_labels():
    """p(l) = exp(s_l) / sum_{l' != y} exp(s_l') for l != y, and never the true label."""
    n, c = 40000, 4
    scores = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).expand(n, c)
    labels = torch.full((n,), 2)
    drawn = wrong_labels_from_scores(scores, labels, torch.Generator().manual_seed(0))
    assert not (drawn == labels).any()
    share = torch.bincount(drawn, minlength=c).float() / n
    expect = torch.softmax(torch.tensor([0.0, 1.0, -float("inf"), -1.0]), 0)
    assert (share - expect).abs().max() < 0.01, (share, expect)
    # huge scores (sum goodness ~ thousands) stay finite: the highest wrong label wins
    big = torch.tensor([[5000.0, 4000.0, 9000.0]])
    assert wrong_labels_from_scores(big, torch.tensor([2])).item() == 0


def test_hard_wrong_labels_per_row_and_reproducible():
    scores = torch.randn(64, 10) * 3
    labels = torch.randint(0, 10, (64,))
    a = wrong_labels_from_scores(scores, labels, torch.Generator().manual_seed(5))
    b = wrong_labels_from_scores(scores, labels, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not (a == labels).any()
    with pytest.raises(ValueError, match="scores"):
        wrong_labels_from_scores(scores, labels[:3])


def test_jitter_shifts_each_image_by_at_most_two_pixels_with_zero_fill():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(300, 28 * 28) + 0.5  # no zeros: the fill is visible
    out = jitter(x, 2, generator=gen)
    assert out.shape == x.shape
    imgs, outs = x.view(-1, 28, 28), out.view(-1, 28, 28)
    seen = set()
    padded = torch.nn.functional.pad(imgs, (2, 2, 2, 2))
    for i in range(len(x)):
        match = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(outs[i], padded[i, 2 - dy:30 - dy, 2 - dx:30 - dx])]
        assert len(match) == 1, i
        seen.add(match[0])
    assert len(seen) == 25  # every shift in [-2, 2]^2 occurs


def test_jitter_validates_shape_and_zero_shift_is_identity():
    x = torch.rand(3, 64)
    assert torch.equal(jitter(x, 0), x)
    assert jitter(x, 1, image_shape=(8, 8)).shape == (3, 64)
    with pytest.raises(ValueError, match="square"):
        jitter(torch.rand(2, 20))
    with pytest.raises(ValueError, match="image_shape"):
        jitter(x, 1, image_shape=(4, 4))


def test_positive_negative_takes_given_negative_labels():
    x = torch.rand(5, 12)
    y = torch.tensor([0, 1, 2, 3, 4])
    neg = torch.tensor([1, 2, 3, 4, 0])
    _, x_neg = positive_negative(x, y, 10, negative_labels=neg)
    assert torch.equal(x_neg[:, :10].argmax(1), neg)


def test_idx_dir_missing_directory_and_mismatched_counts(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_idx_dir(str(tmp_path / "nope"))
    rng = np.random.default_rng(0)
    for name, shape in (("train-images-idx3-ubyte", (5, 2, 2)), ("train-labels-idx1-ubyte", (4,)),
                        ("t10k-images-idx3-ubyte", (3, 2, 2)), ("t10k-labels-idx1-ubyte", (3,))):
        _write_idx(tmp_path / name, rng.integers(0, 10, shape), gz=False)
    with pytest.raises(ValueError, match="differ"):
        load_idx_dir(str(tmp_path))
