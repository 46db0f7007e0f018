"""CPU check of the CUDA backend: csrc's kernels run in the CPU emulation of tests/cuda_emu.

CI has no GPU. Here the unmodified csrc sources and python_bindings/module.cpp are compiled by g++
against tests/cuda_emu's stub CUDA headers (session fixture, cached in build/cuda_emu/), and
ff_kernels.cuda_backend.layer_step / layer_forward are called directly on CPU tensors with that
module standing in for ff_kernels._C (function-scoped monkeypatch: nothing leaks into other tests;
the ops.py front door still refuses CPU tensors for backend="cuda", as it must). Every result is
compared with the float64 reference; every output starts as NaN (conftest's poison fixture), so an
element a kernel misses fails. tests/cuda_emu/README.md says what the emulation does not model:
this is a check of the kernels' logic, indexing, synchronisation and numerics, not a GPU run.

FF_KERNELS_REQUIRE_EMULATOR=1 (CI) turns the skip for a missing g++ (or pybind11) into a failure.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import struct
import types

import pytest
import torch

import ff_kernels as ffk
import ff_kernels.cuda_backend as cb
from ff_kernels.backends import SGDUpdate
from tests.cuda_emu import build as emu_build
from tests.utils import (ALL_CONFIGS, FEW_ROWS, TOLERANCE, assert_step_close, config_id,
                         float64_reference, gradient_term_norms, make_layer, rel_err)

REQUIRED = os.environ.get("FF_KERNELS_REQUIRE_EMULATOR") == "1"
STREAM = 0x5EED0  # the fake stream handle: every launch must receive it
KERNELS = ["ff_forward_kernel", "ff_finalize_kernel", "ff_wgrad_kernel", "ff_apply_kernel"]


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
        """torch's own switch, which cuda_backend reads (the fixture restores it)."""
        torch.backends.cuda.matmul.allow_tf32 = bool(on)

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
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    e.tf32(False)
    e.sm_count(132)  # H100 SXM
    monkeypatch.setenv("FF_EMU_WORKERS", "2")  # blocks run concurrently on any machine
    e.clear()
    yield e
    torch.backends.cuda.matmul.allow_tf32 = old_tf32


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


def _step_and_check(emu, m_pos, m_neg, k, n, dt, config, bias=True, seed=None):
    dtype, tf32 = dt
    emu.tf32(tf32)
    x_pos, x_neg, w, b = _layer(m_pos, m_neg, k, n, dtype, tf32, bias=bias, seed=seed)
    out = cb.layer_step(x_pos, x_neg, w, b, config, None)
    ref, _, _ = float64_reference(x_pos, x_neg, w, b, config)
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


def test_four_launches_per_step_two_per_forward(emu):
    x_pos, x_neg, w, b = make_layer(20, 20, 10, 12, seed=0)
    cb.layer_step(x_pos, x_neg, w, b, ffk.FFConfig(), None)
    cb.layer_forward(x_pos, w, b, ffk.FFConfig())
    log = emu.launches()
    assert [r.kernel for r in log] == KERNELS + KERNELS[:2]
    for r in log:
        assert r.ok and r.block == (256, 1, 1), r
        assert r.stream == STREAM and r.device == 0, r  # the caller's stream and device, every launch


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
    """Every (goodness, norm, loss) for every dtype; bias alternating over the configs."""
    bias = ALL_CONFIGS.index(config) % 2 == 0
    m_neg = 19 if config.loss == "softplus" else 21
    _step_and_check(emu, 21, m_neg, 40, 36, dt, config, bias=bias)


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


@pytest.mark.parametrize("sms", [132, 1], ids=["132sm", "1sm"])
@pytest.mark.parametrize("dt", DTYPES)
def test_batch_split_and_grid_stride(emu, dt, sms):
    """132 SMs: the weight gradient splits the batch (grid z > 1, chunks summed by atomics).
    1 SM: no split, and the apply kernel's 16 blocks loop grid-stride over the N*K entries."""
    emu.sm_count(sms)
    m_pos, m_neg, k, n = 300, 301, 45, 260
    _step_and_check(emu, m_pos, m_neg, k, n, dt, ALL_CONFIGS[0])
    log = {r.kernel: r for r in emu.launches()}
    wgrad, apply = log["ff_wgrad_kernel"], log["ff_apply_kernel"]
    if sms == 132:
        assert wgrad.grid[2] > 1, wgrad
    else:
        assert wgrad.grid[2] == 1, wgrad
        assert apply.grid[0] * 256 < n * k + n, apply


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
    for config in ALL_CONFIGS[:2]:
        out = cb.layer_step(xp, xn, wt, bs, config, None)
        ref, _, _ = float64_reference(x_pos, x_neg, w, b, config)
        assert_step_close(out, ref, _tol(dtype, tf32), "strided")
    y, g = cb.layer_forward(xp, wt, bs, ffk.FFConfig())
    y_ref, g_ref = ffk.ff_layer_forward(x_pos.double(), w.double(), b.double(), backend="torch")
    assert rel_err(y, y_ref) <= _tol(dtype, tf32) and rel_err(g, g_ref) <= _tol(dtype, tf32)


@pytest.mark.parametrize("buffers", ["none", "float32", "weight_dtype"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dt", DTYPES)
def test_update_mode(emu, dt, bias, buffers):
    """Fused SGD in place: momentum 0.9 with given buffers (float32 or the weight dtype) or no
    momentum, weight decay 0.01."""
    dtype, tf32 = dt
    emu.tf32(tf32)
    tol = _tol(dtype, tf32)
    config = ALL_CONFIGS[3]
    x_pos, x_neg, w, b = _layer(60, 60, 50, 140, dtype, tf32, bias=bias)
    lr, wd = 0.5, 0.01
    momentum = 0.0 if buffers == "none" else 0.9
    bufs = (None, None)
    if buffers != "none":
        bdt = torch.float32 if buffers == "float32" else dtype
        bufs = (torch.randn(w.shape).mul_(0.01).to(bdt),
                None if b is None else torch.randn(b.shape).mul_(0.01).to(bdt))
    w0, b0 = w.clone(), None if b is None else b.clone()
    bufs0 = None if buffers == "none" else tuple(None if t is None else t.clone() for t in bufs)
    ref, w_ref, b_ref = float64_reference(x_pos, x_neg, w0, b0, config, lr=lr, momentum=momentum,
                                          weight_decay=wd, momentum_buffers=bufs0)
    out = cb.layer_step(x_pos, x_neg, w, b, config, SGDUpdate(lr, momentum, wd, *bufs))
    assert out.grad_weight is None and out.grad_bias is None
    assert_step_close(out, ref, tol, "update")
    # the step itself: compare the change of the parameters (16-bit weights: their rounding too)
    delta_tol = tol if dtype == torch.float32 else 4 * tol
    assert rel_err(w.double() - w0.double(), w_ref - w0.double()) <= delta_tol
    if b is not None:
        assert rel_err(b.double() - b0.double(), b_ref - b0.double()) <= delta_tol
    if momentum:
        assert rel_err(bufs[0], ref.momentum_buffers[0]) <= delta_tol
        if b is not None:
            assert rel_err(bufs[1], ref.momentum_buffers[1]) <= delta_tol


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
    assert [r.kernel for r in emu.launches()] == KERNELS[:2] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ten_training_steps_agree_with_reference(emu, dtype):
    """Hinton's recipe (SGD, momentum 0.9 in float32 buffers, weight decay) for 10 steps: the
    emulated kernels and the reference backend stay together."""
    gen = torch.Generator().manual_seed(1234)
    k, n, b_sz = 64, 96, 128
    w0 = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    b0 = (torch.randn(n, generator=gen) * 0.1).to(dtype)
    w_c, b_c = w0.clone(), b0.clone()
    w_t, b_t = w0.clone(), b0.clone()
    bufs_c = (torch.zeros(n, k), torch.zeros(n))
    bufs_t = None
    losses_c, losses_t = [], []
    config = ffk.FFConfig.hinton()
    for _ in range(10):
        x_pos = torch.randn(b_sz, k, generator=gen).to(dtype)
        x_neg = torch.randn(b_sz, k, generator=gen).to(dtype) * 0.5
        out = cb.layer_step(x_pos, x_neg, w_c, b_c, config, SGDUpdate(0.01, 0.9, 0.001, *bufs_c))
        losses_c.append(out.loss.item())
        out = ffk.ff_layer_step(x_pos, x_neg, w_t, b_t, config=config, lr=0.01, momentum=0.9,
                                weight_decay=0.001, momentum_buffers=bufs_t, backend="torch")
        bufs_t = out.momentum_buffers
        losses_t.append(out.loss.item())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert rel_err(w_c.double() - w0.double(), w_t.double() - w0.double()) <= tol
    assert rel_err(torch.tensor(losses_c), torch.tensor(losses_t)) <= tol
    assert (w_c.double() - w0.double()).abs().max() > 0  # the update was applied
