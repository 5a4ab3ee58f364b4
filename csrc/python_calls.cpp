// The eager Python entry points of the ops that run on every training step: mmops._C.cross_entropy_forward,
// cross_entropy_backward, batch_norm_forward, batch_norm_backward and mlp_train_step take the arguments of the op of
// that name (csrc/ops.cpp) and call that registered op through the dispatcher, unboxed.
//
// Why: torch.ops.mmops.<op>.default converts every argument to an IValue, calls the op boxed, and its Autograd
// kernel (the not-differentiable check, ops.cpp) redispatches boxed again: at the notebooks' batch of 32 that is
// much of the op's cost (1 thread, AMD EPYC Zen 4, interleaved: batch_norm_forward at (32, 200) 15.0 us through
// torch.ops and 10.1 us here, batch_norm_backward 13.9 and 8.6 us; torch.add on the same tensor 3.6 us). Here the
// arguments go straight from Python objects to C++ and the op is called below autograd and without the GIL, as
// ATen's own generated bindings do.
//
// Only where that is the same thing: grad mode off (inside a Function's forward and backward, where the
// not-differentiable check passes anyway), no dispatch key in the thread-local included set beyond eager PyTorch's
// own two (no functorch transform, no Python dispatch mode such as a FakeTensorMode), autocast off, no
// __torch_function__ mode, and every tensor argument a torch.Tensor or nn.Parameter (no other subclass, which may
// override __torch_function__). Anywhere else the function returns NotImplemented and the caller (mmops/_ops.py:
// eager_or_op) takes torch.ops. Errors are the op's own, with the same Python exception types (HANDLE_TH_ERRORS
// translates them as torch.ops does).
#include <Python.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <optional>
#include <tuple>
#include <utility>

#include "op_handles.h"
#include "python_calls.h"

namespace mmops {
namespace {

using at::Tensor;
using op_handles::OptTensor;

// Thrown when a call is not one this path takes (see the top of the file); turned into NotImplemented.
struct NotHere {};

bool here() {
  if (c10::GradMode::is_enabled() || at::impl::torch_function_mode_enabled()) return false;
  // Eager PyTorch includes these two keys in every thread and excludes the autocast keys while autocast is off.
  static const c10::DispatchKeySet always({c10::DispatchKey::BackendSelect, c10::DispatchKey::ADInplaceOrView});
  const c10::impl::LocalDispatchKeySet tls = c10::impl::tls_local_dispatch_key_set();
  return (tls.included_ - always).empty() && tls.excluded_.has_all(c10::autocast_dispatch_keyset);
}

// torch.Tensor, or nn.Parameter (a subclass whose __torch_function__ is disabled: it behaves as a plain tensor).
bool plain_tensor(PyObject* o) {
  if (THPVariable_CheckExact(o)) return true;
  static PyTypeObject* parameter = [] {
    PyObject* module = PyImport_ImportModule("torch.nn.parameter");
    PyObject* cls = module ? PyObject_GetAttrString(module, "Parameter") : nullptr;
    Py_XDECREF(module);
    if (cls == nullptr) PyErr_Clear();
    return reinterpret_cast<PyTypeObject*>(cls);  // kept for the life of the process
  }();
  return parameter != nullptr && Py_TYPE(o) == parameter;
}

const Tensor& tensor(PyObject* o) {
  if (!plain_tensor(o)) throw NotHere{};
  return THPVariable_Unpack(o);
}
OptTensor optional_tensor(PyObject* o) { return o == Py_None ? OptTensor() : OptTensor(tensor(o)); }
int64_t integer(PyObject* o) {
  if (!PyLong_CheckExact(o)) throw NotHere{};
  const long long v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) {  // beyond 64 bits: torch.ops gives its own error for that
    PyErr_Clear();
    throw NotHere{};
  }
  return v;
}
double real(PyObject* o) {
  if (!PyFloat_CheckExact(o)) throw NotHere{};
  return PyFloat_AS_DOUBLE(o);
}
bool boolean(PyObject* o) {
  if (!PyBool_Check(o)) throw NotHere{};
  return o == Py_True;
}
std::array<bool, 3> three_booleans(PyObject* o) {
  if (!PyList_CheckExact(o) || PyList_GET_SIZE(o) != 3) throw NotHere{};
  return {boolean(PyList_GET_ITEM(o, 0)), boolean(PyList_GET_ITEM(o, 1)), boolean(PyList_GET_ITEM(o, 2))};
}

bool set_item(PyObject* tuple, Py_ssize_t i, Tensor t) {
  PyObject* item = THPVariable_Wrap(std::move(t));
  if (item == nullptr) return false;
  PyTuple_SET_ITEM(tuple, i, item);  // takes the new reference
  return true;
}

template <typename... Tensors>
PyObject* wrap(std::tuple<Tensors...> t) {
  PyObject* out = PyTuple_New(sizeof...(Tensors));
  if (out == nullptr) return nullptr;
  Py_ssize_t i = 0;
  bool ok = true;
  std::apply([&](auto&... each) { ((ok = ok && set_item(out, i++, std::move(each))), ...); }, t);
  if (!ok) Py_CLEAR(out);  // an item failed (its error is set): the tuple and the items set so far go
  return out;
}
PyObject* wrap(Tensor t) { return THPVariable_Wrap(std::move(t)); }

// The op's call itself runs without the GIL, as through torch.ops: other Python threads (a data loader) go on meanwhile.
struct WithoutGil {
  PyThreadState* state = PyEval_SaveThread();
  ~WithoutGil() { PyEval_RestoreThread(state); }
};

// Runs call(), which parses the arguments (throwing NotHere for one this path does not take), calls the op below
// autograd and wraps the result; errors become Python exceptions as through torch.ops.
template <typename Call>
PyObject* call_below_autograd(Py_ssize_t nargs, Py_ssize_t expected, const char* name, Call&& call) {
  HANDLE_TH_ERRORS
  if (nargs != expected) {
    PyErr_Format(PyExc_TypeError, "mmops._C.%s takes %zd arguments, got %zd", name, expected, nargs);
    return nullptr;
  }
  if (!here()) Py_RETURN_NOTIMPLEMENTED;
  try {
    return call();
  } catch (const NotHere&) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  END_HANDLE_TH_ERRORS
}

}  // namespace

PyObject* cross_entropy_forward_call(PyObject*, PyObject* const* a, Py_ssize_t n) {
  return call_below_autograd(n, 7, "cross_entropy_forward", [&] {
    const auto& handle = op_handles::cross_entropy_forward();
    const Tensor &input = tensor(a[0]), &target = tensor(a[1]);
    const OptTensor weight = optional_tensor(a[2]);
    const int64_t reduction = integer(a[3]), ignore_index = integer(a[4]);
    const double smoothing = real(a[5]);
    const bool grad = boolean(a[6]);
    auto out = [&] {
      WithoutGil no_gil;
      at::AutoDispatchBelowAutograd below;
      return handle.call(input, target, weight, reduction, ignore_index, smoothing, grad);
    }();
    return wrap(std::move(out));
  });
}

PyObject* cross_entropy_backward_call(PyObject*, PyObject* const* a, Py_ssize_t n) {
  return call_below_autograd(n, 2, "cross_entropy_backward", [&] {
    const auto& handle = op_handles::cross_entropy_backward();
    const Tensor &grad = tensor(a[0]), &grad_output = tensor(a[1]);
    auto out = [&] {
      WithoutGil no_gil;
      at::AutoDispatchBelowAutograd below;
      return handle.call(grad, grad_output);
    }();
    return wrap(std::move(out));
  });
}

PyObject* batch_norm_forward_call(PyObject*, PyObject* const* a, Py_ssize_t n) {
  return call_below_autograd(n, 10, "batch_norm_forward", [&] {
    const auto& handle = op_handles::batch_norm_forward();
    const Tensor& input = tensor(a[0]);
    const OptTensor weight = optional_tensor(a[1]), bias = optional_tensor(a[2]);
    const OptTensor running_mean = optional_tensor(a[3]), running_var = optional_tensor(a[4]);
    const bool training = boolean(a[5]), bessel = boolean(a[8]);
    const double momentum = real(a[6]), eps = real(a[7]);
    const int64_t activation = integer(a[9]);
    auto out = [&] {
      WithoutGil no_gil;
      at::AutoDispatchBelowAutograd below;
      return handle.call(input, weight, bias, running_mean, running_var, training, momentum, eps, bessel,
                         activation);
    }();
    return wrap(std::move(out));
  });
}

PyObject* batch_norm_backward_call(PyObject*, PyObject* const* a, Py_ssize_t n) {
  return call_below_autograd(n, 10, "batch_norm_backward", [&] {
    const auto& handle = op_handles::batch_norm_backward();
    const Tensor &grad_output = tensor(a[0]), &output = tensor(a[1]), &input = tensor(a[2]);
    const OptTensor weight = optional_tensor(a[3]);
    const Tensor &mean = tensor(a[4]), &invstd = tensor(a[5]);
    const bool training = boolean(a[6]), bessel = boolean(a[7]);
    const int64_t activation = integer(a[8]);
    const std::array<bool, 3> mask = three_booleans(a[9]);
    auto out = [&] {
      WithoutGil no_gil;
      at::AutoDispatchBelowAutograd below;
      return handle.call(grad_output, output, input, weight, mean, invstd, training, bessel, activation, mask);
    }();
    return wrap(std::move(out));
  });
}

PyObject* mlp_train_step_call(PyObject*, PyObject* const* a, Py_ssize_t n) {
  return call_below_autograd(n, 14, "mlp_train_step", [&] {
    const auto& handle = op_handles::mlp_train_step();
    const Tensor &X = tensor(a[0]), &Y = tensor(a[1]), &E = tensor(a[2]), &W1 = tensor(a[3]);
    const Tensor &gamma = tensor(a[4]), &beta = tensor(a[5]), &W2 = tensor(a[6]), &b2 = tensor(a[7]);
    const Tensor &running_mean = tensor(a[8]), &running_var = tensor(a[9]);
    const double momentum = real(a[10]), eps = real(a[11]), lr = real(a[13]);
    const bool bessel = boolean(a[12]);
    auto out = [&] {
      WithoutGil no_gil;
      at::AutoDispatchBelowAutograd below;
      return handle.call(X, Y, E, W1, gamma, beta, W2, b2, running_mean, running_var, momentum, eps, bessel, lr);
    }();
    return wrap(std::move(out));
  });
}

}  // namespace mmops
