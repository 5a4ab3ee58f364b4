// The CPU kernels' one SIMD toolbox: the platform guard, the CPU-feature check, the grain size, the activation
// vocabulary, and the only exp and tanh. Every kernel file takes these from here.
//
// Two ways to reach the vector units, both from the same source:
//   * plain C++ loops that GCC auto-vectorises, compiled three times (x86-64-v4 = AVX-512, x86-64-v3 =
//     AVX2+FMA, baseline SSE2) through MMOPS_SIMD_CLONES and picked at load time by the CPU they run on;
//   * hand-written AVX-512 kernels (functions marked MMOPS_AVX512_TARGET, chosen at run time with
//     cpu_has_avx512()), which call the same exp / tanh on a whole __m512, and, where an AVX2 core needs one of its
//     own (MMOPS_AVX2_TARGET, cpu_has_avx2()), the same on a __m256.
// exp and tanh are templates over the lane type: `float` (inside an auto-vectorised loop) or a GCC vector of
// floats such as __m512. No -march=native, so one build runs on any x86-64.
//
// What keeps the loops vectorised (check with `objdump -d`: zmm/ymm in the clones, no call to expf):
//   * exp and tanh are written out with no libm call, no floor() (rounding by the 1.5*2^23 trick) and no
//     branch: selects only, which -fno-trapping-math lets GCC if-convert;
//   * reductions carry `#pragma omp simd reduction(...)`, which licenses the reassociation that -ffast-math
//     would otherwise be needed for, without giving up NaN/inf semantics.
// Why no result here is ever subnormal on ordinary input, not even in a lane that is thrown away: Intel cores
// take a ~100-cycle microcode assist for each subnormal result unless flush-to-zero is set, and users never set
// it. exp therefore flushes below -87 (exp(-87) = 1.6e-38 is still normal), before the 2^n scaling.
#pragma once
#include <cstdint>
#include <type_traits>

// The platform guard: GCC on x86-64 gets target_clones and the AVX-512 kernels; anything else builds the
// portable loops only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(MMOPS_NO_CLONES)
#define MMOPS_X86 1
#define MMOPS_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define MMOPS_AVX512_TARGET __attribute__((target("avx512f")))
#define MMOPS_AVX512 __attribute__((target("avx512f"), always_inline)) inline
#define MMOPS_AVX2_TARGET __attribute__((target("avx2,fma")))
#define MMOPS_AVX2 __attribute__((target("avx2,fma"), always_inline)) inline
#include <immintrin.h>
// exp/tanh on a __m512 are always inlined into their AVX-512 callers: no vector crosses a call boundary.
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define MMOPS_SIMD_CLONES
#endif

#define MMOPS_INLINE inline __attribute__((always_inline))
// For a lambda whose body must compile for its caller's ISA: `[&](auto a) MMOPS_INLINE_LAMBDA { ... }`. A lambda
// left out of line inside a MMOPS_SIMD_CLONES function is compiled once, for the baseline ISA (SSE2), whatever
// clone calls it (measured: BatchNorm + tanh ran 10x slower that way).
#define MMOPS_INLINE_LAMBDA __attribute__((always_inline))

namespace mmops::simd {

// Below this many elements a parallel region costs more than it saves (a fork/join is a few microseconds).
constexpr int64_t kGrainElements = 32768;

#ifdef MMOPS_X86
inline bool cpu_has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
}
// The hand-written AVX2 kernels (MMOPS_AVX2_TARGET) also use FMA: x86-64-v3, what every AVX2 core has.
inline bool cpu_has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#else
inline bool cpu_has_avx512() { return false; }
inline bool cpu_has_avx2() { return false; }
#endif

// The activation fused into BatchNorm and the RNN; the codes are the schema's (`int activation`) and
// mmops/_activation.py's.
enum Activation : int64_t { kIdentity = 0, kTanh = 1, kRelu = 2 };

template <typename V>
MMOPS_INLINE V splat(float s) {
  return V{} + s;
}

// 2^n for integral-valued n in [-126, 127], as an IEEE float built from its exponent bits.
template <typename V>
MMOPS_INLINE V pow2n(V n) {
  if constexpr (std::is_same_v<V, float>) {
    return __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  } else {
    typedef int32_t VI __attribute__((vector_size(sizeof(V))));
    const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
    return __builtin_bit_cast(V, bits);
  }
}

// exp(x) for float lanes with ~1 ulp error over the normal range; exp(x) = 2^n * p(r), r = x - n*ln2 (Cephes).
// NaN propagates (every select compares false on NaN); x < -87 gives 0 (so exp(-inf) = 0, and no lane ever
// produces a subnormal); x > 88.38 saturates near FLT_MAX (the callers pass x - max <= 0).
template <typename V>
MMOPS_INLINE V exp(V x) {
  const V hi = splat<V>(88.3762626647949f), lo = splat<V>(-87.0f);
  V xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  // round(x * log2(e)) by adding and subtracting 1.5 * 2^23: exact for |n| < 2^22, no floor() call.
  const V n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  // r = x - n ln2, with ln2 split in two so that n*C1 is exact (Cody-Waite).
  V r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const V r2 = r * r;
  V p = splat<V>(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r2 + r + 1.0f;
  const V res = p * pow2n(n);
  return x < lo ? V{} : res;
}

#ifdef MMOPS_X86
// The same exp on a __m512 in AVX-512 instructions, bitwise equal to exp<__m512> above on every input (tested over
// every float from -128 to 128 and the specials by bench/loops/exp_avx512.cpp): the clamps as vminps / vmaxps with
// the operands in the order that returns x for a NaN (2 instructions where the selects take 4), and 2^n by vscalefps
// (exact for the integral n in [-126, 128], where the template builds the exponent bits: 1 instruction for 4).
// 17 instructions where GCC makes 22 of the template: 36 -> 27 us for 131,072 values (bench/loops/exp_avx512.cpp, AMD
// EPYC Zen 4, 1 thread). The AVX-512 cross-entropy rows (C <= 32) spend most of their time in two of these per row:
// cross_entropy_forward at (4096, 27), 2 threads, 54-55 -> 46 us, with the same bits.
MMOPS_AVX512 __m512 exp(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f), magic = _mm512_set1_ps(12582912.0f);
  __m512 xc = _mm512_min_ps(_mm512_set1_ps(88.3762626647949f), x);  // x > hi ? hi : x (a NaN x is returned)
  xc = _mm512_max_ps(lo, xc);                                          // xc < lo ? lo : xc
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), magic), magic);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  const __m512 r2 = _mm512_mul_ps(r, r);
  __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(1.9875691500E-4f), _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, lo, _CMP_NLT_US), p, n);  // x < lo: 0
}
#endif

// double: libm's exp (the double paths are for checking, not for speed).
MMOPS_INLINE double exp(double x) { return __builtin_exp(x); }

// tanh for float lanes: odd rational approximation x * P(x^2) / Q(x^2) on [-7.9, 7.9] (Eigen's coefficients),
// accurate to a few ulp, branch-free. |x| < 4e-4 returns x (tanh(x) = x to float precision); |x| >= 7.905 (the
// clamp c) returns exactly +-1 (4.5 ulp from tanh at c, 0 ulp from 9.011 on, where float's tanh rounds to 1, as in
// torch.tanh), so that the derivative 1 - h^2 of a saturated unit is exactly 0; NaN stays NaN, +-inf gives +-1.
// The saturation starts at c, not at 9.011, so that no lane evaluates the rational at the clamped value: GCC
// constant-folds P(c) / Q(c) exactly (to 1) where it vectorises a loop over floats, but evaluates it with FMAs
// (to 0.99999976) on a vector type, which gave BatchNorm's cached and streaming loops outputs 4 ulp apart for
// |x| in [7.905, 9.011); from c on both now return +-1 (the cached loops' bits did not change).
template <typename V>
MMOPS_INLINE V tanh(V x) {
  const V c = splat<V>(7.90531110763549805f), one = splat<V>(1.0f);
  V xc = x > c ? c : x;
  xc = xc < -c ? -c : xc;
  const V x2 = xc * xc;
  V p = splat<V>(-2.76076847742355e-16f);
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * xc;
  V q = splat<V>(1.19825839466702e-06f);
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  const V r = p / q;
  const V ax = x < 0.0f ? -x : x;
  const V small_or_r = ax < 0.0004f ? x : r;
  return ax >= c ? (x > 0.0f ? one : -one) : small_or_r;
}

MMOPS_INLINE double tanh(double x) { return __builtin_tanh(x); }

// h = act(y), as torch.tanh / torch.relu: relu keeps NaN (NaN < 0 is false).
template <int kAct, typename V>
MMOPS_INLINE V activate(V y) {
  if constexpr (kAct == kTanh) return simd::tanh(y);
  if constexpr (kAct == kRelu) return y < V{} ? V{} : y;
  return y;
}

// dy = dh * act'(y), act' from the activation's output h: 1 - h^2 (tanh), [h > 0] (relu). As PyTorch's
// threshold_backward, relu passes the gradient where h is NaN (only h <= 0 blocks it).
template <int kAct, typename V>
MMOPS_INLINE V act_grad(V dh, V h) {
  if constexpr (kAct == kTanh) return dh * (V{} + 1 - h * h);
  if constexpr (kAct == kRelu) return h <= V{} ? V{} : dh;
  return dh;
}

// Calls f(std::integral_constant<int, act>{}): the one place where a run-time activation code becomes a
// compile-time constant (read it in f as `decltype(a)::value`). In a SIMD clone, mark f MMOPS_INLINE_LAMBDA.
template <typename F>
MMOPS_INLINE decltype(auto) with_activation(int64_t act, F&& f) {
  if (act == kTanh) return f(std::integral_constant<int, kTanh>{});
  if (act == kRelu) return f(std::integral_constant<int, kRelu>{});
  return f(std::integral_constant<int, kIdentity>{});
}

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
