// Typed handles of the registered ops (csrc/ops.cpp) for C++ callers that call an op through the dispatcher,
// unboxed: the MLP's training step (csrc/mlp_train_step.cpp) and the ops' eager Python entry points
// (csrc/python_calls.cpp). Each signature is written once, here, and must match its schema: a mismatch throws on the
// first call (findSchemaOrThrow / typed), inside the caller's error handling.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

namespace mmops::op_handles {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

template <typename Signature>
const c10::TypedOperatorHandle<Signature>& lookup(const char* name) {
  static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
  return handle;
}

using CrossEntropyForward = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, int64_t,
                                                       int64_t, double, bool);
using CrossEntropyBackward = Tensor(const Tensor&, const Tensor&);
using BatchNormForward = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&,
                                                            const OptTensor&, const OptTensor&, bool, double, double,
                                                            bool, int64_t);
using BatchNormBackward = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                             const OptTensor&, const Tensor&, const Tensor&, bool,
                                                             bool, int64_t, std::array<bool, 3>);
using MlpTrainStep = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, double, double, bool, double);

inline const auto& cross_entropy_forward() { return lookup<CrossEntropyForward>("mmops::cross_entropy_forward"); }
inline const auto& cross_entropy_backward() { return lookup<CrossEntropyBackward>("mmops::cross_entropy_backward"); }
inline const auto& batch_norm_forward() { return lookup<BatchNormForward>("mmops::batch_norm_forward"); }
inline const auto& batch_norm_backward() { return lookup<BatchNormBackward>("mmops::batch_norm_backward"); }
inline const auto& mlp_train_step() { return lookup<MlpTrainStep>("mmops::mlp_train_step"); }

}  // namespace mmops::op_handles
