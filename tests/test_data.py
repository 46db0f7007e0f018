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
