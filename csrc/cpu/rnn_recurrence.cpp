// The float32 recurrence of mmops.rnn on AVX-512: every step's (B, H) x (H, H) product and its epilogue in one
// hand-written kernel, the whole loop over time inside one OpenMP region. Below it, on the same micro-kernel: the
// weight-gradient kernel (dW_hh, dW_ih as one pass over all rows) and a packed product (input projection, d_input).
//
// Why: at the d2l size (T35, B32, H256) the recurrence is 70 products of 32 x 256 x 256 (forward and backward),
// each ~30 us through MKL (whose sgemm takes its AVX2 path on these AMD CPUs) or oneDNN (~130 GFLOP/s: a call
// costs more than its 2M multiply-adds), plus an elementwise pass per step and a fork/join per pass. Here:
//   * W_hh is packed once per call into panels of 32 output columns, K x 32 floats each (a row is two
//     zmm), so the inner loop reads it with two contiguous loads per k;
//   * a micro-kernel computes an MR x 32 block (MR <= 8 rows: 16 zmm accumulators; each k costs two loads
//     and MR broadcast-FMA pairs), the rows of A read straight from h_{t-1} (forward) or dpre_{t+1} (backward);
//   * the epilogue runs on the accumulators before they leave registers: forward h = act(acc + proj_t) with
//     proj_t read from (and h written to) out[t]; backward g = (acc + dout_t) * act'(h_t);
//   * the threads split the (panel, row tile) blocks panel-major, so each keeps its panels of W_hh in its own
//     L1/L2 for all T steps; one barrier per step publishes h_t (or dpre_t) to the other threads.
// Measured at B32 H256 (this project's 2-core Zen 5 VM): 12-20 us a step on 2 threads, ~22 us (~190 GFLOP/s) on
// one; T35 fwd+bwd of mmops.nn.RNN 2.7-2.8 ms vs 4.2 ms with a matmul per step (interleaved; MMOPS_NO_STEP_KERNEL=1).
//
// The math of the backward (dpre_t = (dpre_{t+1} W_hh + dout_t) * act'(h_t)) is written once, in rnn.cpp.
#include "cpu/rnn_recurrence.h"

#include "cpu/simd.h"

#include <omp.h>

#include <algorithm>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(MMOPS_NO_CLONES)
#define MMOPS_RNN_AVX512 1
#include <immintrin.h>
#endif

namespace mmops::cpu {

namespace {
constexpr int64_t kPanel = 32;  // output columns per panel: two zmm
constexpr int kMaxRows = 8;     // rows per micro-kernel block: 8 x 2 accumulators + 2 panel loads + 1 broadcast
// Each thread takes at least this many multiply-adds per step: below it the barrier (~1 us) costs more than the
// thread saves (at B32 H64, 131K per step, one thread is faster).
constexpr int64_t kMinMacsPerThread = int64_t(1) << 18;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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
[[maybe_unused]] int team_size(int64_t blocks, int64_t macs, int num_threads) {
  const int64_t by_work = std::max<int64_t>(1, macs / kMinMacsPerThread);
  return int(std::max<int64_t>(1, std::min<int64_t>({int64_t(num_threads), blocks, by_work})));
}

// Inside a parallel region: this thread's share [i0, i1) of `count` blocks, contiguous and the same on every call
// (so a thread keeps its panels of W_hh over all steps).
struct Share {
  int64_t i0, i1;
};
[[maybe_unused]] Share my_share(int64_t count) {
  const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
  return {count * t / n, count * (t + 1) / n};
}
}  // namespace

int64_t rnn_packed_floats(int64_t K, int64_t N) { return ceil_div(N, kPanel) * K * kPanel; }

void rnn_pack_panels(const float* b, int64_t K, int64_t N, int64_t sk, int64_t sn, float* packed, int num_threads) {
  // panel p, row k, lane c: B(k, p*32 + c) = b[k * sk + (p*32 + c) * sn], zero past N
  const int64_t panels = ceil_div(N, kPanel);
#pragma omp parallel for num_threads(std::max(1, std::min<int>(num_threads, int(panels)))) schedule(static)
  for (int64_t p = 0; p < panels; ++p) {
    float* P = packed + p * K * kPanel;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < kPanel; ++c) {
        const int64_t n = p * kPanel + c;
        P[k * kPanel + c] = n < N ? b[k * sk + n * sn] : 0.0f;
      }
  }
}

#ifdef MMOPS_RNN_AVX512
#define MMOPS_AVX512 __attribute__((target("avx512f"), always_inline)) inline
// BLOCK(MR) with MR = n (1..8), the rows of a block, as a compile-time constant: the accumulators are arrays that
// stay in registers only when every index is one. (A macro, since lambdas do not inherit the target attribute.)
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

namespace {

// acc[r][0..1] += sum_k a[r * a_rs + k * a_ks] * panel[k * p_ks + (0..31)] for the MR rows of a block; the
// panel's lanes outside `m` read as 0 (masked loads: nothing past the matrix is touched).
struct ColumnMask {
  __mmask16 lo, hi;
};
template <int MR>
MMOPS_AVX512 void block_product(const float* a, int64_t a_rs, int64_t a_ks, const float* panel, int64_t p_ks,
                                int64_t K, ColumnMask m, __m512 (&acc)[MR][2]) {
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    const float* pk = panel + k * p_ks;
    const __m512 p0 = _mm512_maskz_loadu_ps(m.lo, pk), p1 = _mm512_maskz_loadu_ps(m.hi, pk + 16);
    const float* ak = a + k * a_ks;
    for (int r = 0; r < MR; ++r) {
      const __m512 ar = _mm512_set1_ps(ak[r * a_rs]);
      acc[r][0] = _mm512_fmadd_ps(ar, p0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(ar, p1, acc[r][1]);
    }
  }
}

// Lanes of a 32-column panel that fall inside the matrix: masks for its two halves.
MMOPS_AVX512 ColumnMask column_mask(int64_t n) {  // n = valid columns in this panel, 1..32
  const auto bits = [](int64_t m) { return __mmask16(m >= 16 ? 0xFFFF : (1u << m) - 1); };
  return {bits(n), bits(n > 16 ? n - 16 : 0)};
}

// Forward epilogue, row r of the block: y = act(acc + y), y = out[t] at (row, c0).
template <int kAct>
MMOPS_AVX512 void forward_row(float* y, __m512 acc0, __m512 acc1, ColumnMask m) {
  const __m512 v0 = simd::activate<kAct>(_mm512_add_ps(acc0, _mm512_maskz_loadu_ps(m.lo, y)));
  const __m512 v1 = simd::activate<kAct>(_mm512_add_ps(acc1, _mm512_maskz_loadu_ps(m.hi, y + 16)));
  _mm512_mask_storeu_ps(y, m.lo, v0);
  _mm512_mask_storeu_ps(y + 16, m.hi, v1);
}

// (acc + dout) * act'(h), act' from the activation's output (simd::act_grad: 1 - h^2, or relu's [not h <= 0]).
template <int kAct>
MMOPS_AVX512 __m512 grad_lanes(__m512 acc, __mmask16 m, const float* dout, const float* h) {
  return simd::act_grad<kAct>(_mm512_add_ps(acc, _mm512_maskz_loadu_ps(m, dout)), _mm512_maskz_loadu_ps(m, h));
}

enum class Epilogue { kForward, kBackward, kStore };

struct StepArgs {
  const float* a;  // A: (B, H), the previous step's h (forward) or dpre (backward); null: A = 0
  float* y;        // (B, H): forward out[t] (proj in, h out); backward dpre[t]; store: the product
  const float* dout;  // backward: dout[t]
  const float* h;     // backward: h[t]
  const float* packed;
  int64_t B, H;
};

template <Epilogue kEp, int kAct, int MR>
MMOPS_AVX512 void step_block(const StepArgs& s, int64_t row0, int64_t p) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  // the packed panel is zero past H: its loads need no mask
  if (s.a) block_product<MR>(s.a + row0 * s.H, s.H, 1, s.packed + p * s.H * kPanel, kPanel, s.H, {0xFFFF, 0xFFFF}, acc);
  const int64_t c0 = p * kPanel;
  const ColumnMask m = column_mask(std::min<int64_t>(kPanel, s.H - c0));
  for (int r = 0; r < MR; ++r) {
    const int64_t o = (row0 + r) * s.H + c0;
    if (kEp == Epilogue::kForward) {
      forward_row<kAct>(s.y + o, acc[r][0], acc[r][1], m);
    } else if (kEp == Epilogue::kBackward) {
      _mm512_mask_storeu_ps(s.y + o, m.lo, grad_lanes<kAct>(acc[r][0], m.lo, s.dout + o, s.h + o));
      _mm512_mask_storeu_ps(s.y + o + 16, m.hi, grad_lanes<kAct>(acc[r][1], m.hi, s.dout + o + 16, s.h + o + 16));
    } else {
      _mm512_mask_storeu_ps(s.y + o, m.lo, acc[r][0]);
      _mm512_mask_storeu_ps(s.y + o + 16, m.hi, acc[r][1]);
    }
  }
}

// One step's blocks [i0, i1) of this thread (Blocks(B, H) numbering).
template <Epilogue kEp, int kAct>
__attribute__((target("avx512f"))) void step_blocks(const StepArgs& s, int64_t i0, int64_t i1) {
  const Blocks blocks(s.B, s.H);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t p = blocks.panel(i), row0 = blocks.row0(i);
#define STEP_BLOCK(MR) step_block<kEp, kAct, MR>(s, row0, p)
    MMOPS_WITH_ROWS(std::min<int64_t>(kMaxRows, s.B - row0), STEP_BLOCK)
#undef STEP_BLOCK
  }
}

template <Epilogue kEp>
void step_blocks(int64_t act, const StepArgs& s, int64_t i0, int64_t i1) {
  if (act == simd::kTanh) step_blocks<kEp, simd::kTanh>(s, i0, i1);
  else step_blocks<kEp, simd::kRelu>(s, i0, i1);
}

// ---- dW = sum_s G_s^T P_s: the weight gradients as one pass over all rows ------------------------------------
// C (M, N) = sum over the rows r of every segment of G[r]^T P[r] (G rows of M, P rows of N). A block of C is 8
// rows x 32 columns in registers: per row r, 8 contiguous floats of G[r] are broadcast and one 32-float stretch
// of P[r] loaded, i.e. block_product with a = G (row stride 1, k stride ldg) and the panel read in place from P
// (k stride ldp), no packing. The rows go in chunks of kRowChunk (the chunk's G and P stay in L2 while the
// blocks walk them, each block's stretch of P in L1 across the 8-row blocks of one panel); C is read back and
// added between chunks. Threads own disjoint blocks of C, so they never synchronise.
constexpr int64_t kRowChunk = 256;

template <int MR>
MMOPS_AVX512 void weight_grad_block(const float* g, int64_t ldg, const float* p, int64_t ldp, int64_t rows,
                                    float* c, int64_t ldc, ColumnMask m, bool first) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m.lo, c + r * ldc);
    acc[r][1] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m.hi, c + r * ldc + 16);
  }
  block_product<MR>(g, 1, ldg, p, ldp, rows, m, acc);
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, m.lo, acc[r][0]);
    _mm512_mask_storeu_ps(c + r * ldc + 16, m.hi, acc[r][1]);
  }
}

__attribute__((target("avx512f"))) void weight_grad_blocks(const RowSegment& seg, int64_t r0, int64_t r1,
                                                           int64_t M, int64_t N, float* C, bool first, int64_t i0,
                                                           int64_t i1) {
  const Blocks blocks(M, N);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t j0 = blocks.row0(i), c0 = blocks.panel(i) * kPanel;
    const float* g = seg.g + r0 * seg.ldg + j0;
    const float* p = seg.p + r0 * seg.ldp + c0;
    float* c = C + j0 * N + c0;
    const ColumnMask m = column_mask(std::min<int64_t>(kPanel, N - c0));
    const int64_t rows = r1 - r0;
#define GRAD_BLOCK(MR) weight_grad_block<MR>(g, seg.ldg, p, seg.ldp, rows, c, N, m, first)
    MMOPS_WITH_ROWS(std::min<int64_t>(kMaxRows, M - j0), GRAD_BLOCK)
#undef GRAD_BLOCK
  }
}

// ---- C = A B + bias with B packed: the input projection (x W_ih^T + b) and d_input (dpre W_ih) ---------------
struct ProductArgs {
  const float* a;  // (M, K), rows lda apart
  int64_t lda, M, K;
  const float* packed;  // B (K, N) by rnn_pack_panels
  int64_t N;
  const float* bias;  // (N,) or null
  float* c;           // (M, N), contiguous
};

template <int MR>
MMOPS_AVX512 void product_block(const ProductArgs& s, int64_t row0, int64_t p) {
  const int64_t c0 = p * kPanel;
  const ColumnMask m = column_mask(std::min<int64_t>(kPanel, s.N - c0));
  const __m512 b0 = s.bias ? _mm512_maskz_loadu_ps(m.lo, s.bias + c0) : _mm512_setzero_ps();
  const __m512 b1 = s.bias ? _mm512_maskz_loadu_ps(m.hi, s.bias + c0 + 16) : _mm512_setzero_ps();
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = b0, acc[r][1] = b1;
  block_product<MR>(s.a + row0 * s.lda, s.lda, 1, s.packed + p * s.K * kPanel, kPanel, s.K, {0xFFFF, 0xFFFF}, acc);
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(s.c + (row0 + r) * s.N + c0, m.lo, acc[r][0]);
    _mm512_mask_storeu_ps(s.c + (row0 + r) * s.N + c0 + 16, m.hi, acc[r][1]);
  }
}

__attribute__((target("avx512f"))) void product_blocks(const ProductArgs& s, int64_t i0, int64_t i1) {
  const Blocks blocks(s.M, s.N);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t p = blocks.panel(i), row0 = blocks.row0(i);
#define PRODUCT_BLOCK(MR) product_block<MR>(s, row0, p)
    MMOPS_WITH_ROWS(std::min<int64_t>(kMaxRows, s.M - row0), PRODUCT_BLOCK)
#undef PRODUCT_BLOCK
  }
}

}  // namespace

void rnn_weight_grad(const RowSegment* segments, int num_segments, int64_t M, int64_t N, float* C, int num_threads) {
  const Blocks blocks(M, N);
  int64_t macs = 0;
  for (int s = 0; s < num_segments; ++s) macs += segments[s].rows * M * N;
#pragma omp parallel num_threads(team_size(blocks.count, macs, num_threads))
  {
    const Share sh = my_share(blocks.count);
    bool first = true;
    for (int s = 0; s < num_segments; ++s)
      for (int64_t r0 = 0; r0 < segments[s].rows; r0 += kRowChunk) {
        weight_grad_blocks(segments[s], r0, std::min(segments[s].rows, r0 + kRowChunk), M, N, C, first, sh.i0,
                           sh.i1);
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

void rnn_packed_product(const float* a, int64_t M, int64_t K, int64_t lda, const float* packed, int64_t N,
                        const float* bias, float* c, int num_threads) {
  const Blocks blocks(M, N);
  const ProductArgs s{a, lda, M, K, packed, N, bias, c};
#pragma omp parallel num_threads(team_size(blocks.count, M * K * N, num_threads))
  {
    const Share sh = my_share(blocks.count);
    product_blocks(s, sh.i0, sh.i1);
  }
}

bool rnn_recurrence_available() {
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
}

void rnn_recurrence_forward(float* out, const float* h0, const float* packed, int64_t T, int64_t B, int64_t H,
                            int64_t act, int num_threads) {
  const int64_t BH = B * H;
#pragma omp parallel num_threads(team_size(Blocks(B, H).count, B * H * H, num_threads))
  {
    const Share sh = my_share(Blocks(B, H).count);
    for (int64_t t = 0; t < T; ++t) {
      const StepArgs s{t == 0 ? h0 : out + (t - 1) * BH, out + t * BH, nullptr, nullptr, packed, B, H};
      step_blocks<Epilogue::kForward>(act, s, sh.i0, sh.i1);
#pragma omp barrier
    }
  }
}

void rnn_recurrence_backward(float* dpre, const float* dout, const float* h, const float* packed, float* dhx,
                             int64_t T, int64_t B, int64_t H, int64_t act, int num_threads) {
  const int64_t BH = B * H;
#pragma omp parallel num_threads(team_size(Blocks(B, H).count, B * H * H, num_threads))
  {
    const Share sh = my_share(Blocks(B, H).count);
    for (int64_t t = T - 1; t >= 0; --t) {
      const StepArgs s{t == T - 1 ? nullptr : dpre + (t + 1) * BH, dpre + t * BH, dout + t * BH, h + t * BH, packed,
                       B, H};
      step_blocks<Epilogue::kBackward>(act, s, sh.i0, sh.i1);
#pragma omp barrier
    }
    if (dhx) step_blocks<Epilogue::kStore>(act, StepArgs{dpre, dhx, nullptr, nullptr, packed, B, H}, sh.i0, sh.i1);
  }
}

#else  // no AVX-512 kernel in this build: rnn.cpp keeps its matmul-per-step loop

bool rnn_recurrence_available() { return false; }
void rnn_recurrence_forward(float*, const float*, const float*, int64_t, int64_t, int64_t, int64_t, int) {}
void rnn_recurrence_backward(float*, const float*, const float*, const float*, float*, int64_t, int64_t, int64_t,
                             int64_t, int) {}
void rnn_weight_grad(const RowSegment*, int, int64_t, int64_t, float*, int) {}
void rnn_packed_product(const float*, int64_t, int64_t, int64_t, const float*, int64_t, const float*, float*, int) {}

#endif

}  // namespace mmops::cpu
