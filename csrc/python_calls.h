// The ops' eager Python entry points (csrc/python_calls.cpp says why and when they apply), module functions of
// mmops._C (METH_FASTCALL).
#pragma once
#include <Python.h>

namespace mmops {

PyObject* cross_entropy_forward_call(PyObject*, PyObject* const* args, Py_ssize_t nargs);
PyObject* cross_entropy_backward_call(PyObject*, PyObject* const* args, Py_ssize_t nargs);
PyObject* batch_norm_forward_call(PyObject*, PyObject* const* args, Py_ssize_t nargs);
PyObject* batch_norm_backward_call(PyObject*, PyObject* const* args, Py_ssize_t nargs);
PyObject* mlp_train_step_call(PyObject*, PyObject* const* args, Py_ssize_t nargs);

}  // namespace mmops
