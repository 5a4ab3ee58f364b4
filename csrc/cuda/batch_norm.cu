// CUDA launcher of the BatchNorm ops (schemas: csrc/ops.cpp; device code and schedule: batch_norm.cuh). Checks,
// allocation (outputs and the reduction workspace), nothing else; no host sync.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cuda/batch_norm.cuh"
#include "cuda/launch.h"
#include "op_args.h"

namespace mmops::cuda {
namespace {

using at::Tensor;

BNShape shape_of(const Tensor& x) { return {x.size(0), x.size(1), x.dim() == 3 ? x.size(2) : 1}; }

void check_input(const Tensor& input, const char* fn) {
  TORCH_CHECK_VALUE(input.dim() == 2 || input.dim() == 3, fn, ": expected input of shape (N, C) or (N, C, L), got ",
                    input.sizes());
}


void check_same(const Tensor& t, const char* name, const Tensor& input, const char* fn) {
  TORCH_CHECK_VALUE(t.sizes() == input.sizes(), fn, ": ", name, " ", t.sizes(), " must have the input's shape ",
                    input.sizes());
  TORCH_CHECK(t.device() == input.device(), fn, ": ", name, " is on ", t.device(), " but input is on ",
              input.device());
}

Tensor workspace(const Tensor& x, int64_t bytes) {
  return at::empty({std::max<int64_t>(bytes, 1)}, x.options().dtype(at::kByte));
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_forward(const Tensor& input, const std::optional<Tensor>& weight,
                                                      const std::optional<Tensor>& bias,
                                                      const std::optional<Tensor>& running_mean,
                                                      const std::optional<Tensor>& running_var, bool training,
                                                      double momentum, double eps, bool bessel, int64_t activation) {
  args::batch_norm_forward(input, weight, bias, running_mean, running_var, training, eps, activation);
  const BNShape s = shape_of(input);
  const c10::cuda::CUDAGuard guard(input.device());
  // Strided running statistics are updated in contiguous copies and written back (as the CPU kernel does).
  const Tensor rm = has(running_mean) ? running_mean->contiguous() : Tensor();
  const Tensor rv = has(running_var) ? running_var->contiguous() : Tensor();
  const Tensor x = input.contiguous();
  Tensor h = at::empty(x.sizes(), x.options());
  Tensor mean = at::empty({s.C}, x.options()), invstd = at::empty({s.C}, x.options());
  if (s.C == 0) return {h, mean, invstd};
  const Tensor w = has(weight) ? weight->contiguous() : Tensor(), b = has(bias) ? bias->contiguous() : Tensor();
  dispatch_floating(x.scalar_type(), "mmops.batch_norm", [&](auto zero) {
    using T = decltype(zero);
    CudaLaunch launch;
    const BNPlan plan = bn_plan(s, num_sms());
    Tensor ws = workspace(x, bn_partial_bytes<T>(plan, s.C));
    bn_launch_forward(launch, plan, s, ptr<const T>(x), ptr<T>(h), ptr<const T>(w), ptr<const T>(b),
                      ptr<T>(rm), ptr<T>(rv), training, momentum, eps, bessel,
                      static_cast<int>(activation), ptr<T>(mean), ptr<T>(invstd), ws.data_ptr());
  });
  if (rm.defined() && !rm.is_same(*running_mean)) running_mean->copy_(rm);
  if (rv.defined() && !rv.is_same(*running_var)) running_var->copy_(rv);
  return {h, mean, invstd};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward(const Tensor& grad_out, const Tensor& output,
                                                       const Tensor& input, const std::optional<Tensor>& weight,
                                                       const Tensor& mean, const Tensor& invstd, bool training,
                                                       bool bessel, int64_t activation,
                                                       std::array<bool, 3> output_mask) {
  check_input(input, "mmops.batch_norm backward");
  check_same(grad_out, "grad_output", input, "mmops.batch_norm backward");
  check_same(output, "output", input, "mmops.batch_norm backward");
  args::batch_norm_param(weight, "weight", input);
  const BNShape s = shape_of(input);
  const c10::cuda::CUDAGuard guard(input.device());
  const Tensor x = input.contiguous(), dh = grad_out.contiguous(), h = output.contiguous();
  const Tensor m = mean.contiguous(), inv = invstd.contiguous();
  const Tensor w = has(weight) ? weight->contiguous() : Tensor();
  Tensor dx = at::empty(output_mask[0] ? x.sizes() : at::IntArrayRef{0}, x.options());
  Tensor dgamma = at::empty({output_mask[1] ? s.C : 0}, x.options());
  Tensor dbeta = at::empty({output_mask[2] ? s.C : 0}, x.options());
  if (s.C == 0) return {dx, dgamma, dbeta};
  dispatch_floating(x.scalar_type(), "mmops.batch_norm backward", [&](auto zero) {
    using T = decltype(zero);
    CudaLaunch launch;
    const BNPlan plan = bn_plan(s, num_sms());
    Tensor ws = workspace(x, bn_partial_bytes<T>(plan, s.C));
    Tensor coef = at::empty({3 * s.C}, x.options().dtype(acc_dtype(x.scalar_type())));
    bn_launch_backward(launch, plan, s, ptr<const T>(dh), ptr<const T>(h), ptr<const T>(x),
                       output_mask[0] ? ptr<T>(dx) : nullptr, output_mask[1] ? ptr<T>(dgamma) : nullptr,
                       output_mask[2] ? ptr<T>(dbeta) : nullptr, ptr<const T>(w), ptr<const T>(m), ptr<const T>(inv),
                       training, bessel, static_cast<int>(activation), ws.data_ptr(), ptr<acc_t<T>>(coef));
  });
  return {dx, dgamma, dbeta};
}

std::tuple<Tensor, Tensor> batch_norm_stats(const Tensor& input) {
  check_input(input, "mmops.batch_norm_stats");
  const BNShape s = shape_of(input);
  const c10::cuda::CUDAGuard guard(input.device());
  const Tensor x = input.contiguous();
  Tensor mean = at::zeros({s.C}, x.options().dtype(at::kDouble)), m2 = at::zeros({s.C}, x.options().dtype(at::kDouble));
  if (s.N * s.L == 0 || s.C == 0) return {mean, m2};  // an empty shard: count 0 adds nothing when combined
  dispatch_floating(x.scalar_type(), "mmops.batch_norm_stats", [&](auto zero) {
    using T = decltype(zero);
    CudaLaunch launch;
    const BNPlan plan = bn_plan(s, num_sms());
    Tensor ws = workspace(x, bn_partial_bytes<T>(plan, s.C));
    bn_launch_stats(launch, plan, s, ptr<const T>(x), ptr<double>(mean), ptr<double>(m2), ws.data_ptr());
  });
  return {mean, m2};
}

std::tuple<Tensor, Tensor> batch_norm_backward_reduce(const Tensor& grad_out, const Tensor& output, const Tensor& input,
                                                      const Tensor& mean, int64_t activation) {
  check_input(input, "mmops.batch_norm_backward_reduce");
  check_same(grad_out, "grad_output", input, "mmops.batch_norm_backward_reduce");
  check_same(output, "output", input, "mmops.batch_norm_backward_reduce");
  const BNShape s = shape_of(input);
  const c10::cuda::CUDAGuard guard(input.device());
  const Tensor x = input.contiguous(), dh = grad_out.contiguous(), h = output.contiguous();
  const Tensor m = mean.to(x.scalar_type()).contiguous();
  Tensor sdy = at::zeros({s.C}, x.options().dtype(at::kDouble)), sdyx = at::zeros({s.C}, x.options().dtype(at::kDouble));
  if (s.N * s.L == 0 || s.C == 0) return {sdy, sdyx};
  dispatch_floating(x.scalar_type(), "mmops.batch_norm_backward_reduce", [&](auto zero) {
    using T = decltype(zero);
    CudaLaunch launch;
    const BNPlan plan = bn_plan(s, num_sms());
    Tensor ws = workspace(x, bn_partial_bytes<T>(plan, s.C));
    bn_launch_backward_reduce(launch, plan, s, ptr<const T>(dh), ptr<const T>(h), ptr<const T>(x), ptr<const T>(m),
                              static_cast<int>(activation), ptr<double>(sdy), ptr<double>(sdyx), ws.data_ptr());
  });
  return {sdy, sdyx};
}

Tensor batch_norm_backward_elemt(const Tensor& grad_out, const Tensor& output, const Tensor& input,
                                 const std::optional<Tensor>& weight, const Tensor& mean, const Tensor& invstd,
                                 const Tensor& sum_dy, const Tensor& sum_dy_xmu, int64_t count, bool bessel,
                                 int64_t activation) {
  check_input(input, "mmops.batch_norm_backward_elemt");
  check_same(grad_out, "grad_output", input, "mmops.batch_norm_backward_elemt");
  check_same(output, "output", input, "mmops.batch_norm_backward_elemt");
  TORCH_CHECK_VALUE(count > (bessel ? 1 : 0), "mmops.batch_norm_backward_elemt: count must be > ", bessel ? 1 : 0,
                    ", got ", count);
  const BNShape s = shape_of(input);
  const c10::cuda::CUDAGuard guard(input.device());
  const Tensor x = input.contiguous(), dh = grad_out.contiguous(), h = output.contiguous();
  const Tensor m = mean.contiguous(), inv = invstd.contiguous();
  const Tensor w = has(weight) ? weight->contiguous() : Tensor();
  const Tensor sdy = sum_dy.to(at::kDouble).contiguous(), sdyx = sum_dy_xmu.to(at::kDouble).contiguous();
  Tensor dx = at::empty(x.sizes(), x.options());
  if (s.C == 0) return dx;
  dispatch_floating(x.scalar_type(), "mmops.batch_norm_backward_elemt", [&](auto zero) {
    using T = decltype(zero);
    CudaLaunch launch;
    const BNPlan plan = bn_plan(s, num_sms());
    Tensor coef = at::empty({3 * s.C}, x.options().dtype(acc_dtype(x.scalar_type())));
    bn_launch_backward_elemt(launch, plan, s, ptr<const T>(dh), ptr<const T>(h), ptr<const T>(x), ptr<T>(dx),
                             ptr<const T>(w), ptr<const T>(m), ptr<const T>(inv), ptr<const double>(sdy),
                             ptr<const double>(sdyx), count, bessel, static_cast<int>(activation),
                             ptr<acc_t<T>>(coef));
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmops, CUDA, m) {
  m.impl("batch_norm_forward", &batch_norm_forward);
  m.impl("batch_norm_backward", &batch_norm_backward);
  m.impl("batch_norm_stats", &batch_norm_stats);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt);
}

}  // namespace mmops::cuda
