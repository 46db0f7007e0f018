"""Distributed training on the CPU with gloo: data parallel and the layer pipeline against one process,
parameters identical on every rank, the CLI under torchrun, and one-line errors for bad input.

Each spawned test starts 2 or 3 processes (torch.multiprocessing, a file rendezvous in tmp_path); the
workers build the single-process reference themselves, so they compare locally and fail with an
assertion that the parent re-raises."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ff_kernels as ffk
from ff_kernels import train
from ff_kernels.distributed import DataParallelFF, PipelineFF, shard_range
from ff_kernels.nn import FFNet

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


# ------------------------------------------------------------------------------------------- spawning
def _spawn(worker, world_size: int, tmp_path, *args) -> None:
    # forkserver: one server process imports torch once (the preload); every worker is a fork of it,
    # so a test pays seconds of imports once, not per process (the machine may be a loaded 2-core one)
    mp.set_forkserver_preload(["torch", "tests.test_distributed"])
    mp.start_processes(_init_and_run, args=(world_size, str(tmp_path / "rendezvous"), worker, args),
                       nprocs=world_size, join=True, start_method="forkserver")


def _init_and_run(rank, world_size, rendezvous, worker, args):
    torch.set_num_threads(1)  # a shared 2-core machine: one thread per process
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        worker(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def _state(net) -> dict:
    return {k: v for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}


def _assert_same_state(net, reference, rtol, atol, what):
    got, want = _state(net), _state(reference)
    assert got.keys() == want.keys(), f"{what}: {sorted(got.keys() ^ want.keys())}"
    for key in want:
        assert torch.allclose(got[key].double(), want[key].double(), rtol=rtol, atol=atol), \
            f"{what}: {key} differs by {(got[key].double() - want[key].double()).abs().max().item():.3g}"


def _assert_identical_across_ranks(net, world_size, what):
    """Every rank's parameters and buffers, gathered: bit-identical to rank 0's."""
    flat = torch.cat([t.detach().double().flatten() for t in _state(net).values()])
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    for rank, other in enumerate(gathered):
        assert torch.equal(other, gathered[0]), f"{what}: rank {rank}'s parameters differ from rank 0's"


def _images(rows, k=16, num_classes=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(rows, k, generator=g, dtype=dtype),
            torch.randint(0, num_classes, (rows,), generator=g))


# ------------------------------------------------------------------------------------------- data parallel
def _data_parallel_worker(rank, world_size):
    sizes = [16, 12, 10]
    # 1. Hinton's preset (peer norm, smoothed SGD with decoupled decay, lr schedule, readout, hard
    # negatives drawn from the gathered readout logits, jitter), float64: two epochs of train_epoch
    # over 26 rows in batches of 7 (the last batch of 5 splits unevenly) against one process.
    torch.manual_seed(1)
    net = FFNet.hinton(sizes, epochs=2, num_classes=4, dtype=torch.float64)
    reference = copy.deepcopy(net)
    x, labels = _images(26)
    trainer = DataParallelFF(net)
    for epoch in range(2):
        stats = trainer.train_epoch(x, labels, 7, torch.Generator().manual_seed(epoch), jitter=1)
        want = reference.train_epoch(x, labels, 7, torch.Generator().manual_seed(epoch), jitter=1)
        _assert_identical_across_ranks(net, world_size, f"hinton epoch {epoch}")
        _assert_same_state(net, reference, 1e-9, 1e-12, f"hinton epoch {epoch}")
        assert torch.allclose(stats["loss"], want["loss"], rtol=1e-9)
        assert torch.allclose(stats["readout_loss"], want["readout_loss"], rtol=1e-9)
    for method in ("goodness", "readout"):
        want = float((reference.predict(x, method=method) == labels).double().mean())
        assert trainer.accuracy(x, labels, method, batch=4) == pytest.approx(want, abs=1e-12)

    # 2. loeweX's preset (loeweX peer term, PyTorch's momentum with coupled decay), float32, explicit
    # negative labels: train_labels on global batches, including one smaller than the world.
    torch.manual_seed(2)
    net = FFNet.loewex(sizes, epochs=4, num_classes=4)
    reference = copy.deepcopy(net)
    trainer = DataParallelFF(net)
    for step, rows in enumerate((9, 8, 2)):
        x, labels = _images(rows, seed=10 + step, dtype=torch.float32)
        negatives = (labels + 1 + torch.arange(rows) % 3) % 4
        out = trainer.train_labels(x, labels, negative_labels=negatives)
        want = reference.train_labels(x, labels, negative_labels=negatives)
        assert torch.allclose(torch.stack([o.loss for o in out.layers]),
                              torch.stack([o.loss for o in want.layers]), rtol=1e-5)
    _assert_identical_across_ranks(net, world_size, "loewex")
    _assert_same_state(net, reference, 1e-5, 1e-6, "loewex")

    # 3. train_step on shards of different sizes, positives and negatives in different proportions
    # per rank (the shares weight the loss's mean), with Adam (the recipe) and with SymBa.
    for name, build, dtype, tol in (
            ("recipe", lambda: FFNet.pytorch_recipe(sizes, num_classes=4), torch.float32, 1e-5),
            ("symba", lambda: FFNet(sizes, config=ffk.FFConfig(loss="symba", norm="rms"), momentum=0.9,
                                    weight_decay=0.01, dtype=torch.float64), torch.float64, 1e-9)):
        torch.manual_seed(3)
        net = build()
        reference = copy.deepcopy(net)
        trainer = DataParallelFF(net)
        for step in range(3):
            pos_rows = [3 + r + step for r in range(world_size)]
            neg_rows = pos_rows if name == "symba" else [2 + 2 * r for r in range(world_size)]
            g = torch.Generator().manual_seed(20 + step)
            x_pos = [torch.rand(n, 16, generator=g, dtype=dtype) for n in pos_rows]
            x_neg = [torch.rand(n, 16, generator=g, dtype=dtype) for n in neg_rows]
            out = trainer.train_step(x_pos[rank], x_neg[rank])
            want = reference.train_step(torch.cat(x_pos), torch.cat(x_neg))
            for got_layer, want_layer in zip(out, want):
                assert torch.allclose(got_layer.loss, want_layer.loss, rtol=tol)
        _assert_identical_across_ranks(net, world_size, name)
        _assert_same_state(net, reference, tol, tol, name)

    # 4. Hard negatives without a readout: the per-epoch goodness scores are computed in shards.
    torch.manual_seed(4)
    net = FFNet(sizes, num_classes=4, negatives="hard", dtype=torch.float64)
    reference = copy.deepcopy(net)
    x, labels = _images(20)
    DataParallelFF(net).train_epoch(x, labels, 6, torch.Generator().manual_seed(5))
    reference.train_epoch(x, labels, 6, torch.Generator().manual_seed(5))
    _assert_identical_across_ranks(net, world_size, "hard negatives from goodness")
    _assert_same_state(net, reference, 1e-9, 1e-12, "hard negatives from goodness")


@pytest.mark.parametrize("world_size", [2, 3])
def test_data_parallel_matches_one_process(tmp_path, world_size):
    _spawn(_data_parallel_worker, world_size, tmp_path)


# ------------------------------------------------------------------------------------------- pipeline
def _pipeline_worker(rank, world_size):
    sizes = [16, 12, 10, 8, 6]
    g = torch.Generator().manual_seed(7)
    micro_batches = [(torch.rand(p, 16, generator=g), torch.rand(n, 16, generator=g))
                     for p, n in ((5, 5), (3, 4), (6, 2), (4, 4))]
    splits = [None, [1, 3] if world_size == 2 else [2, 1, 1]]
    for split in splits:
        torch.manual_seed(8)  # the same initial net on every rank
        net = FFNet.hinton(sizes, epochs=2, num_classes=4)  # peer norm, smoothed SGD
        reference = copy.deepcopy(net)
        for x_pos, x_neg in micro_batches:
            reference.train_step(x_pos, x_neg)
        pipe = PipelineFF(net, layers_per_rank=split)
        for _ in range(2):  # two passes: momentum and peer means carry over
            results = pipe.train_step(micro_batches if rank == 0 else None)
        assert len(results) == len(micro_batches) and all(len(r) == len(pipe.owned) for r in results)
        for x_pos, x_neg in micro_batches:
            reference.train_step(x_pos, x_neg)
        # the same ops on the same values; only BLAS rounding differs (a received tensor is aligned
        # differently from the view of y it was sent from)
        for i in pipe.owned:
            _assert_same_state(net.layers[i], reference.layers[i], 1e-5, 1e-7, f"split {split}: layer {i}")
        pipe.sync_parameters()
        _assert_identical_across_ranks(net.layers, world_size, f"pipeline split {split}")
        _assert_same_state(net.layers, reference.layers, 1e-5, 1e-7, f"pipeline split {split}")

    # Bad input: one-line ValueErrors naming the argument; a first rank's rejected micro-batches stop
    # every rank (no rank is left waiting for rows)
    with pytest.raises(ValueError, match="micro_batches"):
        pipe.train_step([(torch.rand(3, 15), torch.rand(3, 15))] if rank == 0 else None)
    with pytest.raises(ValueError, match="layers_per_rank"):
        PipelineFF(FFNet(sizes), layers_per_rank=[4] + [0] * (world_size - 1))
    if world_size == 3:
        with pytest.raises(ValueError, match=r"world_size=3 exceeds the net's 2 layers"):
            PipelineFF(FFNet([16, 8, 6]))


@pytest.mark.parametrize("world_size", [2, 3])
def test_pipeline_matches_sequential_training(tmp_path, world_size):
    _spawn(_pipeline_worker, world_size, tmp_path)


# ------------------------------------------------------------------------------------------- in-process
def test_shard_range_covers_rows_in_order():
    for rows in (0, 1, 5, 7, 100):
        for world in (1, 2, 3, 8):
            ranges = [shard_range(rows, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard_range(5, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        shard_range(5, 0, 0)


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="a process group exists here")
def test_without_a_process_group_errors_name_the_need():
    net = FFNet([16, 8])
    for wrapper in (DataParallelFF, PipelineFF):
        with pytest.raises(ValueError, match="init_process_group"):
            wrapper(net)
    with pytest.raises(TypeError, match="net must be an ff_kernels.FFNet"):
        DataParallelFF(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------- torchrun CLI
def test_cli_under_torchrun_matches_one_process():
    argv = ["--epochs", "1", "--sizes", "16", "--batch-size", "50", "--no-progress", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "ff_kernels.train", *argv], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    json_lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(json_lines) == 1, proc.stdout  # only rank 0 reports
    result = json.loads(json_lines[0])
    assert result["world_size"] == 2
    single = train.main(argv)
    assert single["world_size"] == 1
    # the same shuffles, wrong labels and updates: the same accuracy (to a sample or two of rounding)
    assert abs(result["test_accuracy"] - single["test_accuracy"]) <= 0.005, (result["history"], single["history"])
    assert result["layer_losses"] == pytest.approx(single["layer_losses"], abs=1e-4)
