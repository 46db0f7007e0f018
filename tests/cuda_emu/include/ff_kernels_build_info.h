// CPU emulation (tests/cuda_emu): stands in for the header CMakeLists.txt generates. The builder
// (tests/cuda_emu/build.py) passes FF_KERNELS_VERSION from ff_kernels/_version.py.
#pragma once
#ifndef FF_KERNELS_VERSION
#error "define FF_KERNELS_VERSION (tests/cuda_emu/build.py does)"
#endif
#define FF_KERNELS_CUDA_ARCHS "cpu-emulation"
