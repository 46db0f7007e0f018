"""Throughput of one FF layer step (positives + negatives): fused backends vs the eager recipe.

    pytest bench/ --benchmark-only            # CPU: shrunk shapes; GPU: DESIGN.md section 5 shapes
    FF_BENCH_JSON=out.json pytest bench/ ...  # also write the summary table as JSON

Every variant of a shape runs in the same session, so the speed-ups in the summary are like for like.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.common import (bench_device, eager_recipe, floor_ms, fused_step, peak_extra_mb, shapes_for,
                          sync, timed_backends)

DEVICE = bench_device()
SHAPES = shapes_for(DEVICE)
# torch.compile is a baseline on the GPU; on a 2-core CPU its compile time dwarfs the run (opt in).
VARIANTS = ["eager"] + (["compile"] if DEVICE.type == "cuda" or os.environ.get("FF_BENCH_COMPILE") else [])
VARIANTS += [f"ffk-{name}" for name in timed_backends(DEVICE)]

RESULTS: list = []  # read by bench/conftest.py's summary


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_layer_step(benchmark, shape, variant):
    if variant == "eager" or variant == "compile":
        step = eager_recipe(shape, DEVICE, compile=variant == "compile")
    else:
        step = fused_step(shape, DEVICE, variant.removeprefix("ffk-"))

    def run():
        step()
        sync(DEVICE)

    benchmark.group = shape.id
    rounds = 20 if DEVICE.type == "cuda" else 10
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=3 if variant != "compile" else 5)
    ms = benchmark.stats.stats.median * 1e3
    floor = floor_ms(shape, DEVICE)
    row = dict(shape=shape.id, variant=variant, device=str(DEVICE), ms=ms,
               tflops=shape.flops() / (ms / 1e3) / 1e12, floor_ms=floor, pct_of_floor=100 * floor / ms,
               peak_extra_mb=peak_extra_mb(step, DEVICE),
               tf32=bool(torch.backends.cuda.matmul.allow_tf32))
    benchmark.extra_info.update(row)
    RESULTS.append(row)
