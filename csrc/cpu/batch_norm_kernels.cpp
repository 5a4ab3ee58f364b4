// BatchNorm's CPU kernels (declared in batch_norm_kernels.h; the math is at the top of batch_norm.cpp).
//
// Two loop shapes, chosen per call by the layout:
//   * (N, C) float32, the makemore case: channels go in tiles of 32 whose sums, widened to double (four
//     8-double vectors each), stay in registers over a block of kRowBlock rows (64 rows x 800 bytes sit in L1/L2
//     while the tiles walk them), and so do the coefficients of the elementwise passes (m, a, b; A, B, D).
//     Accumulating in float over the block instead was measured 3x less accurate than PyTorch at (333, 256).
//   * anything else ((N, C, L), double): plain loops vectorised along C (L = 1) or along L.
// The activation becomes a template argument once per call (simd::with_activation), so the inner loops carry
// no branch on it.
#include "cpu/batch_norm_kernels.h"

#include <algorithm>

#include "cpu/simd.h"

namespace mmops::cpu::bn {
namespace {

// ---- the generic loops ---------------------------------------------------------------------------------------
template <typename T>
MMOPS_INLINE void stats_rows(const T* x, Shape s, const T* K, int64_t n0, int64_t n1, double* S1, double* S2) {
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

// ---- the (N, C) float32 tiles ----------------------------------------------------------------------------------
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

// Walks rows [n0, n1) in blocks of kRowBlock; per block, tile(r0, r1, c0) for each full 32-channel tile, then
// tail(n, Ct) per row for the last C % 32 channels (plain loops).
template <typename Tile, typename Tail>
MMOPS_INLINE void for_tiles(int64_t C, int64_t n0, int64_t n1, Tile&& tile, Tail&& tail) {
  const int64_t Ct = C / kTile * kTile;
  for (int64_t r0 = n0; r0 < n1; r0 += kRowBlock) {
    const int64_t r1 = std::min(r0 + kRowBlock, n1);
    for (int64_t c0 = 0; c0 < Ct; c0 += kTile) tile(r0, r1, c0);
    if (Ct < C)
      for (int64_t n = r0; n < r1; ++n) tail(n, Ct);
  }
}

MMOPS_INLINE void stats_tiles(const float* x, int64_t C, const float* K, int64_t n0, int64_t n1, double* S1,
                              double* S2) {
  for_tiles(
      C, n0, n1,
      [&](int64_t r0, int64_t r1, int64_t c0) {
        vd8 k[4], a[4], b[4];
        for (int q = 0; q < 4; ++q) {
          k[q] = widen8(K + c0 + 8 * q);
          a[q] = load8d(S1 + c0 + 8 * q);
          b[q] = load8d(S2 + c0 + 8 * q);
        }
        for (int64_t n = r0; n < r1; ++n)
          for (int q = 0; q < 4; ++q) {
            const vd8 d = widen8(x + n * C + c0 + 8 * q) - k[q];
            a[q] += d;
            b[q] += d * d;
          }
        for (int q = 0; q < 4; ++q) {
          store8d(S1 + c0 + 8 * q, a[q]);
          store8d(S2 + c0 + 8 * q, b[q]);
        }
      },
      [&](int64_t n, int64_t Ct) {
        const float* r = x + n * C;
#pragma omp simd
        for (int64_t c = Ct; c < C; ++c) {
          const double d = static_cast<double>(r[c]) - static_cast<double>(K[c]);
          S1[c] += d;
          S2[c] += d * d;
        }
      });
}

template <int kAct>
MMOPS_INLINE void normalize_tiles(const float* x, float* h, int64_t C, const float* m, const float* a, const float* b,
                                  int64_t n0, int64_t n1) {
  for_tiles(
      C, n0, n1,
      [&](int64_t r0, int64_t r1, int64_t c0) {
        const vf16 a0 = load16(a + c0), a1 = load16(a + c0 + 16), b0 = load16(b + c0), b1 = load16(b + c0 + 16);
        const vf16 m0 = load16(m + c0), m1 = load16(m + c0 + 16);
        for (int64_t n = r0; n < r1; ++n) {
          const int64_t o = n * C + c0;
          store16(h + o, simd::activate<kAct>((load16(x + o) - m0) * a0 + b0));
          store16(h + o + 16, simd::activate<kAct>((load16(x + o + 16) - m1) * a1 + b1));
        }
      },
      [&](int64_t n, int64_t Ct) {
        const int64_t o = n * C;
#pragma omp simd
        for (int64_t c = Ct; c < C; ++c) h[o + c] = simd::activate<kAct>((x[o + c] - m[c]) * a[c] + b[c]);
      });
}

template <int kAct>
MMOPS_INLINE void backward_sums_tiles(const float* dh, const float* h, const float* x, int64_t C, const float* mean,
                                      int64_t n0, int64_t n1, double* Sdy, double* Sdyx) {
  for_tiles(
      C, n0, n1,
      [&](int64_t r0, int64_t r1, int64_t c0) {
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
      },
      [&](int64_t n, int64_t Ct) {
        const int64_t o = n * C;
#pragma omp simd
        for (int64_t c = Ct; c < C; ++c) {
          const float g = simd::act_grad<kAct>(dh[o + c], h[o + c]);
          Sdy[c] += static_cast<double>(g);
          Sdyx[c] += static_cast<double>(g * (x[o + c] - mean[c]));
        }
      });
}

template <int kAct, bool kEval>
MMOPS_INLINE void dx_tiles(const float* dh, const float* h, const float* x, float* dx, int64_t C, const float* m,
                           const float* A, const float* B, const float* D, int64_t n0, int64_t n1) {
  for_tiles(
      C, n0, n1,
      [&](int64_t r0, int64_t r1, int64_t c0) {
        const vf16 A0 = load16(A + c0), A1 = load16(A + c0 + 16);
        vf16 B0 = {}, B1 = {}, D0 = {}, D1 = {}, m0 = {}, m1 = {};
        if (!kEval) {
          B0 = load16(B + c0), B1 = load16(B + c0 + 16), D0 = load16(D + c0), D1 = load16(D + c0 + 16);
          m0 = load16(m + c0), m1 = load16(m + c0 + 16);
        }
        for (int64_t n = r0; n < r1; ++n) {
          const int64_t o = n * C + c0;
          const vf16 g0 = A0 * simd::act_grad<kAct>(load16(dh + o), kAct ? load16(h + o) : vf16{});
          const vf16 g1 = A1 * simd::act_grad<kAct>(load16(dh + o + 16), kAct ? load16(h + o + 16) : vf16{});
          store16(dx + o, kEval ? g0 : g0 + B0 * (load16(x + o) - m0) + D0);
          store16(dx + o + 16, kEval ? g1 : g1 + B1 * (load16(x + o + 16) - m1) + D1);
        }
      },
      [&](int64_t n, int64_t Ct) {
        const int64_t o = n * C;
#pragma omp simd
        for (int64_t c = Ct; c < C; ++c) {
          const float g = A[c] * simd::act_grad<kAct>(dh[o + c], h[o + c]);
          dx[o + c] = kEval ? g : g + B[c] * (x[o + c] - m[c]) + D[c];
        }
      });
}

// ---- one body per kernel for both dtypes: the tiles for (N, C) float, the generic loops otherwise ---------------
template <typename T>
MMOPS_INLINE bool tiled(Shape s) {
  return sizeof(T) == sizeof(float) && s.L == 1;
}

template <typename T>
MMOPS_INLINE void stats_any(const T* x, Shape s, const T* K, int64_t n0, int64_t n1, double* S1, double* S2) {
  if constexpr (sizeof(T) == sizeof(float)) {
    if (tiled<T>(s)) return stats_tiles(x, s.C, K, n0, n1, S1, S2);
  }
  stats_rows(x, s, K, n0, n1, S1, S2);
}

template <typename T>
MMOPS_INLINE void normalize_any(int64_t act, const T* x, T* h, Shape s, const T* m, const T* a, const T* b,
                                int64_t n0, int64_t n1) {
  simd::with_activation(act, [&](auto A) {
    constexpr int kAct = decltype(A)::value;
    if constexpr (sizeof(T) == sizeof(float)) {
      if (tiled<T>(s)) return normalize_tiles<kAct>(x, h, s.C, m, a, b, n0, n1);
    }
    normalize_rows<kAct>(x, h, s, m, a, b, n0, n1);
  });
}

template <typename T>
MMOPS_INLINE void backward_sums_any(int64_t act, const T* dh, const T* h, const T* x, Shape s, const T* mean,
                                    int64_t n0, int64_t n1, double* Sdy, double* Sdyx) {
  simd::with_activation(act, [&](auto A) {
    constexpr int kAct = decltype(A)::value;
    if constexpr (sizeof(T) == sizeof(float)) {
      if (tiled<T>(s)) return backward_sums_tiles<kAct>(dh, h, x, s.C, mean, n0, n1, Sdy, Sdyx);
    }
    backward_sums_rows<kAct>(dh, h, x, s, mean, n0, n1, Sdy, Sdyx);
  });
}

template <typename T>
MMOPS_INLINE void backward_dx_any(int64_t act, const T* dh, const T* h, const T* x, T* dx, Shape s, const T* m,
                                  const T* A, const T* B, const T* D, int64_t n0, int64_t n1) {
  simd::with_activation(act, [&](auto a) {
    constexpr int kAct = decltype(a)::value;
    const bool eval = B == nullptr;
    if constexpr (sizeof(T) == sizeof(float)) {
      if (tiled<T>(s)) {
        return eval ? dx_tiles<kAct, true>(dh, h, x, dx, s.C, m, A, B, D, n0, n1)
                    : dx_tiles<kAct, false>(dh, h, x, dx, s.C, m, A, B, D, n0, n1);
      }
    }
    if (eval) dx_rows<kAct, true>(dh, h, x, dx, s, m, A, B, D, n0, n1);
    else dx_rows<kAct, false>(dh, h, x, dx, s, m, A, B, D, n0, n1);
  });
}

}  // namespace

// The entry points: float through the SIMD clones (one ifunc call per block of rows), double plain.
MMOPS_SIMD_CLONES void stats(const float* x, Shape s, const float* K, int64_t n0, int64_t n1, double* S1, double* S2) {
  stats_any(x, s, K, n0, n1, S1, S2);
}
void stats(const double* x, Shape s, const double* K, int64_t n0, int64_t n1, double* S1, double* S2) {
  stats_any(x, s, K, n0, n1, S1, S2);
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
