// Host API of the fused Forward-Forward layer step (DESIGN.md section 1), without libtorch.
//
// Python (ff_kernels/cuda_backend.py) fills one FFLayerArgs with raw device pointers
// (tensor.data_ptr()), shapes and strides in elements, config values and the CUDA stream, then
// calls ff_layer_run. All launches (and the workspace memset) go to that stream on `device`;
// nothing synchronises the host and nothing is allocated, so a step can be captured in a CUDA
// graph. ff_sgd_update applies the same SGD rule to a given gradient (FFSgdArgs).
#pragma once

#include <cstdint>

namespace ff_kernels {

// What ff_layer_run does after the forward pass (y, g).
enum FFLayerMode : int {
  kModeForward = 0,   // y, g only (ff_layer_forward): no loss, no gradient
  kModeGradient = 1,  // + loss, grad_weight, grad_bias written in the weight dtype
  kModeUpdate = 2,    // + loss, the SGD step applied in place to weight, bias (and buffers)
};

enum FFDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum FFNorm : int { kNormL2 = 0, kNormRms = 1, kNormNone = 2 };
enum FFLoss : int { kLossSoftplus = 0, kLossSymba = 1 };

struct FFLayerArgs {
  // ---- where and how
  int dtype = kFloat32;    // FFDtype of x, weight, bias, y (and grads)
  int allow_tf32 = 0;      // float32 only: tensor-core TF32 GEMMs (else exact fp32 FMA)
  int device = 0;          // CUDA device index of every tensor
  uintptr_t stream = 0;    // cudaStream_t as an integer (0 = legacy default stream)
  int mode = kModeForward; // FFLayerMode
  int sm_count = 0;        // SMs of `device` for the launch plan; 0: ask the driver

  // ---- inputs: rows [0, m_pos) come from x_pos, rows [m_pos, m_pos + m_neg) from x_neg
  uintptr_t x_pos = 0;
  int64_t m_pos = 0, x_pos_stride_row = 0, x_pos_stride_col = 0;
  uintptr_t x_neg = 0;  // may be 0 when m_neg == 0 (forward mode)
  int64_t m_neg = 0, x_neg_stride_row = 0, x_neg_stride_col = 0;
  uintptr_t weight = 0;  // [n, k]; must be contiguous in update mode
  int64_t n = 0, k = 0, weight_stride_row = 0, weight_stride_col = 0;
  uintptr_t bias = 0;  // [n] or 0; contiguous in update mode
  int64_t bias_stride = 0;

  // ---- config (FFConfig); threshold = config.threshold(n), already resolved
  int goodness_mean = 1;  // 1: g = q / n ("mean"), 0: g = q ("sum")
  int norm = kNormL2;     // FFNorm
  int loss = kLossSoftplus;  // FFLoss (ignored in forward mode)
  double threshold = 2.0, eps = 1e-4, alpha = 4.0;

  // ---- outputs
  uintptr_t y = 0;     // [m, n] contiguous, input dtype
  uintptr_t g = 0;     // [m] float32
  uintptr_t loss_out = 0;  // [] float32 (step modes): the loss, NaN when nonfinite_out is true
  uintptr_t nonfinite_out = 0;  // [] bool (step modes): some z = x W^T + b or some q_i is NaN/inf
  uintptr_t workspace = 0;  // float32 scratch [workspace_floats]; ff_layer_run zeroes what it uses
                            // (cudaMemsetAsync on `stream`): reusable by the next call on `stream`
  int64_t workspace_floats = 0;  // its size: at least ff_layer_plan(args).workspace_floats
  // Step modes: 1 = when nonfinite_out comes out true, write nothing in place (weight, bias,
  // momentum buffers, peer_mean keep their values; decided on the device). Outputs are written.
  int skip_nonfinite = 0;

  // ---- gradient mode: outputs in the input dtype, contiguous
  uintptr_t grad_weight = 0;  // [n, k]
  uintptr_t grad_bias = 0;    // [n] (0 when bias == 0)

  // ---- update mode: SGDUpdate.coefficients() (ff_kernels/backends.py), in float32:
  //   d = grad + wd_grad p;  with a buffer: buf = keep buf + gain d, d = buf;  p -= lr (d + wd_step p)
  double lr = 0.0, keep = 0.0, gain = 1.0, wd_grad = 0.0, wd_step = 0.0;
  uintptr_t buf_weight = 0, buf_bias = 0;  // momentum buffers, contiguous; 0: no buffer
  int buf_weight_f32 = 1, buf_bias_f32 = 1;  // 1: buffer is float32, 0: buffer has the input dtype

  // ---- peer normalisation (both step modes; DESIGN.md 1.7): 0 = off. peer_mean [n] float32,
  // contiguous, updated in place: m <- rho m + (1 - rho) (sum of h over the positive rows) / m_pos;
  // then dL/dz_ij += kappa (m_j - mean(m)) for every positive row i and every unit j.
  uintptr_t peer_mean = 0;
  double peer_rho = 0.9, peer_kappa = 0.0;
};

// What one ff_layer_run call does for these arguments (no CUDA call when args.sm_count > 0).
struct FFLayerPlan {
  int64_t workspace_floats = 0;  // float32 elements of the workspace it needs (and zeroes)
  int64_t wgrad_splits = 0;      // batch chunks of the weight-gradient GEMM (0 in forward mode)
  int launches = 0;              // kernels it enqueues (after one cudaMemsetAsync of the workspace)
};

// Validates the arguments that shape the plan (std::invalid_argument -> Python ValueError).
FFLayerPlan ff_layer_plan(const FFLayerArgs& args);

// Validates the arguments (std::invalid_argument -> Python ValueError), switches to args.device
// (restoring the caller's current device afterwards) and enqueues the kernels on args.stream.
// A CUDA error raises std::runtime_error naming the op (-> Python RuntimeError).
void ff_layer_run(const FFLayerArgs& args);

// The fused SGD rule alone (SGDUpdate.coefficients(), the same device code as the step's update):
//   d = grad + wd_grad p;  with a buffer: buf = keep buf + gain d, d = buf;  p -= lr (d + wd_step p)
// in float32 on `numel` contiguous entries, in place on param and buf, one kernel on `stream`.
struct FFSgdArgs {
  int dtype = kFloat32;  // FFDtype of param and grad
  int device = 0;
  uintptr_t stream = 0;
  int sm_count = 0;      // 0: ask the driver (sizes the grid)
  uintptr_t param = 0;   // [numel] contiguous, updated in place
  uintptr_t grad = 0;    // [numel] contiguous, param's dtype
  int64_t numel = 0;
  uintptr_t buf = 0;     // momentum buffer [numel] contiguous, or 0 (no buffer)
  int buf_f32 = 1;       // 1: buf is float32, 0: param's dtype
  double lr = 0.0, keep = 0.0, gain = 1.0, wd_grad = 0.0, wd_step = 0.0;
  uintptr_t skip = 0;    // a device byte (a 0-dim bool tensor): non-zero = change nothing; 0: none
};

// Validates (std::invalid_argument), switches to args.device and enqueues the update; no host sync.
void ff_sgd_update(const FFSgdArgs& args);

}  // namespace ff_kernels
