// ff_kernels._C: the compiled CUDA backend. Plain pybind11, no libtorch: kernels take device
// pointers (tensor.data_ptr()) and the stream (torch.cuda.current_stream().cuda_stream) as ints.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cuda_check.h"
#include "probe.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "ff_kernels CUDA backend (compiled with nvcc, cudart linked statically)";
  m.def("version", &ff_kernels::version, "package version the module was built from");
  m.def("cuda_runtime_version", &ff_kernels::cuda_runtime_version,
        "CUDART_VERSION compiled against, e.g. 13000 for CUDA 13.0");
  m.def("device_count", &ff_kernels::device_count,
        "(count, reason): visible CUDA devices; 0 with the CUDA error message when none");
  m.def("compiled_archs", &ff_kernels::compiled_archs,
        "CMAKE_CUDA_ARCHITECTURES the kernels were compiled for, e.g. '80;90'");
  // Test hook for the error path every launcher uses: raises RuntimeError for a non-zero code.
  m.def(
      "_check_cuda",
      [](int code, const std::string& op) {
        ff_kernels::check_cuda(static_cast<cudaError_t>(code), op.c_str());
      },
      py::arg("code"), py::arg("op"));
}
