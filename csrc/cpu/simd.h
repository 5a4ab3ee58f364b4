// Portable SIMD for the CPU kernels: plain C++ loops that GCC auto-vectorises, compiled three times
// (x86-64-v4 = AVX-512, x86-64-v3 = AVX2+FMA, baseline SSE2) through target_clones and picked at load
// time by the CPU they run on. No -march=native, so one wheel runs on any x86-64.
//
// What keeps these loops vectorised (check with `objdump -d`: zmm/ymm in the clones, no call to expf):
//   * exp is written out (Cephes' polynomial) with no libm call, no floor() (rounding by the 1.5*2^23
//     trick) and no branch: selects only, which -fno-trapping-math lets GCC if-convert;
//   * reductions carry `#pragma omp simd reduction(...)`, which licenses the reassociation that
//     -ffast-math would otherwise be needed for, without giving up NaN/inf semantics.
#pragma once
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(MMOPS_NO_CLONES)
#define MMOPS_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MMOPS_SIMD_CLONES
#endif

#define MMOPS_INLINE inline __attribute__((always_inline))

namespace mmops::simd {

// exp(x) for float with ~1 ulp error over the normal range; exp(x) = 2^n * p(r), r = x - n*ln2.
// NaN propagates (every select compares false on NaN), x < -87.34 flushes to 0 (exp(-inf) = 0),
// x > 88.38 saturates at FLT_MAX-ish (only reachable for x - max > 0, which the callers never pass).
MMOPS_INLINE float exp(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365447505531f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  // round(x * log2(e)) by adding and subtracting 1.5 * 2^23: exact for |n| < 2^22, no floor() call.
  float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  // r = x - n ln2, with ln2 split in two so that n*C1 is exact (Cody-Waite).
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float r2 = r * r;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r2 + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n as an IEEE float
  float res = p * __builtin_bit_cast(float, bits);
  return x < lo ? 0.0f : res;
}

// double: libm's exp (the double paths are for checking, not for speed).
MMOPS_INLINE double exp(double x) { return __builtin_exp(x); }

template <typename T>
MMOPS_INLINE T row_max(const T* __restrict x, int64_t n) {
  // NaN never wins a comparison, so it is skipped here; it still reaches the row's sum through
  // exp(x - m) = NaN, which makes that row's loss and gradient NaN (as in PyTorch).
  T m = -__builtin_inf();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

template <typename T>
MMOPS_INLINE T sum(const T* __restrict x, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i];
  return s;
}

template <typename T>
MMOPS_INLINE T dot(const T* __restrict x, const T* __restrict y, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}

}  // namespace mmops::simd

namespace mmops::simd {

// tanh for float: odd rational approximation x * P(x^2) / Q(x^2) on [-7.9, 7.9] (Eigen's coefficients),
// accurate to a few ulp, branch-free, NaN-preserving; |x| < 4e-4 returns x (tanh(x) = x to float precision).
MMOPS_INLINE float tanh(float x) {
  const float c = 7.90531110763549805f;
  float xc = x > c ? c : x;
  xc = xc < -c ? -c : xc;
  const float x2 = xc * xc;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * xc;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  const float r = p / q;
  const float ax = x < 0 ? -x : x;
  return ax < 0.0004f ? x : r;
}

MMOPS_INLINE double tanh(double x) { return __builtin_tanh(x); }

}  // namespace mmops::simd
