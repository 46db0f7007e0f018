// CPU emulation of the CUDA features the csrc kernels use: a test harness, never shipped.
// See tests/cuda_emu/README.md for what is modelled and, more importantly, what is not.
//
// The kernel sources are compiled unmodified as host C++20 by g++ with this directory first on the
// include path (it shadows cuda_runtime.h, cuda_fp16.h, cuda_bf16.h and mma.h) and
// FF_KERNELS_CPU_EMULATION defined, which turns csrc/launch.h's FF_LAUNCH into ff_emu::launch.
//
// Execution model. A launch hands the grid's blocks to a few OS worker threads (FF_EMU_WORKERS,
// default: the number of cores); blocks run concurrently across workers, one block at a time per
// worker. Inside a block every CUDA thread is a fiber with its own stack, all on the worker's OS
// thread, scheduled cooperatively: a fiber runs until it reaches a barrier (__syncthreads,
// __syncwarp, a shuffle) or returns; the scheduler then resumes the next runnable fiber. On x86-64
// a fiber switch is a few instructions (ff_emu_switch in emu_runtime.cpp: callee-saved registers
// and the stack pointer); elsewhere, or under AddressSanitizer (which understands swapcontext
// only), it is ucontext's swapcontext, which costs a signal-mask system call (~0.5 us) per switch.
// Fibers run in increasing thread order in even blocks and decreasing order in odd blocks, so a
// read that lacks a barrier after another thread's write sees the stale value in one of the two
// orders. If every remaining fiber waits and none can proceed (a barrier inside divergent
// code), the launch fails with a message naming the barriers instead of hanging.
#pragma once

#include <ucontext.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef FF_KERNELS_CPU_EMULATION
#error "tests/cuda_emu headers are for the CPU emulation build only (define FF_KERNELS_CPU_EMULATION)"
#endif

// ------------------------------------------------------------------ CUDA keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Per worker OS thread, i.e. per running block (all fibers of a block share it). Zero-initialised
// once per worker and NOT re-poisoned between the blocks it runs (README: what is not modelled).
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))
#ifndef CUDART_VERSION
#define CUDART_VERSION 13000
#endif

// ------------------------------------------------------------------ runtime types
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

// threadIdx/blockIdx: per worker OS thread, set by the scheduler before it resumes a fiber.
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;  // set by the launch before its workers start

namespace ff_emu {
constexpr int kDeviceCount = 2;  // lets tests exercise the launchers' device switch

// Per host thread, like the real runtime's error state and current device.
inline thread_local cudaError_t last_error = cudaSuccess;
inline thread_local int current_device = 0;

inline int env_int(const char* name, int fallback) {
  const char* s = std::getenv(name);
  const int v = s ? std::atoi(s) : 0;
  return v > 0 ? v : fallback;
}
// SM count reported by cudaDeviceGetAttribute (the launchers size the batch split and the apply
// grid from it): FF_EMU_SM_COUNT, default 132 (H100 SXM). Read at every query so tests can vary it.
inline int sm_count() { return env_int("FF_EMU_SM_COUNT", 132); }

// A kernel-side fault (misaligned wmma pointer, unrounded tf32 operand, deadlock, ...): the first
// message is kept, the remaining blocks are skipped and the launch reports cudaErrorLaunchFailure
// with the message, so the test sees a RuntimeError naming the kernel, not a dead interpreter.
inline std::mutex fault_mutex;
inline std::string fault_message;       // of the running launch
inline std::string last_fault_message;  // of the last failed launch, for cudaGetErrorString
inline std::atomic<bool> faulted{false};
[[gnu::format(printf, 1, 2)]] inline void fault(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  std::lock_guard<std::mutex> lock(fault_mutex);
  if (fault_message.empty()) {
    char where[96];
    std::snprintf(where, sizeof where, " (block (%u,%u,%u), thread %u)", blockIdx.x, blockIdx.y,
                  blockIdx.z, threadIdx.x);
    fault_message = std::string(buf) + where;
  }
  faulted = true;
}

// Every launch, for tests (read through the extern "C" accessors in tests/cuda_emu/emu_runtime.cpp).
struct LaunchRecord {
  std::string kernel;  // the kernel expression as written in FF_LAUNCH, e.g. "ff_wgrad_kernel<T, kKind>"
  dim3 grid, block;
  std::uintptr_t stream;
  int device;
  bool ok;
};
inline std::mutex log_mutex;
inline std::vector<LaunchRecord> launch_log;

// ------------------------------------------------------------------ fibers
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__) && !defined(FF_EMU_UCONTEXT)
#define FF_EMU_FAST_FIBERS 1
// emu_runtime.cpp: saves rbp, rbx, r12-r15, MXCSR and the x87 control word on the current stack,
// stores the stack pointer in *save_sp, switches to load_sp and restores the same from there.
extern "C" void ff_emu_switch(void** save_sp, void* load_sp);
extern "C" void ff_emu_fiber_start();  // first resume of a fiber: calls the function in r12
#else
#define FF_EMU_FAST_FIBERS 0
#endif

// One execution context: a fiber, or the worker's own stack (the scheduler).
struct FiberContext {
#if FF_EMU_FAST_FIBERS
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

// Makes `f` run entry() on [stack, stack + size) when it is first switched to. entry() must
// never return: it ends by switching away for good.
inline void fiber_make(FiberContext& f, char* stack, size_t size, void (*entry)()) {
#if FF_EMU_FAST_FIBERS
  // The frame ff_emu_switch pops (low to high): x87 control word, MXCSR (16 bytes), r15, r14, r13,
  // r12 = entry, rbx, rbp, return address = ff_emu_fiber_start. The top is 16-byte aligned and
  // sp = top - 88, so ff_emu_fiber_start calls entry with the stack aligned as the ABI requires.
  auto top = reinterpret_cast<std::uintptr_t>(stack + size) & ~std::uintptr_t(15);
  auto* frame = reinterpret_cast<std::uint64_t*>(top - 88);
  std::memset(frame, 0, 88);
  std::uint16_t fcw;
  std::uint32_t mxcsr;
  asm volatile("fnstcw %0" : "=m"(fcw));
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  std::memcpy(frame, &fcw, sizeof fcw);
  std::memcpy(frame + 1, &mxcsr, sizeof mxcsr);
  frame[5] = reinterpret_cast<std::uint64_t>(entry);  // r12
  frame[8] = reinterpret_cast<std::uint64_t>(&ff_emu_fiber_start);
  f.sp = frame;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = stack;
  f.uc.uc_stack.ss_size = size;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, entry, 0);
#endif
}

inline void fiber_switch(FiberContext& from, FiberContext& to) {
#if FF_EMU_FAST_FIBERS
  ff_emu_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
}

// Fiber stacks: mmap'ed (committed lazily) with a PROT_NONE guard page below, pooled across launches.
class StackPool {
 public:
  static constexpr size_t kStackBytes = 512 * 1024;
  static char* get() {
    {
      std::lock_guard<std::mutex> lock(mutex());
      auto& free = stacks();
      if (!free.empty()) {
        char* s = free.back();
        free.pop_back();
        return s;
      }
    }
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (p == MAP_FAILED) {
      std::perror("ff_emu: mmap of a fiber stack");
      std::abort();
    }
    mprotect(p, page, PROT_NONE);  // stack overflow -> SIGSEGV, not silent corruption
    return static_cast<char*>(p) + page;
  }
  static void put(char* s) {
    std::lock_guard<std::mutex> lock(mutex());
    stacks().push_back(s);
  }

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static std::vector<char*>& stacks() {
    static std::vector<char*> v;
    return v;
  }
};

// A barrier among the fibers of one block (the block, or one warp). Threads that returned from the
// kernel no longer take part (as on sm_70+), so a barrier after an early return still completes.
struct FiberBarrier {
  const char* what = "";
  int expected = 0, arrived = 0;
  std::vector<int> waiters;
  void reset(const char* w, int n) {
    what = w;
    expected = n;
    arrived = 0;
    waiters.clear();
  }
};

// One block's fibers and barriers, owned by a worker thread.
class BlockRunner {
 public:
  enum State { kRunnable, kWaiting, kDone };

  explicit BlockRunner(int nthreads)
      : n_(nthreads), fibers_(size_t(nthreads)), warps_(size_t(nthreads / 32)),
        slots_(size_t(nthreads)), mma_memo_(size_t(nthreads / 32) * kMmaSlots) {
    for (auto& f : fibers_) f.stack = StackPool::get();
  }
  ~BlockRunner() {
    for (auto& f : fibers_) StackPool::put(f.stack);
  }
  BlockRunner(const BlockRunner&) = delete;
  BlockRunner& operator=(const BlockRunner&) = delete;

  // Runs body() once per thread of block `linear` (x fastest); a deadlock becomes a fault.
  template <class Body>
  void run_block(std::uint64_t linear, const Body& body) {
    blockIdx = dim3(unsigned(linear % gridDim.x), unsigned(linear / gridDim.x % gridDim.y),
                    unsigned(linear / (std::uint64_t(gridDim.x) * gridDim.y)));
    block_bar_.reset("__syncthreads", n_);
    for (auto& w : warps_) w.reset("__syncwarp", 32);
    body_ = [](const void* b) { (*static_cast<const Body*>(b))(); };
    body_arg_ = &body;
    for (int t = 0; t < n_; ++t) {
      Fiber& f = fibers_[size_t(t)];
      f.state = kRunnable;
      f.copies.clear();
      f.committed = 0;
      f.mma_calls = 0;
      fiber_make(f.ctx, f.stack, StackPool::kStackBytes, &BlockRunner::entry);
    }
    const bool reverse = linear % 2 == 1;
    int done = 0;
    while (done < n_) {
      bool progressed = false;
      for (int j = 0; j < n_; ++j) {
        const int t = reverse ? n_ - 1 - j : j;
        Fiber& f = fibers_[size_t(t)];
        if (f.state != kRunnable) continue;
        progressed = true;
        current_ = t;
        threadIdx = dim3(unsigned(t));
        self() = this;
        fiber_switch(sched_, f.ctx);
        if (f.state == kDone) ++done;
      }
      if (!progressed) {
        report_deadlock();
        break;
      }
    }
    self() = nullptr;
  }

  // ---- called from fibers
  static BlockRunner& current() { return *self(); }
  void syncthreads() { arrive(block_bar_); }
  void syncwarp() { arrive(warps_[size_t(current_ / 32)]); }
  std::uint64_t* warp_slots() { return slots_.data() + (current_ / 32) * 32; }

  // ---- wmma::mma_sync memo. Every lane of a warp computes the same tile product (each holds the
  // whole fragment, see mma.h); the memo lets the other 31 reuse the first lane's result. It is
  // keyed by the full input bits (operands and accumulator), so a hit is exactly what the lane would
  // have computed; slots are picked by the lane's call count, so in warp-uniform code lane k's i-th
  // call meets lane 0's i-th.
  struct MmaMemo {
    static constexpr int kMaxIn = 3 * 256, kMaxOut = 256;
    int n_in = -1;
    float in[kMaxIn];
    float out[kMaxOut];
  };
  static constexpr unsigned kMmaSlots = 32;
  MmaMemo& mma_slot() {
    Fiber& f = fibers_[size_t(current_)];
    const unsigned slot = f.mma_calls++ % kMmaSlots;
    return mma_memo_[size_t(current_ / 32) * kMmaSlots + slot];
  }

  // ---- asynchronous global->shared copies (cp.async through cuda_pipeline_primitives.h). A copy
  // reads its source when issued but writes its destination only when a __pipeline_wait_prior
  // covers its group, so a read of the destination before the wait (and the barrier that
  // publishes it) sees the old contents, as it may on a GPU.
  void async_copy(void* dst, const void* src, size_t size, size_t zfill) {
    AsyncCopy c;
    c.dst = dst;
    c.size = size;
    std::memcpy(c.data, src, size - zfill);
    std::memset(c.data + (size - zfill), 0, zfill);
    c.group = -1;  // not committed yet
    fibers_[size_t(current_)].copies.push_back(c);
  }
  void async_commit() {
    Fiber& f = fibers_[size_t(current_)];
    ++f.committed;
    for (AsyncCopy& c : f.copies)
      if (c.group < 0) c.group = f.committed;
  }
  // Completes the copies of every committed group but the `prior` most recent ones.
  void async_wait_prior(size_t prior) {
    Fiber& f = fibers_[size_t(current_)];
    const long last_done = long(f.committed) - long(prior);
    size_t kept = 0;
    for (AsyncCopy& c : f.copies) {
      if (c.group >= 0 && c.group <= last_done)
        std::memcpy(c.dst, c.data, c.size);
      else
        f.copies[kept++] = c;
    }
    f.copies.resize(kept);
  }

 private:
  struct AsyncCopy {
    void* dst;
    unsigned char data[16];
    size_t size;
    long group;  // commit group (1, 2, ...), -1 before __pipeline_commit
  };
  struct Fiber {
    FiberContext ctx;
    char* stack = nullptr;
    State state = kDone;
    std::vector<AsyncCopy> copies;  // issued, not yet completed (dropped if the thread returns)
    long committed = 0;
    unsigned mma_calls = 0;
  };

  static BlockRunner*& self() {
    static thread_local BlockRunner* r = nullptr;
    return r;
  }

  static void entry() {
    BlockRunner& r = current();
    try {
      r.body_(r.body_arg_);
    } catch (const std::exception& e) {
      fault("exception escaped the kernel: %s", e.what());
    } catch (...) {
      fault("exception escaped the kernel");
    }
    // returned: no longer a participant of the block's or the warp's barriers
    const int t = r.current_;
    r.drop(r.block_bar_);
    r.drop(r.warps_[size_t(t / 32)]);
    r.fibers_[size_t(t)].state = kDone;
    fiber_switch(r.fibers_[size_t(t)].ctx, r.sched_);  // for good: a finished fiber is never resumed
  }

  void arrive(FiberBarrier& b) {
    if (++b.arrived >= b.expected) {
      release(b);
      return;  // the last one to arrive goes on
    }
    Fiber& f = fibers_[size_t(current_)];
    f.state = kWaiting;
    b.waiters.push_back(current_);
    fiber_switch(f.ctx, sched_);
  }
  void drop(FiberBarrier& b) {
    --b.expected;
    if (b.arrived > 0 && b.arrived >= b.expected) release(b);
  }
  void release(FiberBarrier& b) {
    for (int w : b.waiters) fibers_[size_t(w)].state = kRunnable;
    b.waiters.clear();
    b.arrived = 0;
  }
  void report_deadlock() {
    std::string why;
    auto add = [&](const FiberBarrier& b, const std::string& where) {
      if (b.waiters.empty()) return;
      char buf[160];
      std::snprintf(buf, sizeof buf, "%s%d thread(s) wait at %s (first: thread %d; %d expected)",
                    why.empty() ? "" : "; ", int(b.waiters.size()), where.c_str(), b.waiters.front(),
                    b.expected);
      why += buf;
    };
    add(block_bar_, block_bar_.what);
    for (size_t w = 0; w < warps_.size(); ++w)
      add(warps_[w], std::string(warps_[w].what) + " of warp " + std::to_string(w));
    fault("deadlock: no thread can proceed: %s", why.c_str());
  }

  int n_;
  std::vector<Fiber> fibers_;
  FiberBarrier block_bar_;
  std::vector<FiberBarrier> warps_;
  std::vector<std::uint64_t> slots_;  // one per thread, for __shfl_*_sync
  std::vector<MmaMemo> mma_memo_;      // kMmaSlots per warp
  FiberContext sched_;
  int current_ = 0;
  void (*body_)(const void*) = nullptr;
  const void* body_arg_ = nullptr;
};
}  // namespace ff_emu

// ------------------------------------------------------------------ runtime API
inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}
inline const char* cudaGetErrorString(cudaError_t e) {
  if (e == cudaErrorLaunchFailure && !ff_emu::last_fault_message.empty())
    return ff_emu::last_fault_message.c_str();
  return cudaGetErrorName(e);
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ff_emu::last_error;
  ff_emu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = ff_emu::current_device;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  if (d < 0 || d >= ff_emu::kDeviceCount) return ff_emu::last_error = cudaErrorInvalidDevice;
  ff_emu::current_device = d;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = ff_emu::kDeviceCount;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= ff_emu::kDeviceCount) return ff_emu::last_error = cudaErrorInvalidDevice;
  if (attr != cudaDevAttrMultiProcessorCount) return ff_emu::last_error = cudaErrorInvalidValue;
  *v = ff_emu::sm_count();
  return cudaSuccess;
}

// ------------------------------------------------------------------ device intrinsics
inline void __syncthreads() { ff_emu::BlockRunner::current().syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ff_emu::fault("__syncwarp: partial mask 0x%x is not modelled", mask);
  ff_emu::BlockRunner::current().syncwarp();
}
// All 32 lanes must take part (full mask, width 32), as every shuffle in csrc does.
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lanemask, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of a 32/64-bit value");
  if (mask != 0xffffffffu || width != 32)
    ff_emu::fault("__shfl_xor_sync: only full-warp shuffles are modelled (mask 0x%x, width %d)", mask,
                  width);
  const unsigned lane = threadIdx.x % 32;
  std::uint64_t* slots = ff_emu::BlockRunner::current().warp_slots();
  std::uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  slots[lane] = bits;
  __syncwarp();
  bits = slots[lane ^ (unsigned(lanemask) & 31u)];
  __syncwarp();  // before anyone overwrites its slot in the next shuffle
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}
// Real atomics: blocks on different workers run concurrently.
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline unsigned atomicMax(unsigned* p, unsigned v) {
  std::atomic_ref<unsigned> a(*p);
  unsigned old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// CUDA's global-namespace integer min/max overloads.
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
using std::isfinite;

// ------------------------------------------------------------------ vector types
// The vector_types.h subset csrc uses (size = alignment, as in CUDA). On a GPU a vector load or
// store must be aligned to its size or the kernel dies with a misaligned-address error; here every
// copy into or out of one of these objects (a dereference of a vector pointer, in either
// direction) checks the address and faults the launch when it is misaligned. Locals are aligned by
// their type, so only accesses through reinterpreted pointers can fail.
namespace ff_emu {
inline void check_vector_address(const void* p, size_t bytes, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % bytes != 0)
    fault("misaligned %zu-byte vector %s at %p", bytes, what, p);
}
template <typename Derived, typename E, int kN>
struct alignas(sizeof(E) * kN) CheckedVector {
  CheckedVector() = default;
  CheckedVector(const CheckedVector& o) {
    check_vector_address(&o, sizeof(E) * kN, "load");
    std::memcpy(static_cast<void*>(this), &o, sizeof(E) * kN);
  }
  CheckedVector& operator=(const CheckedVector& o) {
    check_vector_address(&o, sizeof(E) * kN, "load");
    check_vector_address(this, sizeof(E) * kN, "store");
    std::memcpy(static_cast<void*>(this), &o, sizeof(E) * kN);
    return *this;
  }
};
}  // namespace ff_emu
struct uint2 : ff_emu::CheckedVector<uint2, unsigned, 2> {
  unsigned x, y;
};
struct uint4 : ff_emu::CheckedVector<uint4, unsigned, 4> {
  unsigned x, y, z, w;
};
struct float4 : ff_emu::CheckedVector<float4, float, 4> {
  float x, y, z, w;
};
static_assert(sizeof(uint2) == 8 && sizeof(uint4) == 16 && sizeof(float4) == 16, "vector layout");
// __ldg (ld.global.nc): a load of data that is read-only during the kernel; checked the same way.
template <typename V>
inline V __ldg(const V* p) {
  ff_emu::check_vector_address(p, sizeof(V), "__ldg");
  V v;
  std::memcpy(static_cast<void*>(&v), p, sizeof v);
  return v;
}

// ------------------------------------------------------------------ kernel launch
namespace ff_emu {

// One launch at a time, in order (one emulated stream; launches are synchronous).
inline std::mutex launch_mutex;

// FF_LAUNCH(grid, block, stream, kernel)(args...)
//   -> launch(grid, block, stream, "kernel", kernel)(args...)
template <typename... KArgs>
class Launch {
 public:
  Launch(dim3 grid, dim3 block, cudaStream_t stream, const char* name, void (*kernel)(KArgs...))
      : grid_(grid), block_(block), stream_(stream), name_(name), kernel_(kernel) {}

  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(KArgs), "kernel argument count");
    // converted to the parameter types once, as the real launch marshals them
    run(std::tuple<KArgs...>(std::forward<Args>(args)...));
  }

 private:
  void run(const std::tuple<KArgs...>& params) const {
    std::lock_guard<std::mutex> serial(launch_mutex);
    const dim3 g = grid_, b = block_;
    LaunchRecord rec{name_, g, b, reinterpret_cast<std::uintptr_t>(stream_), current_device, false};
    const unsigned nthreads = b.x * b.y * b.z;
    // The limits of every CUDA GPU since sm_30. Only 1-D blocks are emulated (all csrc kernels).
    const bool bad = g.x == 0 || g.y == 0 || g.z == 0 || g.x > 2147483647u || g.y > 65535u ||
                     g.z > 65535u || b.x == 0 || b.y != 1 || b.z != 1 || nthreads > 1024u ||
                     nthreads % 32u != 0u;
    if (bad) {
      std::fprintf(stderr, "ff_emu: bad launch of %s: grid (%u,%u,%u) block (%u,%u,%u)\n", name_,
                   g.x, g.y, g.z, b.x, b.y, b.z);
      last_error = cudaErrorInvalidConfiguration;
      log(std::move(rec));
      return;
    }
    {
      std::lock_guard<std::mutex> lock(fault_mutex);
      fault_message.clear();
      faulted = false;
    }
    gridDim = g;
    blockDim = b;
    const std::uint64_t nblocks = std::uint64_t(g.x) * g.y * g.z;
    std::atomic<std::uint64_t> next{0};
    auto worker = [&] {
      BlockRunner runner{static_cast<int>(nthreads)};
      auto body = [&] {
        std::tuple<KArgs...> mine = params;  // kernel parameters are per-thread values
        std::apply(kernel_, mine);
      };
      for (std::uint64_t blk = next++; blk < nblocks && !faulted; blk = next++)
        runner.run_block(blk, body);
    };
    const int cores = int(std::max(1u, std::thread::hardware_concurrency()));
    const std::uint64_t nworkers =
        std::min<std::uint64_t>(nblocks, std::uint64_t(env_int("FF_EMU_WORKERS", cores)));
    std::vector<std::thread> workers;
    for (std::uint64_t w = 1; w < nworkers; ++w) workers.emplace_back(worker);
    worker();  // the calling thread is worker 0
    for (auto& th : workers) th.join();
    {
      std::lock_guard<std::mutex> lock(fault_mutex);
      if (!fault_message.empty()) {
        last_fault_message = std::string(name_) + ": " + fault_message;
        std::fprintf(stderr, "ff_emu: %s\n", last_fault_message.c_str());
        last_error = cudaErrorLaunchFailure;
        log(std::move(rec));
        return;
      }
    }
    rec.ok = true;
    log(std::move(rec));
  }

  static void log(LaunchRecord&& rec) {
    std::lock_guard<std::mutex> lock(log_mutex);
    launch_log.push_back(std::move(rec));
  }

  dim3 grid_, block_;
  cudaStream_t stream_;
  const char* name_;
  void (*kernel_)(KArgs...);
};

template <typename... KArgs>
Launch<KArgs...> launch(dim3 grid, dim3 block, cudaStream_t stream, const char* name,
                        void (*kernel)(KArgs...)) {
  return Launch<KArgs...>(grid, block, stream, name, kernel);
}

}  // namespace ff_emu

// ------------------------------------------------------------------ cudaMemsetAsync
// Done at once, in order with the launches (one emulated stream). Logged like a launch so tests see
// its stream and device: kernel "cudaMemsetAsync", grid (bytes mod 2^32, bytes / 2^32, 1), block
// (0, 0, 0) (no block ever has 0 threads: nothing mistakes it for a kernel).
inline cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t stream = nullptr) {
  std::lock_guard<std::mutex> serial(ff_emu::launch_mutex);
  if (bytes > 0 && dst == nullptr) return ff_emu::last_error = cudaErrorInvalidValue;
  std::memset(dst, value, bytes);
  ff_emu::LaunchRecord rec{"cudaMemsetAsync",
                           dim3(unsigned(bytes & 0xffffffffu), unsigned(std::uint64_t(bytes) >> 32), 1u),
                           dim3(0u, 0u, 0u), reinterpret_cast<std::uintptr_t>(stream),
                           ff_emu::current_device, true};
  std::lock_guard<std::mutex> lock(ff_emu::log_mutex);
  ff_emu::launch_log.push_back(std::move(rec));
  return cudaSuccess;
}
