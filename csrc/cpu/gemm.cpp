// Float32 products on the micro-kernel of gemm_kernel.h (AVX-512 or AVX2): pack_panels, gemm_packed, gemm_tn.
// The RNN uses them for its input projection x W_ih^T + b, d_input = dpre W_ih and the weight gradients
// dW_hh = sum_t dpre_t^T h_{t-1}, dW_ih = sum_t dpre_t^T x_t (csrc/cpu/rnn.cpp).
#include "cpu/gemm.h"

#include <omp.h>

#include <algorithm>
#include <vector>

#include "cpu/gemm_kernel.h"
#include "cpu/simd.h"

namespace mmops::cpu {

namespace {
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// The panel width of each ISA's kernels (gemm_kernel.h: kPanel); pack_panels is plain C++ and builds anywhere.
int64_t panel_columns(KernelIsa isa) { return isa == KernelIsa::kAvx512 ? 32 : 16; }
}  // namespace

KernelIsa kernel_isa() {
  if (simd::cpu_has_avx512()) return KernelIsa::kAvx512;
  return simd::cpu_has_avx2() ? KernelIsa::kAvx2 : KernelIsa::kNone;
}

int64_t packed_floats(KernelIsa isa, int64_t K, int64_t N) {
  return ceil_div(N, panel_columns(isa)) * K * panel_columns(isa);
}

void pack_panels(KernelIsa isa, const float* b, int64_t K, int64_t N, int64_t sk, int64_t sn, float* packed,
                 int num_threads) {
  // panel p, row k, lane c: B(k, p*W + c) = b[k * sk + (p*W + c) * sn], zero past N (W = panel_columns(isa))
  const int64_t W = panel_columns(isa), panels = ceil_div(N, W);
#pragma omp parallel for num_threads(std::max(1, std::min<int>(num_threads, int(panels)))) schedule(static)
  for (int64_t p = 0; p < panels; ++p) {
    float* P = packed + p * K * W;
    if (sk == 1) {  // B = W^T: read each row of W (one column n of B) contiguously
      for (int64_t c = 0; c < W; ++c) {
        const int64_t n = p * W + c;
        for (int64_t k = 0; k < K; ++k) P[k * W + c] = n < N ? b[k + n * sn] : 0.0f;
      }
    } else {
      for (int64_t k = 0; k < K; ++k)
        for (int64_t c = 0; c < W; ++c) {
          const int64_t n = p * W + c;
          P[k * W + c] = n < N ? b[k * sk + n * sn] : 0.0f;
        }
    }
  }
}

#ifdef MMOPS_X86
namespace {
using namespace gemm;

// ---- C = sum_s G_s^T P_s ----------------------------------------------------------------------------------------
// The rows go in chunks of kRowChunk (the k dimension of the product). Per chunk each thread packs what its blocks
// of C need: the chunk of G into tiles of kMaxRows columns (k-major: kMaxRows contiguous floats per k, zero past M)
// and the chunk of P into panels (kPanel contiguous floats per k, zero past N); then each block (kMaxRows rows x
// kPanel columns of C, in registers) runs block_product over contiguous memory. Read in place, G and P rows are
// ldg / ldp floats apart (2 KB at H = 512), which maps a chunk's rows onto a few L1 sets and made every load an L2
// access (bench/results/rnn.md). A chunk's panel (128 x 32 floats, 16 KB on AVX-512) stays in L1 while the thread's
// blocks walk its row tiles. C is read back and added between chunks; threads own disjoint blocks of C, so they
// never synchronise.
constexpr int64_t kRowChunk = 128;

template <class Isa, int MR>
inline void tn_block(const float* g_tile, const float* p_panel, int64_t rows, float* c, int64_t ldc,
                     const ColumnMask<Isa>& m, bool first) {
  typename Isa::V acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = first ? Isa::zero() : Isa::load(c + r * ldc, m.lo);
    acc[r][1] = first ? Isa::zero() : Isa::load(c + r * ldc + Isa::kWidth, m.hi);
  }
  block_product<Isa, MR>(g_tile, 1, Isa::kMaxRows, p_panel, kPanel<Isa>, rows, acc);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    Isa::store(c + r * ldc, m.lo, acc[r][0]);
    Isa::store(c + r * ldc + Isa::kWidth, m.hi, acc[r][1]);
  }
}

// One chunk of rows [r0, r1) of a segment into this thread's blocks [i0, i1); g_pack and p_pack are the thread's
// buffers (row_tiles * kRowChunk * kMaxRows and its panels * kRowChunk * kPanel floats).
template <class Isa>
inline void tn_chunk(const RowSegment& seg, int64_t r0, int64_t r1, int64_t M, int64_t N, float* C, bool first,
                     int64_t i0, int64_t i1, float* g_pack, float* p_pack) {
  constexpr int64_t kRows = Isa::kMaxRows, kCols = kPanel<Isa>;
  const Blocks<Isa> blocks(M, N);
  const int64_t rows = r1 - r0, p_first = blocks.panel(i0), p_last = blocks.panel(i1 - 1);
  // G (rows, M) -> tiles [tile][k][kRows], zero past M; P (rows, N) -> the thread's panels [panel][k][kCols], zero
  // past N. Row by row, so that the source (often just out of the last-level cache) is read sequentially.
  for (int64_t k = 0; k < rows; ++k) {
    const float* g_row = seg.g + (r0 + k) * seg.ldg;
    for (int64_t tile = 0; tile < blocks.row_tiles; ++tile) {
      const int64_t j0 = tile * kRows, width = std::min<int64_t>(kRows, M - j0);
      Isa::copy_tile(g_pack + (tile * kRowChunk + k) * kRows, g_row + j0, width);
    }
    const float* p_row = seg.p + (r0 + k) * seg.ldp;
    for (int64_t p = p_first; p <= p_last; ++p) {
      const ColumnMask<Isa> m = column_mask<Isa>(std::min<int64_t>(kCols, N - p * kCols));
      float* dst = p_pack + ((p - p_first) * kRowChunk + k) * kCols;
      Isa::store(dst, Isa::load(p_row + p * kCols, m.lo));
      Isa::store(dst + Isa::kWidth, Isa::load(p_row + p * kCols + Isa::kWidth, m.hi));
    }
  }
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t j0 = blocks.row0(i), p = blocks.panel(i), c0 = p * kCols;
    const float* g_tile = g_pack + (j0 / kRows) * kRowChunk * kRows;
    const float* p_panel = p_pack + (p - p_first) * kRowChunk * kCols;
    const ColumnMask<Isa> m = column_mask<Isa>(std::min<int64_t>(kCols, N - c0));
#define TN_BLOCK(MR) tn_block<Isa, MR>(g_tile, p_panel, rows, C + j0 * N + c0, N, m, first)
    MMOPS_WITH_ROWS(std::min<int64_t>(kRows, M - j0), kRows, TN_BLOCK)
#undef TN_BLOCK
  }
}

MMOPS_FLATTEN_AVX512 void tn_chunk_on(Avx512, const RowSegment& seg, int64_t r0, int64_t r1, int64_t M, int64_t N,
                                      float* C, bool first, int64_t i0, int64_t i1, float* g_pack, float* p_pack) {
  tn_chunk<Avx512>(seg, r0, r1, M, N, C, first, i0, i1, g_pack, p_pack);
}
MMOPS_FLATTEN_AVX2 void tn_chunk_on(Avx2, const RowSegment& seg, int64_t r0, int64_t r1, int64_t M, int64_t N,
                                    float* C, bool first, int64_t i0, int64_t i1, float* g_pack, float* p_pack) {
  tn_chunk<Avx2>(seg, r0, r1, M, N, C, first, i0, i1, g_pack, p_pack);
}

template <class Isa>
void gemm_tn_on(const RowSegment* segments, int num_segments, int64_t M, int64_t N, float* C, int num_threads) {
  const Blocks<Isa> blocks(M, N);
  int64_t macs = 0;
  for (int s = 0; s < num_segments; ++s) macs += segments[s].rows * M * N;
#pragma omp parallel num_threads(team_size(blocks.count, macs, num_threads))
  {
    const Share sh = my_share(blocks.count);
    if (sh.i1 > sh.i0) {
      const int64_t panels = blocks.panel(sh.i1 - 1) - blocks.panel(sh.i0) + 1;
      std::vector<float> g_pack(blocks.row_tiles * kRowChunk * Isa::kMaxRows),
          p_pack(panels * kRowChunk * kPanel<Isa>);
      bool first = true;
      for (int s = 0; s < num_segments; ++s)
        for (int64_t r0 = 0; r0 < segments[s].rows; r0 += kRowChunk) {
          tn_chunk_on(Isa{}, segments[s], r0, std::min(segments[s].rows, r0 + kRowChunk), M, N, C, first, sh.i0,
                      sh.i1, g_pack.data(), p_pack.data());
          first = false;
        }
      if (first)  // no rows at all: C = 0
        for (int64_t i = sh.i0; i < sh.i1; ++i) {
          const int64_t j0 = blocks.row0(i), c0 = blocks.panel(i) * kPanel<Isa>;
          for (int64_t j = j0; j < std::min<int64_t>(M, j0 + Isa::kMaxRows); ++j)
            std::fill(C + j * N + c0, C + j * N + std::min(N, c0 + kPanel<Isa>), 0.0f);
        }
    }
  }
}

// ---- C = A B + bias, B packed -----------------------------------------------------------------------------------
struct PackedProduct {
  const float* a;  // (M, K), rows lda apart
  int64_t lda, M, K;
  const float* packed;  // B (K, N) by pack_panels
  int64_t N;
  const float* bias;  // (N,) or null
  float* c;           // (M, N), contiguous
};

template <class Isa, int MR>
inline void packed_block(const PackedProduct& s, int64_t row0, int64_t p) {
  using V = typename Isa::V;
  const int64_t c0 = p * kPanel<Isa>;
  const ColumnMask<Isa> m = column_mask<Isa>(std::min<int64_t>(kPanel<Isa>, s.N - c0));
  const V b0 = s.bias ? Isa::load(s.bias + c0, m.lo) : Isa::zero();
  const V b1 = s.bias ? Isa::load(s.bias + c0 + Isa::kWidth, m.hi) : Isa::zero();
  V acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = b0, acc[r][1] = b1;
  block_product<Isa, MR>(s.a + row0 * s.lda, s.lda, 1, s.packed + p * s.K * kPanel<Isa>, kPanel<Isa>, s.K, acc);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    Isa::store(s.c + (row0 + r) * s.N + c0, m.lo, acc[r][0]);
    Isa::store(s.c + (row0 + r) * s.N + c0 + Isa::kWidth, m.hi, acc[r][1]);
  }
}

// Row tiles [t0, t1) of C, all panels: in groups of kGroupTiles tiles (64 rows of A on AVX-512, at most 128 KB,
// stay in L2), each group panel by panel (a panel stays in L1 across the group's tiles). Panel-major over all rows
// instead re-read all of A from memory once per panel: at 8192 x 128 x 512, 75 instead of ~110 GFLOP/s.
constexpr int64_t kGroupTiles = 8;

template <class Isa>
inline void packed_tiles(const PackedProduct& s, int64_t t0, int64_t t1) {
  const int64_t panels = ceil_div(s.N, kPanel<Isa>);
  for (int64_t g0 = t0; g0 < t1; g0 += kGroupTiles)
    for (int64_t p = 0; p < panels; ++p)
      for (int64_t tile = g0; tile < std::min(t1, g0 + kGroupTiles); ++tile) {
        const int64_t row0 = tile * Isa::kMaxRows;
#define PACKED_BLOCK(MR) packed_block<Isa, MR>(s, row0, p)
        MMOPS_WITH_ROWS(std::min<int64_t>(Isa::kMaxRows, s.M - row0), Isa::kMaxRows, PACKED_BLOCK)
#undef PACKED_BLOCK
      }
}

MMOPS_FLATTEN_AVX512 void packed_tiles_on(Avx512, const PackedProduct& s, int64_t t0, int64_t t1) {
  packed_tiles<Avx512>(s, t0, t1);
}
MMOPS_FLATTEN_AVX2 void packed_tiles_on(Avx2, const PackedProduct& s, int64_t t0, int64_t t1) {
  packed_tiles<Avx2>(s, t0, t1);
}

template <class Isa>
void gemm_packed_on(const PackedProduct& s, int num_threads) {
  const int64_t tiles = ceil_div(s.M, Isa::kMaxRows);  // threads split the rows: each reads only its share of A
#pragma omp parallel num_threads(team_size(tiles, s.M * s.K * s.N, num_threads))
  {
    const Share sh = my_share(tiles);
    packed_tiles_on(Isa{}, s, sh.i0, sh.i1);
  }
}

}  // namespace

void gemm_tn(KernelIsa isa, const RowSegment* segments, int num_segments, int64_t M, int64_t N, float* C,
             int num_threads) {
  if (isa == KernelIsa::kAvx512) gemm_tn_on<Avx512>(segments, num_segments, M, N, C, num_threads);
  else gemm_tn_on<Avx2>(segments, num_segments, M, N, C, num_threads);
}

void gemm_packed(KernelIsa isa, const float* a, int64_t M, int64_t K, int64_t lda, const float* packed, int64_t N,
                 const float* bias, float* c, int num_threads) {
  const PackedProduct s{a, lda, M, K, packed, N, bias, c};
  if (isa == KernelIsa::kAvx512) gemm_packed_on<Avx512>(s, num_threads);
  else gemm_packed_on<Avx2>(s, num_threads);
}

#else  // no SIMD kernels in this build: kernel_isa() is kNone, and callers do not call these

void gemm_tn(KernelIsa, const RowSegment*, int, int64_t, int64_t, float*, int) {}
void gemm_packed(KernelIsa, const float*, int64_t, int64_t, int64_t, const float*, int64_t, const float*, float*,
                 int) {}

#endif

}  // namespace mmops::cpu
