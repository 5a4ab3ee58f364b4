// The device-code toolbox shared by the CUDA kernels of every op family: portability macros, number types,
// exp/log/tanh, the activations, warp and block reductions. Includes no torch header.
//
// Every *.cuh in this folder compiles two ways:
//   * with nvcc (__CUDACC__): the real kernels, launched by the thin *.cu launchers (csrc/cuda/*.cu);
//   * as host C++ under the test-only CPU shim (tests/cuda_shim/shim.h, which defines MMOPS_CUDA_SHIM and must be
//     included first): each block's threads run as CPU threads, so the tests execute this same device code.
// Rules the kernels keep so that both work:
//   * every __syncthreads() and every warp shuffle is reached by all threads of the block (the shim implements a
//     shuffle with block-wide barriers); rows or tiles past the end run the reductions on neutral values;
//   * no early return before a barrier; blockDim.x * blockDim.y is a multiple of 32.
#pragma once
#include <cstdint>
#include <cfloat>
#include <cmath>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define MMOPS_DEVICE __device__ __forceinline__
#define MMOPS_HOST_DEVICE __host__ __device__ __forceinline__
#define MMOPS_GLOBAL __global__
#define MMOPS_SHARED __shared__
#define MMOPS_LAUNCH_BOUNDS(n) __launch_bounds__(n)
#elif defined(MMOPS_CUDA_SHIM)
#define MMOPS_DEVICE inline
#define MMOPS_HOST_DEVICE inline
#define MMOPS_GLOBAL
#define MMOPS_SHARED static  // blocks run one after another, their threads share the function's statics
#define MMOPS_LAUNCH_BOUNDS(n)
#else
#error "csrc/cuda/*.cuh: compile with nvcc, or include tests/cuda_shim/shim.h first (the CPU test shim)"
#endif

namespace mmops::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- number types: T in memory, Num<T>::acc in registers (float for float/bfloat16/float16, double for double)
template <typename T>
struct Num;
template <>
struct Num<float> {
  using acc = float;
  static MMOPS_HOST_DEVICE float load(float v) { return v; }
  static MMOPS_HOST_DEVICE float store(float v) { return v; }
};
template <>
struct Num<double> {
  using acc = double;
  static MMOPS_HOST_DEVICE double load(double v) { return v; }
  static MMOPS_HOST_DEVICE double store(double v) { return v; }
};
#if defined(__CUDACC__)
template <>
struct Num<__nv_bfloat16> {
  using acc = float;
  static MMOPS_DEVICE float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static MMOPS_DEVICE __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Num<__half> {
  using acc = float;
  static MMOPS_DEVICE float load(__half v) { return __half2float(v); }
  static MMOPS_DEVICE __half store(float v) { return __float2half_rn(v); }
};
#else
template <>
struct Num<mmops_shim::bfloat16> {
  using acc = float;
  static inline float load(mmops_shim::bfloat16 v) { return mmops_shim::to_float(v); }
  static inline mmops_shim::bfloat16 store(float v) { return mmops_shim::to_bfloat16(v); }
};
template <>
struct Num<mmops_shim::half> {
  using acc = float;
  static inline float load(mmops_shim::half v) { return mmops_shim::to_float(v); }
  static inline mmops_shim::half store(float v) { return mmops_shim::to_half(v); }
};
#endif
template <typename T>
using acc_t = typename Num<T>::acc;

// kVec elements of T in one 16-byte (or narrower) load/store.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};
// Elements per 16-byte vector: 4 floats, 8 bfloat16/float16, 2 doubles.
template <typename T>
constexpr int kVecOf = static_cast<int>(16 / sizeof(T));

// ---- math in the accumulation type. exp goes through exp2 (one ex2.approx under --use_fast_math: relative error
// ~2^-22 over the whole range, unlike __expf whose error grows with |x|).
MMOPS_DEVICE float exp_acc(float x) { return exp2f(x * 1.4426950408889634f); }
MMOPS_DEVICE double exp_acc(double x) { return exp(x); }
MMOPS_DEVICE float log_acc(float x) { return logf(x); }
MMOPS_DEVICE double log_acc(double x) { return log(x); }
MMOPS_DEVICE float tanh_acc(float x) { return tanhf(x); }
MMOPS_DEVICE double tanh_acc(double x) { return tanh(x); }
MMOPS_DEVICE float rsqrt_acc(float x) { return 1.0f / sqrtf(x); }
MMOPS_DEVICE double rsqrt_acc(double x) { return 1.0 / sqrt(x); }
template <typename A>
MMOPS_DEVICE A lowest_acc();  // the max-reduction's start: finite, so that max(-inf row) - start is never NaN
template <>
MMOPS_DEVICE float lowest_acc<float>() { return -FLT_MAX; }
template <>
MMOPS_DEVICE double lowest_acc<double>() { return -DBL_MAX; }

// ---- activations: the codes of the schemas (csrc/ops.cpp) and of csrc/cpu/simd.h: 0 identity, 1 tanh, 2 relu.
enum Activation : int { kIdentity = 0, kTanh = 1, kRelu = 2 };

template <typename A>
MMOPS_DEVICE A activate(int act, A y) {
  if (act == kTanh) return tanh_acc(y);
  if (act == kRelu) return y < A(0) ? A(0) : y;  // NaN stays NaN (torch.relu)
  return y;
}
// dy = dh * act'(y), act' read from the activation's output h; relu passes the gradient where h is NaN
// (threshold_backward's rule: only h <= 0 blocks it).
template <typename A>
MMOPS_DEVICE A activation_grad(int act, A dh, A h) {
  if (act == kTanh) return dh * (A(1) - h * h);
  if (act == kRelu) return h <= A(0) ? A(0) : dh;
  return dh;
}

// ---- reductions. The thread's index in its block, flattened over (x, y).
MMOPS_DEVICE int flat_thread() { return static_cast<int>(threadIdx.y * blockDim.x + threadIdx.x); }
MMOPS_DEVICE int block_threads() { return static_cast<int>(blockDim.x * blockDim.y); }

// Sum over the 32 lanes of a warp; every lane gets the result (butterfly: the same order on every lane, so the
// result is deterministic).
template <typename A>
MMOPS_DEVICE A warp_sum(A v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// A state reduced by a combine function over the lanes of a warp (fields shuffled one by one by State::shuffle).
template <typename State>
MMOPS_DEVICE State warp_reduce(State s) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) s = State::combine(s, s.shuffle_xor(o));
  return s;
}

// The same over the whole block: warps reduce, lane 0 of each parks its result in shared `scratch` (room for
// 32 states), then every warp reduces the parked results. Every thread gets the block's result.
template <typename State>
MMOPS_DEVICE State block_reduce(State s, State* scratch) {
  s = warp_reduce(s);
  const int tid = flat_thread(), lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int warps = block_threads() / kWarpSize;
  __syncthreads();  // scratch may still be read by the previous call
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  s = lane < warps ? scratch[lane] : State::identity();
  return warp_reduce(s);
}

// Plain sums of a few values, as a State for the functions above.
template <typename A, int kN>
struct Sums {
  A v[kN];
  static MMOPS_DEVICE Sums identity() {
    Sums s;
#pragma unroll
    for (int i = 0; i < kN; ++i) s.v[i] = A(0);
    return s;
  }
  static MMOPS_DEVICE Sums combine(const Sums& a, const Sums& b) {
    Sums s;
#pragma unroll
    for (int i = 0; i < kN; ++i) s.v[i] = a.v[i] + b.v[i];
    return s;
  }
  MMOPS_DEVICE Sums shuffle_xor(int o) const {
    Sums s;
#pragma unroll
    for (int i = 0; i < kN; ++i) s.v[i] = __shfl_xor_sync(kFullMask, v[i], o);
    return s;
  }
};

// Grid-stride helpers with 64-bit indices (N*C may exceed 2^31).
MMOPS_DEVICE int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
MMOPS_DEVICE int64_t grid_threads() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

MMOPS_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace mmops::cuda
