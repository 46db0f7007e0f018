"""Backprop baseline for the main job: a same-size MLP (64-256-256 plus a 10-way head) trained with
Adam and cross-entropy on the same digits split, epochs and batch size. Prints one JSON line.

    python -m bench.digits_backprop_baseline
"""

import json
import time

import torch
from torch import nn

from ff_kernels.data import load_digits_split


def main(epochs: int = 60, batch_size: int = 64, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(x_tr), batch_size):
            idx = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    result = {"test_accuracy": round(acc, 4), "train_seconds": round(seconds, 3),
              "samples_per_second": round(epochs * len(x_tr) / seconds, 1), "model": "backprop MLP 64-256-256-10"}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
