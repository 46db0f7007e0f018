// The one seam between the host launchers and the CUDA launch syntax.
//
//   FF_LAUNCH(grid, block, stream, kernel)(args...);
//
// expands under nvcc to exactly  kernel<<<grid, block, 0, stream>>>(args...);  (no dynamic shared
// memory: every kernel here uses static __shared__ arrays). The kernel comes last because a
// template-id such as ff_forward_kernel<T, kKind> contains a comma the preprocessor would split.
//
// With FF_KERNELS_CPU_EMULATION defined (tests/cuda_emu: the kernels compiled as host C++ by g++ for
// the CPU check in tests/test_cuda_emulated.py) it expands to the emulator's launcher, which runs
// the grid block by block on CPU threads; the emulator's cuda_runtime.h provides ff_emu::launch.
#pragma once

#include <cuda_runtime.h>

#ifndef FF_KERNELS_CPU_EMULATION
#define FF_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#else
#define FF_LAUNCH(grid, block, stream, ...) \
  ::ff_emu::launch(grid, block, stream, #__VA_ARGS__, __VA_ARGS__)
#endif
