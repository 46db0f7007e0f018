"""Turn the $OUT directory of bench/gpu_check.sh into bench/results/<date>-<card>.json and .md.

    python -m bench.gpu_report OUT_DIR [--results-dir bench/results]

Reads what the stages left (preflight.txt, summary.md, verdict.txt, bench.jsonl, tests.log, build.log,
sanitizer.txt; any may be missing when a run was cut short) and writes:
  * the machine, versions and build time;
  * each stage's result and seconds;
  * the verdict's PASS / FAIL / not-run counts per backend and dtype, and the FAIL lines;
  * the layer-step table: for every DESIGN.md section 5 shape, eager, torch.compile, the two GEMMs
    alone, ffk-triton and ffk-cuda with ms, TFLOP/s, % of floor, x of the 2-GEMM time, speed-ups
    over eager and torch.compile, peak extra MB, and the two bars of section 5;
  * the whole-network table (ms per train_step, projected 60 epochs, the bar);
  * what did not run, and why where the files say.
Nothing is computed that the run did not measure; a dry run's report says on every page that its
numbers are CPU numbers (Triton interpreter, CUDA emulator), not GPU results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYER_VARIANTS = [("eager", "eager"), ("compile", "torch.compile"), ("2gemm", "2 GEMMs alone"),
                  ("ffk-triton", "ffk-triton"), ("ffk-cuda", "ffk-cuda")]
NETWORK_VARIANTS = ["eager", "compile", "ffk", "captured"]
FLOOR_BAR = 1.3  # DESIGN section 5: within 1.3x of the floor
DRY_RUN_NOTE = ("DRY RUN on the CPU: every number below is a CPU number (Triton interpreter, CUDA "
                "emulator, tiny shapes), a rehearsal of the stages, not a GPU result.")


# ================================================================ reading the files

def read(out_dir: str, name: str) -> str | None:
    path = os.path.join(out_dir, name)
    if not os.path.exists(path):
        return None
    with open(path, errors="replace") as f:
        return f.read()


def parse_preflight(text: str | None) -> dict:
    """'key: value' lines -> dict (first occurrence wins)."""
    info: dict = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition(": ")
        if sep and key not in info:
            info[key.strip()] = value.strip()
    return info


def parse_summary(text: str | None) -> tuple:
    """summary.md -> ([{stage, result, seconds, limit, note}], total seconds or None)."""
    stages, total = [], None
    for line in (text or "").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] not in ("stage", "---") \
                and not cells[0].startswith("-"):
            stage, result, seconds, limit, note = cells
            stages.append(dict(stage=stage, result=result, seconds=int(seconds), limit=int(limit), note=note))
        m = re.match(r"total: (\d+) s", line)
        if m:
            total = int(m.group(1))
    return stages, total


def parse_verdict_line(line: str) -> dict | None:
    """One PASS/FAIL/SKIP line -> {status, backend, dtype, ..., error/reason}; None for others."""
    status = line.split(" ", 1)[0]
    if status not in ("PASS", "FAIL", "SKIP"):
        return None
    head, tail_key, tail = line.rstrip("\n"), None, None
    for key in (" error=", " reason="):  # free text, last on the line
        if key in head:
            head, tail = head.split(key, 1)
            tail_key = key.strip(" =")
            break
    entry = {"status": status, "line": line.rstrip("\n")}
    for token in head.split()[1:]:
        key, sep, value = token.partition("=")
        if sep:
            entry[key] = value
    if tail_key:
        entry[tail_key] = tail
    return entry


def parse_verdict(text: str | None) -> list:
    return [e for e in (parse_verdict_line(l) for l in (text or "").splitlines()) if e]


def verdict_counts(entries: list) -> dict:
    """{"backend/dtype": {"PASS": n, "FAIL": n, "not run": n}} (a SKIP line counts its cases)."""
    counts: dict = {}
    for e in entries:
        c = counts.setdefault(f"{e.get('backend')}/{e.get('dtype')}", {"PASS": 0, "FAIL": 0, "not run": 0})
        if e["status"] == "SKIP":
            c["not run"] += int(e.get("cases", 0))
        else:
            c[e["status"]] += 1
    return dict(sorted(counts.items()))


def parse_jsonl(text: str | None) -> tuple:
    """bench.jsonl -> (rows, number of unparsable lines)."""
    rows, bad = [], 0
    for line in (text or "").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    return rows, bad


def parse_tests(text: str | None) -> dict:
    """tests.log -> {group: pytest's last summary line}."""
    groups, name = {}, None
    for line in (text or "").splitlines():
        m = re.match(r"=+ tests\[(\w+)\]", line)
        if m:
            name = m.group(1)
            groups[name] = "no summary line (cut short?)"
        elif name and re.search(r"\d+ (passed|failed|errors?|skipped|tests? collected)|no tests ran",
                                line):
            groups[name] = line.strip("= ").strip()
    return groups


# ================================================================ the report

def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s.removeprefix("nvidia-") or "unknown"


def expected_shapes(dry_run: bool) -> list:
    """The layer-step shapes the benchmark stage runs (bench/common.py's lists)."""
    from bench.common import DRY_RUN_SHAPES, GPU_SHAPES
    return [s.id for s in (DRY_RUN_SHAPES if dry_run else GPU_SHAPES)]


def build_report(out_dir: str) -> dict:
    pre = parse_preflight(read(out_dir, "preflight.txt"))
    stages, total = parse_summary(read(out_dir, "summary.md"))
    entries = parse_verdict(read(out_dir, "verdict.txt"))
    rows, bad_rows = parse_jsonl(read(out_dir, "bench.jsonl"))
    dry_run = pre.get("mode", "").startswith("DRY RUN") or any(r.get("dry_run") for r in rows)
    card = pre.get("card") or next((r["card"] for r in rows if r.get("card")), "unknown")
    date = (pre.get("date") or "unknown-date")[:10]
    build_log = read(out_dir, "build.log") or ""
    build_stage = next((s for s in stages if s["stage"] == "build"), None)
    ext_lines = [l for l in build_log.splitlines() if l.startswith("cuda extension")]

    layer = [r for r in rows if r.get("kind") == "layer"]
    network = [r for r in rows if r.get("kind") == "network"]
    not_run = [f"stage {s['stage']}: {s['result']}" + (f" ({s['note']})" if s["note"] else "")
               for s in stages if s["result"] != "OK"]
    if not stages:
        not_run.append("summary.md missing: no stage finished")
    not_run += [f"verdict {e.get('backend')}/{e.get('dtype')}: {e.get('cases', '?')} cases not run: "
                f"{e.get('reason', '')}" for e in entries if e["status"] == "SKIP"]
    measured = {(r["shape"], r["variant"]) for r in layer if "ms" in r}
    for shape in expected_shapes(dry_run):
        for variant, _ in LAYER_VARIANTS:
            if (shape, variant) not in measured:
                not_run.append(f"bench {shape} {variant}: no result in bench.jsonl")
    batches = sorted({r["batch"] for r in network if "batch" in r} |
                     {int(r["shape"].rsplit(" b", 1)[1]) for r in network if " b" in r.get("shape", "")})
    net_measured = {(r.get("batch"), r["variant"]) for r in network if "ms" in r}
    for r in network:
        if "skipped" in r:
            not_run.append(f"network {r['shape']} {r['variant']}: {r['skipped']}")
    skipped = {(r["shape"], r["variant"]) for r in network if "skipped" in r}
    for batch in batches:
        for variant in NETWORK_VARIANTS:
            shape = next((r["shape"] for r in network if r["shape"].endswith(f" b{batch}")), f"b{batch}")
            if (batch, variant) not in net_measured and (shape, variant) not in skipped:
                not_run.append(f"network {shape} {variant}: no result in bench.jsonl")
    if not network:
        not_run.append("network benchmark: no rows in bench.jsonl")

    return dict(
        date=date, card=card, dry_run=dry_run,
        machine={k: v for k, v in pre.items() if k not in ("preflight",)},
        preflight=pre.get("preflight", "missing"),
        stages=stages, total_s=total,
        build=dict(seconds=build_stage["seconds"] if build_stage else None,
                   result=build_stage["result"] if build_stage else "missing",
                   extension=ext_lines[-1] if ext_lines else None),
        verdict=dict(counts=verdict_counts(entries),
                     failures=[e["line"] for e in entries if e["status"] == "FAIL"],
                     skips=[e["line"] for e in entries if e["status"] == "SKIP"]),
        bench=dict(layer=layer, network=network, unparsable_lines=bad_rows),
        tests=parse_tests(read(out_dir, "tests.log")),
        sanitizer=[l for l in (read(out_dir, "sanitizer.txt") or "").splitlines()
                   if re.search(r"ERROR SUMMARY|RACECHECK SUMMARY|=== .* exit status", l)],
        not_run=not_run,
    )


# ================================================================ markdown

def _num(x, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def layer_table(layer: list, dry_run: bool) -> list:
    by_key = {(r["shape"], r["variant"]): r for r in layer if "ms" in r}
    shapes = expected_shapes(dry_run)
    shapes += sorted({r["shape"] for r in layer} - set(shapes))
    lines = ["| shape (B+ = B-, K -> N) | variant | ms | TFLOP/s | % of floor | x 2-GEMM time | "
             "vs eager | vs compile | peak extra MB | bars: fusion free / <= 1.3x floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for shape in shapes:
        eager, comp = by_key.get((shape, "eager")), by_key.get((shape, "compile"))
        variants = LAYER_VARIANTS + [(v, v) for (s, v) in sorted(by_key) if s == shape
                                     and v not in dict(LAYER_VARIANTS)]
        for variant, label in variants:
            r = by_key.get((shape, variant))
            if r is None:
                lines.append(f"| {shape} | {label} | not run | | | | | | | |")
                continue
            bars = ""
            if variant.startswith("ffk-"):
                free = "yes" if r.get("x_2gemm") and r["x_2gemm"] <= 1.0 else "no"
                near = "yes" if r["pct_of_floor"] >= 100 / FLOOR_BAR else "no"
                bars = f"{free} / {near}"
            if variant == "compile" and r.get("compile_backend", "inductor") != "inductor":
                label += f" ({r['compile_backend']} backend)"
            if r["device"] not in (r.get("card"),) and not r["device"].startswith("NVIDIA"):
                label += f" [{r['device']}]"
            lines.append(
                f"| {shape} | {label} | {_num(r['ms'], '.3f')} | {_num(r['tflops'], '.2f')} | "
                f"{_num(r['pct_of_floor'], '.1f')} % | {_num(r.get('x_2gemm'), '.2f')}x | "
                f"{_num(eager['ms'] / r['ms'] if eager else None, '.2f')}x | "
                f"{_num(comp['ms'] / r['ms'] if comp else None, '.2f')}x | "
                f"{_num(r.get('peak_extra_mb'), '.1f')} | {bars} |")
    return lines


def network_table(network: list) -> list:
    lines = ["| net, batch per sign | variant | ms per step | 60 epochs x 60k images, s | bar ms | "
             "meets bar |",
             "|---|---|---|---|---|---|"]
    for r in network:
        label = r["variant"] + (f" ({r['backend']})" if r.get("backend") else "")
        if "skipped" in r:
            lines.append(f"| {r['shape']} | {label} | not run: {r['skipped']} | | | |")
            continue
        met = "-" if r.get("meets_bar") is None else ("yes" if r["meets_bar"] else "no")
        lines.append(f"| {r['shape']} | {label} | {_num(r['ms'], '.3f')} | "
                     f"{_num(r['projected_60_epochs_s'], '.1f')} | {_num(r.get('bar_ms'), '.3f')} | {met} |")
    return lines


def render_markdown(rep: dict) -> str:
    title = "DRY RUN (CPU)" if rep["dry_run"] else rep["card"]
    m = rep["machine"]
    out = [f"# GPU check: {title}, {rep['date']}", ""]
    if rep["dry_run"]:
        out += [f"**{DRY_RUN_NOTE}**", ""]
    first_row = (rep["bench"]["layer"] or rep["bench"]["network"] or [{}])[0]
    out += ["`OUT=... bash bench/gpu_check.sh`, then `python -m bench.gpu_report OUT`.", "",
            f"- card: {rep['card']}" + (f" ({m['nvidia-smi']})" if m.get("nvidia-smi") else ""),
            f"- host: {m.get('host', '?')}; torch {m.get('package torch', first_row.get('torch', '?'))}, "
            f"triton {m.get('package triton', first_row.get('triton', '?'))}"
            + (f"; {m['cuda']}" if m.get("cuda") else ""),
            f"- build: {rep['build']['result']} in {_num(rep['build']['seconds'], 'd')} s"
            + (f"; {rep['build']['extension']}" if rep["build"]["extension"] else ""),
            f"- preflight: {rep['preflight']}",
            f"- timing: median of the rounds; host overhead {first_row.get('host_overhead', '?')}; "
            f"fp32 with tf32 {'on' if first_row.get('tf32') else 'off'} in the benchmark", "",
            "## Stages", "", "| stage | result | seconds | limit s | note |", "|---|---|---|---|---|"]
    out += [f"| {s['stage']} | {s['result']} | {s['seconds']} | {s['limit']} | {s['note']} |"
            for s in rep["stages"]]
    out += ["", f"total: {_num(rep['total_s'], 'd')} s", "",
            "## Verdict (vs the float64 reference, tests/utils.py tolerances)", "",
            "| backend/dtype | PASS | FAIL | not run |", "|---|---|---|---|"]
    out += [f"| {k} | {c['PASS']} | {c['FAIL']} | {c['not run']} |"
            for k, c in rep["verdict"]["counts"].items()]
    fails = rep["verdict"]["failures"]
    if fails:
        out += ["", f"FAIL lines ({len(fails)}; the first 25):", "", "```"] + fails[:25] + ["```"]
    out += ["", "## One layer step (update mode, the popular recipe's config)", ""]
    out += layer_table(rep["bench"]["layer"], rep["dry_run"])
    out += ["", "Floor = max(2 GEMMs at the measured matmul rate, bytes at the measured copy rate); bars "
            "(DESIGN section 5): the fused step costs no more than the 2 GEMMs alone, and is within 1.3x "
            "of the floor (>= 76.9 % of floor).", "",
            "## Whole network: one train_step of every layer (FFConfig.hinton(), SGD with momentum 0.9; "
            "Hinton's 784 -> 4 x 2000 on a GPU)", ""]
    out += network_table(rep["bench"]["network"])
    out += ["", "## Tests", "", "| group | pytest summary |", "|---|---|"]
    out += [f"| {g} | {s} |" for g, s in rep["tests"].items()]
    if rep["sanitizer"]:
        out += ["", "## compute-sanitizer", "", "```"] + rep["sanitizer"] + ["```"]
    out += ["", "## Stages not OK, and what did not run", ""]
    out += [f"- {x}" for x in rep["not_run"]] or ["- nothing"]
    return "\n".join(out) + "\n"


def write_report(out_dir: str, results_dir: str) -> tuple:
    rep = build_report(out_dir)
    name = f"{rep['date']}-" + ("dry-run-cpu" if rep["dry_run"] else slug(rep["card"]))
    os.makedirs(results_dir, exist_ok=True)
    json_path, md_path = (os.path.join(results_dir, name + ext) for ext in (".json", ".md"))
    with open(json_path, "w") as f:
        json.dump(rep, f, indent=1, default=str)
        f.write("\n")
    with open(md_path, "w") as f:
        f.write(render_markdown(rep))
    return json_path, md_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="the $OUT directory of bench/gpu_check.sh")
    ap.add_argument("--results-dir", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args(argv)
    if not os.path.isdir(args.out_dir):
        print(f"gpu_report: {args.out_dir} is not a directory", file=sys.stderr)
        return 2
    for path in write_report(args.out_dir, args.results_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
