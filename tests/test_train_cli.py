"""The training CLI: every mistake is a one-line argparse error (exit code 2) naming the argument, never
a traceback; a short run reports per-epoch loss, test accuracy and live units in its JSON line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ff_kernels import train
from tests.test_data import _write_idx


def _fake_idx(path, n_train=40, n_test=12, shape=(4, 4)):
    rng = np.random.default_rng(0)
    for name, dims in (("train-images-idx3-ubyte", (n_train, *shape)), ("train-labels-idx1-ubyte", (n_train,)),
                       ("t10k-images-idx3-ubyte", (n_test, *shape)), ("t10k-labels-idx1-ubyte", (n_test,))):
        high = 10 if "labels" in name else 256
        _write_idx(path / f"{name}.gz", rng.integers(0, high, dims), gz=True)
    return str(path)


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        train.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


BAD = [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-3"], "--batch-size"),
    (["--batch-size", "x"], "--batch-size"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "-1"], "--epochs"),
    (["--sizes", "abc"], "--sizes"),
    (["--sizes", "500,0"], "--sizes"),
    (["--sizes", ""], "--sizes"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--seed", "-1"], "--seed"),
    (["--threads", "0"], "--threads"),
    (["--jitter", "-2"], "--jitter"),
    (["--preset", "nope"], "--preset"),
    (["--negatives", "some"], "--negatives"),
    (["--predict", "votes"], "--predict"),
    (["--dataset", "cifar"], "--dataset"),
    (["--device", "notadevice"], "--device"),
    (["--backend", "bogus"], "--backend"),
    (["--dataset", "idx"], "--data-dir"),
    (["--data-dir", "/tmp"], "--data-dir"),
    (["--no-such-flag"], "unrecognized"),
]


@pytest.mark.parametrize("argv,name", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_mistakes_are_one_line_errors_naming_the_argument(capsys, argv, name):
    line = _error(capsys, argv)
    assert name in line and "error:" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda(capsys):
    line = _error(capsys, ["--device", "cuda"])
    assert "--device" in line and "CUDA" in line


def test_cuda_backend_without_extension_or_device(capsys):
    if "cuda" in __import__("ff_kernels").available_backends():
        pytest.skip("the cuda backend runs here")
    line = _error(capsys, ["--backend", "cuda"])
    assert "--backend" in line and "not available" in line


def test_data_dir_missing_or_incomplete(capsys, tmp_path):
    line = _error(capsys, ["--dataset", "idx", "--data-dir", str(tmp_path / "missing")])
    assert "--data-dir" in line and "does not exist" in line
    line = _error(capsys, ["--dataset", "idx", "--data-dir", str(tmp_path)])
    assert "--data-dir" in line and "train-images-idx3-ubyte" in line
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00")
    line = _error(capsys, ["--dataset", "idx", "--data-dir", str(tmp_path)])
    assert "--data-dir" in line


def test_jitter_needs_square_images(capsys, tmp_path):
    data = _fake_idx(tmp_path, shape=(4, 5))
    line = _error(capsys, ["--dataset", "idx", "--data-dir", data, "--jitter", "--no-progress"])
    assert "--jitter" in line and "square" in line


def test_no_traceback_in_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "ff_kernels.train", "--batch-size", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "--batch-size" in proc.stderr


def test_short_run_reports_per_epoch_loss_accuracy_and_live_units(capsys):
    threads = torch.get_num_threads()
    result = train.main(["--epochs", "2", "--sizes", "32,32", "--preset", "hinton", "--predict", "readout",
                         "--negatives", "hard", "--threads", "1", "--no-progress"])
    assert torch.get_num_threads() == threads and result["config"]["threads"] == 1
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1]) == result
    assert {"test_accuracy", "train_seconds", "samples_per_second", "seconds_per_epoch", "history",
            "layer_losses", "live_units", "backend", "device", "config",
            "test_accuracy_by_method"} <= set(result)
    assert result["backend"] == "torch" and result["device"] == "cpu"
    assert len(result["history"]) == 2 and err.count("live units per layer") == 2
    for record in result["history"]:
        assert len(record["loss"]) == 2 and len(record["live_units"]) == 2
        assert set(record["test_accuracy_by_method"]) == {"goodness", "readout"}
    cfg = result["config"]
    assert (cfg["preset"], cfg["predict"], cfg["negatives"], cfg["sizes"]) == ("hinton", "readout", "hard", [64, 32, 32])
    assert result["test_accuracy"] == result["test_accuracy_by_method"]["readout"]


def test_recipe_with_readout_jitter_and_uniform_negatives(capsys):
    result = train.main(["--epochs", "1", "--sizes", "16", "--preset", "recipe", "--predict", "readout",
                         "--jitter", "1", "--batch-size", "256", "--no-progress"])
    cfg = result["config"]
    assert (cfg["predict"], cfg["negatives"], cfg["jitter"], cfg["optimizer"]) == ("readout", "uniform", 1, "adam")


def test_idx_files_end_to_end(tmp_path, capsys):
    """--dataset idx on a tiny synthetic IDX directory (gzipped)."""
    data = _fake_idx(tmp_path)
    result = train.main(["--dataset", "idx", "--data-dir", data, "--epochs", "2", "--sizes", "8",
                         "--jitter", "--no-progress"])
    assert result["config"]["preset"] == train.DEFAULT_PRESET["idx"] and result["config"]["sizes"] == [16, 8]
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["samples_per_second"] > 0


def test_nonfinite_training_stops_with_one_line_and_skips_the_poisoned_updates(capsys):
    """lr 1e30 overflows the activations: the run stops after the epoch (exit 1) with a message
    naming the cause, and the flagged steps applied no update."""
    with pytest.raises(SystemExit) as info:
        train.main(["--preset", "recipe", "--lr", "1e30", "--epochs", "3", "--sizes", "16",
                    "--no-progress"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "stopped after epoch 1: NaN/inf" in err.strip().splitlines()[-1]


def test_a_nonfinite_batch_changes_no_weight():
    net = train.build_net("hinton", [16, 12, 8], 2)
    before = {k: v.clone() for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}
    x = torch.rand(6, 16)
    x[2, 3] = float("nan")
    outs = net.train_step(x, torch.rand(6, 16))
    assert all(bool(o.nonfinite) for o in outs)
    for key, value in net.state_dict().items():
        if key in before and "momentum" not in key:
            assert torch.equal(value, before[key]), key
