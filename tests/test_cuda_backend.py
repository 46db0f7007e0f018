"""The "cuda" backend (csrc/ff_layer.cu through ff_kernels._C).

CPU part (runs everywhere, CI included): registration, the reason given without a GPU, lazy loading,
the module's launch API and its argument/error paths. GPU part (requires_cuda): the correctness
matrix against the float64 reference, odd and large shapes, gradient and update modes, strides,
streams, devices and 20 training steps against the reference backend. Every output a backend
allocates starts as NaN (conftest's poison fixture), so an element a kernel misses fails the test.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import ff_kernels as ffk
from tests.conftest import requires_cuda
from tests.utils import (ALL_CONFIGS, FEW_ROWS, TOLERANCE, assert_step_close, config_id,
                         float64_reference, gradient_term_norms, make_layer, rel_err)

HAS_GPU = torch.cuda.is_available()



# ================================================================ CPU: registration and API

def test_cuda_backend_registered():
    b = ffk.backends.registered_backends()["cuda"]
    assert b.module == "ff_kernels.cuda_backend" and b.auto_device_types == ("cuda",)
    # "auto" prefers Triton until GPU benchmarks say otherwise; both above the reference
    assert ffk.backends.registered_backends()["triton"].priority > b.priority > 0


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU report")
def test_status_gives_reason_without_gpu():
    reason = ffk.backend_status()["cuda"]
    assert isinstance(reason, str) and reason.strip() and reason != "available"
    assert "cuda" not in ffk.available_backends()
    assert "torch" in ffk.available_backends()


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU error")
@pytest.mark.parametrize("op", ["step", "forward"])
def test_cuda_backend_on_cpu_without_gpu_raises_value_error(op):
    x_pos, x_neg, w, b = make_layer(3, 3, k=5, n=4)
    with pytest.raises(ValueError, match="backend='cuda'"):
        if op == "step":
            ffk.ff_layer_step(x_pos, x_neg, w, b, backend="cuda")
        else:
            ffk.ff_layer_forward(x_pos, w, b, backend="cuda")


@requires_cuda
def test_cuda_backend_on_cpu_tensors_with_gpu_raises_type_error():
    x_pos, x_neg, w, b = make_layer(3, 3, k=5, n=4)
    with pytest.raises(TypeError, match="backend='cuda'.*cpu"):
        ffk.ff_layer_step(x_pos, x_neg, w, b, backend="cuda")


def test_unsupported_reasons():
    unsupported = ffk.backends.registered_backends()["cuda"].unsupported_reason
    assert "cpu" in unsupported(torch.device("cpu"), torch.float32)
    assert "float64" in unsupported(torch.device("cuda", 0), torch.float64)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert unsupported(torch.device("cuda", 0), dtype) is None


def test_auto_never_picks_cuda_for_cpu_tensors():
    x_pos, x_neg, w, b = make_layer(3, 3, k=5, n=4)
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, backend="auto")
    assert out.y_pos.device.type == "cpu"


def test_import_is_lazy():
    # importing the package (and asking for its backends) must not need CUDA; _C loads on demand
    code = ("import sys, ff_kernels as f; assert 'ff_kernels._C' not in sys.modules; "
            "import ff_kernels.cuda_backend; assert 'ff_kernels._C' not in sys.modules; "
            "print(f.backend_status()['cuda'])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()


def test_module_exposes_layer_api(ext):
    for name in ("FFLayerArgs", "ff_layer_run", "ff_layer_workspace_floats", "FF_MODE_FORWARD",
                 "FF_MODE_GRADIENT", "FF_MODE_UPDATE"):
        assert hasattr(ext, name), name
    a = ext.FFLayerArgs()
    assert a.mode == ext.FF_MODE_FORWARD and a.x_pos == 0 and a.eps == pytest.approx(1e-4)
    a.x_pos = 2**48 + 16  # pointers are full 64-bit ints
    assert a.x_pos == 2**48 + 16
    a.m_pos = 3 * 2**31  # shapes are int64
    assert a.m_pos == 3 * 2**31
    with pytest.raises(AttributeError):
        a.not_a_field = 1  # a typo in cuda_backend.py would fail loudly


def test_workspace_size(ext):
    m, n, k = 10, 7, 5
    assert ext.ff_layer_workspace_floats(m, n, k, ext.FF_MODE_FORWARD) == m
    for mode in (ext.FF_MODE_GRADIENT, ext.FF_MODE_UPDATE):
        assert ext.ff_layer_workspace_floats(m, n, k, mode) == 2 * m + 4 + 8 + n * k
    assert ext.ff_layer_workspace_floats(100000, 4096, 4096, 1) > 2**24  # int64, no overflow
    with pytest.raises(ValueError):
        ext.ff_layer_workspace_floats(0, n, k, 0)


def _valid_args(ext, mode=None):
    """Arguments that pass validation (fake, never-dereferenced pointers)."""
    a = ext.FFLayerArgs()
    a.mode = ext.FF_MODE_GRADIENT if mode is None else mode
    a.x_pos, a.m_pos, a.x_pos_stride_row, a.x_pos_stride_col = 0x1000, 4, 8, 1
    a.x_neg, a.m_neg, a.x_neg_stride_row, a.x_neg_stride_col = 0x2000, 4, 8, 1
    a.weight, a.n, a.k, a.weight_stride_row, a.weight_stride_col = 0x3000, 6, 8, 8, 1
    a.y, a.g, a.loss_out, a.workspace, a.grad_weight = 0x4000, 0x5000, 0x6000, 0x7000, 0x8000
    return a


@pytest.mark.parametrize("field,value,match", [
    ("dtype", 7, "dtype"),
    ("mode", 5, "mode"),
    ("m_pos", 0, "m_pos"),
    ("n", 0, "n >= 1"),
    ("x_pos", 0, "pointer"),
    ("workspace", 0, "pointer"),
    ("norm", 3, "norm"),
    ("loss", 2, "loss"),
    ("grad_weight", 0, "grad_weight"),
    ("m_neg", 3, "symba"),
    ("eps", 0.0, "eps"),
])
def test_run_rejects_bad_arguments_before_touching_cuda(ext, field, value, match):
    a = _valid_args(ext)
    if field == "m_neg":
        a.loss = 1  # symba with unequal halves
    setattr(a, field, value)
    with pytest.raises(ValueError, match=match):
        ext.ff_layer_run(a)


def test_run_rejects_noncontiguous_weight_in_update_mode(ext):
    a = _valid_args(ext, mode=ext.FF_MODE_UPDATE)
    a.weight_stride_row, a.weight_stride_col = 1, 6
    with pytest.raises(ValueError, match="contiguous"):
        ext.ff_layer_run(a)


@pytest.mark.skipif(HAS_GPU, reason="would launch on fake pointers; this checks the no-GPU path")
def test_run_without_gpu_raises_runtime_error_with_cuda_message(ext):
    # valid arguments, so the first CUDA call runs, fails (no device/driver) and must raise, not abort
    with pytest.raises(RuntimeError, match=r"ff_layer_step \(cuda\): cudaGetDevice failed: cuda\w+: "):
        ext.ff_layer_run(_valid_args(ext))


# ================================================================ GPU: correctness

DTYPES = [
    pytest.param((torch.float32, True), id="fp32-tf32"),
    pytest.param((torch.float32, False), id="fp32-ieee"),
    pytest.param((torch.float16, False), id="fp16"),
    pytest.param((torch.bfloat16, False), id="bf16"),
]


@pytest.fixture
def tf32_mode(request):
    """Sets torch.backends.cuda.matmul.allow_tf32 for the test, restores it after."""
    old = torch.backends.cuda.matmul.allow_tf32
    yield lambda on: setattr(torch.backends.cuda.matmul, "allow_tf32", bool(on))
    torch.backends.cuda.matmul.allow_tf32 = old


def _tol(dtype, tf32):
    return TOLERANCE["tf32"] if (dtype == torch.float32 and tf32) else TOLERANCE[dtype]


def _round_tf32(t):
    """t rounded to TF32 (10-bit mantissa, nearest, ties away: the kernels' cvt.rna.tf32.f32)."""
    i = t.contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def _layer(m_pos, m_neg, k, n, dtype, tf32, device="cuda", bias=True, seed=None, tf32_exact=True):
    """make_layer; with TF32 on, x and W are made TF32-representable (tf32_exact) so that the
    forward GEMM is exact against the float64 reference and only the gradient GEMM's operand
    rounding remains: otherwise tiny problems (a few rows, cancelling signs) exceed the TF32
    tolerance by precision alone. The large-shape tests keep raw fp32 inputs."""
    x_pos, x_neg, w, b = make_layer(m_pos, m_neg, k, n, dtype=dtype, device=device, bias=bias,
                                    seed=seed)
    if dtype == torch.float32 and tf32 and tf32_exact:
        x_pos, x_neg, w = _round_tf32(x_pos), _round_tf32(x_neg), _round_tf32(w)
    return x_pos, x_neg, w, b


def _run_and_check(m_pos, m_neg, k, n, dtype, tf32, config, tf32_mode, bias=True, seed=None,
                   device="cuda", tf32_exact=True):
    tf32_mode(tf32)
    x_pos, x_neg, w, b = _layer(m_pos, m_neg, k, n, dtype, tf32, device=device, bias=bias,
                                seed=seed, tf32_exact=tf32_exact)
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, backend="cuda")
    ref, _, _ = float64_reference(x_pos, x_neg, w, b, config)
    assert out.y_pos.dtype == dtype and out.grad_weight.dtype == dtype
    assert (out.grad_bias is None) == (b is None)
    scales = (gradient_term_norms(x_pos, x_neg, w, b, config) if m_pos + m_neg <= FEW_ROWS
              else (None, None))  # a handful of rows can cancel: measure against the terms
    assert_step_close(out, ref, _tol(dtype, tf32), f"{m_pos}+{m_neg}x{k}->{n} {dtype}", scales)
    return out


@requires_cuda
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("config", ALL_CONFIGS, ids=config_id)
@pytest.mark.parametrize("dt", DTYPES)
def test_matrix_matches_float64_reference(dt, config, bias, tf32_mode):
    dtype, tf32 = dt
    _run_and_check(70, 70, 96, 80, dtype, tf32, config, tf32_mode, bias=bias)


# M, N, K off every tile size (128 x 128 x 32, 16-wide fragments); N below and above one block.
ODD_SHAPES = [(1, 1, 1, 1), (3, 3, 7, 5), (17, 17, 33, 129), (65, 64, 200, 127),
              (129, 130, 31, 257), (5, 5, 300, 1000), (300, 301, 45, 3)]


@requires_cuda
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dt", DTYPES)
def test_odd_shapes(shape, dt, tf32_mode):
    dtype, tf32 = dt
    m_pos, m_neg, k, n = shape
    for config in (ffk.FFConfig(goodness="mean", norm="l2", theta=0.3),
                   ffk.FFConfig(goodness="sum", norm="rms", theta=3.0, loss="symba", alpha=1.5)):
        mn = m_neg if config.loss == "softplus" else m_pos
        _run_and_check(m_pos, mn, k, n, dtype, tf32, config, tf32_mode)


@requires_cuda
@pytest.mark.parametrize("shape", ODD_SHAPES[:5], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dt", DTYPES)
def test_odd_shapes_forward(shape, dt, tf32_mode):
    dtype, tf32 = dt
    tf32_mode(tf32)
    m_pos, _, k, n = shape
    x, _, w, b = _layer(m_pos, 1, k, n, dtype, tf32)
    for config in (ffk.FFConfig(norm="l2"), ffk.FFConfig(goodness="sum", norm="none")):
        y, g = ffk.ff_layer_forward(x, w, b, config=config, backend="cuda")
        y_ref, g_ref = ffk.ff_layer_forward(x.double(), w.double(), b.double(), config=config,
                                            backend="torch")
        assert y.dtype == dtype and g.dtype == torch.float32 and y.shape == (m_pos, n)
        tol = _tol(dtype, tf32)
        assert rel_err(y, y_ref) <= tol and rel_err(g, g_ref) <= tol


LARGE_SHAPES = [(50000, 50000, 784, 500), (1024, 1024, 2000, 2000), (8192, 8192, 4096, 4096)]


@requires_cuda
@pytest.mark.slow
@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dt", DTYPES)
def test_large_shapes(shape, dt, tf32_mode):
    dtype, tf32 = dt
    config = ffk.FFConfig.pytorch_recipe() if shape[2] != 4096 else ffk.FFConfig.hinton()
    _run_and_check(*shape, dtype, tf32, config, tf32_mode, tf32_exact=False)


@requires_cuda
@pytest.mark.parametrize("dt", DTYPES)
def test_noncontiguous_inputs(dt, tf32_mode):
    dtype, tf32 = dt
    tf32_mode(tf32)
    x_pos, x_neg, w, b = _layer(45, 45, 70, 150, dtype, tf32)
    # x_pos transposed storage, x_neg every other column of a wider tensor, weight transposed,
    # bias strided: all go to the kernels through their strides
    xp = x_pos.t().contiguous().t()
    xn = torch.empty(45, 140, dtype=dtype, device="cuda")[:, ::2]
    xn.copy_(x_neg)
    wt = w.t().contiguous().t()
    bs = torch.empty(300, dtype=dtype, device="cuda")[::2]
    bs.copy_(b)
    assert not (xp.is_contiguous() or xn.is_contiguous() or wt.is_contiguous() or bs.is_contiguous())
    for config in ALL_CONFIGS[:2]:
        out = ffk.ff_layer_step(xp, xn, wt, bs, config=config, backend="cuda")
        ref, _, _ = float64_reference(x_pos, x_neg, w, b, config)
        assert_step_close(out, ref, _tol(dtype, tf32), "strided")
    y, g = ffk.ff_layer_forward(xp, wt, bs, backend="cuda")
    y_ref, g_ref = ffk.ff_layer_forward(x_pos.double(), w.double(), b.double(), backend="torch")
    assert rel_err(y, y_ref) <= _tol(dtype, tf32) and rel_err(g, g_ref) <= _tol(dtype, tf32)


@requires_cuda
@pytest.mark.parametrize("buffers", ["none", "created", "float32", "weight_dtype"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dt", DTYPES)
def test_update_mode(dt, bias, buffers, tf32_mode):
    dtype, tf32 = dt
    tf32_mode(tf32)
    tol = _tol(dtype, tf32)
    config = ALL_CONFIGS[3]
    x_pos, x_neg, w, b = _layer(60, 60, 50, 140, dtype, tf32, bias=bias)
    lr, wd = 0.5, 0.01
    momentum = 0.0 if buffers == "none" else 0.9
    bufs = None
    if buffers in ("float32", "weight_dtype"):
        bdt = torch.float32 if buffers == "float32" else dtype
        bufs = (torch.randn(w.shape, device="cuda").mul_(0.01).to(bdt),
                None if b is None else torch.randn(b.shape, device="cuda").mul_(0.01).to(bdt))
    w0, b0 = w.clone(), None if b is None else b.clone()
    bufs0 = None if bufs is None else tuple(None if t is None else t.clone() for t in bufs)
    ref, w_ref, b_ref = float64_reference(x_pos, x_neg, w0, b0, config, lr=lr, momentum=momentum,
                                          weight_decay=wd, momentum_buffers=bufs0)
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, lr=lr, momentum=momentum,
                            weight_decay=wd, momentum_buffers=bufs, backend="cuda")
    assert out.grad_weight is None and out.grad_bias is None
    assert_step_close(out, ref, tol, "update")
    # the step itself: compare the change of the parameters (16-bit weights: their rounding too)
    delta_tol = tol if dtype == torch.float32 else 4 * tol
    assert rel_err(w.double() - w0.double(), w_ref - w0.double()) <= delta_tol
    if b is not None:
        assert rel_err(b.double() - b0.double(), b_ref - b0.double()) <= delta_tol
    if momentum:
        got = out.momentum_buffers
        assert got is not None and (bufs is None or got[0] is bufs[0])
        assert rel_err(got[0], ref.momentum_buffers[0]) <= delta_tol
        if b is not None:
            assert rel_err(got[1], ref.momentum_buffers[1]) <= delta_tol
        else:
            assert got[1] is None


@requires_cuda
def test_repeated_calls_agree(tf32_mode):
    tf32_mode(False)
    x_pos, x_neg, w, b = make_layer(200, 200, 96, 300, device="cuda")
    outs = [ffk.ff_layer_step(x_pos, x_neg, w, b, backend="cuda") for _ in range(3)]
    for o in outs[1:]:  # atomics may reorder float32 sums: equal to rounding, not bitwise
        assert torch.equal(o.y_pos, outs[0].y_pos) or rel_err(o.y_pos, outs[0].y_pos) < 1e-6
        assert rel_err(o.grad_weight, outs[0].grad_weight) < 1e-5
        assert rel_err(o.loss, outs[0].loss) < 1e-6


@requires_cuda
def test_second_stream(tf32_mode):
    tf32_mode(False)
    x_pos, x_neg, w, b = make_layer(150, 150, 64, 200, device="cuda")
    ref = ffk.ff_layer_step(x_pos, x_neg, w, b, backend="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = ffk.ff_layer_step(x_pos, x_neg, w, b, backend="cuda")
        y, g = ffk.ff_layer_forward(x_pos, w, b, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert rel_err(out.grad_weight, ref.grad_weight) < 1e-5
    assert rel_err(out.y_neg, ref.y_neg) < 1e-6 and rel_err(out.loss, ref.loss) < 1e-6
    assert rel_err(y, ref.y_pos) < 1e-6 and rel_err(g, ref.g_pos) < 1e-6


@requires_cuda
def test_explicit_device_index_zero(tf32_mode):
    tf32_mode(False)
    prev = torch.cuda.current_device()
    x_pos, x_neg, w, b = make_layer(40, 40, 30, 20, device="cuda:0")
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, backend="cuda")
    ref, _, _ = float64_reference(x_pos, x_neg, w, b, ffk.FFConfig())
    assert_step_close(out, ref, TOLERANCE[torch.float32], "cuda:0")
    assert out.y_pos.device == torch.device("cuda", 0)
    assert torch.cuda.current_device() == prev


@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device_launches_there(tf32_mode):
    tf32_mode(False)
    torch.cuda.set_device(0)
    x_pos, x_neg, w, b = make_layer(40, 40, 30, 20, device="cuda:1")
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, backend="cuda")
    assert torch.cuda.current_device() == 0  # restored
    ref, _, _ = float64_reference(x_pos, x_neg, w, b, ffk.FFConfig())
    assert_step_close(out, ref, TOLERANCE[torch.float32], "cuda:1")


@requires_cuda
def test_no_host_synchronisation(tf32_mode):
    tf32_mode(True)
    x_pos, x_neg, w, b = make_layer(64, 64, 32, 48, device="cuda")
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ffk.ff_layer_step(x_pos, x_neg, w, b, backend="cuda")
        ffk.ff_layer_step(x_pos, x_neg, w, b, lr=0.1, momentum=0.9, backend="cuda")
        ffk.ff_layer_forward(x_pos, w, b, backend="cuda")
    finally:
        torch.cuda.set_sync_debug_mode(old)


@requires_cuda
def test_cuda_errors_raise_runtime_error(ext):
    a = _valid_args(ext)
    a.device = 1000  # no such device: cudaSetDevice fails before any launch
    with pytest.raises(RuntimeError,
                       match=r"ff_layer_step \(cuda\): cudaSetDevice\(1000\) failed: cudaErrorInvalidDevice"):
        ext.ff_layer_run(a)


@requires_cuda
def test_auto_picks_cuda_on_gpu():
    assert ffk.available_backends()[0] == "cuda"
    assert ffk.backends.select_backend("auto", torch.device("cuda", 0), torch.float32).name == "cuda"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_twenty_training_steps_agree_with_reference(dtype, tf32_mode):
    tf32_mode(False)
    gen = torch.Generator().manual_seed(1234)
    k, n, b_sz = 64, 96, 128
    w0 = (torch.randn(n, k, generator=gen) / k ** 0.5).to("cuda", dtype)
    b0 = (torch.randn(n, generator=gen) * 0.1).to("cuda", dtype)
    params = {name: (w0.clone(), b0.clone()) for name in ("cuda", "torch")}
    bufs = {"cuda": None, "torch": None}
    losses = {"cuda": [], "torch": []}
    config = ffk.FFConfig.hinton()
    for _ in range(20):
        x_pos = torch.randn(b_sz, k, generator=gen).to("cuda", dtype)
        x_neg = torch.randn(b_sz, k, generator=gen).to("cuda", dtype) * 0.5
        for name in ("cuda", "torch"):
            w, b = params[name]
            out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, lr=0.01, momentum=0.9,
                                    weight_decay=0.001, momentum_buffers=bufs[name], backend=name)
            bufs[name] = out.momentum_buffers
            losses[name].append(out.loss.item())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    w_c, w_t = params["cuda"][0].double(), params["torch"][0].double()
    assert rel_err(w_c - w0.double(), w_t - w0.double()) <= tol
    assert rel_err(torch.tensor(losses["cuda"]), torch.tensor(losses["torch"])) <= tol
    assert (w_c - w0.double()).abs().max() > 0  # the update was applied
