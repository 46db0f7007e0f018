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
  FF_FIELD(sm_count);
  FF_FIELD(x_pos); FF_FIELD(m_pos); FF_FIELD(x_pos_stride_row); FF_FIELD(x_pos_stride_col);
  FF_FIELD(x_neg); FF_FIELD(m_neg); FF_FIELD(x_neg_stride_row); FF_FIELD(x_neg_stride_col);
  FF_FIELD(weight); FF_FIELD(n); FF_FIELD(k); FF_FIELD(weight_stride_row);
  FF_FIELD(weight_stride_col); FF_FIELD(bias); FF_FIELD(bias_stride);
  FF_FIELD(goodness_mean); FF_FIELD(norm); FF_FIELD(loss); FF_FIELD(threshold); FF_FIELD(eps);
  FF_FIELD(alpha); FF_FIELD(y); FF_FIELD(g); FF_FIELD(loss_out); FF_FIELD(nonfinite_out);
  FF_FIELD(workspace); FF_FIELD(workspace_floats); FF_FIELD(skip_nonfinite);
  FF_FIELD(grad_weight); FF_FIELD(grad_bias);
  FF_FIELD(lr); FF_FIELD(keep); FF_FIELD(gain); FF_FIELD(wd_grad); FF_FIELD(wd_step);
  FF_FIELD(buf_weight); FF_FIELD(buf_bias); FF_FIELD(buf_weight_f32); FF_FIELD(buf_bias_f32);
  FF_FIELD(peer_mean); FF_FIELD(peer_rho); FF_FIELD(peer_kappa);
#undef FF_FIELD
  m.attr("FF_MODE_FORWARD") = int(ff_kernels::kModeForward);
  m.attr("FF_MODE_GRADIENT") = int(ff_kernels::kModeGradient);
  m.attr("FF_MODE_UPDATE") = int(ff_kernels::kModeUpdate);
  using ff_kernels::FFLayerPlan;
  py::class_<FFLayerPlan>(m, "FFLayerPlan", "What one ff_layer_run call does (csrc/ff_layer.h)")
      .def_readonly("workspace_floats", &FFLayerPlan::workspace_floats)
      .def_readonly("wgrad_splits", &FFLayerPlan::wgrad_splits)
      .def_readonly("launches", &FFLayerPlan::launches);
  m.def("ff_layer_plan", &ff_kernels::ff_layer_plan, py::arg("args"),
        "The launch plan of these arguments: zeroed float32 workspace size, weight-gradient batch "
        "split, launch count. ValueError on bad arguments; asks the driver for the SM count unless "
        "args.sm_count > 0.");
  m.def(
      "ff_layer_run",
      [](const FFLayerArgs& a) {
        py::gil_scoped_release nogil;  // launches only; exceptions re-acquire the GIL on unwind
        ff_kernels::ff_layer_run(a);
      },
      py::arg("args"),
      "Enqueue the fused layer step on args.stream (no host sync): a memset of the workspace, then "
      "the kernels. ValueError on bad arguments, RuntimeError naming the op on a CUDA error.");

  // ---- the SGD rule alone, on a given gradient (the same device code as the step's update)
  using ff_kernels::FFSgdArgs;
  py::class_<FFSgdArgs> sgd(m, "FFSgdArgs",
                            "Arguments of ff_sgd_update: device pointers and the stream as ints, "
                            "the SGDUpdate.coefficients() (see csrc/ff_layer.h)");
  sgd.def(py::init<>());
#define FF_SGD_FIELD(name) sgd.def_readwrite(#name, &FFSgdArgs::name)
  FF_SGD_FIELD(dtype); FF_SGD_FIELD(device); FF_SGD_FIELD(stream); FF_SGD_FIELD(sm_count);
  FF_SGD_FIELD(param); FF_SGD_FIELD(grad); FF_SGD_FIELD(numel); FF_SGD_FIELD(buf);
  FF_SGD_FIELD(buf_f32); FF_SGD_FIELD(lr); FF_SGD_FIELD(keep); FF_SGD_FIELD(gain);
  FF_SGD_FIELD(wd_grad); FF_SGD_FIELD(wd_step); FF_SGD_FIELD(skip);
#undef FF_SGD_FIELD
  m.def(
      "ff_sgd_update",
      [](const FFSgdArgs& a) {
        py::gil_scoped_release nogil;
        ff_kernels::ff_sgd_update(a);
      },
      py::arg("args"),
      "Enqueue the fused SGD update of param (and buf) from grad on args.stream (no host sync). "
      "ValueError on bad arguments, RuntimeError naming the op on a CUDA error.");

  // Test hook for the error path every launcher uses: raises RuntimeError for a non-zero code.
  m.def(
      "_check_cuda",
      [](int code, const std::string& op) {
        ff_kernels::check_cuda(static_cast<cudaError_t>(code), op.c_str());
      },
      py::arg("code"), py::arg("op"));
}
