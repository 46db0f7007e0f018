"""The "triton" backend: one Forward-Forward layer step in as few passes over memory as the math allows.

Same contract as ``reference.py`` (the executable spec, DESIGN.md section 1): ``layer_step`` and
``layer_forward`` take validated inputs and return exactly what the reference returns, in the same
dtypes (y in the input dtype, goodness and loss in float32, gradients in the weight dtype).

Kernels, in launch order (M = B+ + B- rows, N outputs, K inputs):

1. ``_forward_kernel``: z = x W^T + b as a tiled GEMM (fp32 accumulation) reading x_pos and x_neg
   through two pointers (a row tile never straddles the two; [x_pos; x_neg] never exists in
   memory), with ReLU and the row sum of squares q_i = sum_j h_ij^2 in the epilogue.
   * "full row" (N <= FULL_ROW_MAX_N: one program holds a whole row of N): the epilogue also writes
     the normalised y, and for the softplus loss (or inference) finishes goodness, loss and the
     per-row coefficient too. The step is then this kernel plus ``_grad_kernel``.
   * "tiled" (wider N): the program writes h (un-normalised) into y's storage and adds its partial
     q_i with atomics; ``_rows_kernel`` finishes the rows.
2. ``_rows_kernel`` (only for SymBa or tiled N): the per-row finish that needs a complete q_i or the
   partner row of a SymBa pair: goodness, loss, coefficient, and (tiled N) y = h / r_i in place.
3. ``_grad_kernel``: grad_W = sum_i c_i h_i^T x_i and grad_b = sum_i c_i h_i as ONE GEMM reduced
   over the M rows, [grad_W | grad_b] = c_max Y^T [diag(coef) X | coef], with h recovered on the fly
   from y (h_ij = y_ij r_i, folded into coef_i = c_i r_i / c_max), so no [M, N] activation tensor
   exists besides y, and the bias is one extra column of the GEMM. The reduction over M is split
   across SPLIT programs when the [N, K] tiles alone cannot fill the GPU; with SPLIT == 1 the
   epilogue writes the gradient or applies the fused SGD update directly.
4. ``_split_reduce_kernel`` (only SPLIT > 1): sums the SPLIT fp32 partials and writes the gradient
   or applies the SGD update (one launch for W, one for b).

Passes over memory: x twice (the two GEMMs: the floor), W once (twice with an update), y written
once and read once; tiled N adds one read + write of y (the in-place normalisation; skipped for
norm="none"). Scratch beyond the outputs: float32 [M + 1] (q_i and the loss), float32 [M] (the
coefficients), and with SPLIT > 1 float32 [SPLIT, N, K] + [SPLIT, N] partials (SPLIT <= 16):
O(M + N*K). No host synchronisation: the loss is reduced with device atomics. (The first call for a
new shape autotunes, which synchronises; the steady state does not.)

Precision: everything accumulates in fp32. fp32 inputs use tf32 tensor cores when
``torch.backends.cuda.matmul.allow_tf32`` is set, exact fp32 (``input_precision="ieee"``) otherwise.
For fp16/bf16 the weight-gradient GEMM reads h through y stored in that dtype and coef_i x_ik
rounded to it: two roundings of the input dtype (~3 significant digits), inside the 1e-2 / 2e-2
tolerances. coef is c_i r_i divided by c_max, the largest possible |c_i| (known on the host from
the loss normaliser, ~1/M), so |coef_i| <= r_i and small coefficients do not underflow fp16.
Limits for fp16 only: r_i |x_ik| must stay below 65504, and on the tiled path h itself (stored
before the normalisation) too.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .backends import FFStepOutput, new_output
from .config import FFConfig

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Widest N finished in one program (the full-row path). 512 holds N = 500 (the MNIST recipe) in one
# 64 x 512 fp32 accumulator (128 registers a thread at 8 warps); wider layers take the tiled path.
# The interpreter uses a small width so that tests reach both paths on small shapes.
FULL_ROW_MAX_N = 64 if INTERPRET else 512
MAX_SPLIT = 16  # most programs that share one [N, K] tile of the weight gradient

_NORM_CODE = {"l2": 0, "rms": 1, "none": 2}


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
def _goodness(q, N, GOODNESS_MEAN: tl.constexpr):
    # g_i = q_i ("sum") or q_i / N ("mean")
    if GOODNESS_MEAN:
        return q / N
    else:
        return q


@triton.jit
def _row_norm(q, N, eps, NORM: tl.constexpr):
    # r_i with y_i = h_i / r_i: sqrt(q_i) + eps (l2), sqrt(q_i / N) + eps (rms), 1 (none).
    if NORM == 0:
        return tl.sqrt(q) + eps
    elif NORM == 1:
        return tl.sqrt(q / N) + eps
    else:
        return tl.zeros_like(q) + 1.0


@triton.jit
def _finish_rows(q, q_partner, rows, row_ok, g_ptr, coef_ptr, loss_ptr, M_POS, N, theta, alpha, eps,
                 loss_weight, TRAIN: tl.constexpr, GOODNESS_MEAN: tl.constexpr, NORM: tl.constexpr,
                 SYMBA: tl.constexpr):
    """Goodness, loss and gradient coefficient of rows ``rows`` (global indices) from their q_i.

    s_i = +1 (positive row, i < B+) or -1. Both losses are L = w * sum softplus(t_i) with
      softplus: t_i = -s_i (g_i - theta),          w = 1/M, every row counted;
      SymBa:    t_i = -alpha s_i (g_i - g_partner) (= -alpha (g+ - g-) for both rows of a pair),
                w = 1/B, each pair counted once (on its positive row).
    dL/dg_i = -s_i sigmoid(t_i) * w * (alpha for SymBa), and dL/dz_ij = c_i h_ij with
    c_i = dL/dg_i * (2 or 2/N). The weight gradient needs c_i h_ij = c_i r_i y_ij, so this stores
      coef_i = -s_i sigmoid(t_i) r_i  =  c_i r_i / c_max,
    c_max = (2 or 2/N) * (1/M or alpha/B) the largest possible |c_i|; the gradient kernels multiply
    by c_max (``grad_scale``) at the end; |coef_i| <= r_i whatever M is (no fp16 underflow).
    """
    g = _goodness(q, N, GOODNESS_MEAN)
    tl.store(g_ptr + rows, g, mask=row_ok)
    if TRAIN:
        is_pos = rows < M_POS
        sign = tl.where(is_pos, 1.0, -1.0)
        if SYMBA:
            t = -alpha * sign * (g - _goodness(q_partner, N, GOODNESS_MEAN))
            counted = row_ok & is_pos
        else:
            t = -sign * (g - theta)
            counted = row_ok
        coef = -sign * _sigmoid(t) * _row_norm(q, N, eps, NORM)
        tl.store(coef_ptr + rows, coef, mask=row_ok)
        loss = tl.sum(tl.where(counted, _softplus(t), 0.0), axis=0) * loss_weight
        tl.atomic_add(loss_ptr, loss)


@triton.jit
def _apply_grad(grad, offs, mask, grad_ptr, param_ptr, buf_ptr, lr, momentum, weight_decay,
                UPDATE: tl.constexpr, HAS_MOMENTUM: tl.constexpr):
    # Gradient mode: store grad (cast to the weight dtype). Update mode: torch.optim.SGD's step
    # (dampening 0, no Nesterov) in fp32: d = grad + wd p; buf = mu buf + d; p -= lr * buf.
    if UPDATE:
        p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = grad + weight_decay * p
        if HAS_MOMENTUM:
            d = momentum * tl.load(buf_ptr + offs, mask=mask, other=0.0).to(tl.float32) + d
            tl.store(buf_ptr + offs, d.to(buf_ptr.dtype.element_ty), mask=mask)
        tl.store(param_ptr + offs, (p - lr * d).to(param_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# 1. Forward GEMM with the goodness epilogue
# ------------------------------------------------------------------------------------------------

@triton.jit
def _forward_kernel(
    xp_ptr, xn_ptr, w_ptr, b_ptr, y_ptr, q_ptr, g_ptr, coef_ptr, loss_ptr,
    M_POS, M_NEG, N, K, M_BUCKET,
    stride_xp_m, stride_xp_k, stride_xn_m, stride_xn_k, stride_w_n, stride_w_k, stride_b,
    theta, alpha, eps, loss_weight,
    HAS_BIAS: tl.constexpr, FULL_ROW: tl.constexpr, FINISH_ROWS: tl.constexpr, TRAIN: tl.constexpr,
    GOODNESS_MEAN: tl.constexpr, NORM: tl.constexpr, SYMBA: tl.constexpr,
    DOT_PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of h = relu(x W^T + b), x = [x_pos; x_neg], and its epilogue.

    Row tiles 0 .. tiles_p-1 cover x_pos, the rest x_neg; global row = B+ + local row for negatives.
    q_i = sum_j h_ij^2 (padding columns are masked to 0). FULL_ROW (BLOCK_N >= N): this tile holds
    all of q_i, so y_i = h_i / r_i is final, and with FINISH_ROWS the row's goodness, loss and
    coefficient too (_finish_rows); otherwise q_i goes to q_ptr for _rows_kernel. Tiled N: y
    receives h itself and q_i is summed over the column tiles with atomics into q_ptr (zeroed).
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
    local0 = tl.where(is_pos, pid_m, pid_m - tiles_p) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    # rows and columns past the end are wrapped into range (the epilogue masks them): only K is masked
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = (x_ptr + ((local0 + offs_m) % n_rows).to(tl.int64)[:, None] * stride_xm
              + ks[None, :] * stride_xk)
    w_ptrs = w_ptr + (cols % N).to(tl.int64)[None, :] * stride_w_n + ks[:, None] * stride_w_k
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=ks[None, :] < K - k0, other=0.0)
        w = tl.load(w_ptrs, mask=ks[:, None] < K - k0, other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_w_k

    if HAS_BIAS:
        acc += tl.load(b_ptr + cols * stride_b, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    h = tl.where(col_ok[None, :], tl.maximum(acc, 0.0), 0.0)
    q = tl.sum(h * h, axis=1)

    row_ok = local0 + offs_m < n_rows
    rows = row_base + local0 + offs_m  # global row index in [0, M)
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    y_mask = row_ok[:, None] & col_ok[None, :]
    if FULL_ROW:
        if NORM != 2:
            h = h * (1.0 / _row_norm(q, N, eps, NORM))[:, None]
        tl.store(y_ptrs, h.to(y_ptr.dtype.element_ty), mask=y_mask)
        if FINISH_ROWS:
            _finish_rows(q, q, rows, row_ok, g_ptr, coef_ptr, loss_ptr, M_POS, N, theta, alpha, eps,
                         loss_weight, TRAIN, GOODNESS_MEAN, NORM, SYMBA)
        else:
            tl.store(q_ptr + rows, q, mask=row_ok)
    else:
        tl.store(y_ptrs, h.to(y_ptr.dtype.element_ty), mask=y_mask)
        tl.atomic_add(q_ptr + rows, q, mask=row_ok)


# ------------------------------------------------------------------------------------------------
# 2. Row finish (SymBa pairs, tiled N)
# ------------------------------------------------------------------------------------------------

@triton.jit
def _rows_kernel(
    y_ptr, q_ptr, g_ptr, coef_ptr, loss_ptr, M, M_POS, N, theta, alpha, eps, loss_weight,
    RESCALE: tl.constexpr, TRAIN: tl.constexpr, GOODNESS_MEAN: tl.constexpr, NORM: tl.constexpr,
    SYMBA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Finish rows from the complete q_i: with RESCALE, y_ij = h_ij / r_i in place on tile
    (pid_m, pid_n); the programs of column 0 also run _finish_rows (a SymBa row reads the q of
    its partner, row i +- B)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    q = tl.load(q_ptr + rows, mask=row_ok, other=0.0)
    if RESCALE:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ptrs = y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
        mask = row_ok[:, None] & (cols < N)[None, :]
        h = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        y = h * (1.0 / _row_norm(q, N, eps, NORM))[:, None]
        tl.store(ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)
    if pid_n == 0:
        if SYMBA:
            partner = tl.where(rows < M_POS, rows + M_POS, rows - M_POS)
            q_partner = tl.load(q_ptr + partner, mask=row_ok, other=0.0)
        else:
            q_partner = q
        _finish_rows(q, q_partner, rows, row_ok, g_ptr, coef_ptr, loss_ptr, M_POS, N, theta, alpha, eps,
                     loss_weight, TRAIN, GOODNESS_MEAN, NORM, SYMBA)


# ------------------------------------------------------------------------------------------------
# 3. Weight and bias gradient (one GEMM over the rows) with the SGD epilogue
# ------------------------------------------------------------------------------------------------

@triton.jit
def _grad_kernel(
    y_ptr, coef_ptr, xp_ptr, xn_ptr,
    w_ptr, b_ptr, bufw_ptr, bufb_ptr, gw_ptr, gb_ptr, pw_ptr, pb_ptr,
    M_POS, M_NEG, N, K, M_BUCKET,
    stride_xp_m, stride_xp_k, stride_xn_m, stride_xn_k,
    grad_scale, lr, momentum, weight_decay,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, UPDATE: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Tile [BLOCK_N, BLOCK_K] of [grad_W | grad_b] over this program's share of the row tiles
    (program_id(1) of SPLIT; the positives' row tiles come first, then the negatives').

    grad_W[n, k] = sum_i c_i h_in x_ik = c_max * sum_i y_in (coef_i x_ik)   (h_in = r_i y_in and
    coef_i = c_i r_i / c_max, see _finish_rows), i.e. acc = Y^T X~ with X~ = diag(coef) X: y goes
    to the tensor cores as stored, and the per-row factor is applied to the x tile in registers
    (scaling the y tile instead serialises Hopper's wgmma pipeline, per ptxas). With a bias, X~
    gets one more column, number K, equal to coef_i (x_iK = 1), so that
    acc[:, K] = sum_i coef_i y_in = grad_b / c_max comes out of the same GEMM: the grid covers
    K + 1 columns and the program holding column K writes the bias.
    |coef_i x_ik| <= r_i |x_ik| (sigmoid <= 1) must fit the input dtype (a limit for fp16 only).

    SPLIT == 1: c_max * acc is final: stored in the weight dtype or applied as an SGD step (each
    element belongs to exactly one program, so the in-place update is race-free).
    SPLIT > 1: the fp32 partial goes to pw/pb[split] for _split_reduce_kernel.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_k = tl.cdiv(K + HAS_BIAS, BLOCK_K)
    pid_n = pid // num_k
    pid_k = pid % num_k
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)

    tiles_p = tl.cdiv(M_POS, BLOCK_M)
    tiles = tiles_p + tl.cdiv(M_NEG, BLOCK_M)
    per_split = tl.cdiv(tiles, SPLIT)
    t0 = split * per_split
    t1 = tl.minimum(t0 + per_split, tiles)

    # The rows are the reduction: those past the end are masked to 0. n and k past the end are
    # wrapped into range (their outputs are masked at the store; k == K is the bias column).
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    offs = tl.arange(0, BLOCK_M)
    n_in, k_in = n % N, k % K
    for t in range(t0, t1):
        is_pos = t < tiles_p
        x_ptr = tl.where(is_pos, xp_ptr, xn_ptr)
        stride_xm = tl.where(is_pos, stride_xp_m, stride_xn_m)
        stride_xk = tl.where(is_pos, stride_xp_k, stride_xn_k)
        local = tl.where(is_pos, t, t - tiles_p) * BLOCK_M + offs
        ok = local < tl.where(is_pos, M_POS, M_NEG)
        rows = (tl.where(is_pos, 0, M_POS) + local).to(tl.int64)
        coef = tl.load(coef_ptr + rows, mask=ok, other=0.0)
        y = tl.load(y_ptr + rows[:, None] * N + n_in[None, :], mask=ok[:, None], other=0.0)
        x = tl.load(x_ptr + local.to(tl.int64)[:, None] * stride_xm + k_in[None, :] * stride_xk,
                    mask=ok[:, None], other=0.0)
        x = x.to(tl.float32)
        if HAS_BIAS:
            x = tl.where((k == K)[None, :], 1.0, x)
        x = (x * coef[:, None]).to(y.dtype)
        acc = tl.dot(tl.trans(y), x, acc, input_precision=DOT_PRECISION)

    n_ok = n < N
    if SPLIT == 1:
        # the final values, in two column halves one after the other: the SGD step on a whole tile
        # (acc, W, buf and their addresses live at once) would spill registers on Hopper
        lo, hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_N, 2, BLOCK_K // 2)), (0, 2, 1)))
        half = pid_k * BLOCK_K + tl.arange(0, BLOCK_K // 2)
        _apply_grad(lo * grad_scale, n.to(tl.int64)[:, None] * K + half[None, :],
                    n_ok[:, None] & (half < K)[None, :], gw_ptr, w_ptr, bufw_ptr, lr, momentum,
                    weight_decay, UPDATE, HAS_MOMENTUM)
        half += BLOCK_K // 2
        _apply_grad(hi * grad_scale, n.to(tl.int64)[:, None] * K + half[None, :],
                    n_ok[:, None] & (half < K)[None, :], gw_ptr, w_ptr, bufw_ptr, lr, momentum,
                    weight_decay, UPDATE, HAS_MOMENTUM)
    else:
        w_offs = n.to(tl.int64)[:, None] * K + k[None, :]
        tl.store(pw_ptr + split.to(tl.int64) * N * K + w_offs, acc, mask=n_ok[:, None] & (k < K)[None, :])
    if HAS_BIAS:
        if pid_k == K // BLOCK_K:  # this tile holds column K
            b_acc = tl.sum(tl.where((k == K)[None, :], acc, 0.0), axis=1)
            if SPLIT == 1:
                _apply_grad(b_acc * grad_scale, n, n_ok, gb_ptr, b_ptr, bufb_ptr, lr, momentum,
                            weight_decay, UPDATE, HAS_MOMENTUM)
            else:
                tl.store(pb_ptr + split * N + n, b_acc, mask=n_ok)


@triton.jit
def _split_reduce_kernel(part_ptr, numel, grad_ptr, param_ptr, buf_ptr, grad_scale, lr, momentum,
                         weight_decay, SPLIT: tl.constexpr, UPDATE: tl.constexpr,
                         HAS_MOMENTUM: tl.constexpr, BLOCK: tl.constexpr):
    # grad = c_max * sum_s partial[s] (fp32), then the same store / SGD step as _grad_kernel.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(part_ptr + s * numel + offs, mask=mask, other=0.0)
    _apply_grad(acc * grad_scale, offs, mask, grad_ptr, param_ptr, buf_ptr, lr, momentum,
                weight_decay, UPDATE, HAS_MOMENTUM)


# ------------------------------------------------------------------------------------------------
# Autotuning (Hopper) / single configs (interpreter)
# ------------------------------------------------------------------------------------------------
# Hopper: 228 KB shared memory per SM (227 KB per block), 64K 32-bit registers. A [BM, BN] fp32
# accumulator costs BM*BN/(32*warps) registers a thread; keep that <= 128. The operand ring costs
# (rows_a + rows_b) * BK * elem_size * stages bytes of shared memory; keep it <= 200 KB so the
# epilogue's layout conversions still fit. Configs that fail anyway (out of resources) are skipped
# by the autotuner. Keys: N, K, a power-of-two bucket of M (so a smaller last batch does not
# re-tune), and the tensors' dtypes (added by triton).

_SMEM_BUDGET = 200 * 1024


def _fits(bm, bn, bk, warps, stages, elem):
    return (bm * bn <= 128 * 32 * warps) and ((bm + bn) * bk * elem * stages <= _SMEM_BUDGET)


def _cfg(warps, stages, **blocks):
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


if INTERPRET:
    _FULL_ROW_CONFIGS = [_cfg(4, 1, BLOCK_M=64, BLOCK_K=64)]
    _TILED_CONFIGS = [_cfg(4, 1, BLOCK_M=64, BLOCK_N=32, BLOCK_K=64)]
    _GRAD_CONFIGS = [_cfg(4, 1, BLOCK_N=32, BLOCK_K=64, BLOCK_M=32)]
else:
    # full row: BLOCK_N = next_power_of_2(N) <= 512 is set by the launcher
    _FULL_ROW_CONFIGS = [
        _cfg(w, s, BLOCK_M=bm, BLOCK_K=bk)
        for bm, bk, w, s in [(64, 32, 4, 4), (64, 64, 4, 3), (64, 32, 8, 3), (64, 64, 8, 3),
                             (64, 32, 8, 2), (128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 16, 2)]
    ]
    # tiled: the usual Hopper GEMM tiles (triton's matmul tutorial, tf32 with BK = 32)
    _TILED_CONFIGS = [
        _cfg(w, s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        for bm, bn, bk, w, s in [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 32, 8, 3),
                                 (128, 128, 32, 4, 4), (128, 128, 32, 8, 4), (64, 256, 32, 4, 4),
                                 (64, 128, 64, 4, 4)]
    ]
    # weight gradient: output tile [BLOCK_N, BLOCK_K], reduction over BLOCK_M rows. The x operand
    # passes through registers (scaled by coef) and the SGD epilogue holds W and the momentum
    # buffer too; these tiles compile for sm_90 without register spills in both modes (checked
    # with ptxas); 128 x 256 and 256 x 128 output tiles spill in update mode, so they are left out.
    _GRAD_CONFIGS = [
        _cfg(w, s, BLOCK_N=bn, BLOCK_K=bk, BLOCK_M=bm)
        for bn, bk, bm, w, s in [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 4),
                                 (64, 256, 32, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)]
    ]


def _prune_full_row(configs, named_args, **kwargs):
    elem = named_args["xp_ptr"].element_size()
    bn = kwargs["BLOCK_N"]
    kept = [c for c in configs
            if _fits(c.kwargs["BLOCK_M"], bn, c.kwargs["BLOCK_K"], c.num_warps, c.num_stages, elem)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.num_stages)]


def _prune_tiled(configs, named_args, **kwargs):
    elem = named_args["xp_ptr"].element_size()
    kept = [c for c in configs
            if _fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                     c.num_stages, elem)]
    return kept or configs[:1]


def _prune_grad(configs, named_args, **kwargs):
    elem = named_args["xp_ptr"].element_size()
    kept = [c for c in configs
            if _fits(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["BLOCK_M"], c.num_warps,
                     c.num_stages, elem)]
    return kept or configs[:1]


_KEY = ["N", "K", "M_BUCKET"]
_forward_full_row = triton.autotune(
    configs=_FULL_ROW_CONFIGS, key=_KEY + ["FULL_ROW", "TRAIN"], reset_to_zero=["q_ptr", "loss_ptr"],
    prune_configs_by={"early_config_prune": _prune_full_row})(_forward_kernel)
_forward_tiled = triton.autotune(
    configs=_TILED_CONFIGS, key=_KEY + ["FULL_ROW", "TRAIN"], reset_to_zero=["q_ptr", "loss_ptr"],
    prune_configs_by={"early_config_prune": _prune_tiled})(_forward_kernel)
# The update mode changes W, b and the momentum buffers in place: restore them between trials.
_grad = triton.autotune(
    configs=_GRAD_CONFIGS, key=_KEY + ["SPLIT", "UPDATE"],
    restore_value=["w_ptr", "b_ptr", "bufw_ptr", "bufb_ptr"],
    prune_configs_by={"early_config_prune": _prune_grad})(_grad_kernel)

# Without tuning: one config per kernel that fits every shape and dtype (within the budgets above).
_UNTUNED = {
    _forward_full_row: (_FULL_ROW_CONFIGS, [_cfg(8, 2, BLOCK_M=64, BLOCK_K=32)]),
    _forward_tiled: (_TILED_CONFIGS, [_cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32)]),
    _grad: (_GRAD_CONFIGS, [_cfg(8, 4, BLOCK_N=128, BLOCK_K=128, BLOCK_M=32)]),
}
if INTERPRET:  # one config already
    _UNTUNED = {tuner: (tuned, tuned) for tuner, (tuned, _) in _UNTUNED.items()}


def set_autotune(enabled: bool) -> None:
    """Autotune over the Hopper configs (default) or run one fixed config per kernel (no tuning
    pass on a new shape: quicker test runs). The environment variable FF_KERNELS_AUTOTUNE=0 sets
    the latter at import."""
    global AUTOTUNE
    AUTOTUNE = bool(enabled)
    for tuner, (tuned, untuned) in _UNTUNED.items():
        tuner.configs = list(tuned if enabled else untuned)
        tuner.cache.clear()


AUTOTUNE = True


set_autotune(os.environ.get("FF_KERNELS_AUTOTUNE", "1") != "0")


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def _dot_precision(dtype: torch.dtype) -> str:
    """tf32 tensor cores for fp32 only when torch allows them for matmuls (as the reference's
    torch.mm does); fp16/bf16 operands are exact products either way. The interpreter is exact."""
    if dtype == torch.float32 and (INTERPRET or not torch.backends.cuda.matmul.allow_tf32):
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


def _loss_terms(config: FFConfig, m: int, m_pos: int, n: int):
    """(loss_weight, grad_scale): L = loss_weight * sum softplus(t_i); c_max = grad_scale."""
    goodness_factor = 2.0 if config.goodness == "sum" else 2.0 / n
    if config.loss == "symba":
        return 1.0 / m_pos, goodness_factor * config.alpha / m_pos
    return 1.0 / m, goodness_factor / m


def _forward(xp, xn, weight, bias, config: FFConfig, train: bool):
    """Kernels 1-2. Returns y [M, N] (input dtype), g [M] f32, coef [M] f32 (train), loss (0-dim)."""
    m_pos, k = xp.shape
    m_neg = xn.shape[0] if xn is not None else 0
    m, n = m_pos + m_neg, weight.shape[0]
    device, dtype = weight.device, weight.dtype
    if xn is None:
        xn = xp
    symba = train and config.loss == "symba"
    loss_weight, _ = _loss_terms(config, m, m_pos, n)

    y = new_output((m, n), dtype, device)
    g = new_output((m,), torch.float32, device)
    coef = new_output((m,), torch.float32, device) if train else g
    stats = new_output((m + 1,), torch.float32, device).zero_()  # [loss, q_0 .. q_{M-1}]: atomics
    loss, q = stats[0], stats[1:]

    full_row = n <= FULL_ROW_MAX_N
    finish_in_forward = full_row and not symba
    math_args = dict(GOODNESS_MEAN=config.goodness == "mean", NORM=_NORM_CODE[config.norm], SYMBA=symba,
                     TRAIN=train)
    args = (xp, xn, weight, bias if bias is not None else weight, y, q, g, coef, loss,
            m_pos, m_neg, n, k, triton.next_power_of_2(m),
            xp.stride(0), xp.stride(1), xn.stride(0), xn.stride(1), weight.stride(0), weight.stride(1),
            bias.stride(0) if bias is not None else 0,
            config.threshold(n), config.alpha, config.eps, loss_weight)
    common = dict(HAS_BIAS=bias is not None, FULL_ROW=full_row, FINISH_ROWS=finish_in_forward,
                  DOT_PRECISION=_dot_precision(dtype), GROUP_M=8, **math_args)

    def grid(meta):
        bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
        return ((triton.cdiv(m_pos, bm) + triton.cdiv(m_neg, bm)) * triton.cdiv(n, bn),)

    if full_row:
        _forward_full_row[grid](*args, BLOCK_N=max(16, triton.next_power_of_2(n)), **common)
    else:
        _forward_tiled[grid](*args, **common)

    if not finish_in_forward:
        rescale = not full_row and config.norm != "none"
        block_m, block_n = (64, 64) if INTERPRET else (16, 256)
        grid_rows = (triton.cdiv(m, block_m), triton.cdiv(n, block_n) if rescale else 1)
        _rows_kernel[grid_rows](y, q, g, coef, loss, m, m_pos, n, config.threshold(n), config.alpha,
                                config.eps, loss_weight, RESCALE=rescale, BLOCK_M=block_m,
                                BLOCK_N=block_n, num_warps=4, **math_args)
    return y, g, coef, loss


def _weight_grad(xp, xn, weight, bias, config: FFConfig, update, y, coef):
    """Kernels 3-4: gradients (returned, weight dtype) or the fused SGD step (returns None, None)."""
    m_pos, k = xp.shape
    m_neg, n = xn.shape[0], weight.shape[0]
    m = m_pos + m_neg
    device, dtype = weight.device, weight.dtype
    _, grad_scale = _loss_terms(config, m, m_pos, n)
    split = grad_split(m, n, k, device)
    has_bias = bias is not None

    grad_w = grad_b = None
    if update is None:
        grad_w = new_output((n, k), dtype, device)
        grad_b = new_output((n,), dtype, device) if has_bias else None
        lr = momentum = weight_decay = 0.0
        has_momentum = False
    else:
        lr, momentum, weight_decay = update.lr, update.momentum, update.weight_decay
        has_momentum = update.momentum != 0
    part_w = part_b = None
    if split > 1:
        part_w = new_output((split, n, k), torch.float32, device)
        part_b = new_output((split, n), torch.float32, device) if has_bias else None

    dummy = weight  # for pointers a mode never touches
    opt = lambda t: t if t is not None else dummy  # noqa: E731
    bufw = update.buf_weight if update is not None else None
    bufb = update.buf_bias if update is not None else None

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k + has_bias, meta["BLOCK_K"]), split)

    _grad[grid](y, coef, xp, xn, weight, opt(bias), opt(bufw), opt(bufb), opt(grad_w), opt(grad_b),
                opt(part_w), opt(part_b), m_pos, m_neg, n, k, triton.next_power_of_2(m),
                xp.stride(0), xp.stride(1), xn.stride(0), xn.stride(1),
                grad_scale, lr, momentum, weight_decay,
                HAS_BIAS=has_bias, SPLIT=split, UPDATE=update is not None, HAS_MOMENTUM=has_momentum,
                DOT_PRECISION=_dot_precision(dtype))

    if split > 1:
        block = 1024
        for part, grad, param, buf in ((part_w, grad_w, weight, bufw), (part_b, grad_b, bias, bufb)):
            if param is None:
                continue
            numel = param.numel()
            _split_reduce_kernel[(triton.cdiv(numel, block),)](
                part, numel, opt(grad), param, opt(buf), grad_scale, lr, momentum, weight_decay,
                SPLIT=split, UPDATE=update is not None, HAS_MOMENTUM=has_momentum, BLOCK=block,
                num_warps=4)
    return grad_w, grad_b


# ------------------------------------------------------------------------------------------------
# Backend entry points (same contract as reference.py)
# ------------------------------------------------------------------------------------------------

def layer_step(x_pos, x_neg, weight, bias, config: FFConfig, update) -> FFStepOutput:
    y, g, coef, loss = _forward(x_pos, x_neg, weight, bias, config, train=True)
    grad_w, grad_b = _weight_grad(x_pos, x_neg, weight, bias, config, update, y, coef)
    m_pos = x_pos.shape[0]
    return FFStepOutput(y_pos=y[:m_pos], y_neg=y[m_pos:], g_pos=g[:m_pos], g_neg=g[m_pos:], loss=loss,
                        grad_weight=grad_w, grad_bias=grad_b)


def layer_forward(x, weight, bias, config: FFConfig):
    y, g, _, _ = _forward(x, None, weight, bias, config, train=False)
    return y, g
