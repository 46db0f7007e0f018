// Host launchers of the fused Forward-Forward layer step: validation, the launch plan (workspace
// layout, weight-gradient batch split), device switch and the launches (see ff_layer_kernels.cuh
// for the kernels and their math).
#include "ff_layer.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda_check.h"
#include "ff_layer_kernels.cuh"
#include "launch.h"

namespace ff_kernels {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round4(int64_t v) { return ceil_div(v, 4) * 4; }  // floats: keeps regions 16-byte aligned

// Float offsets into the workspace (-1: absent), each region 16-byte aligned; ff_layer_run zeroes
// [0, total) on the stream before the kernels:
//   q [m] | fp16: exps [m, ceil(n / 32)] int8 | step modes: f [m] | scalars [4]: the bits of the
//   gradient operand's two bounds, the non-finite flag (byte 0 of word 2), the loss sum (word 3) |
//   peer norm: hsum [n], p [n] | several batch chunks: gb [n], gW [n k]
struct WorkspaceLayout {
  int64_t q = 0, exps = -1, f = -1, scalars = -1, hsum = -1, p = -1, gb = -1, gw = -1, total = 0;
};

struct Plan {
  bool step = false, peer = false;
  int sms = 0;
  int64_t splits = 0, chunk = 0;  // weight-gradient batch chunks and rows per chunk
  int launches = 0;
  WorkspaceLayout ws;
};

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("ff_layer_run: " + what);
}

constexpr int64_t kMaxGridYZ = 65535;

// pointers: also check the device pointers (ff_layer_run; the plan needs only shapes and modes).
void validate(const FFLayerArgs& a, bool pointers) {
  require(a.dtype == kFloat32 || a.dtype == kFloat16 || a.dtype == kBFloat16,
          "dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(a.dtype));
  require(a.mode == kModeForward || a.mode == kModeGradient || a.mode == kModeUpdate,
          "mode must be 0 (forward), 1 (gradient) or 2 (update), got " + std::to_string(a.mode));
  require(a.device >= 0, "device must be >= 0");
  require(a.m_pos >= 1 && a.m_neg >= 0, "need m_pos >= 1 and m_neg >= 0");
  require(a.n >= 1 && a.k >= 1, "need n >= 1 and k >= 1");
  require(!pointers || (a.x_pos != 0 && a.weight != 0 && a.y != 0 && a.g != 0 && a.workspace != 0),
          "x_pos, weight, y, g and workspace must be device pointers, got 0");
  require(!pointers || a.m_neg == 0 || a.x_neg != 0, "x_neg is 0 but m_neg > 0");
  require(a.goodness_mean == 0 || a.goodness_mean == 1, "goodness_mean must be 0 or 1");
  require(a.norm == kNormL2 || a.norm == kNormRms || a.norm == kNormNone, "norm must be 0, 1 or 2");
  require(a.eps > 0.0, "eps must be > 0");
  const int64_t m = a.m_pos + a.m_neg;
  require(ceil_div(a.n, ffl::kTile) <= kMaxGridYZ,
          "n too large for the grid (n <= " + std::to_string(kMaxGridYZ * ffl::kTile) + ")");
  require(ceil_div(m, ffl::kTile) <= INT32_MAX && ceil_div(a.k, ffl::kTile) <= INT32_MAX,
          "m or k too large for the grid");
  if (a.mode == kModeForward) {
    require(a.peer_mean == 0, "peer_mean applies to the step modes only");
    return;
  }
  require(a.m_neg >= 1, "the step modes need m_neg >= 1");
  require(a.loss == kLossSoftplus || a.loss == kLossSymba, "loss must be 0 (softplus) or 1 (symba)");
  require(a.loss != kLossSymba || a.m_neg == a.m_pos, "loss symba needs m_pos == m_neg");
  require(!pointers || (a.loss_out != 0 && a.nonfinite_out != 0),
          "loss_out and nonfinite_out must be device pointers");
  require(a.skip_nonfinite == 0 || a.skip_nonfinite == 1, "skip_nonfinite must be 0 or 1");
  require(std::isfinite(a.peer_rho) && a.peer_rho >= 0.0 && a.peer_rho < 1.0 &&
              std::isfinite(a.peer_kappa),
          "peer_rho must be in [0, 1) and peer_kappa finite");
  if (a.mode == kModeGradient) {
    require(!pointers || a.grad_weight != 0, "grad_weight must be a device pointer in gradient mode");
    require(!pointers || a.bias == 0 || a.grad_bias != 0,
            "grad_bias must be a device pointer when bias is given");
    return;
  }
  for (double c : {a.lr, a.keep, a.gain, a.wd_grad, a.wd_step})
    require(std::isfinite(c), "update coefficients (lr, keep, gain, wd_grad, wd_step) must be finite");
  require(a.buf_bias == 0 || (a.buf_weight != 0 && a.bias != 0),
          "buf_bias needs buf_weight and a bias");
  require(a.buf_weight == 0 || a.bias == 0 || a.buf_bias != 0,
          "buf_bias must be a device pointer when buf_weight and bias are given");
  require(a.bias == 0 || a.bias_stride == 1, "bias must be contiguous in update mode");
  require(a.weight_stride_row == a.k && a.weight_stride_col == 1,
          "weight must be contiguous in update mode");
}

const char* op_name(int mode) {
  return mode == kModeForward ? "ff_layer_forward (cuda)" : "ff_layer_step (cuda)";
}

// Validates the arguments, then lays out the workspace and sizes the weight-gradient batch split.
Plan make_plan(const FFLayerArgs& a, bool pointers) {
  validate(a, pointers);
  Plan pl;
  const int64_t m = a.m_pos + a.m_neg;
  pl.step = a.mode != kModeForward;
  pl.peer = pl.step && a.peer_mean != 0;
  WorkspaceLayout& w = pl.ws;
  int64_t off = round4(m);
  if (a.dtype == kFloat16) {
    w.exps = off;
    off += round4(ceil_div(m * ceil_div(a.n, 32), 4));
  }
  pl.launches = 2;
  if (!pl.step) {
    w.total = off;
    return pl;
  }
  w.f = off;
  off += round4(m);
  w.scalars = off;
  off += 4;
  if (pl.peer) {
    w.hsum = off;
    off += round4(a.n);
    w.p = off;
    off += round4(a.n);
  }
  // Split the batch over grid z only when the N x K output tiles leave SMs idle, then into enough
  // chunks for ~2 blocks per SM. Otherwise one chunk: the epilogue finishes the gradient (no N x K
  // scratch to zero, no atomics, no apply launch), and the weight gradient is deterministic.
  int sms = a.sm_count;
  if (sms <= 0)
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, a.device),
               (std::string(op_name(a.mode)) + ": cudaDeviceGetAttribute(MultiProcessorCount)").c_str());
  pl.sms = std::max(sms, 1);
  const int64_t tiles = ceil_div(a.k, ffl::kTile) * ceil_div(a.n, ffl::kTile);
  constexpr int64_t kMinChunk = 256;  // rows per chunk: below this the atomics dominate
  int64_t splits = tiles >= pl.sms ? 1 : ceil_div(2 * int64_t(pl.sms), tiles);
  splits = std::max<int64_t>(1, std::min({splits, ceil_div(m, kMinChunk), kMaxGridYZ}));
  pl.chunk = ceil_div(ceil_div(m, splits), 32) * 32;  // a multiple of every dtype's step
  pl.splits = ceil_div(m, pl.chunk);                   // every chunk has rows
  if (pl.splits > 1) {
    if (a.bias != 0) {
      w.gb = off;
      off += round4(a.n);
    }
    w.gw = off;
    off += a.n * a.k;
  }
  w.total = off;
  pl.launches = 3 + int(pl.peer) + int(pl.splits > 1);
  return pl;
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

void check_launch(const char* op, const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) check_cuda(err, (std::string(op) + ": launch of " + kernel).c_str());
}

// Rows that cp.async can copy in 16-byte chunks: unit column stride, 16-byte aligned row starts.
bool rows_async(uintptr_t ptr, int64_t stride_row, int64_t stride_col, int64_t elem) {
  return ptr % 16 == 0 && stride_col == 1 && (stride_row * elem) % 16 == 0;
}

constexpr const char* kSgdOp = "ff_sgd_update (cuda)";

// The finish kernel over nk weight entries (+ n bias entries when ap.gb): grid-stride, at most 16
// blocks per SM.
template <typename T>
void launch_apply(const ffl::ApplyParams& ap, int sms, cudaStream_t stream, const char* op) {
  using namespace ffl;
  const int64_t groups = ceil_div(ap.nk, 4) + (ap.gb != nullptr ? ceil_div(ap.n, 4) : 0);
  const int64_t blocks = std::min<int64_t>(ceil_div(groups, kThreads), int64_t(sms) * 16);
  FF_LAUNCH(unsigned(blocks), kThreads, stream, ff_apply_kernel<T>)(ap);
  check_launch(op, "ff_apply_kernel");
}

template <typename T, int kKind>
void run_typed(const FFLayerArgs& a, const Plan& pl, cudaStream_t stream) {
  using namespace ffl;
  const char* op = op_name(a.mode);
  const int64_t m = a.m_pos + a.m_neg, elem = int64_t(sizeof(T));
  const WorkspaceLayout& wl = pl.ws;
  float* ws = reinterpret_cast<float*>(a.workspace);
  auto region = [&](int64_t off) { return off >= 0 ? ws + off : nullptr; };
  int8_t* exps = reinterpret_cast<int8_t*>(region(wl.exps));
  unsigned int* bounds = reinterpret_cast<unsigned int*>(region(wl.scalars));  // words 0, 1
  unsigned char* nonfinite = bounds != nullptr ? reinterpret_cast<unsigned char*>(bounds + 2) : nullptr;
  float* loss_sum = bounds != nullptr ? reinterpret_cast<float*>(bounds + 3) : nullptr;
  // the flag as the skip byte of the in-place writes (running mean, SGD), when the caller asks
  const unsigned char* skip = a.skip_nonfinite ? nonfinite : nullptr;

  // 0. the workspace: every region starts at zero (q, bounds, flag and loss are accumulated)
  check_cuda(cudaMemsetAsync(ws, 0, size_t(wl.total) * sizeof(float), stream),
             (std::string(op) + ": cudaMemsetAsync of the workspace").c_str());
  const bool x_async =
      rows_async(a.x_pos, a.x_pos_stride_row, a.x_pos_stride_col, elem) &&
      (a.m_neg == 0 || rows_async(a.x_neg, a.x_neg_stride_row, a.x_neg_stride_col, elem));

  // 1. forward GEMM + bias + relu + row sums of squares (+ peer column sums)
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
  fp.x_async = x_async;
  fp.w = reinterpret_cast<const void*>(a.weight);
  fp.sw_r = a.weight_stride_row;
  fp.sw_c = a.weight_stride_col;
  fp.w_async = rows_async(a.weight, a.weight_stride_row, a.weight_stride_col, elem);
  fp.bias = reinterpret_cast<const void*>(a.bias);
  fp.sb = a.bias_stride;
  fp.y = reinterpret_cast<void*>(a.y);
  fp.q = region(wl.q);
  fp.exps = exps;
  fp.hsum = region(wl.hsum);
  fp.nonfinite = nonfinite;
  const dim3 grid_fwd{unsigned(ceil_div(m, kTile)), unsigned(ceil_div(a.n, kTile)), 1u};
  FF_LAUNCH(grid_fwd, kThreads, stream, ff_forward_kernel<T, kKind>)(fp);
  check_launch(op, "ff_forward_kernel");

  // 2. row finalise: goodness, loss, coefficient, normalisation, gradient operand bound
  RowParams rp{};
  rp.m = m;
  rp.m_pos = a.m_pos;
  rp.n = a.n;
  rp.goodness_mean = a.goodness_mean;
  rp.norm = a.norm;
  rp.loss = pl.step ? a.loss : -1;
  rp.threshold = float(a.threshold);
  rp.eps = float(a.eps);
  rp.alpha = float(a.alpha);
  float* f = region(wl.f);
  FF_LAUNCH(unsigned(ceil_div(m, kWarps)), kThreads, stream, ff_finalize_kernel<T>)(
      rp, region(wl.q), exps, reinterpret_cast<T*>(a.y), reinterpret_cast<float*>(a.g), f,
      loss_sum, bounds, nonfinite);
  check_launch(op, "ff_finalize_kernel");
  if (!pl.step) return;

  // 3. peer normalisation: running mean, p, |p| bound
  if (pl.peer) {
    PeerParams pp{};
    pp.mean = reinterpret_cast<float*>(a.peer_mean);
    pp.hsum = region(wl.hsum);
    pp.p = region(wl.p);
    pp.p_bound_bits = bounds + 1;
    pp.skip = skip;
    pp.n = a.n;
    pp.m_pos = a.m_pos;
    pp.rho = float(a.peer_rho);
    pp.kappa = float(a.peer_kappa);
    FF_LAUNCH(1u, kThreads, stream, ff_peer_kernel)(pp);
    check_launch(op, "ff_peer_kernel");
  }

  // 4. weight (and bias) gradient, finished in its epilogue unless the batch is split
  FinishParams fin{};
  fin.update = a.mode == kModeUpdate;
  fin.grad_w = reinterpret_cast<void*>(a.grad_weight);
  fin.grad_b = reinterpret_cast<void*>(a.grad_bias);
  fin.w = reinterpret_cast<void*>(a.weight);
  fin.b = reinterpret_cast<void*>(a.bias);
  fin.buf_w = reinterpret_cast<void*>(a.buf_weight);
  fin.buf_b = reinterpret_cast<void*>(a.buf_bias);
  fin.buf_w_f32 = a.buf_weight_f32;
  fin.buf_b_f32 = a.buf_bias_f32;
  fin.lr = float(a.lr);
  fin.keep = float(a.keep);
  fin.gain = float(a.gain);
  fin.wd_grad = float(a.wd_grad);
  fin.wd_step = float(a.wd_step);
  fin.skip = skip;
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
  wp.x_async = x_async;
  wp.y = reinterpret_cast<const void*>(a.y);
  wp.y_vec = a.y % 16 == 0 && (a.n * elem) % 16 == 0;
  wp.f = f;
  wp.p_peer = region(wl.p);
  wp.bounds = bounds;
  wp.nonfinite = nonfinite;
  wp.loss_sum = loss_sum;
  wp.loss_out = reinterpret_cast<float*>(a.loss_out);
  wp.nonfinite_out = reinterpret_cast<unsigned char*>(a.nonfinite_out);
  wp.bias_grad = a.bias != 0;
  wp.chunk = pl.chunk;
  wp.split = pl.splits > 1;
  wp.gw = region(wl.gw);
  wp.gb = region(wl.gb);
  wp.fin = fin;
  const dim3 grid_wgrad{unsigned(ceil_div(a.k, kTile)), unsigned(ceil_div(a.n, kTile)),
                        unsigned(pl.splits)};
  FF_LAUNCH(grid_wgrad, kThreads, stream, ff_wgrad_kernel<T, kKind>)(wp);
  check_launch(op, "ff_wgrad_kernel");
  if (pl.splits == 1) return;

  // 5. gradients out in the weight dtype, or the SGD step, from the split scratch
  ApplyParams ap{};
  ap.gw = wp.gw;
  ap.gb = wp.gb;
  ap.gw_f32 = 1;
  ap.nk = a.n * a.k;
  ap.n = a.n;
  ap.fin = fin;
  launch_apply<T>(ap, pl.sms, stream, op);
}

template <typename T>
void sgd_typed(const FFSgdArgs& a, int sms, cudaStream_t stream) {
  using namespace ffl;
  FinishParams fin{};
  fin.update = 1;
  fin.w = reinterpret_cast<void*>(a.param);
  fin.buf_w = reinterpret_cast<void*>(a.buf);
  fin.buf_w_f32 = a.buf_f32;
  fin.buf_b_f32 = 1;
  fin.lr = float(a.lr);
  fin.keep = float(a.keep);
  fin.gain = float(a.gain);
  fin.wd_grad = float(a.wd_grad);
  fin.wd_step = float(a.wd_step);
  fin.skip = reinterpret_cast<const unsigned char*>(a.skip);
  ApplyParams ap{};
  ap.gw = reinterpret_cast<const void*>(a.grad);
  ap.gw_f32 = std::is_same_v<T, float>;
  ap.nk = a.numel;
  ap.fin = fin;
  launch_apply<T>(ap, sms, stream, kSgdOp);
}

}  // namespace

FFLayerPlan ff_layer_plan(const FFLayerArgs& a) {
  const Plan pl = make_plan(a, false);
  FFLayerPlan out;
  out.workspace_floats = pl.ws.total;
  out.wgrad_splits = pl.splits;
  out.launches = pl.launches;
  return out;
}

void ff_layer_run(const FFLayerArgs& a) {
  const Plan pl = make_plan(a, true);
  require(a.workspace_floats >= pl.ws.total,
          "workspace_floats " + std::to_string(a.workspace_floats) + " < the " +
              std::to_string(pl.ws.total) + " this call needs (ff_layer_plan)");
  DeviceGuard guard(a.device, op_name(a.mode));
  const auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kFloat32:
      if (a.allow_tf32)
        run_typed<float, ffl::kMathTensorCore>(a, pl, stream);
      else
        run_typed<float, ffl::kMathSimt>(a, pl, stream);
      break;
    case kFloat16:
      run_typed<__half, ffl::kMathTensorCore>(a, pl, stream);
      break;
    default:
      run_typed<__nv_bfloat16, ffl::kMathTensorCore>(a, pl, stream);
      break;
  }
}

void ff_sgd_update(const FFSgdArgs& a) {
  auto need = [](bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument(std::string("ff_sgd_update: ") + what);
  };
  need(a.dtype == kFloat32 || a.dtype == kFloat16 || a.dtype == kBFloat16,
       "dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(a.dtype));
  need(a.device >= 0, "device must be >= 0");
  need(a.numel >= 0, "numel must be >= 0");
  need(a.numel == 0 || (a.param != 0 && a.grad != 0), "param and grad must be device pointers");
  need(a.buf_f32 == 0 || a.buf_f32 == 1, "buf_f32 must be 0 or 1");
  for (double c : {a.lr, a.keep, a.gain, a.wd_grad, a.wd_step})
    need(std::isfinite(c), "coefficients (lr, keep, gain, wd_grad, wd_step) must be finite");
  if (a.numel == 0) return;
  DeviceGuard guard(a.device, kSgdOp);
  int sms = a.sm_count;
  if (sms <= 0)
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, a.device),
               (std::string(kSgdOp) + ": cudaDeviceGetAttribute(MultiProcessorCount)").c_str());
  sms = std::max(sms, 1);
  const auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kFloat32:
      sgd_typed<float>(a, sms, stream);
      break;
    case kFloat16:
      sgd_typed<__half>(a, sms, stream);
      break;
    default:
      sgd_typed<__nv_bfloat16>(a, sms, stream);
      break;
  }
}

}  // namespace ff_kernels
