"""The "cuda" backend (csrc/ff_layer.cu through ff_kernels._C).

CPU part (runs everywhere, CI included): registration, the reason given without a GPU, lazy loading,
the module's launch API, its launch plan and its argument/error paths. GPU part (requires_cuda): the
correctness matrix against the float64 reference, odd and large shapes, gradient and update modes
(every SGD rule), peer normalisation (both forms, both modes, split and unsplit weight gradient),
NaN propagation, the non-finite flag and skip_nonfinite, the loss at theta = 1e38, sgd_update_ (every
rule, dtype and skip), no host sync and no allocation beyond the outputs in steady state, CUDA graph
capture and replay, fp16 range, strides, streams, devices and 20 training steps of Hinton's recipe
against the reference backend. Every output a backend allocates starts as NaN (conftest's poison
fixture), so an element a kernel misses fails the test. tests/test_cuda_emulated.py runs the same
kernels on the CPU.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import ff_kernels as ffk
from tests.conftest import requires_cuda
from tests.utils import (ALL_CONFIGS, fp16_range_inputs, FEW_ROWS, TOLERANCE, assert_step_close, config_id,
                         float64_reference, gradient_term_norms, make_layer, rel_err,
                         rel_err_in_dtype)

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
    for name in ("FFLayerArgs", "FFLayerPlan", "ff_layer_run", "ff_layer_plan", "FF_MODE_FORWARD",
                 "FF_MODE_GRADIENT", "FF_MODE_UPDATE", "FFSgdArgs", "ff_sgd_update"):
        assert hasattr(ext, name), name
    a = ext.FFLayerArgs()
    assert a.mode == ext.FF_MODE_FORWARD and a.x_pos == 0 and a.eps == pytest.approx(1e-4)
    assert (a.lr, a.keep, a.gain, a.wd_grad, a.wd_step) == (0.0, 0.0, 1.0, 0.0, 0.0)
    assert a.peer_mean == 0 and a.sm_count == 0
    assert a.nonfinite_out == 0 and a.skip_nonfinite == 0
    s = ext.FFSgdArgs()
    assert (s.param, s.grad, s.buf, s.skip, s.numel, s.buf_f32) == (0, 0, 0, 0, 0, 1)
    assert (s.lr, s.keep, s.gain, s.wd_grad, s.wd_step) == (0.0, 0.0, 1.0, 0.0, 0.0)
    a.x_pos = 2**48 + 16  # pointers are full 64-bit ints
    assert a.x_pos == 2**48 + 16
    a.m_pos = 3 * 2**31  # shapes are int64
    assert a.m_pos == 3 * 2**31
    with pytest.raises(AttributeError):
        a.not_a_field = 1  # a typo in cuda_backend.py would fail loudly
    with pytest.raises(AttributeError):
        a.momentum = 0.9  # replaced by the SGD coefficients


def test_plan(ext):
    """Workspace, batch split and launch count, from the shapes and the SM count alone."""
    a = _valid_args(ext)
    a.m_pos = a.m_neg = 5
    a.n, a.k, a.weight_stride_row = 7, 5, 5
    a.mode = ext.FF_MODE_FORWARD
    plan = ext.ff_layer_plan(a)
    assert (plan.workspace_floats, plan.wgrad_splits, plan.launches) == (12, 0, 2)  # q [m], padded
    a.dtype = 1  # fp16: + the range exponents, one int8 per row and 32 columns
    assert ext.ff_layer_plan(a).workspace_floats == 12 + 4
    a.dtype = 0
    for mode in (ext.FF_MODE_GRADIENT, ext.FF_MODE_UPDATE):
        a.mode = mode
        plan = ext.ff_layer_plan(a)  # 1 tile, 10 rows: one chunk, finished in the epilogue
        assert (plan.workspace_floats, plan.wgrad_splits, plan.launches) == (12 + 12 + 4, 1, 3)
        a.peer_mean = 0x9000  # + hsum [n], p [n], + the peer kernel
        plan = ext.ff_layer_plan(a)
        assert (plan.workspace_floats, plan.wgrad_splits, plan.launches) == (28 + 16, 1, 4)
        a.peer_mean = 0
    a.m_pos = a.m_neg = 100000  # 132 SMs, 1 tile: the batch splits, + gb [n], gW [n k], apply kernel
    plan = ext.ff_layer_plan(a)
    assert plan.wgrad_splits > 1 and plan.launches == 4
    assert plan.workspace_floats == 2 * 200000 + 4 + 7 * 5  # no bias: no gb
    a.m_pos = a.m_neg = 8192  # DESIGN section 5's large shape: 1024 tiles fill 132 SMs, no scratch
    a.n = a.k = a.weight_stride_row = 4096
    plan = ext.ff_layer_plan(a)
    assert plan.wgrad_splits == 1 and plan.workspace_floats == 2 * 16384 + 4
    with pytest.raises(ValueError, match="m_pos"):
        a.m_pos = 0
        ext.ff_layer_plan(a)


def _valid_args(ext, mode=None):
    """Arguments that pass validation (fake, never-dereferenced pointers; 132 SMs, so no query)."""
    a = ext.FFLayerArgs()
    a.mode = ext.FF_MODE_GRADIENT if mode is None else mode
    a.sm_count = 132
    a.x_pos, a.m_pos, a.x_pos_stride_row, a.x_pos_stride_col = 0x1000, 4, 8, 1
    a.x_neg, a.m_neg, a.x_neg_stride_row, a.x_neg_stride_col = 0x2000, 4, 8, 1
    a.weight, a.n, a.k, a.weight_stride_row, a.weight_stride_col = 0x3000, 6, 8, 8, 1
    a.y, a.g, a.loss_out, a.workspace, a.grad_weight = 0x4000, 0x5000, 0x6000, 0x7000, 0x8000
    a.nonfinite_out = 0x6100
    a.workspace_floats = 1 << 20
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
    ("workspace_floats", 10, "workspace_floats"),
    ("peer_rho", 1.0, "peer_rho"),
    ("peer_kappa", float("nan"), "peer_kappa"),
    ("nonfinite_out", 0, "nonfinite_out"),
    ("skip_nonfinite", 2, "skip_nonfinite"),
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


@pytest.mark.parametrize("field,value,match", [
    ("lr", float("inf"), "finite"),
    ("gain", float("nan"), "finite"),
    ("buf_bias", 0xA000, "buf_bias"),  # without buf_weight
])
def test_run_rejects_bad_update_arguments(ext, field, value, match):
    a = _valid_args(ext, mode=ext.FF_MODE_UPDATE)
    setattr(a, field, value)
    with pytest.raises(ValueError, match=match):
        ext.ff_layer_run(a)


def _valid_sgd_args(ext):
    a = ext.FFSgdArgs()
    a.sm_count = 132
    a.param, a.grad, a.numel, a.lr = 0x1000, 0x2000, 10, 0.1
    return a


@pytest.mark.parametrize("field,value,match", [
    ("dtype", 3, "dtype"),
    ("numel", -1, "numel"),
    ("param", 0, "pointer"),
    ("grad", 0, "pointer"),
    ("buf_f32", 2, "buf_f32"),
    ("lr", float("nan"), "finite"),
    ("wd_step", float("inf"), "finite"),
    ("device", -1, "device"),
])
def test_sgd_update_rejects_bad_arguments_before_touching_cuda(ext, field, value, match):
    a = _valid_sgd_args(ext)
    setattr(a, field, value)
    with pytest.raises(ValueError, match=f"ff_sgd_update: .*{match}"):
        ext.ff_sgd_update(a)


def test_sgd_update_of_nothing_is_a_no_op(ext):
    a = _valid_sgd_args(ext)
    a.numel, a.param, a.grad = 0, 0, 0
    ext.ff_sgd_update(a)  # no device needed: nothing to launch


def test_run_rejects_peer_norm_in_forward_mode(ext):
    a = _valid_args(ext, mode=ext.FF_MODE_FORWARD)
    a.peer_mean = 0x9000
    with pytest.raises(ValueError, match="peer_mean"):
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
    """Sets torch.backends.cuda.matmul.fp32_precision ("tf32"/"ieee", the new API: reading the legacy
    allow_tf32 raises once it is set) for the test, restores it after."""
    matmul = torch.backends.cuda.matmul
    old = matmul.fp32_precision
    yield lambda on: setattr(matmul, "fp32_precision", "tf32" if on else "ieee")
    matmul.fp32_precision = old


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
def test_available_backends_on_gpu_follow_priorities():
    """With a GPU, "cuda" is available; the list and "auto" follow the registry priorities (Triton
    ranks above CUDA until GPU benchmarks say otherwise), the reference last."""
    names = ffk.available_backends()
    registry = ffk.backends.registered_backends()
    assert "cuda" in names and names[-1] == "torch"
    assert [registry[n].priority for n in names] == sorted((registry[n].priority for n in names),
                                                            reverse=True)
    expected = "triton" if "triton" in names else "cuda"
    assert names[0] == expected
    assert ffk.backends.select_backend("auto", torch.device("cuda", 0), torch.float32).name == expected


# ================================================================ GPU: SGD rules, peer norm, NaN, range

# ops.ff_layer_step's SGD keywords; "created" buffers: momentum_buffers=None, PyTorch's first step.
SGD_RULES = {
    "plain": dict(momentum=0.0, weight_decay=0.01),
    "momentum": dict(momentum=0.9, weight_decay=0.01, buffers="float32"),
    "dampening": dict(momentum=0.9, dampening=0.3, weight_decay=0.01, buffers="weight_dtype"),
    "first-step": dict(momentum=0.9, dampening=0.5, weight_decay=0.01, buffers="created"),
    "hinton": dict(momentum=0.9, dampening=0.9, weight_decay=0.001, decoupled_weight_decay=True,
                   buffers="float32"),
}
PEER_CONFIGS = {  # strong enough that the peer term visibly moves the gradient (checked)
    "hinton": ffk.FFConfig(goodness="sum", norm="rms", theta=3.0, peer_norm="hinton", peer_lambda=5.0),
    "loewex": ffk.FFConfig(goodness="mean", norm="l2", theta=0.3, loss="symba", alpha=1.5,
                           peer_norm="loewex", peer_lambda=750.0),
}


def _update_step_and_check(dt, rule, m_pos, k, n, bias, tf32_mode, config=ALL_CONFIGS[3], peer=False):
    dtype, tf32 = dt
    tf32_mode(tf32)
    tol = _tol(dtype, tf32)
    m_neg = m_pos if config.loss == "symba" else m_pos + 3
    x_pos, x_neg, w, b = _layer(m_pos, m_neg, k, n, dtype, tf32, bias=bias)
    kw = dict(SGD_RULES[rule])
    buffers = kw.pop("buffers", "none")
    bufs = None
    if buffers in ("float32", "weight_dtype"):
        bdt = torch.float32 if buffers == "float32" else dtype
        bufs = (torch.randn(w.shape, device="cuda").mul_(0.01).to(bdt),
                None if b is None else torch.randn(b.shape, device="cuda").mul_(0.01).to(bdt))
    mean = torch.rand(n, device="cuda") + 0.25 if peer else None
    mean0 = mean.double() if peer else None
    w0, b0 = w.clone(), None if b is None else b.clone()
    bufs0 = None if bufs is None else tuple(None if t is None else t.clone() for t in bufs)
    ref, w_ref, b_ref = float64_reference(x_pos, x_neg, w0, b0, config, lr=0.5, momentum_buffers=bufs0,
                                          peer_mean=None if mean is None else mean0.clone(), **kw)
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, lr=0.5, momentum_buffers=bufs,
                            peer_mean=mean, backend="cuda", **kw)
    assert out.grad_weight is None and out.grad_bias is None
    assert_step_close(out, ref, tol, f"update {rule}")
    delta_tol = tol if dtype == torch.float32 else 4 * tol
    assert rel_err(w.double() - w0.double(), w_ref - w0.double()) <= delta_tol
    if b is not None:
        assert rel_err(b.double() - b0.double(), b_ref - b0.double()) <= delta_tol
    if kw["momentum"]:
        assert rel_err(out.momentum_buffers[0], ref.momentum_buffers[0]) <= delta_tol
        if b is not None:
            assert rel_err(out.momentum_buffers[1], ref.momentum_buffers[1]) <= delta_tol
    if peer:
        assert out.peer_mean is mean
        assert rel_err(mean.double() - mean0, ref.peer_mean - mean0) <= tol


@requires_cuda
@pytest.mark.parametrize("rule", list(SGD_RULES))
@pytest.mark.parametrize("dt", DTYPES)
def test_sgd_rules(dt, rule, tf32_mode):
    """Every SGD rule (momentum, dampening, first step, Hinton's decoupled weight decay), finished in
    the weight-gradient epilogue (60+63 rows: one batch chunk) and through the split path (3000+3003
    rows: several chunks and the apply kernel)."""
    bias = list(SGD_RULES).index(rule) % 2 == 0
    _update_step_and_check(dt, rule, 60, 50, 140, bias, tf32_mode)
    _update_step_and_check(dt, rule, 3000, 50, 140, not bias, tf32_mode)


@requires_cuda
@pytest.mark.parametrize("mode", ["gradient", "update"])
@pytest.mark.parametrize("form", list(PEER_CONFIGS))
@pytest.mark.parametrize("dt", DTYPES)
def test_peer_norm(dt, form, mode, tf32_mode):
    """Peer normalisation, both forms, both modes, unsplit (40 rows) and split (3000 rows): outputs,
    gradients or updated parameters, and the running mean against the float64 reference."""
    config = PEER_CONFIGS[form]
    for m_pos in (40, 3000):
        bias = (m_pos == 40) == (form == "hinton")
        if mode == "update":
            rule = "hinton" if form == "hinton" else "momentum"
            _update_step_and_check(dt, rule, m_pos, 40, 36, bias, tf32_mode, config=config, peer=True)
            continue
        dtype, tf32 = dt
        tf32_mode(tf32)
        tol = _tol(dtype, tf32)
        x_pos, x_neg, w, b = _layer(m_pos, m_pos, 40, 36, dtype, tf32, bias=bias)
        mean = torch.rand(36, device="cuda") + 0.25
        mean0 = mean.double()
        ref, _, _ = float64_reference(x_pos, x_neg, w, b, config, peer_mean=mean0.clone())
        out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, peer_mean=mean, backend="cuda")
        assert_step_close(out, ref, tol, f"peer {form} {m_pos}")
        assert rel_err(mean.double() - mean0, ref.peer_mean - mean0) <= tol
        no_peer, _, _ = float64_reference(x_pos, x_neg, w, b, dataclasses.replace(config, peer_norm="none"))
        assert rel_err(no_peer.grad_weight, ref.grad_weight) > 10 * tol


@requires_cuda
@pytest.mark.parametrize("where", ["x_pos", "x_neg", "weight", "bias"])
@pytest.mark.parametrize("dt", DTYPES)
def test_nan_reaches_the_loss(dt, where, tf32_mode):
    """One NaN in x_pos, x_neg, W or b: NaN loss; y, g, gradients and the running mean NaN exactly
    where the float64 reference has NaN, the rest as the reference (x_neg/bias: split path)."""
    dtype, tf32 = dt
    tf32_mode(tf32)
    tol = _tol(dtype, tf32)
    m_pos, n = (3000 if where in ("x_neg", "bias") else 20), 40
    config = ffk.FFConfig(goodness="sum", norm="none", theta=3.0, peer_norm="hinton", peer_lambda=0.5)
    x_pos, x_neg, w, b = _layer(m_pos, m_pos + 1, 30, n, dtype, tf32)
    target = {"x_pos": x_pos, "x_neg": x_neg, "weight": w, "bias": b}[where]
    target[(5,) if where == "bias" else (3, 7)] = float("nan")
    mean = torch.rand(n, device="cuda") + 0.25
    ref, _, _ = float64_reference(x_pos, x_neg, w, b, config, peer_mean=mean.double())
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, peer_mean=mean, backend="cuda")
    assert torch.isnan(out.loss) and torch.isnan(ref.loss)
    assert out.nonfinite.dtype == torch.bool and out.nonfinite.device == w.device
    assert bool(out.nonfinite) and bool(ref.nonfinite)
    pairs = {name: (getattr(out, name), getattr(ref, name))
             for name in ("y_pos", "y_neg", "g_pos", "g_neg", "grad_weight", "grad_bias")}
    pairs["peer_mean"] = (mean, ref.peer_mean)
    y, g = ffk.ff_layer_forward(x_pos, w, b, config=config, backend="cuda")
    y_ref, g_ref = ffk.ff_layer_forward(x_pos.double(), w.double(), b.double(), config=config,
                                        backend="torch")
    pairs.update(forward_y=(y, y_ref), forward_g=(g, g_ref))
    for name, (o, r) in pairs.items():
        nan = torch.isnan(r)
        assert torch.equal(torch.isnan(o), nan), f"{where}: NaN pattern of {name}"
        if not nan.all():
            assert rel_err_in_dtype(o[~nan], r[~nan]) <= tol, name


@requires_cuda
@pytest.mark.parametrize("case", ["u0-255-rms", "u0-255-l2", "huge-h", "tiny-h"])
def test_fp16_range(case):
    """fp16 must not overflow or underflow where the float32 reference does not (DESIGN 6): x ~
    U(0, 255); |h| ~ 1e5 > 65504 with y normalised to O(1); |h| ~ 1e-6 with y O(1)."""
    x_pos, x_neg, w, b, config = fp16_range_inputs(case)
    x_pos, x_neg, w, b = (t.to("cuda", torch.float16) for t in (x_pos, x_neg, w, b))
    tol = TOLERANCE[torch.float16]
    ref, _, _ = float64_reference(x_pos, x_neg, w, b, config)
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, backend="cuda")
    y, g = ffk.ff_layer_forward(x_pos, w, b, config=config, backend="cuda")
    y_ref, g_ref = ffk.ff_layer_forward(x_pos.double(), w.double(), b.double(), config=config,
                                        backend="torch")
    assert torch.isfinite(y).all() and torch.isfinite(g).all()
    assert rel_err_in_dtype(y, y_ref) <= tol and rel_err_in_dtype(g, g_ref) <= tol
    if case == "huge-h":
        assert torch.isfinite(out.y_pos).all() and torch.isfinite(out.y_neg).all()
        ref.grad_weight = ref.grad_bias = None  # fp16 overflows them in the reference too
    else:
        for t in (out.y_pos, out.y_neg, out.g_pos, out.loss, out.grad_weight, out.grad_bias):
            assert torch.isfinite(t).all()
    assert_step_close(out, ref, tol, case)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_twenty_training_steps_agree_with_reference(dtype, tf32_mode):
    """Hinton's recipe: his peer normalisation, SGD lr 0.01 with gradient smoothing (momentum 0.9,
    dampening 0.9) and decoupled weight decay 0.001; 20 steps, cuda against the reference backend,
    running means included."""
    tf32_mode(False)
    gen = torch.Generator().manual_seed(1234)
    k, n, b_sz = 64, 96, 128
    w0 = (torch.randn(n, k, generator=gen) / k ** 0.5).to("cuda", dtype)
    b0 = (torch.randn(n, generator=gen) * 0.1).to("cuda", dtype)
    params = {name: (w0.clone(), b0.clone()) for name in ("cuda", "torch")}
    state = {name: (None, None) for name in ("cuda", "torch")}  # (momentum buffers, peer mean)
    losses = {"cuda": [], "torch": []}
    config = ffk.FFConfig.hinton()
    for _ in range(20):
        x_pos = torch.randn(b_sz, k, generator=gen).to("cuda", dtype)
        x_neg = torch.randn(b_sz, k, generator=gen).to("cuda", dtype) * 0.5
        for name in ("cuda", "torch"):
            w, b = params[name]
            bufs, mean = state[name]
            out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, lr=0.01, momentum=0.9,
                                    dampening=0.9, weight_decay=0.001, decoupled_weight_decay=True,
                                    momentum_buffers=bufs, peer_mean=mean, backend=name)
            state[name] = (out.momentum_buffers, out.peer_mean)
            losses[name].append(out.loss.item())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    w_c, w_t = params["cuda"][0].double(), params["torch"][0].double()
    assert rel_err(w_c - w0.double(), w_t - w0.double()) <= tol
    assert rel_err(torch.tensor(losses["cuda"]), torch.tensor(losses["torch"])) <= tol
    assert rel_err(state["cuda"][1].double() - 0.5, state["torch"][1].double() - 0.5) <= tol
    assert (w_c - w0.double()).abs().max() > 0  # the update was applied


# ================================================================ GPU: non-finite steps

def _output_pairs(out, ref) -> dict:
    names = ("y_pos", "y_neg", "g_pos", "g_neg", "grad_weight", "grad_bias")
    return {name: (getattr(out, name), getattr(ref, name)) for name in names
            if getattr(ref, name) is not None}


def _assert_like_reference(pairs, tol, what):
    """NaN exactly where the reference has NaN, the rest within tol of it."""
    for name, (o, r) in pairs.items():
        nan = torch.isnan(r)
        assert torch.equal(torch.isnan(o).cpu(), nan.cpu()), f"{what}: NaN pattern of {name}"
        if not nan.all():
            assert rel_err_in_dtype(o[~nan], r[~nan]) <= tol, f"{what}: {name}"


def _nonfinite_layer(case, dt, m_pos=20, n=40, k=30):
    """A layer with one non-finite value. "inf-<where>": +inf in x_pos, x_neg, W or b. Where the
    ReLU hides it and nothing downstream shows it: "dead-bias": b_5 = -inf (column 5 dead in every
    row); "dead-x_pos": x_pos[3, 7] = -inf with W[:, 7] > 0 (row 3 dead; its gradient terms
    0 * -inf make column 7 of grad_weight NaN, in the reference too)."""
    dtype, tf32 = dt
    x_pos, x_neg, w, b = _layer(m_pos, m_pos + 1, k, n, dtype, tf32)
    if case == "dead-bias":
        b[5] = float("-inf")
    elif case == "dead-x_pos":
        w[:, 7] = w[:, 7].abs() + 0.125
        x_pos[3, 7] = float("-inf")
    else:
        where = case.split("-", 1)[1]
        target = {"x_pos": x_pos, "x_neg": x_neg, "weight": w, "bias": b}[where]
        target[(5,) if where == "bias" else (3, 7)] = float("inf")
    return x_pos, x_neg, w, b


@requires_cuda
@pytest.mark.parametrize("case", ["inf-x_pos", "inf-x_neg", "inf-weight", "inf-bias", "dead-bias",
                                  "dead-x_pos"])
@pytest.mark.parametrize("dt", DTYPES)
def test_nonfinite_sets_the_flag(dt, case, tf32_mode):
    """+inf in x_pos, x_neg, W or b, or -inf hidden by the ReLU: out.nonfinite (a 0-dim bool on the
    device) is True and the loss NaN, as in the reference; where the ReLU hid it, y, g and the
    gradients are the reference's (NaN exactly where its are)."""
    tf32_mode(dt[1])
    config = ffk.FFConfig(goodness="mean", norm="rms", theta=0.3)
    x_pos, x_neg, w, b = _nonfinite_layer(case, dt)
    ref, _, _ = float64_reference(x_pos, x_neg, w, b, config)
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, backend="cuda")
    assert out.nonfinite.shape == () and out.nonfinite.device == w.device
    assert bool(out.nonfinite) and bool(ref.nonfinite)
    assert torch.isnan(out.loss) and torch.isnan(ref.loss)
    if case.startswith("dead"):
        _assert_like_reference(_output_pairs(out, ref), _tol(*dt), case)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sum_of_squares_overflow_sets_the_flag(dtype, tf32_mode):
    """Every z finite (~1e20) but q_i = sum_j h_ij^2 overflows float32: flagged, NaN loss, as the
    float32 reference (float64 would not overflow: compared with the same-dtype reference)."""
    tf32_mode(False)
    x_pos, x_neg, w, b = make_layer(20, 21, 30, 40, dtype=dtype, device="cuda")
    x_pos[3] *= 1e20
    ref = ffk.ff_layer_step(x_pos, x_neg, w, b, backend="torch")
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, backend="cuda")
    assert bool(ref.nonfinite) and bool(out.nonfinite) and torch.isnan(out.loss)


@requires_cuda
@pytest.mark.parametrize("dt", DTYPES)
def test_finite_step_is_not_flagged(dt, tf32_mode):
    config = ALL_CONFIGS[0]
    out = _run_and_check(30, 31, 40, 50, *dt, config, tf32_mode)
    assert out.nonfinite.dtype == torch.bool and not bool(out.nonfinite)


@requires_cuda
@pytest.mark.parametrize("dt", DTYPES)
def test_skip_nonfinite_gradient_mode(dt, tf32_mode):
    """Gradient mode, Hinton's peer norm, b_5 = -inf (flagged, every output finite): with
    skip_nonfinite the running mean keeps its value (bitwise) and the gradients take the peer term
    from the old mean, as the reference's; without it the mean moves, as the reference's."""
    tf32_mode(dt[1])
    tol = _tol(*dt)
    config = PEER_CONFIGS["hinton"]
    x_pos, x_neg, w, b = _nonfinite_layer("dead-bias", dt, n=36)
    for skip in (True, False):
        mean = torch.rand(36, device="cuda") + 0.25
        mean0 = mean.clone()
        ref, _, _ = float64_reference(x_pos, x_neg, w, b, config, peer_mean=mean0.double(),
                                      skip_nonfinite=skip)
        out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, peer_mean=mean,
                                skip_nonfinite=skip, backend="cuda")
        assert bool(out.nonfinite) and torch.isnan(out.loss)
        _assert_like_reference(_output_pairs(out, ref), tol, f"skip={skip}")
        if skip:
            assert torch.equal(mean, mean0)
        else:
            assert rel_err(mean.double() - mean0.double(), ref.peer_mean - mean0.double()) <= tol


@requires_cuda
@pytest.mark.parametrize("m_pos", [20, 3000], ids=["unsplit", "split"])
@pytest.mark.parametrize("dt", DTYPES)
def test_skip_nonfinite_update_mode(dt, m_pos, tf32_mode):
    """Update mode (Hinton's rule, float32 buffers, his peer norm), a NaN in x_neg: with
    skip_nonfinite, W, b, both buffers and the running mean stay bitwise as they were (epilogue or
    split + apply finish); the flag is set, the loss NaN, y and g still written. Then the same step
    on finite data with skip_nonfinite updates everything as the reference."""
    dtype, tf32 = dt
    tf32_mode(tf32)
    config = PEER_CONFIGS["hinton"]
    sgd = dict(lr=0.5, momentum=0.9, dampening=0.9, weight_decay=0.01, decoupled_weight_decay=True)
    x_pos, x_neg, w, b = _layer(m_pos, m_pos + 1, 30, 36, dtype, tf32)
    bufs = (torch.randn(w.shape, device="cuda").mul_(0.01), torch.randn(b.shape, device="cuda").mul_(0.01))
    mean = torch.rand(36, device="cuda") + 0.25
    clean = x_neg.clone()
    x_neg[3, 7] = float("nan")
    before = [t.clone() for t in (w, b, *bufs, mean)]
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, momentum_buffers=bufs, peer_mean=mean,
                            skip_nonfinite=True, backend="cuda", **sgd)
    assert bool(out.nonfinite) and torch.isnan(out.loss)
    for name, now, was in zip(("weight", "bias", "buf_weight", "buf_bias", "peer_mean"),
                              (w, b, *bufs, mean), before):
        assert torch.equal(now, was), f"{name} changed"
    assert torch.isnan(out.g_neg[3]) and torch.isfinite(out.g_pos).all()
    # finite data: skip_nonfinite changes nothing
    ref, w_ref, b_ref = float64_reference(x_pos, clean, w, b, config, momentum_buffers=bufs,
                                          peer_mean=mean.double(), **sgd)
    out = ffk.ff_layer_step(x_pos, clean, w, b, config=config, momentum_buffers=bufs, peer_mean=mean,
                            skip_nonfinite=True, backend="cuda", **sgd)
    assert not bool(out.nonfinite)
    tol = _tol(dtype, tf32)
    assert_step_close(out, ref, tol, "finite with skip_nonfinite")
    delta_tol = tol if dtype == torch.float32 else 4 * tol
    assert rel_err(w.double() - before[0].double(), w_ref - before[0].double()) <= delta_tol
    assert rel_err(mean.double() - before[4].double(), ref.peer_mean - before[4].double()) <= tol


@requires_cuda
@pytest.mark.parametrize("dt", DTYPES)
def test_huge_threshold_gives_a_finite_loss(dt, tf32_mode):
    """theta = 1e38 (goodness "sum"): the loss ~5e37 is finite (each term is divided by M before
    any sum: summing 21 terms of 1e38 first would overflow float32) and the reference's."""
    config = ffk.FFConfig(goodness="sum", norm="l2", theta=1e38)
    out = _run_and_check(21, 19, 40, 36, *dt, config, tf32_mode)
    assert torch.isfinite(out.loss) and out.loss > 1e37


# ================================================================ GPU: sgd_update_

SGD_UPDATE_RULES = {  # sgd_update_ keywords; buffers as in SGD_RULES ("created": None, first step)
    "plain": dict(momentum=0.0, weight_decay=0.01),
    "momentum": dict(momentum=0.9, weight_decay=0.01, buffers="float32"),
    "momentum-dtypebuf": dict(momentum=0.9, weight_decay=0.01, buffers="weight_dtype"),
    "dampening": dict(momentum=0.9, dampening=0.3, weight_decay=0.01, buffers="float32"),
    "first-step": dict(momentum=0.9, dampening=0.5, weight_decay=0.01, buffers="created"),
    "hinton": dict(momentum=0.9, dampening=0.9, weight_decay=0.001, decoupled_weight_decay=True,
                   buffers="float32"),
    "hinton-first": dict(momentum=0.9, dampening=0.9, weight_decay=0.02, decoupled_weight_decay=True,
                         buffers="created"),
}


@requires_cuda
@pytest.mark.parametrize("skip", [None, False, True], ids=["no-skip", "skip-false", "skip-true"])
@pytest.mark.parametrize("rule", list(SGD_UPDATE_RULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_sgd_update_matches_reference(dtype, rule, skip):
    """ffk.sgd_update_(backend="cuda") against backend="torch": every rule, fp32/fp16/bf16 params
    (a 2-D weight of 1000 x 77 entries, misaligned by one element on every other rule, and its
    bias), float32 or param-dtype buffers; skip=True (a device tensor) changes nothing, bitwise."""
    kw = dict(SGD_UPDATE_RULES[rule])
    buffers = kw.pop("buffers", "none")
    off = list(SGD_UPDATE_RULES).index(rule) % 2
    flag = None if skip is None else torch.tensor(skip, device="cuda")
    rtol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    for shape in ((1000, 77), (77,)):
        numel = torch.Size(shape).numel()
        param = torch.randn(numel + off, device="cuda").to(dtype)[off:].view(shape)
        grad = torch.randn(numel + off, device="cuda").to(dtype)[off:].view(shape)
        buf = None
        if buffers in ("float32", "weight_dtype"):
            buf = torch.randn(shape, device="cuda").mul_(0.1).to(
                torch.float32 if buffers == "float32" else dtype)
        p_ref, buf_ref = param.clone(), None if buf is None else buf.clone()
        p0 = param.clone()
        buf_ref = ffk.sgd_update_(p_ref, grad, buf_ref, lr=0.5, skip=flag, backend="torch", **kw)
        buf_out = ffk.sgd_update_(param, grad, buf, lr=0.5, skip=flag, backend="cuda", **kw)
        if skip:
            assert torch.equal(param, p0)
            if buffers in ("float32", "weight_dtype"):
                assert torch.equal(buf_out, buf_ref)
            continue
        torch.testing.assert_close(param.float(), p_ref.float(), rtol=rtol, atol=1e-6)
        if buf_out is not None:
            b_rtol = 1e-6 if buf_out.dtype == torch.float32 else rtol
            torch.testing.assert_close(buf_out.float(), buf_ref.float(), rtol=b_rtol, atol=1e-6)


@requires_cuda
def test_update_mode_is_gradient_mode_plus_sgd_update(tf32_mode):
    """One copy of the update math: an fp32 update step (one chunk, one column tile) equals the
    gradient-mode step followed by sgd_update_ on its gradients (bitwise in the emulator; here to
    1e-6, as nvcc may contract the two kernels' multiply-adds differently)."""
    tf32_mode(False)
    x_pos, x_neg, w, b = make_layer(30, 31, 40, 100, device="cuda")
    bufs = (torch.randn(w.shape, device="cuda").mul_(0.1), torch.randn(b.shape, device="cuda").mul_(0.1))
    w2, b2, bufs2 = w.clone(), b.clone(), tuple(t.clone() for t in bufs)
    sgd = dict(lr=0.5, momentum=0.9, dampening=0.9, weight_decay=0.001, decoupled_weight_decay=True)
    ffk.ff_layer_step(x_pos, x_neg, w, b, momentum_buffers=bufs, backend="cuda", **sgd)
    grads = ffk.ff_layer_step(x_pos, x_neg, w2, b2, backend="cuda")
    ffk.sgd_update_(w2, grads.grad_weight, bufs2[0], backend="cuda", **sgd)
    ffk.sgd_update_(b2, grads.grad_bias, bufs2[1], backend="cuda", **sgd)
    for now, other in zip((w, b, *bufs), (w2, b2, *bufs2)):
        torch.testing.assert_close(now, other, rtol=1e-6, atol=1e-7)


# ================================================================ GPU: steady state, graphs

def _count_outputs(monkeypatch):
    """Count cuda_backend's output allocations (new_output calls)."""
    import ff_kernels.cuda_backend as cb
    calls = []
    real = cb.new_output
    monkeypatch.setattr(cb, "new_output", lambda shape, dtype, device: calls.append(tuple(shape))
                        or real(shape, dtype, device))
    return calls


@requires_cuda
def test_steady_state_no_sync_no_allocation_beyond_outputs(monkeypatch, tf32_mode):
    """After a warm-up step, a step (gradient mode with peer norm and skip_nonfinite; update mode
    with buffers) runs under torch.cuda.set_sync_debug_mode("error") and allocates exactly its
    outputs (torch's allocation counter: y, g, loss, nonfinite, + grad_weight, grad_bias in
    gradient mode): the workspace is cached per stream. sgd_update_ with the step's flag as skip
    allocates nothing and does not sync either."""
    tf32_mode(True)
    x_pos, x_neg, w, b = make_layer(64, 64, 32, 48, device="cuda")
    config = ffk.FFConfig.hinton()
    mean = torch.full((48,), 0.5, device="cuda")
    bufs = tuple(torch.zeros_like(t) for t in (w, b))
    calls = _count_outputs(monkeypatch)

    def steps():
        out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, peer_mean=mean,
                                skip_nonfinite=True, backend="cuda")
        ffk.sgd_update_(w, out.grad_weight, bufs[0], lr=0.01, momentum=0.9, skip=out.nonfinite,
                        backend="cuda")
        ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, lr=0.01, momentum=0.9,
                          momentum_buffers=bufs, peer_mean=mean, skip_nonfinite=True, backend="cuda")

    steps()  # warm-up: the workspace of this stream is allocated here
    torch.cuda.synchronize()
    calls.clear()
    allocs = torch.cuda.memory_stats()["allocation.all.allocated"]
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps()
    finally:
        torch.cuda.set_sync_debug_mode(old)
    assert torch.cuda.memory_stats()["allocation.all.allocated"] - allocs == len(calls) == 6 + 4


@requires_cuda
@pytest.mark.parametrize("mode", ["gradient", "update"])
def test_cuda_graph_capture_and_replay(mode, tf32_mode):
    """A step captured in a CUDA graph (torch.cuda.CUDAGraph) and replayed on new data in its static
    inputs gives what eager steps give: outputs and, in update mode, the weight, bias, buffers and
    running mean after three replays against three eager steps from the same start."""
    tf32_mode(False)
    config = ffk.FFConfig.hinton()
    x_pos, x_neg, w, b = make_layer(96, 96, 64, 80, device="cuda", seed=11)
    sgd = dict(lr=0.01, momentum=0.9, dampening=0.9, weight_decay=0.001, decoupled_weight_decay=True)
    state = {"w": w, "b": b, "bw": torch.zeros_like(w), "bb": torch.zeros_like(b),
             "mean": torch.full((80,), 0.5, device="cuda")}
    start = {k: v.clone() for k, v in state.items()}
    static = {"x_pos": x_pos.clone(), "x_neg": x_neg.clone()}

    def step(s, xp, xn):
        kw = dict(lr=sgd["lr"], momentum=sgd["momentum"], dampening=sgd["dampening"],
                  weight_decay=sgd["weight_decay"], decoupled_weight_decay=True,
                  momentum_buffers=(s["bw"], s["bb"])) if mode == "update" else {}
        return ffk.ff_layer_step(xp, xn, s["w"], s["b"], config=config, peer_mean=s["mean"],
                                 skip_nonfinite=True, backend="cuda", **kw)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs recommends
        warm = {k: v.clone() for k, v in start.items()}
        step(warm, static["x_pos"], static["x_neg"])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(state, static["x_pos"], static["x_neg"])
    for name in state:  # capture runs nothing: start the replays from the start values
        state[name].copy_(start[name])
    eager = {k: v.clone() for k, v in start.items()}
    gen = torch.Generator(device="cuda").manual_seed(3)
    for _ in range(3):
        xp = torch.randn(x_pos.shape, device="cuda", generator=gen)
        xn = torch.randn(x_neg.shape, device="cuda", generator=gen)
        static["x_pos"].copy_(xp)
        static["x_neg"].copy_(xn)
        graph.replay()
        ref = step(eager, xp, xn)
        torch.cuda.synchronize()
        for name in ("y", "g", "loss", "nonfinite", "grad_weight", "grad_bias"):
            got, want = getattr(captured, name), getattr(ref, name)
            if want is None:
                assert got is None
            elif want.dtype == torch.bool:
                assert torch.equal(got, want)
            else:
                assert rel_err(got, want) < 1e-5, name
    for name in state:
        assert rel_err(state[name], eager[name]) < 1e-5, name
    if mode == "update":
        assert not torch.equal(state["w"], start["w"])
