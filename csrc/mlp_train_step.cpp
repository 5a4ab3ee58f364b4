// mmops::mlp_train_step: the makemore MLP's training step (mmops.models.MLP.train_step) as one op.
//
//   embcat = E[X] (n, block * n_embd)        hprebn = embcat W1^T          h, mean, invstd = tanh(BN(hprebn))
//   logits = h W2^T + b2                      loss, dlogits = cross_entropy (mean; dlogits already scaled)
//   dW2 = dlogits^T h    db2 = sum dlogits    dh = dlogits W2
//   dhprebn, dgamma, dbeta = BN backward (tanh folded in)
//   dW1 = dhprebn^T embcat    dembcat = dhprebn W1    dE = scatter-add of dembcat rows onto X's rows
//   every parameter p -= lr * dp (one foreach)
//
// Why an op: the step is fifteen small ATen and mmops calls, and at the notebooks' batch of 32 each call made from
// Python cost 2-10 us of interpreter and argument boxing (a boxed mmops op with ten arguments about 8 us) against
// 1-10 us of work; made from C++ each costs a function call through the dispatcher. The calls, their order and their
// arguments are those the Python step made, so the results are bitwise the same (tests/test_models.py compares the
// step with loss.backward() + SGD). The BatchNorm and cross-entropy math stays in their own kernels, called through
// the dispatcher (csrc/cpu/batch_norm.cpp, cross_entropy.cpp; csrc/cuda for CUDA tensors), so the op is registered
// once for every backend (CompositeExplicitAutograd), like the products and the scatter it calls.
#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <utility>

#include "cpu/simd.h"
#include "op_args.h"
#include "op_handles.h"

namespace mmops {
namespace {

using at::Tensor;

using Step = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;  // loss, then the six gradients

Step mlp_train_step(const Tensor& X, const Tensor& Y, const Tensor& E,
                    const Tensor& W1, const Tensor& gamma, const Tensor& beta, const Tensor& W2, const Tensor& b2,
                    const Tensor& running_mean, const Tensor& running_var, double momentum, double eps, bool bessel,
                    double lr) {
  // every argument checked before anything is updated in place: a step that fails leaves the model as it was
  args::mlp_train_step(X, Y, E, W1, gamma, beta, W2, b2, running_mean, running_var);
  const auto& bn_forward = op_handles::batch_norm_forward();
  const auto& bn_backward = op_handles::batch_norm_backward();
  const auto& ce_forward = op_handles::cross_entropy_forward();
  // No autograd graph is built (the backward is written out below); the parameters are updated in place, which
  // still bumps their version counters (that happens below autograd).
  at::AutoDispatchBelowAutograd below_autograd;

  const int64_t n = X.size(0);
  const Tensor embcat = E.index_select(0, X.view(-1)).view({n, -1});
  const Tensor hprebn = embcat.mm(W1.t());
  const auto [h, mean, invstd] =
      bn_forward.call(hprebn, gamma, beta, running_mean, running_var, true, momentum, eps, bessel, simd::kTanh);
  const Tensor logits = at::addmm(b2, h, W2.t());
  const auto [loss, dlogits] = ce_forward.call(logits, Y, std::nullopt, at::Reduction::Mean, -100, 0.0, true);

  Tensor dW2 = dlogits.t().mm(h);
  Tensor db2 = dlogits.sum(0);
  const Tensor dh = dlogits.mm(W2);
  auto [dhprebn, dgamma, dbeta] = bn_backward.call(dh, h, hprebn, gamma, mean, invstd, true, bessel, simd::kTanh,
                                                   std::array<bool, 3>{true, true, true});
  Tensor dW1 = dhprebn.t().mm(embcat);
  const Tensor dembcat = dhprebn.mm(W1);
  Tensor dE = at::zeros(E.sizes(), E.options()).index_add_(0, X.view(-1), dembcat.view({-1, E.size(1)}));

  // parameters() order: emb, fc1, bn, fc2
  at::_foreach_add_({E, W1, gamma, beta, W2, b2}, {dE, dW1, dgamma, dbeta, dW2, db2}, -lr);
  return {loss, dE, dW1, dgamma, dbeta, dW2, db2};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmops, CompositeExplicitAutograd, m) { m.impl("mlp_train_step", &mlp_train_step); }

}  // namespace mmops
