// The micro-kernel shared by gemm.cpp (general products) and rnn_recurrence.cpp (the loop over time), written once
// for two vector widths: an MR x kPanel block of C in 2 * MR vector accumulators, each step over k two loads of the
// B panel and MR broadcast-FMA pairs.
//   Avx512: zmm, panels of 32 columns, blocks of up to 8 rows (16 accumulators + 2 panel loads + 1 broadcast of 32
//           registers);
//   Avx2:   ymm, panels of 16 columns, blocks of up to 6 rows (12 + 2 + 1 of 16 registers: the 6 x 16 shape of the
//           AVX2 BLAS kernels).
// How one source becomes two ISAs' code: only the few functions of each Isa struct below (loads, stores, the
// broadcast and the FMA) carry a target attribute; the templates between them and the entry points carry none and
// are plain `inline`; each entry point is `target(...)` + `flatten`, which inlines everything under it, so at -O1
// and above each entry is one function of its ISA with the vectors in registers (GCC refuses to force a target
// function into an always_inline caller without that target, hence flatten rather than always_inline). Vectors
// go into the Isa functions by reference: a call that is not inlined would otherwise pass a vector between
// functions of different ISAs, whose ABIs differ.
// Include only under MMOPS_X86.
#pragma once
#ifndef __OPTIMIZE__
// Without optimisation flatten inlines nothing, and a vector returned by an Isa function to a caller compiled for
// the baseline ISA crosses an ABI boundary (a review's -O0 build crashed there). setup.py builds at -O3 (-O1 for the
// sanitizer suite).
#error "gemm_kernel.h needs an optimised build (-O1 or above)"
#endif
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/simd.h"

#ifdef MMOPS_X86
namespace mmops::cpu::gemm {

#define MMOPS_FLATTEN_AVX512 __attribute__((target("avx512f"), flatten))
#define MMOPS_FLATTEN_AVX2 __attribute__((target("avx2,fma"), flatten))
#define MMOPS_ISA_AVX512 __attribute__((target("avx512f"))) static inline
#define MMOPS_ISA_AVX2 __attribute__((target("avx2,fma"))) static inline
#define MMOPS_OUT_OF_LINE_AVX512 __attribute__((target("avx512f"), noinline, flatten))
#define MMOPS_OUT_OF_LINE_AVX2 __attribute__((target("avx2,fma"), noinline, flatten))

struct Avx512 {
  using V = __m512;
  using Mask = __mmask16;  // the lanes of one vector that lie inside the matrix
  static constexpr int64_t kWidth = 16;
  static constexpr int kMaxRows = 8;
  // Whether a long epilogue (tanh) runs out of line, after the block is stored: see rnn_recurrence.cpp.
  static constexpr bool kLongEpilogueOutOfLine = false;
  MMOPS_ISA_AVX512 Mask lanes(int64_t n) { return Mask(n >= 16 ? 0xFFFF : (1u << n) - 1); }  // the first n, 0..16
  MMOPS_ISA_AVX512 V zero() { return _mm512_setzero_ps(); }
  MMOPS_ISA_AVX512 V broadcast(const float* p) { return _mm512_set1_ps(*p); }
  MMOPS_ISA_AVX512 V load(const float* p) { return _mm512_loadu_ps(p); }
  MMOPS_ISA_AVX512 void store(float* p, const V& v) { _mm512_storeu_ps(p, v); }
  MMOPS_ISA_AVX512 V load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }  // 0 outside m
  MMOPS_ISA_AVX512 void store(float* p, Mask m, const V& v) { _mm512_mask_storeu_ps(p, m, v); }
  MMOPS_ISA_AVX512 V fmadd(const V& a, const V& b, const V& c) { return _mm512_fmadd_ps(a, b, c); }
  // dst[0 .. kMaxRows) = src[0 .. n), then zeros (n <= kMaxRows): a column tile of gemm_tn's packed G
  MMOPS_ISA_AVX512 void copy_tile(float* dst, const float* src, int64_t n) {
    _mm512_mask_storeu_ps(dst, 0xFF, _mm512_maskz_loadu_ps(lanes(n), src));
  }
};

// AVX2 has masked loads and stores (vmaskmovps), but AMD's manual leaves faults on masked-off lanes to the
// implementation, so a lane past the end of a buffer must not be addressed at all: a partial vector goes through a
// copy on the stack. Only the last panel of a matrix whose width is not a multiple of 16 takes that path.
struct Avx2 {
  using V = __m256;
  using Mask = int64_t;  // the first `Mask` lanes, 0..8
  static constexpr int64_t kWidth = 8;
  static constexpr int kMaxRows = 6;
  static constexpr bool kLongEpilogueOutOfLine = true;
  MMOPS_ISA_AVX2 Mask lanes(int64_t n) { return n >= 8 ? 8 : n; }
  MMOPS_ISA_AVX2 V zero() { return _mm256_setzero_ps(); }
  MMOPS_ISA_AVX2 V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  MMOPS_ISA_AVX2 V load(const float* p) { return _mm256_loadu_ps(p); }
  MMOPS_ISA_AVX2 void store(float* p, const V& v) { _mm256_storeu_ps(p, v); }
  MMOPS_ISA_AVX2 V load(const float* p, Mask m) {
    if (m == 8) return _mm256_loadu_ps(p);
    alignas(32) float lane[8] = {};
    for (int64_t i = 0; i < m; ++i) lane[i] = p[i];
    return _mm256_load_ps(lane);
  }
  MMOPS_ISA_AVX2 void store(float* p, Mask m, const V& v) {
    if (m == 8) return _mm256_storeu_ps(p, v);
    alignas(32) float lane[8];
    _mm256_store_ps(lane, v);
    for (int64_t i = 0; i < m; ++i) p[i] = lane[i];
  }
  MMOPS_ISA_AVX2 V fmadd(const V& a, const V& b, const V& c) { return _mm256_fmadd_ps(a, b, c); }
  MMOPS_ISA_AVX2 void copy_tile(float* dst, const float* src, int64_t n) {
    if (n == kMaxRows) return (void)std::memcpy(dst, src, kMaxRows * sizeof(float));  // all but a last tile: 2 moves
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
    for (int64_t i = n; i < kMaxRows; ++i) dst[i] = 0.0f;
  }
};

// Output columns per packed panel: two vectors.
template <class Isa>
constexpr int64_t kPanel = 2 * Isa::kWidth;

// Each thread takes at least this many multiply-adds per parallel product (or per step of the recurrence): below
// it the fork/join or barrier (~1 us) costs more than the thread saves.
constexpr int64_t kMinMacsPerThread = int64_t(1) << 18;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The blocks of an (M, N) result, kMaxRows rows x kPanel columns each, numbered panel-major (block i: panel
// i / row_tiles, rows from (i % row_tiles) * kMaxRows), so that a thread's contiguous share touches few panels.
template <class Isa>
struct Blocks {
  int64_t row_tiles, count;
  Blocks(int64_t M, int64_t N) : row_tiles(ceil_div(M, Isa::kMaxRows)), count(ceil_div(N, kPanel<Isa>) * row_tiles) {}
  int64_t panel(int64_t i) const { return i / row_tiles; }
  int64_t row0(int64_t i) const { return i % row_tiles * Isa::kMaxRows; }
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

// BLOCK(MR) with MR = n (1..MAX, MAX <= 8), the rows of a block, as a compile-time constant: the accumulators are
// arrays that stay in registers only when every index is one, so every loop over a block's rows carries
// `#pragma GCC unroll 8` (without it GCC keeps a long epilogue such as tanh rolled, and then stores all the
// accumulators to the stack on every k). Row counts above MAX are not instantiated. (A macro, since lambdas do
// not inherit the target attribute.)
#define MMOPS_WITH_ROWS(n, MAX, BLOCK)            \
  switch (n) {                                    \
    case 8: if constexpr (8 <= (MAX)) BLOCK(8); break; \
    case 7: if constexpr (7 <= (MAX)) BLOCK(7); break; \
    case 6: if constexpr (6 <= (MAX)) BLOCK(6); break; \
    case 5: BLOCK(5); break;                      \
    case 4: BLOCK(4); break;                      \
    case 3: BLOCK(3); break;                      \
    case 2: BLOCK(2); break;                      \
    default: BLOCK(1); break;                     \
  }

// The lanes of a panel that fall inside the matrix: a mask for each of its two vectors.
template <class Isa>
struct ColumnMask {
  typename Isa::Mask lo, hi;
};
template <class Isa>
inline ColumnMask<Isa> column_mask(int64_t n) {  // n = valid columns in this panel, 1..kPanel
  return {Isa::lanes(std::min<int64_t>(n, Isa::kWidth)), Isa::lanes(n > Isa::kWidth ? n - Isa::kWidth : 0)};
}

// acc[r][0..1] += sum_k a[r * a_rs + k * a_ks] * panel[k * p_ks + (0 .. kPanel - 1)] for the MR rows of a block.
// The panel is packed (zero past the matrix): its loads need no mask.
template <class Isa, int MR>
inline void block_product(const float* a, int64_t a_rs, int64_t a_ks, const float* panel, int64_t p_ks, int64_t K,
                          typename Isa::V (&acc)[MR][2]) {
  using V = typename Isa::V;
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    const float* pk = panel + k * p_ks;
    const V p0 = Isa::load(pk), p1 = Isa::load(pk + Isa::kWidth);
    const float* ak = a + k * a_ks;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const V ar = Isa::broadcast(ak + r * a_rs);
      acc[r][0] = Isa::fmadd(ar, p0, acc[r][0]);
      acc[r][1] = Isa::fmadd(ar, p1, acc[r][1]);
    }
  }
}

}  // namespace mmops::cpu::gemm
#endif
