// What the .cu launchers share: the CUDA launch functor the torch-free schedules of csrc/cuda/*.cuh call, the
// dtype dispatch from at::ScalarType to the device code's types, and the SM count. Included by .cu files only.
// Only c10/cuda headers and the CUDA runtime: no ATen/cuda/CUDAContext.h, which pulls in the cuBLAS / cuSPARSE /
// cuSOLVER headers (the GEMMs go through ATen ops instead), so the launchers compile with the CUDA compiler and
// runtime headers alone -- which is what tests/test_cuda_compile.py checks, against a CPU build of torch.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <utility>

namespace mmops::cuda {

// launch(grid, block, &kernel, args...) on the current stream, as the schedules expect (the CPU shim's twin runs
// the same calls on CPU threads).
struct CudaLaunch {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  template <typename... P, typename... A>
  void operator()(dim3 grid, dim3 block, void (*kernel)(P...), A... args) const {
    kernel<<<grid, block, 0, stream>>>(static_cast<P>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

inline int num_sms() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// f(T{}) with T the device type of `dtype`: float, double, __nv_bfloat16, __half.
template <typename F>
void dispatch_floating(at::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    case at::kHalf: f(__half{}); break;
    default: TORCH_CHECK_TYPE(false, what, ": dtype ", dtype, " is not supported on CUDA (float32, float64, "
                              "bfloat16, float16)");
  }
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}
template <typename T>
T* ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? reinterpret_cast<T*>(t->data_ptr()) : nullptr;
}
inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The device code's accumulation dtype for a tensor dtype (float for the 16-bit types).
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace mmops::cuda
