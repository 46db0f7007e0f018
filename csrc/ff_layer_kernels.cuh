// Device code of the fused Forward-Forward layer step. Included by ff_layer.cu only.
//
// One step is a memset of the workspace and three to five launches on one stream, no host
// synchronisation (M = m_pos + m_neg):
//   1. ff_forward_kernel   Z = X W^T; epilogue: + b, relu, y := h unnormalised (fp16: h 2^-e, one
//                          e per row and 32 columns, so that h beyond fp16's range survives),
//                          q_i += sum_j h_ij^2 (float32 atomics), peer norm: s_j += sum over the
//                          positive rows of h_ij; the non-finite flag when some z_ij is NaN/inf.
//   2. ff_finalize_kernel  per row: goodness g_i, loss, c_i = dL/dg_i dg/dq 2, y_i := h_i / den_i in
//                          place; f_i = c_i den_i, so that c_i h_ij = f_i y_ij; the loss (each
//                          term divided by M before any sum) and a bound of |f_i y_ij| reduced on
//                          the device; the non-finite flag when some q_i is NaN/inf.
//   3. ff_peer_kernel      (peer norm only; one block) running mean m := rho m + (1 - rho) s / B+
//                          (kept as it was when the step skips a non-finite batch),
//                          p_j = kappa (m_j - mean m), a bound of |p_j|.
//   4. ff_wgrad_kernel     block 0 first writes the loss (NaN when the flag is set: every loss
//                          term is in by now) and the flag out. G_ij = f_i y_ij + [i positive] p_j
//                          (= dL/dz_ij); grad_W = G^T X and grad_b = colsum G over one batch chunk
//                          per grid z. A single chunk (the usual case at scale: the N x K tiles fill
//                          the GPU) owns its output tile and finishes it in the epilogue: grad in
//                          the weight dtype, or the SGD step in place. Several chunks add float32
//                          atomics into a zeroed scratch. An update-mode step that skips a
//                          non-finite batch returns here without computing anything.
//   5. ff_apply_kernel     (several chunks only) the same finish from the scratch. Also the whole
//                          of ff_sgd_update (the SGD rule on a given gradient).
// Non-finite steps: the flag is one byte of the workspace, set (plain stores of 1) by kernels 1
// and 2 and read by the later ones; with skip_nonfinite the SGD finish and the running mean read
// it on the device and leave weight, bias, buffers and the mean as they were.
// Passes over memory: x twice (1, 4), W once (plus once read-modify-write in update mode), y
// written (1), read and rewritten (2), read (4); scratch O(M + N) with one chunk, + N K floats
// with several.
//
// The two GEMMs share one main loop: 128 x 128 block tile, 8 warps (2 x 4) of 64 x 32, reduction
// steps of 64 bytes per operand row (16 fp32 or 32 fp16/bf16 elements). Operand tiles are copied
// global -> shared in 16-byte chunks, each kept in the global layout (rows padded by 16 bytes:
// conflict-free 16-byte stores and fragment loads); the forward's tiles are [128 outputs][step],
// the gradient's [step][128 outputs]. Two shared-memory stages and one barrier per step: a raw
// chunk (x, W) that is aligned and inside the matrix moves by cp.async (sm_80+), any other
// (strided or misaligned input, the matrix edge) by zero-filled element loads; the gradient's
// computed operand (f y + p) is loaded as 16-byte vectors during the step's MMAs and stored after
// them. Math per dtype:
// fp16/bf16 wmma m16n16k16, fp32 with TF32 allowed wmma m16n16k8 tf32, exact fp32 SIMT FMA (fp32
// accumulation throughout); below sm_80 every dtype uses SIMT.
//
// NaN: every reduction and clamp here keeps NaN (nan_max, the relu as a comparison, scales that
// fall back to 1), so NaN in x, W or b reaches y, g, the loss and the gradients as in the reference.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

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

// max that keeps NaN (fmaxf(NaN, x) = x would turn NaN into a plausible number)
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }
// Bits of |v|: for non-negative floats the unsigned order is the float order, with NaN on top.
__device__ __forceinline__ unsigned abs_bits(float v) { return __float_as_uint(fabsf(v)); }

// ------------------------------------------------------------------ geometry
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 128;  // block tile: 128 output rows x 128 output columns
constexpr int kWarpsR = 2, kWarpsC = 4;
constexpr int kWarpTileR = kTile / kWarpsR;  // 64
constexpr int kWarpTileC = kTile / kWarpsC;  // 32
constexpr int kSubR = kWarpTileR / 16;       // 4 strips of 16 rows per warp
constexpr int kSubC = kWarpTileC / 16;       // 2 fragments of 16 columns per strip
constexpr int kStageLd = kWarpTileC + 4;     // per-warp 16 x 32 float staging strip, padded
static_assert(kWarpsR * kWarpsC == kWarps, "warp grid");

template <typename T>
constexpr int kVec = 16 / int(sizeof(T));  // elements per 16-byte chunk
template <typename T>
constexpr int kStepK = 4 * kVec<T>;  // reduction depth per main-loop step: 64 bytes per row
template <typename T>
constexpr bool kRangeScaled = std::is_same_v<T, __half>;  // y needs the 2^-e range scale

// A [kRows x kCols] operand tile in shared memory: row-major, rows padded by 16 bytes, filled in
// 16-byte chunks (kVec consecutive elements of one row), 2 chunks per thread.
template <typename T, int kRows, int kCols>
struct TileGeom {
  static constexpr int kLd = kCols + kVec<T>;
  static constexpr int kCpr = kCols / kVec<T>;  // chunks per row
  static constexpr int kChunks = kRows * kCpr / kThreads;
  static constexpr int kElems = kRows * kLd;
  static_assert(kChunks * kThreads == kRows * kCpr, "whole chunks per thread");
  static_assert(kCpr == 4 || (kCpr % 8 == 0 && kThreads % kCpr == 0), "chunk map");
  static_assert((kElems * int(sizeof(T))) % 128 == 0, "tiles stay 128-byte aligned");
  // This thread's chunk j: tile row and first column.
  __device__ __forceinline__ static void chunk(int j, int& row, int& col) {
    const int t = threadIdx.x;
    if constexpr (kCpr == 4) {
      // 64-byte rows: a warp takes 8 rows; quarter-warp q stores chunk q of each (80-byte pitch:
      // 8 different bank groups), while the warp reads 8 whole rows (full sectors).
      row = 8 * (t / 32 + kWarps * j) + t % 8;
      col = (t % 32) / 8 * kVec<T>;
    } else {
      // long rows: 8 consecutive threads take 8 consecutive chunks (128 contiguous bytes); the
      // column depends on t only, as the gradient loader's per-column state needs.
      const int q = t + kThreads * j;
      row = q / kCpr;
      col = q % kCpr * kVec<T>;
    }
  }
};

// The operand tiles of one GEMM and the address of element (x, kk): x = output index (row of the
// block tile for A, column for B), kk = reduction index within the step. kKInner: [128][step]
// (forward: x and W rows are contiguous along the reduction), else [step][128] (weight gradient:
// y and x rows are contiguous along the outputs).
template <typename T, bool kKInner>
struct GemmGeom {
  using Tile = std::conditional_t<kKInner, TileGeom<T, kTile, kStepK<T>>, TileGeom<T, kStepK<T>, kTile>>;
  __device__ __forceinline__ static int at(int x, int kk) {
    return kKInner ? x * Tile::kLd + kk : kk * Tile::kLd + x;
  }
};

// ------------------------------------------------------------------ per-warp MMA engines
// Each engine owns the accumulators of one warp's 64 x 32 tile and provides
//   zero(acc); mma_step(acc, As, Bs, wr, wc, lane): acc += A B^T over one reduction step;
//   stage(acc, fi, st, lane): strip fi (rows 16 fi .. 16 fi + 15, all 32 columns) row-major into
//   the warp's staging buffer st (ld kStageLd).

// Exact fp32 (and every dtype below sm_80): lane (lr, lc) = (lane / 4, lane % 4) owns rows
// lr + 8 a and columns lc + 4 b (a, b < 8). Shared reads are conflict-free in both layouts.
template <typename T, bool kKInner>
struct SimtMath {
  using G = GemmGeom<T, kKInner>;
  struct Acc {
    float v[8][8];
  };
  __device__ __forceinline__ static void zero(Acc& acc) {
#pragma unroll
    for (int a = 0; a < 8; ++a)
#pragma unroll
      for (int b = 0; b < 8; ++b) acc.v[a][b] = 0.f;
  }
  __device__ __forceinline__ static void mma_step(Acc& acc, const T* As, const T* Bs, int wr, int wc,
                                                  int lane) {
    const int lr = lane >> 2, lc = lane & 3;
#pragma unroll 4
    for (int kk = 0; kk < kStepK<T>; ++kk) {
      float a[8], b[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = to_f32(As[G::at(wr * kWarpTileR + lr + 8 * i, kk)]);
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = to_f32(Bs[G::at(wc * kWarpTileC + lc + 4 * j, kk)]);
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc.v[i][j] = fmaf(a[i], b[j], acc.v[i][j]);
    }
  }
  __device__ __forceinline__ static void stage(const Acc& acc, int fi, float* st, int lane) {
    const int lr = lane >> 2, lc = lane & 3;
#pragma unroll
    for (int da = 0; da < 2; ++da)
#pragma unroll
      for (int b = 0; b < 8; ++b) st[(lr + 8 * da) * kStageLd + lc + 4 * b] = acc.v[2 * fi + da][b];
  }
};

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
namespace wmma = nvcuda::wmma;

// Tensor cores through wmma. Fragment pointers are 32-byte aligned: 16-row/column offsets and
// kFragK-deep reduction offsets are multiples of 32 bytes in both layouts (static_asserts).
template <typename T, typename ElemT, int kFragK, bool kKInner>
struct WmmaMath {
  using G = GemmGeom<T, kKInner>;
  static constexpr int kLd = G::Tile::kLd;
  static constexpr bool kTf32 = std::is_same_v<ElemT, wmma::precision::tf32>;
  using LayoutA = std::conditional_t<kKInner, wmma::row_major, wmma::col_major>;
  using LayoutB = std::conditional_t<kKInner, wmma::col_major, wmma::row_major>;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, kFragK, ElemT, LayoutA>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, kFragK, ElemT, LayoutB>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, kFragK, float>;
  static_assert((kLd * sizeof(T)) % 16 == 0, "wmma ldm must be a multiple of 16 bytes");
  static_assert((16 * kLd * sizeof(T)) % 32 == 0 && (16 * sizeof(T)) % 32 == 0, "x offsets");
  static_assert((kFragK * sizeof(T)) % 32 == 0 && (kFragK * kLd * sizeof(T)) % 32 == 0, "k offsets");
  static_assert(kStepK<T> % kFragK == 0, "whole fragments per step");
  struct Acc {
    FragC c[kSubR][kSubC];
  };
  __device__ __forceinline__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < kSubR; ++i)
#pragma unroll
      for (int j = 0; j < kSubC; ++j) wmma::fill_fragment(acc.c[i][j], 0.f);
  }
  template <typename Frag>
  __device__ __forceinline__ static void round_tf32(Frag& f) {
    if constexpr (kTf32) {
#pragma unroll
      for (int t = 0; t < f.num_elements; ++t) f.x[t] = wmma::__float_to_tf32(f.x[t]);
    }
  }
  __device__ __forceinline__ static void mma_step(Acc& acc, const T* As, const T* Bs, int wr, int wc,
                                                  int lane) {
    (void)lane;
#pragma unroll
    for (int kk = 0; kk < kStepK<T>; kk += kFragK) {
      FragB b[kSubC];  // both B fragments, then one A fragment at a time: fewer live registers
#pragma unroll
      for (int j = 0; j < kSubC; ++j) {
        wmma::load_matrix_sync(b[j], Bs + G::at(wc * kWarpTileC + 16 * j, kk), kLd);
        round_tf32(b[j]);
      }
#pragma unroll
      for (int i = 0; i < kSubR; ++i) {
        FragA a;
        wmma::load_matrix_sync(a, As + G::at(wr * kWarpTileR + 16 * i, kk), kLd);
        round_tf32(a);
#pragma unroll
        for (int j = 0; j < kSubC; ++j) wmma::mma_sync(acc.c[i][j], a, b[j], acc.c[i][j]);
      }
    }
  }
  __device__ __forceinline__ static void stage(const Acc& acc, int fi, float* st, int lane) {
    (void)lane;
#pragma unroll
    for (int j = 0; j < kSubC; ++j)
      wmma::store_matrix_sync(st + 16 * j, acc.c[fi][j], kStageLd, wmma::mem_row_major);
  }
};
#endif

// Host code names the engine by kind; device code maps (dtype, kind) to an engine per arch, so
// sm < 80 builds fall back to SIMT (wmma bf16/tf32 need sm_80).
enum MathKind : int { kMathSimt = 0, kMathTensorCore = 1 };

template <typename T, int kKind, bool kKInner>
struct SelectMath {
  using type = SimtMath<T, kKInner>;
};
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
template <bool kKInner>
struct SelectMath<float, kMathTensorCore, kKInner> {
  using type = WmmaMath<float, wmma::precision::tf32, 8, kKInner>;
};
template <bool kKInner>
struct SelectMath<__half, kMathTensorCore, kKInner> {
  using type = WmmaMath<__half, __half, 16, kKInner>;
};
template <bool kKInner>
struct SelectMath<__nv_bfloat16, kMathTensorCore, kKInner> {
  using type = WmmaMath<__nv_bfloat16, __nv_bfloat16, 16, kKInner>;
};
#endif

// Shared memory of one GEMM block: two stages of the A and B tiles, reused after the main loop as
// the 8 per-warp staging strips plus kEpilogueBytes for the kernel's own reductions.
template <typename T, bool kKInner, int kEpilogueBytes>
struct GemmSmem {
  static constexpr int kTileBytes = GemmGeom<T, kKInner>::Tile::kElems * int(sizeof(T));
  static constexpr int kMainBytes = 4 * kTileBytes;
  static constexpr int kStagingBytes = kWarps * 16 * kStageLd * int(sizeof(float));
  static constexpr int kEpilogueOffset = kStagingBytes;
  static constexpr int kBytes = kMainBytes > kStagingBytes + kEpilogueBytes
                                    ? kMainBytes
                                    : kStagingBytes + kEpilogueBytes;
  static_assert(kStagingBytes % 128 == 0, "alignment of the epilogue area");
  static_assert(kBytes <= 48 * 1024, "static shared memory limit");
};

// ------------------------------------------------------------------ vector memory access
// Vectors move as uint2 / uint4 / float4 (plain loads and stores; __ldg for data that is read-only
// during the kernel). A vector access must be aligned to its size: the callers check at run time,
// and the CPU emulation's vector types fault on a misaligned copy.
template <typename T>
using Vec4 = std::conditional_t<sizeof(T) == 4, uint4, uint2>;  // 4 elements of T

__device__ __forceinline__ bool aligned(const void* p, unsigned bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

// v[0 .. cnt) = p[0 .. cnt) as float, the rest 0 (cnt <= 4); one vector load when it can.
template <typename T>
__device__ __forceinline__ void load4(const T* p, int cnt, float (&v)[4]) {
  if (cnt == 4 && aligned(p, sizeof(Vec4<T>))) {
    const Vec4<T> r = *reinterpret_cast<const Vec4<T>*>(p);
    T e[4];
    memcpy(e, &r, sizeof r);
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = to_f32(e[u]);
  } else {
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = u < cnt ? to_f32(p[u]) : 0.f;
  }
}

// p[0 .. cnt) = v rounded to T (cnt <= 4); one vector store when it can.
template <typename T>
__device__ __forceinline__ void store4(T* p, int cnt, const float (&v)[4]) {
  if (cnt == 4 && aligned(p, sizeof(Vec4<T>))) {
    T e[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) e[u] = from_f32<T>(v[u]);
    Vec4<T> r;
    memcpy(&r, e, sizeof r);
    *reinterpret_cast<Vec4<T>*>(p) = r;
  } else {
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (u < cnt) p[u] = from_f32<T>(v[u]);
  }
}

// ------------------------------------------------------------------ operand loaders
// A loader fills one operand tile per main-loop step: fetch(r0, dst) starts the step whose
// reduction index begins at r0 (cp.async into dst, stores, or global loads into registers);
// store(dst) writes what went through registers, after the step's MMAs gave the loads time to land.

// Rows of a matrix stacked from two row blocks with their own strides: [x_pos; x_neg], or W alone
// (bottom unused). The one place that addresses the two halves.
template <typename T>
struct Stacked {
  const T* top;
  const T* bottom;
  int64_t top_rows, top_sr, top_sc, bottom_sr, bottom_sc;
  // Start of row i and its column stride.
  __device__ __forceinline__ const T* row(int64_t i, int64_t& col_stride) const {
    col_stride = i < top_rows ? top_sc : bottom_sc;
    return i < top_rows ? top + i * top_sr : bottom + (i - top_rows) * bottom_sr;
  }
};

// A raw operand tile: tile (row, col) = matrix (row0 + row, col0 + col), 0 outside [rows, cols).
// kRedIsRow: the reduction runs along the matrix rows (row0 = r0, col0 = fixed0), else along its
// columns (row0 = fixed0, col0 = r0). async: every row has unit column stride and 16-byte aligned
// chunks, so whole chunks inside the matrix go by cp.async; the rest (strided input, the matrix
// edge) is loaded element by element and stored at once: no registers held across the MMAs.
template <typename T, class Tile, bool kRedIsRow>
struct RawLoader {
  Stacked<T> src;
  int64_t rows, cols, fixed0;
  bool async;

  __device__ __forceinline__ void fetch(int64_t r0, T* dst) {
#pragma unroll
    for (int j = 0; j < Tile::kChunks; ++j) {
      int tr, tc;
      Tile::chunk(j, tr, tc);
      const int64_t gr = (kRedIsRow ? r0 : fixed0) + tr, gc = (kRedIsRow ? fixed0 : r0) + tc;
      T* d = dst + tr * Tile::kLd + tc;
      int64_t sc;
      const T* row = src.row(gr, sc);
      if (async && gr < rows && gc + kVec<T> <= cols) {
        __pipeline_memcpy_async(d, row + gc, 16);
      } else {
        const int64_t left = gr < rows ? cols - gc : 0;  // elements of this chunk inside the matrix
        T e[kVec<T>];
#pragma unroll
        for (int u = 0; u < kVec<T>; ++u) e[u] = u < left ? row[(gc + u) * sc] : from_f32<T>(0.f);
        uint4 packed;
        memcpy(&packed, e, 16);
        *reinterpret_cast<uint4*>(d) = packed;
      }
    }
  }
  __device__ __forceinline__ void store(T*) {}
};

// The weight gradient's A operand, tile (i - r0, n - n0) = S (f_i y_in + [i < m_pos] p_n) for rows
// i < iend and columns n < n_total, else 0: dL/dz (the FF term c_i h_in = f_i y_in plus the peer
// term), times the power-of-two operand scale S. With bias_red it also sums the float32 values per
// column (grad_b) before they are rounded to the MMA type: thread t's partial sum of its column
// tc + u at bias_red[u * kThreads + t] (shared memory; consecutive threads, consecutive banks).
template <typename T, class Tile>
struct GradZLoader {
  static_assert(Tile::kCpr != 4, "per-thread columns need the long-row chunk map");
  const T* y;
  const float* f;
  const float* p_peer;  // [n_total] or nullptr
  int64_t n_total, n0, m_pos, iend;
  float s;
  bool vec;          // y rows 16-byte aligned: whole chunks by one vector load
  float* bias_red;   // [kVec][kThreads] zeroed, or nullptr
  uint4 reg[Tile::kChunks];
  int64_t r0_;

  __device__ __forceinline__ void fetch(int64_t r0, T*) {
    r0_ = r0;
#pragma unroll
    for (int j = 0; j < Tile::kChunks; ++j) {
      int tr, tc;
      Tile::chunk(j, tr, tc);
      const int64_t i = r0 + tr, nn = n0 + tc;
      if (i < iend && vec && nn + kVec<T> <= n_total) {
        reg[j] = __ldg(reinterpret_cast<const uint4*>(y + i * n_total + nn));
      } else {
        const int64_t left = i < iend ? n_total - nn : 0;
        const T* row = y + i * n_total + nn;
        T e[kVec<T>];
#pragma unroll
        for (int u = 0; u < kVec<T>; ++u) e[u] = u < left ? row[u] : from_f32<T>(0.f);
        memcpy(&reg[j], e, 16);
      }
    }
  }
  __device__ __forceinline__ void store(T* dst) {
#pragma unroll
    for (int j = 0; j < Tile::kChunks; ++j) {
      int tr, tc;
      Tile::chunk(j, tr, tc);
      const int64_t i = r0_ + tr, nn = n0 + tc;
      const bool in = i < iend;
      const float fs = in ? s * f[i] : 0.f;
      float ps[kVec<T>];  // S p_n: the peer term, positive rows only
#pragma unroll
      for (int u = 0; u < kVec<T>; u += 4) {
        const int64_t left = n_total - (nn + u);
        const int cnt = left < 4 ? (left > 0 ? int(left) : 0) : 4;
        float pv[4] = {0.f, 0.f, 0.f, 0.f};
        if (p_peer != nullptr && in && i < m_pos) load4(p_peer + nn + u, cnt, pv);
#pragma unroll
        for (int v = 0; v < 4; ++v) ps[u + v] = s * pv[v];
      }
      T e[kVec<T>];
      memcpy(e, &reg[j], 16);
#pragma unroll
      for (int u = 0; u < kVec<T>; ++u) {
        const float v = fs * to_f32(e[u]) + ps[u];
        if (bias_red != nullptr) bias_red[u * kThreads + threadIdx.x] += v;
        e[u] = from_f32<T>(v);
      }
      uint4 packed;
      memcpy(&packed, e, 16);
      *reinterpret_cast<uint4*>(dst + tr * Tile::kLd + tc) = packed;
    }
  }
};

// ------------------------------------------------------------------ the shared GEMM main loop
// acc = sum over the reduction range [rbeg, rend) of A(x, r) B(x', r) for the block's 128 x 128
// output tile. Two stages: while the warps multiply stage s, the loaders fill stage s ^ 1 (cp.async
// lands by itself; register loads are stored after the MMAs), and the one barrier at the top of a
// step both publishes the new stage and frees the one just used.
template <class Math, typename T, class LoadA, class LoadB>
__device__ __forceinline__ void gemm_mainloop(LoadA& la, LoadB& lb, int64_t rbeg, int64_t rend,
                                              typename Math::Acc& acc, T* tiles) {
  constexpr int kTileElems = Math::G::Tile::kElems;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wr = warp / kWarpsC, wc = warp % kWarpsC;
  auto a_tile = [&](int s) { return tiles + (2 * s) * kTileElems; };
  auto b_tile = [&](int s) { return tiles + (2 * s + 1) * kTileElems; };
  Math::zero(acc);
  if (rbeg < rend) {  // uniform across the block
    la.fetch(rbeg, a_tile(0));
    lb.fetch(rbeg, b_tile(0));
    __pipeline_commit();
    la.store(a_tile(0));
    lb.store(b_tile(0));
  }
  int s = 0;
  for (int64_t r0 = rbeg; r0 < rend; r0 += kStepK<T>) {
    __pipeline_wait_prior(0);  // this thread's copies into stage s have landed
    __syncthreads();           // everyone's have; and stage s ^ 1 is no longer being read
    const bool next = r0 + kStepK<T> < rend;
    if (next) {
      la.fetch(r0 + kStepK<T>, a_tile(s ^ 1));
      lb.fetch(r0 + kStepK<T>, b_tile(s ^ 1));
      __pipeline_commit();
    }
    Math::mma_step(acc, a_tile(s), b_tile(s), wr, wc, lane);
    if (next) {
      la.store(a_tile(s ^ 1));
      lb.store(b_tile(s ^ 1));
    }
    s ^= 1;
  }
  __syncthreads();  // the epilogue reuses the stages and reads what the loaders summed
}

// Walks the warp's 64 x 32 output tile one 16 x 32 strip at a time: stage it, then each lane
// visits 4 consecutive columns of 4 rows: visit(tile_row, tile_col, v[4]). 8 lanes share a row
// (lanes 8g .. 8g + 7: a row group), so the 4-element stores of a row group cover 32 consecutive
// columns. All lanes call visit (it may shuffle within the row group). Fully unrolled: the
// accumulator fragments need compile-time indices, and a rolled pass loop made ptxas spill.
template <class Math, class Visit>
__device__ __forceinline__ void for_each_output(const typename Math::Acc& acc, float* staging,
                                                Visit& visit) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wr = warp / kWarpsC, wc = warp % kWarpsC;
  float* st = staging + warp * 16 * kStageLd;
  const int rr = lane / 8, cc = lane % 8 * 4;
#pragma unroll
  for (int fi = 0; fi < kSubR; ++fi) {
    Math::stage(acc, fi, st, lane);
    __syncwarp();
#pragma unroll
    for (int pass = 0; pass < 4; ++pass) {
      const float4 q = *reinterpret_cast<const float4*>(st + (rr + 4 * pass) * kStageLd + cc);
      float v[4] = {q.x, q.y, q.z, q.w};
      visit(wr * kWarpTileR + 16 * fi + rr + 4 * pass, wc * kWarpTileC + cc, v);
    }
    __syncwarp();  // before the next stage() overwrites st
  }
}

__device__ __forceinline__ float row_group_sum(float v) {  // over the 8 lanes of a row group
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v + __shfl_xor_sync(0xffffffffu, v, 4);
}
__device__ __forceinline__ float row_group_max(float v) {
  v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, 1));
  v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, 2));
  return nan_max(v, __shfl_xor_sync(0xffffffffu, v, 4));
}

// fp16 holds magnitudes up to 65504, while h can exceed that where the float32 reference is fine
// (x ~ U(0, 255), say). The forward stores h 2^-e, e per row and 32-column group, chosen so that
// the group's largest |h| lands in [2^14, 2^15); the finalise multiplies 2^e back. 0 for a group
// that is all zero, or holds NaN or inf (stored as they are).
__device__ __forceinline__ int range_exponent(float mx) {
  if (!(mx > 0.f) || !isfinite(mx)) return 0;
  int e;
  frexpf(mx, &e);  // mx = fr 2^e, fr in [0.5, 1)
  return max(-100, min(100, e - 15));
}

// ------------------------------------------------------------------ kernel 1: forward GEMM
struct ForwardParams {
  const void* x_pos;
  const void* x_neg;
  int64_t m_pos, m, n, k;
  int64_t sxp_r, sxp_c, sxn_r, sxn_c;
  int x_async;  // x rows (both halves) cp.async-able: unit column stride, 16-byte aligned
  const void* w;
  int64_t sw_r, sw_c;
  int w_async;
  const void* bias;  // nullptr: no bias
  int64_t sb;
  void* y;        // [m, n] contiguous, input dtype
  float* q;       // [m], zeroed
  int8_t* exps;   // [m, ceil(n / 32)] range exponents (fp16), else nullptr
  float* hsum;    // [n], zeroed: peer norm's column sums of the positive rows, else nullptr
  unsigned char* nonfinite;  // step modes: the flag, set to 1 when some z_ij is NaN/inf; else nullptr
};

// Math: z_ij = sum_k x_ik W_jk + b_j, h = relu(z); y_ij := h_ij (2^-e_ig for fp16), q_i += sum_j
// h_ij^2, hsum_j += sum_{i < m_pos} h_ij (fp32, from the unrounded h); the flag when some z_ij is
// not finite (before the ReLU: it would turn z = -inf into a plausible 0).
// Grid: x = row tiles of M, y = column tiles of N. Both GEMM kernels fit 128 registers, so two
// blocks (16 warps) share an SM.
template <typename T, int kKind>
__global__ void __launch_bounds__(kThreads, 2) ff_forward_kernel(ForwardParams p) {
  using Math = typename SelectMath<T, kKind, true>::type;
  using Tile = typename Math::G::Tile;
  using L = GemmSmem<T, true, kWarpsC * kTile * int(sizeof(float))>;
  __shared__ __align__(128) unsigned char smem[L::kBytes];
  float* staging = reinterpret_cast<float*>(smem);
  float* rowsum = reinterpret_cast<float*>(smem + L::kEpilogueOffset);  // [kWarpsC][kTile]

  const int64_t row0 = int64_t(blockIdx.x) * kTile, col0 = int64_t(blockIdx.y) * kTile;
  const Stacked<T> xs{static_cast<const T*>(p.x_pos), static_cast<const T*>(p.x_neg), p.m_pos,
                      p.sxp_r, p.sxp_c, p.sxn_r, p.sxn_c};
  const Stacked<T> ws{static_cast<const T*>(p.w), nullptr, p.n, p.sw_r, p.sw_c, 0, 0};
  RawLoader<T, Tile, false> la{xs, p.m, p.k, row0, p.x_async != 0};
  RawLoader<T, Tile, false> lb{ws, p.n, p.k, col0, p.w_async != 0};
  typename Math::Acc acc;
  gemm_mainloop<Math>(la, lb, 0, p.k, acc, reinterpret_cast<T*>(smem));

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wc = warp % kWarpsC;
  const int64_t j0 = col0 + wc * kWarpTileC + lane % 8 * 4;  // this lane's 4 columns, fixed
  const int cnt = int(p.n - j0 < 4 ? (p.n - j0 > 0 ? p.n - j0 : 0) : 4);
  float bias[4];
#pragma unroll
  for (int u = 0; u < 4; ++u)
    bias[u] = (p.bias != nullptr && u < cnt) ? to_f32(static_cast<const T*>(p.bias)[(j0 + u) * p.sb]) : 0.f;
  const int64_t groups = (p.n + 31) / 32, group = (col0 + wc * kWarpTileC) / 32;
  const bool peer = p.hsum != nullptr && row0 < p.m_pos;  // uniform across the block
  float colsum[4] = {0.f, 0.f, 0.f, 0.f};
  bool nonfinite = false;  // this thread saw a NaN/inf z_ij
  T* y = static_cast<T*>(p.y);

  auto visit = [&](int tr, int tc, const float (&v)[4]) {
    (void)tc;
    const int64_t i = row0 + tr;
    const bool row_ok = i < p.m;
    float h[4], sq = 0.f, mx = 0.f;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float z = v[u] + bias[u];
      const bool in = row_ok && u < cnt;
      h[u] = in ? (z < 0.f ? 0.f : z) : 0.f;  // relu as a comparison: NaN stays
      nonfinite |= in && !isfinite(z);
      sq += h[u] * h[u];
      mx = nan_max(mx, h[u]);
    }
    sq = row_group_sum(sq);
    int e = 0;
    if constexpr (kRangeScaled<T>) e = range_exponent(row_group_max(mx));
    if (row_ok && cnt > 0) {
      const float scale = kRangeScaled<T> ? ldexpf(1.f, -e) : 1.f;
      float o[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) o[u] = h[u] * scale;
      store4(y + i * p.n + j0, cnt, o);
    }
    if (lane % 8 == 0) {
      rowsum[wc * kTile + tr] = sq;
      if (kRangeScaled<T> && p.exps != nullptr && row_ok && group < groups)
        p.exps[i * groups + group] = int8_t(e);
    }
    if (peer && i < p.m_pos) {
#pragma unroll
      for (int u = 0; u < 4; ++u) colsum[u] += h[u];
    }
  };
  for_each_output<Math>(acc, staging, visit);
  if (nonfinite && p.nonfinite != nullptr) *p.nonfinite = 1;  // the same value from every writer

  if (peer) {  // lanes l, l ^ 8, l ^ 16, l ^ 24 hold the same 4 columns
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      colsum[u] += __shfl_xor_sync(0xffffffffu, colsum[u], 8);
      colsum[u] += __shfl_xor_sync(0xffffffffu, colsum[u], 16);
      if (lane < 8 && u < cnt) atomicAdd(p.hsum + j0 + u, colsum[u]);
    }
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
  return fmaxf(t, 0.f) + log1pf(expf(-fabsf(t)));    // NaN: the log1pf term is NaN
}
__device__ __forceinline__ float sigmoid(float t) {  // no overflow for either sign; NaN -> NaN
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

// One warp per row: g_i; y_i := h_i / den_i in place (times 2^e back for fp16); f_i = c_i den_i
// (the weight gradient's per-row factor on y). Step modes: the loss (terms already divided by M;
// block sum, one atomicAdd into the workspace's loss_sum), the bound max_i |f_i| max_j |y_ij| of the
// gradient operand (atomicMax on the bits) and the non-finite flag for a NaN/inf q_i.
template <typename T>
__global__ void __launch_bounds__(kThreads) ff_finalize_kernel(RowParams p, const float* q,
                                                               const int8_t* exps, T* y, float* g,
                                                               float* f, float* loss_sum,
                                                               unsigned int* fy_bound_bits,
                                                               unsigned char* nonfinite) {
  __shared__ float red_loss[kWarps];
  __shared__ unsigned int red_bound[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = int64_t(blockIdx.x) * kWarps + warp;
  const bool step = f != nullptr;  // uniform over the grid
  float lterm = 0.f;
  unsigned int bound_bits = 0u;
  if (i < p.m) {  // uniform within the warp
    float qp = 0.f;
    if (p.loss == 1) qp = q[i < p.m_pos ? i + p.m_pos : i - p.m_pos];
    const float qi = q[i];
    const RowResult r = ff_row_math(i, qi, qp, p);
    const float fi = r.coef * r.den;
    if (lane == 0) {
      g[i] = r.g;
      if (step) f[i] = fi;
      if (step && !isfinite(qi)) *nonfinite = 1;
    }
    lterm = r.loss_term;
    const bool rescale = p.norm != 2 || exps != nullptr;
    if (rescale || step) {
      const float inv_den = p.norm != 2 ? 1.f / r.den : 1.f;
      const int64_t groups = (p.n + 31) / 32;
      T* row = y + i * p.n;
      float ymax = 0.f;
      for (int64_t j = 4 * lane; j < p.n; j += 128) {
        const int cnt = int(p.n - j < 4 ? p.n - j : 4);
        float v[4];
        load4(row + j, cnt, v);
        if (rescale) {
          const float s = exps != nullptr ? ldexpf(inv_den, exps[i * groups + j / 32]) : inv_den;
#pragma unroll
          for (int u = 0; u < 4; ++u) v[u] *= s;
          store4(row + j, cnt, v);
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) ymax = nan_max(ymax, fabsf(v[u]));
      }
      if (step) {
        for (int o = 16; o > 0; o >>= 1) ymax = nan_max(ymax, __shfl_xor_sync(0xffffffffu, ymax, o));
        bound_bits = abs_bits(fabsf(fi) * ymax);
      }
    }
  }
  if (!step) return;  // forward mode (uniform over the grid)
  // all lanes of a warp hold the same row values: lane 0 speaks for the warp
  if (lane == 0) {
    red_loss[warp] = lterm;
    red_bound[warp] = bound_bits;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    unsigned int mx = 0u;
    for (int w = 0; w < kWarps; ++w) {
      s += red_loss[w];
      mx = max(mx, red_bound[w]);
    }
    atomicAdd(loss_sum, s);
    atomicMax(fy_bound_bits, mx);
  }
}

// ------------------------------------------------------------------ kernel 3: peer normalisation
struct PeerParams {
  float* mean;        // [n] running mean, updated in place
  const float* hsum;  // [n] column sums of the positive rows' h
  float* p;           // [n] out: kappa (m_j - mean m)
  unsigned int* p_bound_bits;  // out: max_j |p_j| (bits)
  const unsigned char* skip;   // the non-finite flag when the step skips such batches, else nullptr
  int64_t n, m_pos;
  float rho, kappa;
};

// One block: m_j := rho m_j + (1 - rho) hsum_j / B+ (the reference's order), then the mean of m
// over the units, then p_j and its bound. Every unit gets p_j, dead or alive. A skipped step
// (flag set) keeps m as it was and takes p from it, as the reference does.
__global__ void __launch_bounds__(kThreads) ff_peer_kernel(PeerParams p) {
  __shared__ float red_sum[kWarps];
  __shared__ unsigned int red_max[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool keep = p.skip != nullptr && *p.skip != 0;  // uniform over the block
  float part = 0.f;
  for (int64_t j = threadIdx.x; j < p.n; j += kThreads) {
    float m = p.mean[j];
    if (!keep) {
      m = m * p.rho + (1.f - p.rho) * (p.hsum[j] / float(p.m_pos));
      p.mean[j] = m;
    }
    part += m;
  }
  for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
  if (lane == 0) red_sum[warp] = part;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kWarps; ++w) total += red_sum[w];
  const float mean_m = total / float(p.n);
  unsigned int mx = 0u;
  for (int64_t j = threadIdx.x; j < p.n; j += kThreads) {  // the same j as above: own writes
    const float pj = p.kappa * (p.mean[j] - mean_m);
    p.p[j] = pj;
    mx = max(mx, abs_bits(pj));
  }
  for (int o = 16; o > 0; o >>= 1) mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (lane == 0) red_max[warp] = mx;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) mx = max(mx, red_max[w]);
    *p.p_bound_bits = mx;
  }
}

// ------------------------------------------------------------------ the end of the gradient path
// What happens to finished gradient entries: gradient mode writes them in the weight dtype; update
// mode applies SGDUpdate.coefficients()'s rule in float32, in place:
//   d = grad + wd_grad p;  with a buffer: buf = keep buf + gain d, d = buf;  p -= lr (d + wd_step p)
// finish4 is the one copy of that rule: the layer step's epilogue, its split finish and
// ff_sgd_update all go through it. An update whose skip byte is non-zero writes nothing (checked
// once per block by the kernels: see skipped()).
struct FinishParams {
  int update;
  void* grad_w;  // gradient mode: [n * k], [n] in the weight dtype, contiguous
  void* grad_b;
  void* w;  // update mode: contiguous [n * k], [n]
  void* b;
  void* buf_w;  // momentum buffers, or nullptr (no buffer)
  void* buf_b;
  int buf_w_f32, buf_b_f32;  // 1: float32 buffer, 0: weight dtype
  float lr, keep, gain, wd_grad, wd_step;
  const unsigned char* skip;  // update mode: a device byte, non-zero = change nothing; or nullptr
};

// An update to leave out: update mode with a set skip byte (uniform over the grid).
__device__ __forceinline__ bool skipped(const FinishParams& p) {
  return p.update && p.skip != nullptr && *p.skip != 0;
}

// Entries [j, j + cnt) of the weight (flat) or the bias, cnt <= 4, gradients grad[0 .. cnt).
template <typename T>
__device__ __forceinline__ void finish4(const FinishParams& p, bool is_bias, int64_t j, int cnt,
                                        const float (&grad)[4]) {
  if (!p.update) {
    store4(static_cast<T*>(is_bias ? p.grad_b : p.grad_w) + j, cnt, grad);
    return;
  }
  T* param = static_cast<T*>(is_bias ? p.b : p.w) + j;
  void* buf = is_bias ? p.buf_b : p.buf_w;
  const bool buf_f32 = (is_bias ? p.buf_b_f32 : p.buf_w_f32) != 0;
  float w[4], d[4];
  load4(param, cnt, w);
#pragma unroll
  for (int u = 0; u < 4; ++u) d[u] = p.wd_grad != 0.f ? grad[u] + p.wd_grad * w[u] : grad[u];
  if (buf != nullptr) {
    float b[4];
    if (buf_f32)
      load4(static_cast<float*>(buf) + j, cnt, b);
    else
      load4(static_cast<T*>(buf) + j, cnt, b);
#pragma unroll
    for (int u = 0; u < 4; ++u) d[u] = p.keep * b[u] + p.gain * d[u];
    if (buf_f32)
      store4(static_cast<float*>(buf) + j, cnt, d);
    else
      store4(static_cast<T*>(buf) + j, cnt, d);
  }
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    if (p.wd_step != 0.f) d[u] += p.wd_step * w[u];
    w[u] -= p.lr * d[u];
  }
  store4(param, cnt, w);
}

// ------------------------------------------------------------------ kernel 4: weight gradient
struct WgradParams {
  const void* x_pos;
  const void* x_neg;
  int64_t m_pos, m, n, k;
  int64_t sxp_r, sxp_c, sxn_r, sxn_c;
  int x_async;
  const void* y;  // [m, n] contiguous, normalised
  int y_vec;      // y rows 16-byte aligned
  const float* f;  // [m] per-row factor
  const float* p_peer;  // [n] peer term p, or nullptr
  const unsigned int* bounds;  // [2]: bits of max |f_i y_ij| and of max |p_j|
  const unsigned char* nonfinite;  // the flag (complete: kernels 1 and 2 have run)
  const float* loss_sum;           // the loss (complete: kernel 2 has run)
  float* loss_out;                 // [] float32: loss_sum, or NaN when the flag is set
  unsigned char* nonfinite_out;    // [] bool: the flag
  int bias_grad;  // the layer has a bias
  int64_t chunk;  // rows per batch chunk (multiple of the step)
  int split;      // several chunks: add into gw, gb (zeroed scratch); else finish in place
  float* gw;      // [n, k]
  float* gb;      // [n]
  FinishParams fin;
};

// Power-of-two scale S of the gradient operand S (f y + p): |f_i y_ij| + |p_j| <= the bound, and S
// puts the bound in [2^13, 2^14), so fp16 holds every operand (max 65504) with room for its
// rounding; bf16/tf32 are unaffected. 1/S is applied exactly in the epilogue. S = 1 when the bound
// is 0 or not finite (NaN then reaches the gradients unscaled).
__device__ __forceinline__ void operand_scale(const unsigned int* bounds, float& s, float& inv_s) {
  const float b = __uint_as_float(bounds[0]) + __uint_as_float(bounds[1]);
  s = 1.f;
  inv_s = 1.f;
  if (b > 0.f && isfinite(b)) {
    int e;
    frexpf(b, &e);  // b = fr 2^e, fr in [0.5, 1)
    e = max(-100, min(100, 14 - e));
    s = ldexpf(1.f, e);
    inv_s = ldexpf(1.f, -e);
  }
}

// Math: grad_W[n, k] = sum_i G_in x_ik = (1/S) sum_i (S G_in) x_ik, a GEMM whose reduction runs over
// the rows i of this block's batch chunk [z chunk, (z + 1) chunk); grad_b[n] = (1/S) sum_i S G_in,
// summed in fp32 by the blocks of the first K tile from the same operand values.
// Grid: x = column tiles of K, y = row tiles of N, z = batch chunks.
template <typename T, int kKind>
__global__ void __launch_bounds__(kThreads, 2) ff_wgrad_kernel(WgradParams p) {
  using Math = typename SelectMath<T, kKind, false>::type;
  using Tile = typename Math::G::Tile;
  using L = GemmSmem<T, false, 0>;
  __shared__ __align__(128) unsigned char smem[L::kBytes];
  __shared__ float bias_red[kVec<T> * kThreads];  // grad_b partial sums, see GradZLoader
  float* staging = reinterpret_cast<float*>(smem);

  if ((blockIdx.x | blockIdx.y | blockIdx.z) == 0 && threadIdx.x == 0) {
    const bool bad = *p.nonfinite != 0;
    *p.nonfinite_out = bad ? 1 : 0;
    *p.loss_out = bad ? __uint_as_float(0x7fc00000u) : *p.loss_sum;  // a NaN/inf input: NaN loss
  }
  if (skipped(p.fin)) return;  // nothing to write: the whole grid leaves

  const int64_t k0 = int64_t(blockIdx.x) * kTile, n0 = int64_t(blockIdx.y) * kTile;
  const int64_t ibeg = int64_t(blockIdx.z) * p.chunk;
  const int64_t iend = ibeg + p.chunk < p.m ? ibeg + p.chunk : p.m;
  float s, inv_s;
  operand_scale(p.bounds, s, inv_s);
  const bool bias_on = p.bias_grad != 0 && blockIdx.x == 0;  // uniform across the block

  if (bias_on) {
#pragma unroll
    for (int u = 0; u < kVec<T>; ++u) bias_red[u * kThreads + threadIdx.x] = 0.f;  // own slots
  }
  GradZLoader<T, Tile> la{static_cast<const T*>(p.y), p.f, p.p_peer, p.n, n0, p.m_pos, iend, s,
                          p.y_vec != 0, bias_on ? bias_red : nullptr, {}, 0};
  const Stacked<T> xs{static_cast<const T*>(p.x_pos), static_cast<const T*>(p.x_neg), p.m_pos,
                      p.sxp_r, p.sxp_c, p.sxn_r, p.sxn_c};
  RawLoader<T, Tile, true> lb{xs, iend, p.k, k0, p.x_async != 0};
  typename Math::Acc acc;
  gemm_mainloop<Math>(la, lb, ibeg, iend, acc, reinterpret_cast<T*>(smem));

  if (bias_on) {  // column sums: threads t = c + kCpr w (any w) hold the partials of chunk c
    if (threadIdx.x < kTile / 4) {
      const int c0 = 4 * threadIdx.x;
      const int64_t jn = n0 + c0;
      if (jn < p.n) {
        float gsum[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int c = c0 + u, chunk = c / kVec<T>;
          float t = 0.f;
          for (int w = 0; w < kThreads / Tile::kCpr; ++w)
            t += bias_red[(c % kVec<T>) * kThreads + chunk + Tile::kCpr * w];
          gsum[u] = t * inv_s;
        }
        const int cnt = int(p.n - jn < 4 ? p.n - jn : 4);
        if (p.split) {
#pragma unroll
          for (int u = 0; u < 4; ++u)
            if (u < cnt) atomicAdd(p.gb + jn + u, gsum[u]);
        } else {
          finish4<T>(p.fin, true, jn, cnt, gsum);
        }
      }
    }
  }

  auto visit = [&](int tr, int tc, const float (&v)[4]) {
    const int64_t jn = n0 + tr, jk = k0 + tc;
    if (jn >= p.n || jk >= p.k) return;
    const int cnt = int(p.k - jk < 4 ? p.k - jk : 4);
    float g[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) g[u] = v[u] * inv_s;
    if (p.split) {
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (u < cnt) atomicAdd(p.gw + jn * p.k + jk + u, g[u]);
    } else {
      finish4<T>(p.fin, false, jn * p.k + jk, cnt, g);
    }
  };
  for_each_output<Math>(acc, staging, visit);
}

// ------------------------------------------------------------------ kernel 5: finish from memory
// The split path's finish from the float32 scratch (gw [nk], gb [n]), and ff_sgd_update: the SGD
// rule on a given gradient gw in the weight dtype (gb nullptr).
struct ApplyParams {
  const void* gw;  // [nk]: float32 (gw_f32) or the weight dtype
  const float* gb;  // [n] float32, or nullptr
  int gw_f32;
  int64_t nk, n;
  FinishParams fin;
};

// Groups of 4 entries of the weight (flat), then of the bias, grid-stride (64-bit index).
template <typename T>
__global__ void __launch_bounds__(kThreads) ff_apply_kernel(ApplyParams p) {
  if (skipped(p.fin)) return;
  const int64_t wgroups = (p.nk + 3) / 4;
  const int64_t total = wgroups + (p.gb != nullptr ? (p.n + 3) / 4 : 0);
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < total;
       g += int64_t(gridDim.x) * blockDim.x) {
    const bool is_bias = g >= wgroups;
    const int64_t j = 4 * (is_bias ? g - wgroups : g);
    const int64_t size = is_bias ? p.n : p.nk;
    const int cnt = int(size - j < 4 ? size - j : 4);
    float v[4];
    if (is_bias)
      load4(p.gb + j, cnt, v);
    else if (p.gw_f32)
      load4(static_cast<const float*>(p.gw) + j, cnt, v);
    else
      load4(static_cast<const T*>(p.gw) + j, cnt, v);
    finish4<T>(p.fin, is_bias, j, cnt, v);
  }
}

}  // namespace ffl
}  // namespace ff_kernels
