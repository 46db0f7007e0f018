// Host API of the fused Forward-Forward layer step (DESIGN.md section 1), without libtorch.
//
// Python (ff_kernels/cuda_backend.py) fills one FFLayerArgs with raw device pointers
// (tensor.data_ptr()), shapes and strides in elements, config values and the CUDA stream, then
// calls ff_layer_run. All launches go to that stream on `device`; nothing synchronises the host.
#pragma once

#include <cstdint>

namespace ff_kernels {

// What ff_layer_run does after the forward pass (y, g).
enum FFLayerMode : int {
  kModeForward = 0,   // y, g only (ff_layer_forward): no loss, no gradient
  kModeGradient = 1,  // + loss, grad_weight, grad_bias written in the weight dtype
  kModeUpdate = 2,    // + loss, SGD (momentum, weight decay) applied in place to weight, bias
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
  uintptr_t loss_out = 0;  // [] float32, ZEROED by the caller (step modes)
  uintptr_t workspace = 0;  // float32 [ff_layer_workspace_floats(...)], ZEROED by the caller

  // ---- gradient mode: outputs in the input dtype, contiguous
  uintptr_t grad_weight = 0;  // [n, k]
  uintptr_t grad_bias = 0;    // [n] (0 when bias == 0)

  // ---- update mode: torch.optim.SGD (dampening 0, no nesterov)
  double lr = 0.0, momentum = 0.0, weight_decay = 0.0;
  uintptr_t buf_weight = 0, buf_bias = 0;  // momentum buffers (momentum != 0), contiguous
  int buf_weight_f32 = 1, buf_bias_f32 = 1;  // 1: buffer is float32, 0: buffer has the input dtype
};

// Number of float32 elements of the zeroed workspace ff_layer_run needs for m rows.
int64_t ff_layer_workspace_floats(int64_t m, int64_t n, int64_t k, int mode);

// Validates the arguments (std::invalid_argument -> Python ValueError), switches to args.device
// (restoring the caller's current device afterwards) and enqueues the kernels on args.stream.
// A CUDA error raises std::runtime_error naming the op (-> Python RuntimeError).
void ff_layer_run(const FFLayerArgs& args);

}  // namespace ff_kernels
