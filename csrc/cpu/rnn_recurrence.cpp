// The float32 recurrence of mmops.rnn on AVX-512: every step's (B, H) x (H, H) product and its epilogue in one
// kernel, the whole loop over time inside one OpenMP region. The math is the file header of rnn.cpp; the
// activation and its derivative are simd::activate / simd::act_grad, the same as in every other path.
//
// Why a kernel of its own rather than a library product per step: a step is a small product (at B32 H256,
// 2M multiply-adds) for which a library call, a separate elementwise pass and a fork/join cost as much as the
// arithmetic (measurements in bench/results/rnn.md). Here:
//   * W_hh is packed once per call into panels of 32 output columns (pack_panels), so the inner loop reads it
//     with two contiguous loads per k;
//   * the micro-kernel (gemm_avx512_kernel.h) computes an MR x 32 block, the rows of A read straight from
//     h_{t-1} (forward) or dpre_{t+1} (backward);
//   * the epilogue runs on the accumulators before they leave registers: forward h = act(acc + proj_t) with
//     proj_t read from (and h written to) out[t]; backward g = act_grad(acc + dout_t, h_t);
//   * the threads split the (panel, row tile) blocks panel-major, so each keeps its panels of W_hh in its own
//     L1/L2 for all T steps; one barrier per step publishes h_t (or dpre_t) to the other threads.
#include "cpu/rnn_recurrence.h"

#include "cpu/gemm_avx512_kernel.h"
#include "cpu/simd.h"

namespace mmops::cpu {

#ifdef MMOPS_X86
namespace {
using namespace avx512;

// Forward epilogue, row r of the block: y = act(acc + y), y = out[t] at (row, c0).
template <int kAct>
MMOPS_AVX512 void forward_row(float* y, __m512 acc0, __m512 acc1, ColumnMask m) {
  const __m512 v0 = simd::activate<kAct>(_mm512_add_ps(acc0, _mm512_maskz_loadu_ps(m.lo, y)));
  const __m512 v1 = simd::activate<kAct>(_mm512_add_ps(acc1, _mm512_maskz_loadu_ps(m.hi, y + 16)));
  _mm512_mask_storeu_ps(y, m.lo, v0);
  _mm512_mask_storeu_ps(y + 16, m.hi, v1);
}

// Backward epilogue, 16 lanes: act_grad(acc + dout, h).
template <int kAct>
MMOPS_AVX512 __m512 grad_lanes(__m512 acc, __mmask16 m, const float* dout, const float* h) {
  return simd::act_grad<kAct>(_mm512_add_ps(acc, _mm512_maskz_loadu_ps(m, dout)), _mm512_maskz_loadu_ps(m, h));
}

enum class Epilogue { kForward, kBackward, kStore };

struct StepArgs {
  const float* a;     // A: (B, H), the previous step's h (forward) or dpre (backward); null: A = 0
  float* y;           // (B, H): forward out[t] (proj in, h out); backward dpre[t]; store: the product
  const float* dout;  // backward: dout[t]
  const float* h;     // backward: h[t]
  const float* packed;
  int64_t B, H;
};

template <Epilogue kEp, int kAct, int MR>
MMOPS_AVX512 void step_block(const StepArgs& s, int64_t row0, int64_t p) {
  __m512 acc[MR][2];
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  // the packed panel is zero past H: its loads need no mask
  if (s.a) block_product<MR>(s.a + row0 * s.H, s.H, 1, s.packed + p * s.H * kPanel, kPanel, s.H, kFullPanel, acc);
  const int64_t c0 = p * kPanel;
  const ColumnMask m = column_mask(std::min<int64_t>(kPanel, s.H - c0));
  #pragma GCC unroll 8
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
MMOPS_AVX512_TARGET void step_blocks(const StepArgs& s, int64_t i0, int64_t i1) {
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
  simd::with_activation(act, [&](auto a) MMOPS_INLINE_LAMBDA { step_blocks<kEp, decltype(a)::value>(s, i0, i1); });
}

}  // namespace

void rnn_recurrence_forward(float* out, const float* h0, const float* packed_w_hh_t, int64_t T, int64_t B,
                            int64_t H, int64_t act, int num_threads) {
  const int64_t BH = B * H;
  const Blocks blocks(B, H);
#pragma omp parallel num_threads(team_size(blocks.count, B * H * H, num_threads))
  {
    const Share sh = my_share(blocks.count);
    for (int64_t t = 0; t < T; ++t) {
      const StepArgs s{t == 0 ? h0 : out + (t - 1) * BH, out + t * BH, nullptr, nullptr, packed_w_hh_t, B, H};
      step_blocks<Epilogue::kForward>(act, s, sh.i0, sh.i1);
#pragma omp barrier
    }
  }
}

void rnn_recurrence_backward(float* dpre, const float* dout, const float* h, const float* packed_w_hh, float* dhx,
                             int64_t T, int64_t B, int64_t H, int64_t act, int num_threads) {
  const int64_t BH = B * H;
  const Blocks blocks(B, H);
#pragma omp parallel num_threads(team_size(blocks.count, B * H * H, num_threads))
  {
    const Share sh = my_share(blocks.count);
    for (int64_t t = T - 1; t >= 0; --t) {
      const StepArgs s{t == T - 1 ? nullptr : dpre + (t + 1) * BH, dpre + t * BH, dout + t * BH, h + t * BH,
                       packed_w_hh, B, H};
      step_blocks<Epilogue::kBackward>(act, s, sh.i0, sh.i1);
#pragma omp barrier
    }
    if (dhx) {
      const StepArgs s{dpre, dhx, nullptr, nullptr, packed_w_hh, B, H};
      step_blocks<Epilogue::kStore>(act, s, sh.i0, sh.i1);
    }
  }
}

#else  // no AVX-512 code in this build: callers check simd::cpu_has_avx512(), which is false here

void rnn_recurrence_forward(float*, const float*, const float*, int64_t, int64_t, int64_t, int64_t, int) {}
void rnn_recurrence_backward(float*, const float*, const float*, const float*, float*, int64_t, int64_t, int64_t,
                             int64_t, int) {}

#endif

}  // namespace mmops::cpu
