// CUDA launcher of the cross-entropy ops (schemas: csrc/ops.cpp; device code and schedule: cross_entropy.cuh).
// Checks and allocation only. Two host syncs, both for bad input before anything is written (as on the CPU): the
// first out-of-range target (one int64 read back after the one-block denominator kernel), and the weights' sum when
// both weight and label smoothing are given (the only case that needs it).
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <climits>

#include "cuda/cross_entropy.cuh"
#include "cuda/launch.h"
#include "op_args.h"

namespace mmops::cuda {
namespace {

using at::Tensor;

// The schema's checks (csrc/op_args.h) plus this backend's limit on C.
void check_common(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight, int64_t reduction,
                  double label_smoothing) {
  args::cross_entropy(input, target, weight, reduction, label_smoothing);
  TORCH_CHECK_VALUE(input.size(1) < INT_MAX, "mmops.cross_entropy: C = ", input.size(1), " classes: at most 2^31 - 2");
}

// The forward; the gradient into `grad` (undefined: none; may be x itself). Returns the loss.
Tensor forward_impl(const Tensor& x, const Tensor& target_in, const std::optional<Tensor>& weight_in,
                    int64_t reduction, int64_t ignore_index, double label_smoothing, const Tensor& grad) {
  const int64_t N = x.size(0), C = x.size(1);
  const bool prob = at::isFloatingType(target_in.scalar_type());
  const Tensor target = target_in.contiguous();
  const Tensor weight = has(weight_in) ? weight_in->to(x.scalar_type()).contiguous() : Tensor();
  Tensor loss = reduction == 0 ? at::empty({N}, x.options()) : at::empty({}, x.options());
  const auto acc = x.options().dtype(acc_dtype(x.scalar_type()));
  Tensor row_loss = at::empty({std::max<int64_t>(N, 1)}, acc);
  Tensor row_scale = at::empty({1}, acc);
  Tensor denom = prob ? at::full({1}, static_cast<double>(N), x.options().dtype(at::kDouble))
                      : at::empty({1}, x.options().dtype(at::kDouble));
  Tensor bad_row = at::empty({1}, x.options().dtype(at::kLong));
  double W = static_cast<double>(C);
  if (weight.defined() && label_smoothing != 0.0) W = at::sum(weight, at::kDouble).item<double>();

  dispatch_floating(x.scalar_type(), "mmops.cross_entropy", [&](auto zero) {
    using T = decltype(zero);
    using A = acc_t<T>;
    CudaLaunch launch;
    CEParams<T> p;
    p.x = ptr<const T>(x);
    p.N = N;
    p.C = C;
    p.y = prob ? nullptr : ptr<const int64_t>(target);
    p.t = prob ? ptr<const T>(target) : nullptr;
    p.w = ptr<const T>(weight);
    p.W = static_cast<A>(W);
    p.ignore_index = ignore_index;
    p.eps = static_cast<A>(label_smoothing);
    p.grad = ptr<T>(grad);
    p.row_loss = ptr<A>(row_loss);
    if (!prob && N > 0) {
      ce_launch_denominator(launch, p, reduction == 1, ptr<double>(denom), ptr<A>(row_scale), ptr<int64_t>(bad_row));
      const int64_t bad = bad_row.item<int64_t>();  // sync: a bad target must fail before the logits are written
      TORCH_CHECK_INDEX(bad < 0, "mmops.cross_entropy: target[", bad, "] = ", target[bad].item<int64_t>(),
                        " is out of range: expected 0 <= target < ", C, " (the number of classes) or target == "
                        "ignore_index (", ignore_index, ")");
    } else if (prob && reduction == 1) {
      row_scale.fill_(1.0 / static_cast<double>(N));
    } else if (!prob) {
      denom.zero_();  // N = 0: the mean is 0/0 = NaN, as in PyTorch
    }
    if (reduction == 1) p.row_scale = ptr<const A>(row_scale);
    const CEPlan plan = ce_plan<T>(N, C, num_sms());
    ce_launch_rows(launch, p, plan, static_cast<int>(reduction), ptr<const double>(denom), ptr<T>(loss));
  });
  return loss;
}

std::tuple<Tensor, Tensor> cross_entropy_forward(const Tensor& input, const Tensor& target,
                                                 const std::optional<Tensor>& weight, int64_t reduction,
                                                 int64_t ignore_index, double label_smoothing, bool compute_grad) {
  check_common(input, target, weight, reduction, label_smoothing);
  const c10::cuda::CUDAGuard guard(input.device());
  const Tensor x = input.contiguous();
  Tensor grad = compute_grad ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  Tensor loss = forward_impl(x, target, weight, reduction, ignore_index, label_smoothing,
                             compute_grad ? grad : Tensor());
  return {loss, grad};
}

Tensor cross_entropy_forward_inplace(Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                                     int64_t reduction, int64_t ignore_index, double label_smoothing) {
  check_common(input, target, weight, reduction, label_smoothing);
  TORCH_CHECK_VALUE(input.is_contiguous(), "mmops.cross_entropy(inplace_backward=True): input must be contiguous");
  const c10::cuda::CUDAGuard guard(input.device());
  return forward_impl(input, target, weight, reduction, ignore_index, label_smoothing, input);
}

void scale_grad(const Tensor& grad, const Tensor& grad_output, Tensor& out) {
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.is_contiguous(), "mmops.cross_entropy backward: saved gradient must be "
                    "a contiguous (N, C) tensor");
  const int64_t N = grad.size(0), C = grad.size(1);
  TORCH_CHECK_VALUE(grad_output.numel() == 1 || (grad_output.dim() == 1 && grad_output.size(0) == N),
                    "mmops.cross_entropy backward: grad_output must be a scalar or of shape (", N, ",), got ",
                    grad_output.sizes());
  const c10::cuda::CUDAGuard guard(grad.device());
  const Tensor go = grad_output.to(grad.device(), grad.scalar_type());
  const int64_t stride = go.numel() == 1 ? 0 : go.stride(0);
  if (N * C == 0) return;
  dispatch_floating(grad.scalar_type(), "mmops.cross_entropy backward", [&](auto zero) {
    using T = decltype(zero);
    CudaLaunch launch;
    ce_launch_scale_grad(launch, ptr<const T>(grad), ptr<T>(out), N, C, ptr<const T>(go), stride, num_sms());
  });
}

Tensor cross_entropy_backward(const Tensor& grad, const Tensor& grad_output) {
  Tensor out = at::empty(grad.sizes(), grad.options());
  scale_grad(grad, grad_output, out);
  return out;
}

void cross_entropy_scale_grad_(Tensor& grad, const Tensor& grad_output) { scale_grad(grad, grad_output, grad); }

}  // namespace

TORCH_LIBRARY_IMPL(mmops, CUDA, m) {
  m.impl("cross_entropy_forward", &cross_entropy_forward);
  m.impl("cross_entropy_forward_inplace", &cross_entropy_forward_inplace);
  m.impl("cross_entropy_backward", &cross_entropy_backward);
  m.impl("cross_entropy_scale_grad_", &cross_entropy_scale_grad_);
}

}  // namespace mmops::cuda
