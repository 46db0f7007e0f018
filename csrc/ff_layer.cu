// Host launchers of the fused Forward-Forward layer step: validation, device switch, workspace
// layout and the four launches (see ff_layer_kernels.cuh for the kernels and their math).
#include "ff_layer.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cuda_check.h"
#include "ff_layer_kernels.cuh"
#include "launch.h"

namespace ff_kernels {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Float offsets into the zeroed workspace. Forward mode: q only. Step modes:
//   q [m] | f [m] | max|f| bits [1, padded to 4] | gb [n, padded to 4] | gW [n * k]
struct WorkspaceLayout {
  int64_t q = 0, f = -1, fmax = -1, gb = -1, gw = -1, total = 0;
};

WorkspaceLayout workspace_layout(int64_t m, int64_t n, int64_t k, int mode) {
  WorkspaceLayout w;
  w.q = 0;
  if (mode == kModeForward) {
    w.total = m;
    return w;
  }
  w.f = m;
  w.fmax = 2 * m;
  w.gb = w.fmax + 4;
  w.gw = w.gb + ceil_div(n, 4) * 4;
  w.total = w.gw + n * k;
  return w;
}

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("ff_layer_run: " + what);
}

constexpr int64_t kMaxGridYZ = 65535;

void validate(const FFLayerArgs& a) {
  require(a.dtype == kFloat32 || a.dtype == kFloat16 || a.dtype == kBFloat16,
          "dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(a.dtype));
  require(a.mode == kModeForward || a.mode == kModeGradient || a.mode == kModeUpdate,
          "mode must be 0 (forward), 1 (gradient) or 2 (update), got " + std::to_string(a.mode));
  require(a.device >= 0, "device must be >= 0");
  require(a.m_pos >= 1 && a.m_neg >= 0, "need m_pos >= 1 and m_neg >= 0");
  require(a.n >= 1 && a.k >= 1, "need n >= 1 and k >= 1");
  require(a.x_pos != 0 && a.weight != 0 && a.y != 0 && a.g != 0 && a.workspace != 0,
          "x_pos, weight, y, g and workspace must be device pointers, got 0");
  require(a.m_neg == 0 || a.x_neg != 0, "x_neg is 0 but m_neg > 0");
  require(a.goodness_mean == 0 || a.goodness_mean == 1, "goodness_mean must be 0 or 1");
  require(a.norm == kNormL2 || a.norm == kNormRms || a.norm == kNormNone, "norm must be 0, 1 or 2");
  require(a.eps > 0.0, "eps must be > 0");
  const int64_t m = a.m_pos + a.m_neg;
  require(ceil_div(a.n, ffl::kTile) <= kMaxGridYZ,
          "n too large for the grid (n <= " + std::to_string(kMaxGridYZ * ffl::kTile) + ")");
  require(ceil_div(m, ffl::kTile) <= INT32_MAX && ceil_div(a.k, ffl::kTile) <= INT32_MAX,
          "m or k too large for the grid");
  if (a.mode == kModeForward) return;
  require(a.m_neg >= 1, "the step modes need m_neg >= 1");
  require(a.loss == kLossSoftplus || a.loss == kLossSymba, "loss must be 0 (softplus) or 1 (symba)");
  require(a.loss != kLossSymba || a.m_neg == a.m_pos, "loss symba needs m_pos == m_neg");
  require(a.loss_out != 0, "loss_out must be a device pointer");
  if (a.mode == kModeGradient) {
    require(a.grad_weight != 0, "grad_weight must be a device pointer in gradient mode");
    require(a.bias == 0 || a.grad_bias != 0, "grad_bias must be a device pointer when bias is given");
    return;
  }
  if (a.momentum != 0.0) {
    require(a.buf_weight != 0, "buf_weight must be a device pointer when momentum != 0");
    require(a.bias == 0 || a.buf_bias != 0, "buf_bias must be a device pointer when momentum != 0");
  }
  require(a.bias == 0 || a.bias_stride == 1, "bias must be contiguous in update mode");
  require(a.weight_stride_row == a.k && a.weight_stride_col == 1,
          "weight must be contiguous in update mode");
}

// Makes `device` current for the launches and restores the caller's device afterwards.
class DeviceGuard {
 public:
  DeviceGuard(int device, const std::string& op) {
    check_cuda(cudaGetDevice(&prev_), (op + ": cudaGetDevice").c_str());
    if (prev_ != device) {
      check_cuda(cudaSetDevice(device), (op + ": cudaSetDevice(" + std::to_string(device) + ")").c_str());
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(prev_);  // best effort: never throw from a destructor
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool switched_ = false;
};

const char* op_name(int mode) {
  return mode == kModeForward ? "ff_layer_forward (cuda)" : "ff_layer_step (cuda)";
}

void check_launch(const char* op, const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) check_cuda(err, (std::string(op) + ": launch of " + kernel).c_str());
}

template <typename T, int kKind>
void run_typed(const FFLayerArgs& a, cudaStream_t stream) {
  using namespace ffl;
  const char* op = op_name(a.mode);
  const bool step = a.mode != kModeForward;
  const int64_t m = a.m_pos + a.m_neg;
  const WorkspaceLayout wl = workspace_layout(m, a.n, a.k, a.mode);
  float* ws = reinterpret_cast<float*>(a.workspace);
  float* q = ws + wl.q;
  float* f = step ? ws + wl.f : nullptr;
  unsigned int* fmax = step ? reinterpret_cast<unsigned int*>(ws + wl.fmax) : nullptr;

  // 1. forward GEMM + bias + relu + row sums of squares
  ForwardParams fp{};
  fp.x_pos = reinterpret_cast<const void*>(a.x_pos);
  fp.x_neg = reinterpret_cast<const void*>(a.x_neg);
  fp.m_pos = a.m_pos;
  fp.m = m;
  fp.n = a.n;
  fp.k = a.k;
  fp.sxp_r = a.x_pos_stride_row;
  fp.sxp_c = a.x_pos_stride_col;
  fp.sxn_r = a.x_neg_stride_row;
  fp.sxn_c = a.x_neg_stride_col;
  fp.w = reinterpret_cast<const void*>(a.weight);
  fp.sw_r = a.weight_stride_row;
  fp.sw_c = a.weight_stride_col;
  fp.bias = reinterpret_cast<const void*>(a.bias);
  fp.sb = a.bias_stride;
  fp.y = reinterpret_cast<void*>(a.y);
  fp.q = q;
  const dim3 grid_fwd{unsigned(ceil_div(m, kTile)), unsigned(ceil_div(a.n, kTile)), 1u};
  FF_LAUNCH(grid_fwd, kThreads, stream, ff_forward_kernel<T, kKind>)(fp);
  check_launch(op, "ff_forward_kernel");

  // 2. row finalise: goodness, loss, coefficient, normalisation
  RowParams rp{};
  rp.m = m;
  rp.m_pos = a.m_pos;
  rp.n = a.n;
  rp.goodness_mean = a.goodness_mean;
  rp.norm = a.norm;
  rp.loss = step ? a.loss : -1;
  rp.threshold = float(a.threshold);
  rp.eps = float(a.eps);
  rp.alpha = float(a.alpha);
  FF_LAUNCH(unsigned(ceil_div(m, kWarps)), kThreads, stream, ff_finalize_kernel<T>)(
      rp, q, reinterpret_cast<T*>(a.y), reinterpret_cast<float*>(a.g), f,
      step ? reinterpret_cast<float*>(a.loss_out) : nullptr, fmax);
  check_launch(op, "ff_finalize_kernel");
  if (!step) return;

  // 3. weight (and bias) gradient, split over M so that ~2 blocks per SM are busy
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, a.device),
             (std::string(op) + ": cudaDeviceGetAttribute(MultiProcessorCount)").c_str());
  const int64_t ktiles = ceil_div(a.k, kTile), ntiles = ceil_div(a.n, kTile);
  constexpr int64_t kMinChunk = 256;  // rows per split: below this the atomics dominate
  int64_t splits = ceil_div(2 * int64_t(std::max(sms, 1)), ktiles * ntiles);
  splits = std::max<int64_t>(1, std::min({splits, ceil_div(m, kMinChunk), kMaxGridYZ}));
  const int64_t chunk = ceil_div(ceil_div(m, splits), kTileK) * kTileK;
  splits = ceil_div(m, chunk);  // every split has rows
  WgradParams wp{};
  wp.x_pos = fp.x_pos;
  wp.x_neg = fp.x_neg;
  wp.m_pos = a.m_pos;
  wp.m = m;
  wp.n = a.n;
  wp.k = a.k;
  wp.sxp_r = a.x_pos_stride_row;
  wp.sxp_c = a.x_pos_stride_col;
  wp.sxn_r = a.x_neg_stride_row;
  wp.sxn_c = a.x_neg_stride_col;
  wp.y = reinterpret_cast<const void*>(a.y);
  wp.f = f;
  wp.fmax_bits = fmax;
  wp.gw = ws + wl.gw;
  wp.gb = a.bias != 0 ? ws + wl.gb : nullptr;
  wp.chunk = chunk;
  const dim3 grid_wgrad{unsigned(ktiles), unsigned(ntiles), unsigned(splits)};
  FF_LAUNCH(grid_wgrad, kThreads, stream, ff_wgrad_kernel<T, kKind>)(wp);
  check_launch(op, "ff_wgrad_kernel");

  // 4. gradients out in the weight dtype, or the fused SGD step in place
  ApplyParams ap{};
  ap.gw = wp.gw;
  ap.gb = wp.gb;
  ap.nk = a.n * a.k;
  ap.n = a.n;
  ap.update = a.mode == kModeUpdate;
  ap.grad_w = reinterpret_cast<void*>(a.grad_weight);
  ap.grad_b = reinterpret_cast<void*>(a.grad_bias);
  ap.w = reinterpret_cast<void*>(a.weight);
  ap.b = reinterpret_cast<void*>(a.bias);
  ap.use_momentum = a.momentum != 0.0;
  ap.use_weight_decay = a.weight_decay != 0.0;
  ap.buf_w = reinterpret_cast<void*>(a.buf_weight);
  ap.buf_b = reinterpret_cast<void*>(a.buf_bias);
  ap.buf_w_f32 = a.buf_weight_f32;
  ap.buf_b_f32 = a.buf_bias_f32;
  ap.lr = float(a.lr);
  ap.momentum = float(a.momentum);
  ap.weight_decay = float(a.weight_decay);
  const int64_t total = ap.nk + (ap.gb != nullptr ? a.n : 0);
  const int64_t blocks = std::min<int64_t>(ceil_div(total, kThreads), int64_t(std::max(sms, 1)) * 16);
  FF_LAUNCH(unsigned(blocks), kThreads, stream, ff_apply_kernel<T>)(ap);
  check_launch(op, "ff_apply_kernel");
}

}  // namespace

int64_t ff_layer_workspace_floats(int64_t m, int64_t n, int64_t k, int mode) {
  require(m >= 1 && n >= 1 && k >= 1, "workspace size needs m, n, k >= 1");
  require(mode == kModeForward || mode == kModeGradient || mode == kModeUpdate, "bad mode");
  return workspace_layout(m, n, k, mode).total;
}

void ff_layer_run(const FFLayerArgs& a) {
  validate(a);
  DeviceGuard guard(a.device, op_name(a.mode));
  const auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kFloat32:
      if (a.allow_tf32)
        run_typed<float, ffl::kMathTensorCore>(a, stream);
      else
        run_typed<float, ffl::kMathSimt>(a, stream);
      break;
    case kFloat16:
      run_typed<__half, ffl::kMathTensorCore>(a, stream);
      break;
    default:
      run_typed<__nv_bfloat16, ffl::kMathTensorCore>(a, stream);
      break;
  }
}

}  // namespace ff_kernels
