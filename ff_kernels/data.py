"""Data helpers: label embedding, negative data (uniform and hard wrong labels), jitter, and the real
data sets the main job trains on.

Every sampler takes an optional ``torch.Generator`` and draws on that generator's device (the data's
device when none is given), batched: nothing here loops over samples in Python or syncs the host.
"""

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
    _check_rows(x, num_classes)
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
    out = x.clone()
    peak = _row_peak(x)
    out[:, :num_classes] = 0
    out[torch.arange(x.shape[0], device=x.device), labels.to(x.device)] = peak
    return out


def embed_neutral_label(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Copy of ``x`` whose first ``num_classes`` features all hold 1/num_classes of the row's maximum:
    the neutral label a softmax readout reads (DESIGN section 1)."""
    _check_rows(x, num_classes)
    out = x.clone()
    out[:, :num_classes] = (_row_peak(x) / num_classes)[:, None]
    return out


def embed_all_labels(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[num_classes * B, K]: block c holds ``x`` with label c embedded (one batch for goodness
    prediction: C passes in one)."""
    _check_rows(x, num_classes)
    b = x.shape[0]
    labels = torch.arange(num_classes, device=x.device).repeat_interleave(b)
    return embed_labels(x.repeat(num_classes, 1), labels, num_classes)


def _check_rows(x, num_classes):
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] < num_classes:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be [B, K] with K >= num_classes={num_classes}, got {shape}")


def _row_peak(x):
    peak = x.amax(dim=1)
    return torch.where(peak > 0, peak, torch.ones_like(peak))


def _draw_device(generator: Optional[torch.Generator], fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def wrong_labels(labels: torch.Tensor, num_classes: int,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A label drawn uniformly among the other ``num_classes - 1``: never the true one."""
    dev = _draw_device(generator, labels.device)
    shift = torch.randint(1, num_classes, labels.shape, generator=generator, device=dev)
    return (labels + shift.to(labels.device)) % num_classes


def wrong_labels_from_scores(scores: torch.Tensor, labels: torch.Tensor,
                             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Hard negatives: a wrong label drawn with probability softmax(scores) renormalised over the
    wrong labels, p(l) = exp(s_l) / sum_{l' != y} exp(s_l') for l != y, never the true label y.

    ``scores`` [B, C] are the network's own: the softmax readout's logits (Hinton's code) or the total
    goodness G_l with label l embedded (the readout-free variant). Drawn by the Gumbel-max trick
    (argmax of scores + Gumbel noise over the wrong labels), batched on the scores' device."""
    if scores.dim() != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"scores must be [B, C] and labels [B], got {tuple(scores.shape)} and "
                         f"{tuple(labels.shape)}")
    if scores.shape[1] < 2:
        raise ValueError("wrong labels need at least 2 classes")
    dev = _draw_device(generator, scores.device)
    u = torch.rand(scores.shape, generator=generator, device=dev).to(scores.device)
    # u in [0, 1): -log(-log(u)) is -inf at u = 0 (never picked), finite otherwise.
    noisy = scores.float() - torch.log(-torch.log(u))
    noisy = torch.nan_to_num(noisy, nan=-float("inf"))  # -inf + inf; never picked
    noisy.scatter_(1, labels.to(scores.device)[:, None], -float("inf"))
    return noisy.argmax(dim=1).to(labels.device)


def positive_negative(x: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      generator: Optional[torch.Generator] = None,
                      negative_labels: Optional[torch.Tensor] = None):
    """(x_pos, x_neg): the images with their true label and with a wrong one (``negative_labels``,
    or drawn uniformly among the wrong labels)."""
    if negative_labels is None:
        negative_labels = wrong_labels(labels, num_classes, generator)
    return embed_labels(x, labels, num_classes), embed_labels(x, negative_labels, num_classes)


def jitter(x: torch.Tensor, max_shift: int = 2, image_shape: Optional[tuple] = None,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Each image (a row of ``x`` [B, H*W]) shifted by its own random (dy, dx), |dy|, |dx| <=
    ``max_shift``, zeros shifted in: the paper's jitter augmentation ("shifted by up to 2 pixels in
    each direction"). One gather for the whole batch, on x's device. ``image_shape`` (H, W) defaults
    to the square the row length makes (28x28 for MNIST). Jitter raw images, then embed labels."""
    if x.dim() != 2:
        raise ValueError(f"x must be [B, H*W], got shape {tuple(x.shape)}")
    if image_shape is None:
        side = int(round(x.shape[1] ** 0.5))
        if side * side != x.shape[1]:
            raise ValueError(f"rows of {x.shape[1]} features are not square images: pass image_shape")
        image_shape = (side, side)
    h, w = image_shape
    if h * w != x.shape[1]:
        raise ValueError(f"image_shape {image_shape} does not match rows of {x.shape[1]} features")
    if not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"max_shift must be an int >= 0, got {max_shift!r}")
    if max_shift == 0 or x.shape[0] == 0:
        return x.clone()
    b, s = x.shape[0], max_shift
    dev = _draw_device(generator, x.device)
    shifts = torch.randint(-s, s + 1, (2, b), generator=generator, device=dev).to(x.device)
    padded = torch.nn.functional.pad(x.view(b, h, w), (s, s, s, s))
    rows = (torch.arange(h, device=x.device)[None, :] + s - shifts[0][:, None])  # [B, H]
    cols = (torch.arange(w, device=x.device)[None, :] + s - shifts[1][:, None])  # [B, W]
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].reshape(b, h * w)


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
        head = f.read(4)
        if len(head) != 4:
            raise ValueError(f"{path} is not an IDX file (too short)")
        zero, dtype_code, ndim = struct.unpack(">HBB", head)
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{path} is not an unsigned-byte IDX file")
        dims = f.read(4 * ndim)
        if len(dims) != 4 * ndim:
            raise ValueError(f"{path}: header is truncated")
        shape = struct.unpack(">" + "I" * ndim, dims)
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {data.size} bytes")
    return data.reshape(shape)


def load_idx_dir(data_dir: str):
    """MNIST or Fashion-MNIST from ``data_dir`` (the four standard IDX files, raw or .gz), images
    flattened and scaled to [0, 1]: (x_train, y_train, x_test, y_test)."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data directory {data_dir!r} does not exist")
    arrays = {}
    for key, stem in _IDX_FILES.items():
        candidates = [os.path.join(data_dir, stem + ext) for ext in ("", ".gz")]
        path = next((p for p in candidates if os.path.isfile(p)), None)
        if path is None:
            raise FileNotFoundError(f"--data-dir {data_dir!r} has no {stem}[.gz]: expected the four "
                                    f"MNIST/Fashion-MNIST IDX files {sorted(_IDX_FILES.values())}")
        arrays[key] = read_idx(path)
    for split in ("train", "test"):
        n_x, n_y = len(arrays[f"x_{split}"]), len(arrays[f"y_{split}"])
        if n_x != n_y:
            raise ValueError(f"{data_dir}: {split} images ({n_x}) and labels ({n_y}) differ in number")
    x_train = torch.from_numpy(arrays["x_train"].reshape(len(arrays["x_train"]), -1).astype(np.float32) / 255)
    x_test = torch.from_numpy(arrays["x_test"].reshape(len(arrays["x_test"]), -1).astype(np.float32) / 255)
    return (x_train, torch.from_numpy(arrays["y_train"].astype(np.int64)),
            x_test, torch.from_numpy(arrays["y_test"].astype(np.int64)))
