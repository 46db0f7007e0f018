// Build/runtime probe of the CUDA backend: lets Python tell "not built" from "built, no GPU".
#pragma once

#include <string>
#include <utility>

namespace ff_kernels {

// CUDART_VERSION the module was compiled (and statically linked) against, e.g. 13000.
int cuda_runtime_version();

// (number of visible devices, reason). Never throws: on a driver/device error the count is 0 and
// the reason is cudaGetErrorString's message; the reason is also set when no device is visible.
std::pair<int, std::string> device_count();

// CMAKE_CUDA_ARCHITECTURES the module was compiled for, e.g. "80;90".
const char* compiled_archs();

// Package version baked in at build time (ff_kernels/_version.py).
const char* version();

}  // namespace ff_kernels
