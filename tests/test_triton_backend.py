"""The Triton backend against the float64 reference.

On a machine without a GPU, conftest.py sets TRITON_INTERPRET=1 and every kernel runs in Triton's
interpreter on small odd shapes (fp32 and fp16; bf16 tl.dot is wrong in the interpreter). Every
output starts as NaN (conftest poisons new_output), so an element a kernel misses fails the test.
Tests marked ``requires_cuda`` need a GPU: bf16, the large shapes, streams and training runs.
The sm_90 compile check (test_kernels_compile_for_hopper) runs on CPU machines with ptxas.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import ff_kernels as ffk
from ff_kernels.backends import fp32_matmul_uses_tf32
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
    if dtype == torch.float32 and torch.cuda.is_available() and fp32_matmul_uses_tf32():
        return TOLERANCE["tf32"]
    return TOLERANCE[dtype]


def _update_err(new, old, ref_new) -> float:
    """Relative error of the step (new - old) against the reference step, less what rounding the
    parameter to its own dtype can explain."""
    step = new.double().cpu() - old.double().cpu()
    ref_step = ref_new.double().cpu() - old.double().cpu()
    rounding = torch.finfo(new.dtype).eps * ref_new.double().cpu().norm().item()
    return max(0.0, (step - ref_step).norm().item() - rounding) / ref_step.norm().item()


SGD = dict(lr=0.5, momentum=0.9, weight_decay=0.05)  # update mode's default rule in these tests


def check_step(shape, config, dtype=torch.float32, bias=True, update=False, momentum_buffers=None,
               transform=None, seed=None, device=DEVICE, tol=None, sgd=None, inputs=None,
               skip_nonfinite=False):
    """Run one step on the Triton backend and compare every output with the float64 reference
    (inputs from the test's printed torch seed unless ``seed`` or ``inputs`` is given).
    ``sgd``: the update's keyword arguments (default SGD); peer normalisation (config.peer_norm)
    starts from a random running mean, which must match the reference's after the step too.
    Finite inputs: the non-finite flag must come back False (a 0-dim bool on the device)."""
    mp, mn, k, n = _shape(shape, config)
    if inputs is None:
        inputs = make_layer(mp, mn, k, n, dtype=dtype, device=device, bias=bias, seed=seed)
    x_pos, x_neg, w, b = inputs
    if transform is not None:
        x_pos, x_neg, w = transform(x_pos), transform(x_neg), transform(w) if not update else w
    kw = dict(skip_nonfinite=skip_nonfinite)
    if update:
        kw.update(sgd if sgd is not None else SGD)
        if momentum_buffers is not None:
            kw["momentum_buffers"] = momentum_buffers(w, b)
    peer_mean = None
    if config.peer_norm != "none":
        peer_mean = (0.5 + 0.3 * torch.rand(n)).to(device)
        kw["peer_mean"] = peer_mean.double().clone()
    ref, ref_w, ref_b = float64_reference(x_pos, x_neg, w, b, config, **kw)
    if peer_mean is not None:
        kw["peer_mean"] = peer_mean
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
    assert out.nonfinite.dtype == torch.bool and out.nonfinite.dim() == 0
    assert out.nonfinite.device == out.loss.device and not out.nonfinite.item()
    if peer_mean is not None:
        assert out.peer_mean is peer_mean
        err = rel_err(peer_mean, ref.peer_mean)
        assert err <= tol, f"peer mean: rel err {err:.3g}"
    if not update:
        assert out.grad_weight.dtype == dtype and out.grad_weight.shape == w.shape
        assert rel_err(out.grad_weight, ref.grad_weight) <= tol, \
            f"grad_weight: rel err {rel_err(out.grad_weight, ref.grad_weight):.3g}"
        if bias:
            assert out.grad_bias.dtype == dtype
            assert rel_err(out.grad_bias, ref.grad_bias) <= tol, \
                f"grad_bias: rel err {rel_err(out.grad_bias, ref.grad_bias):.3g}"
        else:
            assert out.grad_bias is None
        assert torch.equal(w, w0), "gradient mode must not change the weight"
        return out
    assert out.grad_weight is None and out.grad_bias is None
    assert _update_err(w, w0, ref_w) <= tol, f"weight step: rel err {_update_err(w, w0, ref_w):.3g}"
    if bias:
        assert _update_err(b, b0, ref_b) <= tol, f"bias step: rel err {_update_err(b, b0, ref_b):.3g}"
    for got, want in zip(out.momentum_buffers or (), ref.momentum_buffers or ()):
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
@pytest.mark.parametrize("bias,update", [(True, False), (False, True)], ids=["bias-grad", "nobias-update"])
@pytest.mark.parametrize("config", ALL_CONFIGS, ids=config_id)
def test_step_fp32(config, bias, update, shape):
    check_step(shape, config, torch.float32, bias=bias, update=update,
               momentum_buffers=_random_buffers() if update else None)


@pytest.mark.parametrize("shape", [FULL, TILED], ids=["full_row", "tiled"])
@pytest.mark.parametrize("bias,update", [(True, True), (False, False)], ids=["bias-update", "nobias-grad"])
@pytest.mark.parametrize("config", SOME_CONFIGS, ids=config_id)
def test_step_fp32_other_modes(config, bias, update, shape):
    """The other two bias/mode pairs. The config's math is runtime values in one compiled kernel
    (test_math_settings_share_one_compiled_kernel), so four configs cover these code paths."""
    check_step(shape, config, torch.float32, bias=bias, update=update,
               momentum_buffers=_random_buffers() if update else None)


# every goodness x norm pair, both losses (the math is the same runtime code for every dtype)
HALF_CONFIGS = [ALL_CONFIGS[i] for i in (0, 3, 4, 7, 8, 11)]


@pytest.mark.parametrize("shape", [FULL, TILED], ids=["full_row", "tiled"])
@pytest.mark.parametrize("bias,update", [(True, False), (False, True)], ids=["bias-grad", "nobias-update"])
@pytest.mark.parametrize("config", HALF_CONFIGS, ids=config_id)
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
# The update rule (SGDUpdate.coefficients) and peer normalisation
# ------------------------------------------------------------------------------------------------

_DAMPENED = dict(momentum=0.9, dampening=0.9, weight_decay=0.01)  # PyTorch's convention
_HINTON = dict(momentum=0.9, dampening=0.9, weight_decay=0.05, decoupled_weight_decay=True)


@pytest.mark.parametrize("rule,buffers", [
    (_DAMPENED, "given"), (_DAMPENED, "first-step"), (_HINTON, "given"), (_HINTON, "first-step"),
    (dict(momentum=0.5, dampening=0.3, weight_decay=0.0), "given"),
    (dict(momentum=0.0, weight_decay=0.05, decoupled_weight_decay=True), "none"),
], ids=["dampening-given", "dampening-first-step", "decoupled-given", "decoupled-first-step", "no-decay",
        "decoupled-no-momentum"])
def test_sgd_rules(rule, buffers):
    """Every rule of SGDUpdate.coefficients(): dampening, decoupled weight decay, and the first step
    (the op creates the buffers: PyTorch's buf = g', Hinton's buf = (1 - d) grad)."""
    check_step(FULL, ALL_CONFIGS[2], bias=True, update=True, sgd=dict(lr=0.5, **rule),
               momentum_buffers=_random_buffers() if buffers == "given" else None)


# Peer normalisation with a term large enough to matter (checked below): Hinton's direct form and
# loeweX's (5000x weaker at its defaults, so its lambda is raised).
HINTON_PEER = ffk.FFConfig(goodness="sum", theta=3.0, norm="rms", peer_norm="hinton", peer_lambda=10.0,
                           peer_rho=0.7)
LOEWEX_PEER = ffk.FFConfig(goodness="mean", theta=0.3, norm="l2", peer_norm="loewex", peer_lambda=40.0,
                           peer_rho=0.8)
PEER_CONFIGS = [HINTON_PEER, LOEWEX_PEER]


def test_peer_term_matters_in_these_tests():
    """The peer configs above change the gradients by far more than the tolerance (else a kernel
    that dropped the term would pass)."""
    for cfg in PEER_CONFIGS:
        for shape in (FULL, TILED):
            mp, mn, k, n = shape
            x_pos, x_neg, w, b = make_layer(mp, mn, k, n, dtype=torch.float64, seed=21)
            plain = ffk.ff_layer_step(x_pos, x_neg, w, b, config=ffk.FFConfig(
                goodness=cfg.goodness, theta=cfg.theta, norm=cfg.norm), backend="torch")
            peer = ffk.ff_layer_step(x_pos, x_neg, w, b, config=cfg, backend="torch")
            assert rel_err(plain.grad_weight, peer.grad_weight) > 20 * TOLERANCE[torch.float16]
            assert rel_err(plain.grad_bias, peer.grad_bias) > 20 * TOLERANCE[torch.float16]


@pytest.mark.parametrize("shape", [FULL, TILED], ids=["full_row", "tiled"])
@pytest.mark.parametrize("update", [False, True], ids=["grad", "update"])
@pytest.mark.parametrize("config", PEER_CONFIGS, ids=["hinton", "loewex"])
def test_peer_norm(config, update, shape):
    """The running mean (in place), the per-unit term on every positive row and its column sums in
    both gradients; fp32, with a bias, one program per gradient tile."""
    check_step(shape, config, bias=True, update=update, sgd=dict(lr=0.5, **_HINTON),
               momentum_buffers=_random_buffers() if update else None)


@pytest.mark.parametrize("update", [False, True], ids=["grad", "update"])
@pytest.mark.parametrize("config", PEER_CONFIGS, ids=["hinton", "loewex"])
def test_peer_norm_split(monkeypatch, config, update):
    """The peer term split over the row programs: each split adds it for its own positive rows."""
    monkeypatch.setattr(tb, "grad_split", lambda *args: 3)
    check_step((70, 70, 45, 40), config, bias=update, update=update,
               momentum_buffers=_random_buffers() if update else None)


@pytest.mark.parametrize("shape", [FULL, TILED], ids=["full_row", "tiled"])
@pytest.mark.parametrize("bias,update", [(True, False), (False, True)], ids=["bias-grad", "nobias-update"])
def test_peer_norm_fp16(shape, bias, update):
    check_step(shape, HINTON_PEER if bias else LOEWEX_PEER, torch.float16, bias=bias, update=update,
               momentum_buffers=_random_buffers() if update else None)


def test_peer_norm_with_symba_and_tiled_rows(monkeypatch):
    """SymBa (rows finished by _rows_kernel) with the peer term, narrow layer forced tiled."""
    monkeypatch.setattr(tb, "FULL_ROW_MAX_N", 0)
    cfg = ffk.FFConfig(goodness="sum", theta=3.0, norm="l2", loss="symba", alpha=1.5, peer_norm="hinton",
                       peer_lambda=0.5)
    check_step(FULL, cfg, bias=True)


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


# ------------------------------------------------------------------------------------------------
# fp16 range, NaN, aliasing
# ------------------------------------------------------------------------------------------------

def _pixels(mp, mn, k, n, dtype, seed):
    """Raw 0..255 pixel values (no input normalisation) and weights of standard deviation 4/sqrt(K):
    activations of a few hundred, r_i |x_ik| ~ 1e5."""
    gen = torch.Generator().manual_seed(seed)
    x_pos = torch.rand(mp, k, generator=gen) * 255
    x_neg = torch.rand(mn, k, generator=gen) * 255
    w = torch.randn(n, k, generator=gen) * 4 / k ** 0.5
    b = torch.randn(n, generator=gen) * 0.1
    return tuple(t.to(device=DEVICE, dtype=dtype) for t in (x_pos, x_neg, w, b))


@pytest.mark.parametrize("shape", [FULL, TILED], ids=["full_row", "tiled"])
@pytest.mark.parametrize("update", [False, True], ids=["grad", "update"])
def test_fp16_raw_pixels_do_not_overflow(shape, update):
    """x in 0..255 with the rms norm: r_i |x_ik| ~ 1e5 passes fp16's 65504, the float32 reference
    stays finite. The gradient operand is scaled by a power of two chosen on the device, so every
    output is finite and within fp16's tolerance of the float64 reference."""
    mp, mn, k, n = shape
    inputs = _pixels(mp, mn, k, n, torch.float16, seed=13)
    x_pos, _, w, b = inputs
    h = torch.relu(x_pos.float() @ w.float().t() + b.float())
    r = (h.square().mean(1).sqrt() + 1e-4)
    assert (r[:, None] * x_pos.float()).max() > 65504  # the case the old kernels overflowed on
    # mean goodness keeps the gradients themselves (~1e3) inside fp16; theta near the goodness (~2e5)
    cfg = ffk.FFConfig(goodness="mean", theta=1.5e5, norm="rms")
    out = check_step(shape, cfg, torch.float16, bias=True, update=update, inputs=inputs,
                     momentum_buffers=_random_buffers() if update else None)
    if not update:
        assert torch.isfinite(out.grad_weight).all() and torch.isfinite(out.grad_bias).all()


def test_fp16_tiled_path_activation_limit(monkeypatch):
    """The documented fp16 limit: the tiled path stores h in y's storage before normalising it, so
    an activation above 65504 overflows there (the full-row path keeps h in fp32 registers). It
    shows as a non-finite y row, never as a finite wrong value; the other rows stay right."""
    x_pos, x_neg, w, b = make_layer(5, 4, 16, 20, dtype=torch.float16, device=DEVICE, seed=14)
    w, x_pos, x_neg = w.abs() * 100, x_pos.abs() * 10, x_neg.abs() * 10  # every unit active
    x_pos[:2] *= 30  # the first two rows' activations pass 65504, the others stay far below
    cfg = ffk.FFConfig(goodness="sum", theta=1.0, norm="l2")
    h = x_pos.float() @ w.float().t() + b.float()
    overflowed = (h > 65504).any(1)
    assert overflowed[:2].all() and (h[2:] < 30000).all()
    ref, _, _ = float64_reference(x_pos, x_neg, w, b, cfg)
    full = ffk.ff_layer_step(x_pos, x_neg, w, b, config=cfg, backend="triton")
    assert rel_err(full.y_pos, ref.y_pos) <= TOLERANCE[torch.float16]
    assert torch.isfinite(full.grad_weight).all()
    monkeypatch.setattr(tb, "FULL_ROW_MAX_N", 0)
    tiled = ffk.ff_layer_step(x_pos, x_neg, w, b, config=cfg, backend="triton")
    assert not torch.isfinite(tiled.y_pos[overflowed]).all(1).any()
    assert rel_err(tiled.y_pos[~overflowed], ref.y_pos[~overflowed]) <= TOLERANCE[torch.float16]


@pytest.mark.parametrize("where", ["x_pos", "x_neg", "weight", "bias"])
@pytest.mark.parametrize("shape", [FULL, TILED], ids=["full_row", "tiled"])
def test_nan_inputs_reach_the_outputs(where, shape):
    """One NaN in an input gives NaN exactly where the reference has NaN (loss, goodness, y and the
    gradients), not a plausible finite number (tl.maximum in the ReLU would drop it)."""
    cfg = ALL_CONFIGS[0]
    mp, mn, k, n = shape
    x_pos, x_neg, w, b = make_layer(mp, mn, k, n, device=DEVICE, seed=15)
    target = dict(x_pos=x_pos, x_neg=x_neg, weight=w, bias=b)[where]
    target.view(-1)[target.numel() // 3] = float("nan")
    ref, _, _ = float64_reference(x_pos, x_neg, w, b, cfg)
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=cfg, backend="triton")
    assert torch.isnan(out.loss)
    for name in ("y_pos", "y_neg", "g_pos", "g_neg", "grad_weight", "grad_bias"):
        got, want = getattr(out, name), getattr(ref, name)
        assert torch.equal(torch.isnan(got).cpu(), torch.isnan(want).cpu()), name
        finite = ~torch.isnan(want)
        assert rel_err(got[finite], want[finite]) <= TOLERANCE[torch.float32], name


def test_nan_weight_reaches_the_update():
    """Update mode: a NaN weight makes the whole step NaN, as on the reference."""
    x_pos, x_neg, w, b = make_layer(37, 29, 45, 20, device=DEVICE, seed=16)
    w[3, 4] = float("nan")
    ref, ref_w, ref_b = float64_reference(x_pos, x_neg, w, b, ALL_CONFIGS[0], **SGD)
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=ALL_CONFIGS[0], backend="triton", **SGD)
    assert torch.isnan(out.loss)
    assert torch.equal(torch.isnan(w), torch.isnan(ref_w)) and torch.equal(torch.isnan(b), torch.isnan(ref_b))


@pytest.mark.parametrize("shape", [FULL, TILED], ids=["full_row", "tiled"])
def test_input_that_is_a_view_of_the_updated_weight(shape):
    """x_pos overlapping the weight being updated gives the same result as a separate copy (the op
    copies it before the kernels write the weight)."""
    mp, mn, k, n = shape
    mp = min(mp, n)
    cfg = ALL_CONFIGS[2]
    _, x_neg, w, b = make_layer(mp, mn, k, n, device=DEVICE, seed=17)
    w_alias, b_alias = w.clone(), b.clone()
    x_pos = w_alias[:mp]  # rows of the weight used as inputs
    out_alias = ffk.ff_layer_step(x_pos, x_neg, w_alias, b_alias, config=cfg, backend="triton", **SGD)
    out_copy = ffk.ff_layer_step(w[:mp].clone(), x_neg, w, b, config=cfg, backend="triton", **SGD)
    # equal up to the order of float atomics (the row sums on the tiled path)
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w_alias, w, **close)
    torch.testing.assert_close(b_alias, b, **close)
    for name in ("y_pos", "y_neg", "g_pos", "g_neg", "loss"):
        torch.testing.assert_close(getattr(out_alias, name), getattr(out_copy, name), **close)


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
# The non-finite flag, skip_nonfinite, the loss range and sgd_update
# ------------------------------------------------------------------------------------------------

def _tiled_like_the_interpreter(monkeypatch, shape):
    """TILED (N = 80) takes the tiled path on the GPU too (its full row reaches 512 there)."""
    if shape == TILED:
        monkeypatch.setattr(tb, "FULL_ROW_MAX_N", min(tb.FULL_ROW_MAX_N, 64))


def _set_element(inputs, where, value):
    """inputs with one element of x_pos, x_neg, weight or bias set to ``value``."""
    x_pos, x_neg, w, b = inputs
    target = dict(x_pos=x_pos, x_neg=x_neg, weight=w, bias=b)[where]
    target.view(-1)[target.numel() // 3] = value
    return x_pos, x_neg, w, b


def _assert_same_nonfinite(got, want, name, tol, exact=True):
    """Non-finite exactly where the reference is (``exact``), or at least there (inf inputs: the
    weight gradient reads h back as r_i y_ij, which gives NaN where the reference has +-inf or
    finite terms next to them); the finite values within ``tol``."""
    bad_got, bad_want = ~torch.isfinite(got).cpu(), ~torch.isfinite(want).cpu()
    if exact:
        assert torch.equal(bad_got, bad_want), name
    else:
        assert bad_got[bad_want].all(), f"{name}: finite where the reference is not"
    finite = ~bad_got & ~bad_want
    assert rel_err(got.cpu()[finite], want.cpu()[finite]) <= tol, name


# each input gets a NaN and an inf, each of fp32 (full row) and fp16 (tiled N) both
_NONFINITE_CASES = [(dtype, shape, where, float(value))
                    for dtype, shape, values in [(torch.float32, FULL, ("nan", "inf")),
                                                 (torch.float16, TILED, ("inf", "nan"))]
                    for where, value in zip(("x_pos", "x_neg", "weight", "bias"), values * 2)]


@pytest.mark.parametrize("dtype,shape,where,value", _NONFINITE_CASES,
                         ids=[f"{'fp32-full_row' if d == torch.float32 else 'fp16-tiled'}-{w}-{v}"
                              for d, _, w, v in _NONFINITE_CASES])
def test_nonfinite_input_sets_the_flag(monkeypatch, dtype, shape, where, value):
    """One NaN or inf in x_pos, x_neg, W or b: the flag (0-dim bool on the device) is True and the
    loss NaN, as on the float64 reference; y and g are still written (non-finite where the
    reference's are), and the gradients too."""
    _tiled_like_the_interpreter(monkeypatch, shape)
    cfg = ALL_CONFIGS[2]
    inputs = _set_element(make_layer(*shape, dtype=dtype, device=DEVICE, seed=24), where, value)
    ref, _, _ = float64_reference(*inputs, cfg)
    out = ffk.ff_layer_step(*inputs, config=cfg, backend="triton")
    assert ref.nonfinite.item() and torch.isnan(ref.loss)
    assert out.nonfinite.dtype == torch.bool and out.nonfinite.dim() == 0
    assert out.nonfinite.item() and torch.isnan(out.loss)
    tol = _tol(dtype)
    for name in ("y", "g"):
        _assert_same_nonfinite(getattr(out, name), getattr(ref, name), name, tol)
    exact = value != value  # NaN: the gradients' NaN pattern is the reference's
    for name in ("grad_weight", "grad_bias"):
        _assert_same_nonfinite(getattr(out, name), getattr(ref, name), name, tol, exact=exact)


def _dead_inf(case):
    """Inputs whose only non-finite pre-activations are -inf, which the ReLU turns into 0: a bias
    of -inf (a dead unit), or x_pos[3, 5] = +inf against a column of W that is negative for every
    unit (a dead row). y, g and q stay finite; only z shows the inf."""
    def make(shape, dtype):
        x_pos, x_neg, w, b = make_layer(*shape, dtype=dtype, device=DEVICE, seed=25)
        if case == "bias":
            b[4] = float("-inf")
        else:
            w[:, 5] = -w[:, 5].abs() - 0.1
            x_pos[3, 5] = float("inf")
        return x_pos, x_neg, w, b
    return make


@pytest.mark.parametrize("case", ["bias", "x_pos"])
@pytest.mark.parametrize("dtype,shape", [(torch.float32, FULL), (torch.float16, TILED)],
                         ids=["fp32-full_row", "fp16-tiled"])
def test_dead_relu_inf_sets_the_flag(monkeypatch, dtype, shape, case):
    """z = -inf is hidden by the ReLU (h = 0, q finite): the flag still goes up and the loss is
    NaN; y and g equal the reference's (finite)."""
    _tiled_like_the_interpreter(monkeypatch, shape)
    cfg = ALL_CONFIGS[0]
    inputs = _dead_inf(case)(shape, dtype)
    ref, _, _ = float64_reference(*inputs, cfg)
    out = ffk.ff_layer_step(*inputs, config=cfg, backend="triton")
    assert ref.nonfinite.item() and torch.isfinite(ref.y).all() and torch.isfinite(ref.g).all()
    assert out.nonfinite.item() and torch.isnan(out.loss)
    assert rel_err(out.y, ref.y) <= _tol(dtype) and rel_err(out.g, ref.g) <= _tol(dtype)


def _peer_start(n):
    return (0.5 + 0.3 * torch.rand(n)).to(DEVICE)


@pytest.mark.parametrize("case", ["nan-x_neg-full_row", "dead-bias-tiled"])
def test_skip_nonfinite_gradient_mode_keeps_the_peer_mean(monkeypatch, case):
    """Gradient mode, skip_nonfinite=True, a poisoned step: the peer running mean keeps its value
    (bit for bit), the outputs and gradients are still written and equal the reference's (whose
    peer term then comes from the kept mean). Without skip the mean is updated as on the reference."""
    if case.startswith("nan"):
        inputs = _set_element(make_layer(*FULL, device=DEVICE, seed=26), "x_neg", float("nan"))
    else:
        _tiled_like_the_interpreter(monkeypatch, TILED)
        inputs = _dead_inf("bias")(TILED, torch.float32)
    n = inputs[2].shape[0]
    start = _peer_start(n)
    tol = _tol(torch.float32)
    for skip in (True, False):
        ref_mean, mean = start.double().clone(), start.clone()
        ref, _, _ = float64_reference(*inputs, HINTON_PEER, peer_mean=ref_mean, skip_nonfinite=skip)
        out = ffk.ff_layer_step(*inputs, config=HINTON_PEER, backend="triton", peer_mean=mean,
                                skip_nonfinite=skip)
        assert out.nonfinite.item() and torch.isnan(out.loss)
        if skip:
            assert torch.equal(mean, start) and torch.equal(ref_mean, start.double())
        else:
            _assert_same_nonfinite(mean, ref_mean, "peer mean", tol)
        for name in ("y", "g", "grad_weight", "grad_bias"):
            _assert_same_nonfinite(getattr(out, name), getattr(ref, name), f"{name} (skip={skip})", tol)
    if case.startswith("dead"):  # finite gradients: the kept mean's peer term is checked exactly
        assert torch.isfinite(out.grad_weight).all() and not torch.equal(mean, start)


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("case", ["nan-x_pos", "dead-bias"])
def test_skip_nonfinite_update_mode_changes_nothing(monkeypatch, case, split):
    """Update mode, skip_nonfinite=True, a poisoned step: W, b, both momentum buffers and the peer
    mean keep their values bit for bit (decided on the device); y and g are still written."""
    monkeypatch.setattr(tb, "grad_split", lambda *args: split)
    shape = (70, 70, 45, 40)
    if case.startswith("nan"):
        inputs = _set_element(make_layer(*shape, device=DEVICE, seed=27), "x_pos", float("nan"))
    else:
        inputs = _dead_inf("bias")(shape, torch.float32)
    x_pos, x_neg, w, b = inputs
    bufs = _random_buffers()(w, b)
    mean = _peer_start(w.shape[0])
    before = [t.clone() for t in (w, b, *bufs, mean)]
    sgd = dict(lr=0.5, **_HINTON)
    ref, _, _ = float64_reference(x_pos, x_neg, w, b, HINTON_PEER, momentum_buffers=bufs,
                                  peer_mean=mean.double(), skip_nonfinite=True, **sgd)
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=HINTON_PEER, backend="triton", momentum_buffers=bufs,
                            peer_mean=mean, skip_nonfinite=True, **sgd)
    assert out.nonfinite.item() and torch.isnan(out.loss)
    for got, want in zip((w, b, *bufs, mean), before):
        assert torch.equal(got, want)
    for name in ("y", "g"):
        _assert_same_nonfinite(getattr(out, name), getattr(ref, name), name, _tol(torch.float32))


@pytest.mark.parametrize("update", [False, True], ids=["grad", "update"])
@pytest.mark.parametrize("split", [1, 3])
def test_skip_nonfinite_is_no_change_when_finite(monkeypatch, split, update):
    """skip_nonfinite=True on a finite step: the same step as without it (peer mean, W, b, buffers)."""
    monkeypatch.setattr(tb, "grad_split", lambda *args: split)
    check_step((70, 70, 45, 40), HINTON_PEER, bias=True, update=update, sgd=dict(lr=0.5, **_HINTON),
               momentum_buffers=_random_buffers() if update else None, skip_nonfinite=True)


@pytest.mark.parametrize("path", ["full_row", "tiled"])
def test_sum_of_squares_overflow_sets_the_flag(monkeypatch, path):
    """Finite z whose q_i = sum_j h_ij^2 overflows float32 (row 0: h ~ 2.5e18 in all 80 units):
    the flag is set and the loss is NaN. Tiled N (three column tiles of 32): every partial q
    (~2e38) is finite, only their total is not, which the row kernel checks (in the interpreter;
    the GPU's tiles are wider)."""
    monkeypatch.setattr(tb, "FULL_ROW_MAX_N", 128 if path == "full_row" else 64)
    x_pos, x_neg, w, b = make_layer(*TILED, device=DEVICE, seed=32)
    w[:, 0] = 1.0
    x_pos[0] = 0.0
    x_pos[0, 0] = 2.5e18
    assert 32 * 2.5e18 ** 2 < torch.finfo(torch.float32).max < 80 * 2.5e18 ** 2
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=ALL_CONFIGS[0], backend="triton")
    assert out.nonfinite.item() and torch.isnan(out.loss)
    assert torch.isfinite(out.g[1:]).all()


@pytest.mark.parametrize("dtype,shape", [(torch.float32, FULL), (torch.float16, TILED)],
                         ids=["fp32-full_row", "fp16-tiled"])
def test_huge_threshold_gives_a_finite_loss(monkeypatch, dtype, shape):
    """theta = 1e38 (sum goodness): every positive row's softplus term is ~1e38, their plain sum
    overflows float32, their mean does not. Each term is divided by M before it is summed, so the
    loss is finite and equals the float64 reference's."""
    _tiled_like_the_interpreter(monkeypatch, shape)
    cfg = ffk.FFConfig(goodness="sum", theta=1e38, norm="l2")
    assert shape[0] * 1e38 > torch.finfo(torch.float32).max  # the undivided sum would overflow
    out = check_step(shape, cfg, dtype, bias=True)
    assert 1e37 < out.loss.item() < torch.finfo(torch.float32).max


_SGD_RULES = {
    "coupled-given": (dict(momentum=0.9, dampening=0.1, weight_decay=0.05), "given"),
    "coupled-first-step": (dict(momentum=0.9, dampening=0.1, weight_decay=0.05), "first-step"),
    "decoupled-given": (dict(momentum=0.9, dampening=0.9, weight_decay=0.05, decoupled_weight_decay=True),
                        "given"),
    "decoupled-first-step": (dict(momentum=0.9, dampening=0.9, weight_decay=0.05,
                                  decoupled_weight_decay=True), "first-step"),
    "no-momentum-coupled": (dict(weight_decay=0.05), "none"),
    "no-momentum-decoupled": (dict(weight_decay=0.05, decoupled_weight_decay=True), "none"),
}


@pytest.mark.parametrize("skip", [None, False, True], ids=["no-skip", "skip-false", "skip-true"])
@pytest.mark.parametrize("dtype,buf_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                             (torch.float16, torch.float16)],
                         ids=["fp32", "fp16-fp32buf", "fp16-fp16buf"])
@pytest.mark.parametrize("rule", list(_SGD_RULES), ids=list(_SGD_RULES))
def test_sgd_update(rule, dtype, buf_dtype, skip):
    """ffk.sgd_update_(backend="triton") against the reference's sgd_update in float64, for every
    rule of SGDUpdate.coefficients() (coupled/decoupled, dampening, the first step, with and without
    a buffer), a 2-D parameter spanning two programs and a 1-D one. skip=True (a device tensor):
    nothing changes, bit for bit."""
    kw, buffers = _SGD_RULES[rule]
    if buffers == "first-step" and buf_dtype != torch.float32:
        pytest.skip("the op creates the first step's buffer (float32)")
    gen = torch.Generator().manual_seed(28)
    for shape in ((37, 45), (20,)):
        param = torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype)
        grad = torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype)
        buf = None
        if buffers == "given":
            buf = (torch.randn(shape, generator=gen) * 0.1).to(device=DEVICE, dtype=buf_dtype)
        skip_t = None if skip is None else torch.tensor(skip, device=DEVICE)
        p0, b0 = param.clone(), None if buf is None else buf.clone()
        ref_p = param.double()
        ref_buf = ffk.sgd_update_(ref_p, grad.double(), None if buf is None else buf.double(), lr=0.3,
                                  skip=None if skip is None else skip_t.clone(), backend="torch", **kw)
        got_buf = ffk.sgd_update_(param, grad, buf, lr=0.3, skip=skip_t, backend="triton", **kw)
        if buf is not None:
            assert got_buf is buf
        if skip:
            assert torch.equal(param, p0)
            assert torch.equal(got_buf, b0) if buf is not None else (got_buf is None or not got_buf.any())
            continue
        tol = _tol(dtype)
        assert _update_err(param, p0, ref_p) <= tol, f"{shape}: {_update_err(param, p0, ref_p):.3g}"
        if got_buf is not None:
            assert got_buf.dtype == buf_dtype
            assert rel_err(got_buf, ref_buf) <= TOLERANCE[buf_dtype], shape


def test_sgd_update_matches_the_step_update(monkeypatch):
    """The data-parallel path: gradients of a step in gradient mode, then sgd_update, give the
    fused step's update (same kernel math)."""
    monkeypatch.setattr(tb, "grad_split", lambda *args: 1)
    cfg = ALL_CONFIGS[2]
    x_pos, x_neg, w, b = make_layer(37, 29, 45, 20, device=DEVICE, seed=29)
    rule = dict(lr=0.5, momentum=0.9, dampening=0.9, weight_decay=0.05, decoupled_weight_decay=True)
    w2, b2 = w.clone(), b.clone()
    bufs = _random_buffers()(w, b)
    bufs2 = tuple(t.clone() for t in bufs)
    ffk.ff_layer_step(x_pos, x_neg, w, b, config=cfg, backend="triton", momentum_buffers=bufs, **rule)
    grads = ffk.ff_layer_step(x_pos, x_neg, w2, b2, config=cfg, backend="triton")
    for param, grad, buf in ((w2, grads.grad_weight, bufs2[0]), (b2, grads.grad_bias, bufs2[1])):
        ffk.sgd_update_(param, grad, buf, backend="triton", **rule)
    for got, want in zip((w2, b2, *bufs2), (w, b, *bufs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _counting_new_output(monkeypatch):
    """Record the shape of every tensor the backend allocates (outputs and scratch)."""
    made = []
    real = tb.new_output

    def counting(shape, dtype, device):
        made.append((tuple(shape), dtype))
        return real(shape, dtype, device)

    monkeypatch.setattr(tb, "new_output", counting)
    return made


def test_steady_state_allocates_only_outputs(monkeypatch):
    """Scratch (stats, coefficients, split partials, peer sums) is cached per device and stream and
    grown as needed: a repeated step allocates exactly its outputs, in both modes, with the peer
    term and a split reduction; a smaller step too; a larger one grows the scratch once."""
    monkeypatch.setattr(tb, "grad_split", lambda *args: 3)
    tb.release_scratch()
    made = _counting_new_output(monkeypatch)
    mp, mn, k, n = 70, 70, 45, 40
    x_pos, x_neg, w, b = make_layer(mp, mn, k, n, device=DEVICE, seed=30)
    mean = _peer_start(n)
    f32, dt = torch.float32, w.dtype
    grad_outputs = [((mp + mn, n), dt), ((mp + mn,), f32), ((), f32), ((), torch.bool), ((n, k), dt), ((n,), dt)]

    def step(x_pos, x_neg, **kw):
        del made[:]
        ffk.ff_layer_step(x_pos, x_neg, w, b, config=HINTON_PEER, backend="triton", peer_mean=mean, **kw)
        return list(made)

    first = step(x_pos, x_neg)
    assert len(first) == len(grad_outputs) + 1  # the outputs and the scratch
    assert step(x_pos, x_neg) == grad_outputs
    bufs = _random_buffers()(w, b)
    assert step(x_pos, x_neg, lr=0.1, momentum=0.9, momentum_buffers=bufs) == grad_outputs[:4]
    small = step(x_pos[:40], x_neg[:30])
    assert len(small) == len(grad_outputs) and small[0] == ((70, n), dt)
    assert len(step(torch.cat([x_pos, x_pos]), x_neg)) == len(grad_outputs) + 1  # grows once
    assert len(step(torch.cat([x_pos, x_pos]), x_neg)) == len(grad_outputs)
    del made[:]
    ffk.ff_layer_forward(x_pos, w, b, config=HINTON_PEER, backend="triton")
    assert made == [((mp, n), dt), ((mp,), f32)]
    del made[:]
    ffk.sgd_update_(w, w.clone(), bufs[0], lr=0.1, momentum=0.9, backend="triton")
    assert made == []


def test_reused_scratch_gives_the_same_step(monkeypatch):
    """Steps of different shapes one after another on one scratch buffer, left as the previous
    step left it (no NaN poisoning of reused scratch here): each equals a step run on fresh
    scratch (the stats are zeroed, the split partials rewritten, the coefficients recomputed)."""
    monkeypatch.setattr(tb, "grad_split", lambda *args: 3)
    monkeypatch.setattr(ffk.backends, "POISON_OUTPUTS", False)
    cfg = ALL_CONFIGS[6]
    layers = [make_layer(*shape, device=DEVICE, seed=31) for shape in (TILED, FULL)]
    fresh = []
    for layer in layers:
        tb.release_scratch()
        fresh.append(ffk.ff_layer_step(*layer, config=cfg, backend="triton"))
    for layer, want in zip(layers + layers[:1], fresh + fresh[:1]):
        got = ffk.ff_layer_step(*layer, config=cfg, backend="triton")
        for name in ("y", "g", "loss", "grad_weight", "grad_bias"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-6, atol=1e-7)
        assert not got.nonfinite.item()


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
# Precision choice, autotuning, specialisation
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def matmul_precision():
    """torch.backends.cuda.matmul, its fp32 precision restored after the test."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    yield matmul
    matmul.fp32_precision = before


@pytest.mark.parametrize("setting", ["tf32", "ieee"])
def test_dot_precision_follows_the_fp32_precision_api(matmul_precision, setting):
    """torch's new API (the GPU machine may set only that one; reading allow_tf32 then raises)."""
    matmul_precision.fp32_precision = setting
    assert fp32_matmul_uses_tf32() == (setting == "tf32")
    assert tb._dot_precision(torch.float32) == setting
    assert tb._dot_precision(torch.float16) == tb._dot_precision(torch.bfloat16) == "tf32"


@pytest.mark.parametrize("allow", [True, False])
def test_dot_precision_follows_the_legacy_flag(matmul_precision, allow):
    matmul_precision.fp32_precision = "none"
    matmul_precision.allow_tf32 = allow
    try:
        assert tb._dot_precision(torch.float32) == ("tf32" if allow else "ieee")
    finally:
        matmul_precision.allow_tf32 = False


# Two small configs per tuned kernel (the interpreter's own and a smaller one): valid for every
# precision, and quick to compile where a GPU runs these tests
_TUNING_CONFIGS = {
    "full_row": [dict(BLOCK_M=64, BLOCK_K=64), dict(BLOCK_M=32, BLOCK_K=32)],
    "tiled": [dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64), dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32)],
    "grad": [dict(BLOCK_N=32, BLOCK_K=64, BLOCK_M=32), dict(BLOCK_N=16, BLOCK_K=32, BLOCK_M=16)],
}


@pytest.fixture
def tuning(monkeypatch):
    """Real autotuning (in the interpreter too): two configs per tuned kernel and a stand-in for the
    benchmark that runs each trial once, records (kernel, thread) and yields the GIL for a moment
    (so an unlocked tuner would let a second thread in mid-tuning). Returns the trial records."""
    trials = []
    for name, tuned in (("full_row", tb._forward_full_row), ("tiled", tb._forward_tiled), ("grad", tb._grad)):
        def bench(kernel_call, quantiles, name=name):
            kernel_call()
            trials.append((name, threading.current_thread().name))
            time.sleep(0.02)
            return [1.0 + len(trials) % 2] * len(quantiles)
        monkeypatch.setattr(tuned, "configs", [tb._cfg(4, 2, **blocks) for blocks in _TUNING_CONFIGS[name]])
        monkeypatch.setattr(tuned, "do_bench", bench)
        # both configs tried whatever the precision (on a GPU the pruning splits FMA and wgmma tiles)
        monkeypatch.setattr(tuned, "prune", lambda configs, named_args, **kwargs: configs)
    tb.set_autotune(True)
    yield trials
    tb.set_autotune(False)


def test_autotune_key_separates_tf32_and_ieee(tuning, matmul_precision):
    """ieee and tf32 compile different kernels: a choice tuned for one is not reused for the other."""
    for setting in ("ieee", "tf32"):
        matmul_precision.fp32_precision = setting
        before = len(tuning)
        check_step(FULL, ALL_CONFIGS[0], bias=True)
        tuned_now = {name for name, _ in tuning[before:]}
        assert {"grad", "full_row"} <= tuned_now, f"{setting}: tuned only {tuned_now}"
    assert tb._dot_precision(torch.float32) == "tf32"


def test_autotune_restores_only_what_the_step_writes(tuning, monkeypatch):
    """Update mode without bias or momentum writes only W: each tuning trial copies W once (absent
    tensors used to be passed as aliases of W, so W was cloned four times a trial), and the trials
    leave no trace (the step equals the reference)."""
    x_pos, x_neg, w, _ = make_layer(37, 29, 45, 20, device=DEVICE, bias=False, seed=18)
    sgd = dict(lr=0.5, weight_decay=0.05)
    ref, ref_w, _ = float64_reference(x_pos, x_neg, w, None, ALL_CONFIGS[0], **sgd)
    w0 = w.clone()
    cloned, real_clone = [], torch.Tensor.clone

    def counting_clone(t, *args, **kwargs):
        cloned.append(t.data_ptr())
        return real_clone(t, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", counting_clone)
    ffk.ff_layer_step(x_pos, x_neg, w, None, config=ALL_CONFIGS[0], backend="triton", **sgd)
    monkeypatch.setattr(torch.Tensor, "clone", real_clone)
    grad_trials = sum(name == "grad" for name, _ in tuning)
    assert grad_trials == 2 and cloned.count(w.data_ptr()) == grad_trials
    assert _update_err(w, w0, ref_w) <= TOLERANCE[torch.float32]


def test_autotune_per_power_of_two_bucket_of_rows(tuning):
    """A batch of another size in the same power-of-two bucket of M reuses the tuned choice (no
    kernel argument carries the bucket); the next bucket tunes again."""
    def grad_trials(m_pos, m_neg):
        before = sum(name == "grad" for name, _ in tuning)
        check_step((m_pos, m_neg, 45, 20), ALL_CONFIGS[0], bias=True)
        return sum(name == "grad" for name, _ in tuning) - before

    assert grad_trials(40, 30) == 2  # M = 70: bucket 128, tuned
    assert grad_trials(33, 33) == 0  # M = 66: same bucket
    assert grad_trials(70, 70) == 2  # M = 140: bucket 256


def test_first_call_for_a_shape_is_thread_safe(tuning):
    """Two threads run one new shape at once (both autotune it): each gets its own right step.
    Triton's Autotuner keeps the call being tuned on itself, so unlocked tuning mixes the two."""
    cfg = ALL_CONFIGS[0]
    layers = [make_layer(37, 29, 45, 20, device=DEVICE, seed=s) for s in (19, 20)]
    starts = [(w.clone(), b.clone()) for _, _, w, b in layers]
    refs = [float64_reference(*layer, cfg, **SGD) for layer in layers]
    outs, errors = {}, []

    def step(i):
        try:
            outs[i] = ffk.ff_layer_step(*layers[i], config=cfg, backend="triton", **SGD)
        except Exception as e:  # reported below, with the thread's traceback in the message
            errors.append(repr(e))

    threads = [threading.Thread(target=step, args=(i,), name=f"step{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # one tuning pass for the shape (two trials, one per config), by whichever thread came first
    assert sum(name == "grad" for name, _ in tuning) == 2, tuning
    for i, ((x_pos, x_neg, w, b), (w0, b0), (ref, ref_w, ref_b)) in enumerate(zip(layers, starts, refs)):
        assert rel_err(outs[i].loss, ref.loss) <= TOLERANCE[torch.float32], i
        assert _update_err(w, w0, ref_w) <= TOLERANCE[torch.float32], i
        assert _update_err(b, b0, ref_b) <= TOLERANCE[torch.float32], i


def test_math_settings_share_one_compiled_kernel():
    """goodness, norm, loss, train/inference and peer normalisation are runtime values: every
    setting launches the same compiled variant of each kernel (the GPU's specialisation key), so a
    test matrix over the settings costs no extra JIT time."""
    from bench.count_triton_variants import recording

    shape = (37, 37, 45, 20)
    configs = SOME_CONFIGS + [HINTON_PEER, LOEWEX_PEER]
    with recording() as keys:
        for cfg in configs:
            x_pos, x_neg, w, b = make_layer(*shape, device=DEVICE, seed=22)
            ffk.ff_layer_step(x_pos, x_neg, w, b, config=cfg, backend="triton")
        ffk.ff_layer_forward(x_pos, w, b, config=configs[0], backend="triton")
    assert keys["_forward_kernel"] and keys["_grad_kernel"]
    for name, variants in keys.items():
        assert len(variants) == 1, f"{name}: {len(variants)} compiled variants for one shape"


# ------------------------------------------------------------------------------------------------
# Hopper compile check (CPU machines): the kernels compile for sm_90, the target the interpreter
# does not see (layouts, shared memory, wgmma). bench/compile_report_triton.py compiles them with
# triton's compiler in a subprocess without TRITON_INTERPRET (all variants: the report in
# bench/results/2026-11-27-sm90-compiled-triton.md); this checks the ones each change touched.
# Skipped where triton's CUDA backend or ptxas is missing, and on GPU machines (the GPU tests
# compile and run the kernels there).
# ------------------------------------------------------------------------------------------------

# (variant label prefix of bench/compile_report_triton.py, N a multiple of 16, runtime inner
# strides): the tightest variant of each kernel and path, and the GEMMs with strided x (whose
# offsets k * stride are the ones that pass 2^31)
_COMPILE_CHECKED = [
    ("forward full-row bf16 64x64x512", False, False),  # N = 500: unaligned y rows; 216 KB of 227
    ("forward full-row fp32-ieee", True, False),  # FMA (exact fp32): operands in registers
    ("forward tiled fp32-tf32 128x256x32", True, False),  # 192 KB, 4 stages
    ("grad update+momentum bf16 128x128x64", True, False),  # pipelined wgmma, the SGD epilogue
    ("grad update+momentum fp32-ieee", True, False),  # used to spill 12.8 KB a thread
    ("forward tiled bf16 64x64x32", True, True), ("grad grad bf16 64x64x32", True, True),
    ("rows", True, False), ("peer", True, False), ("split-reduce", True, False), ("sgd-update", True, False),
]

_COMPILE_SCRIPT = """
import json, sys
from bench import compile_report_triton as report
tb = report.load_backend()
for prefix, aligned_n, strided in json.loads(sys.argv[1]):
    (report.ALIGNED_INTS.add if aligned_n else report.ALIGNED_INTS.discard)("N")
    for label, fn, dtype, consts, warps, stages, absent in report.variants(tb):
        if label.startswith(prefix):
            kernel = report.compile_for_sm90(fn, dtype, consts, warps, stages, absent, strided=strided)
            info = report.analyse(kernel)
            info["i32_offsets"] = report.i32_pointer_offsets(kernel.asm["ttir"])
            print(json.dumps(dict(label=label, prefix=prefix, strided=strided, **info)), flush=True)
            break
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the GPU tests run the kernels")
def test_kernels_compile_for_hopper():
    """For each checked variant: no register spills, shared memory within Hopper's 227 KB, the
    wgmma loops pipelined (a wgmma group left in flight: pendings >= 1; contiguous x) and no
    pointer offset that is a 32-bit product of runtime values (strided inputs and large outputs
    pass 2^31 elements)."""
    pytest.importorskip("triton.backends.nvidia")
    import json

    root = os.path.dirname(os.path.dirname(os.path.abspath(tb.__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([root] + sys.path)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # two compiler processes (CI machines have two cores), each with every other variant
    halves = [_COMPILE_CHECKED[0::2], _COMPILE_CHECKED[1::2]]
    procs = [subprocess.Popen([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(half)], env=env, cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for half in halves]
    outputs = [p.communicate(timeout=900) for p in procs]
    compiled = []
    for proc, (stdout, stderr) in zip(procs, outputs):
        if proc.returncode != 0 and "ptxas" in stderr and "not found" in stderr.lower():
            pytest.skip("no ptxas for sm_90")
        assert proc.returncode == 0, stderr[-4000:]
        compiled += [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert sorted(c["prefix"] for c in compiled) == sorted(prefix for prefix, _, _ in _COMPILE_CHECKED)
    for c in compiled:
        assert c["spill_stores"] == 0 and c["stack"] == 0, c
        assert c["shared"] <= tb.SMEM_PER_BLOCK, c
        assert not c["i32_offsets"], c
        if c["wgmma"] and not c["strided"]:  # strided x is loaded element by element, via registers
            assert max(c["pendings"]) >= 1, c


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
@pytest.mark.parametrize("setting", ["ieee", "tf32"])
def test_gpu_tf32_setting(setting, matmul_precision):
    """fp32 on tensor cores (tf32) or exact (ieee, FMA configs), as torch's setting says."""
    matmul_precision.fp32_precision = setting
    check_step(GPU_SHAPES[1], ALL_CONFIGS[0], torch.float32, bias=True)
    check_step(GPU_SHAPES[0], ALL_CONFIGS[0], torch.float32, bias=False, update=True,
               momentum_buffers=_random_buffers())


@requires_cuda
def test_gpu_offsets_past_2_31_elements():
    """x_pos a transposed view whose k * stride passes 2^31 elements (the stride itself does not,
    so it reaches the kernels as a 32-bit int), and y with more than 2^31 elements (tiled N). The
    reference runs in float32 on the GPU (about 30 GB in all)."""
    m_pos, k, n = 2**21 + 3, 1100, 1040
    assert (k - 1) * m_pos > 2**31 and m_pos * n > 2**31 and m_pos < 2**31
    gen = torch.Generator(device="cuda").manual_seed(23)
    storage = torch.randn(k, m_pos, device="cuda", generator=gen, dtype=torch.bfloat16)
    x_pos = storage.t()  # [m_pos, k], strides (1, m_pos)
    x_neg = torch.randn(64, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).to(torch.bfloat16)
    b = (torch.randn(n, device="cuda", generator=gen) * 0.1).to(torch.bfloat16)
    cfg = ALL_CONFIGS[6]
    out = ffk.ff_layer_step(x_pos, x_neg, w, b, config=cfg, backend="triton")
    ref = ffk.ff_layer_step(x_pos.float(), x_neg.float(), w.float(), b.float(), config=cfg, backend="torch")

    def err(a, r):
        a, r = a.float(), r.float()
        return ((a - r).norm() / r.norm()).item()

    tol = TOLERANCE[torch.bfloat16]
    assert err(out.y_pos[-4096:], ref.y_pos[-4096:]) <= tol  # rows whose offsets pass 2^31
    assert err(out.g_pos, ref.g_pos) <= tol and err(out.loss, ref.loss) <= tol
    assert err(out.grad_weight, ref.grad_weight) <= tol and err(out.grad_bias, ref.grad_bias) <= tol


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
@pytest.mark.parametrize("config,rule", [
    (ffk.FFConfig.pytorch_recipe(), dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    (ffk.FFConfig.hinton(), dict(lr=0.05, momentum=0.9, dampening=0.9, weight_decay=1e-3,
                                 decoupled_weight_decay=True)),
    (ffk.FFConfig.loewex(), dict(lr=0.05, momentum=0.9, weight_decay=3e-4)),
    (ffk.FFConfig(loss="symba", alpha=4.0), dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
], ids=["recipe", "hinton", "loewex", "symba"])
def test_gpu_twenty_training_steps_match_reference(config, rule, dtype):
    """20 fused SGD steps on both backends from the same start (buffers and the peer-norm running
    mean carried from step to step)."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    x_pos, x_neg, w, b = make_layer(512, 512, 784, 500, dtype=dtype, device="cuda", seed=11)
    params = {name: (w.clone(), b.clone()) for name in ("torch", "triton")}
    state = {name: dict(momentum_buffers=None) for name in ("torch", "triton")}
    for _ in range(20):
        noise = torch.randn(x_pos.shape, device="cuda", generator=gen).to(dtype) * 0.1
        for name in ("torch", "triton"):
            pw, pb = params[name]
            out = ffk.ff_layer_step(x_pos + noise, x_neg - noise, pw, pb, config=config, backend=name,
                                    **rule, **state[name])
            state[name]["momentum_buffers"] = out.momentum_buffers
            if out.peer_mean is not None:
                state[name]["peer_mean"] = out.peer_mean
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    for got, want in zip(params["triton"], params["torch"]):
        assert rel_err(got, want) <= tol, f"rel err {rel_err(got, want):.3g}"
    if config.peer_norm != "none":
        assert rel_err(state["triton"]["peer_mean"], state["torch"]["peer_mean"]) <= tol


@requires_cuda
def test_gpu_auto_lists_triton():
    assert "triton" in ffk.available_backends()


# The steady state: no host sync, no allocation beyond the outputs, CUDA graphs, streams

@requires_cuda
@pytest.mark.parametrize("update,dtype", [(False, torch.float32), (True, torch.bfloat16)],
                         ids=["grad-fp32", "update-bf16"])
def test_gpu_steady_state_no_sync_and_no_allocation(update, dtype, tuned):
    """After the first call for a shape (which autotunes: that one synchronises), a step and an
    sgd_update do no host synchronisation (torch's sync debug mode raises on one) and allocate
    exactly their outputs on the caching allocator (the scratch is cached per stream)."""
    x_pos, x_neg, w, b = make_layer(1000, 1000, 256, 384, dtype=dtype, device="cuda", seed=33)
    mean = _peer_start(w.shape[0])
    kw = dict(config=HINTON_PEER, backend="triton", peer_mean=mean, skip_nonfinite=True)
    if update:
        kw.update(lr=0.01, momentum=0.9, momentum_buffers=_random_buffers()(w, b))
    param, grad = w.clone(), w * 0.01
    buf, skip = torch.zeros(w.shape, device="cuda"), torch.tensor(False, device="cuda")
    ffk.ff_layer_step(x_pos, x_neg, w, b, **kw)  # tunes and compiles
    ffk.sgd_update_(param, grad, buf, lr=0.1, momentum=0.9, skip=skip, backend="triton")
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            out = ffk.ff_layer_step(x_pos, x_neg, w, b, **kw)
        ffk.sgd_update_(param, grad, buf, lr=0.1, momentum=0.9, skip=skip, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    outputs = 4 if update else 6  # y, g, loss, nonfinite (+ grad_weight, grad_bias)
    assert torch.cuda.memory_stats()["allocation.all.allocated"] - before == 3 * outputs
    assert not out.nonfinite.item() and torch.isfinite(out.loss)


def _close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True, msg=lambda m: f"{what}: {m}")


@requires_cuda
def test_gpu_cuda_graph_capture_and_replay():
    """A gradient step, an update step (skip_nonfinite, peer norm, momentum) and sgd_update captured
    in CUDA graphs (after warm-up on a side stream) and replayed on new inputs give the eager
    results; a NaN fed to the captured update step leaves W, b, buffers and the peer mean alone."""
    n = 384
    x_pos, x_neg, w, b = make_layer(300, 300, 256, n, device="cuda", seed=34)
    new_x_pos, new_x_neg, _, _ = make_layer(300, 300, 256, n, device="cuda", seed=35)
    sgd = dict(lr=0.05, momentum=0.9, dampening=0.9, weight_decay=1e-3, decoupled_weight_decay=True)
    mean0 = _peer_start(n)
    bufs0 = _random_buffers()(w, b)
    # static tensors of the graphs
    xs_pos, xs_neg, mean_g = x_pos.clone(), x_neg.clone(), mean0.clone()
    w_u, b_u, mean_u = w.clone(), b.clone(), mean0.clone()
    bufs_u = tuple(t.clone() for t in bufs0)
    param, grad, buf = w.clone(), (w * 0.01).contiguous(), bufs0[0].clone()
    skip = torch.tensor(False, device="cuda")

    def grad_step():
        return ffk.ff_layer_step(xs_pos, xs_neg, w, b, config=HINTON_PEER, backend="triton", peer_mean=mean_g)

    def update_step():
        return ffk.ff_layer_step(xs_pos, xs_neg, w_u, b_u, config=HINTON_PEER, backend="triton",
                                 peer_mean=mean_u, momentum_buffers=bufs_u, skip_nonfinite=True, **sgd)

    def sgd_step():
        ffk.sgd_update_(param, grad, buf, lr=0.1, momentum=0.9, skip=skip, backend="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles, and the steps' tensors settle
        for _ in range(2):
            grad_step(), update_step(), sgd_step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graphs = [torch.cuda.CUDAGraph() for _ in range(3)]
    with torch.cuda.graph(graphs[0]):
        out_g = grad_step()
    with torch.cuda.graph(graphs[1]):
        out_u = update_step()
    with torch.cuda.graph(graphs[2]):
        sgd_step()

    # replay on new inputs from known states; eager on copies of the same states
    xs_pos.copy_(new_x_pos)
    xs_neg.copy_(new_x_neg)
    mean_g.copy_(mean0)
    start_u = [t.clone() for t in (w_u, b_u, *bufs_u, mean_u)]
    start_sgd = [param.clone(), buf.clone()]
    for graph in graphs:
        graph.replay()
    torch.cuda.synchronize()
    mean_e = mean0.clone()
    ref_g = ffk.ff_layer_step(new_x_pos, new_x_neg, w, b, config=HINTON_PEER, backend="triton", peer_mean=mean_e)
    w_e, b_e, bw_e, bb_e, mean_ue = (t.clone() for t in start_u)
    ref_u = ffk.ff_layer_step(new_x_pos, new_x_neg, w_e, b_e, config=HINTON_PEER, backend="triton",
                              peer_mean=mean_ue, momentum_buffers=(bw_e, bb_e), skip_nonfinite=True, **sgd)
    p_e, buf_e = (t.clone() for t in start_sgd)
    ffk.sgd_update_(p_e, grad, buf_e, lr=0.1, momentum=0.9, skip=skip, backend="triton")
    for name in ("y", "g", "loss", "nonfinite", "grad_weight", "grad_bias"):
        _close(getattr(out_g, name), getattr(ref_g, name), f"gradient step {name}")
    _close(mean_g, mean_e, "gradient step peer mean")
    for name in ("y", "g", "loss", "nonfinite"):
        _close(getattr(out_u, name), getattr(ref_u, name), f"update step {name}")
    for got, want, what in zip((w_u, b_u, *bufs_u, mean_u), (w_e, b_e, bw_e, bb_e, mean_ue),
                               ("weight", "bias", "buf_weight", "buf_bias", "peer mean")):
        _close(got, want, f"update step {what}")
    _close(param, p_e, "sgd_update param")
    _close(buf, buf_e, "sgd_update buffer")

    # a poisoned input through the captured update step, and skip=True through sgd_update
    xs_pos[5, 7] = float("nan")
    skip.fill_(True)
    kept = [t.clone() for t in (w_u, b_u, *bufs_u, mean_u, param, buf)]
    graphs[1].replay()
    graphs[2].replay()
    torch.cuda.synchronize()
    assert out_u.nonfinite.item() and torch.isnan(out_u.loss)
    for got, want in zip((w_u, b_u, *bufs_u, mean_u, param, buf), kept):
        assert torch.equal(got, want)


@requires_cuda
def test_gpu_steps_on_two_streams_at_once():
    """Two streams each run steps without waiting for the other: each stream has its own scratch,
    so the results equal the steps run one after the other."""
    cfg = ALL_CONFIGS[6]
    layers = [make_layer(4000, 4000, 784, 500, device="cuda", seed=s) for s in (36, 37)]
    serial = [ffk.ff_layer_step(*layer, config=cfg, backend="triton") for layer in layers]
    streams = [torch.cuda.Stream() for _ in layers]
    outs = [None] * len(layers)
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    for _ in range(3):
        for i, stream in enumerate(streams):
            with torch.cuda.stream(stream):
                outs[i] = ffk.ff_layer_step(*layers[i], config=cfg, backend="triton")
    for stream in streams:
        torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for out, want in zip(outs, serial):
        for name in ("y", "g", "loss", "grad_weight", "grad_bias"):
            _close(getattr(out, name), getattr(want, name), name)
