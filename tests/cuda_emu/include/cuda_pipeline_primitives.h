// CPU emulation (tests/cuda_emu): the cp.async primitives of CUDA's cuda_pipeline_primitives.h.
// A copy's source is read when it is issued; its destination is written only when a
// __pipeline_wait_prior covers its commit group (per thread, as cp.async.wait_group), so a thread
// that reads shared memory before the wait and the barrier that publishes it sees stale data. The
// documented rules are checked as launch faults: size 4, 8 or 16, zfill <= size, both addresses
// aligned to the size.
#pragma once
#include <cstddef>

#include "emu_core.h"

inline void __pipeline_memcpy_async(void* dst_shared, const void* src_global, size_t size_and_align,
                                    size_t zfill = 0) {
  if (size_and_align != 4 && size_and_align != 8 && size_and_align != 16) {
    ff_emu::fault("__pipeline_memcpy_async: size %zu is not 4, 8 or 16", size_and_align);
    return;
  }
  if (zfill > size_and_align) {
    ff_emu::fault("__pipeline_memcpy_async: zfill %zu > size %zu", zfill, size_and_align);
    return;
  }
  if (reinterpret_cast<std::uintptr_t>(dst_shared) % size_and_align != 0 ||
      reinterpret_cast<std::uintptr_t>(src_global) % size_and_align != 0) {
    ff_emu::fault("__pipeline_memcpy_async: %p <- %p not %zu-byte aligned", dst_shared, src_global,
                  size_and_align);
    return;
  }
  ff_emu::BlockRunner::current().async_copy(dst_shared, src_global, size_and_align, zfill);
}
inline void __pipeline_commit() { ff_emu::BlockRunner::current().async_commit(); }
inline void __pipeline_wait_prior(size_t prior) {
  ff_emu::BlockRunner::current().async_wait_prior(prior);
}
