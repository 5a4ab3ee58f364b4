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

#include <cstdint>
#include <vector>
#ifdef MMOPS_X86
#include <immintrin.h>
#endif

namespace mmops::cpu::bn {
namespace {

// ---- the generic loops ---------------------------------------------------------------------------------------
// The statistics of (N, C) data that is in cache (Reads::kCached) go in tiles of kTileRows rows by kTileChannels
// channels: each channel's double sums stay in registers down the tile's rows instead of being loaded and stored
// once per row (two 64-byte stores per 8 channels, which bound the row loop from cache). Each channel still adds its
// values row after row, so the sums are bitwise those of the row loop (tested); only the order of the reads changes.
// Measured (AMD EPYC Zen 4, 1 thread, C = 200): bench/loops/bn_sums.cpp, (4096, 200) in cache: 0.14 ms tiled, 0.22-
// 0.24 ms by rows; from DRAM, (32768, 200): 2.6 ms tiled, 1.5-2.2 ms by rows (the one sequential stream is what the
// prefetchers keep up with), so data from memory keeps the row loop. The same tiles for the backward's sums (three
// inputs) and for the elementwise passes were slower than their row loops even from cache (backward sums 226-325 us
// against 210-219, normalize 111-143 against 99-106 at (4096, 200)), so those stay row loops.
constexpr int64_t kTileRows = 16, kTileChannels = 32;

// One row's channels [c0, c1) added to the sums: the statistics' one body, for the row loop and the tiles' last
// channels.
template <typename T>
MMOPS_INLINE void stats_row(const T* r, const T* K, int64_t c0, int64_t c1, double* S1, double* S2) {
#pragma omp simd
  for (int64_t c = c0; c < c1; ++c) {
    const double d = static_cast<double>(r[c]) - static_cast<double>(K[c]);
    S1[c] += d;
    S2[c] += d * d;
  }
}

template <typename T>
MMOPS_INLINE void stats_tiles(const T* x, int64_t C, const T* K, int64_t n0, int64_t n1, double* S1, double* S2) {
  const int64_t tiled_c = C - C % kTileChannels;
  for (int64_t c0 = 0; c0 < tiled_c; c0 += kTileChannels) {
    double a[kTileChannels], b[kTileChannels], k[kTileChannels];
#pragma omp simd
    for (int64_t c = 0; c < kTileChannels; ++c) a[c] = S1[c0 + c], b[c] = S2[c0 + c], k[c] = K[c0 + c];
    for (int64_t n = n0; n < n1; ++n) {
      const T* r = x + n * C + c0;
#pragma omp simd
      for (int64_t c = 0; c < kTileChannels; ++c) {
        const double d = static_cast<double>(r[c]) - k[c];
        a[c] += d;
        b[c] += d * d;
      }
    }
#pragma omp simd
    for (int64_t c = 0; c < kTileChannels; ++c) S1[c0 + c] = a[c], S2[c0 + c] = b[c];
  }
  for (int64_t n = n0; n < n1; ++n) stats_row(x + n * C, K, tiled_c, C, S1, S2);  // past the last full tile
}

template <typename T>
MMOPS_INLINE void stats_rows(const T* x, Shape s, const T* K, int64_t n0, int64_t n1, double* S1, double* S2,
                             Reads reads) {
  const int64_t C = s.C, L = s.L;
  if (L == 1 && reads == Reads::kCached && C >= kTileChannels) {
    for (int64_t n = n0; n < n1; n += kTileRows)
      stats_tiles(x, C, K, n, n + kTileRows < n1 ? n + kTileRows : n1, S1, S2);
    return;
  }
  if (L == 1) {  // (N, C): vectorise across the channels of a row, row after row (see the top of the file)
    for (int64_t n = n0; n < n1; ++n) stats_row(x + n * C, K, 0, C, S1, S2);
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
MMOPS_SIMD_CLONES void stats(const float* x, Shape s, const float* K, int64_t n0, int64_t n1, double* S1, double* S2,
                             Reads reads) {
  stats_rows(x, s, K, n0, n1, S1, S2, reads);
}
void stats(const double* x, Shape s, const double* K, int64_t n0, int64_t n1, double* S1, double* S2, Reads reads) {
  stats_rows(x, s, K, n0, n1, S1, S2, reads);
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

// ---- non-temporal stores: the (N, C) float32 elementwise passes, flat ------------------------------------------
// A streaming store needs a 64-byte aligned address, and a row of C = 200 floats is 800 bytes: so the pass walks the
// rows' elements as one flat run, 16 at a time from the first aligned one, and element i's channel is c = i mod C.
// The 16 coefficients of a chunk starting at channel c are read from copies extended by 16 (ext[j] = coef[j mod C]),
// so a chunk that wraps past channel C - 1 needs no second load. Measured on an AMD EPYC Zen 4, 1 thread,
// h = x * a + b over 26 MB: 2.1-2.3 ms with ordinary stores (each line of h is read before it is written), 1.4-1.6
// ms streaming; over 3.3 MB (in cache) the same 0.17 ms either way.
namespace {

// coef (C,) -> C + 16 floats, ext[j] = coef[j mod C]
MMOPS_INLINE void extend(const float* coef, int64_t C, float* ext) {
  for (int64_t j = 0; j < C + 16; ++j) ext[j] = coef[j % C];
}

#ifdef MMOPS_X86
typedef float vf16 __attribute__((vector_size(64)));
MMOPS_AVX512 vf16 load16(const float* p) { return _mm512_loadu_ps(p); }

// Runs op.one(i, c) on the elements before the first aligned one and after the last full chunk, and op.chunk(i, c)
// on each aligned chunk of 16; c is element i's channel. (The ops are structs, not lambdas: a lambda does not
// inherit this function's target and could not inline the AVX-512 intrinsics.)
template <typename Op>
MMOPS_AVX512 void flat_run(const Op& op, float* out, int64_t C, int64_t n0, int64_t n1) {
  int64_t i = n0 * C, c = 0;
  const int64_t end = n1 * C;
  for (; i < end && (reinterpret_cast<uintptr_t>(out + i) & 63) != 0; ++i) {
    op.one(i, c);
    if (++c == C) c = 0;
  }
  for (; i + 16 <= end; i += 16) {
    op.chunk(i, c);
    for (c += 16; c >= C;) c -= C;
  }
  for (; i < end; ++i) {
    op.one(i, c);
    if (++c == C) c = 0;
  }
  _mm_sfence();  // streaming stores are weakly ordered: complete them before another thread reads the output
}

template <int kAct>
struct NormalizeOp {  // h = act((x - m) a + b)
  const float *x, *me, *ae, *be;
  float* h;
  MMOPS_AVX512 void one(int64_t i, int64_t c) const { h[i] = simd::activate<kAct>((x[i] - me[c]) * ae[c] + be[c]); }
  MMOPS_AVX512 void chunk(int64_t i, int64_t c) const {
    _mm512_stream_ps(h + i, simd::activate<kAct>((load16(x + i) - load16(me + c)) * load16(ae + c) + load16(be + c)));
  }
};

template <int kAct, bool kEval>
struct DxOp {  // dx = A dy' + B (x - m) + D, or A dy' (kEval)
  const float *dh, *h, *x, *Ae, *Be, *De, *me;
  float* dx;
  MMOPS_AVX512 void one(int64_t i, int64_t c) const {
    const float g = Ae[c] * simd::act_grad<kAct>(dh[i], h[i]);
    dx[i] = kEval ? g : g + Be[c] * (x[i] - me[c]) + De[c];
  }
  MMOPS_AVX512 void chunk(int64_t i, int64_t c) const {
    const vf16 g = load16(Ae + c) * simd::act_grad<kAct>(load16(dh + i), kAct ? load16(h + i) : vf16{});
    _mm512_stream_ps(dx + i, kEval ? g : g + load16(Be + c) * (load16(x + i) - load16(me + c)) + load16(De + c));
  }
};

template <int kAct>
MMOPS_AVX512_TARGET void normalize_stream(const float* x, float* h, int64_t C, const float* m, const float* a,
                                          const float* b, int64_t n0, int64_t n1) {
  std::vector<float> ext(3 * (C + 16));
  float *me = ext.data(), *ae = me + C + 16, *be = ae + C + 16;
  extend(m, C, me), extend(a, C, ae), extend(b, C, be);
  flat_run(NormalizeOp<kAct>{x, me, ae, be, h}, h, C, n0, n1);
}

template <int kAct, bool kEval>
MMOPS_AVX512_TARGET void dx_stream(const float* dh, const float* h, const float* x, float* dx, int64_t C,
                                   const float* m, const float* A, const float* B, const float* D, int64_t n0,
                                   int64_t n1) {
  std::vector<float> ext(4 * (C + 16));
  float *Ae = ext.data(), *Be = Ae + C + 16, *De = Be + C + 16, *me = De + C + 16;
  extend(A, C, Ae);
  if (!kEval) extend(B, C, Be), extend(D, C, De), extend(m, C, me);
  flat_run(DxOp<kAct, kEval>{dh, h, x, Ae, Be, De, me, dx}, dx, C, n0, n1);
}
#endif

}  // namespace

bool normalize_streaming(int64_t act, const float* x, float* h, Shape s, const float* m, const float* a,
                         const float* b, int64_t n0, int64_t n1) {
#ifdef MMOPS_X86
  if (s.L != 1 || !simd::cpu_has_avx512()) return false;
  simd::with_activation(act, [&](auto A) { normalize_stream<decltype(A)::value>(x, h, s.C, m, a, b, n0, n1); });
  return true;
#else
  return false;
#endif
}

bool backward_dx_streaming(int64_t act, const float* dh, const float* h, const float* x, float* dx, Shape s,
                           const float* m, const float* A, const float* B, const float* D, int64_t n0, int64_t n1) {
#ifdef MMOPS_X86
  if (s.L != 1 || !simd::cpu_has_avx512()) return false;
  simd::with_activation(act, [&](auto a) {
    constexpr int kAct = decltype(a)::value;
    if (B == nullptr) dx_stream<kAct, true>(dh, h, x, dx, s.C, m, A, B, D, n0, n1);
    else dx_stream<kAct, false>(dh, h, x, dx, s.C, m, A, B, D, n0, n1);
  });
  return true;
#else
  return false;
#endif
}

}  // namespace mmops::cpu::bn
