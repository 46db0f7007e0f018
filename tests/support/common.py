"""Shared bits of the independent implementations: the result record and batching."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class Result:
    """accuracy: {method: test accuracy after the last epoch}; history: per evaluated epoch
    {"epoch", "accuracy": {method: acc}, "live": [fraction per layer]}; seconds_per_epoch: training
    time only (evaluation excluded)."""

    accuracy: dict
    seconds_per_epoch: float
    live: list = field(default_factory=list)
    history: list = field(default_factory=list)


def batches(n: int, batch_size: int, gen: torch.Generator, drop_last: bool = False):
    order = torch.randperm(n, generator=gen)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for i in range(0, stop, batch_size):
        yield order[i:i + batch_size]


def live_fraction(acts, min_active: float = 0.01) -> list:
    """Fraction of units active (> 0) on at least ``min_active`` of the rows, per activity matrix."""
    return [float(((a > 0).float().mean(0) >= min_active).float().mean()) for a in acts]


class Timer:
    def __init__(self):
        self.total = 0.0

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.total += time.perf_counter() - self.start
