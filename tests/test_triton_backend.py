"""The Triton backend against the float64 reference.

On a machine without a GPU, conftest.py sets TRITON_INTERPRET=1 and every kernel runs in Triton's
interpreter on small odd shapes (fp32 and fp16; bf16 tl.dot is wrong in the interpreter). Every
output starts as NaN (conftest poisons new_output), so an element a kernel misses fails the test.
Tests marked ``requires_cuda`` need a GPU: bf16, the large shapes, streams and training runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ff_kernels as ffk
from tests.conftest import requires_cuda
from tests.utils import ALL_CONFIGS, TOLERANCE, config_id, float64_reference, make_layer, rel_err

tb = pytest.importorskip("ff_kernels.triton_backend")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Small odd shapes (B+, B-, K, N): nothing is a multiple of a block (32 or 64 in the interpreter).
# FULL: N = 20 fits one program (the full-row path); TILED: N = 80 spans three column tiles of 32.
FULL = (37, 29, 45, 20)
TILED = (35, 41, 50, 80)
# both goodness forms, all norms, both losses
SOME_CONFIGS = [ALL_CONFIGS[i] for i in (0, 3, 7, 10)]


def _shape(shape, config):
    """SymBa pairs rows by index: B- = B+."""
    mp, mn, k, n = shape
    return (mp, mp, k, n) if config.loss == "symba" else shape


def _tol(dtype) -> float:
    if dtype == torch.float32 and torch.cuda.is_available() and torch.backends.cuda.matmul.allow_tf32:
        return TOLERANCE["tf32"]
    return TOLERANCE[dtype]


def _update_err(new, old, ref_new) -> float:
    """Relative error of the step (new - old) against the reference step, less what rounding the
    parameter to its own dtype can explain."""
    step = new.double().cpu() - old.double().cpu()
    ref_step = ref_new.double().cpu() - old.double().cpu()
    rounding = torch.finfo(new.dtype).eps * ref_new.double().cpu().norm().item()
    return max(0.0, (step - ref_step).norm().item() - rounding) / ref_step.norm().item()


def check_step(shape, config, dtype=torch.float32, bias=True, update=False, momentum_buffers=None,
               transform=None, seed=None, device=DEVICE, tol=None):
    """Run one step on the Triton backend and compare every output with the float64 reference
    (inputs from the test's printed torch seed unless ``seed`` is given)."""
    mp, mn, k, n = _shape(shape, config)
    x_pos, x_neg, w, b = make_layer(mp, mn, k, n, dtype=dtype, device=device, bias=bias, seed=seed)
    if transform is not None:
        x_pos, x_neg, w = transform(x_pos), transform(x_neg), transform(w) if not update else w
    kw = {}
    if update:
        kw = dict(lr=0.5, momentum=0.9, weight_decay=0.05)
        if momentum_buffers is not None:
            kw["momentum_buffers"] = momentum_buffers(w, b)
    ref, ref_w, ref_b = float64_reference(x_pos, x_neg, w, b, config, **kw)
    w0 = w.clone()
    b0 = b.clone() if b is not None else None
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=config, backend="triton", **kw)

    tol = tol or _tol(dtype)
    for name in ("y_pos", "y_neg", "g_pos", "g_neg", "loss"):
        got, want = getattr(out, name), getattr(ref, name)
        assert got.shape == want.shape, name
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        assert rel_err(got, want) <= tol, f"{name}: rel err {rel_err(got, want):.3g} > {tol}"
    assert out.y_pos.dtype == dtype and out.g_pos.dtype == torch.float32
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    if not update:
        assert out.grad_weight.dtype == dtype and out.grad_weight.shape == w.shape
        assert rel_err(out.grad_weight, ref.grad_weight) <= tol
        if bias:
            assert out.grad_bias.dtype == dtype
            assert rel_err(out.grad_bias, ref.grad_bias) <= tol
        else:
            assert out.grad_bias is None
        assert torch.equal(w, w0), "gradient mode must not change the weight"
        return out
    assert out.grad_weight is None and out.grad_bias is None
    assert _update_err(w, w0, ref_w) <= tol, f"weight step: rel err {_update_err(w, w0, ref_w):.3g}"
    if bias:
        assert _update_err(b, b0, ref_b) <= tol, f"bias step: rel err {_update_err(b, b0, ref_b):.3g}"
    for got, want in zip(out.momentum_buffers, ref.momentum_buffers):
        if want is not None:
            assert rel_err(got, want) <= tol, f"momentum buffer: rel err {rel_err(got, want):.3g}"
    return out


def _random_buffers(dtype=None):
    """Momentum buffers as a previous step would leave them (scale of a gradient)."""
    def make(w, b):
        dt = dtype or torch.float32
        bw = torch.randn(w.shape, device=w.device).mul_(1e-2).to(dt)
        bb = None if b is None else torch.randn(b.shape, device=b.device).mul_(1e-2).to(dt)
        return bw, bb
    return make


# ------------------------------------------------------------------------------------------------
# The matrix: every config x bias x gradient/update, both paths (full row and tiled N)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [FULL, TILED], ids=["full_row", "tiled"])
@pytest.mark.parametrize("update", [False, True], ids=["grad", "update"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("config", ALL_CONFIGS, ids=config_id)
def test_step_fp32(config, bias, update, shape):
    check_step(shape, config, torch.float32, bias=bias, update=update,
               momentum_buffers=_random_buffers() if update else None)


@pytest.mark.parametrize("shape", [FULL, TILED], ids=["full_row", "tiled"])
@pytest.mark.parametrize("bias,update", [(True, False), (False, True)], ids=["bias-grad", "nobias-update"])
@pytest.mark.parametrize("config", ALL_CONFIGS, ids=config_id)
def test_step_fp16(config, bias, update, shape):
    check_step(shape, config, torch.float16, bias=bias, update=update,
               momentum_buffers=_random_buffers() if update else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_step_fp16_buffers_and_bias_update(dtype):
    """Momentum buffers in the weight dtype, with a bias, in update mode."""
    check_step(TILED, ffk.FFConfig.hinton(), dtype, bias=True, update=True,
               momentum_buffers=_random_buffers(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_step_new_momentum_buffers(dtype):
    """momentum > 0 without buffers: torch.optim.SGD's first step (buffers created, returned)."""
    cfg = ALL_CONFIGS[0]
    out = check_step(FULL, cfg, dtype, bias=True, update=True)
    buf_w, buf_b = out.momentum_buffers
    assert buf_w.dtype == torch.float32 and buf_b is not None


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("update", [False, True], ids=["grad", "update"])
@pytest.mark.parametrize("config", SOME_CONFIGS, ids=config_id)
def test_split_weight_gradient(monkeypatch, config, update, bias):
    """The weight gradient reduced over M by several programs (fp32 partials + the reduce kernel)."""
    monkeypatch.setattr(tb, "grad_split", lambda *args: 3)
    check_step((70, 70, 45, 40), config, bias=bias, update=update,
               momentum_buffers=_random_buffers() if update else None)


@pytest.mark.parametrize("split", [2, 7])
def test_split_more_programs_than_tiles(monkeypatch, split):
    """More splits than row tiles: the idle programs write zero partials."""
    monkeypatch.setattr(tb, "grad_split", lambda *args: split)
    check_step(FULL, ALL_CONFIGS[1], bias=True, update=False)
    check_step(FULL, ALL_CONFIGS[1], bias=True, update=True, momentum_buffers=_random_buffers())


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=config_id)
def test_tiled_path_for_narrow_layers(monkeypatch, config):
    """N = 20 forced through the tiled path (h, atomics on q, the in-place normalisation)."""
    monkeypatch.setattr(tb, "FULL_ROW_MAX_N", 0)
    check_step(FULL, config, bias=True, update=False)


def test_full_row_path_at_its_width(monkeypatch):
    """N equal to the widest full row: BLOCK_N = N exactly, no padding column."""
    check_step((37, 29, 33, tb.FULL_ROW_MAX_N), ALL_CONFIGS[3], bias=True)


# ------------------------------------------------------------------------------------------------
# Strides, shapes, edge values
# ------------------------------------------------------------------------------------------------

def _every_other_column(t):
    """A view with stride 2 along K (the same values as a fresh tensor of half the width)."""
    wide = torch.empty(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
    wide[:, ::2] = t
    wide[:, 1::2] = float("nan")  # never read
    return wide[:, ::2]


def _transposed(t):
    """A column-major view (stride (1, rows))."""
    return t.t().contiguous().t()


@pytest.mark.parametrize("transform", [_every_other_column, _transposed], ids=["stride2", "transposed"])
@pytest.mark.parametrize("update", [False, True], ids=["grad", "update"])
def test_non_contiguous_inputs(transform, update):
    """x_pos, x_neg (and the weight in gradient mode) read through their strides, never copied."""
    check_step(FULL, ALL_CONFIGS[0], update=update, transform=transform)
    check_step(TILED, ALL_CONFIGS[7], update=update, transform=transform)


def test_inputs_with_different_strides():
    """x_pos contiguous, x_neg transposed: each tile reads its own tensor's strides."""
    cfg = ALL_CONFIGS[2]
    x_pos, x_neg, w, b = make_layer(37, 29, 45, 80, device=DEVICE, seed=1)
    x_neg = _transposed(x_neg)
    ref, _, _ = float64_reference(x_pos, x_neg, w, b, cfg)
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=cfg, backend="triton")
    for name in ("y_pos", "y_neg", "g_pos", "g_neg", "loss", "grad_weight", "grad_bias"):
        assert rel_err(getattr(out, name), getattr(ref, name)) <= TOLERANCE[torch.float32], name


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 2, 3, 17), (2, 2, 64, 64), (3, 1, 33, 65)])
def test_tiny_and_block_sized_shapes(shape):
    cfg = ffk.FFConfig(goodness="sum", theta=1.0, norm="l2")
    check_step(shape, cfg, bias=True)
    check_step(shape, cfg, bias=False, update=True)


@pytest.mark.parametrize("loss", ["softplus", "symba"])
def test_saturated_loss_is_finite(loss):
    """Goodness far from the threshold (softplus of +-1e4): loss and gradients stay finite."""
    for theta in (1e4, -1e4):
        cfg = ffk.FFConfig(goodness="sum", theta=theta, norm="l2", loss=loss, alpha=1e3)
        # SymBa's alpha = 1e3 multiplies the fp32 rounding of g+ - g- by 1e3 for the pairs on the
        # sigmoid's slope (3e-5 seen against the 2e-5 fp32 bar): the bar scales with the conditioning.
        check_step(FULL, cfg, bias=True, tol=1e-3 if loss == "symba" else None)


def test_dead_rows():
    """Rows whose ReLUs are all off: q = 0, y = 0, and (norm "l2") no division by zero."""
    cfg = ALL_CONFIGS[0]
    x_pos, x_neg, w, b = make_layer(37, 29, 45, 20, device=DEVICE, seed=2)
    b = torch.full_like(b, -1e3)  # every pre-activation is negative
    ref, _, _ = float64_reference(x_pos, x_neg, w, b, cfg)
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=cfg, backend="triton")
    assert torch.equal(out.y_pos, torch.zeros_like(out.y_pos))
    assert torch.equal(out.grad_weight, torch.zeros_like(out.grad_weight))
    assert rel_err(out.loss, ref.loss) <= TOLERANCE[torch.float32]


def test_theta_per_unit():
    cfg = ffk.FFConfig(goodness="sum", theta=0.2, theta_per_unit=True, norm="rms")
    check_step(TILED, cfg, bias=True)


def test_repeated_calls_agree():
    """No state survives a call: the same inputs give the same outputs, call after call."""
    cfg = ALL_CONFIGS[4]
    x_pos, x_neg, w, b = make_layer(37, 29, 45, 80, device=DEVICE, seed=3)
    first = ffk.ff_layer_step(x_pos, x_neg, w, b, config=cfg, backend="triton")
    for _ in range(2):
        again = ffk.ff_layer_step(x_pos, x_neg, w, b, config=cfg, backend="triton")
        for name in ("y_pos", "y_neg", "g_pos", "loss", "grad_weight", "grad_bias"):
            torch.testing.assert_close(getattr(again, name), getattr(first, name), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Inference
# ------------------------------------------------------------------------------------------------

def _forward_reference(x, w, b, cfg):
    up = lambda t: None if t is None else t.double()  # noqa: E731
    return ffk.ff_layer_forward(up(x), up(w), up(b), config=cfg, backend="torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [20, 80], ids=["full_row", "tiled"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("config", [c for c in ALL_CONFIGS if c.loss == "softplus"], ids=config_id)
def test_layer_forward(config, bias, n, dtype):
    x, _, w, b = make_layer(53, 1, 45, n, dtype=dtype, device=DEVICE, bias=bias, seed=4)
    y, g = ffk.ff_layer_forward(x, w, b, config=config, backend="triton")
    y_ref, g_ref = _forward_reference(x, w, b, config)
    assert y.dtype == dtype and g.dtype == torch.float32
    assert y.shape == y_ref.shape and g.shape == g_ref.shape
    assert rel_err(y, y_ref) <= _tol(dtype) and rel_err(g, g_ref) <= _tol(dtype)


def test_layer_forward_transposed_input():
    cfg = ALL_CONFIGS[2]
    x, _, w, b = make_layer(53, 1, 45, 80, device=DEVICE, seed=5)
    x = _transposed(x)
    y, g = ffk.ff_layer_forward(x, w, b, config=cfg, backend="triton")
    y_ref, g_ref = _forward_reference(x, w, b, cfg)
    assert rel_err(y, y_ref) <= TOLERANCE[torch.float32] and rel_err(g, g_ref) <= TOLERANCE[torch.float32]


def test_forward_matches_step_outputs():
    """layer_forward on [x_pos; x_neg] gives the step's y and g."""
    cfg = ALL_CONFIGS[6]
    x_pos, x_neg, w, b = make_layer(37, 29, 45, 80, device=DEVICE, seed=6)
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=cfg, backend="triton")
    y, g = ffk.ff_layer_forward(torch.cat([x_pos, x_neg]), w, b, config=cfg, backend="triton")
    torch.testing.assert_close(y, torch.cat([out.y_pos, out.y_neg]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, torch.cat([out.g_pos, out.g_neg]), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------

def test_listed_as_available():
    assert "triton" in ffk.available_backends()


def test_interpreter_is_never_auto_on_cpu():
    from ff_kernels.backends import select_backend
    if not torch.cuda.is_available():
        assert select_backend("auto", torch.device("cpu"), torch.float32).name == "torch"


def test_float64_is_refused_with_a_clear_error():
    x_pos, x_neg, w, b = make_layer(4, 4, 8, 8, dtype=torch.float64, device=DEVICE, seed=7)
    with pytest.raises(TypeError, match="triton"):
        ffk.ff_layer_step(x_pos, x_neg, w, b, backend="triton")


def test_split_heuristic(monkeypatch):
    """Few [N, K] tiles and many rows: split M; many tiles or few rows: no split (an H100: 132 SMs)."""
    monkeypatch.setattr(tb, "_sm_count", lambda device: 132)
    dev = torch.device("cuda")
    assert tb.grad_split(100_000, 500, 784, dev) > 1
    assert tb.grad_split(16_384, 4096, 4096, dev) == 1
    assert tb.grad_split(64, 10, 10, dev) == 1
    assert all(1 <= tb.grad_split(m, 500, 784, dev) <= tb.MAX_SPLIT for m in (1, 100, 10**4, 10**7))


# ------------------------------------------------------------------------------------------------
# Hopper compile check (CPU machines): the kernels compile for sm_90, the target the interpreter
# does not see (layouts, shared memory, wgmma). Runs triton's compiler in a subprocess without
# TRITON_INTERPRET; skipped where triton's CUDA backend or ptxas is missing, and on GPU machines
# (the GPU tests compile and run the kernels there).
# ------------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = textwrap.dedent('''
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import ff_kernels.triton_backend as tb

    F32 = {"q_ptr", "g_ptr", "coef_ptr", "loss_ptr", "pw_ptr", "pb_ptr", "part_ptr", "bufw_ptr",
           "bufb_ptr", "buf_ptr"}
    FLOATS = {"theta", "alpha", "eps", "loss_weight", "grad_scale", "lr", "momentum", "weight_decay"}

    def compile_for_sm90(fn, dtype, constexprs, warps, stages):
        sig, attrs = {}, {}
        consts = dict(constexprs)
        for i, name in enumerate(fn.arg_names):
            if name in ("stride_xp_k", "stride_xn_k", "stride_w_k"):
                consts[name] = 1  # triton specialises unit strides
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*fp32" if name in F32 else "*" + dtype
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[name] = "fp32" if name in FLOATS else "i32"
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})

    MATH = dict(GOODNESS_MEAN=True, NORM=0, SYMBA=False, TRAIN=True)
    fwd = dict(HAS_BIAS=True, DOT_PRECISION="tf32", GROUP_M=8, **MATH)
    grad = dict(HAS_BIAS=True, BLOCK_N=128, BLOCK_K=128)
    checks = [
        (tb._forward_kernel, "fp32",
         dict(fwd, FULL_ROW=True, FINISH_ROWS=True, BLOCK_M=64, BLOCK_N=512, BLOCK_K=32), 8, 2),
        (tb._forward_kernel, "bf16",
         dict(fwd, FULL_ROW=False, FINISH_ROWS=False, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64), 8, 3),
        (tb._rows_kernel, "fp16", dict(RESCALE=True, BLOCK_M=16, BLOCK_N=256, GOODNESS_MEAN=False,
                                       NORM=1, SYMBA=True, TRAIN=True), 4, 1),
        (tb._grad_kernel, "bf16", dict(grad, SPLIT=1, UPDATE=True, HAS_MOMENTUM=True,
                                       DOT_PRECISION="tf32", BLOCK_M=64), 8, 3),
        (tb._grad_kernel, "fp32", dict(grad, SPLIT=4, UPDATE=False, HAS_MOMENTUM=False,
                                       DOT_PRECISION="ieee", BLOCK_M=32), 8, 4),
        (tb._split_reduce_kernel, "fp16", dict(SPLIT=4, UPDATE=True, HAS_MOMENTUM=True, BLOCK=1024), 4, 1),
    ]
    for fn, dtype, consts, warps, stages in checks:
        kernel = compile_for_sm90(fn, dtype, consts, warps, stages)
        assert kernel.metadata.shared <= 227 * 1024, (fn.__name__, kernel.metadata.shared)
        print("compiled", fn.__name__, dtype, "shared", kernel.metadata.shared)
''')


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the GPU tests run the kernels")
def test_kernels_compile_for_hopper():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(tb.__file__)))]
                                        + sys.path)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0 and ("ptxas" in proc.stderr and "not found" in proc.stderr.lower()):
        pytest.skip("no ptxas for sm_90")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("compiled") == 6


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------

GPU_SHAPES = [(150, 150, 97, 300), (130, 130, 200, 700)]  # N not a multiple of 16: full row, tiled


@pytest.fixture(autouse=True)
def untuned():
    """One fixed config per kernel: no tuning pass per new shape, so the GPU tests compile once per
    kernel variant (tests that take the ``tuned`` fixture run the real autotuner)."""
    before = tb.AUTOTUNE
    tb.set_autotune(False)
    yield
    tb.set_autotune(before)


@pytest.fixture
def tuned(untuned):
    tb.set_autotune(True)
    yield


@requires_cuda
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=["full_row", "tiled"])
@pytest.mark.parametrize("bias,update", [(True, False), (False, True)], ids=["bias-grad", "nobias-update"])
@pytest.mark.parametrize("config", ALL_CONFIGS, ids=config_id)
def test_gpu_matrix_bf16(config, bias, update, shape):
    check_step(shape, config, torch.bfloat16, bias=bias, update=update,
               momentum_buffers=_random_buffers() if update else None)


@requires_cuda
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=["full_row", "tiled"])
@pytest.mark.parametrize("bias,update", [(True, False), (False, True)], ids=["bias-grad", "nobias-update"])
@pytest.mark.parametrize("config", SOME_CONFIGS, ids=config_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_matrix(dtype, config, bias, update, shape):
    check_step(shape, config, dtype, bias=bias, update=update,
               momentum_buffers=_random_buffers() if update else None)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_autotuned_update(dtype, tuned):
    """The autotuner's trial runs leave no trace: W, b and the buffers are restored between trials
    and the loss / q accumulators zeroed (a fresh shape, so the tuning pass runs here)."""
    shape = (1000 + 7 * (dtype == torch.float32), 1000, 256, 384)
    check_step(shape, ALL_CONFIGS[0], dtype, bias=True, update=False, seed=12)
    check_step(shape, ALL_CONFIGS[0], dtype, bias=True, update=True, momentum_buffers=_random_buffers(),
               seed=12)
    check_step((600, 600, 256, 1100), ALL_CONFIGS[1], dtype, bias=True, update=True,
               momentum_buffers=_random_buffers(), seed=12)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [300, 700], ids=["full_row", "tiled"])
def test_gpu_layer_forward(dtype, n):
    cfg = ALL_CONFIGS[2]
    x, _, w, b = make_layer(333, 1, 97, n, dtype=dtype, device="cuda", seed=8)
    y, g = ffk.ff_layer_forward(x, w, b, config=cfg, backend="triton")
    y_ref, g_ref = _forward_reference(x, w, b, cfg)
    assert rel_err(y, y_ref) <= _tol(dtype) and rel_err(g, g_ref) <= _tol(dtype)


@requires_cuda
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_gpu_tf32_flag(tf32, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    check_step(GPU_SHAPES[1], ALL_CONFIGS[0], torch.float32, bias=True)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(50_000, 50_000, 784, 500), (1024, 1024, 2000, 2000),
                                   (8192, 8192, 4096, 4096)], ids=["mnist", "2000", "4096"])
def test_gpu_large_shapes(shape, dtype):
    cfg = ffk.FFConfig.pytorch_recipe()
    check_step(shape, cfg, dtype, bias=True, update=False, seed=9)
    check_step(shape, cfg, dtype, bias=True, update=True, momentum_buffers=_random_buffers(), seed=9)


@requires_cuda
def test_gpu_repeated_calls_and_second_stream():
    """Repeated calls and a call on a side stream give the default stream's results."""
    cfg = ALL_CONFIGS[1]
    x_pos, x_neg, w, b = make_layer(3000, 3000, 784, 500, device="cuda", seed=10)
    first = ffk.ff_layer_step(x_pos, x_neg, w, b, config=cfg, backend="triton")
    for _ in range(3):
        again = ffk.ff_layer_step(x_pos, x_neg, w, b, config=cfg, backend="triton")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        side = ffk.ff_layer_step(x_pos, x_neg, w, b, config=cfg, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    for out in (again, side):
        for name in ("y_pos", "y_neg", "g_pos", "g_neg", "loss", "grad_weight", "grad_bias"):
            torch.testing.assert_close(getattr(out, name), getattr(first, name), rtol=1e-5, atol=1e-6)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [ffk.FFConfig.pytorch_recipe(), ffk.FFConfig.hinton(),
                                    ffk.FFConfig(loss="symba", alpha=4.0)], ids=["recipe", "hinton", "symba"])
def test_gpu_twenty_training_steps_match_reference(config, dtype):
    """20 fused SGD steps (momentum, weight decay) on both backends from the same start."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    x_pos, x_neg, w, b = make_layer(512, 512, 784, 500, dtype=dtype, device="cuda", seed=11)
    params = {name: (w.clone(), b.clone()) for name in ("torch", "triton")}
    buffers = {"torch": None, "triton": None}
    for _ in range(20):
        noise = torch.randn(x_pos.shape, device="cuda", generator=gen).to(dtype) * 0.1
        for name in ("torch", "triton"):
            pw, pb = params[name]
            out = ffk.ff_layer_step(x_pos + noise, x_neg - noise, pw, pb, config=config, lr=0.05,
                                    momentum=0.9, weight_decay=1e-3, momentum_buffers=buffers[name],
                                    backend=name)
            buffers[name] = out.momentum_buffers
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    for got, want in zip(params["triton"], params["torch"]):
        assert rel_err(got, want) <= tol, f"rel err {rel_err(got, want):.3g}"


@requires_cuda
def test_gpu_auto_lists_triton():
    assert "triton" in ffk.available_backends()
