// Fused BatchNorm (training and eval) with an optional fused activation, on the CPU.
//
// Forward, per channel c over the n = N*L values of x (input (N, C) or (N, C, L)):
//   mean = sum x / n,   var = sum (x - mean)^2 / d,   d = n - 1 if bessel (the makemore notebook) else n
//   xhat = (x - mean) * invstd,  invstd = 1 / sqrt(var + eps)
//   y = gamma * xhat + beta,     h = act(y)   (act: identity, tanh or relu)
//   running_mean += momentum * (mean - running_mean)
//   running_var  += momentum * (var_unbiased - running_var)       (PyTorch's rule: always unbiased)
// The statistics take one read of x: shifted sums S1 = sum (x - K), S2 = sum (x - K)^2 with K = the
// channel's first value, accumulated in double (no cancellation worth the name: the shift puts the data
// near zero and double carries 29 more bits than float). The second read writes h = act(x * a + b) with
// a = gamma * invstd, b = beta - mean * a.
//
// Backward, with dy' = dh * act'(h) (1 - h^2 for tanh, [h > 0] for relu: dhpreact never exists as a tensor):
//   dbeta  = sum dy',   dgamma = sum dy' * xhat
//   dx = gamma * invstd / n * (n dy' - dbeta - k * xhat * dgamma),  k = n / (n - 1) if bessel else 1
//   (the notebook's closed form; k = 1 is its biased-variance twin). In eval mode mean and invstd are
//   constants (the running statistics): dx = gamma * invstd * dy'.
// One reduction pass (dbeta, dgamma) and one elementwise pass, written as dx = A dy' + B (x - mean) + D per
// channel. Both elementwise passes subtract the mean from x first, as the math does: with a + b*x forms,
// x*a and b nearly cancel when |mean| >> std, and float32 loses the digits that matter (tested at mean 1000).
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/simd.h"

namespace mmops {
namespace {

using at::Tensor;

using simd::kIdentity;
using simd::kRelu;
using simd::kTanh;
using simd::kGrainElements;

// Shapes: x is (N, C, L) contiguous; for (N, C) input L = 1. Channel c of row n starts at (n*C + c)*L.
struct Shape {
  int64_t N, C, L;
};

// ---- statistics: S1[c] += sum (x - K[c]), S2[c] += sum (x - K[c])^2 over rows [n0, n1) -------------------
template <typename T>
MMOPS_INLINE void shifted_sums(const T* x, Shape s, const T* K, int64_t n0, int64_t n1, double* S1, double* S2) {
  const int64_t C = s.C, L = s.L;
  if (L == 1) {  // (N, C): vectorise across the channels of a row
    for (int64_t n = n0; n < n1; ++n) {
      const T* r = x + n * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const double d = static_cast<double>(r[c]) - static_cast<double>(K[c]);
        S1[c] += d;
        S2[c] += d * d;
      }
    }
  } else {  // (N, C, L): vectorise along L
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t c = 0; c < C; ++c) {
        const T* r = x + (n * C + c) * L;
        const double k = static_cast<double>(K[c]);
        double a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
        for (int64_t l = 0; l < L; ++l) {
          const double d = static_cast<double>(r[l]) - k;
          a += d;
          b += d * d;
        }
        S1[c] += a;
        S2[c] += b;
      }
  }
}

// ---- h = act((x - m[c]) * a[c] + b[c]) over rows [n0, n1) -----------------------------------------------
template <typename T, int kAct>
MMOPS_INLINE void normalize_rows(const T* x, T* h, Shape s, const T* m, const T* a, const T* b, int64_t n0,
                                int64_t n1) {
  const int64_t C = s.C, L = s.L;
  if (L == 1) {
    for (int64_t n = n0; n < n1; ++n) {
      const T* r = x + n * C;
      T* o = h + n * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] = simd::activate<kAct>((r[c] - m[c]) * a[c] + b[c]);
    }
  } else {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t c = 0; c < C; ++c) {
        const T* r = x + (n * C + c) * L;
        T* o = h + (n * C + c) * L;
        const T mc = m[c], ac = a[c], bc = b[c];
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) o[l] = simd::activate<kAct>((r[l] - mc) * ac + bc);
      }
  }
}

// ---- backward reduction: Sdy[c] += sum dy', Sdyx[c] += sum dy' * (x - mean[c]) --------------------------
template <typename T, int kAct>
MMOPS_INLINE void backward_sums(const T* dh, const T* h, const T* x, Shape s, const T* mean, int64_t n0, int64_t n1,
                                double* Sdy, double* Sdyx) {
  const int64_t C = s.C, L = s.L;
  if (L == 1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t o = n * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T g = simd::act_grad<kAct>(dh[o + c], h[o + c]);
        Sdy[c] += static_cast<double>(g);
        Sdyx[c] += static_cast<double>(g * (x[o + c] - mean[c]));
      }
    }
  } else {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t o = (n * C + c) * L;
        const T m = mean[c];
        double a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
        for (int64_t l = 0; l < L; ++l) {
          const T g = simd::act_grad<kAct>(dh[o + l], h[o + l]);
          a += static_cast<double>(g);
          b += static_cast<double>(g * (x[o + l] - m));
        }
        Sdy[c] += a;
        Sdyx[c] += b;
      }
  }
}

// ---- dx = A[c] dy' + B[c] (x - m[c]) + D[c] over rows [n0, n1) ----------------------------------------------
template <typename T, int kAct>
MMOPS_INLINE void backward_dx(const T* dh, const T* h, const T* x, T* dx, Shape s, const T* m, const T* A, const T* B,
                              const T* D, int64_t n0, int64_t n1) {
  const int64_t C = s.C, L = s.L;
  if (L == 1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t o = n * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dx[o + c] = A[c] * simd::act_grad<kAct>(dh[o + c], h[o + c]) + B[c] * (x[o + c] - m[c]) + D[c];
    }
  } else {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t o = (n * C + c) * L;
        const T mc = m[c], a = A[c], b = B[c], d = D[c];
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) dx[o + l] = a * simd::act_grad<kAct>(dh[o + l], h[o + l]) + b * (x[o + l] - mc) + d;
      }
  }
}

// SIMD-dispatched entry points (one ifunc call per block of rows): float through target_clones, double plain.
MMOPS_SIMD_CLONES void bn_stats(const float* x, Shape s, const float* K, int64_t n0, int64_t n1, double* S1,
                                double* S2) {
  shifted_sums(x, s, K, n0, n1, S1, S2);
}
void bn_stats(const double* x, Shape s, const double* K, int64_t n0, int64_t n1, double* S1, double* S2) {
  shifted_sums(x, s, K, n0, n1, S1, S2);
}

template <typename T>
MMOPS_INLINE void bn_normalize_impl(int64_t act, const T* x, T* h, Shape s, const T* m, const T* a, const T* b,
                                    int64_t n0, int64_t n1) {
  if (act == kTanh) normalize_rows<T, kTanh>(x, h, s, m, a, b, n0, n1);
  else if (act == kRelu) normalize_rows<T, kRelu>(x, h, s, m, a, b, n0, n1);
  else normalize_rows<T, kIdentity>(x, h, s, m, a, b, n0, n1);
}
MMOPS_SIMD_CLONES void bn_normalize(int64_t act, const float* x, float* h, Shape s, const float* m, const float* a,
                                    const float* b, int64_t n0, int64_t n1) {
  bn_normalize_impl(act, x, h, s, m, a, b, n0, n1);
}
void bn_normalize(int64_t act, const double* x, double* h, Shape s, const double* m, const double* a, const double* b,
                  int64_t n0, int64_t n1) {
  bn_normalize_impl(act, x, h, s, m, a, b, n0, n1);
}

template <typename T>
MMOPS_INLINE void bn_bsums_impl(int64_t act, const T* dh, const T* h, const T* x, Shape s, const T* mean, int64_t n0,
                                int64_t n1, double* Sdy, double* Sdyx) {
  if (act == kTanh) backward_sums<T, kTanh>(dh, h, x, s, mean, n0, n1, Sdy, Sdyx);
  else if (act == kRelu) backward_sums<T, kRelu>(dh, h, x, s, mean, n0, n1, Sdy, Sdyx);
  else backward_sums<T, kIdentity>(dh, h, x, s, mean, n0, n1, Sdy, Sdyx);
}
MMOPS_SIMD_CLONES void bn_bsums(int64_t act, const float* dh, const float* h, const float* x, Shape s,
                                const float* mean, int64_t n0, int64_t n1, double* Sdy, double* Sdyx) {
  bn_bsums_impl(act, dh, h, x, s, mean, n0, n1, Sdy, Sdyx);
}
void bn_bsums(int64_t act, const double* dh, const double* h, const double* x, Shape s, const double* mean, int64_t n0,
              int64_t n1, double* Sdy, double* Sdyx) {
  bn_bsums_impl(act, dh, h, x, s, mean, n0, n1, Sdy, Sdyx);
}

template <typename T>
MMOPS_INLINE void bn_dx_impl(int64_t act, const T* dh, const T* h, const T* x, T* dx, Shape s, const T* m, const T* A,
                             const T* B, const T* D, int64_t n0, int64_t n1) {
  if (act == kTanh) backward_dx<T, kTanh>(dh, h, x, dx, s, m, A, B, D, n0, n1);
  else if (act == kRelu) backward_dx<T, kRelu>(dh, h, x, dx, s, m, A, B, D, n0, n1);
  else backward_dx<T, kIdentity>(dh, h, x, dx, s, m, A, B, D, n0, n1);
}
// Eval mode: dx = A[c] dy' over rows [n0, n1).
template <typename T, int kAct>
MMOPS_INLINE void eval_dx_rows(const T* dh, const T* h, T* dx, Shape s, const T* A, int64_t n0, int64_t n1) {
  const int64_t C = s.C, L = s.L;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t o = (n * C + c) * L;
      const T a = A[c];
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) dx[o + l] = a * simd::act_grad<kAct>(dh[o + l], h[o + l]);
    }
}
template <typename T>
MMOPS_INLINE void bn_eval_dx_impl(int64_t act, const T* dh, const T* h, T* dx, Shape s, const T* A, int64_t n0,
                                  int64_t n1) {
  simd::with_activation(act, [&](auto a) { eval_dx_rows<T, decltype(a)::value>(dh, h, dx, s, A, n0, n1); });
}
MMOPS_SIMD_CLONES void bn_eval_dx(int64_t act, const float* dh, const float* h, float* dx, Shape s, const float* A,
                                  int64_t n0, int64_t n1) {
  bn_eval_dx_impl(act, dh, h, dx, s, A, n0, n1);
}
void bn_eval_dx(int64_t act, const double* dh, const double* h, double* dx, Shape s, const double* A, int64_t n0,
                int64_t n1) {
  bn_eval_dx_impl(act, dh, h, dx, s, A, n0, n1);
}

MMOPS_SIMD_CLONES void bn_dx(int64_t act, const float* dh, const float* h, const float* x, float* dx, Shape s,
                             const float* m, const float* A, const float* B, const float* D, int64_t n0, int64_t n1) {
  bn_dx_impl(act, dh, h, x, dx, s, m, A, B, D, n0, n1);
}
void bn_dx(int64_t act, const double* dh, const double* h, const double* x, double* dx, Shape s, const double* m,
           const double* A, const double* B, const double* D, int64_t n0, int64_t n1) {
  bn_dx_impl(act, dh, h, x, dx, s, m, A, B, D, n0, n1);
}

// ---- float32 (N, C): the fast path --------------------------------------------------------------------------
// The generic loops above keep their per-channel accumulators in memory (one load and one store of a double
// per element and sum) and split the work into one parallel region per pass. Here:
//   * channels go in tiles of 32 whose sums, widened to double (four 8-double vectors each), stay in registers
//     over a block of kRowBlock rows (64 rows x 800 bytes sit in L1/L2 while the tiles walk them); the
//     arithmetic is the generic path's, so the statistics are accumulated in double as before (accumulating in
//     float over the block was measured 3x less accurate than PyTorch at (333, 256): not taken);
//   * the coefficients of the elementwise passes (m, a, b; A, B, D) stay in registers the same way;
//   * the reduction and the elementwise pass of a call share one OpenMP region: each thread reduces its
//     rows, one thread combines the partial sums and computes the coefficients, and each thread then
//     writes the same rows it has just read (from its own cache) -- one fork/join instead of two.
typedef float vf16 __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
typedef double vd8 __attribute__((vector_size(64)));

MMOPS_INLINE vf16 load16(const float* p) {
  vf16 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
MMOPS_INLINE void store16(float* p, vf16 v) { __builtin_memcpy(p, &v, sizeof v); }
MMOPS_INLINE vf8 load8(const float* p) {
  vf8 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
MMOPS_INLINE vd8 widen8(const float* p) { return __builtin_convertvector(load8(p), vd8); }
MMOPS_INLINE vd8 load8d(const double* p) {
  vd8 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
MMOPS_INLINE void store8d(double* p, vd8 v) { __builtin_memcpy(p, &v, sizeof v); }

constexpr int64_t kTile = 32, kRowBlock = 64;

// S1[c] += sum (x - K[c]), S2[c] += sum (x - K[c])^2 over rows [n0, n1) of the (N, C) float x, in double:
// the 32 channels of a tile widen to four 8-double vectors, which accumulate in registers over a block of rows.
MMOPS_SIMD_CLONES void stats_f32(const float* x, int64_t C, const float* K, int64_t n0, int64_t n1, double* S1,
                                 double* S2) {
  const int64_t Ct = C / kTile * kTile;
  for (int64_t r0 = n0; r0 < n1; r0 += kRowBlock) {
    const int64_t r1 = std::min(r0 + kRowBlock, n1);
    for (int64_t c0 = 0; c0 < Ct; c0 += kTile) {
      vd8 k[4], a[4], b[4];
      for (int q = 0; q < 4; ++q) {
        k[q] = widen8(K + c0 + 8 * q);
        a[q] = load8d(S1 + c0 + 8 * q);
        b[q] = load8d(S2 + c0 + 8 * q);
      }
      for (int64_t n = r0; n < r1; ++n) {
        const float* r = x + n * C + c0;
        for (int q = 0; q < 4; ++q) {
          const vd8 d = widen8(r + 8 * q) - k[q];
          a[q] += d;
          b[q] += d * d;
        }
      }
      for (int q = 0; q < 4; ++q) {
        store8d(S1 + c0 + 8 * q, a[q]);
        store8d(S2 + c0 + 8 * q, b[q]);
      }
    }
    for (int64_t n = r0; n < r1 && Ct < C; ++n) {  // the last C % 32 channels
      const float* r = x + n * C;
#pragma omp simd
      for (int64_t c = Ct; c < C; ++c) {
        const double d = static_cast<double>(r[c]) - static_cast<double>(K[c]);
        S1[c] += d;
        S2[c] += d * d;
      }
    }
  }
}

// h = act((x - m[c]) * a[c] + b[c]) over rows [n0, n1).
template <int kAct>
MMOPS_INLINE void normalize_f32_impl(const float* x, float* h, int64_t C, const float* m, const float* a, const float* b,
                                     int64_t n0, int64_t n1) {
  const int64_t Ct = C / kTile * kTile;
  for (int64_t r0 = n0; r0 < n1; r0 += kRowBlock) {
    const int64_t r1 = std::min(r0 + kRowBlock, n1);
    for (int64_t c0 = 0; c0 < Ct; c0 += kTile) {
      const vf16 a0 = load16(a + c0), a1 = load16(a + c0 + 16), b0 = load16(b + c0), b1 = load16(b + c0 + 16);
      const vf16 m0 = load16(m + c0), m1 = load16(m + c0 + 16);
      for (int64_t n = r0; n < r1; ++n) {
        const int64_t o = n * C + c0;
        store16(h + o, simd::activate<kAct>((load16(x + o) - m0) * a0 + b0));
        store16(h + o + 16, simd::activate<kAct>((load16(x + o + 16) - m1) * a1 + b1));
      }
    }
    for (int64_t n = r0; n < r1 && Ct < C; ++n) {
      const int64_t o = n * C;
#pragma omp simd
      for (int64_t c = Ct; c < C; ++c) h[o + c] = simd::activate<kAct>((x[o + c] - m[c]) * a[c] + b[c]);
    }
  }
}
MMOPS_SIMD_CLONES void normalize_f32(int64_t act, const float* x, float* h, int64_t C, const float* m, const float* a,
                                     const float* b, int64_t n0, int64_t n1) {
  if (act == kTanh) normalize_f32_impl<kTanh>(x, h, C, m, a, b, n0, n1);
  else if (act == kRelu) normalize_f32_impl<kRelu>(x, h, C, m, a, b, n0, n1);
  else normalize_f32_impl<kIdentity>(x, h, C, m, a, b, n0, n1);
}

// Sdy[c] += sum dy', Sdyx[c] += sum dy' (x - mean[c]) over rows [n0, n1), dy' = dh * act'(h): each term in
// float (as the generic path), accumulated in double registers per tile as in stats_f32.
template <int kAct>
MMOPS_INLINE void bsums_f32_impl(const float* dh, const float* h, const float* x, int64_t C, const float* mean,
                                 int64_t n0, int64_t n1, double* Sdy, double* Sdyx) {
  const int64_t Ct = C / kTile * kTile;
  for (int64_t r0 = n0; r0 < n1; r0 += kRowBlock) {
    const int64_t r1 = std::min(r0 + kRowBlock, n1);
    for (int64_t c0 = 0; c0 < Ct; c0 += kTile) {
      vf8 m[4];
      vd8 a[4], b[4];
      for (int q = 0; q < 4; ++q) {
        m[q] = load8(mean + c0 + 8 * q);
        a[q] = load8d(Sdy + c0 + 8 * q);
        b[q] = load8d(Sdyx + c0 + 8 * q);
      }
      for (int64_t n = r0; n < r1; ++n) {
        const int64_t o = n * C + c0;
        for (int q = 0; q < 4; ++q) {
          const vf8 g = simd::act_grad<kAct>(load8(dh + o + 8 * q), kAct ? load8(h + o + 8 * q) : vf8{});
          a[q] += __builtin_convertvector(g, vd8);
          b[q] += __builtin_convertvector(g * (load8(x + o + 8 * q) - m[q]), vd8);
        }
      }
      for (int q = 0; q < 4; ++q) {
        store8d(Sdy + c0 + 8 * q, a[q]);
        store8d(Sdyx + c0 + 8 * q, b[q]);
      }
    }
    for (int64_t n = r0; n < r1 && Ct < C; ++n) {
      const int64_t o = n * C;
#pragma omp simd
      for (int64_t c = Ct; c < C; ++c) {
        const float g = simd::act_grad<kAct>(dh[o + c], h[o + c]);
        Sdy[c] += static_cast<double>(g);
        Sdyx[c] += static_cast<double>(g * (x[o + c] - mean[c]));
      }
    }
  }
}
MMOPS_SIMD_CLONES void bsums_f32(int64_t act, const float* dh, const float* h, const float* x, int64_t C,
                                 const float* mean, int64_t n0, int64_t n1, double* Sdy, double* Sdyx) {
  if (act == kTanh) bsums_f32_impl<kTanh>(dh, h, x, C, mean, n0, n1, Sdy, Sdyx);
  else if (act == kRelu) bsums_f32_impl<kRelu>(dh, h, x, C, mean, n0, n1, Sdy, Sdyx);
  else bsums_f32_impl<kIdentity>(dh, h, x, C, mean, n0, n1, Sdy, Sdyx);
}

// dx = A[c] dy' + B[c] (x - m[c]) + D[c] over rows [n0, n1).
template <int kAct>
MMOPS_INLINE void dx_f32_impl(const float* dh, const float* h, const float* x, float* dx, int64_t C, const float* m,
                              const float* A, const float* B, const float* D, int64_t n0, int64_t n1) {
  const int64_t Ct = C / kTile * kTile;
  for (int64_t r0 = n0; r0 < n1; r0 += kRowBlock) {
    const int64_t r1 = std::min(r0 + kRowBlock, n1);
    for (int64_t c0 = 0; c0 < Ct; c0 += kTile) {
      const vf16 A0 = load16(A + c0), A1 = load16(A + c0 + 16), B0 = load16(B + c0), B1 = load16(B + c0 + 16);
      const vf16 D0 = load16(D + c0), D1 = load16(D + c0 + 16), m0 = load16(m + c0), m1 = load16(m + c0 + 16);
      for (int64_t n = r0; n < r1; ++n) {
        const int64_t o = n * C + c0;
        const vf16 g0 = simd::act_grad<kAct>(load16(dh + o), kAct ? load16(h + o) : vf16{});
        const vf16 g1 = simd::act_grad<kAct>(load16(dh + o + 16), kAct ? load16(h + o + 16) : vf16{});
        store16(dx + o, A0 * g0 + B0 * (load16(x + o) - m0) + D0);
        store16(dx + o + 16, A1 * g1 + B1 * (load16(x + o + 16) - m1) + D1);
      }
    }
    for (int64_t n = r0; n < r1 && Ct < C; ++n) {
      const int64_t o = n * C;
#pragma omp simd
      for (int64_t c = Ct; c < C; ++c) dx[o + c] = A[c] * simd::act_grad<kAct>(dh[o + c], h[o + c]) + B[c] * (x[o + c] - m[c]) + D[c];
    }
  }
}
MMOPS_SIMD_CLONES void dx_f32(int64_t act, const float* dh, const float* h, const float* x, float* dx, int64_t C,
                              const float* m, const float* A, const float* B, const float* D, int64_t n0, int64_t n1) {
  if (act == kTanh) dx_f32_impl<kTanh>(dh, h, x, dx, C, m, A, B, D, n0, n1);
  else if (act == kRelu) dx_f32_impl<kRelu>(dh, h, x, dx, C, m, A, B, D, n0, n1);
  else dx_f32_impl<kIdentity>(dh, h, x, dx, C, m, A, B, D, n0, n1);
}

// Threads for one call: one below kGrainElements (a fork/join costs more than the work), and none nested.
int threads_for(int64_t elements) {
  if (elements < 2 * kGrainElements || at::in_parallel_region()) return 1;
  return static_cast<int>(std::min<int64_t>(at::get_num_threads(), elements / kGrainElements));
}

// Runs reduce(n0, n1, part_of_thread), then combine() once, then elementwise(n0, n1) over the same rows, in one
// parallel region (threads rows split alike in both phases). part: nthreads * 2C doubles, zeroed here.
template <typename Reduce, typename Combine, typename Elementwise>
void reduce_then_elementwise(int64_t N, int64_t C, std::vector<double>& part, Reduce&& reduce, Combine&& combine,
                             Elementwise&& elementwise) {
  const int nt = threads_for(N * C);
  part.assign(static_cast<size_t>(nt) * 2 * C, 0.0);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = nt > 1 ? omp_get_thread_num() : 0;
    const int T = nt > 1 ? omp_get_num_threads() : 1;
    const int64_t chunk = (N + T - 1) / T, n0 = std::min<int64_t>(N, t * chunk), n1 = std::min<int64_t>(N, n0 + chunk);
    if (n0 < n1) reduce(n0, n1, part.data() + static_cast<size_t>(t) * 2 * C);
#pragma omp barrier
#pragma omp single
    combine(T);
    if (n0 < n1) elementwise(n0, n1);
  }
}

// Adds up the per-thread partial sums part[t][0:C] and part[t][C:2C] of T threads.
void add_partials(const std::vector<double>& part, int T, int64_t C, std::vector<double>& S1, std::vector<double>& S2) {
  S1.assign(C, 0.0);
  S2.assign(C, 0.0);
  for (int t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) {
      S1[c] += part[t * 2 * C + c];
      S2[c] += part[t * 2 * C + C + c];
    }
}

// Per-thread partial sums over row blocks (part[t][0:C] and part[t][C:2C]), then added up.
template <typename F>
void reduce_rows(Shape s, F&& body, std::vector<double>& out1, std::vector<double>& out2) {
  const int64_t C = s.C, per_row = s.C * s.L;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(per_row, 1));
  const int nt = std::max(1, at::get_num_threads());
  std::vector<double> part(static_cast<size_t>(nt) * 2 * C, 0.0);
  at::parallel_for(0, s.N, grain, [&](int64_t n0, int64_t n1) {
    double* p = part.data() + static_cast<size_t>(at::get_thread_num()) * 2 * C;
    body(n0, n1, p, p + C);
  });
  add_partials(part, nt, C, out1, out2);
}

// max(v, 0) that keeps NaN (std::max(0.0, NaN) is 0): rounding can take a sum of squares a hair below 0, but a
// NaN or inf among the values must reach the variance, the output and running_var, as in PyTorch.
MMOPS_INLINE double non_negative(double v) { return v < 0 ? 0.0 : v; }

// The shift of a channel's sums: its first value when finite (it centres the data), else 0 (an inf shift would turn
// the sums into inf - inf = NaN where PyTorch's mean is inf).
template <typename T>
MMOPS_INLINE T shift_of(T first) {
  return std::isfinite(static_cast<double>(first)) ? first : T(0);
}

// A 1-D per-channel argument as a contiguous tensor (a view with any stride, e.g. w[::3] or an expanded scalar,
// is copied; a contiguous one is returned as it is), or an undefined tensor when absent.
Tensor contiguous_param(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : Tensor();
}

// The running statistics were updated in contiguous copies when the caller's tensors are views with other strides.
void write_back_running_stats(const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                              const Tensor& rm, const Tensor& rv) {
  if (rm.defined() && !rm.is_same(*running_mean)) running_mean->copy_(rm);
  if (rv.defined() && !rv.is_same(*running_var)) running_var->copy_(rv);
}

Shape shape_of(const Tensor& x) { return {x.size(0), x.size(1), x.dim() == 3 ? x.size(2) : 1}; }

void check_param(const std::optional<Tensor>& t, const char* name, const Tensor& input) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == input.size(1), "mmops.batch_norm: ", name, " must have shape (",
                    input.size(1), ",) (one per channel), got ", t->sizes());
  TORCH_CHECK_TYPE(t->scalar_type() == input.scalar_type(), "mmops.batch_norm: ", name, " dtype ", t->scalar_type(),
                   " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(t->device() == input.device(), "mmops.batch_norm: ", name, " is on ", t->device(), " but input is on ",
              input.device());
}

bool has(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// mean, invstd and the running statistics of each channel from its shifted sums (S1, S2 about K[c]).
template <typename T>
void finish_stats(int64_t C, int64_t n, const T* K, const double* S1, const double* S2, bool bessel, double momentum,
                  double eps, T* mp, T* ip, T* rmp, T* rvp) {
  for (int64_t c = 0; c < C; ++c) {
    const double d1 = S1[c] / n;
    const double m2 = non_negative(S2[c] - S1[c] * d1);  // sum (x - mean)^2
    const double var = m2 / (bessel ? n - 1 : n);
    const double m = static_cast<double>(K[c]) + d1;
    mp[c] = static_cast<T>(m);
    ip[c] = static_cast<T>(1.0 / std::sqrt(var + eps));
    if (rmp) {
      rmp[c] = static_cast<T>((1 - momentum) * rmp[c] + momentum * m);
      rvp[c] = static_cast<T>((1 - momentum) * rvp[c] + momentum * (m2 / (n - 1)));
    }
  }
}

// h = act((x - mean) * a + b): a = gamma * invstd, b = beta.
template <typename T>
void affine_coefficients(int64_t C, const T* wp, const T* bp, const T* mp, const T* ip, T* a, T* b) {
  for (int64_t c = 0; c < C; ++c) {
    a[c] = (wp ? wp[c] : T(1)) * ip[c];
    b[c] = bp ? bp[c] : T(0);
  }
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_forward(const Tensor& input, const std::optional<Tensor>& weight,
                                                      const std::optional<Tensor>& bias,
                                                      const std::optional<Tensor>& running_mean,
                                                      const std::optional<Tensor>& running_var, bool training,
                                                      double momentum, double eps, bool bessel, int64_t activation) {
  TORCH_CHECK_VALUE(input.dim() == 2 || input.dim() == 3, "mmops.batch_norm: expected input of shape (N, C) or "
                    "(N, C, L), got ", input.sizes());
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
                   "mmops.batch_norm: input must be float32 or float64 here, got ", input.scalar_type());
  TORCH_CHECK_VALUE(activation >= 0 && activation <= 2, "mmops.batch_norm: activation code ", activation,
                    " is not 0 (none), 1 (tanh) or 2 (relu)");
  check_param(weight, "weight", input);
  check_param(bias, "bias", input);
  check_param(running_mean, "running_mean", input);
  check_param(running_var, "running_var", input);
  TORCH_CHECK_VALUE(has(running_mean) == has(running_var), "mmops.batch_norm: running_mean and running_var must be "
                    "given together");
  TORCH_CHECK_VALUE(training || has(running_mean), "mmops.batch_norm: eval mode (training=False) needs running_mean "
                    "and running_var");
  const Shape s = shape_of(input);
  const int64_t n = s.N * s.L;
  TORCH_CHECK_VALUE(!training || n > 1, "mmops.batch_norm: expected more than 1 value per channel when training, got "
                    "input of shape ", input.sizes());
  TORCH_CHECK_VALUE(!(training && bessel) || n > 1, "mmops.batch_norm: bessel=True needs n > 1");
  TORCH_CHECK_VALUE(!training || eps > 0, "mmops.batch_norm: eps must be positive during training, got ", eps);
  for (const auto& [stat, name] : {std::pair{&running_mean, "running_mean"}, std::pair{&running_var, "running_var"}})
    TORCH_CHECK(!training || !has(*stat) || at::has_internal_overlap(**stat) != at::MemOverlap::Yes, "mmops.batch_norm: ",
                name, " has elements that share memory (e.g. an expand()ed tensor), so it cannot be updated in place; "
                "pass a tensor with one element per channel");

  // Every per-channel argument is read through a contiguous pointer: views with other strides are copied (the
  // running statistics are updated in the copy and written back through the caller's view at the end).
  const Tensor w = contiguous_param(weight), bb = contiguous_param(bias);
  const Tensor rm = contiguous_param(running_mean), rv = contiguous_param(running_var);
  const Tensor x = input.contiguous();
  Tensor h = at::empty(x.sizes(), x.options());
  Tensor mean = at::empty({s.C}, x.options());
  Tensor invstd = at::empty({s.C}, x.options());

  if (training && x.scalar_type() == at::kFloat && s.L == 1) {  // the fast path (see stats_f32)
    const float* xp = x.const_data_ptr<float>();
    float *hp = h.mutable_data_ptr<float>(), *mp = mean.mutable_data_ptr<float>(), *ip = invstd.mutable_data_ptr<float>();
    float* rmp = rm.defined() ? rm.mutable_data_ptr<float>() : nullptr;
    float* rvp = rv.defined() ? rv.mutable_data_ptr<float>() : nullptr;
    const float* wp = w.defined() ? w.const_data_ptr<float>() : nullptr;
    const float* bp = bb.defined() ? bb.const_data_ptr<float>() : nullptr;
    const int64_t C = s.C;
    std::vector<float> K(C), a(C), b(C);
    for (int64_t c = 0; c < C; ++c) K[c] = shift_of(xp[c]);  // the shift: row 0
    std::vector<double> part, S1, S2;
    reduce_then_elementwise(
        s.N, C, part, [&](int64_t n0, int64_t n1, double* p) { stats_f32(xp, C, K.data(), n0, n1, p, p + C); },
        [&](int T) {
          add_partials(part, T, C, S1, S2);
          finish_stats(C, n, K.data(), S1.data(), S2.data(), bessel, momentum, eps, mp, ip, rmp, rvp);
          affine_coefficients(C, wp, bp, mp, ip, a.data(), b.data());
        },
        [&](int64_t n0, int64_t n1) { normalize_f32(activation, xp, hp, C, mp, a.data(), b.data(), n0, n1); });
    write_back_running_stats(running_mean, running_var, rm, rv);
    return {h, mean, invstd};
  }

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmops_batch_norm_forward", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    T* mp = mean.mutable_data_ptr<T>();
    T* ip = invstd.mutable_data_ptr<T>();
    if (training) {
      // The shift K: the channel's first value (row 0, l = 0).
      std::vector<T> K(s.C);
      for (int64_t c = 0; c < s.C; ++c) K[c] = shift_of(xp[c * s.L]);
      std::vector<double> S1, S2;
      reduce_rows(s, [&](int64_t n0, int64_t n1, double* a, double* b) { bn_stats(xp, s, K.data(), n0, n1, a, b); },
                  S1, S2);
      T* rmp = rm.defined() ? rm.mutable_data_ptr<T>() : nullptr;
      T* rvp = rv.defined() ? rv.mutable_data_ptr<T>() : nullptr;
      finish_stats(s.C, n, K.data(), S1.data(), S2.data(), bessel, momentum, eps, mp, ip, rmp, rvp);
    } else {
      const T* rmp = rm.const_data_ptr<T>();
      const T* rvp = rv.const_data_ptr<T>();
      for (int64_t c = 0; c < s.C; ++c) {
        mp[c] = rmp[c];
        ip[c] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(rvp[c]) + eps));
      }
    }
    const T* wp = w.defined() ? w.const_data_ptr<T>() : nullptr;
    const T* bp = bb.defined() ? bb.const_data_ptr<T>() : nullptr;
    std::vector<T> a(s.C), b(s.C);
    affine_coefficients(s.C, wp, bp, mp, ip, a.data(), b.data());
    T* hp = h.mutable_data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(s.C * s.L, 1));
    at::parallel_for(0, s.N, grain, [&](int64_t n0, int64_t n1) {
      bn_normalize(activation, xp, hp, s, mp, a.data(), b.data(), n0, n1);
    });
  });
  write_back_running_stats(running_mean, running_var, rm, rv);
  return {h, mean, invstd};
}

// dx = A dy' + B (x - mean) + D per channel, from the sums over all n values of the channel (n, Sdy = sum dy',
// Sdyx = sum dy' (x - mean)); see the math at the top of this file.
template <typename T>
void dx_coefficients(int64_t C, int64_t n, const T* wp, const T* ip, const double* Sdy, const double* Sdyx,
                     bool training, bool bessel, T* A, T* B, T* D) {
  for (int64_t c = 0; c < C; ++c) {
    const double inv = ip[c];
    const double dbeta_c = Sdy[c], dgamma_c = Sdyx[c] * inv;
    const double a = (wp ? static_cast<double>(wp[c]) : 1.0) * inv;  // gamma * invstd
    if (training) {
      const double k = bessel ? static_cast<double>(n) / (n - 1) : 1.0;
      const double b = -a * k * dgamma_c * inv / n;  // coefficient of (x - mean) = xhat / invstd
      A[c] = static_cast<T>(a);
      B[c] = static_cast<T>(b);
      D[c] = static_cast<T>(-a * dbeta_c / n);
    } else {
      A[c] = static_cast<T>(a);
      B[c] = D[c] = T(0);
    }
  }
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward(const Tensor& grad_out, const Tensor& output,
                                                       const Tensor& input, const std::optional<Tensor>& weight,
                                                       const Tensor& mean_in, const Tensor& invstd_in, bool training,
                                                       bool bessel, int64_t activation,
                                                       std::array<bool, 3> output_mask) {
  TORCH_CHECK_VALUE(grad_out.sizes() == input.sizes() && output.sizes() == input.sizes(),
                    "mmops.batch_norm backward: grad_output ", grad_out.sizes(), " and output ", output.sizes(),
                    " must have the input's shape ", input.sizes());
  const Shape s = shape_of(input);
  const int64_t n = s.N * s.L;
  const Tensor x = input.contiguous(), dh = grad_out.contiguous(), h = output.contiguous();
  const Tensor w = contiguous_param(weight), mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  // Outputs that output_mask leaves out are returned empty (shape (0,)), not computed.
  Tensor dx = at::empty(output_mask[0] ? x.sizes() : at::IntArrayRef{0}, x.options());
  Tensor dgamma = at::empty({output_mask[1] ? s.C : 0}, x.options());
  Tensor dbeta = at::empty({output_mask[2] ? s.C : 0}, x.options());

  if (training && x.scalar_type() == at::kFloat && s.L == 1) {  // the fast path (see stats_f32)
    const float *xp = x.const_data_ptr<float>(), *dhp = dh.const_data_ptr<float>(), *hp = h.const_data_ptr<float>();
    const float *mp = mean.const_data_ptr<float>(), *ip = invstd.const_data_ptr<float>();
    const float* wp = w.defined() ? w.const_data_ptr<float>() : nullptr;
    float* dxp = output_mask[0] ? dx.mutable_data_ptr<float>() : nullptr;
    float* dgp = output_mask[1] ? dgamma.mutable_data_ptr<float>() : nullptr;
    float* dbp = output_mask[2] ? dbeta.mutable_data_ptr<float>() : nullptr;
    const int64_t C = s.C;
    std::vector<float> A(C), B(C), D(C);
    std::vector<double> part, Sdy, Sdyx;
    reduce_then_elementwise(
        s.N, C, part,
        [&](int64_t n0, int64_t n1, double* p) { bsums_f32(activation, dhp, hp, xp, C, mp, n0, n1, p, p + C); },
        [&](int T) {
          add_partials(part, T, C, Sdy, Sdyx);
          for (int64_t c = 0; c < C; ++c) {
            if (dgp) dgp[c] = static_cast<float>(Sdyx[c] * ip[c]);  // sum dy' * xhat
            if (dbp) dbp[c] = static_cast<float>(Sdy[c]);            // sum dy'
          }
          dx_coefficients(C, n, wp, ip, Sdy.data(), Sdyx.data(), training, bessel, A.data(), B.data(), D.data());
        },
        [&](int64_t n0, int64_t n1) {
          if (dxp) dx_f32(activation, dhp, hp, xp, dxp, C, mp, A.data(), B.data(), D.data(), n0, n1);
        });
    return {dx, dgamma, dbeta};
  }

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmops_batch_norm_backward", [&] {
    using T = scalar_t;
    const T *xp = x.const_data_ptr<T>(), *dhp = dh.const_data_ptr<T>(), *hp = h.const_data_ptr<T>();
    const T *mp = mean.const_data_ptr<T>(), *ip = invstd.const_data_ptr<T>();
    const T* wp = w.defined() ? w.const_data_ptr<T>() : nullptr;
    std::vector<double> Sdy, Sdyx;
    reduce_rows(s, [&](int64_t n0, int64_t n1, double* a, double* b) {
      bn_bsums(activation, dhp, hp, xp, s, mp, n0, n1, a, b);
    }, Sdy, Sdyx);
    if (output_mask[1] || output_mask[2])
      for (int64_t c = 0; c < s.C; ++c) {
        if (output_mask[1]) dgamma.mutable_data_ptr<T>()[c] = static_cast<T>(Sdyx[c] * ip[c]);  // sum dy' * xhat
        if (output_mask[2]) dbeta.mutable_data_ptr<T>()[c] = static_cast<T>(Sdy[c]);            // sum dy'
      }
    std::vector<T> A(s.C), B(s.C), D(s.C);
    dx_coefficients(s.C, n, wp, ip, Sdy.data(), Sdyx.data(), training, bessel, A.data(), B.data(), D.data());
    if (output_mask[0]) {
      T* dxp = dx.mutable_data_ptr<T>();
      const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(s.C * s.L, 1));
      at::parallel_for(0, s.N, grain, [&](int64_t n0, int64_t n1) {
        // eval: dx = gamma * invstd * dy' alone (the (x - mean) term is absent, not 0 * (x - mean): a NaN or inf
        // in x must not reach dx, as in PyTorch)
        if (training) bn_dx(activation, dhp, hp, xp, dxp, s, mp, A.data(), B.data(), D.data(), n0, n1);
        else bn_eval_dx(activation, dhp, hp, dxp, s, A.data(), n0, n1);
      });
    }
  });
  return {dx, dgamma, dbeta};
}

// ---- the pieces of SyncBatchNorm (mmops.nn.SyncBatchNorm): statistics and backward sums of the local shard,
// all-reduced in Python between the calls, then the elementwise passes with the global numbers. ------------

// Local mean and M2 = sum (x - mean)^2 per channel, in float64 (combined across ranks by Chan's formula).
std::tuple<Tensor, Tensor> batch_norm_stats(const Tensor& input) {
  TORCH_CHECK_VALUE(input.dim() == 2 || input.dim() == 3, "mmops.batch_norm_stats: expected input of shape (N, C) "
                    "or (N, C, L), got ", input.sizes());
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
                   "mmops.batch_norm_stats: input must be float32 or float64, got ", input.scalar_type());
  const Shape s = shape_of(input);
  const int64_t n = s.N * s.L;
  const Tensor x = input.contiguous();
  Tensor mean = at::zeros({s.C}, x.options().dtype(at::kDouble));
  Tensor m2 = at::zeros({s.C}, x.options().dtype(at::kDouble));
  if (n == 0) return {mean, m2};  // an empty shard: count 0 adds nothing when combined
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmops_batch_norm_stats", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    std::vector<T> K(s.C);
    for (int64_t c = 0; c < s.C; ++c) K[c] = shift_of(xp[c * s.L]);
    std::vector<double> S1, S2;
    reduce_rows(s, [&](int64_t n0, int64_t n1, double* a, double* b) { bn_stats(xp, s, K.data(), n0, n1, a, b); },
                S1, S2);
    double* mp = mean.mutable_data_ptr<double>();
    double* qp = m2.mutable_data_ptr<double>();
    for (int64_t c = 0; c < s.C; ++c) {
      const double d1 = S1[c] / n;
      mp[c] = static_cast<double>(K[c]) + d1;
      qp[c] = non_negative(S2[c] - S1[c] * d1);
    }
  });
  return {mean, m2};
}

// Local sums of the backward, in float64: (sum dy', sum dy' * (x - mean)), dy' = dh * act'(h).
std::tuple<Tensor, Tensor> batch_norm_backward_reduce(const Tensor& grad_out, const Tensor& output, const Tensor& input,
                                                      const Tensor& mean, int64_t activation) {
  TORCH_CHECK_VALUE(grad_out.sizes() == input.sizes() && output.sizes() == input.sizes(),
                    "mmops.batch_norm_backward_reduce: grad_output and output must have the input's shape");
  const Shape s = shape_of(input);
  const Tensor x = input.contiguous(), dh = grad_out.contiguous(), h = output.contiguous(), m = mean.contiguous();
  Tensor sdy = at::empty({s.C}, x.options().dtype(at::kDouble));
  Tensor sdyx = at::empty({s.C}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmops_batch_norm_backward_reduce", [&] {
    using T = scalar_t;
    std::vector<double> Sdy, Sdyx;
    reduce_rows(s, [&](int64_t n0, int64_t n1, double* a, double* b) {
      bn_bsums(activation, dh.const_data_ptr<T>(), h.const_data_ptr<T>(), x.const_data_ptr<T>(), s,
               m.const_data_ptr<T>(), n0, n1, a, b);
    }, Sdy, Sdyx);
    std::copy(Sdy.begin(), Sdy.end(), sdy.mutable_data_ptr<double>());
    std::copy(Sdyx.begin(), Sdyx.end(), sdyx.mutable_data_ptr<double>());
  });
  return {sdy, sdyx};
}

// dx from the global sums and the global count (the elementwise pass of batch_norm_backward).
Tensor batch_norm_backward_elemt(const Tensor& grad_out, const Tensor& output, const Tensor& input,
                                 const std::optional<Tensor>& weight, const Tensor& mean_in,
                                 const Tensor& invstd_in, const Tensor& sum_dy, const Tensor& sum_dy_xmu, int64_t count,
                                 bool bessel, int64_t activation) {
  TORCH_CHECK_VALUE(grad_out.sizes() == input.sizes() && output.sizes() == input.sizes(),
                    "mmops.batch_norm_backward_elemt: grad_output and output must have the input's shape");
  TORCH_CHECK_VALUE(count > (bessel ? 1 : 0), "mmops.batch_norm_backward_elemt: count must be > ", bessel ? 1 : 0,
                    ", got ", count);
  const Shape s = shape_of(input);
  const Tensor x = input.contiguous(), dh = grad_out.contiguous(), h = output.contiguous();
  const Tensor sdy = sum_dy.to(at::kDouble).contiguous(), sdyx = sum_dy_xmu.to(at::kDouble).contiguous();
  const Tensor w = contiguous_param(weight), mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  Tensor dx = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmops_batch_norm_backward_elemt", [&] {
    using T = scalar_t;
    const T* wp = w.defined() ? w.const_data_ptr<T>() : nullptr;
    std::vector<T> A(s.C), B(s.C), D(s.C);
    dx_coefficients(s.C, count, wp, invstd.const_data_ptr<T>(), sdy.const_data_ptr<double>(),
                    sdyx.const_data_ptr<double>(), true, bessel, A.data(), B.data(), D.data());
    const T *xp = x.const_data_ptr<T>(), *dhp = dh.const_data_ptr<T>(), *hp = h.const_data_ptr<T>();
    T* dxp = dx.mutable_data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(s.C * s.L, 1));
    at::parallel_for(0, s.N, grain, [&](int64_t n0, int64_t n1) {
      bn_dx(activation, dhp, hp, xp, dxp, s, mean.const_data_ptr<T>(), A.data(), B.data(), D.data(), n0, n1);
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmops, CPU, m) {
  m.impl("batch_norm_forward", &batch_norm_forward);
  m.impl("batch_norm_backward", &batch_norm_backward);
  m.impl("batch_norm_stats", &batch_norm_stats);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt);
}

}  // namespace mmops
