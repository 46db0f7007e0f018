// Error handling for host code: turn a CUDA error into a C++ exception that names the failed call.
// pybind11 translates std::runtime_error to Python RuntimeError, so a bad launch never aborts Python.
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace ff_kernels {

inline void check_cuda(cudaError_t err, const char* op) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the non-sticky error so later calls start clean
    throw std::runtime_error(std::string(op) + " failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

}  // namespace ff_kernels

// FF_CUDA_CHECK(cudaMemsetAsync(...)) reports the call's own text as the op name.
#define FF_CUDA_CHECK(expr) ::ff_kernels::check_cuda((expr), #expr)
