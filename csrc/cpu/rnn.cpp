// Fused Elman RNN on the CPU: the whole sequence forward, and backprop through time, in C++.
//
// Forward, for t = 0 .. T-1 (x_t: (B, I), h_t: (B, H), act = tanh or relu):
//   h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh),    h_{-1} = hx
// The input projection of all T steps is one (T*B, I) x (I, H) product (with b_ih + b_hh folded in), written
// into the output buffer; each step then adds h_{t-1} W_hh^T and applies the activation. Token input (integer
// (T, B)) stands for one-hot rows of size I: x_t W_ih^T is then column x_t of W_ih, i.e. a row gather of W_ih^T
// (no one-hot matrix exists).
//
// Backward (BPTT), with dout_t the gradient reaching h_t from outside (the output; h_n is output[T-1]):
//   dpre_t   = act_grad(dpre_{t+1} W_hh + dout_t, h_t)     dpre_T = 0; act_grad(g, h) = g * act'(y) read from
//                                                          h = act(y): 1 - h^2 (tanh), [not h <= 0] (relu)
//   dhx      = dpre_0 W_hh
//   dW_hh    = sum_t dpre_t^T h_{t-1}   one product over all T*B rows after the loop
//   dW_ih    = sum_t dpre_t^T x_t       one product (float input) or a scatter-add of dpre rows (tokens)
//   db       = sum_t sum_b dpre_t       (the same for b_ih and b_hh)
//   dx_t     = dpre_t W_ih              one (T*B, H) x (H, I) product
// Only the (B, H) x (H, H) product of the recurrence stays inside the loop, forward and backward: every weight
// gradient is one large product over all steps, not T small ones. The cell (nn.RNNCell) is the same op with T = 1.
// act and act_grad are simd::activate / simd::act_grad on every path (one definition of tanh, relu, and of
// relu's gradient at NaN).
//
// Every product of a call runs on one Backend, chosen once per call (choose_backend):
//   kKernel  float32 on AVX-512 or AVX2, T >= 2 (the default there): the loop over time is the step kernel of
//            rnn_recurrence.cpp (product and epilogue fused, one OpenMP region for all steps; d_hx from its last
//            pass); the input projection and d_input are gemm_packed, the weight gradients gemm_tn (gemm.cpp).
//   kMkl     everything else (float64, T = 1, CPUs with neither): at::mm / addmm, one product per step.
//   kOneDnn  on request only (MMOPS_RNN_BACKEND=onednn, for comparisons): each step one oneDNN product (W_hh
//            reordered once) and an elementwise pass; the input projection, d_input, d_hx on oneDNN; the weight
//            gradients gemm_tn (oneDNN would first copy the transposed operands).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/rnn_recurrence.h"
#include "cpu/simd.h"
#include "op_args.h"

namespace mmops {
namespace {

using at::Tensor;

using simd::kGrainElements;
using simd::kRelu;
using simd::kTanh;

// ---- the elementwise passes of the per-step loop (kMkl, kOneDnn) -------------------------------------------------
// h = act(pre) (pre may be h itself); g = act_grad(m + dout, h) (m may be g itself). Plain loops compiled per ISA
// (MMOPS_SIMD_CLONES) for float; double for checking.
template <typename T>
MMOPS_INLINE void act_fwd_loop(int64_t act, T* h, const T* pre, int64_t n) {
  simd::with_activation(act, [&](auto a) MMOPS_INLINE_LAMBDA {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) h[i] = simd::activate<decltype(a)::value>(pre[i]);
  });
}
template <typename T>
MMOPS_INLINE void act_bwd_loop(int64_t act, T* g, const T* m, const T* dout, const T* h, int64_t n) {
  simd::with_activation(act, [&](auto a) MMOPS_INLINE_LAMBDA {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) g[i] = simd::act_grad<decltype(a)::value>(m[i] + dout[i], h[i]);
  });
}
MMOPS_SIMD_CLONES void act_fwd(int64_t act, float* h, const float* pre, int64_t n) { act_fwd_loop(act, h, pre, n); }
void act_fwd(int64_t act, double* h, const double* pre, int64_t n) { act_fwd_loop(act, h, pre, n); }
MMOPS_SIMD_CLONES void act_bwd(int64_t act, float* g, const float* m, const float* dout, const float* h, int64_t n) {
  act_bwd_loop(act, g, m, dout, h, n);
}
void act_bwd(int64_t act, double* g, const double* m, const double* dout, const double* h, int64_t n) {
  act_bwd_loop(act, g, m, dout, h, n);
}

// ---- oneDNN, through the ops torch registers: mkldnn::_linear_pointwise(X, W, B?, "none", ...) = X W^T (+ B) and
// .binary(X, other, W, B?, "add") = X W^T + other; W may be reordered once into oneDNN's blocked layout.
struct OneDnn {
  std::optional<c10::OperatorHandle> linear, linear_add, reorder;
};
const OneDnn& onednn() {
  static const OneDnn ops = [] {
    OneDnn o;
    auto& dispatcher = c10::Dispatcher::singleton();
    o.linear = dispatcher.findOp({"mkldnn::_linear_pointwise", ""});
    o.linear_add = dispatcher.findOp({"mkldnn::_linear_pointwise", "binary"});
    o.reorder = dispatcher.findOp({"mkldnn::_reorder_linear_weight", ""});
    if (!o.linear || !o.linear_add || !o.reorder) o = OneDnn{};
    return o;
  }();
  return ops;
}

Tensor call_boxed(const c10::OperatorHandle& op, std::vector<c10::IValue> stack) {
  op.callBoxed(&stack);
  return stack.at(0).toTensor();
}

// x (M, K) W^T (+ bias) for W (N, K) (any strides, or reordered by onednn_reorder).
Tensor onednn_linear(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias = std::nullopt) {
  return call_boxed(*onednn().linear, {x, w, bias ? c10::IValue(bias->contiguous()) : c10::IValue(),
                                       std::string("none"), c10::List<std::optional<c10::Scalar>>(), c10::IValue()});
}
// x (M, K) W^T + other (M, N).
Tensor onednn_linear_add(const Tensor& x, const Tensor& w, const Tensor& other) {
  return call_boxed(*onednn().linear_add, {x, other, w, c10::IValue(), std::string("add")});
}
// W (N, K) reordered once for the products of a recurrence whose left side has `rows` rows.
Tensor onednn_reorder(const Tensor& w, int64_t rows) {
  return call_boxed(*onednn().reorder, {w.contiguous(), c10::IValue(rows)});
}

// ---- the backend ------------------------------------------------------------------------------------------------
// The kernels' backend names their ISA (gemm.h), chosen once per call: weights packed for one width are read by
// the same width's kernels.
enum class Backend { kMkl, kOneDnn, kKernelAvx2, kKernelAvx512 };
bool is_kernel(Backend b) { return b == Backend::kKernelAvx2 || b == Backend::kKernelAvx512; }
cpu::KernelIsa isa_of(Backend b) {
  return b == Backend::kKernelAvx512 ? cpu::KernelIsa::kAvx512 : b == Backend::kKernelAvx2 ? cpu::KernelIsa::kAvx2
                                                                                           : cpu::KernelIsa::kNone;
}

// An environment variable's value, "" when unset.
std::string env_value(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

// float32 on an AVX-512 CPU takes the kernels from two steps on, at every size and on every vendor's CPU: per
// product shape of the RNN they run at 70-97% of the CPU's measured FMA peak, level with or ahead of oneDNN and
// MKL, and the step kernel saves each step's library call, elementwise pass and fork/join (bench/results/rnn.md,
// which also gives the reasoning for Intel CPUs, where MKL's sgemm runs at full AVX-512 width). On an AVX2 CPU
// (AMD Zen 1-3, Intel client cores) the same kernels at 8 lanes: on an AMD EPYC Zen 3, 2 threads, mmops.nn.RNN
// fwd+bwd against nn.RNN, kernels / MKL per step, interleaved in one process: T35 B32 I28 H256 2.05x / 1.86x,
// T16 B32 I64 H64 2.76x / 2.65x, T64 B128 I128 H512 1.38x / 1.24x, tokens at T35 2.41x / 1.94x. One step (the
// cell) stays on MKL: packing W_hh costs about as much as the step. Read per call, so that a benchmark can
// compare the backends in one process: MMOPS_RNN_BACKEND=mkl|onednn|kernel forces one where it can run (oneDNN
// where torch has it); MMOPS_NO_STEP_KERNEL=1 means mkl; MMOPS_KERNEL_ISA=avx2|avx512 picks the kernels' build (avx2
// on an AVX-512 CPU: its tests run both).
Backend choose_backend(at::ScalarType dtype, int64_t T) {
  // each variable checked, so that a misspelt value does not silently measure the default
  const std::string forced = env_value("MMOPS_RNN_BACKEND"), no_step = env_value("MMOPS_NO_STEP_KERNEL"),
                    isa_name = env_value("MMOPS_KERNEL_ISA");
  TORCH_CHECK_VALUE(forced.empty() || forced == "mkl" || forced == "onednn" || forced == "kernel",
                    "MMOPS_RNN_BACKEND must be mkl, onednn or kernel (or unset), got '", forced, "'");
  TORCH_CHECK_VALUE(no_step.empty() || no_step == "0" || no_step == "1",
                    "MMOPS_NO_STEP_KERNEL must be 0 or 1 (or unset), got '", no_step, "'");
  cpu::KernelIsa isa = cpu::kernel_isa();
  if (isa_name == "avx2") {
    TORCH_CHECK_VALUE(isa != cpu::KernelIsa::kNone, "MMOPS_KERNEL_ISA=avx2, but this CPU has no AVX2 + FMA");
    isa = cpu::KernelIsa::kAvx2;
  } else if (isa_name == "avx512") {
    TORCH_CHECK_VALUE(isa == cpu::KernelIsa::kAvx512, "MMOPS_KERNEL_ISA=avx512, but this CPU has no AVX-512");
  } else {
    TORCH_CHECK_VALUE(isa_name.empty(), "MMOPS_KERNEL_ISA must be avx2 or avx512 (or unset), got '", isa_name, "'");
  }
  if (dtype != at::kFloat || isa == cpu::KernelIsa::kNone) return Backend::kMkl;  // the kernels are float32 SIMD code
  const Backend kernel = isa == cpu::KernelIsa::kAvx512 ? Backend::kKernelAvx512 : Backend::kKernelAvx2;
  if (forced == "mkl" || no_step == "1") return Backend::kMkl;
  if (forced == "onednn") return onednn().linear ? Backend::kOneDnn : Backend::kMkl;
  if (forced == "kernel") return kernel;
  return T >= 2 ? kernel : Backend::kMkl;
}

// W (rows, cols) packed for gemm_packed / the step kernel: as B = W^T (transpose) or B = W.
Tensor packed(cpu::KernelIsa isa, const Tensor& w, bool transpose) {
  const Tensor wc = w.contiguous();
  const int64_t rows = wc.size(0), cols = wc.size(1);
  const int64_t K = transpose ? cols : rows, N = transpose ? rows : cols;
  Tensor out = at::empty({cpu::packed_floats(isa, K, N)}, w.options());
  cpu::pack_panels(isa, wc.const_data_ptr<float>(), K, N, transpose ? 1 : cols, transpose ? cols : 1,
                   out.mutable_data_ptr<float>(), at::get_num_threads());
  return out;
}

// x (M, K) W^T + bias for W (N, K): the input projection. A fresh contiguous (M, N) tensor.
Tensor times_transposed(Backend b, const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias) {
  if (b == Backend::kMkl) return bias ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
  if (b == Backend::kOneDnn) return onednn_linear(x, w, bias);
  const int64_t M = x.size(0), N = w.size(0);
  const Tensor xc = x.contiguous(), bias_c = bias ? bias->contiguous() : Tensor();
  Tensor c = at::empty({M, N}, x.options());
  cpu::gemm_packed(isa_of(b), xc.const_data_ptr<float>(), M, xc.size(1), xc.size(1),
                   packed(isa_of(b), w, true).const_data_ptr<float>(),
                   N, bias ? bias_c.const_data_ptr<float>() : nullptr, c.mutable_data_ptr<float>(),
                   at::get_num_threads());
  return c;
}

// a (M, K) W for W (K, N): d_input = dpre W_ih, d_hx = dpre_0 W_hh.
Tensor times(Backend b, const Tensor& a, const Tensor& w) {
  if (b == Backend::kMkl) return at::mm(a, w);
  if (b == Backend::kOneDnn) return onednn_linear(a, w.t());
  const int64_t M = a.size(0), N = w.size(1);
  const Tensor ac = a.contiguous();
  Tensor c = at::empty({M, N}, a.options());
  cpu::gemm_packed(isa_of(b), ac.const_data_ptr<float>(), M, ac.size(1), ac.size(1),
                   packed(isa_of(b), w, false).const_data_ptr<float>(),
                   N, nullptr, c.mutable_data_ptr<float>(), at::get_num_threads());
  return c;
}

// sum_s G_s^T P_s over row-aligned pairs (G_s (rows, M), P_s (rows, N), unit column stride): the weight
// gradients, one product over all steps' rows.
struct RowPair {
  Tensor g, p;
};
Tensor sum_transposed_products(Backend b, const std::vector<RowPair>& pairs, int64_t M, int64_t N) {
  if (b == Backend::kMkl) {
    Tensor c = at::mm(pairs[0].g.t(), pairs[0].p);
    for (size_t s = 1; s < pairs.size(); ++s) c.addmm_(pairs[s].g.t(), pairs[s].p);
    return c;
  }
  std::vector<cpu::RowSegment> segs;
  for (const RowPair& rp : pairs)
    segs.push_back({rp.g.const_data_ptr<float>(), rp.g.stride(0), rp.p.const_data_ptr<float>(), rp.p.stride(0),
                    rp.g.size(0)});
  Tensor c = at::empty({M, N}, pairs[0].g.options());
  // oneDNN's weight gradients run on the kernels too (oneDNN would first copy the transposed operands): those of
  // this CPU (choose_backend picks oneDNN only where there are some)
  const cpu::KernelIsa isa = is_kernel(b) ? isa_of(b) : cpu::kernel_isa();
  cpu::gemm_tn(isa, segs.data(), int(segs.size()), M, N, c.mutable_data_ptr<float>(), at::get_num_threads());
  return c;
}

// The product of each step in the per-step loop (kMkl, kOneDnn): a (B, K) W_kn for a fixed W_kn (K, N), the
// weight prepared once (oneDNN: reordered when at least 3 products share it).
class StepProduct {
 public:
  StepProduct(Backend b, const Tensor& w_kn, int64_t rows, int64_t products)
      : b_(b), w_(b == Backend::kMkl ? w_kn : products >= 3 ? onednn_reorder(w_kn.t(), rows) : w_kn.t()) {}
  // a W_kn + y when accumulate, a W_kn otherwise: into y (MKL) or a fresh block (oneDNN); returns the result.
  Tensor operator()(const Tensor& a, Tensor& y, bool accumulate) const {
    if (b_ == Backend::kOneDnn) return accumulate ? onednn_linear_add(a, w_, y) : onednn_linear(a, w_);
    if (accumulate) return y.addmm_(a, w_);
    return at::mm_out(y, a, w_);
  }

 private:
  Backend b_;
  Tensor w_;  // kMkl: W_kn; kOneDnn: W_kn^T (N, K), maybe reordered
};

// Elementwise passes over one step's (B, H) block: split across threads only when it is large.
template <typename F>
void for_blocks(int64_t n, F&& body) {
  at::parallel_for(0, n, kGrainElements, [&](int64_t i0, int64_t i1) { body(i0, i1); });
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

bool has(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// Shapes of the problem, from the arguments, with every check that names the argument.
using Dims = args::RnnDims;

// The schema's checks (csrc/op_args.h) plus this backend's dtypes.
Dims check_args(const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, int64_t act, const char* fn) {
  const Dims d = args::rnn(input, hx, w_ih, w_hh, b_ih, b_hh, act, fn);
  TORCH_CHECK_TYPE(w_ih.scalar_type() == at::kFloat || w_ih.scalar_type() == at::kDouble, fn,
                   ": weights must be float32 or float64, got ", w_ih.scalar_type());
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
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the products below are internal: no autograd
  const int64_t TB = d.T * d.B;
  if (TB == 0 || d.H == 0) return at::empty({d.T, d.B, d.H}, w_ih.options());
  const Backend backend = choose_backend(w_ih.scalar_type(), d.T);
  std::optional<Tensor> bias;  // b_ih + b_hh, added once with the input projection
  if (has(b_ih) && has(b_hh)) bias = at::add(*b_ih, *b_hh);
  else if (has(b_ih)) bias = *b_ih;
  else if (has(b_hh)) bias = *b_hh;

  // 1. out[t] = x_t W_ih^T + b for every step
  Tensor out;
  if (!d.tokens) {
    out = times_transposed(backend, input.contiguous().view({TB, d.I}), w_ih, bias).view({d.T, d.B, d.H});
  } else {
    out = at::empty({d.T, d.B, d.H}, w_ih.options());
    const Tensor tok = checked_tokens(input, d.I, "mmops.rnn");
    const Tensor w_t = w_ih.t().contiguous();  // (I, H): token k's projection is row k
    const Tensor bias_c = bias ? bias->contiguous() : Tensor();
    AT_DISPATCH_FLOATING_TYPES(w_ih.scalar_type(), "mmops_rnn_gather", [&] {
      const int64_t* tp = tok.const_data_ptr<int64_t>();
      const scalar_t* wp = w_t.const_data_ptr<scalar_t>();
      const scalar_t* bp = bias ? bias_c.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, TB, std::max<int64_t>(1, kGrainElements / d.H),
                       [&](int64_t j0, int64_t j1) { gather_rows(tp, wp, bp, op, d.H, j0, j1); });
    });
  }

  // 2. out[t] = act(out[t] + h_{t-1} W_hh^T)
  const Tensor h0 = hx.contiguous();
  if (is_kernel(backend)) {
    cpu::rnn_recurrence_forward(isa_of(backend), out.mutable_data_ptr<float>(), h0.const_data_ptr<float>(),
                                packed(isa_of(backend), w_hh, /*transpose=*/true).const_data_ptr<float>(), d.T, d.B,
                                d.H, act, at::get_num_threads());
    return out;
  }
  const StepProduct step(backend, w_hh.t(), d.B, d.T);
  AT_DISPATCH_FLOATING_TYPES(w_ih.scalar_type(), "mmops_rnn_forward", [&] {
    for (int64_t t = 0; t < d.T; ++t) {
      Tensor ht = out.select(0, t);
      const Tensor pre = step(t == 0 ? h0 : out.select(0, t - 1), ht, /*accumulate=*/true);
      scalar_t* hp = ht.mutable_data_ptr<scalar_t>();
      const scalar_t* pp = pre.const_data_ptr<scalar_t>();
      for_blocks(d.B * d.H, [&](int64_t i0, int64_t i1) { act_fwd(act, hp + i0, pp + i0, i1 - i0); });
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
  const auto [need_input, need_hx, need_w_ih, need_w_hh, need_bias] = output_mask;
  const int64_t TB = d.T * d.B, H = d.H, BH = d.B * d.H;
  auto empty0 = [&] { return at::empty({0}, w_ih.options()); };
  Tensor d_input = empty0(), d_hx = empty0(), d_w_ih = empty0(), d_w_hh = empty0(), d_b = empty0();
  if (TB == 0 || H == 0) {
    if (need_input && !d.tokens) d_input = at::zeros(input.sizes(), w_ih.options());
    if (need_hx) d_hx = at::zeros(hx.sizes(), hx.options());
    if (need_w_ih) d_w_ih = at::zeros(w_ih.sizes(), w_ih.options());
    if (need_w_hh) d_w_hh = at::zeros(w_hh.sizes(), w_hh.options());
    if (need_bias) d_b = at::zeros({H}, w_ih.options());
    return {d_input, d_hx, d_w_ih, d_w_hh, d_b};
  }
  const Backend backend = choose_backend(w_ih.scalar_type(), d.T);
  const Tensor h = output.contiguous();
  const Tensor dout = grad_output.contiguous();
  const Tensor h0 = hx.contiguous();

  // 1. dpre_t = act_grad(dpre_{t+1} W_hh + dout_t, h_t), t = T-1 .. 0
  Tensor dpre = at::empty({d.T, d.B, H}, w_ih.options());
  if (is_kernel(backend)) {
    if (need_hx) d_hx = at::empty({d.B, H}, w_ih.options());
    cpu::rnn_recurrence_backward(isa_of(backend), dpre.mutable_data_ptr<float>(), dout.const_data_ptr<float>(),
                                 h.const_data_ptr<float>(),
                                 packed(isa_of(backend), w_hh, /*transpose=*/false).const_data_ptr<float>(),
                                 need_hx ? d_hx.mutable_data_ptr<float>() : nullptr, d.T, d.B, H, act,
                                 at::get_num_threads());
  } else {
    const StepProduct step(backend, w_hh, d.B, d.T - 1);
    AT_DISPATCH_FLOATING_TYPES(w_ih.scalar_type(), "mmops_rnn_backward", [&] {
      for (int64_t t = d.T - 1; t >= 0; --t) {
        Tensor gt = dpre.select(0, t);
        scalar_t* g = gt.mutable_data_ptr<scalar_t>();
        Tensor m = gt;  // dpre_{t+1} W_hh, 0 at the last step
        if (t == d.T - 1) std::fill(g, g + BH, scalar_t(0));
        else m = step(dpre.select(0, t + 1), gt, /*accumulate=*/false);
        const scalar_t* mp = m.const_data_ptr<scalar_t>();
        const scalar_t* go = dout.const_data_ptr<scalar_t>() + t * BH;
        const scalar_t* hp = h.const_data_ptr<scalar_t>() + t * BH;
        for_blocks(BH, [&](int64_t i0, int64_t i1) { act_bwd(act, g + i0, mp + i0, go + i0, hp + i0, i1 - i0); });
      }
    });
    // 2. dhx = dpre_0 W_hh (the step kernel computed it in its last pass)
    if (need_hx) d_hx = times(backend, dpre.select(0, 0), w_hh);
  }

  // 3. the weight and bias gradients, each one product over all steps
  const Tensor dpre2d = dpre.view({TB, H});
  if (need_w_hh) {  // dW_hh = dpre_0^T hx + sum_{t >= 1} dpre_t^T h_{t-1}
    std::vector<RowPair> pairs{{dpre.select(0, 0), h0}};
    if (d.T > 1) pairs.push_back({dpre2d.narrow(0, d.B, TB - d.B), h.view({TB, H}).narrow(0, 0, TB - d.B)});
    d_w_hh = sum_transposed_products(backend, pairs, H, H);
  }
  if (need_bias) d_b = at::sum(dpre2d, 0);
  if (!d.tokens) {
    const Tensor x2d = input.contiguous().view({TB, d.I});
    if (need_input) d_input = times(backend, dpre2d, w_ih).view({d.T, d.B, d.I});  // dx = dpre W_ih
    if (need_w_ih) d_w_ih = sum_transposed_products(backend, {{dpre2d, x2d}}, H, d.I);  // sum_t dpre_t^T x_t
  } else if (need_w_ih) {
    // dW_ih[:, k] = sum of the dpre rows whose token is k: a scatter-add into dW_ih^T (I, H), threads split
    // the H columns so that no two write the same element.
    const Tensor tok = checked_tokens(input, d.I, "mmops.rnn backward");
    Tensor dw_t = at::zeros({d.I, H}, w_ih.options());
    AT_DISPATCH_FLOATING_TYPES(w_ih.scalar_type(), "mmops_rnn_scatter", [&] {
      const int64_t* tp = tok.const_data_ptr<int64_t>();
      const scalar_t* gp = dpre.const_data_ptr<scalar_t>();
      scalar_t* wp = dw_t.mutable_data_ptr<scalar_t>();
      const int64_t col_grain = std::max<int64_t>(16, kGrainElements / TB);
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
