// Semantic model of nvcuda::wmma (CPU emulation, see tests/cuda_emu/README.md).
//
// Every lane holds the whole tile, as float (fp16/bf16 operands are converted exactly on load; the
// real per-lane element mapping is unspecified, and csrc only uses fragments through the
// collective ops and element-wise loops over num_elements). Checked, as a fault that fails the
// launch:
//   - load/store pointers 256-bit (32-byte) aligned and ldm a multiple of 16 bytes (the documented
//     rules; the hardware gives garbage or a misaligned-address error otherwise);
//   - tf32 MMAs: every operand element has been rounded with __float_to_tf32 (the documented
//     requirement; the hardware would silently drop the low mantissa bits).
// Numerics: operands exact (fp16/bf16 values, tf32-rounded floats), each product rounded to fp32
// and added to the fp32 accumulator in k order. Real tensor cores differ in the order and rounding
// of the internal additions; the tolerances against the float64 reference cover that.
// store_matrix_sync is written by lane 0 only, so a missing __syncwarp before other lanes read the
// staged tile shows up as stale data (the scheduler runs lanes in both orders, see emu_core.h).
#pragma once

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "emu_core.h"

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

// The memory element type each fragment type loads from; fragments store float.
template <typename T>
struct memory {
  using type = T;
};
template <>
struct memory<precision::tf32> {
  using type = float;
};
inline float to_float(float v) { return v; }
inline float to_float(__half v) { return float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Use, int M, int N, int K>
struct dims;
template <int M, int N, int K>
struct dims<matrix_a, M, N, K> {
  static constexpr int r = M, c = K;
};
template <int M, int N, int K>
struct dims<matrix_b, M, N, K> {
  static constexpr int r = K, c = N;
};
template <int M, int N, int K>
struct dims<accumulator, M, N, K> {
  static constexpr int r = M, c = N;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using D = dims<Use, M, N, K>;
  static constexpr int rows = D::r, cols = D::c, num_elements = D::r * D::c;
  float x[num_elements];  // x[i * cols + j] = element (i, j)
};

inline void check_ptr(const char* op, const void* p, unsigned ldm, size_t elem) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    ff_emu::fault("wmma::%s: pointer %p not 256-bit aligned", op, p);
  if ((ldm * elem) % 16 != 0)
    ff_emu::fault("wmma::%s: ldm %u not a multiple of 16 bytes", op, ldm);
}

template <typename Use, int M, int N, int K, typename T, typename L, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  static_assert(std::is_same_v<typename memory<T>::type, P>, "pointer type");
  static_assert(std::is_same_v<L, row_major> || std::is_same_v<L, col_major>, "operand layout");
  check_ptr("load_matrix_sync", p, ldm, sizeof(P));
  for (int i = 0; i < f.rows; ++i)
    for (int j = 0; j < f.cols; ++j)
      f.x[i * f.cols + j] =
          to_float(std::is_same_v<L, row_major> ? p[size_t(i) * ldm + j] : p[i + size_t(j) * ldm]);
}

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to a 10-bit mantissa (low 13 bits 0).
inline float __float_to_tf32(float v) {
  if (!std::isfinite(v)) return v;
  unsigned u = __float_as_uint(v);
  u = (u + 0x1000u) & ~0x1fffu;
  return __uint_as_float(u);
}

template <int kN>
inline void check_tf32(const float (&x)[kN]) {
  for (float f : x)
    if ((__float_as_uint(f) & 0x1fffu) != 0 && std::isfinite(f)) {
      ff_emu::fault("wmma::mma_sync: tf32 operand %a not rounded with __float_to_tf32", double(f));
      return;
    }
}

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  if constexpr (std::is_same_v<T, precision::tf32>) {
    check_tf32(a.x);
    check_tf32(b.x);
  }
  // The warp's other lanes reuse the first lane's product of identical inputs (emu_core.h).
  constexpr int kIn = M * K + K * N + M * N;
  static_assert(kIn <= ff_emu::BlockRunner::MmaMemo::kMaxIn && M * N <= ff_emu::BlockRunner::MmaMemo::kMaxOut);
  float in[kIn];
  std::memcpy(in, a.x, sizeof a.x);
  std::memcpy(in + M * K, b.x, sizeof b.x);
  std::memcpy(in + M * K + K * N, c.x, sizeof c.x);
  ff_emu::BlockRunner::MmaMemo& memo = ff_emu::BlockRunner::current().mma_slot();
  if (memo.n_in == kIn && std::memcmp(memo.in, in, sizeof in) == 0) {
    std::memcpy(d.x, memo.out, sizeof d.x);
    return;
  }
  float out[M * N];
  for (int i = 0; i < M; ++i) {
    float* o = out + i * N;
    for (int j = 0; j < N; ++j) o[j] = c.x[i * N + j];
    for (int k = 0; k < K; ++k) {  // each element's sum runs in k order
      const float av = a.x[i * K + k];
      for (int j = 0; j < N; ++j) o[j] += av * b.x[k * N + j];
    }
  }
  std::memcpy(d.x, out, sizeof(out));  // d may alias c
  memo.n_in = kIn;
  std::memcpy(memo.in, in, sizeof in);
  std::memcpy(memo.out, out, sizeof out);
}

template <int M, int N, int K>
void fill_fragment(fragment<accumulator, M, N, K, float>& f, float v) {
  for (auto& e : f.x) e = v;
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                       layout_t l) {
  check_ptr("store_matrix_sync", p, ldm, sizeof(float));
  if (threadIdx.x % 32 != 0) return;  // one lane writes: a missing __syncwarp shows as stale data
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j)
      (l == mem_row_major ? p[size_t(i) * ldm + j] : p[i + size_t(j) * ldm]) = f.x[i * N + j];
}
}  // namespace wmma
}  // namespace nvcuda
