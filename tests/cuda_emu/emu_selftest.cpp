// CPU emulation (tests/cuda_emu): small kernels that check the emulator's own promises (README.md:
// "What it models"), launched through csrc/launch.h's FF_LAUNCH like the real ones. Run from
// tests/test_cuda_emulated.py through ctypes: ff_emu_selftest(name, out, n, msg, msg_len) runs one
// case on host memory `out` (n ints) and returns the launch's cudaError_t (message in msg).
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "launch.h"

namespace {

using namespace nvcuda;

// Lanes 0-15 of every warp wait at __syncwarp, the others at __syncthreads: no barrier completes.
__global__ void divergent_barriers(int* out) {
  if (threadIdx.x % 32 < 16)
    __syncwarp();
  else
    __syncthreads();
  out[threadIdx.x] = 1;
}

// Threads >= 32 return at once; the first warp's barrier must still complete without them.
__global__ void barrier_after_early_return(int* out) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Thread 0 writes a shared value the others read, with or without the barrier in between. Without
// it, the block run in decreasing thread order (odd blocks) reads the stale value.
template <bool kSync>
__global__ void shared_handover(int* out) {
  __shared__ int v;
  if (threadIdx.x == 0) v = int(blockIdx.x) + 100;
  if (kSync) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

__global__ void shuffle_xor(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 5);
}

// Every block of a large grid adds 1 to out[0]: blocks run concurrently on the workers.
__global__ void atomic_count(int* out) {
  if (threadIdx.x == 0) atomicAdd(reinterpret_cast<float*>(out), 1.f);
}

__global__ void wmma_misaligned(int* out) {
  __shared__ __align__(32) __half tile[16 * 16 + 8];
  for (int i = int(threadIdx.x); i < 16 * 16 + 8; i += int(blockDim.x)) tile[i] = __float2half_rn(1.f);
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::load_matrix_sync(a, tile + 1, 16);  // 2 bytes off the required 32-byte alignment
  out[threadIdx.x] = 1;
}

__global__ void tf32_unrounded(int* out) {
  __shared__ __align__(32) float tile[16 * 8];
  for (int i = int(threadIdx.x); i < 16 * 8; i += int(blockDim.x)) tile[i] = 1.f + 1.f / 3.f;
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> c;
  wmma::load_matrix_sync(a, tile, 8);
  wmma::load_matrix_sync(b, tile, 8);  // no __float_to_tf32 on either
  wmma::fill_fragment(c, 0.f);
  wmma::mma_sync(c, a, b, c);
  out[threadIdx.x] = 1;
}

// 64 threads: each copies its 16 bytes of out (odd threads: the last 8 zero-filled) into shared
// memory by cp.async, then reads its neighbour's chunk after the barrier. With the wait the copies
// have landed; without it the neighbour's chunk is still the -1 written before.
template <bool kWait>
__global__ void async_copy(int* out) {
  __shared__ __align__(16) int tile[64 * 4];
  const int t = int(threadIdx.x);
  for (int u = 0; u < 4; ++u) tile[4 * t + u] = -1;
  __syncthreads();
  __pipeline_memcpy_async(tile + 4 * t, out + 4 * t, 16, t % 2 == 1 ? 8 : 0);
  __pipeline_commit();
  if (kWait) __pipeline_wait_prior(0);
  __syncthreads();
  int v[4];
  for (int u = 0; u < 4; ++u) v[u] = tile[4 * ((t + 1) % 64) + u];
  __syncthreads();
  for (int u = 0; u < 4; ++u) out[4 * t + u] = v[u];
}

// 32 threads, two commit groups; __pipeline_wait_prior(1) completes the first only:
// out[256 + t] = out[4 t] (landed), out[288 + t] = -1 (still in flight).
__global__ void async_groups(int* out) {
  __shared__ __align__(16) int a[32 * 4], b[32 * 4];
  const int t = int(threadIdx.x);
  for (int u = 0; u < 4; ++u) a[4 * t + u] = b[4 * t + u] = -1;
  __pipeline_memcpy_async(a + 4 * t, out + 4 * t, 16);
  __pipeline_commit();
  __pipeline_memcpy_async(b + 4 * t, out + 128 + 4 * t, 16);
  __pipeline_commit();
  __pipeline_wait_prior(1);
  out[256 + t] = a[4 * t];
  out[288 + t] = b[4 * t];
}

__global__ void async_misaligned(int* out) {
  __shared__ __align__(16) int tile[4];
  __pipeline_memcpy_async(tile, out + 1, 16);  // 4 bytes off the 16-byte alignment
  __pipeline_commit();
  __pipeline_wait_prior(0);
}

__global__ void vector_misaligned(int* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(out + 2);  // 8 bytes off
  out[threadIdx.x] = int(v.x);
}

cudaError_t run(const std::string& name, int* out, int n) {
  cudaGetLastError();
  const cudaStream_t s = nullptr;
  if (name == "divergent_barriers") {
    FF_LAUNCH(1, 64, s, divergent_barriers)(out);
  } else if (name == "barrier_after_early_return") {
    FF_LAUNCH(1, 256, s, barrier_after_early_return)(out);
  } else if (name == "shared_handover_unsynced") {
    FF_LAUNCH(unsigned(n / 64), 64, s, shared_handover<false>)(out);
  } else if (name == "shared_handover_synced") {
    FF_LAUNCH(unsigned(n / 64), 64, s, shared_handover<true>)(out);
  } else if (name == "shuffle_xor") {
    FF_LAUNCH(1, 64, s, shuffle_xor)(out);
  } else if (name == "atomic_count") {
    FF_LAUNCH(dim3(10, 10, 3), 32, s, atomic_count)(out);
  } else if (name == "wmma_misaligned") {
    FF_LAUNCH(1, 32, s, wmma_misaligned)(out);
  } else if (name == "tf32_unrounded") {
    FF_LAUNCH(1, 32, s, tf32_unrounded)(out);
  } else if (name == "async_copy_waited") {
    FF_LAUNCH(1, 64, s, async_copy<true>)(out);
  } else if (name == "async_copy_unwaited") {
    FF_LAUNCH(1, 64, s, async_copy<false>)(out);
  } else if (name == "async_groups") {
    FF_LAUNCH(1, 32, s, async_groups)(out);
  } else if (name == "async_misaligned") {
    FF_LAUNCH(1, 32, s, async_misaligned)(out);
  } else if (name == "vector_misaligned") {
    FF_LAUNCH(1, 32, s, vector_misaligned)(out);
  } else if (name == "block_too_large") {
    FF_LAUNCH(1, 1056, s, shuffle_xor)(out);
  } else if (name == "grid_y_too_large") {
    FF_LAUNCH(dim3(1, 65536, 1), 32, s, shuffle_xor)(out);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int ff_emu_selftest(const char* name, int* out,
                                                                      int n, char* msg, int msg_len) {
  const cudaError_t err = run(name, out, n);
  if (msg_len > 0) {
    const std::string m = err == cudaSuccess ? "" : std::string(cudaGetErrorName(err)) + ": " +
                                                        cudaGetErrorString(err);
    std::strncpy(msg, m.c_str(), size_t(msg_len - 1));
    msg[msg_len - 1] = '\0';
  }
  return int(err);
}
