"""CPU check of the CUDA backend: csrc's kernels run in the CPU emulation of tests/cuda_emu.

CI has no GPU. Here the unmodified csrc sources and python_bindings/module.cpp are compiled by g++
against tests/cuda_emu's stub CUDA headers (session fixture, cached in build/cuda_emu/), and
ff_kernels.cuda_backend.layer_step / layer_forward are called directly on CPU tensors with that
module standing in for ff_kernels._C (function-scoped monkeypatch: nothing leaks into other tests;
the ops.py front door still refuses CPU tensors for backend="cuda", as it must). Every result is
compared with the float64 reference; every output starts as NaN (conftest's poison fixture), so an
element a kernel misses fails. Covered: every config and dtype, odd shapes, strided and misaligned
inputs, both weight-gradient finishes (epilogue, split + apply), every SGD rule, peer normalisation
(both forms and modes), NaN propagation, the non-finite flag (NaN/inf anywhere, -inf hidden by the
ReLU, q overflow) and skip_nonfinite in both modes, the loss at theta = 1e38, sgd_update (every
rule, dtype and skip), the cached per-stream workspace (no allocation beyond the outputs), fp16
range, the TF32 switch, launches and the plan.
tests/cuda_emu/README.md says what the emulation does not model: this is a check of the kernels'
logic, indexing, synchronisation and numerics, not a GPU run.

FF_KERNELS_REQUIRE_EMULATOR=1 (CI) turns the skip for a missing g++ (or pybind11) into a failure.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import os
import re
import struct
import types

import pytest
import torch

import ff_kernels as ffk
import ff_kernels.cuda_backend as cb
from ff_kernels import reference
from ff_kernels.backends import PeerNorm, SGDUpdate
from tests.cuda_emu import build as emu_build
from tests.utils import (ALL_CONFIGS, fp16_range_inputs, FEW_ROWS, TOLERANCE, assert_step_close, config_id,
                         float64_reference, gradient_term_norms, make_layer, rel_err,
                         rel_err_in_dtype)

REQUIRED = os.environ.get("FF_KERNELS_REQUIRE_EMULATOR") == "1"
STREAM = 0x5EED0  # the fake stream handle: every launch must receive it


# ================================================================ fixtures

@pytest.fixture(scope="session")
def emu_module():
    """(emulated _C module, ctypes handle of the same .so for the launch log and the emulator's
    self-test kernels). Built once per session, reused across sessions (build/cuda_emu/)."""
    cxx = emu_build.compiler()
    why = None
    if cxx is None:
        why = ("no C++ compiler (g++ not on PATH, or FF_EMU_CXX): the CPU emulation of the CUDA "
               "kernels needs one")
    elif importlib.util.find_spec("pybind11") is None:
        why = "pybind11 is not installed: the CPU emulation of the CUDA kernels builds the bindings"
    if why is not None:
        if REQUIRED:
            pytest.fail(f"FF_KERNELS_REQUIRE_EMULATOR=1 but {why}")
        pytest.skip(why)
    path = emu_build.build(cxx)  # a compile error is a failure, never a skip
    mod = emu_build.load(path)
    lib = ctypes.CDLL(str(path))  # the same loaded object (dlopen refcount): same launch log
    lib.ff_emu_launch_info.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                                       ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint64),
                                       ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
    lib.ff_emu_selftest.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int,
                                    ctypes.c_char_p, ctypes.c_int]
    return mod, lib


class Emu:
    """The emulated backend as one test sees it."""

    def __init__(self, mod, lib, monkeypatch):
        self.mod, self.lib, self._mp = mod, lib, monkeypatch

    def tf32(self, on: bool) -> None:
        """torch's own switch (the new API), which cuda_backend reads; the fixture restores it."""
        torch.backends.cuda.matmul.fp32_precision = "tf32" if on else "ieee"

    def sm_count(self, n: int) -> None:
        """SM count the launchers see (batch split, apply grid)."""
        self._mp.setenv("FF_EMU_SM_COUNT", str(n))

    def clear(self) -> None:
        self.lib.ff_emu_clear_launches()

    def launches(self) -> list:
        out = []
        for i in range(self.lib.ff_emu_launch_count()):
            name = ctypes.create_string_buffer(128)
            dims = (ctypes.c_uint * 6)()
            stream, device, ok = ctypes.c_uint64(), ctypes.c_int(), ctypes.c_int()
            assert self.lib.ff_emu_launch_info(i, name, 128, dims, ctypes.byref(stream),
                                               ctypes.byref(device), ctypes.byref(ok)) == 0
            out.append(types.SimpleNamespace(
                kernel=name.value.decode().split("<")[0], grid=tuple(dims[:3]), block=tuple(dims[3:]),
                stream=stream.value, device=device.value, ok=bool(ok.value)))
        return out

    def current_device(self) -> int:
        return self.lib.ff_emu_current_device()


@pytest.fixture
def emu(emu_module, monkeypatch):
    """Points cuda_backend at the emulated module and stubs the two torch.cuda queries it makes for
    CPU tensors (current stream, current device); all undone after the test, as is the TF32 switch."""
    mod, lib = emu_module
    monkeypatch.setattr(cb, "load_extension", lambda: (mod, ""))
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: types.SimpleNamespace(cuda_stream=STREAM))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    e = Emu(mod, lib, monkeypatch)
    old_precision = torch.backends.cuda.matmul.fp32_precision
    e.tf32(False)
    e.sm_count(132)  # H100 SXM
    monkeypatch.setenv("FF_EMU_WORKERS", "2")  # blocks run concurrently on any machine
    e.clear()
    yield e
    torch.backends.cuda.matmul.fp32_precision = old_precision


# ================================================================ helpers

DTYPES = [
    pytest.param((torch.float32, True), id="fp32-tf32"),
    pytest.param((torch.float32, False), id="fp32-ieee"),
    pytest.param((torch.float16, False), id="fp16"),
    pytest.param((torch.bfloat16, False), id="bf16"),
]


def _tol(dtype, tf32):
    return TOLERANCE["tf32"] if (dtype == torch.float32 and tf32) else TOLERANCE[dtype]


def _round_tf32(t):
    """t rounded to TF32 (10-bit mantissa, nearest, ties away: the kernels' cvt.rna.tf32.f32)."""
    i = t.contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def _layer(m_pos, m_neg, k, n, dtype, tf32, bias=True, seed=None):
    """make_layer, with x and W made TF32-representable when TF32 is on. Why: the forward GEMM then
    is exact against the float64 reference and only the gradient GEMM's operand rounding (of f_i y_ij,
    which the kernel rounds itself) remains. With raw fp32 inputs, every product carries a relative
    error up to 2^-11, and in tiny problems (K of a few elements, a handful of rows, cancelling
    signs) these do not average out: the norm-wise error then exceeds TOLERANCE["tf32"] by precision
    alone (3.8e-3 on 3+3x7->5 in the emulator, as on a GPU), which says nothing about the kernels.
    tests/test_cuda_backend.py does the same on the GPU."""
    x_pos, x_neg, w, b = make_layer(m_pos, m_neg, k, n, dtype=dtype, bias=bias, seed=seed)
    if dtype == torch.float32 and tf32:
        x_pos, x_neg, w = _round_tf32(x_pos), _round_tf32(x_neg), _round_tf32(w)
    return x_pos, x_neg, w, b


def _assert_finite_flag(out, value=False):
    """out.nonfinite: a 0-dim bool tensor with the given value."""
    assert out.nonfinite.dtype == torch.bool and out.nonfinite.shape == ()
    assert bool(out.nonfinite) == value


def _step_and_check(emu, m_pos, m_neg, k, n, dt, config, bias=True, seed=None, skip_nonfinite=False):
    """One gradient-mode step against the float64 reference (skip_nonfinite changes nothing when
    every value is finite)."""
    dtype, tf32 = dt
    emu.tf32(tf32)
    x_pos, x_neg, w, b = _layer(m_pos, m_neg, k, n, dtype, tf32, bias=bias, seed=seed)
    out = cb.layer_step(x_pos, x_neg, w, b, config, None, None, skip_nonfinite)
    ref, _, _ = float64_reference(x_pos, x_neg, w, b, config)
    _assert_finite_flag(out)
    assert out.y_pos.dtype == dtype and out.grad_weight.dtype == dtype
    assert (out.grad_bias is None) == (b is None)
    scales = (gradient_term_norms(x_pos, x_neg, w, b, config) if m_pos + m_neg <= FEW_ROWS
              else (None, None))
    assert_step_close(out, ref, _tol(dtype, tf32), f"{m_pos}+{m_neg}x{k}->{n} {dtype} tf32={tf32} "
           f"{config_id(config)}", scales)
    return out


# ================================================================ the module and the launches

def test_emulated_module_is_the_bindings(emu):
    assert emu.mod.version() == ffk.__version__
    assert emu.mod.compiled_archs() == "cpu-emulation"
    assert emu.mod.device_count() == (2, "")
    assert emu.mod.FF_MODE_UPDATE == 2 and hasattr(emu.mod, "FFLayerArgs")


FWD, FIN, PEER, WGRAD, APPLY = ("ff_forward_kernel", "ff_finalize_kernel", "ff_peer_kernel",
                                "ff_wgrad_kernel", "ff_apply_kernel")
MEMSET = "cudaMemsetAsync"  # logged by the emulator with grid (bytes, bytes >> 32, 1), block (0, 0, 0)


def _kernels(emu) -> list:
    """The kernel launches of the log, memsets left out."""
    return [r.kernel for r in emu.launches() if r.kernel != MEMSET]


def _hinton_peer(mean, config, n_pos):
    return PeerNorm(mean, config.peer_rho, config.peer_kappa(mean.shape[0], n_pos))


@pytest.mark.parametrize("case", ["unsplit", "split", "peer-unsplit", "peer-split"])
def test_launches_per_step(emu, case):
    """A step is a memset of the workspace (exactly the plan's size), then forward, finalise, (peer),
    weight gradient, and the apply kernel only when the batch is split over grid z; a forward is a
    memset and two launches. Every launch on the caller's stream and device; the count is what
    ff_layer_plan says."""
    split = case.endswith("-split") or case == "split"
    m_pos = 150 if split else 20  # > 256 rows in all: the batch splits on 132 SMs
    x_pos, x_neg, w, b = make_layer(m_pos, m_pos + 1, 10, 12, seed=0)
    config = ffk.FFConfig.hinton() if case.startswith("peer") else ffk.FFConfig()
    peer = _hinton_peer(torch.full((12,), 0.5), config, m_pos) if case.startswith("peer") else None
    cb.layer_step(x_pos, x_neg, w, b, config, None, peer)
    cb.layer_forward(x_pos, w, b, ffk.FFConfig())
    log = emu.launches()
    step = [MEMSET, FWD, FIN] + ([PEER] if peer is not None else []) + [WGRAD] + ([APPLY] if split else [])
    assert [r.kernel for r in log] == step + [MEMSET, FWD, FIN]
    assert (log[len(step) - 1 - split].grid[2] > 1) == split  # the wgrad launch's grid z
    for r in log:
        assert r.ok and r.block == ((0, 0, 0) if r.kernel == MEMSET else (256, 1, 1)), r
        assert r.stream == STREAM and r.device == 0, r  # the caller's stream and device, every launch
    a = cb._base_args(emu.mod, emu.mod.FF_MODE_GRADIENT, w, b, config, x_pos, x_neg)
    if peer is not None:
        a.peer_mean = peer.mean.data_ptr()
    plan = emu.mod.ff_layer_plan(a)
    assert plan.launches == len(step) - 1 and (plan.wgrad_splits > 1) == split
    assert log[0].grid == (4 * plan.workspace_floats, 0, 1)  # the memset covers the plan's workspace


def test_plan_scratch(emu):
    """The workspace is O(M + N) unless the batch is split (only when the output tiles leave SMs
    idle); split, it holds the N x K gradient."""
    n, k = 200, 70  # 2 output tiles
    x_pos, x_neg, w, b = make_layer(150, 151, k, n, seed=0)
    a = cb._base_args(emu.mod, emu.mod.FF_MODE_UPDATE, w, b, ffk.FFConfig(), x_pos, x_neg)
    a.sm_count = 1  # the 2 tiles fill it
    one = emu.mod.ff_layer_plan(a)
    assert one.wgrad_splits == 1 and one.launches == 3
    assert one.workspace_floats == 2 * 304 + 4  # q [m] and f [m] (each rounded to 4), bounds [4]
    a.sm_count = 132  # 2 chunks of at least 256 rows
    split = emu.mod.ff_layer_plan(a)
    assert split.wgrad_splits == 2 and split.launches == 4
    assert split.workspace_floats == one.workspace_floats + n + n * k  # + gb [n], gW [n k]


def test_device_switch_and_restore(emu, monkeypatch):
    """CPU tensors have no index: cuda_backend asks torch for the current device; the launcher
    switches to it for the launches and restores the caller's afterwards."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    x_pos, x_neg, w, b = make_layer(20, 20, 10, 12, seed=0)
    out = cb.layer_step(x_pos, x_neg, w, b, ffk.FFConfig(), None)
    assert {r.device for r in emu.launches()} == {1}
    assert emu.current_device() == 0
    ref, _, _ = float64_reference(x_pos, x_neg, w, b, ffk.FFConfig())
    assert_step_close(out, ref, TOLERANCE[torch.float32])


# ================================================================ the emulator's own promises

def _selftest(emu, name, n=64):
    out = (ctypes.c_int * n)()
    msg = ctypes.create_string_buffer(512)
    code = emu.lib.ff_emu_selftest(name.encode(), out, n, msg, 512)
    return code, msg.value.decode(), list(out)


@pytest.mark.parametrize("name, error", [
    ("divergent_barriers", r"cudaErrorLaunchFailure: divergent_barriers: deadlock: .* at __syncwarp"),
    ("wmma_misaligned", r"cudaErrorLaunchFailure: wmma_misaligned: wmma::load_matrix_sync: pointer "
                        r".* not 256-bit aligned"),
    ("tf32_unrounded", r"cudaErrorLaunchFailure: .*tf32 operand .* not rounded"),
    ("block_too_large", r"cudaErrorInvalidConfiguration"),
    ("grid_y_too_large", r"cudaErrorInvalidConfiguration"),
    ("async_misaligned", r"cudaErrorLaunchFailure: async_misaligned: __pipeline_memcpy_async: .* not "
                         r"16-byte aligned"),
    ("vector_misaligned", r"cudaErrorLaunchFailure: vector_misaligned: misaligned 16-byte vector load"),
])
def test_emulator_reports_kernel_faults(emu, name, error):
    """A deadlock, a broken wmma rule or a bad launch is a launch error with a message, never a hang
    or a crash of the interpreter."""
    code, msg, _ = _selftest(emu, name)
    assert code != 0 and re.match(error, msg), msg


def test_emulator_barriers_shuffles_atomics(emu):
    code, msg, out = _selftest(emu, "barrier_after_early_return", 256)
    assert code == 0 and out == [1] * 32 + [0] * 224, msg  # returned threads do not block a barrier
    code, msg, out = _selftest(emu, "shuffle_xor")
    assert code == 0 and out == [t ^ 5 for t in range(64)], msg
    code, msg, out = _selftest(emu, "atomic_count", 1)
    assert code == 0 and struct.unpack("f", struct.pack("i", out[0]))[0] == 300.0, msg


def test_emulator_async_copies(emu):
    """cp.async (cuda_pipeline_primitives.h): the data lands only at __pipeline_wait_prior, per
    commit group; zfill zero-fills the tail of the chunk."""
    values = list(range(256))
    expect = []
    for t in range(64):
        src = (t + 1) % 64
        chunk = values[4 * src:4 * src + 4]
        expect += chunk if src % 2 == 0 else chunk[:2] + [0, 0]
    out = (ctypes.c_int * 256)(*values)
    msg = ctypes.create_string_buffer(512)
    assert emu.lib.ff_emu_selftest(b"async_copy_waited", out, 256, msg, 512) == 0, msg.value
    assert list(out) == expect
    out = (ctypes.c_int * 256)(*values)
    assert emu.lib.ff_emu_selftest(b"async_copy_unwaited", out, 256, msg, 512) == 0, msg.value
    assert list(out) == [-1] * 256  # not waited for: the shared memory still holds what was there
    out = (ctypes.c_int * 320)(*range(320))
    assert emu.lib.ff_emu_selftest(b"async_groups", out, 320, msg, 512) == 0, msg.value
    assert list(out[256:288]) == [4 * t for t in range(32)] and list(out[288:]) == [-1] * 32


def test_emulator_exposes_a_missing_barrier(emu):
    """Thread 0 writes a shared value that the block's other threads read: with __syncthreads all
    read it; without, the blocks run in decreasing thread order read a stale value."""
    blocks = 8
    code, msg, out = _selftest(emu, "shared_handover_synced", 64 * blocks)
    assert code == 0 and out == [100 + i // 64 for i in range(64 * blocks)], msg
    code, msg, out = _selftest(emu, "shared_handover_unsynced", 64 * blocks)
    assert code == 0, msg
    stale = {i // 64 for i in range(64 * blocks) if out[i] != 100 + i // 64}
    assert stale == set(range(1, blocks, 2)), stale


# ================================================================ correctness

@pytest.mark.parametrize("config", ALL_CONFIGS, ids=config_id)
@pytest.mark.parametrize("dt", DTYPES)
def test_matrix_matches_float64_reference(emu, dt, config):
    """Every (goodness, norm, loss) for every dtype; bias alternating over the configs, and
    skip_nonfinite (no effect on a finite step) on the configs without bias."""
    bias = ALL_CONFIGS.index(config) % 2 == 0
    m_neg = 19 if config.loss == "softplus" else 21
    _step_and_check(emu, 21, m_neg, 40, 36, dt, config, bias=bias, skip_nonfinite=not bias)


# M, N, K off every tile size (128 x 128 x 32, 16-wide fragments): (129, 130, 31, 257) spans 3 x 3
# output tiles of the forward GEMM, (65, 64, 200, 127) 7 reduction steps and 2 K tiles of the
# gradient GEMM, (300, 301, 45, 3) a batch split into 3 chunks whose boundaries are not the pos/neg
# one, (5, 5, 300, 1000) 8 column tiles and 10 reduction steps: the GPU suite's odd shapes.
ODD_SHAPES = [(1, 1, 1, 1), (3, 3, 7, 5), (17, 17, 33, 129), (65, 64, 200, 127),
              (129, 130, 31, 257), (300, 301, 45, 3), (5, 5, 300, 1000)]


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dt", DTYPES)
def test_odd_shapes(emu, shape, dt):
    m_pos, m_neg, k, n = shape
    for config in (ffk.FFConfig(goodness="mean", norm="l2", theta=0.3),
                   ffk.FFConfig(goodness="sum", norm="rms", theta=3.0, loss="symba", alpha=1.5)):
        _step_and_check(emu, m_pos, m_neg if config.loss == "softplus" else m_pos, k, n, dt, config)


@pytest.mark.parametrize("split", [True, False], ids=["split", "unsplit"])
@pytest.mark.parametrize("dt", DTYPES)
def test_batch_split(emu, dt, split):
    """Split (4 SMs, 3 output tiles, 601 rows): the weight gradient runs over 3 batch chunks summed
    by atomics, then the apply kernel finishes. Unsplit (1 SM: the tiles fill it): the weight
    gradient kernel writes the gradients from its epilogue and nothing else runs."""
    emu.sm_count(4 if split else 1)
    m_pos, m_neg, k, n = 300, 301, 128, 384
    _step_and_check(emu, m_pos, m_neg, k, n, dt, ALL_CONFIGS[0])
    log = {r.kernel: r for r in emu.launches()}
    assert log[WGRAD].grid[2] == (3 if split else 1), log[WGRAD]
    assert (APPLY in log) == split


@pytest.mark.parametrize("dt", DTYPES)
def test_strided_inputs(emu, dt):
    """x_pos transposed storage, x_neg every other column, weight transposed, bias strided: all reach
    the kernels through their strides."""
    dtype, tf32 = dt
    emu.tf32(tf32)
    x_pos, x_neg, w, b = _layer(45, 45, 70, 150, dtype, tf32)
    xp = x_pos.t().contiguous().t()
    xn = torch.empty(45, 140, dtype=dtype)[:, ::2]
    xn.copy_(x_neg)
    wt = w.t().contiguous().t()
    bs = torch.empty(300, dtype=dtype)[::2]
    bs.copy_(b)
    assert not (xp.is_contiguous() or xn.is_contiguous() or wt.is_contiguous() or bs.is_contiguous())
    # contiguous but one element off 16-byte alignment: element loads instead of cp.async
    xm = torch.empty(45 * 70 + 1, dtype=dtype)[1:].view(45, 70)
    xm.copy_(x_neg)
    wm = torch.empty(150 * 70 + 1, dtype=dtype)[1:].view(150, 70)
    wm.copy_(w)
    assert xm.data_ptr() % 16 != 0 and wm.data_ptr() % 16 != 0
    for config in ALL_CONFIGS[:2]:
        out = cb.layer_step(xp, xn, wt, bs, config, None)
        ref, _, _ = float64_reference(x_pos, x_neg, w, b, config)
        assert_step_close(out, ref, _tol(dtype, tf32), "strided")
    out = cb.layer_step(x_pos, xm, wm, b, ALL_CONFIGS[0], None)
    ref, _, _ = float64_reference(x_pos, x_neg, w, b, ALL_CONFIGS[0])
    assert_step_close(out, ref, _tol(dtype, tf32), "misaligned")
    y, g = cb.layer_forward(xp, wt, bs, ffk.FFConfig())
    y_ref, g_ref = ffk.ff_layer_forward(x_pos.double(), w.double(), b.double(), backend="torch")
    assert rel_err(y, y_ref) <= _tol(dtype, tf32) and rel_err(g, g_ref) <= _tol(dtype, tf32)


# The SGD rules of SGDUpdate.coefficients(): PyTorch's (coupled weight decay, momentum, dampening,
# its first step from created buffers) and Hinton's (decoupled weight decay, gradient smoothing).
SGD_RULES = {
    "plain": dict(momentum=0.0, weight_decay=0.01),
    "momentum-f32buf": dict(momentum=0.9, weight_decay=0.01, buffers="float32"),
    "momentum-dtypebuf": dict(momentum=0.9, weight_decay=0.01, buffers="weight_dtype"),
    "dampening": dict(momentum=0.9, dampening=0.3, weight_decay=0.01, buffers="float32"),
    "first-step": dict(momentum=0.9, dampening=0.5, weight_decay=0.01, buffers="created"),
    "hinton": dict(momentum=0.9, dampening=0.9, weight_decay=0.001, decoupled_weight_decay=True,
                   buffers="float32"),
    "hinton-first": dict(momentum=0.9, dampening=0.9, weight_decay=0.02, decoupled_weight_decay=True,
                         buffers="created"),
}


def _update_and_check(emu, dt, rule, m_pos, k, n, bias, config=ALL_CONFIGS[3], peer=False,
                      skip_nonfinite=False):
    """One update-mode step against the float64 reference: outputs, parameter change, buffers and
    (peer) the running mean. skip_nonfinite must change nothing here (every value is finite)."""
    dtype, tf32 = dt
    emu.tf32(tf32)
    tol = _tol(dtype, tf32)
    m_neg = m_pos if config.loss == "symba" else m_pos + 3
    x_pos, x_neg, w, b = _layer(m_pos, m_neg, k, n, dtype, tf32, bias=bias)
    kw = dict(SGD_RULES[rule])
    buffers = kw.pop("buffers", "none")
    lr = 0.5
    bufs = (None, None)
    if buffers in ("float32", "weight_dtype"):
        bdt = torch.float32 if buffers == "float32" else dtype
        bufs = (torch.randn(w.shape).mul_(0.01).to(bdt),
                None if b is None else torch.randn(b.shape).mul_(0.01).to(bdt))
    elif buffers == "created":  # as ops.py creates them: zeros, first step
        bufs = (torch.zeros(w.shape), None if b is None else torch.zeros(b.shape))
    w0, b0 = w.clone(), None if b is None else b.clone()
    bufs0 = None if buffers in ("none", "created") else tuple(
        None if t is None else t.clone() for t in bufs)
    mean = torch.rand(n) + 0.25 if peer else None
    mean0 = mean.double() if peer else None
    ref_kw = dict(kw, lr=lr, momentum_buffers=bufs0)
    if peer:
        ref_kw["peer_mean"] = mean.double()
    ref, w_ref, b_ref = float64_reference(x_pos, x_neg, w0, b0, config, **ref_kw)
    update = SGDUpdate(lr, kw["momentum"], kw["weight_decay"], *bufs, dampening=kw.get("dampening", 0.0),
                       decoupled_weight_decay=kw.get("decoupled_weight_decay", False),
                       first_step=buffers == "created")
    out = cb.layer_step(x_pos, x_neg, w, b, config, update,
                        _hinton_peer(mean, config, m_pos) if peer else None, skip_nonfinite)
    assert out.grad_weight is None and out.grad_bias is None
    _assert_finite_flag(out)
    assert_step_close(out, ref, tol, f"update {rule}")
    # the step itself: compare the change of the parameters (16-bit weights: their rounding too)
    delta_tol = tol if dtype == torch.float32 else 4 * tol
    assert rel_err(w.double() - w0.double(), w_ref - w0.double()) <= delta_tol
    if b is not None:
        assert rel_err(b.double() - b0.double(), b_ref - b0.double()) <= delta_tol
    if kw["momentum"]:
        assert rel_err(bufs[0], ref.momentum_buffers[0]) <= delta_tol
        if b is not None:
            assert rel_err(bufs[1], ref.momentum_buffers[1]) <= delta_tol
    if peer:  # the running mean's change (its old value is exact)
        assert rel_err(mean.double() - mean0, ref.peer_mean - mean0) <= tol


@pytest.mark.parametrize("rule", list(SGD_RULES))
@pytest.mark.parametrize("dt", DTYPES)
def test_update_mode(emu, dt, rule):
    """The fused SGD step in place, every rule, finished in the weight-gradient epilogue (one batch
    chunk); bias on for every other rule."""
    i = list(SGD_RULES).index(rule)
    _update_and_check(emu, dt, rule, 40, 50, 140, bias=i % 2 == 0, skip_nonfinite=i % 3 == 0)


@pytest.mark.parametrize("rule", ["momentum-dtypebuf", "hinton"])
@pytest.mark.parametrize("dt", DTYPES)
def test_update_mode_split(emu, dt, rule):
    """The same step from the split path's apply kernel (2 batch chunks)."""
    emu.sm_count(2)
    _update_and_check(emu, dt, rule, 150, 40, 70, bias=rule == "hinton",
                      skip_nonfinite=rule == "hinton")
    assert APPLY in {r.kernel for r in emu.launches()}


@pytest.mark.parametrize("shape", [(1, 1, 1), (33, 45, 140), (129, 31, 257)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dt", DTYPES)
def test_forward(emu, dt, shape):
    dtype, tf32 = dt
    emu.tf32(tf32)
    m, k, n = shape
    x, _, w, b = _layer(m, 1, k, n, dtype, tf32)
    for config in (ffk.FFConfig(norm="l2"), ffk.FFConfig(goodness="sum", norm="none"),
                   ffk.FFConfig(norm="rms")):
        y, g = cb.layer_forward(x, w, b, config)
        y_ref, g_ref = ffk.ff_layer_forward(x.double(), w.double(), b.double(), config=config,
                                            backend="torch")
        assert y.dtype == dtype and g.dtype == torch.float32 and y.shape == (m, n)
        tol = _tol(dtype, tf32)
        assert rel_err(y, y_ref) <= tol and rel_err(g, g_ref) <= tol, config
    assert [r.kernel for r in emu.launches()] == [MEMSET, FWD, FIN] * 3


# ================================================================ peer normalisation

# Both forms at a strength where the peer term visibly moves the gradient (checked below), so a
# wrong peer term cannot hide under the FF term.
PEER_CONFIGS = {
    "hinton": ffk.FFConfig(goodness="sum", norm="rms", theta=3.0, peer_norm="hinton", peer_lambda=5.0),
    "loewex": ffk.FFConfig(goodness="mean", norm="l2", theta=0.3, loss="symba", alpha=1.5,
                           peer_norm="loewex", peer_lambda=750.0),
}


@pytest.mark.parametrize("split", [False, True], ids=["unsplit", "split"])
@pytest.mark.parametrize("form", list(PEER_CONFIGS))
@pytest.mark.parametrize("dt", DTYPES)
def test_peer_norm_gradient(emu, dt, form, split):
    """Gradient mode with peer normalisation: gradients (FF + peer term, dead units included) and
    the running mean against the float64 reference, from the epilogue (one chunk) or the split
    path. Bias on in half the cases."""
    dtype, tf32 = dt
    emu.tf32(tf32)
    tol = _tol(dtype, tf32)
    emu.sm_count(2 if split else 132)
    m_pos, n = (150 if split else 40), 36
    config = PEER_CONFIGS[form]
    bias = (form == "hinton") != split
    x_pos, x_neg, w, b = _layer(m_pos, m_pos, 40, n, dtype, tf32, bias=bias)
    mean = torch.rand(n) + 0.25
    mean0 = mean.double()
    ref, _, _ = float64_reference(x_pos, x_neg, w, b, config, peer_mean=mean0.clone())
    out = cb.layer_step(x_pos, x_neg, w, b, config, None, _hinton_peer(mean, config, m_pos),
                        split)  # skip_nonfinite: no effect on a finite step
    assert_step_close(out, ref, tol, f"peer {form}")
    _assert_finite_flag(out)
    assert rel_err(mean.double() - mean0, ref.peer_mean - mean0) <= tol
    kernels = [r.kernel for r in emu.launches()]
    assert PEER in kernels and (APPLY in kernels) == split
    no_peer, _, _ = float64_reference(x_pos, x_neg, w, b, dataclasses.replace(config, peer_norm="none"))
    assert rel_err(no_peer.grad_weight, ref.grad_weight) > 10 * tol  # the test can see the term


@pytest.mark.parametrize("split", [False, True], ids=["unsplit", "split"])
@pytest.mark.parametrize("form", list(PEER_CONFIGS))
@pytest.mark.parametrize("dt", DTYPES)
def test_peer_norm_update(emu, dt, form, split):
    """Update mode with peer normalisation: Hinton's form with his SGD rule, loeweX's with PyTorch's."""
    emu.sm_count(2 if split else 132)
    rule = "hinton" if form == "hinton" else "momentum-f32buf"
    _update_and_check(emu, dt, rule, 150 if split else 40, 40, 36, bias=form == "hinton",
                      config=PEER_CONFIGS[form], peer=True, skip_nonfinite=split)


# ================================================================ NaN and range

@pytest.mark.parametrize("where", ["x_pos", "x_neg", "weight", "bias"])
@pytest.mark.parametrize("dt", DTYPES)
def test_nan_reaches_the_loss(emu, dt, where):
    """One NaN in x_pos, x_neg, W or b: the loss is NaN, and y, g, the gradients and the peer running
    mean are NaN exactly where the float64 reference has NaN (norm "none": a NaN in W[j] spoils
    column j of y only; a NaN in a negative row must not reach the running mean), the rest as the
    reference. The bias and x_neg cases run the split path."""
    dtype, tf32 = dt
    emu.tf32(tf32)
    tol = _tol(dtype, tf32)
    split = where in ("x_neg", "bias")
    emu.sm_count(2 if split else 132)
    m_pos, n = (150 if split else 20), 40
    config = ffk.FFConfig(goodness="sum", norm="none", theta=3.0, peer_norm="hinton", peer_lambda=0.5)
    x_pos, x_neg, w, b = _layer(m_pos, m_pos + 1, 30, n, dtype, tf32)
    target = {"x_pos": x_pos, "x_neg": x_neg, "weight": w, "bias": b}[where]
    target[(5,) if where == "bias" else (3, 7)] = float("nan")
    mean = torch.rand(n) + 0.25
    ref, _, _ = float64_reference(x_pos, x_neg, w, b, config, peer_mean=mean.double())
    out = cb.layer_step(x_pos, x_neg, w, b, config, None, _hinton_peer(mean, config, m_pos))
    assert torch.isnan(out.loss) and torch.isnan(ref.loss)
    _assert_finite_flag(out, True)
    pairs = _output_pairs(out, ref)
    pairs["peer_mean"] = (mean, ref.peer_mean)
    y, g = cb.layer_forward(x_pos, w, b, config)
    y_ref, g_ref = ffk.ff_layer_forward(x_pos.double(), w.double(), b.double(), config=config,
                                        backend="torch")
    pairs.update(forward_y=(y, y_ref), forward_g=(g, g_ref))
    _assert_like_reference(pairs, tol, where)


def _output_pairs(out, ref) -> dict:
    """name -> (fused output, float64 reference) for every output of a gradient-mode step."""
    names = ("y_pos", "y_neg", "g_pos", "g_neg", "grad_weight", "grad_bias")
    return {name: (getattr(out, name), getattr(ref, name)) for name in names
            if getattr(ref, name) is not None}


def _assert_like_reference(pairs, tol, what):
    """NaN exactly where the reference has NaN, the rest within tol of it."""
    for name, (o, r) in pairs.items():
        nan = torch.isnan(r)
        assert torch.equal(torch.isnan(o), nan), f"{what}: NaN pattern of {name}"
        if not nan.all():
            assert rel_err_in_dtype(o[~nan], r[~nan]) <= tol, f"{what}: {name}"


# A NaN/inf where the ReLU hides it and nothing downstream shows it. "bias": b_5 = -inf, so z_i5 =
# -inf, h_i5 = 0 in every row; "x_pos": x_pos[3, 7] = -inf with W[:, 7] > 0, so row 3 is all -inf
# and dead (its gradient terms 0 * -inf make column 7 of grad_weight NaN, in the reference too).
def _dead_relu_layer(case, dt, m_pos=20, n=40, k=30, bias=True):
    dtype, tf32 = dt
    x_pos, x_neg, w, b = _layer(m_pos, m_pos + 1, k, n, dtype, tf32, bias=bias)
    if case == "bias":
        b[5] = float("-inf")
    elif case == "x_pos":
        w[:, 7] = w[:, 7].abs() + 0.125
        x_pos[3, 7] = float("-inf")
    else:  # "inf-<where>": +inf in x_pos, x_neg, W or b
        where = case.split("-", 1)[1]
        target = {"x_pos": x_pos, "x_neg": x_neg, "weight": w, "bias": b}[where]
        target[(5,) if where == "bias" else (3, 7)] = float("inf")
    return x_pos, x_neg, w, b


@pytest.mark.parametrize("where", ["x_pos", "x_neg", "weight", "bias"])
@pytest.mark.parametrize("dt", DTYPES)
def test_inf_sets_the_flag(emu, dt, where):
    """+inf in x_pos, x_neg, W or b: the step is flagged and its loss is NaN, as in the reference
    (-inf where the ReLU hides it: test_dead_relu_inf)."""
    emu.tf32(dt[1])
    config = ffk.FFConfig(goodness="sum", norm="l2", theta=3.0)
    x_pos, x_neg, w, b = _dead_relu_layer(f"inf-{where}", dt)
    ref, _, _ = float64_reference(x_pos, x_neg, w, b, config)
    out = cb.layer_step(x_pos, x_neg, w, b, config, None)
    assert bool(ref.nonfinite) and torch.isnan(ref.loss)
    _assert_finite_flag(out, True)
    assert torch.isnan(out.loss)


@pytest.mark.parametrize("dt", [DTYPES[1], DTYPES[3]])
def test_sum_of_squares_overflow_sets_the_flag(emu, dt):
    """Every z finite (~1e20) but q_i = sum_j h_ij^2 overflows float32 (the finalise's check, not
    the forward's): flagged and a NaN loss, as the float32 reference (float64 would not overflow:
    compared with the same-dtype reference)."""
    emu.tf32(dt[1])
    x_pos, x_neg, w, b = make_layer(20, 21, 30, 40, dtype=dt[0], seed=2)
    x_pos[3] *= 1e20
    ref = ffk.ff_layer_step(x_pos, x_neg, w, b, backend="torch")
    out = cb.layer_step(x_pos, x_neg, w, b, ffk.FFConfig(), None)
    assert bool(ref.nonfinite) and torch.isnan(ref.loss)
    _assert_finite_flag(out, True)
    assert torch.isnan(out.loss)


@pytest.mark.parametrize("case", ["bias", "x_pos"])
@pytest.mark.parametrize("dt", DTYPES)
def test_dead_relu_inf(emu, dt, case):
    """z = -inf hidden by the ReLU (h = 0, q finite; see _dead_relu_layer): the step is flagged and
    its loss NaN, while y, g and the gradients are the reference's (NaN exactly where its are)."""
    emu.tf32(dt[1])
    tol = _tol(*dt)
    config = ffk.FFConfig(goodness="mean", norm="rms", theta=0.3)
    x_pos, x_neg, w, b = _dead_relu_layer(case, dt)
    ref, _, _ = float64_reference(x_pos, x_neg, w, b, config)
    out = cb.layer_step(x_pos, x_neg, w, b, config, None)
    assert bool(ref.nonfinite) and torch.isnan(ref.loss)
    _assert_finite_flag(out, True)
    assert torch.isnan(out.loss)
    assert torch.isfinite(out.g_pos).all() and torch.isfinite(out.y_pos).all()
    _assert_like_reference(_output_pairs(out, ref), tol, case)


# ================================================================ skip_nonfinite

@pytest.mark.parametrize("dt", DTYPES)
def test_skip_nonfinite_gradient_mode(emu, dt):
    """Gradient mode, Hinton's peer norm, b_5 = -inf (flagged, every output finite): with
    skip_nonfinite the running mean keeps its value (bitwise) and the gradients take the peer term
    from the old mean, as the reference does; without it the mean moves, as the reference's."""
    emu.tf32(dt[1])
    tol = _tol(*dt)
    config = PEER_CONFIGS["hinton"]
    x_pos, x_neg, w, b = _dead_relu_layer("bias", dt, n=36)
    for skip in (True, False):
        mean = torch.rand(36) + 0.25
        mean0 = mean.clone()
        ref, _, _ = float64_reference(x_pos, x_neg, w, b, config, peer_mean=mean0.double(),
                                      skip_nonfinite=skip)
        out = cb.layer_step(x_pos, x_neg, w, b, config, None, _hinton_peer(mean, config, 20), skip)
        _assert_finite_flag(out, True)
        assert torch.isnan(out.loss) and torch.isnan(ref.loss)
        _assert_like_reference(_output_pairs(out, ref), tol, f"skip={skip}")
        if skip:
            assert torch.equal(mean, mean0)
        else:
            assert rel_err(mean.double() - mean0.double(), ref.peer_mean - mean0.double()) <= tol
            assert not torch.equal(mean, mean0)


@pytest.mark.parametrize("split", [False, True], ids=["unsplit", "split"])
@pytest.mark.parametrize("dt", DTYPES)
def test_skip_nonfinite_update_mode(emu, dt, split):
    """Update mode (Hinton's rule, float32 buffers, his peer norm), a NaN in x_neg: with
    skip_nonfinite, W, b, both buffers and the running mean stay bitwise as they were, whether the
    update runs in the weight-gradient epilogue (one chunk) or the apply kernel (split); the flag
    is set, the loss NaN, and y and g are still written (NaN where the reference's are)."""
    dtype, tf32 = dt
    emu.tf32(tf32)
    emu.sm_count(2 if split else 132)
    m_pos = 150 if split else 20
    config = PEER_CONFIGS["hinton"]
    x_pos, x_neg, w, b = _layer(m_pos, m_pos + 1, 30, 36, dtype, tf32)
    x_neg[3, 7] = float("nan")
    bufs = (torch.randn(w.shape).mul_(0.01), torch.randn(b.shape).mul_(0.01))
    mean = torch.rand(36) + 0.25
    before = [t.clone() for t in (w, b, *bufs, mean)]
    ref, _, _ = float64_reference(x_pos, x_neg, w, b, config, lr=0.5, momentum=0.9, dampening=0.9,
                                  weight_decay=0.01, decoupled_weight_decay=True,
                                  momentum_buffers=bufs, peer_mean=mean.double(),
                                  skip_nonfinite=True)
    update = SGDUpdate(0.5, 0.9, 0.01, *bufs, dampening=0.9, decoupled_weight_decay=True)
    out = cb.layer_step(x_pos, x_neg, w, b, config, update, _hinton_peer(mean, config, m_pos), True)
    _assert_finite_flag(out, True)
    assert torch.isnan(out.loss)
    for name, now, was in zip(("weight", "bias", "buf_weight", "buf_bias", "peer_mean"),
                              (w, b, *bufs, mean), before):
        assert torch.equal(now, was), f"{name} changed"
    pairs = {name: (getattr(out, name), getattr(ref, name)) for name in ("y_pos", "y_neg", "g_pos", "g_neg")}
    _assert_like_reference(pairs, _tol(dtype, tf32), "skipped update")
    assert (APPLY in _kernels(emu)) == split


# ================================================================ the loss's range

@pytest.mark.parametrize("dt", DTYPES)
def test_huge_threshold_gives_a_finite_loss(emu, dt):
    """theta = 1e38 (goodness "sum"): each positive row's loss term is ~1e38 / M, their sum ~5e37
    is finite (summing before dividing by M would overflow float32: 21 terms of 1e38). The loss
    and every other output are finite and the reference's."""
    config = ffk.FFConfig(goodness="sum", norm="l2", theta=1e38)
    out = _step_and_check(emu, 21, 19, 40, 36, dt, config)
    assert torch.isfinite(out.loss) and out.loss > 1e37


@pytest.mark.parametrize("case", ["u0-255-rms", "u0-255-l2", "huge-h", "tiny-h"])
def test_fp16_range(emu, case):
    """fp16 must not overflow (nor underflow) where the float32 reference does not (DESIGN 6).
    x ~ U(0, 255): |h| in the hundreds, q ~ 1e6 (fp32 accumulators), finite and within tolerance.
    huge-h: |h| ~ 1e5 > 65504, y normalised to O(1): the unnormalised h the forward stores for the
    finalise must not become inf (its gradients overflow fp16 in the reference too: not compared).
    tiny-h: |h| ~ 1e-6, below fp16's normal range, y still O(1)."""
    x_pos, x_neg, w, b, config = fp16_range_inputs(case)
    x_pos, x_neg, w, b = (t.to(torch.float16) for t in (x_pos, x_neg, w, b))
    tol = TOLERANCE[torch.float16]
    ref, _, _ = float64_reference(x_pos, x_neg, w, b, config)
    out = cb.layer_step(x_pos, x_neg, w, b, config, None)
    y, g = cb.layer_forward(x_pos, w, b, config)
    y_ref, g_ref = ffk.ff_layer_forward(x_pos.double(), w.double(), b.double(), config=config,
                                        backend="torch")
    assert torch.isfinite(y).all() and torch.isfinite(g).all()
    assert rel_err_in_dtype(y, y_ref) <= tol and rel_err_in_dtype(g, g_ref) <= tol
    if case == "huge-h":
        assert torch.isfinite(out.y_pos).all() and torch.isfinite(out.y_neg).all()
        assert out.y_pos.abs().max() < 30 and ref.y_pos.abs().max() > 0.1
        ref.grad_weight = ref.grad_bias = None  # fp16 overflows them in the reference too
        assert_step_close(out, ref, tol, case)
        return
    for t in (out.y_pos, out.y_neg, out.g_pos, out.loss, out.grad_weight, out.grad_bias):
        assert torch.isfinite(t).all()
    assert_step_close(out, ref, tol, case)


# ================================================================ the TF32 switch

def test_tf32_switch_follows_torch(emu, monkeypatch):
    """cuda_backend follows torch's switch for fp32 matmuls: the new API
    (torch.backends.cuda.matmul.fp32_precision "tf32"/"ieee"), and the legacy allow_tf32 when the
    new one is "none" or absent (older torch). TF32 shows as ~1e-4 error on raw fp32 inputs."""
    x_pos, _, w, b = make_layer(40, 1, 64, 48, seed=3)
    y_ref, _ = ffk.ff_layer_forward(x_pos.double(), w.double(), b.double(), backend="torch")

    def err():
        y, _ = cb.layer_forward(x_pos, w, b, ffk.FFConfig())
        return rel_err(y, y_ref)

    matmul = torch.backends.cuda.matmul  # the emu fixture restores its fp32_precision
    matmul.fp32_precision = "ieee"
    assert err() < 1e-5
    matmul.fp32_precision = "tf32"
    assert 1e-5 < err() < TOLERANCE["tf32"]
    for legacy in (types.SimpleNamespace(fp32_precision="none", allow_tf32=True),
                   types.SimpleNamespace(allow_tf32=True)):
        monkeypatch.setattr(torch.backends.cuda, "matmul", legacy)
        assert 1e-5 < err() < TOLERANCE["tf32"]
        legacy.allow_tf32 = False
        assert err() < 1e-5
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)


# ================================================================ training

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ten_training_steps_agree_with_reference(emu, dtype):
    """Hinton's recipe (peer normalisation in his form; SGD lr 0.01, momentum 0.9, dampening 0.9,
    decoupled weight decay 0.001, float32 buffers from zero) for 10 steps: the emulated kernels and
    the reference backend stay together, running means included."""
    gen = torch.Generator().manual_seed(1234)
    k, n, b_sz = 64, 96, 128
    w0 = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    b0 = (torch.randn(n, generator=gen) * 0.1).to(dtype)
    w_c, b_c = w0.clone(), b0.clone()
    w_t, b_t = w0.clone(), b0.clone()
    bufs_c = (torch.zeros(n, k), torch.zeros(n))
    bufs_t = None
    mean_c, mean_t = torch.full((n,), 0.5), None
    losses_c, losses_t = [], []
    config = ffk.FFConfig.hinton()
    sgd = dict(lr=0.01, momentum=0.9, weight_decay=0.001, dampening=0.9, decoupled_weight_decay=True)
    for step in range(10):
        x_pos = torch.randn(b_sz, k, generator=gen).to(dtype)
        x_neg = torch.randn(b_sz, k, generator=gen).to(dtype) * 0.5
        update = SGDUpdate(0.01, 0.9, 0.001, *bufs_c, dampening=0.9, decoupled_weight_decay=True,
                           first_step=step == 0)
        out = cb.layer_step(x_pos, x_neg, w_c, b_c, config, update, _hinton_peer(mean_c, config, b_sz))
        losses_c.append(out.loss.item())
        out = ffk.ff_layer_step(x_pos, x_neg, w_t, b_t, config=config, momentum_buffers=bufs_t,
                                peer_mean=mean_t, backend="torch", **sgd)
        bufs_t, mean_t = out.momentum_buffers, out.peer_mean
        losses_t.append(out.loss.item())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert rel_err(w_c.double() - w0.double(), w_t.double() - w0.double()) <= tol
    assert rel_err(torch.tensor(losses_c), torch.tensor(losses_t)) <= tol
    assert rel_err(mean_c.double() - 0.5, mean_t.double() - 0.5) <= tol
    assert (w_c.double() - w0.double()).abs().max() > 0  # the update was applied


# ================================================================ sgd_update

def _sgd_case(rule, dtype, misaligned):
    """(param, grad, buf, SGDUpdate) for SGD_RULES[rule] on 407 entries (not a multiple of 4: the
    scalar tail), param and grad misaligned by one element when asked (no vector access)."""
    kw = dict(SGD_RULES[rule])
    buffers = kw.pop("buffers", "none")
    shape, off = (37, 11), int(misaligned)
    param = torch.randn(37 * 11 + off).to(dtype)[off:].view(shape)
    grad = torch.randn(37 * 11 + off).to(dtype)[off:].view(shape)
    buf = None
    if buffers in ("float32", "weight_dtype"):
        buf = torch.randn(shape).mul_(0.1).to(torch.float32 if buffers == "float32" else dtype)
    elif buffers == "created":
        buf = torch.zeros(shape)
    update = SGDUpdate(0.5, kw["momentum"], kw["weight_decay"], buf, None,
                       dampening=kw.get("dampening", 0.0),
                       decoupled_weight_decay=kw.get("decoupled_weight_decay", False),
                       first_step=buffers == "created")
    return param, grad, buf, update


def _close_in(dtype, out, ref):
    """Equal up to the last bit or two of ``dtype`` (float32 math in another order, then rounded)."""
    rtol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("skip", [None, False, True], ids=["no-skip", "skip-false", "skip-true"])
@pytest.mark.parametrize("rule", list(SGD_RULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_sgd_update(emu, dtype, rule, skip):
    """cuda_backend.sgd_update (csrc ff_sgd_update: the step's own update code) against
    reference.sgd_update: every rule (coupled/decoupled weight decay, momentum, dampening, first
    step, no buffer, float32 or param-dtype buffers), fp32/fp16/bf16 params, misaligned params on
    every other rule; a skip tensor that is True changes nothing, bitwise."""
    i = list(SGD_RULES).index(rule)
    param, grad, buf, update = _sgd_case(rule, dtype, misaligned=i % 2 == 1)
    flag = None if skip is None else torch.tensor(skip)
    p_ref, buf_ref = param.clone(), None if buf is None else buf.clone()
    reference.sgd_update(p_ref, grad, buf_ref, dataclasses.replace(update, buf_weight=buf_ref), flag)
    p0, buf0 = param.clone(), None if buf is None else buf.clone()
    cb.sgd_update(param, grad, buf, update, flag)
    assert _kernels(emu) == [APPLY] and emu.launches()[-1].stream == STREAM
    if skip:
        assert torch.equal(param, p0) and (buf is None or torch.equal(buf, buf0))
        return
    assert not torch.equal(param, p0)
    _close_in(dtype, param, p_ref)
    if buf is not None:
        _close_in(buf.dtype, buf, buf_ref)


@pytest.mark.parametrize("rule", ["dampening", "hinton"])
def test_update_mode_is_gradient_mode_plus_sgd_update(emu, rule):
    """One copy of the update math: an fp32 update-mode step (one chunk, one column tile: every
    sum in a fixed order) equals, bitwise, the gradient-mode step followed by sgd_update on its
    gradients."""
    x_pos, x_neg, w, b = _layer(30, 31, 40, 100, torch.float32, False)
    bufs = (torch.randn(w.shape).mul_(0.1), torch.randn(b.shape).mul_(0.1))
    kw = dict(SGD_RULES[rule])
    kw.pop("buffers")
    def update(bw, bb):
        return SGDUpdate(0.5, kw["momentum"], kw["weight_decay"], bw, bb,
                         dampening=kw.get("dampening", 0.0),
                         decoupled_weight_decay=kw.get("decoupled_weight_decay", False))
    w2, b2, bufs2 = w.clone(), b.clone(), tuple(t.clone() for t in bufs)
    config = ALL_CONFIGS[0]
    fused = cb.layer_step(x_pos, x_neg, w, b, config, update(*bufs))
    grads = cb.layer_step(x_pos, x_neg, w2, b2, config, None)
    cb.sgd_update(w2, grads.grad_weight, bufs2[0], update(bufs2[0], None))
    cb.sgd_update(b2, grads.grad_bias, bufs2[1], update(bufs2[1], None))
    assert torch.equal(fused.y, grads.y)
    for now, other in zip((w, b, *bufs), (w2, b2, *bufs2)):
        assert torch.equal(now, other)


# ================================================================ the workspace

def test_steady_state_allocates_only_outputs(emu, monkeypatch):
    """The workspace is cached per (device, stream): the first call allocates it, an identical
    second call only its outputs; a larger call grows it once, a smaller one reuses it; another
    stream gets its own. ff_layer_run zeroes it on the stream every call (a memset of exactly the
    plan's size first): garbage left in the cached one changes nothing."""
    cb.release_workspaces()
    calls = []
    real = cb.new_output
    monkeypatch.setattr(cb, "new_output",
                        lambda shape, dtype, device: calls.append((tuple(shape), dtype))
                        or real(shape, dtype, device))
    config = ffk.FFConfig.hinton()
    x_pos, x_neg, w, b = make_layer(40, 41, 30, 36, seed=5)
    mean = torch.full((36,), 0.5)
    outputs = [((81, 36), torch.float32), ((81,), torch.float32), ((), torch.float32),
               ((), torch.bool), ((36, 30), torch.float32), ((36,), torch.float32)]

    def step():
        calls.clear()
        emu.clear()
        return cb.layer_step(x_pos, x_neg, w, b, config, None, _hinton_peer(mean.clone(), config, 40))

    first = step()
    key = ("cpu", 0, STREAM)
    ws = cb._WORKSPACES[key]
    assert calls == outputs + [((ws.numel(),), torch.float32)]
    ws.fill_(float("nan"))  # what a previous step could leave: the next one zeroes it itself
    second = step()
    assert calls == outputs and cb._WORKSPACES[key] is ws
    memset = emu.launches()[0]
    assert memset.kernel == MEMSET and memset.stream == STREAM and memset.grid[0] == 4 * ws.numel()
    for name in ("y", "g", "grad_weight", "grad_bias"):  # one column tile, one chunk: fixed order
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert rel_err(second.loss, first.loss) < 1e-6  # block sums added by atomics, in any order

    calls.clear()
    x_big = torch.randn(300, 30)
    cb.layer_step(x_big, x_big, w, b, config, None, _hinton_peer(mean.clone(), config, 300))
    grown = cb._WORKSPACES[key]
    assert grown.numel() > ws.numel() and calls[-1] == ((grown.numel(),), torch.float32)
    step()
    assert calls == outputs and cb._WORKSPACES[key] is grown

    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: types.SimpleNamespace(cuda_stream=STREAM + 16))
    step()
    assert len(calls) == len(outputs) + 1 and cb._WORKSPACES[("cpu", 0, STREAM + 16)] is not grown
    assert {r.stream for r in emu.launches()} == {STREAM + 16}
    cb.release_workspaces()


def test_threads_sharing_a_stream(emu):
    """Two host threads stepping on the same stream share its cached workspace: each call's
    memset and kernels are enqueued as one unit (cuda_backend's per-stream lock; ff_layer_run
    releases the GIL), so neither zeroes the other's sums half-way. Every result is the serial one."""
    import threading
    config = ffk.FFConfig()
    layers = [make_layer(20, 21, 30, 40, seed=s) for s in (1, 2)]
    serial = [cb.layer_step(*layer, config, None) for layer in layers]
    results, errors = {}, []

    def work(t):
        try:
            results[t] = [cb.layer_step(*layers[t], config, None) for _ in range(3)]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for t in (0, 1):
        for out in results[t]:
            assert torch.equal(out.g, serial[t].g) and torch.equal(out.y, serial[t].y)
            assert rel_err(out.loss, serial[t].loss) < 1e-6
