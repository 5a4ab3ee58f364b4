// The pieces of SyncBatchNorm (mmops/_sync_batch_norm.py) on BatchNorm's kernels: the statistics and the backward
// sums of the local shard, combined across ranks in Python between the calls, then the elementwise pass with the
// global numbers. The math is BatchNorm's (batch_norm.cpp).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cpu/output_cache.h"
#include "cpu/batch_norm.h"
#include "cpu/parallel.h"
#include "cpu/scratch.h"

namespace mmops::cpu::bn {
namespace {

using at::Tensor;

void check_shapes(const Tensor& grad_out, const Tensor& output, const Tensor& input, const char* fn) {
  TORCH_CHECK_VALUE(grad_out.sizes() == input.sizes() && output.sizes() == input.sizes(), fn,
                    ": grad_output and output must have the input's shape ", input.sizes());
}

// Local mean and M2 = sum (x - mean)^2 per channel, in float64 (combined across ranks by Chan's formula).
std::tuple<Tensor, Tensor> batch_norm_stats(const Tensor& input) {
  TORCH_CHECK_VALUE(input.dim() == 2 || input.dim() == 3, "mmops.batch_norm_stats: expected input of shape (N, C) "
                    "or (N, C, L), got ", input.sizes());
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
                   "mmops.batch_norm_stats: input must be float32 or float64, got ", input.scalar_type());
  const Shape s = shape_of(input);
  const int64_t n = s.N * s.L;
  const Tensor x = input.contiguous();
  Tensor mean = at::zeros({s.C}, x.options().dtype(at::kDouble));
  Tensor m2 = at::zeros({s.C}, x.options().dtype(at::kDouble));
  if (n == 0) return {mean, m2};  // an empty shard: count 0 adds nothing when combined
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmops_batch_norm_stats", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    Scratch<T> K(s.C);  // the shift, as in batch_norm_forward
    shifts(xp, s, K.data());
    double* mp = mean.mutable_data_ptr<double>();
    double* qp = m2.mutable_data_ptr<double>();
    reduce_then_elementwise(
        s.N, s.C, s.C * s.L,
        [&](int64_t n0, int64_t n1, double* p) {
          stats(xp, s, K.data(), n0, n1, p, p + s.C, reads_for(x.numel() * sizeof(T)));
        },
        [&](const double* S1, const double* S2) {
          for (int64_t c = 0; c < s.C; ++c) {
            const double d1 = S1[c] / n, v = S2[c] - S1[c] * d1;
            mp[c] = static_cast<double>(K[c]) + d1;
            qp[c] = v < 0 ? 0.0 : v;  // keeps NaN
          }
        },
        [](int64_t, int64_t) {});
  });
  return {mean, m2};
}

// Local sums of the backward, in float64: (sum dy', sum dy' * (x - mean)), dy' = dh * act'(h).
std::tuple<Tensor, Tensor> batch_norm_backward_reduce(const Tensor& grad_out, const Tensor& output, const Tensor& input,
                                                      const Tensor& mean, int64_t activation) {
  check_shapes(grad_out, output, input, "mmops.batch_norm_backward_reduce");
  const Shape s = shape_of(input);
  const Tensor x = input.contiguous(), dh = grad_out.contiguous(), h = output.contiguous(), m = mean.contiguous();
  Tensor sdy = at::empty({s.C}, x.options().dtype(at::kDouble));
  Tensor sdyx = at::empty({s.C}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmops_batch_norm_backward_reduce", [&] {
    using T = scalar_t;
    const T *xp = x.const_data_ptr<T>(), *dhp = dh.const_data_ptr<T>(), *hp = h.const_data_ptr<T>();
    const T* mp = m.const_data_ptr<T>();
    reduce_then_elementwise(
        s.N, s.C, s.C * s.L,
        [&](int64_t n0, int64_t n1, double* p) {
          backward_sums(activation, dhp, hp, xp, s, mp, n0, n1, p, p + s.C,
                        reads_for((activation ? 3 : 2) * x.numel() * static_cast<int64_t>(sizeof(T))));
        },
        [&](const double* Sdy, const double* Sdyx) {
          std::copy(Sdy, Sdy + s.C, sdy.mutable_data_ptr<double>());
          std::copy(Sdyx, Sdyx + s.C, sdyx.mutable_data_ptr<double>());
        },
        [](int64_t, int64_t) {});
  });
  return {sdy, sdyx};
}

// dx from the global sums and the global count (the elementwise pass of batch_norm_backward).
Tensor batch_norm_backward_elemt(const Tensor& grad_out, const Tensor& output, const Tensor& input,
                                 const std::optional<Tensor>& weight, const Tensor& mean_in, const Tensor& invstd_in,
                                 const Tensor& sum_dy, const Tensor& sum_dy_xmu, int64_t count, bool bessel,
                                 int64_t activation) {
  check_shapes(grad_out, output, input, "mmops.batch_norm_backward_elemt");
  TORCH_CHECK_VALUE(count > (bessel ? 1 : 0), "mmops.batch_norm_backward_elemt: count must be > ", bessel ? 1 : 0,
                    ", got ", count);
  const Shape s = shape_of(input);
  const Tensor x = input.contiguous(), dh = grad_out.contiguous(), h = output.contiguous();
  const Tensor sdy = sum_dy.to(at::kDouble).contiguous(), sdyx = sum_dy_xmu.to(at::kDouble).contiguous();
  const Tensor w = contiguous_param(weight), mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  Tensor dx = empty_output(x.sizes(), x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmops_batch_norm_backward_elemt", [&] {
    using T = scalar_t;
    Scratch<T> A(s.C), B(s.C), D(s.C);
    dx_coefficients(s.C, count, w.defined() ? w.const_data_ptr<T>() : nullptr, invstd.const_data_ptr<T>(),
                    sdy.const_data_ptr<double>(), sdyx.const_data_ptr<double>(), bessel, A.data(), B.data(), D.data());
    const T *xp = x.const_data_ptr<T>(), *dhp = dh.const_data_ptr<T>(), *hp = h.const_data_ptr<T>();
    const T* mp = mean.const_data_ptr<T>();
    T* dxp = dx.mutable_data_ptr<T>();
    reduce_then_elementwise(
        s.N, s.C, s.C * s.L, [](int64_t, int64_t, double*) {}, [](const double*, const double*) {},
        [&](int64_t n0, int64_t n1) {
          backward_dx(activation, dhp, hp, xp, dxp, s, mp, A.data(), B.data(), D.data(), n0, n1);
        });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmops, CPU, m) {
  m.impl("batch_norm_stats", &batch_norm_stats);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt);
}

}  // namespace mmops::cpu::bn
