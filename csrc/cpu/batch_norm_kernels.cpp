// BatchNorm's CPU kernels (declared in batch_norm_kernels.h; the math is at the top of batch_norm.cpp).
//
// One loop shape per layout, each walking memory in address order:
//   * (N, C), the makemore case: vectorised across the channels of a row, row after row, the per-channel sums in
//     double in memory (L1). Measured on an AMD EPYC Zen 4, 1 thread, sums of (32768, 200) float32 from DRAM
//     (bench/loops/bn_sums.cpp): this loop 2.1-2.4 ms; four rows per update of the sums 3.7-6.5 ms;
//     blocks of 16 rows with the sums in registers 4-6.5 ms; the same with software prefetch 1.6-4.8 ms
//     (bimodal); a plain x.sum() 0.9-1.9 ms. Reading several rows at once is faster only from cache (0.10 against
//     0.20 ms at (4096, 200)). An earlier design walked 32-channel tiles down blocks of 64 rows (sums and
//     coefficients in registers): 1.3-2.4x slower than this loop from DRAM, no faster from cache.
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
  if (L == 1) {  // (N, C): vectorise across the channels of a row, row after row (see the top of the file)
    for (int64_t n = n0; n < n1; ++n) {
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
