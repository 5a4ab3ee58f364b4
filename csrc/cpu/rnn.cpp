// Fused Elman RNN on the CPU: the whole sequence forward, and backprop through time, in C++.
//
// Forward, for t = 0 .. T-1 (x_t: (B, I), h_t: (B, H), act = tanh or relu):
//   h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh),    h_{-1} = hx
// The input projection of all T steps is one (T*B, I) x (I, H) matmul (with b_ih + b_hh folded in), written
// straight into the output buffer; each step then adds h_{t-1} W_hh^T in place (one small matmul) and applies
// the activation in place. Token input (integer (T, B)) stands for one-hot rows of size I: x_t W_ih^T is then
// column x_t of W_ih, i.e. a row gather of W_ih^T (no one-hot matrix exists).
//
// Backward (BPTT), with dout_t the gradient reaching h_t from outside (the output; h_n is output[T-1]):
//   dpre_t   = (dpre_{t+1} W_hh + dout_t) * act'(h_t)        (dpre_T = 0; act' from the saved h_t:
//                                                             1 - h^2 for tanh, [h > 0] for relu)
//   dhx      = dpre_0 W_hh
//   dW_hh    = sum_t dpre_t^T h_{t-1}   one (H, T*B) x (T*B, H) matmul after the loop
//   dW_ih    = sum_t dpre_t^T x_t       one matmul (float input) or a scatter-add of dpre rows (tokens)
//   db       = sum_t sum_b dpre_t       (the same for b_ih and b_hh)
//   dx_t     = dpre_t W_ih              one (T*B, H) x (H, I) matmul
// Only the (B, H) x (H, H) matmul of the recurrence stays inside the loop, forward and backward: every
// weight gradient is one large matmul over all steps, not T small ones.
// The cell (nn.RNNCell) is the same kernel with T = 1.
//
// Who computes what (float32 on an AVX-512 CPU; the rest -- float64, other CPUs, MMOPS_NO_STEP_KERNEL=1 -- takes
// at::mm / addmm, i.e. MKL, per step):
//   recurrence, B*H*H < 16M and T >= 2   the step kernel of rnn_recurrence.cpp (product + epilogue, one OpenMP
//                                        region for all steps)
//   recurrence, B*H*H >= 16M             oneDNN per step, W_hh packed once (use_onednn)
//   dW_hh, dW_ih (float input)           the weight-gradient kernel of rnn_recurrence.cpp (one pass over all rows)
//   input projection, d_input (float)    with the step kernel: its micro-kernel, W_ih packed (rnn_packed_product);
//                                        otherwise MKL or oneDNN
//   d_hx                                 the step kernel's last pass when it ran; otherwise MKL or oneDNN
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "cpu/rnn_recurrence.h"
#include "cpu/simd.h"

namespace mmops {
namespace {

using at::Tensor;

using simd::kGrainElements;
using simd::kRelu;
using simd::kTanh;

// ---- h = act(pre), elementwise (pre may be h itself) ------------------------------------------------------
template <typename T, int kAct>
MMOPS_INLINE void activate(T* h, const T* pre, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) h[i] = simd::activate<kAct>(pre[i]);
}

// ---- g = (m + dout) * act'(h), act' read from the activation's output h (m may be g itself) --------------
template <typename T, int kAct>
MMOPS_INLINE void add_times_act_grad(T* g, const T* m, const T* dout, const T* h, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    g[i] = simd::act_grad<kAct>(m[i] + dout[i], h[i]);
  }
}

MMOPS_SIMD_CLONES void act_fwd(int64_t act, float* h, const float* pre, int64_t n) {
  if (act == kTanh) activate<float, kTanh>(h, pre, n);
  else activate<float, kRelu>(h, pre, n);
}
void act_fwd(int64_t act, double* h, const double* pre, int64_t n) {
  if (act == kTanh) activate<double, kTanh>(h, pre, n);
  else activate<double, kRelu>(h, pre, n);
}
MMOPS_SIMD_CLONES void act_bwd(int64_t act, float* g, const float* m, const float* dout, const float* h, int64_t n) {
  if (act == kTanh) add_times_act_grad<float, kTanh>(g, m, dout, h, n);
  else add_times_act_grad<float, kRelu>(g, m, dout, h, n);
}
void act_bwd(int64_t act, double* g, const double* m, const double* dout, const double* h, int64_t n) {
  if (act == kTanh) add_times_act_grad<double, kTanh>(g, m, dout, h, n);
  else add_times_act_grad<double, kRelu>(g, m, dout, h, n);
}

// ---- matmuls: oneDNN where torch was built with it, for float32 recurrences big enough to repay it -------
// On the AMD EPYC (Zen 5, AVX-512) machines this project is measured on, MKL's sgemm takes its generic AVX2
// path ("mkl_blas_def_sgemm_kernel_0_zen"); oneDNN's JIT kernels use AVX-512 by CPU feature, and measured
// 1.4-2.3x faster on these shapes alone (128x512 @ 512x512 427 -> 186 us, 8192x128 @ 128x512 6.35 -> 2.75 ms;
// 2 threads). torch registers them as mkldnn::_linear_pointwise(X, W, B?, "none", ...) = X W^T (+ B) and
// .binary(X, other, W, B?, "add") = X W^T + other. The choice is made once per call for all its products: at
// (T35, B32, H256) even the one big product (dW_hh, 1120 rows) through oneDNN made the whole fwd+bwd slower
// (4.4 -> 5.0 ms, measured interleaved), so oneDNN is used only where the per-step (B, H) x (H, H) product has
// at least kOneDnnMinStepMacs multiply-adds (T64 B128 H512: 34M, fwd+bwd 1.08x -> 1.7x of nn.RNN). float64,
// smaller recurrences, and MMOPS_NO_ONEDNN=1 use at::mm (MKL).
constexpr int64_t kOneDnnMinStepMacs = int64_t(16) << 20;

struct OneDnn {
  std::optional<c10::OperatorHandle> linear, linear_add, reorder;
};
const OneDnn& onednn() {
  static const OneDnn ops = [] {
    OneDnn o;
    const char* off = std::getenv("MMOPS_NO_ONEDNN");
    if (off && std::string(off) == "1") return o;
    auto& dispatcher = c10::Dispatcher::singleton();
    o.linear = dispatcher.findOp({"mkldnn::_linear_pointwise", ""});
    o.linear_add = dispatcher.findOp({"mkldnn::_linear_pointwise", "binary"});
    o.reorder = dispatcher.findOp({"mkldnn::_reorder_linear_weight", ""});
    if (!o.linear || !o.linear_add || !o.reorder) o = OneDnn{};
    return o;
  }();
  return ops;
}

// Whether a recurrence with this batch, hidden size and dtype runs its products on oneDNN.
bool use_onednn(at::ScalarType dtype, int64_t B, int64_t H) {
  return dtype == at::kFloat && onednn().linear && B * H * H >= kOneDnnMinStepMacs;
}

Tensor call_boxed(const c10::OperatorHandle& op, std::vector<c10::IValue> stack) {
  op.callBoxed(&stack);
  return stack.at(0).toTensor();
}

// x (M, K) @ w^T for w (N, K), any strides; plus `other` (M, N) when given; w may be a packed_weight (dnn).
Tensor linear_nt(bool dnn, const Tensor& x, const Tensor& w, const Tensor* other = nullptr) {
  if (!dnn) return other ? at::addmm(*other, x, w.t()) : at::mm(x, w.t());
  if (other) return call_boxed(*onednn().linear_add, {x, *other, w, c10::IValue(), std::string("add")});
  return call_boxed(*onednn().linear, {x, w, c10::IValue(), std::string("none"),
                                       c10::List<std::optional<c10::Scalar>>(), c10::IValue()});
}

// x (M, K) @ w^T + bias (N,) for the input projection.
Tensor linear_nt_bias(bool dnn, const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias) {
  if (!dnn) return bias ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
  return call_boxed(*onednn().linear, {x, w, bias ? c10::IValue(bias->contiguous()) : c10::IValue(),
                                       std::string("none"), c10::List<std::optional<c10::Scalar>>(), c10::IValue()});
}

// w (N, K) repacked once into oneDNN's blocked layout for the T products of a recurrence with a (batch, K) left
// side.
Tensor packed_weight(const Tensor& w, const Tensor& like_x) {
  return call_boxed(*onednn().reorder, {w.contiguous(), c10::IValue(like_x.size(0))});
}

// ---- float32 on AVX-512: the hand-written kernels of rnn_recurrence.cpp ----------------------------------------
// The step kernel (recurrences below oneDNN's size): one OpenMP region for the whole loop over time, W_hh packed
// once per call, the epilogue fused into the product. The weight-gradient kernel (every float32 size): dW_hh and
// dW_ih as one pass over the rows of dpre and h / x in place; through MKL or oneDNN these are products of
// transposed operands, which oneDNN first copies (at T64 B128 H512: 7 copies of 2 ms per fwd+bwd).
// MMOPS_NO_STEP_KERNEL=1 turns both off (read per call, so a benchmark can compare both in one process).
bool use_avx512_kernels(at::ScalarType dtype) {
  if (dtype != at::kFloat || !cpu::rnn_recurrence_available()) return false;
  const char* off = std::getenv("MMOPS_NO_STEP_KERNEL");
  return !(off && std::string(off) == "1");
}
// From two steps on: packing W_hh costs more than one step gains (the cell, T = 1: 290 vs 273 us fwd+bwd at B32
// H256; T = 2: 360 vs 410 us; measured interleaved).
bool use_step_kernel(bool avx512_kernels, bool dnn, int64_t T) { return avx512_kernels && !dnn && T >= 2; }

// B = w (transpose false) or w^T (true), w a (rows, cols) matrix, packed into the kernels' 32-column panels.
Tensor kernel_panels(const Tensor& w, bool transpose) {
  const Tensor wc = w.contiguous();
  const int64_t rows = wc.size(0), cols = wc.size(1);
  const int64_t K = transpose ? cols : rows, N = transpose ? rows : cols;  // B (K, N); B(k, n) = w[k][n] or w[n][k]
  Tensor packed = at::empty({cpu::rnn_packed_floats(K, N)}, w.options());
  cpu::rnn_pack_panels(wc.const_data_ptr<float>(), K, N, transpose ? 1 : cols, transpose ? cols : 1,
                       packed.mutable_data_ptr<float>(), at::get_num_threads());
  return packed;
}

// ---- token input: out[j] = W_ih^T[tok[j]] + bias (forward); dW_ih^T[tok[j]] += dpre[j] (backward) --------
template <typename T>
void gather_rows(const int64_t* tok, const T* w_t, const T* bias, T* out, int64_t H, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    const T* w = w_t + tok[j] * H;
    T* o = out + j * H;
    if (bias) {
#pragma omp simd
      for (int64_t h = 0; h < H; ++h) o[h] = w[h] + bias[h];
    } else {
      std::copy(w, w + H, o);
    }
  }
}

// Columns [c0, c1) of every row: threads own disjoint columns, so no two write one element.
template <typename T>
void scatter_add_rows(const int64_t* tok, const T* dpre, T* dw_t, int64_t H, int64_t rows, int64_t c0, int64_t c1) {
  for (int64_t j = 0; j < rows; ++j) {
    T* w = dw_t + tok[j] * H;
    const T* g = dpre + j * H;
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) w[c] += g[c];
  }
}

// Elementwise passes over one step's (B, H) block: split across threads only when it is large.
template <typename F>
void for_blocks(int64_t n, F&& body) {
  at::parallel_for(0, n, kGrainElements, [&](int64_t i0, int64_t i1) { body(i0, i1); });
}

bool has(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// Shapes of the problem, from the arguments, with every check that names the argument.
struct Dims {
  int64_t T, B, I, H;
  bool tokens;
};

Dims check_args(const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, int64_t act, const char* fn) {
  TORCH_CHECK_VALUE(act == kTanh || act == kRelu, fn, ": nonlinearity code ", act, " is not 1 (tanh) or 2 (relu)");
  const bool tokens = !at::isFloatingType(input.scalar_type());
  TORCH_CHECK_TYPE(!tokens || input.scalar_type() == at::kLong || input.scalar_type() == at::kInt, fn,
                   ": input must be floating point (T, B, input_size) or integer tokens (T, B), got ",
                   input.scalar_type());
  TORCH_CHECK_VALUE(input.dim() == (tokens ? 2 : 3), fn, ": expected ", tokens ? "token input of shape (T, B)" :
                    "input of shape (T, B, input_size)", ", got ", input.sizes());
  TORCH_CHECK_VALUE(w_ih.dim() == 2 && w_hh.dim() == 2, fn, ": weight_ih and weight_hh must be 2-D, got ",
                    w_ih.sizes(), " and ", w_hh.sizes());
  const int64_t H = w_hh.size(0), I = w_ih.size(1);
  const Dims d{input.size(0), input.size(1), I, H, tokens};
  const at::ScalarType dt = w_ih.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble, fn, ": weights must be float32 or float64, got ", dt);
  TORCH_CHECK_VALUE(w_hh.size(1) == H, fn, ": weight_hh must be (hidden_size, hidden_size), got ", w_hh.sizes());
  TORCH_CHECK_VALUE(w_ih.size(0) == H, fn, ": weight_ih has ", w_ih.size(0), " rows but hidden_size is ", H);
  TORCH_CHECK_VALUE(tokens || input.size(2) == I, fn, ": input has input_size ", input.size(2),
                    " but weight_ih expects ", I);
  TORCH_CHECK_VALUE(hx.dim() == 2 && hx.size(0) == d.B && hx.size(1) == H, fn, ": hx must have shape (", d.B, ", ",
                    H, "), got ", hx.sizes());
  auto same = [&](const Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == dt, fn, ": ", name, " dtype ", t.scalar_type(), " does not match weight_ih ",
                     dt);
    TORCH_CHECK(t.device() == w_ih.device(), fn, ": ", name, " is on ", t.device(), " but weight_ih is on ",
                w_ih.device());
  };
  same(w_hh, "weight_hh");
  same(hx, "hx");
  if (!tokens) same(input, "input");
  for (const auto* b : {&b_ih, &b_hh}) {
    if (!has(*b)) continue;
    TORCH_CHECK_VALUE((*b)->dim() == 1 && (*b)->size(0) == H, fn, ": ", b == &b_ih ? "bias_ih" : "bias_hh",
                      " must have shape (", H, ",), got ", (*b)->sizes());
    same(**b, b == &b_ih ? "bias_ih" : "bias_hh");
  }
  TORCH_CHECK_VALUE(!tokens || I > 0, fn, ": token input needs input_size > 0");
  return d;
}

// Token ids as int64, after one range check (an id outside [0, I) would read outside weight_ih).
Tensor checked_tokens(const Tensor& input, int64_t I, const char* fn) {
  const Tensor tok = input.to(at::kLong).contiguous();
  const int64_t* p = tok.const_data_ptr<int64_t>();
  for (int64_t j = 0, n = tok.numel(); j < n; ++j)
    TORCH_CHECK_INDEX(p[j] >= 0 && p[j] < I, fn, ": token id ", p[j], " at position ", j,
                      " is out of range for input_size ", I);
  return tok;
}

Tensor rnn_forward(const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                   const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, int64_t act) {
  const Dims d = check_args(input, hx, w_ih, w_hh, b_ih, b_hh, act, "mmops.rnn");
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the matmuls below are internal: no autograd
  const int64_t TB = d.T * d.B;
  Tensor out = at::empty({d.T, d.B, d.H}, w_ih.options());
  if (TB == 0 || d.H == 0) return out;
  const bool dnn = use_onednn(w_ih.scalar_type(), d.B, d.H);
  const bool step_kernel = use_step_kernel(use_avx512_kernels(w_ih.scalar_type()), dnn, d.T);
  std::optional<Tensor> bias;  // b_ih + b_hh, added once with the input projection
  if (has(b_ih) && has(b_hh)) bias = at::add(*b_ih, *b_hh);
  else if (has(b_ih)) bias = *b_ih;
  else if (has(b_hh)) bias = *b_hh;

  // 1. input projection of every step, into the output buffer
  if (!d.tokens) {
    const Tensor x2d = input.contiguous().view({TB, d.I});
    if (step_kernel) {
      const Tensor bias_c = bias ? bias->contiguous() : Tensor();
      cpu::rnn_packed_product(x2d.const_data_ptr<float>(), TB, d.I, d.I,
                              kernel_panels(w_ih, /*transpose=*/true).const_data_ptr<float>(), d.H,
                              bias ? bias_c.const_data_ptr<float>() : nullptr, out.mutable_data_ptr<float>(),
                              at::get_num_threads());
    } else {
      out = linear_nt_bias(dnn, x2d, w_ih, bias).view({d.T, d.B, d.H});  // a fresh contiguous (T*B, H) buffer
    }
  } else {
    const Tensor tok = checked_tokens(input, d.I, "mmops.rnn");
    const Tensor w_t = w_ih.t().contiguous();  // (I, H): token k's projection is row k
    AT_DISPATCH_FLOATING_TYPES(w_ih.scalar_type(), "mmops_rnn_gather", [&] {
      using T = scalar_t;
      const int64_t* tp = tok.const_data_ptr<int64_t>();
      const T* wp = w_t.const_data_ptr<T>();
      const Tensor bias_c = bias ? bias->contiguous() : Tensor();
      const T* bp = bias ? bias_c.const_data_ptr<T>() : nullptr;
      T* op = out.mutable_data_ptr<T>();
      const int64_t H = d.H;
      at::parallel_for(0, TB, std::max<int64_t>(1, kGrainElements / H),
                       [&](int64_t j0, int64_t j1) { gather_rows(tp, wp, bp, op, H, j0, j1); });
    });
  }

  // 2. the recurrence: h_t = act(proj_t + h_{t-1} W_hh^T) into out[t]: with MKL the matmul adds in place and the
  // activation runs in place; with oneDNN (W_hh packed once, from 3 steps on) the matmul + proj_t lands in a
  // fresh (B, H) block and the activation writes out[t] from it.
  const Tensor h0 = hx.contiguous();
  if (step_kernel) {
    const Tensor packed = kernel_panels(w_hh, /*transpose=*/true);
    cpu::rnn_recurrence_forward(out.mutable_data_ptr<float>(), h0.const_data_ptr<float>(),
                                packed.const_data_ptr<float>(), d.T, d.B, d.H, act, at::get_num_threads());
    return out;
  }
  const Tensor w_step = dnn ? (d.T >= 3 ? packed_weight(w_hh, h0) : w_hh) : w_hh.t();
  AT_DISPATCH_FLOATING_TYPES(w_ih.scalar_type(), "mmops_rnn_forward", [&] {
    using T = scalar_t;
    const int64_t BH = d.B * d.H;
    for (int64_t t = 0; t < d.T; ++t) {
      Tensor ht = out.select(0, t);
      const Tensor h_prev = t == 0 ? h0 : out.select(0, t - 1);
      Tensor pre = ht;
      if (dnn) pre = linear_nt(dnn, h_prev, w_step, &ht);
      else ht.addmm_(h_prev, w_step);
      T* hp = ht.mutable_data_ptr<T>();
      const T* pp = pre.const_data_ptr<T>();
      for_blocks(BH, [&](int64_t i0, int64_t i1) { act_fwd(act, hp + i0, pp + i0, i1 - i0); });
    }
  });
  return out;
}

// Returns (d_input, d_hx, d_weight_ih, d_weight_hh, d_bias); entries output_mask leaves out are empty (0,).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_backward(const Tensor& grad_output, const Tensor& output,
                                                                const Tensor& input, const Tensor& hx,
                                                                const Tensor& w_ih, const Tensor& w_hh, int64_t act,
                                                                std::array<bool, 5> output_mask) {
  const Dims d = check_args(input, hx, w_ih, w_hh, std::nullopt, std::nullopt, act, "mmops.rnn backward");
  TORCH_CHECK_VALUE(grad_output.sizes() == output.sizes() && output.dim() == 3 && output.size(0) == d.T &&
                    output.size(1) == d.B && output.size(2) == d.H, "mmops.rnn backward: grad_output ",
                    grad_output.sizes(), " and output ", output.sizes(), " must be (T, B, hidden_size)");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t TB = d.T * d.B, H = d.H, BH = d.B * d.H;
  auto empty0 = [&] { return at::empty({0}, w_ih.options()); };
  Tensor d_input = empty0(), d_hx = empty0(), d_w_ih = empty0(), d_w_hh = empty0(), d_b = empty0();
  const bool tokens_need_nothing = d.tokens;  // token ids have no gradient
  if (TB == 0 || H == 0) {
    if (output_mask[0] && !tokens_need_nothing) d_input = at::zeros(input.sizes(), w_ih.options());
    if (output_mask[1]) d_hx = at::zeros(hx.sizes(), hx.options());
    if (output_mask[2]) d_w_ih = at::zeros(w_ih.sizes(), w_ih.options());
    if (output_mask[3]) d_w_hh = at::zeros(w_hh.sizes(), w_hh.options());
    if (output_mask[4]) d_b = at::zeros({H}, w_ih.options());
    return {d_input, d_hx, d_w_ih, d_w_hh, d_b};
  }
  const Tensor h = output.contiguous();
  const Tensor dout = grad_output.contiguous();
  Tensor dpre = at::empty({d.T, d.B, H}, w_ih.options());
  // dpre_{t+1} W_hh = dpre_{t+1} (W_hh^T)^T: with oneDNN, W_hh^T packed once for all steps (from 4 steps on).
  const bool dnn = use_onednn(w_ih.scalar_type(), d.B, H);
  const bool grad_kernel = use_avx512_kernels(w_ih.scalar_type());  // dW_hh, dW_ih: any float32 size
  const bool step_kernel = use_step_kernel(grad_kernel, dnn, d.T);
  const Tensor w_step = step_kernel ? kernel_panels(w_hh, /*transpose=*/false)
                        : dnn ? (d.T >= 4 ? packed_weight(w_hh.t(), dpre.select(0, 0)) : w_hh.t()) : w_hh;

  if (step_kernel) {
    if (output_mask[1]) d_hx = at::empty({d.B, H}, w_ih.options());
    cpu::rnn_recurrence_backward(dpre.mutable_data_ptr<float>(), dout.const_data_ptr<float>(),
                                 h.const_data_ptr<float>(), w_step.const_data_ptr<float>(),
                                 output_mask[1] ? d_hx.mutable_data_ptr<float>() : nullptr, d.T, d.B, H, act,
                                 at::get_num_threads());
  } else AT_DISPATCH_FLOATING_TYPES(w_ih.scalar_type(), "mmops_rnn_backward", [&] {
    using T = scalar_t;
    // dpre_{T-1} = dout_{T-1} * act'(h_{T-1}); then dpre_t = (dpre_{t+1} W_hh + dout_t) * act'(h_t), the add
    // and act' applied in one pass over the matmul's result (MKL writes it into dpre_t, oneDNN into a fresh
    // (B, H) block).
    for (int64_t t = d.T - 1; t >= 0; --t) {
      Tensor gt = dpre.select(0, t);
      T* g = gt.mutable_data_ptr<T>();
      Tensor m = gt;
      if (t == d.T - 1) std::fill(g, g + BH, T(0));
      else if (dnn) m = linear_nt(dnn, dpre.select(0, t + 1), w_step);
      else at::mm_out(gt, dpre.select(0, t + 1), w_hh);
      const T* mp = m.const_data_ptr<T>();
      const T* go = dout.const_data_ptr<T>() + t * BH;
      const T* hp = h.const_data_ptr<T>() + t * BH;
      for_blocks(BH, [&](int64_t i0, int64_t i1) { act_bwd(act, g + i0, mp + i0, go + i0, hp + i0, i1 - i0); });
    }
  });

  const Tensor dpre2d = dpre.view({TB, H});
  const Tensor h0 = hx.contiguous();
  if (output_mask[1] && !step_kernel) d_hx = linear_nt(dnn, dpre.select(0, 0), w_hh.t());
  if (output_mask[3] && grad_kernel) {
    // dW_hh = sum_t dpre_t^T h_{t-1}: step 0's rows against hx, steps 1.. against output[:-1], one pass
    d_w_hh = at::empty({H, H}, w_ih.options());
    const float* gp = dpre.const_data_ptr<float>();
    const cpu::RowSegment segs[2] = {{gp, H, h0.const_data_ptr<float>(), H, d.B},
                                     {gp + BH, H, h.const_data_ptr<float>(), H, (d.T - 1) * d.B}};
    cpu::rnn_weight_grad(segs, 2, H, H, d_w_hh.mutable_data_ptr<float>(), at::get_num_threads());
  } else if (output_mask[3]) {
    // dW_hh = sum_t dpre_t^T h_{t-1}: steps 1.. in one matmul against output[:-1], plus step 0 against hx
    if (d.T > 1) {
      const int64_t rows = (d.T - 1) * d.B;
      const Tensor rest = linear_nt(dnn, dpre.narrow(0, 1, d.T - 1).reshape({rows, H}).t(),
                                    h.narrow(0, 0, d.T - 1).reshape({rows, H}).t());
      d_w_hh = linear_nt(dnn, dpre.select(0, 0).t(), h0.t(), &rest);
    } else {
      d_w_hh = linear_nt(dnn, dpre.select(0, 0).t(), h0.t());
    }
  }
  if (output_mask[4]) d_b = at::sum(dpre2d, 0);
  if (!d.tokens) {
    const Tensor x2d = input.contiguous().view({TB, d.I});
    if (output_mask[0] && step_kernel) {  // d_input = dpre W_ih
      d_input = at::empty({d.T, d.B, d.I}, w_ih.options());
      cpu::rnn_packed_product(dpre.const_data_ptr<float>(), TB, H, H,
                              kernel_panels(w_ih, /*transpose=*/false).const_data_ptr<float>(), d.I, nullptr,
                              d_input.mutable_data_ptr<float>(), at::get_num_threads());
    } else if (output_mask[0]) {
      d_input = linear_nt(dnn, dpre2d, w_ih.t()).view({d.T, d.B, d.I});
    }
    if (output_mask[2] && grad_kernel) {  // dW_ih = sum_t dpre_t^T x_t, one pass
      d_w_ih = at::empty({H, d.I}, w_ih.options());
      const cpu::RowSegment seg{dpre.const_data_ptr<float>(), H, x2d.const_data_ptr<float>(), d.I, TB};
      cpu::rnn_weight_grad(&seg, 1, H, d.I, d_w_ih.mutable_data_ptr<float>(), at::get_num_threads());
    } else if (output_mask[2]) {
      d_w_ih = linear_nt(dnn, dpre2d.t(), x2d.t());
    }
  } else if (output_mask[2]) {
    // dW_ih[:, k] = sum of the dpre rows whose token is k: a scatter-add into dW_ih^T (I, H), threads split
    // the H columns so that no two write the same element.
    const Tensor tok = checked_tokens(input, d.I, "mmops.rnn backward");
    Tensor dw_t = at::zeros({d.I, H}, w_ih.options());
    AT_DISPATCH_FLOATING_TYPES(w_ih.scalar_type(), "mmops_rnn_scatter", [&] {
      using T = scalar_t;
      const int64_t* tp = tok.const_data_ptr<int64_t>();
      const T* gp = dpre.const_data_ptr<T>();
      T* wp = dw_t.mutable_data_ptr<T>();
      const int64_t col_grain = std::max<int64_t>(16, kGrainElements / std::max<int64_t>(TB, 1));
      at::parallel_for(0, H, col_grain, [&](int64_t c0, int64_t c1) { scatter_add_rows(tp, gp, wp, H, TB, c0, c1); });
    });
    d_w_ih = dw_t.t().contiguous();
  }
  return {d_input, d_hx, d_w_ih, d_w_hh, d_b};
}

// ---- the cell: the sequence kernel with T = 1 --------------------------------------------------------------
Tensor rnn_cell_forward(const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                        const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, int64_t act) {
  TORCH_CHECK_VALUE(input.dim() == (at::isFloatingType(input.scalar_type()) ? 2 : 1),
                    "mmops.rnn_cell: expected input of shape (B, input_size) or tokens (B,), got ", input.sizes());
  return rnn_forward(input.unsqueeze(0), hx, w_ih, w_hh, b_ih, b_hh, act).squeeze(0);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_cell_backward(const Tensor& grad_h, const Tensor& h,
                                                                     const Tensor& input, const Tensor& hx,
                                                                     const Tensor& w_ih, const Tensor& w_hh,
                                                                     int64_t act, std::array<bool, 5> output_mask) {
  auto r = rnn_backward(grad_h.unsqueeze(0), h.unsqueeze(0), input.unsqueeze(0), hx, w_ih, w_hh, act, output_mask);
  Tensor& dx = std::get<0>(r);
  if (dx.dim() == 3) dx = dx.squeeze(0);
  return r;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmops, CPU, m) {
  m.impl("rnn_forward", &rnn_forward);
  m.impl("rnn_backward", &rnn_backward);
  m.impl("rnn_cell_forward", &rnn_cell_forward);
  m.impl("rnn_cell_backward", &rnn_cell_backward);
}

}  // namespace mmops
