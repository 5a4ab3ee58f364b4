// TEST-ONLY: instantiates every kernel of csrc/cuda/*.cuh for the dtypes the launchers use, so that
// tests/test_cuda_compile.py can compile them with nvcc -Xptxas -v (sm_80, sm_90) and read registers and spills.
// Taking a kernel's address instantiates it; nothing here runs.
#include "cuda/batch_norm.cuh"
#include "cuda/cross_entropy.cuh"
#include "cuda/rnn.cuh"

namespace mmops::cuda {
namespace {

template <typename T>
void ce_kernels(const void** out, int& n) {
  out[n++] = reinterpret_cast<const void*>(&ce_rows_kernel<T, kCEWarpItems, true, false>);
  out[n++] = reinterpret_cast<const void*>(&ce_rows_kernel<T, kCEBlockItems<T>, false, false>);
  out[n++] = reinterpret_cast<const void*>(&ce_rows_kernel<T, 0, false, false>);
  out[n++] = reinterpret_cast<const void*>(&ce_rows_kernel<T, kCEWarpItems, true, true>);
  out[n++] = reinterpret_cast<const void*>(&ce_rows_kernel<T, kCEBlockItems<T>, false, true>);
  out[n++] = reinterpret_cast<const void*>(&ce_rows_kernel<T, 0, false, true>);
  out[n++] = reinterpret_cast<const void*>(&ce_denominator_kernel<T>);
  out[n++] = reinterpret_cast<const void*>(&ce_finish_kernel<T>);
  out[n++] = reinterpret_cast<const void*>(&ce_scale_grad_kernel<T>);
}

template <typename T>
void bn_kernels(const void** out, int& n) {
  out[n++] = reinterpret_cast<const void*>(&bn_reduce_kernel<StatsOp<T>, true>);
  out[n++] = reinterpret_cast<const void*>(&bn_reduce_kernel<StatsOp<T>, false>);
  out[n++] = reinterpret_cast<const void*>(&bn_reduce_kernel<BackwardSumsOp<T>, true>);
  out[n++] = reinterpret_cast<const void*>(&bn_reduce_kernel<BackwardSumsOp<T>, false>);
  out[n++] = reinterpret_cast<const void*>(&bn_stats_finish_kernel<T>);
  out[n++] = reinterpret_cast<const void*>(&bn_eval_stats_kernel<T>);
  out[n++] = reinterpret_cast<const void*>(&bn_normalize_kernel<T>);
  out[n++] = reinterpret_cast<const void*>(&bn_backward_finish_kernel<T>);
  out[n++] = reinterpret_cast<const void*>(&bn_backward_dx_kernel<T>);
}

template <typename T>
void rnn_kernels(const void** out, int& n) {
  out[n++] = reinterpret_cast<const void*>(&rnn_gather_kernel<T>);
  out[n++] = reinterpret_cast<const void*>(&rnn_activate_kernel<T>);
  out[n++] = reinterpret_cast<const void*>(&rnn_step_backward_kernel<T>);
  out[n++] = reinterpret_cast<const void*>(&rnn_fill_bias_kernel<T>);
  out[n++] = reinterpret_cast<const void*>(&rnn_column_sum_kernel<T>);
}

}  // namespace
}  // namespace mmops::cuda

int mmops_compile_check_kernels(const void** out) {
  using namespace mmops::cuda;
  int n = 0;
  ce_kernels<float>(out, n);
  ce_kernels<double>(out, n);
  ce_kernels<__nv_bfloat16>(out, n);
  ce_kernels<__half>(out, n);
  bn_kernels<float>(out, n);
  bn_kernels<double>(out, n);
  bn_kernels<__nv_bfloat16>(out, n);
  bn_kernels<__half>(out, n);
  rnn_kernels<float>(out, n);
  rnn_kernels<double>(out, n);
  rnn_kernels<__nv_bfloat16>(out, n);
  rnn_kernels<__half>(out, n);
  return n;
}
