// The argument checks of the op schemas (csrc/ops.cpp) that do not depend on the backend: one place for the CPU
// kernels (csrc/cpu/*.cpp) and the CUDA launchers (csrc/cuda/*.cu). Each backend adds only what is its own (the
// dtypes it computes in, index limits). TORCH_CHECK_* name the argument that is wrong.
#pragma once
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <utility>

namespace mmops::args {

inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// cross_entropy_forward(_inplace): input (N, C) with C > 0, class-index (int64, (N,)) or probability (input's shape
// and dtype) target, weight (C,), reduction 0/1/2, label_smoothing in [0, 1], all on the input's device.
inline void cross_entropy(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                          int64_t reduction, double label_smoothing) {
  TORCH_CHECK_VALUE(input.dim() == 2, "mmops.cross_entropy: expected input of shape (N, C), got ", input.sizes());
  TORCH_CHECK_VALUE(input.size(1) > 0, "mmops.cross_entropy: input has no classes (C = 0)");
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2, "mmops.cross_entropy: reduction code ", reduction,
                    " is not 0 (none), 1 (mean) or 2 (sum)");
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "mmops.cross_entropy: label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(target.device() == input.device(), "mmops.cross_entropy: target is on ", target.device(),
              " but input is on ", input.device());
  if (at::isFloatingType(target.scalar_type())) {
    TORCH_CHECK_VALUE(target.sizes() == input.sizes(), "mmops.cross_entropy: probability target must have the "
                      "input's shape ", input.sizes(), ", got ", target.sizes());
    TORCH_CHECK_TYPE(target.scalar_type() == input.scalar_type(), "mmops.cross_entropy: probability target dtype ",
                     target.scalar_type(), " does not match input dtype ", input.scalar_type());
  } else {
    TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "mmops.cross_entropy: class-index target must be int64, got ",
                     target.scalar_type());
    TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == input.size(0), "mmops.cross_entropy: expected target "
                      "of shape (", input.size(0), ",) to match input ", input.sizes(), " (its batch size), got ",
                      target.sizes());
  }
  if (has(weight)) {
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == input.size(1), "mmops.cross_entropy: weight must "
                      "have shape (", input.size(1), ",) (one per class), got ", weight->sizes());
    TORCH_CHECK(weight->device() == input.device(), "mmops.cross_entropy: weight is on ", weight->device(),
                " but input is on ", input.device());
  }
}

// A per-channel BatchNorm argument (weight, bias, running stats): (C,), the input's dtype and device.
inline void batch_norm_param(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& input) {
  if (!has(t)) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == input.size(1), "mmops.batch_norm: ", name, " should contain ",
              input.size(1), " elements (one per channel), got shape ", t->sizes());
  TORCH_CHECK(t->scalar_type() == input.scalar_type(), "mmops.batch_norm: ", name, " dtype ", t->scalar_type(),
              " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(t->device() == input.device(), "mmops.batch_norm: ", name, " is on ", t->device(), " but input is on ",
              input.device());
}

// batch_norm_forward: input (N, C) or (N, C, L), activation 0/1/2, the per-channel arguments, running statistics
// given together (required in eval mode) and, in training, more than one value per channel, a positive eps and
// running statistics that can be updated in place (not an expand()ed view).
inline void batch_norm_forward(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var, bool training, double eps,
                               int64_t activation) {
  TORCH_CHECK_VALUE(input.dim() == 2 || input.dim() == 3, "mmops.batch_norm: expected input of shape (N, C) or "
                    "(N, C, L), got ", input.sizes());
  TORCH_CHECK_VALUE(activation >= 0 && activation <= 2, "mmops.batch_norm: activation code ", activation,
                    " is not 0 (identity), 1 (tanh) or 2 (relu)");
  batch_norm_param(weight, "weight", input);
  batch_norm_param(bias, "bias", input);
  batch_norm_param(running_mean, "running_mean", input);
  batch_norm_param(running_var, "running_var", input);
  TORCH_CHECK(has(running_mean) == has(running_var), "mmops.batch_norm: running_mean and running_var must be given "
              "together");
  TORCH_CHECK(training || has(running_mean), "mmops.batch_norm: eval mode (training=False) needs running_mean and "
              "running_var");
  if (!training) return;
  const int64_t n = input.size(0) * (input.dim() == 3 ? input.size(2) : 1);
  TORCH_CHECK_VALUE(n > 1, "mmops.batch_norm: expected more than 1 value per channel when training, got input of "
                    "shape ", input.sizes());
  TORCH_CHECK_VALUE(eps > 0, "mmops.batch_norm: eps must be positive during training, got ", eps);
  for (const auto& [stat, name] : {std::pair{&running_mean, "running_mean"}, std::pair{&running_var, "running_var"}})
    TORCH_CHECK(!has(*stat) || at::has_internal_overlap(**stat) != at::MemOverlap::Yes, "mmops.batch_norm: ", name,
                " has elements that share memory (e.g. an expand()ed tensor), so it cannot be updated in place; pass a "
                "tensor with one element per channel");
}

struct RnnDims {
  int64_t T, B, I, H;
  bool tokens;
};

// rnn_forward / rnn_backward: input (T, B, I) floats or (T, B) int64/int32 tokens, hx (B, H), weight_ih (H, I),
// weight_hh (H, H), biases (H,), all of weight_ih's dtype and device; act 1 (tanh) or 2 (relu).
inline RnnDims rnn(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                   const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, int64_t act,
                   const char* fn) {
  TORCH_CHECK_VALUE(act == 1 || act == 2, fn, ": nonlinearity code ", act, " is not 1 (tanh) or 2 (relu)");
  const bool tokens = !at::isFloatingType(input.scalar_type());
  TORCH_CHECK_TYPE(!tokens || input.scalar_type() == at::kLong || input.scalar_type() == at::kInt, fn,
                   ": input must be floating point (T, B, input_size) or integer tokens (T, B), got ",
                   input.scalar_type());
  TORCH_CHECK_VALUE(input.dim() == (tokens ? 2 : 3), fn, ": expected ", tokens ? "token input of shape (T, B)" :
                    "input of shape (T, B, input_size)", ", got ", input.sizes());
  TORCH_CHECK_VALUE(w_ih.dim() == 2 && w_hh.dim() == 2, fn, ": weight_ih and weight_hh must be 2-D, got ",
                    w_ih.sizes(), " and ", w_hh.sizes());
  const int64_t H = w_hh.size(0), I = w_ih.size(1);
  const RnnDims d{input.size(0), input.size(1), I, H, tokens};
  const at::ScalarType dt = w_ih.scalar_type();
  TORCH_CHECK_VALUE(w_hh.size(1) == H, fn, ": weight_hh must be (hidden_size, hidden_size), got ", w_hh.sizes());
  TORCH_CHECK_VALUE(w_ih.size(0) == H, fn, ": weight_ih has ", w_ih.size(0), " rows but hidden_size is ", H);
  TORCH_CHECK_VALUE(tokens || input.size(2) == I, fn, ": input has input_size ", input.size(2),
                    " but weight_ih expects ", I);
  TORCH_CHECK_VALUE(hx.dim() == 2 && hx.size(0) == d.B && hx.size(1) == H, fn, ": hx must have shape (", d.B, ", ",
                    H, "), got ", hx.sizes());
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == dt, fn, ": ", name, " dtype ", t.scalar_type(), " does not match weight_ih ",
                     dt);
    TORCH_CHECK(t.device() == w_ih.device(), fn, ": ", name, " is on ", t.device(), " but weight_ih is on ",
                w_ih.device());
  };
  same(w_hh, "weight_hh");
  same(hx, "hx");
  if (!tokens) same(input, "input");
  else TORCH_CHECK(input.device() == w_ih.device(), fn, ": input is on ", input.device(), " but weight_ih is on ",
                   w_ih.device());
  for (const auto* b : {&b_ih, &b_hh}) {
    if (!has(*b)) continue;
    TORCH_CHECK_VALUE((*b)->dim() == 1 && (*b)->size(0) == H, fn, ": ", b == &b_ih ? "bias_ih" : "bias_hh",
                      " must have shape (", H, ",), got ", (*b)->sizes());
    same(**b, b == &b_ih ? "bias_ih" : "bias_hh");
  }
  TORCH_CHECK_VALUE(!tokens || I > 0, fn, ": token input needs input_size > 0");
  return d;
}

// mlp_train_step (csrc/mlp_train_step.cpp): every tensor present and on emb's device, X and Y int64 token ids of one
// batch of n > 1 rows, the float tensors of emb's dtype, and the layer shapes chained (X's tokens x emb's features =
// fc1's inputs; fc1's outputs = BatchNorm's channels = fc2's inputs; fc2's outputs = fc2_bias).
inline void mlp_train_step(const at::Tensor& X, const at::Tensor& Y, const at::Tensor& E, const at::Tensor& W1,
                           const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& W2, const at::Tensor& b2,
                           const at::Tensor& running_mean, const at::Tensor& running_var) {
  const std::pair<const char*, const at::Tensor*> tensors[] = {
      {"X", &X},           {"Y", &Y},          {"emb", &E},
      {"fc1_weight", &W1}, {"bn_weight", &gamma}, {"bn_bias", &beta},
      {"fc2_weight", &W2}, {"fc2_bias", &b2}, {"running_mean", &running_mean}, {"running_var", &running_var}};
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK_VALUE(t->defined(), "mmops.mlp_train_step: ", name, " is missing (None)");
    TORCH_CHECK(t->device() == E.device(), "mmops.mlp_train_step: ", name, " is on ", t->device(), " but emb is on ",
                E.device());
  }
  TORCH_CHECK_TYPE(X.scalar_type() == at::kLong && Y.scalar_type() == at::kLong,
                   "mmops.mlp_train_step: X and Y must be int64 token ids, got ", X.scalar_type(), " and ",
                   Y.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(E.scalar_type()), "mmops.mlp_train_step: emb must be floating point, got ",
                   E.scalar_type());
  for (const auto& [name, t] : tensors)
    TORCH_CHECK_TYPE(t == &X || t == &Y || t->scalar_type() == E.scalar_type(), "mmops.mlp_train_step: ", name,
                     " is ", t->scalar_type(), " but emb is ", E.scalar_type());
  TORCH_CHECK_VALUE(X.dim() == 2 && X.size(0) > 1, "mmops.mlp_train_step: X must be (n, block_size) with n > 1 (batch "
                    "statistics need two rows), got ", X.sizes());
  TORCH_CHECK_VALUE(Y.dim() == 1 && Y.size(0) == X.size(0), "mmops.mlp_train_step: Y must be (n,) = (", X.size(0),
                    ",), got ", Y.sizes());
  TORCH_CHECK_VALUE(E.dim() == 2, "mmops.mlp_train_step: emb must be (vocab, n_embd), got ", E.sizes());
  TORCH_CHECK_VALUE(W1.dim() == 2 && W1.size(1) == X.size(1) * E.size(1), "mmops.mlp_train_step: fc1_weight must be "
                    "(n_hidden, ", X.size(1) * E.size(1), "): X's ", X.size(1), " tokens of emb's ", E.size(1),
                    " features, got ", W1.sizes());
  const int64_t H = W1.size(0);
  for (const auto& [name, t] : {std::pair{"bn_weight", &gamma}, std::pair{"bn_bias", &beta},
                                std::pair{"running_mean", &running_mean}, std::pair{"running_var", &running_var}})
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == H, "mmops.mlp_train_step: ", name, " must be (", H, ",), got ",
                      t->sizes());
  TORCH_CHECK_VALUE(W2.dim() == 2 && W2.size(1) == H, "mmops.mlp_train_step: fc2_weight must be (vocab, ", H,
                    "), got ", W2.sizes());
  TORCH_CHECK_VALUE(b2.dim() == 1 && b2.size(0) == W2.size(0), "mmops.mlp_train_step: fc2_bias must be (",
                    W2.size(0), ",), got ", b2.sizes());
}

}  // namespace mmops::args
