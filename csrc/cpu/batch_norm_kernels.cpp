// BatchNorm's CPU kernels (declared in batch_norm_kernels.h; the math is at the top of batch_norm.cpp).
//
// The sums of (N, C) data in blocks of 16 rows (the section "the sums" below says why and how); the elementwise
// passes vectorised across the channels of a row, row after row, in address order. An earlier design walked
// 32-channel tiles down blocks of 64 rows for every pass: 1.3-2.4x slower than the row loops from DRAM
// (bench/loops/bn_sums.cpp), no faster from cache. (N, C, L) data is vectorised along L, channel by channel.
// The activation becomes a template argument once per call (simd::with_activation), so the inner loops carry
// no branch on it.
#include "cpu/batch_norm_kernels.h"

#include "cpu/scratch.h"
#include "cpu/simd.h"

#include <cstdint>
#include <type_traits>
#ifdef MMOPS_X86
#include <immintrin.h>
#endif

namespace mmops::cpu::bn {
namespace {

// ---- the sums --------------------------------------------------------------------------------------------------
// Every per-channel sum of (N, C) data (the statistics' S1, S2 and the backward's Sdy, Sdyx) is taken in blocks of
// kBlockRows rows: each channel's values in a block are added in the input's dtype, row after row from 0, and the
// block's sum is added to the channel's total in double. Adding each float32 value to a double instead cost a
// conversion per value and half the vector width, which bound these loops whenever the data is in cache. A block's
// sum carries at most 15 float32 roundings; the totals, mean and variance are formed in double. Measured with
// bench/loops/bn_block_sums.cpp (the former loops and these kernels in one process), AMD EPYC Zen 4, 1 thread,
// medians: (4096, 200) in cache: statistics 142-143 us (double tiles) -> 77-79 us, backward sums 196 us (double
// rows) -> 132 us; (32768, 200) from memory (with the prefetch below): statistics 2.2-2.3 -> 1.3 ms, backward sums
// 2.9-3.0 -> 2.2 ms. The sums differ from the double ones by ~1e-8 of the sum of the terms' magnitudes.
// Loop shapes, which compute exactly the same sums (bitwise, tested), so the choice never moves a number:
//   * the statistics of data in cache (Reads::kCached): tiles of kBlockRows rows x kTileChannels channels, the
//     tile's sums in registers down its rows (the row loop: 1.6x slower), and the channels past the last full tile
//     in tiles of 8, 4 and 1 channels. Those channels went through the row loop before, whose block sums on the
//     stack make a chain of a store and a reload per row; on a few channels nothing hides it (at C = 100, 4
//     channels took 13% of the time). Statistics alone, 1 thread, old and new alternating, minima (AMD EPYC Zen 3,
//     AVX2 clone; the sums bitwise the same): C = 200 (192 + 8) 11.3 -> 9.7 us at N = 512, 98.8 -> 88.5 us at
//     4096; C = 100: 6.1 -> 4.6 and 56.8 -> 44.5 us; C = 27: 3.7 -> 2.7 and 30.8 -> 22.4 us; C = 8: 2.4 -> 0.7 and
//     18.7 -> 5.1 us; C = 64 and 1000 (no leftover channels, or 8) unchanged;
//   * everything else: row after row, the block's sums on the stack. Rows in address order are what the hardware
//     prefetchers follow from DRAM (a tile's 32-channel walk ran at half speed there), and the backward's sums read
//     two or three inputs, which tiles walked no faster even in cache. From memory each row is prefetched into L2
//     (prefetcht1) kPrefetchRows ahead, as are the inputs of the elementwise passes from memory (flat_run below).
//     Without it the float row loop ran 1.5x slower from DRAM than the double one it replaced (4.1-4.4 against
//     2.7-2.9 ms, backward sums at (32768, 200)); into L1 2 rows ahead it matched the double loop, and with tanh's
//     third input lost 1.2x to it. Into L2 8 rows ahead (of 2 to 16 rows, into L1 or L2), 1 thread, (32768, 200),
//     the former kernels and these in one process (old -> new, medians): statistics 2.0-2.2 -> 1.1-1.2 ms, backward
//     sums 2.6-2.7 -> 1.8 ms (tanh 3.5-3.6 -> 3.2-3.3), normalise 1.65-1.7 -> 1.35-1.4 ms (tanh: 3.3 either way,
//     bound by tanh itself), dx 2.5-2.55 -> 2.1 ms (tanh 3.4-3.45 -> 3.1-3.2). At 2 threads, which share the memory
//     bandwidth, op by op: forward 1.7-1.8 -> 1.5-1.6 ms, backward 2.3-2.5 -> 2.2-2.5 ms; with tanh forward 2.6-3.5
//     -> 2.2-2.3 ms, backward 3.5-4.0 -> 3.9-4.2 ms (minima).
// (N, C, L) data is summed along L per (row, channel) in double, as before.
constexpr int64_t kBlockRows = 16, kTileChannels = 32, kRowChannels = 512, kPrefetchRows = 8;

template <typename T>
MMOPS_INLINE void add_block(const T* a, const T* b, int64_t n, double* S1, double* S2) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    S1[c] += static_cast<double>(a[c]);
    S2[c] += static_cast<double>(b[c]);
  }
}

template <typename T>
MMOPS_INLINE void prefetch_row(const T* row, int64_t C) {
  for (int64_t byte = 0; byte < C * static_cast<int64_t>(sizeof(T)); byte += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(row) + byte, 0, 2);  // into L2 (prefetcht1)
}

// The two per-channel sums of rows [n0, n1) of (N, C) data, in blocks (above), added to S1 and S2.
// terms(i, c, a, b) adds the terms of the value at flat index i (channel c) to a and b, in their type (T, or double
// for a channel summed again); prefetch(n) prefetches row n of every input.
// A channel is summed again over these rows with double blocks, so that it gets what double gives:
//   * when its sums come out not finite (a value is inf or NaN, or a square or a block's sum overflows float:
//     values from about 1e19);
//   * for the statistics (kShiftedSquares: S1 = sum d, S2 = sum d^2, d = x - K), when the shift K lies far from
//     these rows' mean: more than kShiftSpread standard deviations (mean_d^2 > kShiftSpread^2 var_d). Then every d
//     is large, and the float rounding of each d^2 and d (relative to their size) swamps the variance. When K was
//     the channel's first value, one value 64 sigma out in row 0 of (4096, 200) put a relative error of 9.7e-6 in
//     the running variance (the double sums: 5.4e-8, F.batch_norm 5e-7), and 5 sigma out in row 0 of (32, 200)
//     made invstd 2.7e-6 off. K is now the mean of the first 16 rows (shifts_rows, below), which divides such an
//     outlier's pull by 16; this bound catches data whose first rows are unlike the rest (sorted or grouped rows).
//     For a normal channel that never happens in practice: 8 sigma is 32 standard deviations of a 16-row mean.
constexpr double kShiftSpread = 8;

// A block's sums a, b of channels [c0, c0 + width) start from the terms of its first row (at flat index row_start)
// added to zeros in registers: the same bits as zeroed arrays (0 + t = t), where GCC turned the zeroing of the arrays
// into a `rep stosq` per tile and per block (microcoded: 15% of the statistics' time at (512, 200) in L2, AMD EPYC
// Zen 3, AVX2 clone; the zeroing in registers took the statistics at (4096, 200) from 128 to 94 us and the backward
// sums from 175 to 154 us, 1 thread, in one process with the former kernels).
template <typename T, typename Terms>
MMOPS_INLINE void first_row_terms(const Terms& terms, int64_t row_start, int64_t c0, int64_t width, T* a, T* b) {
#pragma omp simd
  for (int64_t c = 0; c < width; ++c) {
    T ra = T(0), rb = T(0);
    terms(row_start + c0 + c, c0 + c, ra, rb);
    a[c] = ra;
    b[c] = rb;
  }
}

// The sums of channels [c0, c0 + W) over rows [nb, ne) of a block in registers, added to S1 and S2.
template <int64_t W, typename T, typename Terms>
MMOPS_INLINE void tile_sums(const Terms& terms, int64_t C, int64_t nb, int64_t ne, int64_t c0, double* S1,
                            double* S2) {
  T ta[W], tb[W];
  first_row_terms(terms, nb * C, c0, W, ta, tb);
  for (int64_t n = nb + 1; n < ne; ++n) {
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) terms(n * C + c0 + c, c0 + c, ta[c], tb[c]);
  }
  add_block(ta, tb, W, S1 + c0, S2 + c0);
}

template <bool kTilesInCache, bool kShiftedSquares, typename T, typename Terms, typename Prefetch>
MMOPS_INLINE void block_sums(int64_t C, int64_t n0, int64_t n1, Reads reads, double* S1, double* S2,
                             const Terms& terms, const Prefetch& prefetch) {
  Scratch<double> before(2 * C);  // the sums before these rows, for a channel summed again
  std::copy(S1, S1 + C, before.data());
  std::copy(S2, S2 + C, before.data() + C);
  const bool tiles = kTilesInCache && reads == Reads::kCached;
  const bool from_memory = reads == Reads::kFromMemory;
  for (int64_t nb = n0; nb < n1; nb += kBlockRows) {
    const int64_t ne = nb + kBlockRows < n1 ? nb + kBlockRows : n1;
    if (tiles) {
      int64_t c0 = 0;
      for (; c0 + kTileChannels <= C; c0 += kTileChannels)
        tile_sums<kTileChannels, T>(terms, C, nb, ne, c0, S1, S2);
      for (; c0 + 8 <= C; c0 += 8) tile_sums<8, T>(terms, C, nb, ne, c0, S1, S2);
      for (; c0 + 4 <= C; c0 += 4) tile_sums<4, T>(terms, C, nb, ne, c0, S1, S2);
      for (; c0 < C; ++c0) tile_sums<1, T>(terms, C, nb, ne, c0, S1, S2);
      continue;
    }
    // The row loop, over at most kRowChannels channels at a time: its block sums live on the stack, where the
    // compiler can see that storing them does not change the inputs (in a heap buffer it reloaded dh after each
    // store: 147 against 128 us for the backward's sums at (4096, 200)).
    for (int64_t cs = 0; cs < C; cs += kRowChannels) {
      const int64_t width = C - cs < kRowChannels ? C - cs : kRowChannels;
      alignas(64) T a[kRowChannels], b[kRowChannels];
      for (int64_t n = nb; n < ne; ++n) {
        if (from_memory && cs == 0 && n + kPrefetchRows < n1) prefetch(n + kPrefetchRows);
        if (n == nb) {
          first_row_terms(terms, n * C, cs, width, a, b);
          continue;
        }
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) terms(n * C + cs + c, cs + c, a[c], b[c]);
      }
      add_block(a, b, width, S1 + cs, S2 + cs);
    }
  }
  // A channel is summed again when resum(c): v - v is 0 for a finite v and NaN for inf and NaN, so `finite` is
  // false (NaN == 0 is false) for a sum that is not; and with a = sum d, b = sum d^2 over these n rows,
  // mean_d^2 > s^2 var_d  <=>  a^2 / n > s^2 (b - a^2 / n)  <=>  a^2 (1 + s^2) > s^2 n b  (n > 0).
  const double rows = static_cast<double>(n1 - n0), s2 = kShiftSpread * kShiftSpread;
  auto resum = [&](int64_t c) MMOPS_INLINE_LAMBDA {
    const bool finite = (S1[c] - S1[c]) + (S2[c] - S2[c]) == 0;
    if (!kShiftedSquares || std::is_same_v<T, double>) return !finite;  // double blocks are what a resum gives
    const double a = S1[c] - before[c], b = S2[c] - before[C + c];
    return !finite || a * a * (1 + s2) > s2 * rows * b;
  };
  int64_t again = 0;
#pragma omp simd reduction(+ : again)
  for (int64_t c = 0; c < C; ++c) again += resum(c) ? 1 : 0;
  if (again == 0) return;
  for (int64_t c = 0; c < C; ++c) {
    if (!resum(c)) continue;
    double s1 = before[c], s2 = before[C + c];
    for (int64_t nb = n0; nb < n1; nb += kBlockRows) {
      double da = 0, db = 0;
      for (int64_t n = nb; n < n1 && n < nb + kBlockRows; ++n) terms(n * C + c, c, da, db);
      s1 += da;
      s2 += db;
    }
    S1[c] = s1;
    S2[c] = s2;
  }
}

// The shift: the mean of each channel's finite values in the first kBlockRows rows (v - v is 0 only for a finite v).
// One value (the channel's first, as before) let an outlier in row 0 push every x - K far from 0, and even for
// normal data left K a standard deviation from the mean about a third of the time. The mean is added in the input's
// dtype (at (32, 200), 1 thread, this pass takes 0.4 us, the statistics 0.75 us); a channel whose sum overflows float
// (values near 1e37) is added again in double.
template <typename T>
MMOPS_INLINE void shifts_rows(const T* x, Shape s, T* K) {
  const int64_t C = s.C, L = s.L, rows = s.N < kBlockRows ? s.N : kBlockRows;
  for (int64_t c0 = 0; c0 < C; c0 += kRowChannels) {  // on the stack, as the sums below (no allocation at batch 32)
    const int64_t width = C - c0 < kRowChannels ? C - c0 : kRowChannels;
    alignas(64) T sum[kRowChannels], count[kRowChannels];
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) sum[c] = count[c] = T(0);
    for (int64_t n = 0; n < rows; ++n) {
      const T* r = x + (n * C + c0) * L;
      auto add = [&](int64_t c, T v) MMOPS_INLINE_LAMBDA {
        const bool finite = v - v == T(0);
        sum[c] += finite ? v : T(0);
        count[c] += finite ? T(1) : T(0);
      };
      if (L == 1) {
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) add(c, r[c]);
      } else {
        for (int64_t c = 0; c < width; ++c) add(c, r[c * L]);
      }
    }
    int64_t overflowed = 0;
#pragma omp simd reduction(+ : overflowed)
    for (int64_t c = 0; c < width; ++c) {
      K[c0 + c] = count[c] > T(0) ? sum[c] / count[c] : T(0);
      overflowed += K[c0 + c] - K[c0 + c] == T(0) ? 0 : 1;
    }
    for (int64_t c = 0; overflowed && c < width; ++c) {
      if (K[c0 + c] - K[c0 + c] == T(0)) continue;  // finite: the usual case
      double big = 0;  // the float sum overflowed: in double
      for (int64_t n = 0; n < rows; ++n) {
        const double v = static_cast<double>(x[(n * C + c0 + c) * L]);
        big += v - v == 0 ? v : 0.0;
      }
      K[c0 + c] = static_cast<T>(big / static_cast<double>(count[c]));
    }
  }
}

// Statistics: S1 += sum (x - K), S2 += sum (x - K)^2 per channel.
template <typename T>
MMOPS_INLINE void stats_rows(const T* x, Shape s, const T* K, int64_t n0, int64_t n1, double* S1, double* S2,
                             Reads reads) {
  const int64_t C = s.C, L = s.L;
  if (L == 1) {
    block_sums<true, true, T>(
        C, n0, n1, reads, S1, S2,
        [&](int64_t i, int64_t c, auto& a, auto& b) MMOPS_INLINE_LAMBDA {
          using A = std::remove_reference_t<decltype(a)>;
          const A d = static_cast<A>(x[i]) - static_cast<A>(K[c]);
          a += d;
          b += d * d;
        },
        [&](int64_t n) MMOPS_INLINE_LAMBDA { prefetch_row(x + n * C, C); });
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

// The backward's sums: Sdy += sum dy', Sdyx += sum dy' (x - mean) per channel.
template <int kAct, typename T>
MMOPS_INLINE void backward_sums_rows(const T* dh, const T* h, const T* x, Shape s, const T* mean, int64_t n0,
                                     int64_t n1, double* Sdy, double* Sdyx, Reads reads) {
  const int64_t C = s.C, L = s.L;
  if (L == 1) {
    block_sums<false, false, T>(
        C, n0, n1, reads, Sdy, Sdyx,
        [&](int64_t i, int64_t c, auto& a, auto& b) MMOPS_INLINE_LAMBDA {
          using A = std::remove_reference_t<decltype(a)>;
          const T g = simd::act_grad<kAct>(dh[i], h[i]);
          a += static_cast<A>(g);
          b += static_cast<A>(g * (x[i] - mean[c]));
        },
        [&](int64_t n) MMOPS_INLINE_LAMBDA {
          prefetch_row(dh + n * C, C);
          prefetch_row(x + n * C, C);
          if (kAct != simd::kIdentity) prefetch_row(h + n * C, C);
        });
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
                                    int64_t n0, int64_t n1, double* Sdy, double* Sdyx, Reads reads) {
  simd::with_activation(act, [&](auto A) MMOPS_INLINE_LAMBDA {
    backward_sums_rows<decltype(A)::value>(dh, h, x, s, mean, n0, n1, Sdy, Sdyx, reads);
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

MMOPS_SIMD_CLONES void shifts(const float* x, Shape s, float* K) { shifts_rows(x, s, K); }
void shifts(const double* x, Shape s, double* K) { shifts_rows(x, s, K); }

MMOPS_SIMD_CLONES void normalize(int64_t act, const float* x, float* h, Shape s, const float* m, const float* a,
                                 const float* b, int64_t n0, int64_t n1) {
  normalize_any(act, x, h, s, m, a, b, n0, n1);
}
void normalize(int64_t act, const double* x, double* h, Shape s, const double* m, const double* a, const double* b,
               int64_t n0, int64_t n1) {
  normalize_any(act, x, h, s, m, a, b, n0, n1);
}

MMOPS_SIMD_CLONES void backward_sums(int64_t act, const float* dh, const float* h, const float* x, Shape s,
                                     const float* mean, int64_t n0, int64_t n1, double* Sdy, double* Sdyx,
                                     Reads reads) {
  backward_sums_any(act, dh, h, x, s, mean, n0, n1, Sdy, Sdyx, reads);
}
void backward_sums(int64_t act, const double* dh, const double* h, const double* x, Shape s, const double* mean,
                   int64_t n0, int64_t n1, double* Sdy, double* Sdyx, Reads reads) {
  backward_sums_any(act, dh, h, x, s, mean, n0, n1, Sdy, Sdyx, reads);
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
// A streaming store needs an address aligned to its width, and a row of C = 200 floats is 800 bytes: so the pass walks
// the rows' elements as one flat run, one vector at a time from the first aligned one, and element i's channel is
// c = i mod C. The coefficients of a chunk starting at channel c are read from copies extended by 16
// (ext[j] = coef[j mod C]), so a chunk that wraps past channel C - 1 needs no second load. One source for two widths:
// the chunk is a GCC vector of 16 floats on AVX-512, 8 on AVX2, and only the store is an intrinsic of each.
// Measured on an AMD EPYC Zen 4 (AVX-512), 1 thread, h = x * a + b over 26 MB: 2.1-2.3 ms with ordinary stores (each
// line of h is read before it is written), 1.4-1.6 ms streaming; over 3.3 MB (in cache) the same 0.17 ms either way.
// On an AMD EPYC Zen 3 (AVX2), which wrote through the cache before, (32768, 200), 2 threads, op by op, both in one
// build behind a temporary switch, interleaved, medians: forward 2.76 -> 2.53 ms, backward 4.55 -> 3.59 ms,
// mmops.batch_norm forward + backward 7.83 -> 6.50 ms (F.batch_norm 9.89 ms in the same run).
namespace {

// coef (C,) -> C + 16 floats, ext[j] = coef[j mod C]
MMOPS_INLINE void extend(const float* coef, int64_t C, float* ext) {
  for (int64_t j = 0; j < C + 16; ++j) ext[j] = coef[j % C];
}

#ifdef MMOPS_X86
typedef float vf16 __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));

// The store of each width, the only code here with an ISA of its own. The functions between the entry points below
// and these stores carry no target attribute and are not always_inline (GCC refuses to force a target function into
// one without it); the entry points' `flatten` inlines all of them, so at -O3 each entry is one function of its ISA.
// The vector comes by reference: by value, a call that is not inlined (-O0, -fno-inline) would pass it on the stack
// from a caller without the ISA while the callee reads it from a register (a review found the wrong outputs).
__attribute__((target("avx512f"))) inline void stream(float* p, const vf16& v) { _mm512_stream_ps(p, v); }
__attribute__((target("avx2,fma"))) inline void stream(float* p, const vf8& v) { _mm256_stream_ps(p, v); }

template <typename V>
inline V load(const float* p) {  // unaligned
  typedef V unaligned __attribute__((aligned(4)));
  return *reinterpret_cast<const unaligned*>(p);
}

// Runs op.one(i, c) on the elements before the first aligned one and after the last full chunk, and op.chunk(i, c)
// on each aligned chunk of W = sizeof(V) / 4 floats; c is element i's channel.
template <typename V, typename Op>
inline void flat_run(const Op& op, float* out, int64_t C, int64_t n0, int64_t n1) {
  constexpr int64_t W = sizeof(V) / sizeof(float);
  int64_t i = n0 * C, c = 0;
  const int64_t end = n1 * C;
  for (; i < end && (reinterpret_cast<uintptr_t>(out + i) & (sizeof(V) - 1)) != 0; ++i) {
    op.one(i, c);
    if (++c == C) c = 0;
  }
  const int64_t ahead = kPrefetchRows * C;  // the inputs are prefetched as the sums' rows are (above)
  for (; i + W <= end; i += W) {
    if (i + ahead < end) op.prefetch(i + ahead);
    op.chunk(i, c);
    for (c += W; c >= C;) c -= C;
  }
  for (; i < end; ++i) {
    op.one(i, c);
    if (++c == C) c = 0;
  }
  _mm_sfence();  // streaming stores are weakly ordered: complete them before another thread reads the output
}

template <int kAct, typename V>
struct NormalizeOp {  // h = act((x - m) a + b)
  const float *x, *me, *ae, *be;
  float* h;
  void one(int64_t i, int64_t c) const { h[i] = simd::activate<kAct>((x[i] - me[c]) * ae[c] + be[c]); }
  void prefetch(int64_t i) const { __builtin_prefetch(x + i, 0, 2); }
  void chunk(int64_t i, int64_t c) const {
    stream(h + i, simd::activate<kAct>((load<V>(x + i) - load<V>(me + c)) * load<V>(ae + c) + load<V>(be + c)));
  }
};

template <int kAct, bool kEval, typename V>
struct DxOp {  // dx = A dy' + B (x - m) + D, or A dy' (kEval)
  const float *dh, *h, *x, *Ae, *Be, *De, *me;
  float* dx;
  void prefetch(int64_t i) const {
    __builtin_prefetch(dh + i, 0, 2);
    if (kAct) __builtin_prefetch(h + i, 0, 2);
    if (!kEval) __builtin_prefetch(x + i, 0, 2);
  }
  void one(int64_t i, int64_t c) const {
    const float g = Ae[c] * simd::act_grad<kAct>(dh[i], h[i]);
    dx[i] = kEval ? g : g + Be[c] * (x[i] - me[c]) + De[c];
  }
  void chunk(int64_t i, int64_t c) const {
    const V g = load<V>(Ae + c) * simd::act_grad<kAct>(load<V>(dh + i), kAct ? load<V>(h + i) : V{});
    stream(dx + i, kEval ? g : g + load<V>(Be + c) * (load<V>(x + i) - load<V>(me + c)) + load<V>(De + c));
  }
};

template <typename V>
inline void normalize_stream(int64_t act, const float* x, float* h, int64_t C, const float* m, const float* a,
                             const float* b, int64_t n0, int64_t n1) {
  Scratch<float> ext(3 * (C + 16));
  float *me = ext.data(), *ae = me + C + 16, *be = ae + C + 16;
  extend(m, C, me), extend(a, C, ae), extend(b, C, be);
  if (act == simd::kTanh) flat_run<V>(NormalizeOp<simd::kTanh, V>{x, me, ae, be, h}, h, C, n0, n1);
  else if (act == simd::kRelu) flat_run<V>(NormalizeOp<simd::kRelu, V>{x, me, ae, be, h}, h, C, n0, n1);
  else flat_run<V>(NormalizeOp<simd::kIdentity, V>{x, me, ae, be, h}, h, C, n0, n1);
}

template <int kAct, typename V>
inline void dx_run(const float* dh, const float* h, const float* x, float* dx, int64_t C, const float* Ae,
                   const float* Be, const float* De, const float* me, bool eval, int64_t n0, int64_t n1) {
  if (eval) flat_run<V>(DxOp<kAct, true, V>{dh, h, x, Ae, Be, De, me, dx}, dx, C, n0, n1);
  else flat_run<V>(DxOp<kAct, false, V>{dh, h, x, Ae, Be, De, me, dx}, dx, C, n0, n1);
}

template <typename V>
inline void dx_stream(int64_t act, const float* dh, const float* h, const float* x, float* dx, int64_t C,
                      const float* m, const float* A, const float* B, const float* D, int64_t n0, int64_t n1) {
  Scratch<float> ext(4 * (C + 16));
  float *Ae = ext.data(), *Be = Ae + C + 16, *De = Be + C + 16, *me = De + C + 16;
  extend(A, C, Ae);
  const bool eval = B == nullptr;
  if (!eval) extend(B, C, Be), extend(D, C, De), extend(m, C, me);
  if (act == simd::kTanh) dx_run<simd::kTanh, V>(dh, h, x, dx, C, Ae, Be, De, me, eval, n0, n1);
  else if (act == simd::kRelu) dx_run<simd::kRelu, V>(dh, h, x, dx, C, Ae, Be, De, me, eval, n0, n1);
  else dx_run<simd::kIdentity, V>(dh, h, x, dx, C, Ae, Be, De, me, eval, n0, n1);
}

// The entry points of each ISA.
__attribute__((target("avx512f"), flatten)) void normalize_stream_avx512(int64_t act, const float* x, float* h,
                                                                          int64_t C, const float* m, const float* a,
                                                                          const float* b, int64_t n0, int64_t n1) {
  normalize_stream<vf16>(act, x, h, C, m, a, b, n0, n1);
}
__attribute__((target("avx2,fma"), flatten)) void normalize_stream_avx2(int64_t act, const float* x, float* h,
                                                                         int64_t C, const float* m, const float* a,
                                                                         const float* b, int64_t n0, int64_t n1) {
  normalize_stream<vf8>(act, x, h, C, m, a, b, n0, n1);
}
__attribute__((target("avx512f"), flatten)) void dx_stream_avx512(int64_t act, const float* dh, const float* h,
                                                                   const float* x, float* dx, int64_t C,
                                                                   const float* m, const float* A, const float* B,
                                                                   const float* D, int64_t n0, int64_t n1) {
  dx_stream<vf16>(act, dh, h, x, dx, C, m, A, B, D, n0, n1);
}
__attribute__((target("avx2,fma"), flatten)) void dx_stream_avx2(int64_t act, const float* dh, const float* h,
                                                                  const float* x, float* dx, int64_t C, const float* m,
                                                                  const float* A, const float* B, const float* D,
                                                                  int64_t n0, int64_t n1) {
  dx_stream<vf8>(act, dh, h, x, dx, C, m, A, B, D, n0, n1);
}
#endif

}  // namespace

bool normalize_streaming(int64_t act, const float* x, float* h, Shape s, const float* m, const float* a,
                         const float* b, int64_t n0, int64_t n1) {
#ifdef MMOPS_X86
  if (s.L != 1) return false;
  if (simd::cpu_has_avx512()) return normalize_stream_avx512(act, x, h, s.C, m, a, b, n0, n1), true;
  if (simd::cpu_has_avx2()) return normalize_stream_avx2(act, x, h, s.C, m, a, b, n0, n1), true;
#endif
  return false;
}

bool backward_dx_streaming(int64_t act, const float* dh, const float* h, const float* x, float* dx, Shape s,
                           const float* m, const float* A, const float* B, const float* D, int64_t n0, int64_t n1) {
#ifdef MMOPS_X86
  if (s.L != 1) return false;
  if (simd::cpu_has_avx512()) return dx_stream_avx512(act, dh, h, x, dx, s.C, m, A, B, D, n0, n1), true;
  if (simd::cpu_has_avx2()) return dx_stream_avx2(act, dh, h, x, dx, s.C, m, A, B, D, n0, n1), true;
#endif
  return false;
}

}  // namespace mmops::cpu::bn
