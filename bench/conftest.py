"""Summary table of the layer-step benchmarks, with speed-ups measured in the same run."""

import json
import math
import os

import torch

# fp32 runs as tf32 on the GPU, as DESIGN.md's table measures it.
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True


def summary_rows(results):
    """Add speed-ups over the eager recipe and torch.compile of the same shape."""
    base = {(r["shape"], r["variant"]): r["ms"] for r in results}
    rows = []
    for r in results:
        eager, compiled = base.get((r["shape"], "eager")), base.get((r["shape"], "compile"))
        rows.append(dict(r, speedup_vs_eager=eager / r["ms"] if eager else math.nan,
                         speedup_vs_compile=compiled / r["ms"] if compiled else math.nan))
    return rows


def pytest_terminal_summary(terminalreporter):
    from bench.test_bench_layer_step import RESULTS
    if not RESULTS:
        return
    rows = summary_rows(RESULTS)
    tr = terminalreporter
    tr.section("ff_kernels layer step (median of the run)")
    header = f"{'shape':<22}{'variant':<14}{'ms':>9}{'TFLOP/s':>9}{'% floor':>9}{'vs eager':>10}{'vs compile':>11}{'peak MB':>9}"
    tr.write_line(header)
    for r in rows:
        tr.write_line(f"{r['shape']:<22}{r['variant']:<14}{r['ms']:>9.3f}{r['tflops']:>9.2f}"
                      f"{r['pct_of_floor']:>8.1f}%{r['speedup_vs_eager']:>9.2f}x{r['speedup_vs_compile']:>10.2f}x"
                      f"{r['peak_extra_mb']:>9.1f}")
    path = os.environ.get("FF_BENCH_JSON")
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
        tr.write_line(f"wrote {path}")
