// ff_kernels._C: the compiled CUDA backend. Plain pybind11, no libtorch: kernels take device
// pointers (tensor.data_ptr()) and the stream (torch.cuda.current_stream().cuda_stream) as ints.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cuda_check.h"
#include "ff_layer.h"
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
  // ---- the fused layer step (csrc/ff_layer.{h,cu}); driven by ff_kernels/cuda_backend.py
  using ff_kernels::FFLayerArgs;
  py::class_<FFLayerArgs> args(m, "FFLayerArgs",
                               "Arguments of ff_layer_run: device pointers and the stream as ints, "
                               "shapes/strides in elements, config values (see csrc/ff_layer.h)");
  args.def(py::init<>());
#define FF_FIELD(name) args.def_readwrite(#name, &FFLayerArgs::name)
  FF_FIELD(dtype); FF_FIELD(allow_tf32); FF_FIELD(device); FF_FIELD(stream); FF_FIELD(mode);
  FF_FIELD(x_pos); FF_FIELD(m_pos); FF_FIELD(x_pos_stride_row); FF_FIELD(x_pos_stride_col);
  FF_FIELD(x_neg); FF_FIELD(m_neg); FF_FIELD(x_neg_stride_row); FF_FIELD(x_neg_stride_col);
  FF_FIELD(weight); FF_FIELD(n); FF_FIELD(k); FF_FIELD(weight_stride_row);
  FF_FIELD(weight_stride_col); FF_FIELD(bias); FF_FIELD(bias_stride);
  FF_FIELD(goodness_mean); FF_FIELD(norm); FF_FIELD(loss); FF_FIELD(threshold); FF_FIELD(eps);
  FF_FIELD(alpha); FF_FIELD(y); FF_FIELD(g); FF_FIELD(loss_out); FF_FIELD(workspace);
  FF_FIELD(grad_weight); FF_FIELD(grad_bias); FF_FIELD(lr); FF_FIELD(momentum);
  FF_FIELD(weight_decay); FF_FIELD(buf_weight); FF_FIELD(buf_bias); FF_FIELD(buf_weight_f32);
  FF_FIELD(buf_bias_f32);
#undef FF_FIELD
  m.attr("FF_MODE_FORWARD") = int(ff_kernels::kModeForward);
  m.attr("FF_MODE_GRADIENT") = int(ff_kernels::kModeGradient);
  m.attr("FF_MODE_UPDATE") = int(ff_kernels::kModeUpdate);
  m.def("ff_layer_workspace_floats", &ff_kernels::ff_layer_workspace_floats, py::arg("m"),
        py::arg("n"), py::arg("k"), py::arg("mode"),
        "float32 elements of the zeroed workspace ff_layer_run needs");
  m.def(
      "ff_layer_run",
      [](const FFLayerArgs& a) {
        py::gil_scoped_release nogil;  // launches only; exceptions re-acquire the GIL on unwind
        ff_kernels::ff_layer_run(a);
      },
      py::arg("args"),
      "Enqueue the fused layer step on args.stream (no host sync). ValueError on bad arguments, "
      "RuntimeError naming the op on a CUDA error.");

  // Test hook for the error path every launcher uses: raises RuntimeError for a non-zero code.
  m.def(
      "_check_cuda",
      [](int code, const std::string& op) {
        ff_kernels::check_cuda(static_cast<cudaError_t>(code), op.c_str());
      },
      py::arg("code"), py::arg("op"));
}
