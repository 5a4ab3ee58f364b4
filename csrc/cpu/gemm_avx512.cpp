// Float32 products on the AVX-512 micro-kernel (gemm_avx512_kernel.h): pack_panels, gemm_packed, gemm_tn.
// The RNN uses them for its input projection x W_ih^T + b, d_input = dpre W_ih and the weight gradients
// dW_hh = sum_t dpre_t^T h_{t-1}, dW_ih = sum_t dpre_t^T x_t (csrc/cpu/rnn.cpp).
#include "cpu/gemm_avx512.h"

#include <omp.h>

#include <algorithm>
#include <vector>

#include "cpu/gemm_avx512_kernel.h"
#include "cpu/simd.h"

namespace mmops::cpu {

namespace {
constexpr int64_t kPanelColumns = 32;  // = avx512::kPanel; pack_panels is plain C++ and builds on any platform
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace

int64_t packed_floats(int64_t K, int64_t N) { return ceil_div(N, kPanelColumns) * K * kPanelColumns; }

void pack_panels(const float* b, int64_t K, int64_t N, int64_t sk, int64_t sn, float* packed, int num_threads) {
  // panel p, row k, lane c: B(k, p*32 + c) = b[k * sk + (p*32 + c) * sn], zero past N
  const int64_t panels = ceil_div(N, kPanelColumns);
#pragma omp parallel for num_threads(std::max(1, std::min<int>(num_threads, int(panels)))) schedule(static)
  for (int64_t p = 0; p < panels; ++p) {
    float* P = packed + p * K * kPanelColumns;
    if (sk == 1) {  // B = W^T: read each row of W (one column n of B) contiguously
      for (int64_t c = 0; c < kPanelColumns; ++c) {
        const int64_t n = p * kPanelColumns + c;
        for (int64_t k = 0; k < K; ++k) P[k * kPanelColumns + c] = n < N ? b[k + n * sn] : 0.0f;
      }
    } else {
      for (int64_t k = 0; k < K; ++k)
        for (int64_t c = 0; c < kPanelColumns; ++c) {
          const int64_t n = p * kPanelColumns + c;
          P[k * kPanelColumns + c] = n < N ? b[k * sk + n * sn] : 0.0f;
        }
    }
  }
}

#ifdef MMOPS_X86
namespace {
using namespace avx512;

// ---- C = sum_s G_s^T P_s ----------------------------------------------------------------------------------------
// The rows go in chunks of kRowChunk (the k dimension of the product). Per chunk each thread packs what its blocks
// of C need: the chunk of G into tiles of 8 columns (k-major: 8 contiguous floats per k, zero past M) and the chunk
// of P into 32-column panels (32 contiguous floats per k, zero past N); then each block (8 rows x 32 columns of C,
// in registers) runs block_product over contiguous memory. Read in place, G and P rows are ldg / ldp floats apart
// (2 KB at H = 512), which maps a chunk's rows onto a few L1 sets and made every load an L2 access (bench/results/
// rnn.md). A chunk's panel (128 x 32 floats, 16 KB) stays in L1 while the thread's blocks walk its row tiles. C is
// read back and added between chunks; threads own disjoint blocks of C, so they never synchronise.
constexpr int64_t kRowChunk = 128;

template <int MR>
MMOPS_AVX512 void tn_block(const float* g_tile, const float* p_panel, int64_t rows, float* c, int64_t ldc,
                           ColumnMask m, bool first) {
  __m512 acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m.lo, c + r * ldc);
    acc[r][1] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m.hi, c + r * ldc + 16);
  }
  block_product<MR>(g_tile, 1, kMaxRows, p_panel, kPanel, rows, kFullPanel, acc);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, m.lo, acc[r][0]);
    _mm512_mask_storeu_ps(c + r * ldc + 16, m.hi, acc[r][1]);
  }
}

// One chunk of rows [r0, r1) of a segment into this thread's blocks [i0, i1); g_pack and p_pack are the thread's
// buffers (row_tiles * kRowChunk * 8 and its panels * kRowChunk * 32 floats).
MMOPS_AVX512_TARGET void tn_chunk(const RowSegment& seg, int64_t r0, int64_t r1, int64_t M, int64_t N, float* C,
                                  bool first, int64_t i0, int64_t i1, float* g_pack, float* p_pack) {
  const Blocks blocks(M, N);
  const int64_t rows = r1 - r0, p_first = blocks.panel(i0), p_last = blocks.panel(i1 - 1);
  // G (rows, M) -> tiles [tile][k][8], zero past M; P (rows, N) -> the thread's panels [panel][k][32], zero past
  // N. Row by row, so that the source (often just out of the last-level cache) is read sequentially.
  for (int64_t k = 0; k < rows; ++k) {
    const float* g_row = seg.g + (r0 + k) * seg.ldg;
    for (int64_t tile = 0; tile < blocks.row_tiles; ++tile) {
      const int64_t j0 = tile * kMaxRows, width = std::min<int64_t>(kMaxRows, M - j0);
      const __m512 v = _mm512_maskz_loadu_ps(__mmask16((1u << width) - 1), g_row + j0);
      _mm512_mask_storeu_ps(g_pack + (tile * kRowChunk + k) * kMaxRows, 0xFF, v);
    }
    const float* p_row = seg.p + (r0 + k) * seg.ldp;
    for (int64_t p = p_first; p <= p_last; ++p) {
      const ColumnMask m = column_mask(std::min<int64_t>(kPanel, N - p * kPanel));
      float* dst = p_pack + ((p - p_first) * kRowChunk + k) * kPanel;
      _mm512_storeu_ps(dst, _mm512_maskz_loadu_ps(m.lo, p_row + p * kPanel));
      _mm512_storeu_ps(dst + 16, _mm512_maskz_loadu_ps(m.hi, p_row + p * kPanel + 16));
    }
  }
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t j0 = blocks.row0(i), p = blocks.panel(i), c0 = p * kPanel;
    const float* g_tile = g_pack + (j0 / kMaxRows) * kRowChunk * kMaxRows;
    const float* p_panel = p_pack + (p - p_first) * kRowChunk * kPanel;
    const ColumnMask m = column_mask(std::min<int64_t>(kPanel, N - c0));
#define TN_BLOCK(MR) tn_block<MR>(g_tile, p_panel, rows, C + j0 * N + c0, N, m, first)
    MMOPS_WITH_ROWS(std::min<int64_t>(kMaxRows, M - j0), TN_BLOCK)
#undef TN_BLOCK
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

template <int MR>
MMOPS_AVX512 void packed_block(const PackedProduct& s, int64_t row0, int64_t p) {
  const int64_t c0 = p * kPanel;
  const ColumnMask m = column_mask(std::min<int64_t>(kPanel, s.N - c0));
  const __m512 b0 = s.bias ? _mm512_maskz_loadu_ps(m.lo, s.bias + c0) : _mm512_setzero_ps();
  const __m512 b1 = s.bias ? _mm512_maskz_loadu_ps(m.hi, s.bias + c0 + 16) : _mm512_setzero_ps();
  __m512 acc[MR][2];
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = b0, acc[r][1] = b1;
  // the packed panel is zero past N: its loads need no mask
  block_product<MR>(s.a + row0 * s.lda, s.lda, 1, s.packed + p * s.K * kPanel, kPanel, s.K, kFullPanel, acc);
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(s.c + (row0 + r) * s.N + c0, m.lo, acc[r][0]);
    _mm512_mask_storeu_ps(s.c + (row0 + r) * s.N + c0 + 16, m.hi, acc[r][1]);
  }
}

// Row tiles [t0, t1) of C, all panels: in groups of kGroupTiles tiles (64 rows of A, at most 128 KB, stay in L2),
// each group panel by panel (a panel stays in L1 across the group's tiles). Panel-major over all rows instead
// re-read all of A from memory once per panel: at 8192 x 128 x 512, 75 instead of ~110 GFLOP/s.
constexpr int64_t kGroupTiles = 8;

MMOPS_AVX512_TARGET void packed_tiles(const PackedProduct& s, int64_t t0, int64_t t1) {
  const int64_t panels = avx512::ceil_div(s.N, kPanel);
  for (int64_t g0 = t0; g0 < t1; g0 += kGroupTiles)
    for (int64_t p = 0; p < panels; ++p)
      for (int64_t tile = g0; tile < std::min(t1, g0 + kGroupTiles); ++tile) {
        const int64_t row0 = tile * kMaxRows;
#define PACKED_BLOCK(MR) packed_block<MR>(s, row0, p)
        MMOPS_WITH_ROWS(std::min<int64_t>(kMaxRows, s.M - row0), PACKED_BLOCK)
#undef PACKED_BLOCK
      }
}

}  // namespace

void gemm_tn(const RowSegment* segments, int num_segments, int64_t M, int64_t N, float* C, int num_threads) {
  const Blocks blocks(M, N);
  int64_t macs = 0;
  for (int s = 0; s < num_segments; ++s) macs += segments[s].rows * M * N;
#pragma omp parallel num_threads(team_size(blocks.count, macs, num_threads))
  {
    const Share sh = my_share(blocks.count);
    if (sh.i1 > sh.i0) {
      const int64_t panels = blocks.panel(sh.i1 - 1) - blocks.panel(sh.i0) + 1;
      std::vector<float> g_pack(blocks.row_tiles * kRowChunk * kMaxRows), p_pack(panels * kRowChunk * kPanel);
      bool first = true;
      for (int s = 0; s < num_segments; ++s)
        for (int64_t r0 = 0; r0 < segments[s].rows; r0 += kRowChunk) {
          tn_chunk(segments[s], r0, std::min(segments[s].rows, r0 + kRowChunk), M, N, C, first, sh.i0, sh.i1,
                   g_pack.data(), p_pack.data());
          first = false;
        }
      if (first)  // no rows at all: C = 0
        for (int64_t i = sh.i0; i < sh.i1; ++i) {
          const int64_t j0 = blocks.row0(i), c0 = blocks.panel(i) * kPanel;
          for (int64_t j = j0; j < std::min(M, j0 + kMaxRows); ++j)
            std::fill(C + j * N + c0, C + j * N + std::min(N, c0 + kPanel), 0.0f);
        }
    }
  }
}

void gemm_packed(const float* a, int64_t M, int64_t K, int64_t lda, const float* packed, int64_t N,
                 const float* bias, float* c, int num_threads) {
  const PackedProduct s{a, lda, M, K, packed, N, bias, c};
  const int64_t tiles = avx512::ceil_div(M, kMaxRows);  // threads split the rows: each reads only its share of A
#pragma omp parallel num_threads(team_size(tiles, M * K * N, num_threads))
  {
    const Share sh = my_share(tiles);
    packed_tiles(s, sh.i0, sh.i1);
  }
}

#else  // no AVX-512 code in this build: callers check simd::cpu_has_avx512(), which is false here

void gemm_tn(const RowSegment*, int, int64_t, int64_t, float*, int) {}
void gemm_packed(const float*, int64_t, int64_t, int64_t, const float*, int64_t, const float*, float*, int) {}

#endif

}  // namespace mmops::cpu
