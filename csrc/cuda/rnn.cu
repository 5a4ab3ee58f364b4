// CUDA launcher of the RNN ops (schemas: csrc/ops.cpp; device code and schedules: rnn.cuh). The schedules' GEMMs
// run on cuBLAS through ATen's mm_out / addmm_ on views of the raw buffers (ATen picks the cuBLAS call and its
// workspace; no cuBLAS header is needed here). One host sync: the range check of token ids, before anything runs.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/any.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cuda/launch.h"
#include "op_args.h"
#include "cuda/rnn.cuh"

namespace mmops::cuda {
namespace {

using at::Tensor;

constexpr int64_t kTanh = 1, kRelu = 2;  // the nonlinearity codes (csrc/cpu/simd.h's Activation)

// Row-major C (m x n) = op(A) op(B) (+ C when beta = 1) on cuBLAS, through ATen on views of the buffers.
struct AtenGemm {
  at::TensorOptions options;
  template <typename T>
  void operator()(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const T* a, int64_t lda,
                  const T* b, int64_t ldb, double beta, T* c, int64_t ldc) const {
    auto view = [&](const void* p, int64_t rows, int64_t cols, int64_t ld) {
      return at::from_blob(const_cast<void*>(p), {rows, cols}, {ld, 1}, options);
    };
    const Tensor A = ta ? view(a, k, m, lda).t() : view(a, m, k, lda);
    const Tensor B = tb ? view(b, n, k, ldb).t() : view(b, k, n, ldb);
    Tensor C = view(c, m, n, ldc);
    if (beta == 0.0) at::mm_out(C, A, B);
    else C.addmm_(A, B, beta, alpha);
  }
};

using Dims = args::RnnDims;


// Token ids as int64 after one range check (one host sync).
Tensor checked_tokens(const Tensor& input, int64_t I, const char* fn) {
  const Tensor tok = input.to(at::kLong).contiguous();
  const bool bad = tok.numel() > 0 && at::any(tok.lt(0).logical_or_(tok.ge(I))).item<bool>();
  TORCH_CHECK_INDEX(!bad, fn, ": a token id is out of range for input_size ", I);
  return tok;
}

Tensor rnn_forward(const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                   const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, int64_t act) {
  const Dims d = args::rnn(input, hx, w_ih, w_hh, b_ih, b_hh, act, "mmops.rnn");
  const c10::cuda::CUDAGuard guard(w_ih.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the GEMMs are internal: no autograd
  Tensor out = at::empty({d.T, d.B, d.H}, w_ih.options());
  if (d.T * d.B == 0 || d.H == 0) return out;
  Tensor bias;  // b_ih + b_hh, added once with the input projection
  if (has(b_ih) && has(b_hh)) bias = at::add(*b_ih, *b_hh);
  else if (has(b_ih)) bias = b_ih->contiguous();
  else if (has(b_hh)) bias = b_hh->contiguous();
  const Tensor tok = d.tokens ? checked_tokens(input, d.I, "mmops.rnn") : Tensor();
  const Tensor x = d.tokens ? Tensor() : input.contiguous();
  const Tensor table = d.tokens ? w_ih.t().contiguous() : Tensor();  // (I, H): token k's projection is row k
  const Tensor wi = w_ih.contiguous(), wh = w_hh.contiguous(), h0 = hx.contiguous();
  dispatch_floating(w_ih.scalar_type(), "mmops.rnn", [&](auto zero) {
    using T = decltype(zero);
    CudaLaunch launch;
    AtenGemm gemm{w_ih.options()};
    rnn_forward_schedule(launch, gemm, RNNDims{d.T, d.B, d.I, d.H}, ptr<const T>(x), ptr<const int64_t>(tok),
                         ptr<const T>(table), ptr<const T>(h0), ptr<const T>(wi), ptr<const T>(wh),
                         ptr<const T>(bias), ptr<T>(out), static_cast<int>(act), num_sms());
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_backward(const Tensor& grad_output, const Tensor& output,
                                                                const Tensor& input, const Tensor& hx,
                                                                const Tensor& w_ih, const Tensor& w_hh, int64_t act,
                                                                std::array<bool, 5> output_mask) {
  const Dims d = args::rnn(input, hx, w_ih, w_hh, std::nullopt, std::nullopt, act, "mmops.rnn backward");
  TORCH_CHECK_VALUE(grad_output.sizes() == output.sizes() && output.dim() == 3 && output.size(0) == d.T &&
                    output.size(1) == d.B && output.size(2) == d.H, "mmops.rnn backward: grad_output ",
                    grad_output.sizes(), " and output ", output.sizes(), " must be (T, B, hidden_size)");
  const c10::cuda::CUDAGuard guard(w_ih.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto empty0 = [&] { return at::empty({0}, w_ih.options()); };
  Tensor d_input = empty0(), d_hx = empty0(), d_w_ih = empty0(), d_w_hh = empty0(), d_b = empty0();
  if (d.T * d.B == 0 || d.H == 0) {
    if (output_mask[0] && !d.tokens) d_input = at::zeros(input.sizes(), w_ih.options());
    if (output_mask[1]) d_hx = at::zeros(hx.sizes(), hx.options());
    if (output_mask[2]) d_w_ih = at::zeros(w_ih.sizes(), w_ih.options());
    if (output_mask[3]) d_w_hh = at::zeros(w_hh.sizes(), w_hh.options());
    if (output_mask[4]) d_b = at::zeros({d.H}, w_ih.options());
    return {d_input, d_hx, d_w_ih, d_w_hh, d_b};
  }
  if (output_mask[0] && !d.tokens) d_input = at::empty({d.T, d.B, d.I}, w_ih.options());
  if (output_mask[1]) d_hx = at::empty({d.B, d.H}, w_ih.options());
  if (output_mask[2]) d_w_ih = at::empty({d.H, d.I}, w_ih.options());
  if (output_mask[3]) d_w_hh = at::empty({d.H, d.H}, w_ih.options());
  if (output_mask[4]) d_b = at::empty({d.H}, w_ih.options());
  const Tensor tok = d.tokens ? checked_tokens(input, d.I, "mmops.rnn backward") : Tensor();
  const Tensor x = d.tokens ? Tensor() : input.contiguous();
  const Tensor h = output.contiguous(), dout = grad_output.contiguous();
  const Tensor wi = w_ih.contiguous(), wh = w_hh.contiguous(), h0 = hx.contiguous();
  Tensor dpre = at::empty({d.T, d.B, d.H}, w_ih.options());
  dispatch_floating(w_ih.scalar_type(), "mmops.rnn backward", [&](auto zero) {
    using T = decltype(zero);
    CudaLaunch launch;
    AtenGemm gemm{w_ih.options()};
    auto out_ptr = [&](bool wanted, const Tensor& t) { return wanted ? ptr<T>(t) : nullptr; };
    rnn_backward_schedule(launch, gemm, RNNDims{d.T, d.B, d.I, d.H}, ptr<const T>(dout), ptr<const T>(h),
                          ptr<const T>(x), ptr<const int64_t>(tok), ptr<const T>(h0), ptr<const T>(wi),
                          ptr<const T>(wh), static_cast<int>(act), ptr<T>(dpre),
                          out_ptr(output_mask[0] && !d.tokens, d_input), out_ptr(output_mask[1], d_hx),
                          out_ptr(output_mask[2], d_w_ih), out_ptr(output_mask[3], d_w_hh),
                          out_ptr(output_mask[4], d_b), num_sms());
  });
  return {d_input, d_hx, d_w_ih, d_w_hh, d_b};
}

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

TORCH_LIBRARY_IMPL(mmops, CUDA, m) {
  m.impl("rnn_forward", &rnn_forward);
  m.impl("rnn_backward", &rnn_backward);
  m.impl("rnn_cell_forward", &rnn_cell_forward);
  m.impl("rnn_cell_backward", &rnn_cell_backward);
}

}  // namespace mmops::cuda
