"""A whole FFNet step as PyTorch's compilers see it: torch.compile(fullgraph=True) on any device, and
FFNet.compile_step (one CUDA graph) on a GPU."""

import pytest
import torch

from ff_kernels.nn import FFNet

SIZES = [30, 20, 16]
NO_CUDA = "CUDA graphs need a CUDA device; this machine has none"


def _twin_nets(preset: str, device="cpu"):
    torch.manual_seed(0)
    a = getattr(FFNet, preset)(SIZES, epochs=4, device=device)
    b = getattr(FFNet, preset)(SIZES, epochs=4, device=device)
    b.load_state_dict(a.state_dict())
    return a, b


def _assert_same_state(a: FFNet, b: FFNet, rtol: float, atol: float):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, sb[key], rtol=rtol, atol=atol, msg=key)


@pytest.mark.parametrize("preset", ["hinton", "loewex"])
def test_train_step_compiles_fullgraph_and_matches_eager(preset):
    eager, compiled = _twin_nets(preset)
    step = torch.compile(compiled.train_step, fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # the first step creates the momentum buffers; the later ones use them
        x_pos, x_neg = torch.randn(8, SIZES[0], generator=gen), torch.randn(8, SIZES[0], generator=gen)
        out_e, out_c = eager.train_step(x_pos, x_neg), step(x_pos, x_neg)
        for oe, oc in zip(out_e, out_c):
            torch.testing.assert_close(oc.loss, oe.loss, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(oc.y, oe.y, rtol=1e-5, atol=1e-6)
    _assert_same_state(eager, compiled, rtol=1e-5, atol=1e-6)


def test_compile_step_on_cpu_is_a_one_line_error():
    net = FFNet.hinton(SIZES, epochs=2)
    x = torch.randn(4, SIZES[0])
    with pytest.raises(ValueError, match="x_pos_like"):
        net.compile_step(x, x)


def test_compile_step_rejects_an_optimizer_net():
    net = FFNet.pytorch_recipe(SIZES)
    x = torch.randn(4, SIZES[0])
    with pytest.raises(ValueError):
        net.compile_step(x, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("preset", ["hinton", "loewex"])
def test_captured_step_replays_like_eager_without_host_sync(preset):
    eager, captured = _twin_nets(preset, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(1)
    batches = [(torch.randn(16, SIZES[0], device="cuda", generator=gen),
                torch.randn(16, SIZES[0], device="cuda", generator=gen)) for _ in range(6)]
    step = captured.compile_step(*batches[0])
    _assert_same_state(eager, captured, rtol=0, atol=0)  # the capture's warm-up steps were undone
    step(*batches[0])  # captures
    eager.train_step(*batches[0])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x_pos, x_neg in batches[1:]:
            outs = step(x_pos, x_neg)
            eager_outs = eager.train_step(x_pos, x_neg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for oc, oe in zip(outs, eager_outs):
        torch.testing.assert_close(oc.loss, oe.loss, rtol=1e-4, atol=1e-5)
    _assert_same_state(eager, captured, rtol=1e-4, atol=1e-5)
    captured.start_epoch(), eager.start_epoch()  # a new lr gain: the next call re-captures
    for x_pos, x_neg in batches[:2]:
        step(x_pos, x_neg), eager.train_step(x_pos, x_neg)
    _assert_same_state(eager, captured, rtol=1e-4, atol=1e-5)


def _forbid_host_reads(monkeypatch):
    """Any read of a tensor's value on the host (what would wait for a GPU) fails the test."""
    def forbidden(*args, **kwargs):
        raise AssertionError("host read inside an epoch")

    for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)


@pytest.mark.parametrize("preset, negatives", [("hinton", "hard"), ("loewex", "uniform"),
                                               (None, "hard")])
def test_a_whole_epoch_reads_nothing_back_to_the_host(monkeypatch, preset, negatives):
    """The main job's epoch (shuffle, jitter, negatives, readout, every layer) stays on the device:
    on a GPU nothing inside it may wait for a value (no .item(), .tolist(), bool() of a tensor).
    None: the fused SGD without a readout, hard negatives from per-epoch goodness scores."""
    sizes = [64, 12, 10]
    net = FFNet(sizes, negatives=negatives) if preset is None else \
        getattr(FFNet, preset)(sizes, negatives=negatives, epochs=3)
    x, y = torch.rand(40, 64), torch.randint(0, 10, (40,))
    gen = torch.Generator().manual_seed(0)

    _forbid_host_reads(monkeypatch)
    stats = net.train_epoch(x, y, batch_size=16, generator=gen, jitter=2)
    monkeypatch.undo()
    assert stats["loss"].shape == (2,) and stats["nonfinite_steps"].tolist() == [0, 0]


def test_an_unsupervised_epoch_reads_nothing_back_to_the_host(monkeypatch):
    """Hybrid negatives, partners, jitter, layers and readout: all on the device within the epoch."""
    net = FFNet.hinton([64, 12, 10, 10], epochs=3, unsupervised=True)
    x, y = torch.rand(40, 64), torch.randint(0, 10, (40,))
    gen = torch.Generator().manual_seed(0)

    _forbid_host_reads(monkeypatch)
    stats = net.train_unsupervised_epoch(x, y, batch_size=16, generator=gen, jitter=1)
    monkeypatch.undo()
    assert stats["loss"].shape == (3,) and stats["readout_loss"] is not None
