// The one schema block of the mmops library: every op, its arguments and what it mutates.
//
// The ops are internal building blocks: each op family's torch.autograd.Function (mmops/_cross_entropy.py,
// _batch_norm.py, _sync_batch_norm.py, _rnn.py) calls its forward op in forward() and its backward op in backward(),
// and is the one autograd mechanism. An op is therefore not differentiable on its own: its Autograd kernel (below)
// raises when called with grad mode on and an input that requires grad, instead of returning a result whose
// backward would silently leave .grad as None.
// Kernels register per backend: csrc/cpu/*.cpp (CPU); fake (meta) kernels are registered from Python, beside
// each Function.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include "cpu/batch_norm.h"
#include "cpu/output_cache.h"
#include "python_calls.h"

// `import mmops._C` loads this library, which runs the registrations below. Its module functions are about memory
// (the CPU output cache: csrc/cpu/output_cache.cpp; BatchNorm's from-memory threshold: csrc/cpu/batch_norm.cpp),
// not ops, and the eager entry points of the per-step ops (the same registered ops: csrc/python_calls.cpp).
static PyObject* empty_cache(PyObject*, PyObject*) {
  return PyLong_FromSize_t(mmops::cpu::empty_output_cache());
}
static PyObject* cache_bytes(PyObject*, PyObject*) {
  return PyLong_FromSize_t(mmops::cpu::output_cache_bytes());
}
static PyObject* bn_from_memory_bytes(PyObject*, PyObject*) {
  return PyLong_FromLongLong(mmops::cpu::bn::from_memory_threshold());
}

static PyCFunction fastcall(PyObject* (*f)(PyObject*, PyObject* const*, Py_ssize_t)) {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(f));
}

extern "C" PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"empty_cache", empty_cache, METH_NOARGS, "Frees the CPU output cache's blocks; returns the bytes freed."},
      {"cache_bytes", cache_bytes, METH_NOARGS, "The bytes the CPU output cache holds now."},
      {"bn_from_memory_bytes", bn_from_memory_bytes, METH_NOARGS,
       "The bytes a BatchNorm call reads and writes above which it takes its from-memory loops."},
      // the eager entry points of the per-step ops (csrc/python_calls.cpp)
      {"cross_entropy_forward", fastcall(mmops::cross_entropy_forward_call), METH_FASTCALL, nullptr},
      {"cross_entropy_backward", fastcall(mmops::cross_entropy_backward_call), METH_FASTCALL, nullptr},
      {"batch_norm_forward", fastcall(mmops::batch_norm_forward_call), METH_FASTCALL, nullptr},
      {"batch_norm_backward", fastcall(mmops::batch_norm_backward_call), METH_FASTCALL, nullptr},
      {"mlp_train_step", fastcall(mmops::mlp_train_step_call), METH_FASTCALL, nullptr},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mmops kernels (registered as torch.ops.mmops)",
                                          -1, methods};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(mmops, m) {
  // ---- cross-entropy (reduction: 0 none, 1 mean, 2 sum) -------------------------------------------------
  // Returns the loss and, when compute_grad, the gradient already scaled for the reduction.
  m.def("cross_entropy_forward(Tensor input, Tensor target, Tensor? weight, int reduction, int ignore_index, "
        "float label_smoothing, bool compute_grad) -> (Tensor, Tensor)");
  // Same, writing the gradient into input's storage (inplace_backward=True).
  m.def("cross_entropy_forward_inplace(Tensor(a!) input, Tensor target, Tensor? weight, int reduction, "
        "int ignore_index, float label_smoothing) -> Tensor");
  // Backward: grad * grad_output (a scalar, or one value per row), out of place or in place (the
  // inplace_backward buffer; a no-op when grad_output is 1).
  m.def("cross_entropy_backward(Tensor grad, Tensor grad_output) -> Tensor");
  m.def("cross_entropy_scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()");

  // ---- BatchNorm (activation: 0 identity, 1 tanh, 2 relu: csrc/cpu/simd.h's Activation) -------------------
  // Returns act(BN(input)) and the mean and invstd it normalised with (batch statistics in training,
  // running statistics in eval); updates the running statistics in training.
  m.def("batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, bool training, float momentum, float eps, bool bessel, int activation) "
        "-> (Tensor, Tensor, Tensor)");
  // Returns (grad_input, grad_weight, grad_bias); those output_mask leaves out are empty, shape (0,).
  m.def("batch_norm_backward(Tensor grad_output, Tensor output, Tensor input, Tensor? weight, Tensor mean, "
        "Tensor invstd, bool training, bool bessel, int activation, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");
  // SyncBatchNorm's pieces: local (mean, M2) in float64; local backward sums (sum dy', sum dy' (x - mean)) in
  // float64; and grad_input from the all-reduced sums and the global count.
  m.def("batch_norm_stats(Tensor input) -> (Tensor, Tensor)");
  m.def("batch_norm_backward_reduce(Tensor grad_output, Tensor output, Tensor input, Tensor mean, int activation) "
        "-> (Tensor, Tensor)");
  m.def("batch_norm_backward_elemt(Tensor grad_output, Tensor output, Tensor input, Tensor? weight, Tensor mean, "
        "Tensor invstd, Tensor sum_dy, Tensor sum_dy_xmu, int count, bool bessel, int activation) -> Tensor");

  // ---- RNN (nonlinearity: 1 tanh, 2 relu: the same Activation codes) ----------------------------------------
  // The whole sequence: input (T, B, input_size) floats or (T, B) integer tokens (one-hot rows), hx (B, H);
  // returns every step's hidden state, (T, B, H) (h_n is its last row).
  m.def("rnn_forward(Tensor input, Tensor hx, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
        "Tensor? bias_hh, int nonlinearity) -> Tensor");
  // BPTT: returns (grad_input, grad_hx, grad_weight_ih, grad_weight_hh, grad_bias); grad_bias is the gradient
  // of bias_ih and of bias_hh alike. Those output_mask leaves out are empty, shape (0,).
  m.def("rnn_backward(Tensor grad_output, Tensor output, Tensor input, Tensor hx, Tensor weight_ih, "
        "Tensor weight_hh, int nonlinearity, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // One step (nn.RNNCell): input (B, input_size) or tokens (B,), hx (B, H) -> h' (B, H).
  m.def("rnn_cell_forward(Tensor input, Tensor hx, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
        "Tensor? bias_hh, int nonlinearity) -> Tensor");
  m.def("rnn_cell_backward(Tensor grad_h, Tensor h, Tensor input, Tensor hx, Tensor weight_ih, "
        "Tensor weight_hh, int nonlinearity, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- the makemore MLP's training step (csrc/mlp_train_step.cpp) ----------------------------------------
  // One SGD step of mmops.models.MLP: updates the six parameters and BatchNorm's running statistics in place;
  // returns the loss and the gradients in parameters() order. (Seven tensors, not a Tensor[]: torch.compile's
  // functionalization of a mutating custom op takes only plain Tensor returns.)
  m.def("mlp_train_step(Tensor X, Tensor Y, Tensor(a!) emb, Tensor(b!) fc1_weight, Tensor(c!) bn_weight, "
        "Tensor(d!) bn_bias, Tensor(e!) fc2_weight, Tensor(f!) fc2_bias, Tensor(g!) running_mean, "
        "Tensor(h!) running_var, float momentum, float eps, bool bessel, float lr) -> (Tensor loss, Tensor d_emb, "
        "Tensor d_fc1_weight, Tensor d_bn_weight, Tensor d_bn_bias, Tensor d_fc2_weight, Tensor d_fc2_bias)");
}

namespace {

// The Autograd kernel of every mmops op: refuse an input that requires grad while grad mode is on (the op has no
// derivative formula of its own), else go on to the backend kernel. Inside the Functions' forward and backward
// grad mode is off, so this costs one flag test there.
void not_differentiable(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  if (c10::GradMode::is_enabled()) {
    const auto& args = op.schema().arguments();
    const size_t first = stack->size() - args.size();
    for (size_t i = 0; i < args.size(); ++i) {
      const c10::IValue& v = (*stack)[first + i];
      TORCH_CHECK(!(v.isTensor() && v.toTensor().requires_grad()), op.schema().name(),
                  " is an internal building block of mmops and has no gradient of its own, but its argument '",
                  args[i].name(), "' requires grad: call the public function (mmops.cross_entropy, mmops.batch_norm, "
                  "mmops.rnn, mmops.rnn_cell or the mmops.nn modules), whose torch.autograd.Function computes the "
                  "gradient (for mlp_train_step: mmops.models.MLP.train_step), or call the op under torch.no_grad()");
    }
  }
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(mmops, Autograd, m) {
  for (const char* name : {"cross_entropy_forward", "cross_entropy_forward_inplace", "cross_entropy_backward",
                           "cross_entropy_scale_grad_", "batch_norm_forward", "batch_norm_backward", "batch_norm_stats",
                           "batch_norm_backward_reduce", "batch_norm_backward_elemt", "rnn_forward", "rnn_backward",
                           "rnn_cell_forward", "rnn_cell_backward", "mlp_train_step"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&not_differentiable>());
}
