"""The "triton" backend: one Forward-Forward layer step in as few passes over memory as the math allows.

Same contract as ``reference.py`` (the executable spec, DESIGN.md section 1): ``layer_step`` and
``layer_forward`` take validated inputs and return exactly what the reference returns, in the same
dtypes (y in the input dtype, goodness and loss in float32, gradients in the weight dtype), and
update the same tensors in place (weight, bias, momentum buffers, the peer-norm running mean);
``sgd_update`` is the step's update alone on a given gradient (data-parallel training).

Kernels, in launch order (M = B+ + B- rows, N outputs, K inputs):

1. ``_forward_kernel``: z = x W^T + b as a tiled GEMM (fp32 accumulation) reading x_pos and x_neg
   through two pointers (a row tile never straddles the two; [x_pos; x_neg] never exists in
   memory), with ReLU, the row sums of squares q_i = sum_j h_ij^2 and, with peer normalisation,
   the column sums of h over the positive rows (atomics) in the epilogue.
   * "full row" (N <= FULL_ROW_MAX_N: one program holds a whole row of N): the epilogue also writes
     the normalised y, and for the softplus loss (or inference) finishes goodness, loss and the
     per-row coefficient too.
   * "tiled" (wider N): the program writes h (un-normalised) into y's storage and adds its partial
     q_i with atomics; ``_rows_kernel`` finishes the rows.
2. ``_rows_kernel`` (only for SymBa or tiled N): the per-row finish that needs a complete q_i or the
   partner row of a SymBa pair: goodness, loss, coefficient, and (tiled N) y = h / r_i in place.
3. ``_peer_kernel`` (peer normalisation only; one small program): the running mean's update in
   place (kept with skip_nonfinite on a non-finite step) and p = kappa (m - mean(m)) [N].
4. ``_grad_kernel``: grad_W = sum_i dz_i^T x_i and grad_b = sum_i dz_i with dz_ij = c_i h_ij (+ p_j
   on positive rows) as ONE GEMM reduced over the M rows. h is recovered on the fly from y
   (c_i h_ij = coef_i y_ij with coef_i = c_i r_i), so no [M, N] tensor exists besides y. The
   reduction over M is split across programs when the [N, K] tiles alone cannot fill the GPU; an
   unsplit program writes the gradient or applies the fused SGD update directly. Its program
   (0, 0) writes the step's loss and non-finite flag.
5. ``_split_reduce_kernel`` (split reductions only): sums the fp32 partials and writes the gradient
   or applies the SGD update (one launch for W, one for b). ``sgd_update`` runs it on a given
   gradient (one "partial"): the update math (``_apply_grad``) exists once.

Non-finite steps (``out.nonfinite``, a 0-dim bool on the device): the step is flagged when some
z = x W^T + b is -inf (the ReLU hides it; the epilogue marks it as h = -0.0 and raises stats[0])
or some q_i is NaN/inf (NaN and +inf in z reach q: the row finish adds NaN to the loss sum). The
gradient kernel turns that into the flag and a NaN loss; with ``skip_nonfinite`` the update, the
split reduction and the peer kernel read the flag on the device and write nothing in place.

Passes over memory: x twice (the two GEMMs: the floor), W once (twice with an update), y written
once and read once; tiled N adds one read + write of y (the in-place normalisation; skipped for
norm="none"). Scratch beyond the outputs: float32 [M + N + 8] (q_i, the peer sums, the loss, the
flag and the operand bound; zeroed by one memset per step), float32 [M] (the coefficients) and,
for a split reduction, float32 [splits, N, K] + [splits, N] partials (splits <= 16): O(M + N*K),
carved from one buffer cached per (device, stream) and grown as needed, so a repeated step
allocates only its outputs (y, g, loss, nonfinite and the gradients); a step captured in a CUDA
graph takes its own scratch from the graph's pool. No host synchronisation: the loss and the column
sums are reduced with device atomics, so results are not bit-reproducible run to run (the order of
float additions varies; the reference backend is deterministic). The first call for a new shape
autotunes, which synchronises; the steady state does not (no sync, no allocation beyond the
outputs: a step can be captured in a CUDA graph).

Precision: everything accumulates in fp32. fp32 inputs use tf32 tensor cores when torch allows
tf32 for fp32 matmuls (``backends.fp32_matmul_uses_tf32``), exact fp32 (``input_precision="ieee"``)
otherwise. For fp16/bf16 the weight-gradient GEMM reads h through y stored in that dtype and dz
rounded to it: two roundings of the input dtype (~3 significant digits), inside the 1e-2 / 2e-2
tolerances. fp16 range: the dz operand is scaled on the device by a power of two S chosen from
the step's own bound on |dz| (the forward epilogue's max_i |c_i| sqrt(q_i) and the peer kernel's
max |p_j|), so its entries stay below 2^14 whatever the input scale, and the fp32 result is
multiplied by 1/S exactly. One fp16 limit remains, documented and tested: on the tiled path
(N > FULL_ROW_MAX_N) h is stored in y's storage before the normalisation, so an activation above
65504 becomes inf there (the float32 reference stays finite); the full-row path has no such limit.
NaN in any input reaches the loss, goodness, y and gradients as on the reference (the ReLU keeps
NaN: ``tl.maximum`` would drop it). The loss sums terms already divided by M (or B): finite
wherever the mean is (theta ~ 1e38). Pointer offsets are 64-bit wherever a product can pass 2^31
elements (strided x, y rows, partials).

Compiled variants: only what changes a kernel's structure is a constexpr (bias or not, full row or
tiled, update mode and momentum, the dot precision, the block sizes). The goodness, norm and loss
forms, training or inference, peer normalisation and the split count are runtime values, and row
counts are never specialised, so a test matrix over the configs compiles each kernel shape once.
Every launch holds one lock, and a whole step's launches too: steps may be called from several
threads (triton's autotuner is not re-entrant on a shape's first call, the interpreter patches
triton.language while it runs, and two steps on one stream share that stream's scratch).
bench/compile_report_triton.py compiles every config for sm_90 on a CPU machine and reports
registers, spills, shared memory and wgmma pipelining.
"""

from __future__ import annotations

import os
import threading

import torch
import triton
import triton.language as tl

from . import backends as _backends
from .backends import FFStepOutput, fp32_matmul_uses_tf32, new_output
from .config import FFConfig

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Widest N finished in one program (the full-row path). 512 holds N = 500 (the MNIST recipe) in one
# 64 x 512 fp32 accumulator (128 registers a thread at 8 warps); wider layers take the tiled path.
# The interpreter uses a small width so that tests reach both paths on small shapes.
FULL_ROW_MAX_N = 64 if INTERPRET else 512
MAX_SPLIT = 16  # most programs that share one [N, K] tile of the weight gradient

# The largest finite float32: x <= _FLT_MAX is False exactly for inf and NaN (ordered comparison).
_FLT_MAX = tl.constexpr(3.4028234663852886e38)

# Row counts change from batch to batch and the split count from shape to shape: they are never
# worth a specialised compile (triton would specialise a value of 1 or a multiple of 16).
_NO_SPECIALIZE = ["M", "M_POS", "M_NEG", "num_splits"]


# ------------------------------------------------------------------------------------------------
# Shared element-wise math (one copy, used by every kernel)
# ------------------------------------------------------------------------------------------------

@triton.jit
def _log1p(u):
    # log(1 + u) for u in [0, 1]. log(1 + u) rounds 1 + u and loses u's digits when u is small, so
    # below 0.01 use the series u - u^2/2 + u^3/3 - u^4/4 + u^5/5 (truncation error < u^6/6).
    series = u * (1.0 - u * (0.5 - u * (1.0 / 3.0 - u * (0.25 - u * 0.2))))
    return tl.where(u < 0.01, series, tl.log(1.0 + u))


@triton.jit
def _softplus(t):
    # softplus(t) = log(1 + e^t) = max(t, 0) + log(1 + e^-|t|): finite for every finite t.
    return tl.maximum(t, 0.0) + _log1p(tl.exp(-tl.abs(t)))


@triton.jit
def _sigmoid(t):
    # 1 / (1 + e^-t) without overflow: with e = e^-|t| <= 1, sigmoid = 1/(1+e) (t >= 0) or e/(1+e).
    e = tl.exp(-tl.abs(t))
    return tl.where(t >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def _row_norm(q, norm_scale, eps, no_norm):
    # r_i with y_i = h_i / r_i: sqrt(q_i) + eps (l2, norm_scale 1), sqrt(q_i / N) + eps (rms,
    # norm_scale 1/N), 1 (none). Runtime values: the norms differ by a few flops, not a compile.
    return tl.where(no_norm, 1.0, tl.sqrt(q * norm_scale) + eps)


@triton.jit
def _finish_rows(q, q_partner, rows, row_ok, g_ptr, coef_ptr, stats_ptr, M_POS, theta, alpha, eps,
                 loss_weight, goodness_scale, coef_scale, norm_scale, no_norm, symba, train):
    """Goodness, loss and gradient coefficient of rows ``rows`` (global int64 indices) from q_i.

    g_i = goodness_scale q_i (1 for "sum", 1/N for "mean"); s_i = +1 (i < B+) or -1. Both losses
    are L = loss_weight * sum softplus(t_i) with
      softplus: t_i = -s_i (g_i - theta),          loss_weight = 1/M, every row counted;
      SymBa:    t_i = -alpha s_i (g_i - g_partner) (= -alpha (g+ - g-) for both rows of a pair),
                loss_weight = 1/B, each pair counted once (on its positive row).
    dL/dz_ij = c_i h_ij with c_i = -s_i sigmoid(t_i) coef_scale (coef_scale = (2 or 2/N) times 1/M
    or alpha/B). The weight gradient reads h as r_i y_ij, so this stores coef_i = c_i r_i, and
    raises the operand bound stats[2] to max_i |c_i| sqrt(q_i) >= max_j |c_i h_ij| (the gradient
    kernel scales its fp16 operand by it). Each softplus term is scaled by loss_weight before any
    sum (divide, then add): the mean stays finite wherever every term is (theta ~ 1e38 in fp32).
    A row whose q_i is not finite adds NaN to the loss (counted or not): the summed loss is NaN
    exactly when some q_i is, which is half of the step's non-finite flag (_step_nonfinite). The
    softplus terms of finite q are never NaN (at most +inf), so nothing else can look like it.
    """
    g = q * goodness_scale
    tl.store(g_ptr + rows, g, mask=row_ok)
    if train:
        is_pos = rows < M_POS
        sign = tl.where(is_pos, 1.0, -1.0)
        t_softplus = -sign * (g - theta)
        t_symba = -alpha * sign * (g - q_partner * goodness_scale)
        t = tl.where(symba, t_symba, t_softplus)
        counted = tl.where(symba, row_ok & is_pos, row_ok)
        c = -sign * _sigmoid(t) * coef_scale
        tl.store(coef_ptr + rows, c * _row_norm(q, norm_scale, eps, no_norm), mask=row_ok)
        term = tl.where(counted, _softplus(t) * loss_weight, 0.0)
        loss = tl.sum(tl.where(row_ok & ~(q <= _FLT_MAX), float("nan"), term), axis=0)
        tl.atomic_add(stats_ptr + 1, loss)
        tl.atomic_max(stats_ptr + 2, tl.max(tl.where(row_ok, tl.abs(c) * tl.sqrt(q), 0.0), axis=0))


@triton.jit
def _relu_marking_neg_inf(acc):
    """relu(z) that keeps NaN (tl.maximum drops it: a NaN input must reach the loss, as on the
    reference) and marks z = -inf, the one non-finite pre-activation the ReLU hides, as -0.0
    (every other zero is +0.0, z = -0.0 included). -0.0 is 0 for all that follows (q, y, dz, the
    peer sums), and _mark_neg_inf finds it at the end of the epilogue, where registers are free:
    a reduction over z beside the accumulator makes the 64 x 512 full-row tile spill."""
    return tl.where(acc <= 0.0, tl.where(acc < -_FLT_MAX, -0.0, 0.0), acc)


@triton.jit
def _mark_neg_inf(stats_ptr, h, row_ok):
    """Set stats[0] (zeroed per step) if a row of h holds a -0.0 mark (or a NaN with its sign bit
    set, which q makes non-finite anyway): its bits are the only negative int32s in h. One masked
    atomic per program, none when nothing is marked."""
    marked = row_ok & (tl.min(h.to(tl.int32, bitcast=True), axis=1) < 0)
    any_marked = tl.max(marked.to(tl.float32), axis=0)
    tl.atomic_max(stats_ptr, any_marked, mask=any_marked > 0.0)


@triton.jit
def _step_nonfinite(stats_ptr):
    """The step's non-finite flag, once the row finish is done: some z_ij = -inf (stats[0]) or some
    q_i not finite (the loss sum stats[1] is NaN; NaN and +inf in z reach q, since h keeps them)."""
    loss = tl.load(stats_ptr + 1)
    return (tl.load(stats_ptr) != 0.0) | (loss != loss)


@triton.jit
def _skip_flag(flag_ptr, skip_nonfinite):
    """``skip_nonfinite`` and the bool at flag_ptr (the step's nonfinite output, or sgd_update's
    ``skip``): read on the device, no host sync."""
    return tl.load(flag_ptr, mask=skip_nonfinite, other=0).to(tl.int32) != 0


@triton.jit
def _operand_scale(bound):
    """(S, 1/S): the power of two with 2 * bound * S < 2^14, clamped to [2^-100, 2^100].

    With bound >= every |dz| of the step (stats[2]), dz * S stays below 2^14: fp16 cannot overflow
    (max 65504), and entries far below the largest keep fp16's precision down to 2^-24 of it.
    bound < 2^(e - 126) for the biased exponent e of its bits, so S = 2^(13 - (e - 126))."""
    e = (bound.to(tl.int32, bitcast=True) >> 23) & 0xFF
    s_exp = tl.minimum(tl.maximum(139 - e, -100), 100)
    scale = ((s_exp + 127) << 23).to(tl.float32, bitcast=True)
    inv_scale = ((127 - s_exp) << 23).to(tl.float32, bitcast=True)
    return scale, inv_scale


@triton.jit
def _apply_grad(grad, offs, mask, grad_ptr, param_ptr, buf_ptr, skip, lr, keep, gain, wd_grad, wd_step,
                UPDATE: tl.constexpr, HAS_MOMENTUM: tl.constexpr):
    # The one copy of the update math (the step's epilogues and sgd_update). Gradient mode: store
    # grad (cast to the weight dtype). Update mode: SGDUpdate.coefficients()'s rule in fp32:
    # d = grad + wd_grad p; with momentum buf = keep buf + gain d, d = buf; p -= lr (d + wd_step p);
    # nothing is written where ``skip`` (a scalar: the step's non-finite skip) is set.
    if UPDATE:
        p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        write = tl.where(skip, False, mask)  # (not `mask & ~skip`: the interpreter rejects it)
        d = grad + wd_grad * p
        if HAS_MOMENTUM:
            d = keep * tl.load(buf_ptr + offs, mask=mask, other=0.0).to(tl.float32) + gain * d
            tl.store(buf_ptr + offs, d.to(buf_ptr.dtype.element_ty), mask=write)
        tl.store(param_ptr + offs, (p - lr * (d + wd_step * p)).to(param_ptr.dtype.element_ty), mask=write)
    else:
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# 1. Forward GEMM with the goodness epilogue
# ------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _forward_kernel(
    xp_ptr, xn_ptr, w_ptr, b_ptr, y_ptr, stats_ptr, q_ptr, peer_ptr, g_ptr, coef_ptr,
    M_POS, M_NEG, N, K,
    stride_xp_m, stride_xp_k, stride_xn_m, stride_xn_k, stride_w_n, stride_w_k, stride_b,
    theta, alpha, eps, loss_weight, goodness_scale, coef_scale, norm_scale, no_norm, finish_rows,
    train, peer,
    HAS_BIAS: tl.constexpr, FULL_ROW: tl.constexpr, DOT_PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of h = relu(x W^T + b), x = [x_pos; x_neg], and its epilogue.

    Row tiles 0 .. tiles_p-1 cover x_pos, the rest x_neg; global row = B+ + local row for negatives.
    q_i = sum_j h_ij^2 (padding rows and columns are masked to 0). FULL_ROW (BLOCK_N >= N): this
    tile holds all of q_i, so y_i = h_i / r_i is final, and with ``finish_rows`` the row's goodness,
    loss and coefficient too (_finish_rows); otherwise q_i goes to q_ptr for _rows_kernel. Tiled N:
    y receives h itself and q_i is summed over the column tiles with atomics into q_ptr (zeroed).
    With ``peer``, positive tiles add their column sums of h into peer_ptr (zeroed). A z_ij =
    -inf sets stats[0] (_relu_marking_neg_inf); NaN and +inf reach q_i and so the loss.
    """
    pid = tl.program_id(0)
    tiles_p = tl.cdiv(M_POS, BLOCK_M)
    num_pid_m = tiles_p + tl.cdiv(M_NEG, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row tiles sweep the column tiles together, so x and W stay in L2
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    # the tile's input: positives (x_pos) or negatives (x_neg), chosen once per program
    is_pos = pid_m < tiles_p
    x_ptr = tl.where(is_pos, xp_ptr, xn_ptr)
    stride_xm = tl.where(is_pos, stride_xp_m, stride_xn_m)
    stride_xk = tl.where(is_pos, stride_xp_k, stride_xn_k)
    n_rows = tl.where(is_pos, M_POS, M_NEG)
    row_base = tl.where(is_pos, 0, M_POS)
    local = tl.where(is_pos, pid_m, pid_m - tiles_p) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    # Rows and columns past the end are wrapped into range (the epilogue masks them), so that only
    # K is masked in the loop. Offsets are int64: strided x can pass 2^31 elements.
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    x_rows = x_ptr + ((local % n_rows).to(tl.int64) * stride_xm)[:, None]
    w_rows = w_ptr + ((cols % N).to(tl.int64) * stride_w_n)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        x = tl.load(x_rows + (k * stride_xk)[None, :], mask=(k < K)[None, :], other=0.0)
        w = tl.load(w_rows + (k * stride_w_k)[:, None], mask=(k < K)[:, None], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + cols.to(tl.int64) * stride_b, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    row_ok = local < n_rows
    h = _relu_marking_neg_inf(acc)
    h = tl.where(row_ok[:, None] & col_ok[None, :], h, 0.0)
    q = tl.sum(h * h, axis=1)

    rows = (row_base + local).to(tl.int64)  # global row index in [0, M)
    y_ptrs = y_ptr + rows[:, None] * N + cols[None, :]
    y_mask = row_ok[:, None] & col_ok[None, :]
    if FULL_ROW:
        y = h * (1.0 / _row_norm(q, norm_scale, eps, no_norm))[:, None]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=y_mask)
        if finish_rows:
            _finish_rows(q, q, rows, row_ok, g_ptr, coef_ptr, stats_ptr, M_POS, theta, alpha, eps,
                         loss_weight, goodness_scale, coef_scale, norm_scale, no_norm, False, train)
        else:
            tl.store(q_ptr + rows, q, mask=row_ok)
    else:
        tl.store(y_ptrs, h.to(y_ptr.dtype.element_ty), mask=y_mask)
        tl.atomic_add(q_ptr + rows, q, mask=row_ok)
    # Peer normalisation: the column sums of h over positive rows. Last, so that the sums are not
    # live beside the tile and the row finish (a 64 x 512 tile spills on Hopper otherwise).
    if peer & is_pos:
        tl.atomic_add(peer_ptr + cols.to(tl.int64), tl.sum(h, axis=0), mask=col_ok)
    _mark_neg_inf(stats_ptr, h, row_ok)


# ------------------------------------------------------------------------------------------------
# 2. Row finish (SymBa pairs, tiled N)
# ------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _rows_kernel(
    y_ptr, stats_ptr, q_ptr, g_ptr, coef_ptr, M, M_POS, N,
    theta, alpha, eps, loss_weight, goodness_scale, coef_scale, norm_scale, no_norm, rescale, symba, train,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Finish rows from the complete q_i: with ``rescale``, y_ij = h_ij / r_i in place on tile
    (pid_m, pid_n); the programs of column 0 also run _finish_rows (a SymBa row reads the q of
    its partner, row i +- B); a complete q_i that is not finite makes the loss NaN there (tiled
    N: the partial sums can all be finite and their total not)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    q = tl.load(q_ptr + rows, mask=row_ok, other=0.0)
    if rescale:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ptrs = y_ptr + rows[:, None] * N + cols[None, :]
        mask = row_ok[:, None] & (cols < N)[None, :]
        h = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        y = h * (1.0 / _row_norm(q, norm_scale, eps, no_norm))[:, None]
        tl.store(ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)
    if pid_n == 0:
        partner = tl.where(rows < M_POS, rows + M_POS, rows - M_POS)
        q_partner = tl.load(q_ptr + partner, mask=row_ok & symba, other=0.0)
        _finish_rows(q, q_partner, rows, row_ok, g_ptr, coef_ptr, stats_ptr, M_POS, theta, alpha, eps,
                     loss_weight, goodness_scale, coef_scale, norm_scale, no_norm, symba, train)


# ------------------------------------------------------------------------------------------------
# 3. Peer normalisation: the running mean and the per-unit term
# ------------------------------------------------------------------------------------------------

@triton.jit
def _peer_mean(mean_ptr, peer_ptr, n, ok, rho, inv_m_pos, skip):
    # this step's running mean of units n: rho mean + (1 - rho) sums / B+, or the old one (skip)
    old = tl.load(mean_ptr + n, mask=ok, other=0.0)
    new = rho * old + (1.0 - rho) * (tl.load(peer_ptr + n, mask=ok, other=0.0) * inv_m_pos)
    return tl.where(skip, old, new)


@triton.jit
def _peer_kernel(mean_ptr, peer_ptr, stats_ptr, N, rho, inv_m_pos, kappa, skip_nonfinite,
                 BLOCK: tl.constexpr):
    """One program. In: peer_ptr = column sums of h over the positive rows. Out, in place:
    mean <- rho mean + (1 - rho) sums / B+ (kept as it is when ``skip_nonfinite`` and the step's
    non-finite flag are set), peer_ptr <- p = kappa (mean - mean(mean)) of the mean as stored, and
    the operand bound stats[2] raised to max |p| (p joins dz in the gradient GEMM).
    Two sweeps over N: the first sums the new mean, the second recomputes it (same rounding)
    before overwriting the old one, so nothing is read after it was written."""
    skip = tl.where(skip_nonfinite, _step_nonfinite(stats_ptr), False)
    offs = tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK):
        n = n0 + offs
        ok = n < N
        total += tl.where(ok, _peer_mean(mean_ptr, peer_ptr, n, ok, rho, inv_m_pos, skip), 0.0)
    centre = tl.sum(total, axis=0) / N
    largest = tl.zeros((BLOCK,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK):
        n = n0 + offs
        ok = n < N
        new = _peer_mean(mean_ptr, peer_ptr, n, ok, rho, inv_m_pos, skip)
        p = kappa * (new - centre)
        tl.store(mean_ptr + n, new, mask=tl.where(skip, False, ok))
        tl.store(peer_ptr + n, p, mask=ok)
        largest = tl.maximum(largest, tl.where(ok, tl.abs(p), 0.0))
    tl.atomic_max(stats_ptr + 2, tl.max(largest, axis=0))


# ------------------------------------------------------------------------------------------------
# 4. Weight and bias gradient (one GEMM over the rows) with the SGD epilogue
# ------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _grad_kernel(
    y_ptr, coef_ptr, stats_ptr, peer_ptr, xp_ptr, xn_ptr,
    w_ptr, b_ptr, bufw_ptr, bufb_ptr, gw_ptr, gb_ptr, pw_ptr, pb_ptr, loss_ptr, nonfinite_ptr,
    M_POS, M_NEG, N, K, stride_xp_m, stride_xp_k, stride_xn_m, stride_xn_k,
    num_splits, peer, skip_nonfinite, lr, keep, gain, wd_grad, wd_step,
    HAS_BIAS: tl.constexpr, UPDATE: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Tile [BLOCK_N, BLOCK_K] of grad_W (and grad_b in the programs of column tile 0) over this
    program's share of the row tiles (program_id(1) of num_splits; positives' tiles first).

    grad_W = dZ^T X with dz_ij = c_i h_ij + [i positive] p_j = coef_i y_ij + [i positive] p_j.
    dz is built in registers from y and the per-row coef, scaled by the power of two S
    (_operand_scale) and rounded to the input dtype: it is the wgmma A operand, which Hopper reads
    from registers, while x goes from global to shared memory to the tensor cores untouched, so
    the loads and the wgmma stay pipelined (scaling x instead would put a register-written
    operand in shared memory, and every wgmma would have to finish before the next tile's).
    grad_b = sum_i dz_i accumulates the same fp32 dz (before rounding) elementwise in registers.

    One split: the fp32 result is final: stored in the weight dtype or applied as an SGD step (each
    element belongs to exactly one program, so the in-place update is race-free). Several splits:
    the fp32 partials go to pw/pb[split] for _split_reduce_kernel (the sum is linear, the peer
    term included: each split adds it for its own positive rows). With ``skip_nonfinite`` and the
    step's non-finite flag set, the update writes nothing (the gradients are written either way).

    Program (0, 0) also finishes the step's scalars, every contribution to them being done (the
    earlier kernels): loss_ptr <- the summed loss, or NaN when the step is non-finite (a z = -inf
    leaves the sum finite); nonfinite_ptr <- the flag as a bool.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_n = pid // num_k
    pid_k = pid % num_k
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = n < N
    k_ok = k < K

    tiles_p = tl.cdiv(M_POS, BLOCK_M)
    tiles = tiles_p + tl.cdiv(M_NEG, BLOCK_M)
    per_split = tl.cdiv(tiles, num_splits)
    t0 = split * per_split
    t1 = tl.minimum(t0 + per_split, tiles)

    nonfinite = _step_nonfinite(stats_ptr)
    if (pid == 0) & (split == 0):
        tl.store(loss_ptr, tl.where(nonfinite, float("nan"), tl.load(stats_ptr + 1)))
        tl.store(nonfinite_ptr, nonfinite)
    skip = tl.where(skip_nonfinite, nonfinite, False)
    scale, inv_scale = _operand_scale(tl.load(stats_ptr + 2))
    p_scaled = tl.load(peer_ptr + n, mask=n_ok & peer, other=0.0) * scale
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs = tl.arange(0, BLOCK_M)
    k64 = k.to(tl.int64)
    for t in range(t0, t1):
        is_pos = t < tiles_p
        x_ptr = tl.where(is_pos, xp_ptr, xn_ptr)
        stride_xm = tl.where(is_pos, stride_xp_m, stride_xn_m)
        stride_xk = tl.where(is_pos, stride_xp_k, stride_xn_k)
        local = tl.where(is_pos, t, t - tiles_p) * BLOCK_M + offs
        ok = local < tl.where(is_pos, M_POS, M_NEG)
        rows = (tl.where(is_pos, 0, M_POS) + local).to(tl.int64)
        coef = tl.load(coef_ptr + rows, mask=ok, other=0.0) * scale
        y = tl.load(y_ptr + rows[:, None] * N + n[None, :], mask=ok[:, None] & n_ok[None, :], other=0.0)
        dz = y.to(tl.float32) * coef[:, None] + tl.where((ok & is_pos)[:, None], p_scaled[None, :], 0.0)
        if HAS_BIAS:
            bias_acc += dz
        x = tl.load(x_ptr + (local.to(tl.int64) * stride_xm)[:, None] + (k64 * stride_xk)[None, :],
                    mask=ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(dz.to(x.dtype)), x, acc, input_precision=DOT_PRECISION)

    acc = acc * inv_scale
    n64 = n.to(tl.int64)
    if num_splits == 1:
        # the final values, in two column halves one after the other: the SGD step on a whole tile
        # (acc, W, buf and their addresses live at once) would spill registers on Hopper
        lo, hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_N, 2, BLOCK_K // 2)), (0, 2, 1)))
        half = pid_k * BLOCK_K + tl.arange(0, BLOCK_K // 2)
        _apply_grad(lo, n64[:, None] * K + half[None, :], n_ok[:, None] & (half < K)[None, :],
                    gw_ptr, w_ptr, bufw_ptr, skip, lr, keep, gain, wd_grad, wd_step, UPDATE, HAS_MOMENTUM)
        half += BLOCK_K // 2
        _apply_grad(hi, n64[:, None] * K + half[None, :], n_ok[:, None] & (half < K)[None, :],
                    gw_ptr, w_ptr, bufw_ptr, skip, lr, keep, gain, wd_grad, wd_step, UPDATE, HAS_MOMENTUM)
    else:
        tl.store(pw_ptr + (split.to(tl.int64) * N + n64)[:, None] * K + k[None, :], acc,
                 mask=n_ok[:, None] & k_ok[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            grad_b = tl.sum(bias_acc, axis=0) * inv_scale
            if num_splits == 1:
                _apply_grad(grad_b, n64, n_ok, gb_ptr, b_ptr, bufb_ptr, skip, lr, keep, gain, wd_grad,
                            wd_step, UPDATE, HAS_MOMENTUM)
            else:
                tl.store(pb_ptr + split.to(tl.int64) * N + n64, grad_b, mask=n_ok)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _split_reduce_kernel(part_ptr, numel, num_splits, grad_ptr, param_ptr, buf_ptr, flag_ptr,
                         skip_nonfinite, lr, keep, gain, wd_grad, wd_step, UPDATE: tl.constexpr,
                         HAS_MOMENTUM: tl.constexpr, BLOCK: tl.constexpr):
    # grad = sum_s partial[s] (in fp32), then the same store / SGD step as _grad_kernel, skipped
    # when skip_nonfinite and the bool at flag_ptr (the step's nonfinite output) are set. Also
    # sgd_update's kernel: one "partial", the given gradient (param's dtype), flag_ptr its ``skip``.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = part_ptr + offs
    for s in range(num_splits):
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        ptrs += numel  # 64-bit pointer arithmetic: split * numel can pass 2^31
    _apply_grad(acc, offs, mask, grad_ptr, param_ptr, buf_ptr, _skip_flag(flag_ptr, skip_nonfinite), lr,
                keep, gain, wd_grad, wd_step, UPDATE, HAS_MOMENTUM)


# ------------------------------------------------------------------------------------------------
# Launch configs (Hopper) and autotuning
# ------------------------------------------------------------------------------------------------
# Hopper: 227 KB of shared memory per block, 64K 32-bit registers per SM (255 a thread). A
# [BM, BN] fp32 accumulator costs BM*BN/(32*warps) registers a thread. The operand ring costs
# (rows_a + rows_b) * BK * elem_size bytes per stage; triton allocates num_stages of them, and the
# epilogue's layout conversions reuse that memory once the loop is done. Every config below
# compiles for sm_90 without register spills in every mode that uses it
# (bench/compile_report_triton.py; tests/test_triton_backend.py::test_kernels_compile_for_hopper).

SMEM_PER_BLOCK = 227 * 1024


def _cfg(warps, stages, **blocks):
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


def _fits(rows_a, rows_b, bk, stages, elem, reserve=0):
    return (rows_a + rows_b) * bk * elem * stages + reserve <= SMEM_PER_BLOCK


if INTERPRET:
    _FULL_ROW_CONFIGS = [_cfg(4, 1, BLOCK_M=64, BLOCK_K=64)]
    _TILED_CONFIGS = [_cfg(4, 1, BLOCK_M=64, BLOCK_N=32, BLOCK_K=64)]
    _GRAD_CONFIGS = [_cfg(4, 1, BLOCK_N=32, BLOCK_K=64, BLOCK_M=32)]
    _FULL_ROW_UNTUNED = _FULL_ROW_CONFIGS
    _TILED_UNTUNED = _TILED_CONFIGS
    _GRAD_UNTUNED = _GRAD_CONFIGS
else:
    # full row: BLOCK_N = next_power_of_2(N) <= 512 is set by the launcher. Exact fp32 (FMA units,
    # operands in registers too) takes the 16-row tile only, tensor cores the 64-row ones.
    _FULL_ROW_CONFIGS = [
        _cfg(w, s, BLOCK_M=bm, BLOCK_K=bk)
        for bm, bk, w, s in [(64, 32, 8, 3), (64, 64, 8, 3), (16, 32, 8, 2)]
    ]
    _FULL_ROW_UNTUNED = [_cfg(8, 3, BLOCK_M=64, BLOCK_K=32), _cfg(8, 2, BLOCK_M=16, BLOCK_K=32)]
    # tiled: the usual Hopper GEMM tiles (triton's matmul tutorial, tf32 with BK = 32); exact fp32
    # takes the 64 x 64 tile only
    _TILED_CONFIGS = [
        _cfg(w, s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        for bm, bn, bk, w, s in [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 32, 8, 4),
                                 (64, 128, 32, 4, 4), (64, 64, 32, 4, 3)]
    ]
    _TILED_UNTUNED = [_cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32),
                      _cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)]
    # weight gradient: output tile [BLOCK_N, BLOCK_K], reduction over BLOCK_M rows; dz and the
    # bias sums live in registers besides the accumulator, and the SGD epilogue holds W and the
    # momentum buffer too (a 128 x 256 tile spills there). Exact fp32: the 64 x 64 tile only.
    _GRAD_CONFIGS = [
        _cfg(w, s, BLOCK_N=bn, BLOCK_K=bk, BLOCK_M=bm)
        for bn, bk, bm, w, s in [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 3),
                                 (64, 64, 32, 4, 3)]
    ]
    _GRAD_UNTUNED = [_cfg(8, 4, BLOCK_N=128, BLOCK_K=128, BLOCK_M=32),
                     _cfg(4, 3, BLOCK_N=64, BLOCK_K=64, BLOCK_M=32)]


def _fma(kwargs):
    """Exact fp32 dots run on FMA units, operands in registers: only small tiles fit (the
    interpreter has one config for everything)."""
    return kwargs["DOT_PRECISION"] == "ieee" and not INTERPRET


def _prune_full_row(configs, named_args, **kwargs):
    elem, bn = named_args["xp_ptr"].element_size(), kwargs["BLOCK_N"]
    kept = [c for c in configs
            if _fits(c.kwargs["BLOCK_M"], bn, c.kwargs["BLOCK_K"], c.num_stages, elem)
            and (c.kwargs["BLOCK_M"] <= 16) == _fma(kwargs)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.num_stages)]


def _prune_tiled(configs, named_args, **kwargs):
    elem = named_args["xp_ptr"].element_size()
    kept = [c for c in configs
            if _fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, elem)
            and (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64 or not _fma(kwargs))]
    return kept or configs[-1:]


def _prune_grad(configs, named_args, **kwargs):
    elem = named_args["xp_ptr"].element_size()
    kept = [c for c in configs
            if _fits(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["BLOCK_M"], c.num_stages, elem)
            and (c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 64 * 64 or not _fma(kwargs))]
    return kept or configs[-1:]


# One lock for every launch. Triton's Autotuner keeps the call it is tuning on itself (its nargs
# and the copies it restores between trials), so two threads tuning one kernel at once would read
# each other's arguments; the interpreter patches triton.language globally while a kernel runs.
_LAUNCH_LOCK = threading.RLock()
AUTOTUNE = True


class _TunedKernel:
    """A kernel launched with the best of ``configs`` (autotuning) or the first fitting one of
    ``untuned``. Tuned per power-of-two bucket of M besides ``key`` (a smaller last batch reuses
    its bucket's choice) and the tensors' dtypes (added by triton).

    Between tuning trials, the ``reset_to_zero`` arguments are zeroed and the ``restore_value``
    ones restored; an argument passed as None is skipped (the hooks are ours, not the Autotuner's
    defaults, whose None handling differs between triton versions)."""

    def __init__(self, kernel, configs, untuned, key, prune, reset_to_zero=(), restore_value=()):
        self.kernel, self.configs, self.untuned, self.key, self.prune = kernel, configs, untuned, key, prune
        self.reset_to_zero, self.restore_value = list(reset_to_zero), list(restore_value)
        self.tuners = {}  # M bucket -> triton Autotuner
        self.do_bench = None  # a benchmark function for the Autotuner (tests: the interpreter has none)
        self._saved = {}

    def _pre_hook(self, kwargs, reset_only=False):
        for name in self.reset_to_zero:
            if kwargs[name] is not None:
                kwargs[name].zero_()
        if not reset_only:
            self._saved = {name: kwargs[name].clone() for name in self.restore_value
                           if kwargs[name] is not None}

    def _post_hook(self, kwargs, exception=None):
        for name, saved in self._saved.items():
            kwargs[name].copy_(saved)
        self._saved = {}

    def __call__(self, grid, m, *args, **kwargs):
        with _LAUNCH_LOCK:
            if not AUTOTUNE:
                named = dict(zip(self.kernel.arg_names, args))
                config = self.prune(self.untuned, named, **kwargs)[0]
                return self.kernel[grid](*args, **kwargs, **config.all_kwargs())
            bucket = triton.next_power_of_2(m)
            tuner = self.tuners.get(bucket)
            if tuner is None:
                extra = {"do_bench": self.do_bench} if self.do_bench is not None else {}
                tuner = self.tuners[bucket] = triton.autotune(
                    configs=self.configs, key=self.key, prune_configs_by={"early_config_prune": self.prune},
                    pre_hook=self._pre_hook, post_hook=self._post_hook, **extra)(self.kernel)
            return tuner[grid](*args, **kwargs)


_forward_full_row = _TunedKernel(_forward_kernel, _FULL_ROW_CONFIGS, _FULL_ROW_UNTUNED,
                                 key=["N", "K", "HAS_BIAS", "DOT_PRECISION"], prune=_prune_full_row,
                                 reset_to_zero=["stats_ptr"])
_forward_tiled = _TunedKernel(_forward_kernel, _TILED_CONFIGS, _TILED_UNTUNED,
                              key=["N", "K", "HAS_BIAS", "DOT_PRECISION"], prune=_prune_tiled,
                              reset_to_zero=["stats_ptr"])
# Update mode changes W, b and the momentum buffers in place: the tuner restores them between
# trials. Absent tensors are passed as None, so it copies only what the kernel really writes.
_grad = _TunedKernel(_grad_kernel, _GRAD_CONFIGS, _GRAD_UNTUNED,
                     key=["N", "K", "HAS_BIAS", "UPDATE", "HAS_MOMENTUM", "DOT_PRECISION"], prune=_prune_grad,
                     restore_value=["w_ptr", "b_ptr", "bufw_ptr", "bufb_ptr"])
_TUNED_KERNELS = (_forward_full_row, _forward_tiled, _grad)


def set_autotune(enabled: bool) -> None:
    """Autotune over the Hopper configs (default) or run one fixed config per kernel (no tuning
    pass on a new shape: quicker test runs). The environment variable FF_KERNELS_AUTOTUNE=0 sets
    the latter at import."""
    global AUTOTUNE
    with _LAUNCH_LOCK:
        AUTOTUNE = bool(enabled)
        for tuned in _TUNED_KERNELS:
            tuned.tuners.clear()


set_autotune(os.environ.get("FF_KERNELS_AUTOTUNE", "1") != "0")


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def _dot_precision(dtype: torch.dtype) -> str:
    """tf32 tensor cores for fp32 only when torch allows them for matmuls (as the reference's
    torch.mm does); fp16/bf16 operands are exact products either way. (The interpreter computes
    every dot exactly.)"""
    if dtype == torch.float32 and not fp32_matmul_uses_tf32():
        return "ieee"
    return "tf32"


_SM_COUNT = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter (tests choose the split themselves)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def grad_split(m: int, n: int, k: int, device: torch.device) -> int:
    """How many programs share one [N, K] tile of the weight gradient (split over M).

    Enough programs for about two waves on the GPU, counting the output tiles at a nominal
    128 x 128 (the autotuned tile is similar), each split keeping at least 8 row tiles of 64."""
    tiles = triton.cdiv(n, 128) * triton.cdiv(k, 128)
    split = min(MAX_SPLIT, max(1, (2 * _sm_count(device)) // tiles), max(1, triton.cdiv(m, 64) // 8))
    return max(1, split)


def _row_math(config: FFConfig, m: int, m_pos: int, n: int) -> dict:
    """The runtime scalars of _finish_rows / _row_norm for this config and shape."""
    goodness_factor = 2.0 if config.goodness == "sum" else 2.0 / n
    if config.loss == "symba":
        loss_weight, coef_scale = 1.0 / m_pos, goodness_factor * config.alpha / m_pos
    else:
        loss_weight, coef_scale = 1.0 / m, goodness_factor / m
    return dict(theta=config.threshold(n), alpha=config.alpha, eps=config.eps, loss_weight=loss_weight,
                goodness_scale=1.0 if config.goodness == "sum" else 1.0 / n, coef_scale=coef_scale,
                norm_scale=1.0 if config.norm == "l2" else 1.0 / n, no_norm=config.norm == "none")


# ------------------------------------------------------------------------------------------------
# Scratch: one float32 buffer per (device, stream), reused call after call
# ------------------------------------------------------------------------------------------------
# Every step carves its scratch (never returned) from this buffer, which grows to the largest step
# seen. Keyed by the stream: kernels queued on one stream run in order, so the next step's memset
# cannot overtake the last step's kernels; a step on another stream gets its own buffer (torch's
# caching allocator also keeps a freed buffer to its stream). A step being captured into a CUDA
# graph takes fresh scratch from the graph's private pool instead: the graph owns it, and replays
# never share it with eager steps. The whole step runs under _LAUNCH_LOCK, so two threads on one
# stream cannot interleave their launches over the same scratch. release_scratch() frees it all.
_SCRATCH = {}

# stats section (float32, zeroed per step; sections 16-byte aligned so pointer alignment never
# varies): [z = -inf seen (0/1), loss, operand bound, -, q_0 .. q_{M-1}, (pad to 4), peer sums [N]]
_STATS_HEAD = 4


def _align(count: int) -> int:
    return triton.cdiv(count, 4) * 4  # float32s: 16 bytes


def _scratch(device: torch.device, sizes) -> list:
    """float32 views of the given sizes (each 16-byte aligned) from the cached scratch of this
    device and stream; growing it allocates (through new_output), reusing it does not."""
    total = max(1, sum(_align(size) for size in sizes))
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        buf = new_output((total,), torch.float32, device)
    else:
        key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None)
        buf = _SCRATCH.get(key)
        if buf is None or buf.numel() < total:
            _SCRATCH.pop(key, None)  # returned to the allocator (stream-ordered) before growing
            buf = _SCRATCH[key] = new_output((total,), torch.float32, device)
        elif _backends.POISON_OUTPUTS:
            buf.fill_(float("nan"))  # tests: stale scratch must not hide an element a kernel missed
    views, offset = [], 0
    for size in sizes:
        views.append(buf[offset:offset + size])
        offset += _align(size)
    return views


def release_scratch() -> None:
    """Free the cached scratch of every device and stream (the next step allocates it again)."""
    with _LAUNCH_LOCK:
        _SCRATCH.clear()


def _stats_size(m: int, n: int) -> int:
    return _STATS_HEAD + _align(m) + n


def _forward(xp, xn, weight, bias, config: FFConfig, train: bool, peer: bool, stats, coef):
    """Kernels 1-2 into ``stats`` (zeroed here) and ``coef`` [M] (train; else unused).
    Returns y [M, N] (input dtype), g [M] f32 and the peer sums (a view of stats)."""
    m_pos, k = xp.shape
    m_neg = xn.shape[0] if xn is not None else 0
    m, n = m_pos + m_neg, weight.shape[0]
    device, dtype = weight.device, weight.dtype
    if xn is None:
        xn = xp
    symba = train and config.loss == "symba"
    math = _row_math(config, m, m_pos, n)

    y = new_output((m, n), dtype, device)
    g = new_output((m,), torch.float32, device)
    if not train:
        coef = g  # never written
    stats.zero_()  # one memset in stream order
    q = stats[_STATS_HEAD:_STATS_HEAD + m]
    peer_sums = stats[_STATS_HEAD + _align(m):]

    full_row = n <= FULL_ROW_MAX_N
    finish_in_forward = full_row and not symba
    args = (xp, xn, weight, bias, y, stats, q, peer_sums, g, coef, m_pos, m_neg, n, k,
            xp.stride(0), xp.stride(1), xn.stride(0), xn.stride(1), weight.stride(0), weight.stride(1),
            bias.stride(0) if bias is not None else 0)
    common = dict(**math, finish_rows=finish_in_forward, train=train, peer=peer, HAS_BIAS=bias is not None,
                  FULL_ROW=full_row, DOT_PRECISION=_dot_precision(dtype), GROUP_M=8)

    def grid(meta):
        bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
        return ((triton.cdiv(m_pos, bm) + triton.cdiv(m_neg, bm)) * triton.cdiv(n, bn),)

    if full_row:
        _forward_full_row(grid, m, *args, BLOCK_N=max(16, triton.next_power_of_2(n)), **common)
    else:
        _forward_tiled(grid, m, *args, **common)

    if not finish_in_forward:
        rescale = not full_row and config.norm != "none"
        block_m, block_n = (64, 64) if INTERPRET else (16, 256)
        grid_rows = (triton.cdiv(m, block_m), triton.cdiv(n, block_n) if rescale else 1)
        with _LAUNCH_LOCK:
            _rows_kernel[grid_rows](y, stats, q, g, coef, m, m_pos, n, **math, rescale=rescale, symba=symba,
                                    train=train, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return y, g, peer_sums


def _weight_grad(xp, xn, weight, bias, update, y, coef, stats, peer_sums, part_w, part_b, splits: int,
                 peer_on: bool, skip_nonfinite: bool):
    """Kernels 4-5: gradients (weight dtype), or the fused SGD step (None, None), and the step's
    loss and non-finite flag (0-dim outputs). ``part_w``/``part_b``: the split partials (scratch;
    unused with one split)."""
    m_pos, k = xp.shape
    m_neg, n = xn.shape[0], weight.shape[0]
    m = m_pos + m_neg
    device, dtype = weight.device, weight.dtype
    has_bias = bias is not None

    loss = new_output((), torch.float32, device)
    nonfinite = new_output((), torch.bool, device)
    grad_w = grad_b = None
    w = b = bufw = bufb = None  # what update mode writes (None: absent or not written)
    if update is None:
        grad_w = new_output((n, k), dtype, device)
        grad_b = new_output((n,), dtype, device) if has_bias else None
        coefficients = (0.0, 0.0, 0.0, 0.0, 0.0)
        has_momentum = False
    else:
        w, b, bufw, bufb = weight, bias, update.buf_weight, update.buf_bias
        coefficients = tuple(float(c) for c in update.coefficients())
        has_momentum = bufw is not None

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]), splits)

    _grad(grid, m, y, coef, stats, peer_sums, xp, xn, w, b, bufw, bufb, grad_w, grad_b, part_w, part_b,
          loss, nonfinite, m_pos, m_neg, n, k, xp.stride(0), xp.stride(1), xn.stride(0), xn.stride(1),
          splits, peer_on, skip_nonfinite, *coefficients,
          HAS_BIAS=has_bias, UPDATE=update is not None, HAS_MOMENTUM=has_momentum,
          DOT_PRECISION=_dot_precision(dtype))

    if splits > 1:
        for part, grad, param, buf, numel in ((part_w, grad_w, w, bufw, n * k), (part_b, grad_b, b, bufb, n)):
            if part is stats:  # no bias
                continue
            _reduce_and_apply(part, numel, splits, grad, param, buf, nonfinite, skip_nonfinite, coefficients,
                              update is not None, has_momentum)
    return grad_w, grad_b, loss, nonfinite


def _reduce_and_apply(part, numel, splits, grad, param, buf, flag, skip, coefficients, update, momentum):
    block = 1024
    with _LAUNCH_LOCK:
        _split_reduce_kernel[(triton.cdiv(numel, block),)](
            part, numel, splits, grad, param, buf, flag, skip, *coefficients,
            UPDATE=update, HAS_MOMENTUM=momentum, BLOCK=block, num_warps=4)


# ------------------------------------------------------------------------------------------------
# Backend entry points (same contract as reference.py)
# ------------------------------------------------------------------------------------------------

def layer_step(x_pos, x_neg, weight, bias, config: FFConfig, update, peer=None,
               skip_nonfinite: bool = False) -> FFStepOutput:
    m_pos, k = x_pos.shape
    m, n = m_pos + x_neg.shape[0], weight.shape[0]
    device = weight.device
    splits = grad_split(m, n, k, device)
    with _LAUNCH_LOCK:  # one step's launches at a time over this stream's scratch
        parts = (splits * n * k, splits * n if bias is not None else 0) if splits > 1 else (0, 0)
        stats, coef, part_w, part_b = _scratch(device, (_stats_size(m, n), m) + parts)
        if splits == 1:
            part_w = part_b = stats  # never written (the kernel tests the split count at run time)
        elif bias is None:
            part_b = stats
        y, g, peer_sums = _forward(x_pos, x_neg, weight, bias, config, True, peer is not None, stats, coef)
        if peer is not None:
            with _LAUNCH_LOCK:
                _peer_kernel[(1,)](peer.mean, peer_sums, stats, n, float(peer.rho), 1.0 / m_pos,
                                   float(peer.kappa), skip_nonfinite, BLOCK=1024, num_warps=4)
        grad_w, grad_b, loss, nonfinite = _weight_grad(
            x_pos, x_neg, weight, bias, update, y, coef, stats, peer_sums, part_w, part_b, splits,
            peer is not None, skip_nonfinite)
    return FFStepOutput(y=y, g=g, loss=loss, n_pos=m_pos, grad_weight=grad_w, grad_bias=grad_b,
                        nonfinite=nonfinite)


def layer_forward(x, weight, bias, config: FFConfig):
    m, n = x.shape[0], weight.shape[0]
    with _LAUNCH_LOCK:
        (stats,) = _scratch(weight.device, (_stats_size(m, n),))
        y, g, _ = _forward(x, None, weight, bias, config, False, False, stats, None)
    return y, g


def sgd_update(param, grad, buf, update, skip=None) -> None:
    """SGDUpdate.coefficients()'s rule applied in place to ``param`` (and ``buf``) with a given
    gradient (param's dtype, contiguous): the step's own reduce-and-update kernel with one
    "partial". ``skip``: None or a 0-dim bool tensor on the device, True = change nothing (read
    by the kernel: no host sync)."""
    numel = param.numel()
    if numel == 0:
        return
    coefficients = tuple(float(c) for c in update.coefficients())
    flag = skip if skip is not None else param  # never read without skip
    _reduce_and_apply(grad, numel, 1, None, param, buf, flag, skip is not None, coefficients, True,
                      buf is not None)
