"""The learning-results table: every preset of ff_kernels beside an independent eager implementation
of its source (tests/support/, which never imports ff_kernels) and a same-size backprop MLP, on the
same data, epochs, batch and seeds; test accuracy per prediction method, live units per layer and
training seconds per epoch.

    python -m bench.learning_table                   # everything below (hours on 2 CPU cores)
    python -m bench.learning_table --dataset digits  # one data set
    python -m bench.learning_table --only ffk:hinton,ind:hinton --epochs 5 --seeds 0
    python -m bench.learning_table --report          # rebuild the .md/.json from the run log

Every run appends one JSON line to the run log (default bench/results/learning-runs.jsonl), so an
interrupted table resumes where it stopped (runs already logged are skipped) and --report rebuilds
the tables from the log alone.

Runs: digits (scikit-learn, 1347 train / 450 test) 64-256-256, 60 epochs, batch 64; Fashion-MNIST
(60000 / 10000) 784-500-500, 3 and 5 epochs, batch 128; seeds 0, 1, 2. ff_kernels runs use the
preset's one-liner (ff_kernels.train.build_net) and FFNet.train_epoch; the recipe gets an extra
readout (trained beside, never feeding back: its goodness numbers are the plain recipe's) so both
prediction methods are reported. Timings: torch.set_num_threads(--threads, default 1) in every
run, training only (evaluation excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ff_kernels.data import load_digits_split, load_idx_dir  # noqa: E402
from ff_kernels.train import PRESETS as CLI_PRESETS, build_net  # noqa: E402
from tests.support import IMPLEMENTATIONS  # noqa: E402

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
RESULTS = os.path.join(ROOT, "bench", "results")
LOG = os.path.join(RESULTS, "learning-runs.jsonl")
STEM = os.path.join(RESULTS, "2026-11-27-learning-cpu")
PRESETS = ("recipe", "hinton", "loewex")

# (data set, hidden sizes, batch, [epochs...]) of the table
SETUPS = {
    "digits": ([256, 256], 64, [60]),
    "fashion": ([500, 500], 128, [3, 5]),
}
# longer runs (variant "full"): the best preset and the backprop MLP, evaluated along the way
FULL = {"fashion": ([500, 500], 128, 60, [10, 20, 30, 40, 50, 60])}


def load(dataset):
    dataset = dataset.replace("-full", "")
    if dataset == "digits":
        return load_digits_split(seed=0)
    return load_idx_dir(FASHION_DIR)


def _ffk_accuracy(net, x_te, y_te):
    acc = {}
    for method in ("goodness", "readout") if net.readout is not None else ("goodness",):
        correct = sum(int((net.predict(x_te[i:i + 2000], method=method) == y_te[i:i + 2000]).sum())
                      for i in range(0, len(x_te), 2000))
        acc[method] = correct / len(x_te)
    return acc


def run_ffk(preset, data, hidden, epochs, batch, seed, extra=None, eval_epochs=None, readout_beside=True):
    """{epoch: result} at every epoch of ``eval_epochs`` (default: the last). ``readout_beside``: give a
    preset without a readout one, so both prediction methods can be reported (timing runs do not)."""
    x_tr, y_tr, x_te, y_te = data
    extra = dict(extra or {})
    jitter = extra.pop("jitter", 0)
    # a readout beside the recipe: trained on the neutral pass, never fed back into the FF layers
    beside = readout_beside and not CLI_PRESETS[preset].has_readout and "readout" not in extra
    torch.manual_seed(seed)
    net = build_net(preset, [x_tr.shape[1], *hidden], epochs, **({"predict": "readout"} if beside else {}),
                    **extra)
    if beside:
        net.predict_method = "goodness"
    gen = torch.Generator().manual_seed(seed + 1000)
    seconds, results = 0.0, {}
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        stats = net.train_epoch(x_tr, y_tr, batch, gen, jitter=jitter)
        stats["loss"].tolist()
        seconds += time.perf_counter() - start
        if epoch == epochs or epoch in (eval_epochs or ()):
            live = [round(v, 4) for v in net.live_fraction(x_te[:1000], y_te[:1000]).tolist()]
            results[epoch] = {"accuracy": _ffk_accuracy(net, x_te, y_te), "seconds_per_epoch": seconds / epoch,
                              "live": live}
    return results


def run_independent(name, data, hidden, epochs, batch, seed, eval_epochs=None, extra=None):
    r = IMPLEMENTATIONS[name](*data, hidden, epochs, batch, seed=seed, eval_epochs=eval_epochs, **(extra or {}))
    return {h["epoch"]: {"accuracy": h["accuracy"], "seconds_per_epoch": r.seconds_per_epoch,
                         "live": [round(v, 4) for v in h["live"]]} for h in r.history}


def run_key(rec):
    return (rec.get("dataset"), rec.get("impl"), rec.get("preset"), rec.get("variant"),
            tuple(rec.get("sizes", ())), rec.get("epochs"), rec.get("batch"), rec.get("seed"))


def read_log(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# Implementations whose training does not depend on the total number of epochs (no lr schedule): one
# run of the longest length gives every shorter length's row too (the first e epochs are the same).
SCHEDULE_FREE = {("ff_kernels", "recipe"), ("independent", "recipe"), ("independent", "recipe-uniform"),
                 ("backprop", "mlp")}


def planned_runs(datasets, only, seeds, epochs_override):
    """[(dataset, impl, preset, hidden, epochs, batch, seed, eval_epochs)], longest runs first."""
    runs = []
    for ds in datasets:
        hidden, batch, epoch_list = SETUPS[ds]
        epoch_list = [epochs_override] if epochs_override else sorted(epoch_list, reverse=True)
        for epochs in epoch_list:
            for seed in seeds:
                for impl, preset in ([(i, p) for p in PRESETS for i in ("ff_kernels", "independent")]
                                     + [("independent", "recipe-uniform"), ("backprop", "mlp")]):
                    if (impl, preset) in SCHEDULE_FREE:
                        if epochs != epoch_list[0]:
                            continue
                        runs.append((ds, impl, preset, hidden, epochs, batch, seed, epoch_list))
                    else:
                        runs.append((ds, impl, preset, hidden, epochs, batch, seed, [epochs]))
    if only:
        short = {"ffk": "ff_kernels", "ind": "independent", "bp": "backprop"}
        wanted = {(short.get(k, k), v) for k, v in (item.split(":") for item in only.split(","))}
        runs = [r for r in runs if (r[1], r[2]) in wanted]
    return runs


def execute(runs, log_path, threads, variant, extra):
    done = {run_key(r) for r in read_log(log_path)}
    cache = {}
    for ds, impl, preset, hidden, epochs, batch, seed, eval_epochs in runs:
        recs = [{"dataset": ds, "impl": impl, "preset": preset, "variant": variant, "sizes": hidden,
                 "epochs": e, "batch": batch, "seed": seed} for e in eval_epochs]
        if all(run_key(rec) in done for rec in recs):
            continue
        if ds not in cache:
            cache[ds] = load(ds)
        torch.set_num_threads(threads)
        start = time.perf_counter()
        if impl == "ff_kernels":
            outs = run_ffk(preset, cache[ds], hidden, epochs, batch, seed, extra, eval_epochs)
        else:
            outs = run_independent(preset, cache[ds], hidden, epochs, batch, seed, eval_epochs, extra)
        for rec in recs:
            if run_key(rec) in done:
                continue
            rec.update(outs[rec["epochs"]], threads=threads, run_epochs=epochs,
                       wall_seconds=round(time.perf_counter() - start, 1),
                       load_average=round(os.getloadavg()[0], 2), finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                       torch=torch.__version__, machine=platform.processor() or platform.machine())
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)


# ---------------------------------------------------------------------------------------------- report
def _mean_sd(values):
    if not values:
        return None
    m = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return m, sd


def summarize(records, variant="default"):
    """Groups: (dataset, epochs, batch, sizes, preset, impl) -> per-method accuracies over seeds."""
    groups = {}
    for r in records:
        if r.get("variant", "default") != variant:
            continue
        key = (r["dataset"], r["epochs"], r["batch"], tuple(r["sizes"]), r["preset"], r["impl"])
        groups.setdefault(key, []).append(r)
    rows = []
    for key, recs in sorted(groups.items()):
        recs = sorted(recs, key=lambda r: r["seed"])
        methods = sorted({m for r in recs for m in r["accuracy"]})
        rows.append({
            "dataset": key[0], "epochs": key[1], "batch": key[2], "sizes": list(key[3]), "preset": key[4],
            "impl": key[5], "seeds": [r["seed"] for r in recs],
            "accuracy": {m: [round(r["accuracy"][m], 4) for r in recs if m in r["accuracy"]] for m in methods},
            "seconds_per_epoch": [round(r["seconds_per_epoch"], 2) for r in recs],
            "live": [r["live"] for r in recs],
            "load_average": [r.get("load_average") for r in recs],
        })
    return rows


def _fmt(accs):
    m, sd = _mean_sd(accs)
    return f"{m:.4f} ± {sd:.4f} ({', '.join(f'{a:.3f}' for a in accs)})"


def comparison(rows):
    """One line per (data, epochs, preset, method): ff_kernels beside the independent implementation of
    its source as published and, where run, beside the source's variant with uniform wrong labels."""
    index = {(r["dataset"], r["epochs"], r["preset"], r["impl"]): r for r in rows}
    out = []
    for r in rows:
        if r["impl"] != "ff_kernels":
            continue
        mlp = index.get((r["dataset"], r["epochs"], "mlp", "backprop"))
        for method, accs in r["accuracy"].items():
            for suffix, variant in (("", "as published"), ("-uniform", "uniform wrong labels")):
                ind = index.get((r["dataset"], r["epochs"], r["preset"] + suffix, "independent"))
                if suffix and not ind:
                    continue
                ref = ind["accuracy"].get(method) if ind else None
                diff = None if not ref else statistics.fmean(accs) - statistics.fmean(ref)
                out.append({
                    "dataset": r["dataset"], "epochs": r["epochs"], "batch": r["batch"], "sizes": r["sizes"],
                    "preset": r["preset"], "method": method, "independent_variant": variant,
                    "seeds": r["seeds"], "ff_kernels": accs, "independent": ref,
                    "difference": None if diff is None else round(diff, 4),
                    "within_1_point": None if diff is None else abs(diff) <= 0.01,
                    "backprop_mlp": mlp["accuracy"]["backprop"] if mlp else None,
                    "min_live_ff_kernels": min(min(l) for l in r["live"]),
                    "min_live_independent": min(min(l) for l in ind["live"]) if ind else None,
                })
    return out


def markdown(rows, timings, subnormal_recs, full_rows):
    lines = ["## Accuracy: ff_kernels presets vs independent implementations of their sources", "",
             "Test accuracy, mean ± sd over seeds (per-seed values in brackets); Δ = ff_kernels - "
             "independent (means); live = the lowest fraction of live units of any layer in any seed "
             "(a unit is live when active on >= 1 % of 1000 test images with their true label).", "",
             "| data, net, batch | epochs | preset | predict | ff_kernels | independent | Δ | backprop MLP | "
             "live ffk / ind |", "|---|---|---|---|---|---|---|---|---|"]
    for c in comparison(rows):
        ind = _fmt(c["independent"]) if c["independent"] else "n/a (source has no readout)"
        diff = f"{c['difference']:+.4f}" if c["difference"] is not None else "-"
        mlp = _fmt(c["backprop_mlp"]) if c["backprop_mlp"] else "-"
        live_ind = f"{c['min_live_independent']:.2f}" if c["min_live_independent"] is not None else "-"
        preset = c["preset"] + (" (vs source with uniform wrong labels)" if c["independent_variant"] != "as published" else "")
        lines.append(f"| {c['dataset']} {'-'.join(map(str, c['sizes']))}, b{c['batch']} | {c['epochs']} | "
                     f"{preset} | {c['method']} | {_fmt(c['ff_kernels'])} | {ind} | {diff} | {mlp} | "
                     f"{c['min_live_ff_kernels']:.2f} / {live_ind} |")
    if timings:
        lines += ["", "## Seconds per epoch (training only, 1 thread, alternating rounds)", "",
                  "| data | implementation | preset | s/epoch (median) | rounds | load average during |",
                  "|---|---|---|---|---|---|"]
        for t in timings:
            lines.append(f"| {t['dataset']} {'-'.join(map(str, t['sizes']))} b{t['batch']} | {t['impl']} | "
                         f"{t['preset']} | {t['seconds_per_epoch']:.2f} | "
                         f"{', '.join(f'{v:.2f}' for v in t['seconds_per_epoch_rounds'])} | "
                         f"{t['load_average_during'][0]}-{t['load_average_during'][1]} |")
    if full_rows:
        lines += ["", "## Longer runs (seed 0)", "",
                  "| data, net, batch | run epochs | after epoch | implementation | preset | options | accuracy |",
                  "|---|---|---|---|---|---|---|"]
        for r in full_rows:
            acc = ", ".join(f"{m} {a:.4f}" for m, a in r["accuracy"].items())
            options = r["variant"][len("full"):].strip() or "-"
            lines.append(f"| {r['dataset']} {'-'.join(map(str, r['sizes']))} b{r['batch']} | "
                         f"{r.get('run_epochs', r['epochs'])} | {r['epochs']} | {r['impl']} | {r['preset']} | "
                         f"{options} | {acc} |")
    if subnormal_recs:
        lines += ["", "## Subnormal floats (Fashion-MNIST 784-500-500, batch 128, 1 thread)", "",
                  "| preset | after step | subnormal dL/dg entries | subnormal state entries | "
                  "10 steps, ftz off (s) | ftz on (s) | off/on |", "|---|---|---|---|---|---|---|"]
        for r in subnormal_recs:
            lines.append(f"| {r['preset']} | {r['step']} | {r['dg_subnormal']} / {r['dg_total']} | "
                         f"{sum(r['state_subnormal'].values())} | "
                         f"{', '.join(f'{v:.2f}' for v in r['ten_steps_ftz_off'])} | "
                         f"{', '.join(f'{v:.2f}' for v in r['ten_steps_ftz_on'])} | {r['ratio_off_on']:.2f} |")
    return "\n".join(lines)


def bars(comp, full_rows):
    """The issue's bars, checked on the logged numbers."""
    lines = ["## Bars", ""]
    misses = [c for c in comp if c["within_1_point"] is False and c["independent_variant"] == "as published"]
    checked = [c for c in comp if c["within_1_point"] is not None and c["independent_variant"] == "as published"]
    variants = {(c["dataset"], c["epochs"], c["preset"], c["method"]): c for c in comp
                if c["independent_variant"] != "as published" and c["difference"] is not None}

    def miss(c):
        text = (f"{c['dataset']} {c['epochs']} ep {c['preset']} {c['method']} {c['difference']:+.4f} "
                f"(seed sd {statistics.stdev(c['ff_kernels']):.4f} / {statistics.stdev(c['independent']):.4f}")
        v = variants.get((c["dataset"], c["epochs"], c["preset"], c["method"]))
        if v:
            text += f"; vs the source with uniform wrong labels {v['difference']:+.4f}"
        return text + ")"

    lines.append(f"- Each preset within 1 point of its independent implementation (mean over seeds): "
                 f"{len(checked) - len(misses)} of {len(checked)} comparisons"
                 + ("." if not misses else "; missed by: " + "; ".join(miss(c) for c in misses) + "."))
    live = [c for c in comp if c["preset"] in ("hinton", "loewex") and c["dataset"] == "fashion"
            and c["epochs"] >= 3 and c["independent_variant"] == "as published"]
    if live:
        worst = min(live, key=lambda c: c["min_live_ff_kernels"])
        lines.append(f"- No layer of the hinton or loewex preset below 50 % live units after 3 (and 5) epochs "
                     f"on Fashion-MNIST: lowest {worst['min_live_ff_kernels']:.2f} ({worst['preset']}, "
                     f"{worst['epochs']} epochs): {'met' if worst['min_live_ff_kernels'] >= 0.5 else 'NOT met'}.")
    five = [c for c in comp if c["dataset"] == "fashion" and c["epochs"] == 5
            and c["independent_variant"] == "as published"]
    if five:
        best = max(five, key=lambda c: statistics.fmean(c["ff_kernels"]))
        m = statistics.fmean(best["ff_kernels"])
        lines.append(f"- Best preset >= 0.85 on Fashion-MNIST after 5 epochs: {best['preset']} "
                     f"({best['method']}) {m:.4f} (seeds {', '.join(f'{a:.4f}' for a in best['ff_kernels'])}): "
                     f"{'met' if m >= 0.85 else 'NOT met'}.")
    finals = {}
    for r in full_rows:
        key = (r["impl"], r["preset"], r["variant"])
        if r["epochs"] == r.get("run_epochs", r["epochs"]):
            finals[key] = r
    mlp = next((r for k, r in finals.items() if k[0] == "backprop"), None)
    for (impl, preset, variant), r in sorted(finals.items()):
        if impl != "ff_kernels":
            continue
        acc = max(r["accuracy"].values())
        method = max(r["accuracy"], key=r["accuracy"].get)
        line = (f"- Full length ({r['epochs']} epochs, {preset} {variant[len('full'):].strip() or ''}"
                f"{method}): {acc:.4f}, bar 0.89 {'met' if acc >= 0.89 else 'NOT met'}")
        if mlp:
            b = mlp["accuracy"]["backprop"]
            line += f"; backprop MLP {b:.4f}, gap {b - acc:+.4f} ({'within' if b - acc <= 0.01 else 'NOT within'} a point)"
        lines.append(line + ".")
    return "\n".join(lines)


def report(log_path, stem):
    records = read_log(log_path)
    rows = summarize(records)
    timings = [r for r in records if r.get("variant") == "timing"]
    subnormal_recs = [r for r in records if r.get("variant") == "subnormals"]
    full_rows = sorted((r for r in records if r.get("variant", "").startswith("full")),
                       key=lambda r: (r["impl"], r["preset"], r["variant"], r["epochs"]))
    with open(stem + ".json", "w") as f:
        json.dump({"generated": time.strftime("%Y-%m-%d %H:%M:%S"), "comparison": comparison(rows),
                   "groups": rows, "timing": timings, "subnormals": subnormal_recs, "full": full_rows,
                   "runs": [r for r in records if r.get("variant", "default") == "default"]}, f, indent=1)
    table = bars(comparison(rows), full_rows) + "\n\n" + markdown(rows, timings, subnormal_recs, full_rows)
    with open(stem + ".md", "w") as f:
        f.write("# Learning results on the 2-core CPU (generated by `python -m bench.learning_table --report`)\n\n")
        f.write(HEADER + "\n\n" + table + "\n")
    print(table)


HEADER = """Setup: torch 2.13.0 CPU, backend `torch`, 2-core AMD EPYC (KVM) shared with other jobs (load
average 4-11 during the runs: every run is single-threaded, `torch.set_num_threads(1)`; the
s/epoch column comes from the alternating-rounds timing below, not from the accuracy runs).
Data: scikit-learn digits (1347 train / 450 test, stratified split seed 0), Fashion-MNIST (60000 /
10000, /usr/share/datasets/fashion-mnist). Every implementation gets the same tensors (images in
[0, 1]), the same sizes, epochs, batch and seed values (each draws its own random numbers).
ff_kernels: `ff_kernels.train.build_net(preset, ...)` + `FFNet.train_epoch`; independent: tests/support
(never imports ff_kernels); backprop: an MLP of the same sizes, Adam lr 1e-3, cross-entropy."""


def timing(datasets, rounds, images, threads, log_path):
    """Seconds per epoch of every implementation, measured in alternating rounds (each round times one
    short epoch of ``images`` training images per implementation, in turn) so that a busy machine
    slows all alike; the median over rounds, scaled to the full training set, is the table's s/epoch."""
    torch.set_num_threads(threads)
    impls = [(i, p) for p in PRESETS for i in ("ff_kernels", "independent")] + [("backprop", "mlp")]
    for ds in datasets:
        hidden, batch, _ = SETUPS[ds]
        x_tr, y_tr, x_te, y_te = load(ds)
        n = min(images, len(x_tr))
        sub = (x_tr[:n], y_tr[:n], x_te[:200], y_te[:200])
        samples = {key: [] for key in impls}
        loads = []
        for r in range(rounds):
            for impl, preset in impls:
                if impl == "ff_kernels":
                    out = run_ffk(preset, sub, hidden, 1, batch, r, readout_beside=False)[1]
                else:
                    out = run_independent(preset, sub, hidden, 1, batch, r)[1]
                samples[(impl, preset)].append(out["seconds_per_epoch"] * len(x_tr) / n)
                loads.append(os.getloadavg()[0])
        for (impl, preset), secs in samples.items():
            rec = {"dataset": ds, "impl": impl, "preset": preset, "variant": "timing", "sizes": hidden,
                   "batch": batch, "threads": threads, "images_per_round": n, "rounds": rounds,
                   "seconds_per_epoch_rounds": [round(v, 2) for v in secs],
                   "seconds_per_epoch": round(statistics.median(secs), 2),
                   "load_average_during": [round(min(loads), 2), round(max(loads), 2)],
                   "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__}
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)


def subnormals(presets, checkpoints, steps_between, pairs, log_path):
    """Where subnormal floats appear in real training and whether they cost time on this CPU: train
    each preset on Fashion-MNIST (784-500-500, batch 128, 1 thread); at each checkpoint count the
    subnormal values of the loss gradient dL/dg (the per-row coefficient) and of every buffer and
    optimiser state, then time the next 10 steps from copies of the same state with flush-to-zero
    off and on, in alternating pairs (torch.set_flush_denormal is restored to off after each)."""
    import copy

    from ff_kernels import reference

    torch.set_num_threads(1)
    tiny = torch.finfo(torch.float32).tiny

    def count(t):
        t = t.float()
        return int(((t != 0) & (t.abs() < tiny)).sum())

    seen = {"dg": 0, "dg_total": 0}
    real = reference.loss_and_goodness_grad

    def spy(g, n_pos, config, threshold):
        loss, dg = real(g, n_pos, config, threshold)
        seen["dg"] += count(dg)
        seen["dg_total"] += dg.numel()
        return loss, dg

    reference.loss_and_goodness_grad = spy
    x_tr, y_tr, _, _ = load("fashion")
    batch = 128

    def batch_at(i):
        idx = torch.arange(i * batch, (i + 1) * batch) % len(x_tr)
        return x_tr[idx], y_tr[idx]

    try:
        for preset in presets:
            torch.manual_seed(0)
            net = build_net(preset, [784, 500, 500], 5)
            gen = torch.Generator().manual_seed(0)
            net.start_epoch()
            step = 0
            for _ in range(checkpoints):
                seen.update(dg=0, dg_total=0)
                for _ in range(steps_between):
                    net.train_labels(*batch_at(step), gen)
                    step += 1
                states = {name: count(buf) for name, buf in net.named_buffers()}
                for i, opt in enumerate(net.optimizers or []):
                    for j, st in enumerate(opt.state.values()):
                        for key in ("exp_avg", "exp_avg_sq"):
                            states[f"adam{i}.{j}.{key}"] = count(st[key])
                times = {False: [], True: []}
                for rep in range(pairs):
                    for ftz in (False, True):
                        clone, g2 = copy.deepcopy(net), torch.Generator().manual_seed(rep)
                        torch.set_flush_denormal(ftz)
                        try:
                            start = time.perf_counter()
                            for k in range(10):
                                clone.train_labels(*batch_at(step + k), g2)
                            times[ftz].append(time.perf_counter() - start)
                        finally:
                            torch.set_flush_denormal(False)
                rec = {"variant": "subnormals", "dataset": "fashion", "preset": preset, "step": step,
                       "dg_subnormal": seen["dg"], "dg_total": seen["dg_total"],
                       "state_subnormal": {k: v for k, v in states.items() if v},
                       "ten_steps_ftz_off": [round(v, 3) for v in times[False]],
                       "ten_steps_ftz_on": [round(v, 3) for v in times[True]],
                       "ratio_off_on": round(statistics.median(times[False]) / statistics.median(times[True]), 3),
                       "load_average": round(os.getloadavg()[0], 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(json.dumps(rec), flush=True)
    finally:
        reference.loss_and_goodness_grad = real


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.learning_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("digits", "fashion", "all"), default="all")
    p.add_argument("--only", help="comma-separated impl:preset, e.g. ffk:hinton,ind:hinton,bp:mlp")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=None, help="override the table's epochs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log", default=LOG)
    p.add_argument("--variant", default="default",
                   help="a label for runs with --extra (kept apart from the table's)")
    p.add_argument("--extra", default="{}", help="JSON of build_net overrides for ff_kernels runs, "
                                                  "e.g. '{\"negatives\": \"hard\", \"jitter\": 2}'")
    p.add_argument("--report", action="store_true", help="only rebuild the tables from the log")
    p.add_argument("--timing", action="store_true",
                   help="only measure seconds per epoch, alternating implementations round by round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timing-images", type=int, default=6400)
    p.add_argument("--full", action="store_true",
                   help="the longer runs (FULL): --only defaults to ffk:hinton,bp:mlp, --seeds to 0")
    p.add_argument("--subnormals", action="store_true",
                   help="only measure where subnormals appear and what flush-to-zero changes")
    args = p.parse_args(argv)
    if args.report:
        report(args.log, STEM)
        return
    datasets = ["digits", "fashion"] if args.dataset == "all" else [args.dataset]
    if args.timing:
        timing(datasets, args.rounds, args.timing_images, args.threads, args.log)
        return
    if args.subnormals:
        subnormals(PRESETS, checkpoints=3, steps_between=150, pairs=3, log_path=args.log)
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.full:
        only = [item.split(":") for item in (args.only or "ffk:hinton,bp:mlp").split(",")]
        short = {"ffk": "ff_kernels", "ind": "independent", "bp": "backprop"}
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds != "0,1,2" else [0]
        runs = [(ds, short.get(i, i), p_, *FULL[ds][:2], FULL[ds][2], seed, FULL[ds][3])
                for ds in datasets if ds in FULL for seed in seeds for i, p_ in only]
        runs = [(ds, impl, pr, hidden, batch_or_epochs, *rest) for ds, impl, pr, hidden, batch_or_epochs, *rest in runs]
        runs = [(ds, impl, pr, hidden, epochs, batch, seed, evals)
                for ds, impl, pr, hidden, batch, epochs, seed, evals in runs]
        extra = json.loads(args.extra)
        variant = "full" + "".join(f" {k}={v}" for k, v in sorted(extra.items()))
        execute(runs, args.log, args.threads, variant, extra)
        return
    runs = planned_runs(datasets, args.only, seeds, args.epochs)
    execute(runs, args.log, args.threads, args.variant, json.loads(args.extra))


if __name__ == "__main__":
    main()
