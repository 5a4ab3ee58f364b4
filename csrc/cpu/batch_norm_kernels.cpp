// BatchNorm's CPU kernels (declared in batch_norm_kernels.h; the math is at the top of batch_norm.cpp).
//
// One loop shape per layout, both walking memory in order (the hardware prefetchers' pattern, on Intel and AMD):
//   * (N, C), the makemore case: vectorised across the channels of a row, row after row. The sums are widened to
//     double and updated once per four rows (d0 + d1 + d2 + d3), so the per-channel accumulators (2 x C doubles,
//     in L1) take a quarter of the loads and stores. An earlier design walked 32-channel tiles down blocks of 64
//     rows with the sums in registers: six strided streams per block at C = 200, which ran 1.3-2.4x slower than
//     this loop from DRAM and no faster from cache (AMD EPYC Zen 4, 1 thread, N = 256 .. 32768).
//   * (N, C, L): vectorised along L, channel by channel.
// The activation becomes a template argument once per call (simd::with_activation), so the inner loops carry
// no branch on it.
#include "cpu/batch_norm_kernels.h"

#include "cpu/simd.h"

namespace mmops::cpu::bn {
namespace {

// ---- the generic loops ---------------------------------------------------------------------------------------
template <typename T>
MMOPS_INLINE void stats_rows(const T* x, Shape s, const T* K, int64_t n0, int64_t n1, double* S1, double* S2) {
  const int64_t C = s.C, L = s.L;
  if (L == 1) {  // (N, C): vectorise across the channels of a row, four rows per update of the sums
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
      const T *r0 = x + n * C, *r1 = r0 + C, *r2 = r1 + C, *r3 = r2 + C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const double k = static_cast<double>(K[c]);
        const double d0 = r0[c] - k, d1 = r1[c] - k, d2 = r2[c] - k, d3 = r3[c] - k;
        S1[c] += (d0 + d1) + (d2 + d3);
        S2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
      }
    }
    for (; n < n1; ++n) {
      const T* r = x + n * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const double d = static_cast<double>(r[c]) - static_cast<double>(K[c]);
        S1[c] += d;
        S2[c] += d * d;
      }
    }
    return;
  }
  for (int64_t n = n0; n < n1; ++n)  // (N, C, L): vectorise along L
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

template <int kAct, typename T>
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
    return;
  }
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const T* r = x + (n * C + c) * L;
      T* o = h + (n * C + c) * L;
      const T mc = m[c], ac = a[c], bc = b[c];
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) o[l] = simd::activate<kAct>((r[l] - mc) * ac + bc);
    }
}

template <int kAct, typename T>
MMOPS_INLINE void backward_sums_rows(const T* dh, const T* h, const T* x, Shape s, const T* mean, int64_t n0,
                                     int64_t n1, double* Sdy, double* Sdyx) {
  const int64_t C = s.C, L = s.L;
  if (L == 1) {  // four rows per update of the sums, as in stats_rows
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
      const int64_t o0 = n * C, o1 = o0 + C, o2 = o1 + C, o3 = o2 + C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T m = mean[c];
        const T g0 = simd::act_grad<kAct>(dh[o0 + c], h[o0 + c]), g1 = simd::act_grad<kAct>(dh[o1 + c], h[o1 + c]);
        const T g2 = simd::act_grad<kAct>(dh[o2 + c], h[o2 + c]), g3 = simd::act_grad<kAct>(dh[o3 + c], h[o3 + c]);
        Sdy[c] += (static_cast<double>(g0) + static_cast<double>(g1)) +
                  (static_cast<double>(g2) + static_cast<double>(g3));
        Sdyx[c] += (static_cast<double>(g0 * (x[o0 + c] - m)) + static_cast<double>(g1 * (x[o1 + c] - m))) +
                   (static_cast<double>(g2 * (x[o2 + c] - m)) + static_cast<double>(g3 * (x[o3 + c] - m)));
      }
    }
    for (; n < n1; ++n) {
      const int64_t o = n * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T g = simd::act_grad<kAct>(dh[o + c], h[o + c]);
        Sdy[c] += static_cast<double>(g);
        Sdyx[c] += static_cast<double>(g * (x[o + c] - mean[c]));
      }
    }
    return;
  }
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

// kEval: dx = A dy' (B, D and m unused).
template <int kAct, bool kEval, typename T>
MMOPS_INLINE void dx_rows(const T* dh, const T* h, const T* x, T* dx, Shape s, const T* m, const T* A, const T* B,
                          const T* D, int64_t n0, int64_t n1) {
  const int64_t C = s.C, L = s.L;
  if (L == 1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t o = n * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T g = A[c] * simd::act_grad<kAct>(dh[o + c], h[o + c]);
        dx[o + c] = kEval ? g : g + B[c] * (x[o + c] - m[c]) + D[c];
      }
    }
    return;
  }
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t o = (n * C + c) * L;
      const T a = A[c];
      const T mc = kEval ? T(0) : m[c], b = kEval ? T(0) : B[c], d = kEval ? T(0) : D[c];
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) {
        const T g = a * simd::act_grad<kAct>(dh[o + l], h[o + l]);
        dx[o + l] = kEval ? g : g + b * (x[o + l] - mc) + d;
      }
    }
}

// ---- one body per kernel for both dtypes, the activation a template argument ----------------------------------
template <typename T>
MMOPS_INLINE void normalize_any(int64_t act, const T* x, T* h, Shape s, const T* m, const T* a, const T* b,
                                int64_t n0, int64_t n1) {
  simd::with_activation(act, [&](auto A) MMOPS_INLINE_LAMBDA {
    normalize_rows<decltype(A)::value>(x, h, s, m, a, b, n0, n1);
  });
}

template <typename T>
MMOPS_INLINE void backward_sums_any(int64_t act, const T* dh, const T* h, const T* x, Shape s, const T* mean,
                                    int64_t n0, int64_t n1, double* Sdy, double* Sdyx) {
  simd::with_activation(act, [&](auto A) MMOPS_INLINE_LAMBDA {
    backward_sums_rows<decltype(A)::value>(dh, h, x, s, mean, n0, n1, Sdy, Sdyx);
  });
}

template <typename T>
MMOPS_INLINE void backward_dx_any(int64_t act, const T* dh, const T* h, const T* x, T* dx, Shape s, const T* m,
                                  const T* A, const T* B, const T* D, int64_t n0, int64_t n1) {
  simd::with_activation(act, [&](auto a) MMOPS_INLINE_LAMBDA {
    constexpr int kAct = decltype(a)::value;
    if (B == nullptr) dx_rows<kAct, true>(dh, h, x, dx, s, m, A, B, D, n0, n1);
    else dx_rows<kAct, false>(dh, h, x, dx, s, m, A, B, D, n0, n1);
  });
}

}  // namespace

// The entry points: float through the SIMD clones (one ifunc call per block of rows), double plain.
MMOPS_SIMD_CLONES void stats(const float* x, Shape s, const float* K, int64_t n0, int64_t n1, double* S1, double* S2) {
  stats_rows(x, s, K, n0, n1, S1, S2);
}
void stats(const double* x, Shape s, const double* K, int64_t n0, int64_t n1, double* S1, double* S2) {
  stats_rows(x, s, K, n0, n1, S1, S2);
}

MMOPS_SIMD_CLONES void normalize(int64_t act, const float* x, float* h, Shape s, const float* m, const float* a,
                                 const float* b, int64_t n0, int64_t n1) {
  normalize_any(act, x, h, s, m, a, b, n0, n1);
}
void normalize(int64_t act, const double* x, double* h, Shape s, const double* m, const double* a, const double* b,
               int64_t n0, int64_t n1) {
  normalize_any(act, x, h, s, m, a, b, n0, n1);
}

MMOPS_SIMD_CLONES void backward_sums(int64_t act, const float* dh, const float* h, const float* x, Shape s,
                                     const float* mean, int64_t n0, int64_t n1, double* Sdy, double* Sdyx) {
  backward_sums_any(act, dh, h, x, s, mean, n0, n1, Sdy, Sdyx);
}
void backward_sums(int64_t act, const double* dh, const double* h, const double* x, Shape s, const double* mean,
                   int64_t n0, int64_t n1, double* Sdy, double* Sdyx) {
  backward_sums_any(act, dh, h, x, s, mean, n0, n1, Sdy, Sdyx);
}

MMOPS_SIMD_CLONES void backward_dx(int64_t act, const float* dh, const float* h, const float* x, float* dx, Shape s,
                                   const float* m, const float* A, const float* B, const float* D, int64_t n0,
                                   int64_t n1) {
  backward_dx_any(act, dh, h, x, dx, s, m, A, B, D, n0, n1);
}
void backward_dx(int64_t act, const double* dh, const double* h, const double* x, double* dx, Shape s,
                 const double* m, const double* A, const double* B, const double* D, int64_t n0, int64_t n1) {
  backward_dx_any(act, dh, h, x, dx, s, m, A, B, D, n0, n1);
}

}  // namespace mmops::cpu::bn
