"""Throughput of one FF layer step (positives + negatives): fused backends vs the eager recipe,
torch.compile of it and the two GEMMs alone.

    pytest bench/ --benchmark-only                # CPU: shrunk shapes; GPU: DESIGN.md section 5 shapes
    FF_BENCH_JSON=out.json pytest bench/ ...      # also write the summary table as JSON
    FF_BENCH_JSONL=out.jsonl pytest bench/ ...    # append each result as one JSON line when measured

Every variant of a shape runs in the same session, so the ratios in the summary are like for like.
bench/conftest.py runs the variants cheapest-and-most-wanted first: the two GEMMs (every other row's
"x of 2-GEMM time" needs them), the fused backends, eager, then torch.compile (long compiles).
"""

from __future__ import annotations

import pytest

from bench.common import (DRY_RUN, append_jsonl, bench_device, compile_backend, eager_recipe,
                          fused_step, layer_row, shapes_for, sync, timed_backends, two_gemms,
                          with_compile)

DEVICE = bench_device()
SHAPES = shapes_for(DEVICE)
VARIANTS = ["2gemm"] + [f"ffk-{name}" for name in timed_backends(DEVICE)] + ["eager"]
VARIANTS += ["compile"] if with_compile(DEVICE) else []

RESULTS: list = []  # read by bench/conftest.py's summary


def rounds_for(variant: str) -> tuple:
    """(rounds, warmup rounds): the dry run only rehearses; compile warms up its recompiles."""
    if DRY_RUN:
        return 3, 1
    return (20 if DEVICE.type == "cuda" else 10), (5 if variant == "compile" else 3)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_layer_step(benchmark, shape, variant):
    extra = {}
    if variant == "2gemm":
        step = two_gemms(shape, DEVICE)
    elif variant in ("eager", "compile"):
        step = eager_recipe(shape, DEVICE, compile=variant == "compile")
        if variant == "compile":
            extra["compile_backend"] = compile_backend()
    else:
        step = fused_step(shape, DEVICE, variant.removeprefix("ffk-"))

    def run():
        step()
        sync(DEVICE)

    benchmark.group = shape.id
    rounds, warmup = rounds_for(variant)
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup)
    row = layer_row(shape, variant, benchmark.stats.stats.median * 1e3, DEVICE, step, rounds, **extra)
    benchmark.extra_info.update({k: v for k, v in row.items() if isinstance(v, (int, float, str, bool))})
    RESULTS.append(row)
    append_jsonl(row)
