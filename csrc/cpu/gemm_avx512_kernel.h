// The AVX-512 micro-kernel shared by gemm_avx512.cpp (general products) and rnn_recurrence.cpp (the loop over
// time): an MR x 32 block of C in 2 * MR zmm accumulators (MR <= 8), each step over k two loads of the B panel
// and MR broadcast-FMA pairs. Everything here is inlined into its AVX-512 callers; include only under MMOPS_X86.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "cpu/simd.h"

#ifdef MMOPS_X86
namespace mmops::cpu::avx512 {

constexpr int64_t kPanel = 32;  // output columns per panel: two zmm
constexpr int kMaxRows = 8;     // rows per block: 8 x 2 accumulators + 2 panel loads + 1 broadcast < 32 zmm
// Each thread takes at least this many multiply-adds per parallel product (or per step of the recurrence): below
// it the fork/join or barrier (~1 us) costs more than the thread saves.
constexpr int64_t kMinMacsPerThread = int64_t(1) << 18;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The blocks of an (M, N) result, 8 rows x 32 columns each, numbered panel-major (block i: panel i / row_tiles,
// rows from (i % row_tiles) * 8), so that a thread's contiguous share touches few panels.
struct Blocks {
  int64_t row_tiles, count;
  Blocks(int64_t M, int64_t N) : row_tiles(ceil_div(M, kMaxRows)), count(ceil_div(N, kPanel) * row_tiles) {}
  int64_t panel(int64_t i) const { return i / row_tiles; }
  int64_t row0(int64_t i) const { return i % row_tiles * kMaxRows; }
};

// Threads for a product of `macs` multiply-adds over `blocks` blocks: at most one per block and per
// kMinMacsPerThread.
inline int team_size(int64_t blocks, int64_t macs, int num_threads) {
  const int64_t by_work = std::max<int64_t>(1, macs / kMinMacsPerThread);
  return int(std::max<int64_t>(1, std::min<int64_t>({int64_t(num_threads), blocks, by_work})));
}

// Inside a parallel region: this thread's share [i0, i1) of `count` blocks, contiguous and the same on every
// call (so that in the recurrence a thread keeps its panels of W_hh in its own caches for all steps).
struct Share {
  int64_t i0, i1;
};
inline Share my_share(int64_t count) {
  const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
  return {count * t / n, count * (t + 1) / n};
}

// BLOCK(MR) with MR = n (1..8), the rows of a block, as a compile-time constant: the accumulators are arrays
// that stay in registers only when every index is one, so every loop over a block's rows carries
// `#pragma GCC unroll 8` (without it GCC keeps a long epilogue such as tanh rolled, and then stores all 16
// accumulators to the stack on every k). (A macro, since lambdas do not inherit the target attribute.)
#define MMOPS_WITH_ROWS(n, BLOCK) \
  switch (n) {                    \
    case 8: BLOCK(8); break;      \
    case 7: BLOCK(7); break;      \
    case 6: BLOCK(6); break;      \
    case 5: BLOCK(5); break;      \
    case 4: BLOCK(4); break;      \
    case 3: BLOCK(3); break;      \
    case 2: BLOCK(2); break;      \
    default: BLOCK(1); break;     \
  }

// Lanes of a 32-column panel that fall inside the matrix: masks for its two halves.
struct ColumnMask {
  __mmask16 lo, hi;
};
MMOPS_AVX512 ColumnMask column_mask(int64_t n) {  // n = valid columns in this panel, 1..32
  const auto bits = [](int64_t m) { return __mmask16(m >= 16 ? 0xFFFF : (1u << m) - 1); };
  return {bits(n), bits(n > 16 ? n - 16 : 0)};
}
constexpr ColumnMask kFullPanel{0xFFFF, 0xFFFF};

// acc[r][0..1] += sum_k a[r * a_rs + k * a_ks] * panel[k * p_ks + (0..31)] for the MR rows of a block; the
// panel's lanes outside `m` read as 0 (masked loads: nothing past the matrix is touched).
template <int MR>
MMOPS_AVX512 void block_product(const float* a, int64_t a_rs, int64_t a_ks, const float* panel, int64_t p_ks,
                                int64_t K, ColumnMask m, __m512 (&acc)[MR][2]) {
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    const float* pk = panel + k * p_ks;
    const __m512 p0 = _mm512_maskz_loadu_ps(m.lo, pk), p1 = _mm512_maskz_loadu_ps(m.hi, pk + 16);
    const float* ak = a + k * a_ks;
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 ar = _mm512_set1_ps(ak[r * a_rs]);
      acc[r][0] = _mm512_fmadd_ps(ar, p0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(ar, p1, acc[r][1]);
    }
  }
}

}  // namespace mmops::cpu::avx512
#endif
