"""Data helpers: label embedding, negative data (uniform and hard wrong labels; hybrid images for
unsupervised FF), jitter, and the real data sets the main job trains on.

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


# ---------------------------------------------------------------- hybrid images (unsupervised FF)
def _image_shape(width: int, image_shape, name: str = "x") -> tuple:
    """(H, W) of rows of ``width`` pixels: ``image_shape`` checked, or the square they make."""
    if image_shape is None:
        side = int(round(width ** 0.5))
        if side * side != width:
            raise ValueError(f"image_shape: rows of {name} have {width} pixels, not a square: pass image_shape")
        return side, side
    h, w = _check_image_shape(image_shape)
    if h * w != width:
        raise ValueError(f"image_shape {(h, w)} does not match rows of {width} pixels")
    return h, w


def _check_image_shape(image_shape) -> tuple:
    if (not isinstance(image_shape, (tuple, list)) or len(image_shape) != 2
            or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in image_shape)):
        raise ValueError(f"image_shape must be (H, W) of positive ints, got {image_shape!r}")
    return tuple(image_shape)


def _check_generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def hybrid_blurs(image_shape) -> int:
    """How often ``hybrid_mask`` blurs, for images of ``image_shape`` (H, W): round(6 * min(H, W) / 28),
    at least 1. The paper blurs its 28x28 masks about 6 times; n blurs with [1/4, 1/2, 1/4] smooth
    with a standard deviation of sqrt(n / 2) pixels, so scaling n with the side keeps the regions'
    size a fixed fraction of the image (8x8 digits: 2, 4x4: 1)."""
    h, w = _check_image_shape(image_shape)
    return max(1, round(6 * min(h, w) / 28))


def hybrid_mask(batch: int, image_shape, blurs: Optional[int] = None,
                generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """[batch, H*W] bool masks with large regions of ones and zeros (the FF paper's hybrid negatives):
    a random bit image blurred ``blurs`` times (default ``hybrid_blurs``) with the filter
    [1/4, 1/2, 1/4] horizontally and vertically, edges replicated, then thresholded at 0.5 (an exact
    0.5 keeps its original bit, so ones and zeros stay equally likely). Drawn on the generator's
    device (``device`` when none is given), the whole batch at once."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    h, w = _check_image_shape(image_shape)
    if blurs is None:
        blurs = hybrid_blurs((h, w))
    if isinstance(blurs, bool) or not isinstance(blurs, int) or blurs <= 0:
        raise ValueError(f"blurs must be a positive int, got {blurs!r}")
    _check_generator(generator)
    dev = _draw_device(generator, torch.device(device) if device is not None else torch.device("cpu"))
    bits = torch.randint(0, 2, (batch, h, w), generator=generator, device=dev, dtype=torch.uint8).bool()
    m = bits.float()
    for _ in range(blurs):
        p = torch.nn.functional.pad(m[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
        m = 0.25 * p[:, :, :-2] + 0.5 * p[:, :, 1:-1] + 0.25 * p[:, :, 2:]  # horizontal: [B, H+2, W]
        m = 0.25 * m[:, :-2] + 0.5 * m[:, 1:-1] + 0.25 * m[:, 2:]  # vertical: [B, H, W]
    mask = (m > 0.5) | ((m == 0.5) & bits)
    out = mask.reshape(batch, h * w)
    return out if device is None else out.to(device)


def partner_indices(n: int, labels: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """[n] int64: for every row i a partner j != i drawn uniformly, of a different class where
    ``labels`` [n] are given (a row whose class fills the whole set gets a different row of its own
    class: no host check, so no sync). Batched: sorted by class, a draw among the rows outside the
    row's own block."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2 (a partner must be a different row), got {n!r}")
    _check_generator(generator)
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.shape != (n,) or labels.is_floating_point():
            raise ValueError(f"labels must be an integer tensor of shape ({n},), got "
                             f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
        device = labels.device
    dev = _draw_device(generator, torch.device(device) if device is not None else torch.device("cpu"))
    rows = torch.arange(n, device=dev)
    # any different row: a shift in [1, n) around the ring
    other_row = (rows + torch.randint(1, n, (n,), generator=generator, device=dev)) % n
    if labels is None:
        return other_row if device is None else other_row.to(device)
    lab = labels.to(dev).long()
    sorted_labels, order = torch.sort(lab, stable=True)
    # block of each row's class in the sorted order: [start, start + count)
    first = torch.searchsorted(sorted_labels, lab, right=False)
    count = torch.searchsorted(sorted_labels, lab, right=True) - first
    others = n - count
    r = (torch.rand(n, generator=generator, device=dev) * others).long().clamp_max((others - 1).clamp_min(0))
    pos = torch.where(r >= first, r + count, r)
    partner = torch.where(others > 0, order[pos.clamp_max(n - 1)], other_row)
    return partner.to(labels.device)


def hybrid_images(a: torch.Tensor, b: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                  image_shape=None, blurs: Optional[int] = None,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Hybrid negatives [B, H*W]: a * mask + b * (1 - mask) with ``hybrid_mask`` (every pixel is
    copied from a or from b), images whose short-range statistics are real and whose long-range
    shape is not. ``b`` [B, H*W] gives the partner of each row of ``a``; without it each row is
    paired with a different row of ``a`` (of a different class where ``labels`` are given, see
    ``partner_indices``). ``image_shape`` defaults to the square of the row length."""
    if not isinstance(a, torch.Tensor) or a.dim() != 2 or not a.is_floating_point():
        raise ValueError(f"a must be a floating [B, H*W] tensor, got "
                         f"{tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__}")
    shape = _image_shape(a.shape[1], image_shape, "a")
    if b is None:
        if a.shape[0] < 2:
            raise ValueError(f"a must hold at least 2 rows to pair them (or pass b), got {a.shape[0]}")
        b = a[partner_indices(a.shape[0], labels, generator, device=a.device if labels is None else None)
              .to(a.device)]
    elif labels is not None:
        raise ValueError("labels pair the rows of a among themselves: give b or labels, not both")
    elif not isinstance(b, torch.Tensor) or b.shape != a.shape or b.dtype != a.dtype or b.device != a.device:
        raise ValueError(f"b must be a {tuple(a.shape)} {a.dtype} tensor on {a.device} (like a), got "
                         f"{tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__}")
    mask = hybrid_mask(a.shape[0], shape, blurs, generator, device=a.device)
    return torch.where(mask, a, b)


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
