"""The main job: train an FFNet with the fused ops on real data, report test accuracy and speed.

    python -m ff_kernels.train                       # scikit-learn's digits, ships offline
    python -m ff_kernels.train --dataset idx --data-dir /usr/share/datasets/fashion-mnist
    python -m ff_kernels.train --preset hinton --negatives hard --predict readout --jitter
    python -m ff_kernels.train --mode unsupervised --sizes 256,256,256   # the paper's unsupervised FF

Presets (FFNet one-liners, see ff_kernels/nn.py): recipe (the popular PyTorch recipe), hinton
(Hinton's released code), loewex (loeweX/Forward-Forward).
Every epoch prints the per-layer loss, the test accuracy and the fraction of live units per layer;
the run ends with one JSON line: test_accuracy, train_seconds, samples_per_second, seconds_per_epoch,
history (per epoch), layer_losses, live_units, backend, device, config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from typing import Callable, Optional

import torch
from tqdm import tqdm

from . import distributed
from .backends import select_backend
from .data import hybrid_blurs, load_digits_split, load_idx_dir
from .nn import FFNet


@dataclasses.dataclass(frozen=True)
class Preset:
    """How to build the net (``build(sizes, epochs, **overrides)``) and its default batch size."""

    build: Callable[..., FFNet]
    batch_size: int
    description: str
    has_readout: bool = False


PRESETS = {
    "recipe": Preset(lambda sizes, epochs, **kw: FFNet.pytorch_recipe(sizes, **kw), 128,
                     "the popular PyTorch recipe: mean goodness, theta 2, l2 norm, Adam lr 0.03"),
    "hinton": Preset(lambda sizes, epochs, **kw: FFNet.hinton(sizes, epochs=epochs, **kw), 100,
                     "Hinton's code: sum goodness, threshold N, rms norm, peer norm, smoothed SGD, "
                     "hard negatives from the softmax readout", has_readout=True),
    "loewex": Preset(lambda sizes, epochs, **kw: FFNet.loewex(sizes, epochs=epochs, **kw), 100,
                     "loeweX/Forward-Forward: sum goodness, threshold N, rms norm, peer loss, SGD, "
                     "linear classifier", has_readout=True),
}
# The best preset measured (bench/results/2026-11-27-learning-cpu.md), per data set.
DEFAULT_PRESET = {"digits": "hinton", "idx": "hinton"}
DEFAULT_SIZES = {"digits": [256, 256], "idx": [500, 500]}
DEFAULT_EPOCHS = {"digits": 60, "idx": 5}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) and exit with code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_at_least(low: int, what: str):
    """An argparse type: an integer >= low, else a one-line error saying what was expected."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "an integer >= 0")


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def _sizes(text):
    parts = [p.strip() for p in text.split(",")]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = None
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"must be comma-separated positive layer widths such as "
                                         f"500,500, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m ff_kernels.train", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("digits", "idx"), default="digits",
                   help="digits: scikit-learn's bundled 8x8 digits; idx: MNIST-format files in --data-dir")
    p.add_argument("--data-dir", help="directory holding the four (Fashion-)MNIST IDX files, raw or .gz")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help=f"hyper-parameters; default {DEFAULT_PRESET['digits']!r} (the best measured)")
    p.add_argument("--sizes", type=_sizes, default=None,
                   help="comma-separated hidden widths (the input width is the data's); default "
                        "256,256 for digits, 500,500 for idx")
    p.add_argument("--epochs", type=_positive_int, default=None, help="default 60 for digits, 5 for idx")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="images per step (positives; as many negatives); default: the preset's")
    p.add_argument("--lr", type=_positive_float, default=None, help="override the preset's learning rate")
    p.add_argument("--negatives", choices=("uniform", "hard"), default=None,
                   help="wrong labels drawn uniformly, or in proportion to the net's own predicted "
                        "probability (hard); default: the preset's")
    p.add_argument("--predict", choices=("goodness", "readout"), default=None,
                   help="prediction by total goodness (C passes) or by a linear softmax readout "
                        "(one pass); default: the preset's")
    p.add_argument("--jitter", type=_nonnegative_int, nargs="?", const=2, default=0, metavar="PIXELS",
                   help="shift every training image by up to PIXELS (default 2) in each direction")
    p.add_argument("--mode", choices=("supervised", "unsupervised"), default="supervised",
                   help="supervised: the label embedded in the input, wrong labels as negatives; "
                        "unsupervised (the FF paper's first experiment): the layers learn real images "
                        "against hybrid images and never see a label, a linear softmax readout on the "
                        "layers above the first classifies")
    p.add_argument("--blurs", type=_positive_int, default=None,
                   help="--mode unsupervised: blurs of the hybrid mask; default round(6 * side / 28), "
                        "at least 1 (6 for 28x28, 2 for 8x8)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", help="auto | torch | triton | cuda")
    p.add_argument("--seed", type=_nonnegative_int, default=0)
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU intra-op threads (default: torch's). On a machine shared with other jobs 1 "
                        "is often much faster: measured 8x at load 8.5 on 2 cores, where two OpenMP "
                        "threads wait on each other at every op")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def parse_args(argv=None, parser: Optional[argparse.ArgumentParser] = None):
    """Parse and check every argument; any mistake is a one-line error (exit code 2)."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as e:
        parser.error(f"argument --device: {args.device!r} is not a device ({e})")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"argument --device: {args.device!r} needs CUDA, which this machine does not have "
                         f"(torch {torch.__version__}, no CUDA device visible)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"argument --device: {args.device!r}: only {torch.cuda.device_count()} CUDA "
                         f"device(s) visible")
    elif device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except Exception as e:  # noqa: BLE001 - any failure to allocate there is the user's device
            parser.error(f"argument --device: cannot use {args.device!r}: {str(e).splitlines()[0]}")
    args.device = device
    try:
        select_backend(args.backend, device, torch.float32)
    except (ValueError, TypeError) as e:
        parser.error(f"argument --backend: {e}")
    if args.dataset == "idx" and not args.data_dir:
        parser.error("argument --data-dir: --dataset idx needs --data-dir DIR with the (Fashion-)MNIST "
                     "IDX files")
    if args.dataset == "digits" and args.data_dir:
        parser.error("argument --data-dir: only --dataset idx reads a data directory")
    if args.mode == "unsupervised":
        if args.predict == "goodness":
            parser.error("argument --predict: goodness prediction needs the label in the input; "
                         "--mode unsupervised classifies with its readout only")
        if args.negatives is not None:
            parser.error("argument --negatives: wrong labels make no sense in --mode unsupervised "
                         "(its negatives are hybrid images)")
    elif args.blurs is not None:
        parser.error("argument --blurs: only --mode unsupervised makes hybrid images")
    return args


def load_data(args, parser: Optional[argparse.ArgumentParser] = None):
    if args.dataset == "digits":
        return load_digits_split(seed=args.seed), 10
    try:
        return load_idx_dir(args.data_dir), 10
    except (OSError, ValueError) as e:
        (parser or build_parser()).error(f"argument --data-dir: {e}")


def accuracy(net: FFNet, x, y, method: Optional[str] = None, batch: int = 2048) -> float:
    correct = sum((net.predict(x[i:i + batch], method=method) == y[i:i + batch]).sum()
                  for i in range(0, len(x), batch))
    return float(correct) / len(x)


def build_net(preset: str, sizes, epochs: int, *, lr=None, negatives=None, predict=None,
              backend="auto", device=None, unsupervised: bool = False) -> FFNet:
    """The preset's FFNet for ``sizes`` (input width first) and ``epochs``, with the CLI's overrides.
    ``unsupervised``: the FF paper's unsupervised net (plain images in, readout prediction)."""
    kw = {"backend": backend, "device": device}
    if unsupervised:
        kw["unsupervised"], predict = True, "readout"
    if lr is not None:
        kw["lr"] = lr
    if negatives is not None:
        kw["negatives"] = negatives
    if predict is not None:
        kw["predict"] = predict
    if predict == "readout" and not PRESETS[preset].has_readout:
        kw["readout"] = True  # the package's default readout
    return PRESETS[preset].build(sizes, epochs, **kw)


def main(argv=None) -> dict:
    parser = build_parser()
    args = parse_args(argv, parser)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, parser)
    finally:
        torch.set_num_threads(threads)  # main() also runs in-process (tests, notebooks)
        distributed.shutdown()  # the process group a torchrun launch made, if any


def _run(args, parser) -> dict:
    torch.manual_seed(args.seed)
    # under torchrun: one process per rank, each stepping its shard of every global batch
    rank, world_size, device = distributed.init_from_env(args.device)
    (x_tr, y_tr, x_te, y_te), num_classes = load_data(args, parser)
    x_tr, y_tr, x_te, y_te = (t.to(device) for t in (x_tr, y_tr, x_te, y_te))
    if args.jitter or args.mode == "unsupervised":
        side = int(round(x_tr.shape[1] ** 0.5))
        if side * side != x_tr.shape[1]:
            name = "--jitter" if args.jitter else "--mode"
            parser.error(f"argument {name}: images of {x_tr.shape[1]} pixels are not square")

    args.preset = args.preset or DEFAULT_PRESET[args.dataset]
    preset = PRESETS[args.preset]
    hidden = args.sizes or DEFAULT_SIZES[args.dataset]
    args.epochs = args.epochs or DEFAULT_EPOCHS[args.dataset]
    args.batch_size = args.batch_size or preset.batch_size
    net = build_net(args.preset, [x_tr.shape[1], *hidden], args.epochs, lr=args.lr, negatives=args.negatives,
                    predict=args.predict, backend=args.backend, device=device,
                    unsupervised=args.mode == "unsupervised")
    backend = select_backend(args.backend, device, x_tr.dtype).name
    gen = torch.Generator(device=device).manual_seed(args.seed)
    methods = ["goodness", "readout"] if net.readout is not None else ["goodness"]
    if world_size > 1 and net.unsupervised:
        parser.error("argument --mode: unsupervised training does not run data-parallel (torchrun) yet")
    trainer = distributed.DataParallelFF(net) if world_size > 1 else net
    if net.unsupervised:
        methods = ["readout"]  # no label in the input: nothing for goodness to compare

    history, train_seconds, seen = [], 0.0, 0
    bar = tqdm(range(args.epochs), desc="epochs", disable=args.no_progress or rank > 0, file=sys.stderr)
    for epoch in bar:
        start = time.perf_counter()
        if net.unsupervised:  # labels reach the readout only (detached features)
            stats = net.train_unsupervised_epoch(x_tr, y_tr, args.batch_size, gen, blurs=args.blurs,
                                                 jitter=args.jitter)
        else:
            stats = trainer.train_epoch(x_tr, y_tr, args.batch_size, gen, jitter=args.jitter)
        losses = stats["loss"].tolist()  # one host sync per epoch
        nonfinite = stats["nonfinite_steps"].tolist()
        readout_loss = None if stats["readout_loss"] is None else float(stats["readout_loss"])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        train_seconds += seconds
        seen += len(x_tr)
        by_method = {m: trainer.accuracy(x_te, y_te, m) if world_size > 1 else accuracy(net, x_te, y_te, m)
                     for m in methods}  # evaluation: not training time
        live = net.live_fraction(x_te[:1000], y_te[:1000]).tolist()
        record = {"epoch": epoch + 1, "loss": [round(v, 5) for v in losses],
                  "readout_loss": None if readout_loss is None else round(readout_loss, 5),
                  "test_accuracy": by_method[net.predict_method],
                  "test_accuracy_by_method": by_method, "live_units": [round(v, 4) for v in live],
                  "seconds": round(seconds, 3), "lr_gain": round(net.current_lr_gain, 5)}
        history.append(record)
        msg = (f"epoch {epoch + 1}: loss per layer {record['loss']}, test accuracy "
               + ", ".join(f"{m} {a:.4f}" for m, a in by_method.items())
               + f", live units per layer {record['live_units']}, {seconds:.1f} s")
        if rank == 0:
            bar.write(msg) if not args.no_progress else print(msg, file=sys.stderr)
        if any(nonfinite):
            bar.close()
            message = (f"{parser.prog}: stopped after epoch {epoch + 1}: NaN/inf reached {nonfinite} "
                       f"steps per layer (their updates were skipped); lower --lr or check the data\n")
            parser.exit(1, message if rank == 0 else None)

    last = history[-1]
    result = {
        "test_accuracy": last["test_accuracy"],
        "test_accuracy_by_method": last["test_accuracy_by_method"],
        "train_seconds": round(train_seconds, 3),
        "seconds_per_epoch": round(train_seconds / args.epochs, 3),
        "samples_per_second": round(seen / train_seconds, 1),
        "layer_losses": last["loss"],
        "live_units": last["live_units"],
        "history": history,
        "backend": backend,
        "device": str(device),
        "world_size": world_size,
        "config": {"dataset": args.dataset, "preset": args.preset, "sizes": [x_tr.shape[1], *hidden],
                   "epochs": args.epochs, "batch_size": args.batch_size, "lr": net.lr,
                   "optimizer": "sgd" if net.optimizers is None else type(net.optimizers[0]).__name__.lower(),
                   "momentum": net.momentum, "dampening": net.dampening, "weight_decay": net.weight_decay,
                   "decoupled_weight_decay": net.decoupled_weight_decay, "lr_schedule": net.lr_schedule,
                   "negatives": "hybrid" if net.unsupervised else net.negatives,
                   "predict": net.predict_method, "jitter": args.jitter, "mode": args.mode,
                   "blurs": hybrid_blurs((side, side)) if net.unsupervised and not args.blurs else args.blurs,
                   "input_norm": net.input_norm, "seed": args.seed, "threads": torch.get_num_threads(),
                   **dataclasses.asdict(net.layers[0].config)},
    }
    if rank == 0:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
