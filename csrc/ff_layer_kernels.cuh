// Device code of the fused Forward-Forward layer step. Included by ff_layer.cu only.
//
// One step is four launches on one stream, no host synchronisation (M = m_pos + m_neg rows):
//   1. ff_forward_kernel   Z = X W^T (tensor cores), epilogue: + b, relu, y := h (unnormalised,
//                          input dtype), q_i += sum_j h_ij^2 (float32 atomics, one per block row).
//   2. ff_finalize_kernel  per row: goodness g_i, loss term, coefficient c_i = dL/dg_i * dg/dq * 2,
//                          normalisation y_i *= 1 / den_i in place; per-row factor f_i = c_i * den_i
//                          (so that c_i h_ij = f_i y_ij), loss and max|f| reduced on the device.
//   3. ff_wgrad_kernel     gW[N,K] += sum_i (f_i y_in) x_ik over an M-chunk (split-M, float32
//                          atomics into a zeroed scratch), gb[n] += sum_i f_i y_in on the side.
//   4. ff_apply_kernel     grad_weight/grad_bias := gW, gb in the weight dtype, or the fused SGD step.
// Passes over memory: x twice (steps 1, 3), W once, y written once and read-modified once (step 2)
// and read once (step 3); scratch O(M + N K) float32.
//
// The two GEMMs share one tiled main loop: a 128 x 128 block tile, reduction depth 32, 8 warps
// (2 x 4) of 64 x 32 each. Operand tiles are staged through registers into shared memory as
// [128 rows][32 + pad] with the reduction index contiguous; every global load is bounds-checked and
// zero-filled, and takes arbitrary (64-bit) strides, so any shape and any input strides work.
// Math per input dtype: fp16/bf16 -> wmma m16n16k16 (fp32 accumulate); fp32 with TF32 allowed ->
// wmma m16n16k8 tf32; fp32 exact -> SIMT fp32 FMA. Archs below sm_80 use SIMT for every dtype.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

namespace ff_kernels {
namespace ffl {

// ------------------------------------------------------------------ element conversion
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ------------------------------------------------------------------ tile geometry
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 128;     // block tile: kTile output rows ("R side") x kTile output cols ("C side")
constexpr int kTileK = 32;     // reduction depth per main-loop step
constexpr int kWarpsR = 2, kWarpsC = 4;
constexpr int kWarpTileR = kTile / kWarpsR;  // 64
constexpr int kWarpTileC = kTile / kWarpsC;  // 32
constexpr int kSubR = kWarpTileR / 16;       // 4 sub-tiles of 16 x 16 per warp, down
constexpr int kSubC = kWarpTileC / 16;       // 2 across
constexpr int kLoads = kTile * kTileK / kThreads;  // 16 elements per thread per operand tile
constexpr int kStageLd = 16 + 4;  // per-warp 16 x 16 float staging tile (ld multiple of 4 floats)
static_assert(kWarpsR * kWarpsC == kWarps, "warp grid");
static_assert(kThreads % kTile == 0 && kTileK % (kThreads / kTile) == 0, "R-fast load map");
static_assert(kThreads % kTileK == 0 && kTile % (kThreads / kTileK) == 0, "C-fast load map");

// Thread t's j-th element (r, c) of a [kTile x kTileK] operand tile; each (r, c) exactly once.
// kRFast: consecutive threads walk r (coalesced when the global operand is contiguous along the
// output dimension); otherwise consecutive threads walk c (contiguous along the reduction).
template <bool kRFast>
__device__ __forceinline__ void tile_coord(int t, int j, int& r, int& c) {
  if (kRFast) {
    r = t % kTile;
    c = t / kTile + (kThreads / kTile) * j;
  } else {
    c = t % kTileK;
    r = t / kTileK + (kThreads / kTileK) * j;
  }
}

// ------------------------------------------------------------------ per-warp MMA engines
// Each engine owns the accumulators of one warp's 64 x 32 tile and provides:
//   zero(acc); mma_tile(acc, As, Bs, wr, wc, lane): acc += A_tile * B_tile^T over kTileK, where
//   As/Bs are [kTile][kLd] shared tiles (row = output index, column = reduction index);
//   stage(acc, fi, fj, st, lane): write 16 x 16 sub-tile (fi, fj) of the warp tile row-major
//   (ld kStageLd) to the warp's float staging buffer st.

// Exact fp32: lane (lr, lc) = (lane / 4, lane % 4) owns rows lr + 8 a (a < 8) and cols lc + 4 b (b < 8).
struct SimtMath {
  using Smem = float;
  static constexpr int kLd = kTileK + 4;
  struct Acc {
    float v[8][8];
  };
  __device__ __forceinline__ static Smem to_smem(float x) { return x; }
  __device__ __forceinline__ static void zero(Acc& acc) {
#pragma unroll
    for (int a = 0; a < 8; ++a)
#pragma unroll
      for (int b = 0; b < 8; ++b) acc.v[a][b] = 0.f;
  }
  __device__ __forceinline__ static void mma_tile(Acc& acc, const Smem* As, const Smem* Bs, int wr,
                                                  int wc, int lane) {
    const int lr = lane >> 2, lc = lane & 3;
    const Smem* pa = As + (wr * kWarpTileR + lr) * kLd;
    const Smem* pb = Bs + (wc * kWarpTileC + lc) * kLd;
#pragma unroll 4
    for (int kk = 0; kk < kTileK; ++kk) {
      float a[8], b[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = pa[(8 * i) * kLd + kk];
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = pb[(4 * j) * kLd + kk];
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc.v[i][j] = fmaf(a[i], b[j], acc.v[i][j]);
    }
  }
  // Sub-tile (fi, fj) = warp rows [16 fi, 16 fi + 16) -> a in {2 fi, 2 fi + 1};
  // warp cols [16 fj, 16 fj + 16) -> b in {4 fj .. 4 fj + 3}.
  __device__ __forceinline__ static void stage(const Acc& acc, int fi, int fj, float* st, int lane) {
    const int lr = lane >> 2, lc = lane & 3;
#pragma unroll
    for (int da = 0; da < 2; ++da)
#pragma unroll
      for (int db = 0; db < 4; ++db)
        st[(lr + 8 * da) * kStageLd + lc + 4 * db] = acc.v[2 * fi + da][4 * fj + db];
  }
};

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
namespace wmma = nvcuda::wmma;

// Tensor cores through wmma: A fragments row-major from As ([row][k]), B fragments col-major
// from Bs ([col][k], i.e. element (k, col) at col * ld + k). Fragment pointers are 32-byte aligned:
// row offsets are multiples of 16 rows of kLd elements (kLd * 16 * sizeof multiple of 32) and
// k offsets are multiples of kFragK elements (kFragK * sizeof = 32 bytes); static_asserts below.
template <typename SmemT, typename ElemT, int kFragK, bool kToTf32>
struct WmmaMath {
  using Smem = SmemT;
  static constexpr int kLd = kTileK + 16 / int(sizeof(SmemT));  // pad 16 bytes
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, kFragK, ElemT, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, kFragK, ElemT, wmma::col_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, kFragK, float>;
  static_assert((kLd * sizeof(SmemT)) % 16 == 0, "wmma ldm must be a multiple of 16 bytes");
  static_assert((16 * kLd * sizeof(SmemT)) % 32 == 0, "fragment rows 32-byte aligned");
  static_assert((kFragK * sizeof(SmemT)) % 32 == 0, "fragment k offsets 32-byte aligned");
  struct Acc {
    FragC c[kSubR][kSubC];
  };
  __device__ __forceinline__ static Smem to_smem(float x) { return from_f32<SmemT>(x); }
  __device__ __forceinline__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < kSubR; ++i)
#pragma unroll
      for (int j = 0; j < kSubC; ++j) wmma::fill_fragment(acc.c[i][j], 0.f);
  }
  template <typename Frag>
  __device__ __forceinline__ static void round_tf32(Frag& f) {
    if constexpr (kToTf32) {
#pragma unroll
      for (int t = 0; t < f.num_elements; ++t) f.x[t] = wmma::__float_to_tf32(f.x[t]);
    }
  }
  __device__ __forceinline__ static void mma_tile(Acc& acc, const Smem* As, const Smem* Bs, int wr,
                                                  int wc, int lane) {
    (void)lane;
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += kFragK) {
      FragA a[kSubR];
      FragB b[kSubC];
#pragma unroll
      for (int i = 0; i < kSubR; ++i) {
        wmma::load_matrix_sync(a[i], As + (wr * kWarpTileR + 16 * i) * kLd + kk, kLd);
        round_tf32(a[i]);
      }
#pragma unroll
      for (int j = 0; j < kSubC; ++j) {
        wmma::load_matrix_sync(b[j], Bs + (wc * kWarpTileC + 16 * j) * kLd + kk, kLd);
        round_tf32(b[j]);
      }
#pragma unroll
      for (int i = 0; i < kSubR; ++i)
#pragma unroll
        for (int j = 0; j < kSubC; ++j) wmma::mma_sync(acc.c[i][j], a[i], b[j], acc.c[i][j]);
    }
  }
  __device__ __forceinline__ static void stage(const Acc& acc, int fi, int fj, float* st, int lane) {
    (void)lane;
    wmma::store_matrix_sync(st, acc.c[fi][fj], kStageLd, wmma::mem_row_major);
  }
};
#endif

// Host code names the engine by kind; device code maps (dtype, kind) to an engine per arch, so
// sm < 80 builds fall back to SIMT (wmma bf16/tf32 need sm_80).
enum MathKind : int { kMathSimt = 0, kMathTensorCore = 1 };

template <typename T, int kKind>
struct SelectMath {
  using type = SimtMath;
};
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
template <>
struct SelectMath<float, kMathTensorCore> {
  using type = WmmaMath<float, wmma::precision::tf32, 8, true>;
};
template <>
struct SelectMath<__half, kMathTensorCore> {
  using type = WmmaMath<__half, __half, 16, false>;
};
template <>
struct SelectMath<__nv_bfloat16, kMathTensorCore> {
  using type = WmmaMath<__nv_bfloat16, __nv_bfloat16, 16, false>;
};
#endif

// Shared memory of one GEMM block: the main loop's two operand tiles, reused (after the loop) as
// 8 per-warp staging tiles, plus a [kWarpsC][kTile] float table for per-row partial sums.
template <class Math>
struct SmemLayout {
  static constexpr int kOperandBytes = kTile * Math::kLd * int(sizeof(typename Math::Smem));
  static constexpr int kMainBytes = 2 * kOperandBytes;
  static constexpr int kStageBytes = kWarps * 16 * kStageLd * int(sizeof(float));
  static constexpr int kUnionBytes = kMainBytes > kStageBytes ? kMainBytes : kStageBytes;
  static constexpr int kRowSumBytes = kWarpsC * kTile * int(sizeof(float));
  static constexpr int kBytes = kUnionBytes + kRowSumBytes;
  static_assert(kOperandBytes % 128 == 0 && kUnionBytes % 128 == 0, "alignment of the sub-buffers");
  static_assert(kBytes <= 48 * 1024, "static shared memory limit");
};

// ------------------------------------------------------------------ the shared GEMM main loop
template <class Math, bool kRFast, class Fetch>
__device__ __forceinline__ void fetch_tile(const Fetch& fetch, int64_t k0, float (&reg)[kLoads]) {
#pragma unroll
  for (int j = 0; j < kLoads; ++j) {
    int r, c;
    tile_coord<kRFast>(threadIdx.x, j, r, c);
    reg[j] = fetch(r, k0 + c);
  }
}

template <class Math, bool kRFast>
__device__ __forceinline__ void store_tile(const float (&reg)[kLoads], typename Math::Smem* s) {
#pragma unroll
  for (int j = 0; j < kLoads; ++j) {
    int r, c;
    tile_coord<kRFast>(threadIdx.x, j, r, c);
    s[r * Math::kLd + c] = Math::to_smem(reg[j]);
  }
}

// acc = sum over the reduction index kk in [kbeg, kend) of A(r, kk) B(c, kk), for the block's
// kTile x kTile output tile; fetch_a(r, kk) / fetch_b(c, kk) return the operands as float
// (0 outside the problem). on_a(reg) sees every A value this thread loads (used for grad_bias).
// Register double-buffering: the next tile's global loads are in flight during this tile's MMAs.
template <class Math, bool kARFast, bool kBRFast, class FetchA, class FetchB, class OnA>
__device__ __forceinline__ void gemm_mainloop(const FetchA& fetch_a, const FetchB& fetch_b,
                                              OnA& on_a, int64_t kbeg, int64_t kend,
                                              typename Math::Acc& acc, typename Math::Smem* As,
                                              typename Math::Smem* Bs) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wr = warp / kWarpsC, wc = warp % kWarpsC;
  Math::zero(acc);
  if (kbeg >= kend) return;  // uniform across the block
  float ra[kLoads], rb[kLoads];
  fetch_tile<Math, kARFast>(fetch_a, kbeg, ra);
  fetch_tile<Math, kBRFast>(fetch_b, kbeg, rb);
  on_a(ra);
  for (int64_t k0 = kbeg; k0 < kend; k0 += kTileK) {
    store_tile<Math, kARFast>(ra, As);
    store_tile<Math, kBRFast>(rb, Bs);
    __syncthreads();
    if (k0 + kTileK < kend) {
      fetch_tile<Math, kARFast>(fetch_a, k0 + kTileK, ra);
      fetch_tile<Math, kBRFast>(fetch_b, k0 + kTileK, rb);
      on_a(ra);
    }
    Math::mma_tile(acc, As, Bs, wr, wc, lane);
    __syncthreads();  // the next iteration overwrites As/Bs
  }
}

// Walks the block's output tile one 16 x 16 warp sub-tile at a time: stage it in the warp's
// buffer, then visit(fi, tile_row, tile_col, value) for each element; a lane owns row lane / 2 of
// the sub-tile and 8 consecutive columns, so within one fi it always sees the same tile row.
// Requires that the main loop has ended (the staging buffers alias As/Bs). The __syncwarp()s order
// the lane-to-lane hand-over through st and reconverge the warp before the next (collective) stage.
template <class Math, class Visit>
__device__ __forceinline__ void for_each_output(const typename Math::Acc& acc, float* stage_all,
                                                Visit& visit) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wr = warp / kWarpsC, wc = warp % kWarpsC;
  float* st = stage_all + warp * 16 * kStageLd;
  const int rr = lane >> 1, cc0 = (lane & 1) * 8;
#pragma unroll
  for (int fi = 0; fi < kSubR; ++fi) {
#pragma unroll
    for (int fj = 0; fj < kSubC; ++fj) {
      Math::stage(acc, fi, fj, st, lane);
      __syncwarp();
#pragma unroll
      for (int e = 0; e < 8; ++e)
        visit(fi, wr * kWarpTileR + 16 * fi + rr, wc * kWarpTileC + 16 * fj + cc0 + e,
              st[rr * kStageLd + cc0 + e]);
      __syncwarp();  // before the next stage() overwrites st
    }
  }
}

struct NoHook {
  __device__ __forceinline__ void operator()(const float (&)[kLoads]) const {}
};

// ------------------------------------------------------------------ kernel 1: forward GEMM
struct ForwardParams {
  const void* x_pos;
  const void* x_neg;
  int64_t m_pos, m, n, k;
  int64_t sxp_r, sxp_c, sxn_r, sxn_c;
  const void* w;
  int64_t sw_r, sw_c;
  const void* bias;  // nullptr: no bias
  int64_t sb;
  void* y;   // [m, n] contiguous, input dtype
  float* q;  // [m], zeroed
};

// x[i, kk] of [x_pos; x_neg] (in range): row i < m_pos from x_pos, else row i - m_pos of x_neg,
// each through its own strides. The one place that addresses the two halves.
template <typename T>
__device__ __forceinline__ float x_element(const T* xp, const T* xn, int64_t m_pos, int64_t sp_r,
                                           int64_t sp_c, int64_t sn_r, int64_t sn_c, int64_t i,
                                           int64_t kk) {
  return i < m_pos ? to_f32(xp[i * sp_r + kk * sp_c]) : to_f32(xn[(i - m_pos) * sn_r + kk * sn_c]);
}

// A(r, kk) = x[row0 + r, kk]; rows of x_pos then x_neg, each through its own strides.
template <typename T>
struct XRowsFetch {
  const T* xp;
  const T* xn;
  int64_t m_pos, m, k, sp_r, sp_c, sn_r, sn_c, row0;
  __device__ __forceinline__ float operator()(int r, int64_t kk) const {
    const int64_t i = row0 + r;
    if (i >= m || kk >= k) return 0.f;
    return x_element(xp, xn, m_pos, sp_r, sp_c, sn_r, sn_c, i, kk);
  }
};

// B(c, kk) = W[col0 + c, kk].
template <typename T>
struct WRowsFetch {
  const T* w;
  int64_t n, k, s_r, s_c, col0;
  __device__ __forceinline__ float operator()(int c, int64_t kk) const {
    const int64_t j = col0 + c;
    if (j >= n || kk >= k) return 0.f;
    return to_f32(w[j * s_r + kk * s_c]);
  }
};

// Math: z_ij = sum_k x_ik W_jk + b_j, h = relu(z), y_ij := h_ij (unnormalised; kernel 2 scales it),
// q_i += sum_{j in this block's columns} h_ij^2 (fp32, from the unrounded h).
// Grid: x = row tiles of M, y = column tiles of N.
template <typename T, int kKind>
__global__ void __launch_bounds__(kThreads) ff_forward_kernel(ForwardParams p) {
  using Math = typename SelectMath<T, kKind>::type;
  using L = SmemLayout<Math>;
  __shared__ __align__(128) unsigned char smem[L::kBytes];
  auto* As = reinterpret_cast<typename Math::Smem*>(smem);
  auto* Bs = reinterpret_cast<typename Math::Smem*>(smem + L::kOperandBytes);
  float* stage = reinterpret_cast<float*>(smem);
  float* rowsum = reinterpret_cast<float*>(smem + L::kUnionBytes);  // [kWarpsC][kTile]

  const int64_t row0 = int64_t(blockIdx.x) * kTile, col0 = int64_t(blockIdx.y) * kTile;
  const XRowsFetch<T> fa{static_cast<const T*>(p.x_pos), static_cast<const T*>(p.x_neg), p.m_pos,
                         p.m, p.k, p.sxp_r, p.sxp_c, p.sxn_r, p.sxn_c, row0};
  const WRowsFetch<T> fb{static_cast<const T*>(p.w), p.n, p.k, p.sw_r, p.sw_c, col0};
  typename Math::Acc acc;
  NoHook hook;
  gemm_mainloop<Math, false, false>(fa, fb, hook, 0, p.k, acc, As, Bs);

  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  float rsq[kSubR];
#pragma unroll
  for (int i = 0; i < kSubR; ++i) rsq[i] = 0.f;
  auto visit = [&](int fi, int tr, int tc, float z) {
    const int64_t i = row0 + tr, j = col0 + tc;
    if (i < p.m && j < p.n) {
      if (bias != nullptr) z += to_f32(bias[j * p.sb]);
      const float h = z < 0.f ? 0.f : z;  // relu; NaN propagates as in torch
      y[i * p.n + j] = from_f32<T>(h);
      rsq[fi] += h * h;
    }
  };
  for_each_output<Math>(acc, stage, visit);

  // Row sums: lanes 2r and 2r+1 hold the two halves of sub-tile row r; then 4 column warps.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wr = warp / kWarpsC, wc = warp % kWarpsC;
#pragma unroll
  for (int fi = 0; fi < kSubR; ++fi) {
    const float s = rsq[fi] + __shfl_xor_sync(0xffffffffu, rsq[fi], 1);
    if ((lane & 1) == 0) rowsum[wc * kTile + wr * kWarpTileR + 16 * fi + (lane >> 1)] = s;
  }
  __syncthreads();
  if (threadIdx.x < kTile) {
    const int64_t i = row0 + threadIdx.x;
    if (i < p.m) {
      float s = 0.f;
#pragma unroll
      for (int c = 0; c < kWarpsC; ++c) s += rowsum[c * kTile + threadIdx.x];
      atomicAdd(p.q + i, s);
    }
  }
}

// ------------------------------------------------------------------ kernel 2: row finalise
struct RowParams {
  int64_t m, m_pos, n;
  int goodness_mean, norm, loss;  // loss < 0: forward mode (no loss, no coefficient)
  float threshold, eps, alpha;
};

struct RowResult {
  float g;          // goodness
  float loss_term;  // this row's share of L (already divided by M, or by B for SymBa)
  float coef;       // c_i = dL/dg_i * dg_i/dq_i * 2, so that dL/dz_ij = c_i h_ij
  float den;        // h_i = den_i * y_i (den = 1 for norm "none")
};

__device__ __forceinline__ float softplus(float t) {  // log(1 + e^t), finite for finite t
  return fmaxf(t, 0.f) + log1pf(expf(-fabsf(t)));
}
__device__ __forceinline__ float sigmoid(float t) {  // no overflow for either sign
  if (t >= 0.f) return 1.f / (1.f + expf(-t));
  const float e = expf(t);
  return e / (1.f + e);
}
__device__ __forceinline__ float goodness_of(float q, const RowParams& p) {
  return p.goodness_mean ? q / float(p.n) : q;
}

// The one place the FF epilogue math lives (DESIGN.md 1.2-1.5), for row i with sum of squares q and
// (SymBa only) the sum of squares of its partner row i +- m_pos:
//   softplus: t = -s_i (g_i - theta), L_i = softplus(t) / M, dL/dg_i = -s_i sigmoid(t) / M
//   symba:    d = g+ - g-, t = -alpha d, L = softplus(t) / B on the positive row,
//             dL/dg+ = -alpha sigmoid(t) / B = -dL/dg-
//   c_i = dL/dg_i * (2 for "sum", 2 / N for "mean")      [d g / d h_ij = 2 h_ij (/ N)]
//   den_i = sqrt(q) + eps (l2), sqrt(q) / sqrt(N) + eps (rms), 1 (none); y_i = h_i / den_i
__device__ __forceinline__ RowResult ff_row_math(int64_t i, float q, float q_partner,
                                                 const RowParams& p) {
  RowResult r;
  r.g = goodness_of(q, p);
  const float rn = sqrtf(q);
  r.den = p.norm == 0 ? rn + p.eps : (p.norm == 1 ? rn / sqrtf(float(p.n)) + p.eps : 1.f);
  r.loss_term = 0.f;
  r.coef = 0.f;
  const bool positive = i < p.m_pos;
  float dg = 0.f;
  if (p.loss == 0) {  // softplus
    const float s = positive ? 1.f : -1.f;
    const float t = -s * (r.g - p.threshold);
    r.loss_term = softplus(t) / float(p.m);
    dg = -s * sigmoid(t) / float(p.m);
  } else if (p.loss == 1) {  // symba: rows i and i + B are a pair, B = m_pos
    const float gp = goodness_of(q_partner, p);
    const float d = positive ? r.g - gp : gp - r.g;
    const float t = -p.alpha * d;
    const float dpos = -p.alpha * sigmoid(t) / float(p.m_pos);
    dg = positive ? dpos : -dpos;
    r.loss_term = positive ? softplus(t) / float(p.m_pos) : 0.f;
  }
  r.coef = dg * (p.goodness_mean ? 2.f / float(p.n) : 2.f);
  return r;
}

// One warp per row: g_i, y_i /= den_i in place, f_i = c_i den_i (wgrad's per-row factor on y),
// block-reduced loss (atomicAdd into *loss) and max |f_i| (atomicMax on the float's bits, valid for
// non-negative floats) for the wgrad kernel's power-of-two operand scaling.
template <typename T>
__global__ void __launch_bounds__(kThreads) ff_finalize_kernel(RowParams p, const float* q, T* y,
                                                               float* g, float* f, float* loss,
                                                               unsigned int* fmax_bits) {
  __shared__ float red_loss[kWarps];
  __shared__ unsigned int red_fmax[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = int64_t(blockIdx.x) * kWarps + warp;
  float lterm = 0.f;
  unsigned int fabs_bits = 0u;  // bits of |f_i| (sign clear): uint order = float order, NaN on top
  if (i < p.m) {
    float qp = 0.f;
    if (p.loss == 1) qp = q[i < p.m_pos ? i + p.m_pos : i - p.m_pos];
    const RowResult r = ff_row_math(i, q[i], qp, p);
    const float fi = r.coef * r.den;
    if (lane == 0) {
      g[i] = r.g;
      if (f != nullptr) f[i] = fi;
    }
    lterm = r.loss_term;
    fabs_bits = __float_as_uint(fabsf(fi));
    if (p.norm != 2) {
      const float scale = 1.f / r.den;
      T* row = y + i * p.n;
      for (int64_t j = lane; j < p.n; j += 32) row[j] = from_f32<T>(to_f32(row[j]) * scale);
    }
  }
  if (loss == nullptr && fmax_bits == nullptr) return;  // forward mode (uniform over the grid)
  // all lanes of a warp hold the same row values: lane 0 speaks for the warp
  if (lane == 0) {
    red_loss[warp] = lterm;
    red_fmax[warp] = fabs_bits;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    unsigned int mx = 0u;
    for (int w = 0; w < kWarps; ++w) {
      s += red_loss[w];
      mx = max(mx, red_fmax[w]);
    }
    if (loss != nullptr) atomicAdd(loss, s);
    if (fmax_bits != nullptr) atomicMax(fmax_bits, mx);
  }
}

// ------------------------------------------------------------------ kernel 3: weight gradient
struct WgradParams {
  const void* x_pos;
  const void* x_neg;
  int64_t m_pos, m, n, k;
  int64_t sxp_r, sxp_c, sxn_r, sxn_c;
  const void* y;  // [m, n] contiguous, normalised
  const float* f;  // [m] per-row factor
  const unsigned int* fmax_bits;
  float* gw;  // [n, k] zeroed
  float* gb;  // [n] zeroed, nullptr without bias
  int64_t chunk;  // rows per split (multiple of kTileK)
};

// Power-of-two scale S with max|f| S in [0.5, 1): the tensor-core operand f_i S y_ij then keeps
// fp16's range and precision even when the f_i are tiny (they carry 1/M); 1/S is applied exactly.
__device__ __forceinline__ void operand_scale(unsigned int fmax_bits, float& s, float& inv_s) {
  const float fmax = __uint_as_float(fmax_bits);
  s = 1.f;
  inv_s = 1.f;
  if (fmax > 0.f && isfinite(fmax)) {
    int e;
    frexpf(fmax, &e);  // fmax = frac 2^e, frac in [0.5, 1)
    e = max(-100, min(100, e));
    s = ldexpf(1.f, -e);
    inv_s = ldexpf(1.f, e);
  }
}

// A(r, i) = (f_i S) y[i, n0 + r]: the gradient dL/dz = c_i h = f_i y, transposed, for rows i < iend.
template <typename T>
struct GradZFetch {
  const T* y;
  const float* f;
  float s;
  int64_t n, n0, iend;
  __device__ __forceinline__ float operator()(int r, int64_t i) const {
    const int64_t j = n0 + r;
    if (j >= n || i >= iend) return 0.f;
    return (f[i] * s) * to_f32(y[i * n + j]);
  }
};

// B(c, i) = x[i, k0 + c] for rows i < iend.
template <typename T>
struct XColsFetch {
  const T* xp;
  const T* xn;
  int64_t m_pos, k, sp_r, sp_c, sn_r, sn_c, k0, iend;
  __device__ __forceinline__ float operator()(int c, int64_t i) const {
    const int64_t kk = k0 + c;
    if (kk >= k || i >= iend) return 0.f;
    return x_element(xp, xn, m_pos, sp_r, sp_c, sn_r, sn_c, i, kk);
  }
};

// Sums the A values this thread loads: with the R-fast map a thread always loads column n0 + t % 128.
struct BiasHook {
  bool on;
  float sum;
  __device__ __forceinline__ void operator()(const float (&reg)[kLoads]) {
    if (on) {
#pragma unroll
      for (int j = 0; j < kLoads; ++j) sum += reg[j];
    }
  }
};

// Math: grad_W[n, k] = sum_i c_i h_in x_ik = (1/S) sum_i (S f_i y_in) x_ik, as a GEMM whose
// reduction runs over the rows i of this block's M-chunk [z chunk, (z + 1) chunk); partial tiles of
// all chunks meet by float32 atomicAdd in gw. grad_b[n] = (1/S) sum_i S f_i y_in, summed in fp32 by
// the blocks of the first K tile from the same operand values (before rounding to the MMA type).
// Grid: x = column tiles of K, y = row tiles of N, z = M-chunks.
template <typename T, int kKind>
__global__ void __launch_bounds__(kThreads) ff_wgrad_kernel(WgradParams p) {
  using Math = typename SelectMath<T, kKind>::type;
  using L = SmemLayout<Math>;
  __shared__ __align__(128) unsigned char smem[L::kBytes];
  auto* As = reinterpret_cast<typename Math::Smem*>(smem);
  auto* Bs = reinterpret_cast<typename Math::Smem*>(smem + L::kOperandBytes);
  float* stage = reinterpret_cast<float*>(smem);

  const int64_t k0 = int64_t(blockIdx.x) * kTile, n0 = int64_t(blockIdx.y) * kTile;
  const int64_t ibeg = int64_t(blockIdx.z) * p.chunk;
  const int64_t iend = ibeg + p.chunk < p.m ? ibeg + p.chunk : p.m;
  float s, inv_s;
  operand_scale(*p.fmax_bits, s, inv_s);
  const GradZFetch<T> fa{static_cast<const T*>(p.y), p.f, s, p.n, n0, iend};
  const XColsFetch<T> fb{static_cast<const T*>(p.x_pos), static_cast<const T*>(p.x_neg), p.m_pos,
                         p.k, p.sxp_r, p.sxp_c, p.sxn_r, p.sxn_c, k0, iend};
  BiasHook hook{p.gb != nullptr && blockIdx.x == 0, 0.f};
  typename Math::Acc acc;
  gemm_mainloop<Math, true, true>(fa, fb, hook, ibeg, iend, acc, As, Bs);

  auto visit = [&](int, int tr, int tc, float v) {
    const int64_t jn = n0 + tr, jk = k0 + tc;
    if (jn < p.n && jk < p.k) atomicAdd(p.gw + jn * p.k + jk, v * inv_s);
  };
  for_each_output<Math>(acc, stage, visit);
  if (hook.on) {
    const int64_t jn = n0 + threadIdx.x % kTile;
    if (jn < p.n) atomicAdd(p.gb + jn, hook.sum * inv_s);
  }
}

// ------------------------------------------------------------------ kernel 4: gradients / SGD
struct ApplyParams {
  const float* gw;  // [n * k]
  const float* gb;  // [n] or nullptr (no bias)
  int64_t nk, n;
  int update;
  void* grad_w;  // gradient mode: [n * k], input dtype
  void* grad_b;
  void* w;  // update mode: contiguous [n * k], [n]
  void* b;
  void* buf_w;  // momentum buffers (momentum != 0)
  void* buf_b;
  int buf_w_f32, buf_b_f32;
  int use_momentum, use_weight_decay;  // exact "!= 0" of the double values
  float lr, momentum, weight_decay;
};

template <typename T>
__device__ __forceinline__ float load_buf(const void* buf, bool f32, int64_t j) {
  return f32 ? static_cast<const float*>(buf)[j] : to_f32(static_cast<const T*>(buf)[j]);
}
template <typename T>
__device__ __forceinline__ float store_buf(void* buf, bool f32, int64_t j, float v) {
  if (f32) {
    static_cast<float*>(buf)[j] = v;
    return v;
  }
  const T r = from_f32<T>(v);
  static_cast<T*>(buf)[j] = r;
  return to_f32(r);
}
// Rounds v as a buffer of that dtype would hold it.
template <typename T>
__device__ __forceinline__ float round_buf(bool f32, float v) {
  return f32 ? v : to_f32(from_f32<T>(v));
}

// torch.optim.SGD (dampening 0, no nesterov), each tensor op rounded as PyTorch rounds it:
//   d = grad + wd p;  buf = mu buf (rounded) + d (rounded);  d = buf;  p = p - lr d (rounded).
template <typename T>
__device__ __forceinline__ void sgd_step(T* param, void* buf, bool buf_f32, int64_t j, float grad,
                                         const ApplyParams& p) {
  const float w = to_f32(param[j]);
  float d = grad;
  if (p.use_weight_decay) d = d + p.weight_decay * w;
  if (p.use_momentum) {
    const float b = round_buf<T>(buf_f32, p.momentum * load_buf<T>(buf, buf_f32, j));
    d = store_buf<T>(buf, buf_f32, j, b + d);
  }
  param[j] = from_f32<T>(w - p.lr * d);
}

// Elementwise over the n*k weight entries, then the n bias entries (grid-stride, 64-bit index).
template <typename T>
__global__ void __launch_bounds__(kThreads) ff_apply_kernel(ApplyParams p) {
  const int64_t total = p.nk + (p.gb != nullptr ? p.n : 0);
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const bool is_w = idx < p.nk;
    const int64_t j = is_w ? idx : idx - p.nk;
    const float grad = is_w ? p.gw[j] : p.gb[j];
    if (!p.update) {
      static_cast<T*>(is_w ? p.grad_w : p.grad_b)[j] = from_f32<T>(grad);
    } else {
      sgd_step<T>(static_cast<T*>(is_w ? p.w : p.b), is_w ? p.buf_w : p.buf_b,
                  (is_w ? p.buf_w_f32 : p.buf_b_f32) != 0, j, grad, p);
    }
  }
}

}  // namespace ffl
}  // namespace ff_kernels
