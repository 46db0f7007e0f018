"""Data helpers: label embedding, negative data, and the real data sets the main job trains on."""

from __future__ import annotations

import gzip
import os
import struct
from typing import Optional

import numpy as np
import torch


def embed_labels(x: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Copy of ``x`` [B, K] whose first ``num_classes`` features are a one-hot of ``labels``,
    scaled to each row's maximum (1 where a row has no positive value)."""
    if x.dim() != 2 or x.shape[1] < num_classes:
        raise ValueError(f"x must be [B, K] with K >= num_classes={num_classes}, got {tuple(x.shape)}")
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
    out = x.clone()
    peak = x.amax(dim=1)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    out[:, :num_classes] = 0
    out[torch.arange(x.shape[0], device=x.device), labels] = peak
    return out


def wrong_labels(labels: torch.Tensor, num_classes: int,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A label drawn uniformly among the other ``num_classes - 1``: never the true one."""
    shift = torch.randint(1, num_classes, labels.shape, generator=generator, device="cpu")
    return (labels + shift.to(labels.device)) % num_classes


def positive_negative(x: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      generator: Optional[torch.Generator] = None):
    """(x_pos, x_neg): the images with their true label and with a uniformly drawn wrong one."""
    return (embed_labels(x, labels, num_classes),
            embed_labels(x, wrong_labels(labels, num_classes, generator), num_classes))


def load_digits_split(test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's bundled 8x8 digits (1797 samples, ships offline), scaled to [0, 1], split
    stratified into (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = data.data.astype(np.float32) / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(x, data.target, test_size=test_fraction,
                                              random_state=seed, stratify=data.target)
    return (torch.from_numpy(x_tr), torch.from_numpy(y_tr).long(),
            torch.from_numpy(x_te), torch.from_numpy(y_te).long())


_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str) -> np.ndarray:
    """One IDX file (MNIST's format), raw or gzipped."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{path} is not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {data.size} bytes")
    return data.reshape(shape)


def load_idx_dir(data_dir: str):
    """MNIST or Fashion-MNIST from ``data_dir`` (the four standard IDX files, raw or .gz), images
    flattened and scaled to [0, 1]: (x_train, y_train, x_test, y_test)."""
    arrays = {}
    for key, stem in _IDX_FILES.items():
        candidates = [os.path.join(data_dir, stem + ext) for ext in ("", ".gz")]
        path = next((p for p in candidates if os.path.isfile(p)), None)
        if path is None:
            raise FileNotFoundError(f"--data-dir {data_dir!r} has no {stem}[.gz]: expected the four "
                                    f"MNIST/Fashion-MNIST IDX files {sorted(_IDX_FILES.values())}")
        arrays[key] = read_idx(path)
    x_train = torch.from_numpy(arrays["x_train"].reshape(len(arrays["x_train"]), -1).astype(np.float32) / 255)
    x_test = torch.from_numpy(arrays["x_test"].reshape(len(arrays["x_test"]), -1).astype(np.float32) / 255)
    return (x_train, torch.from_numpy(arrays["y_train"].astype(np.int64)),
            x_test, torch.from_numpy(arrays["y_test"].astype(np.int64)))
