// The float32 recurrence of mmops.rnn on AVX-512 or AVX2: every step's (B, H) x (H, H) product and its epilogue in
// one kernel, the whole loop over time inside one OpenMP region. The math is the file header of rnn.cpp; the
// activation and its derivative are simd::activate / simd::act_grad, the same as in every other path.
//
// Why a kernel of its own rather than a library product per step: a step is a small product (at B32 H256,
// 2M multiply-adds) for which a library call, a separate elementwise pass and a fork/join cost as much as the
// arithmetic (measurements in bench/results/rnn.md). Here:
//   * W_hh is packed once per call into panels of kPanel output columns (pack_panels: 32 on AVX-512, 16 on AVX2),
//     so the inner loop reads it with two contiguous loads per k;
//   * the micro-kernel (gemm_kernel.h) computes a block of up to kMaxRows x kPanel, the rows of A read straight
//     from h_{t-1} (forward) or dpre_{t+1} (backward);
//   * the epilogue runs on the accumulators before they leave registers: forward h = act(acc + proj_t) with
//     proj_t read from (and h written to) out[t]; backward g = act_grad(acc + dout_t, h_t);
//   * the threads split the (panel, row tile) blocks panel-major, so each keeps its panels of W_hh in its own
//     L1/L2 for all T steps; one barrier per step publishes h_t (or dpre_t) to the other threads.
#include "cpu/rnn_recurrence.h"

#include "cpu/gemm_kernel.h"
#include "cpu/simd.h"

namespace mmops::cpu {

#ifdef MMOPS_X86
namespace {
using namespace gemm;

// Forward epilogue, row r of the block: y = act(acc + y), y = out[t] at (row, c0).
template <class Isa, int kAct>
inline void forward_row(float* y, const typename Isa::V& acc0, const typename Isa::V& acc1, const ColumnMask<Isa>& m) {
  const typename Isa::V v0 = simd::activate<kAct>(acc0 + Isa::load(y, m.lo));
  const typename Isa::V v1 = simd::activate<kAct>(acc1 + Isa::load(y + Isa::kWidth, m.hi));
  Isa::store(y, m.lo, v0);
  Isa::store(y + Isa::kWidth, m.hi, v1);
}

// The forward epilogue in two parts, for an ISA with few registers: the block is stored as y = acc + y (in the
// step_block below), then this pass applies the activation to the block in L1, from a function that is not inlined.
// Inlined, tanh's dozen constants are hoisted out of the loop over blocks and take the registers the accumulators
// need: on AVX2 (16 ymm, 12 of them accumulators) GCC then kept two accumulators on the stack through the whole
// product (a load and a store per FMA), and the forward recurrence at T64 B128 H512 ran at 65 against 97 GFLOP/s
// for MKL per step (AMD EPYC Zen 3, 2 threads). AVX-512's 32 registers hold both.
template <class Isa, int kAct>
inline void activate_rows(float* y, int64_t H, int rows, const ColumnMask<Isa>& m) {
  for (int r = 0; r < rows; ++r) {
    float* yr = y + r * H;
    Isa::store(yr, m.lo, simd::activate<kAct>(Isa::load(yr, m.lo)));
    Isa::store(yr + Isa::kWidth, m.hi, simd::activate<kAct>(Isa::load(yr + Isa::kWidth, m.hi)));
  }
}
template <int kAct>
MMOPS_OUT_OF_LINE_AVX512 void activate_rows_on(Avx512, float* y, int64_t H, int rows, const ColumnMask<Avx512>& m) {
  activate_rows<Avx512, kAct>(y, H, rows, m);
}
template <int kAct>
MMOPS_OUT_OF_LINE_AVX2 void activate_rows_on(Avx2, float* y, int64_t H, int rows, const ColumnMask<Avx2>& m) {
  activate_rows<Avx2, kAct>(y, H, rows, m);
}

// Backward epilogue, one vector: act_grad(acc + dout, h).
template <class Isa, int kAct>
inline typename Isa::V grad_lanes(const typename Isa::V& acc, typename Isa::Mask m, const float* dout,
                                  const float* h) {
  return simd::act_grad<kAct>(acc + Isa::load(dout, m), Isa::load(h, m));
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

template <class Isa, Epilogue kEp, int kAct, int MR>
inline void step_block(const StepArgs& s, int64_t row0, int64_t p) {
  constexpr int64_t W = Isa::kWidth;
  typename Isa::V acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = Isa::zero();
  if (s.a) block_product<Isa, MR>(s.a + row0 * s.H, s.H, 1, s.packed + p * s.H * kPanel<Isa>, kPanel<Isa>, s.H, acc);
  const int64_t c0 = p * kPanel<Isa>;
  const ColumnMask<Isa> m = column_mask<Isa>(std::min<int64_t>(kPanel<Isa>, s.H - c0));
  constexpr bool kTwoPart = kEp == Epilogue::kForward && kAct == simd::kTanh && Isa::kLongEpilogueOutOfLine;
  if constexpr (kTwoPart) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      float* y = s.y + (row0 + r) * s.H + c0;
      Isa::store(y, m.lo, acc[r][0] + Isa::load(y, m.lo));
      Isa::store(y + W, m.hi, acc[r][1] + Isa::load(y + W, m.hi));
    }
    activate_rows_on<kAct>(Isa{}, s.y + row0 * s.H + c0, s.H, MR, m);
    return;
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const int64_t o = (row0 + r) * s.H + c0;
    if (kEp == Epilogue::kForward) {
      forward_row<Isa, kAct>(s.y + o, acc[r][0], acc[r][1], m);
    } else if (kEp == Epilogue::kBackward) {
      Isa::store(s.y + o, m.lo, grad_lanes<Isa, kAct>(acc[r][0], m.lo, s.dout + o, s.h + o));
      Isa::store(s.y + o + W, m.hi, grad_lanes<Isa, kAct>(acc[r][1], m.hi, s.dout + o + W, s.h + o + W));
    } else {
      Isa::store(s.y + o, m.lo, acc[r][0]);
      Isa::store(s.y + o + W, m.hi, acc[r][1]);
    }
  }
}

// One step's blocks [i0, i1) of this thread (Blocks(B, H) numbering).
template <class Isa, Epilogue kEp, int kAct>
inline void step_blocks(const StepArgs& s, int64_t i0, int64_t i1) {
  const Blocks<Isa> blocks(s.B, s.H);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t p = blocks.panel(i), row0 = blocks.row0(i);
#define STEP_BLOCK(MR) step_block<Isa, kEp, kAct, MR>(s, row0, p)
    MMOPS_WITH_ROWS(std::min<int64_t>(Isa::kMaxRows, s.B - row0), Isa::kMaxRows, STEP_BLOCK)
#undef STEP_BLOCK
  }
}

// The entry points of each ISA (gemm_kernel.h: target + flatten).
template <Epilogue kEp, int kAct>
MMOPS_FLATTEN_AVX512 void step_blocks_on(Avx512, const StepArgs& s, int64_t i0, int64_t i1) {
  step_blocks<Avx512, kEp, kAct>(s, i0, i1);
}
template <Epilogue kEp, int kAct>
MMOPS_FLATTEN_AVX2 void step_blocks_on(Avx2, const StepArgs& s, int64_t i0, int64_t i1) {
  step_blocks<Avx2, kEp, kAct>(s, i0, i1);
}

template <class Isa, Epilogue kEp>
void step_blocks(int64_t act, const StepArgs& s, int64_t i0, int64_t i1) {
  simd::with_activation(act, [&](auto a) { step_blocks_on<kEp, decltype(a)::value>(Isa{}, s, i0, i1); });
}

template <class Isa>
void recurrence_forward(float* out, const float* h0, const float* packed_w_hh_t, int64_t T, int64_t B, int64_t H,
                        int64_t act, int num_threads) {
  const int64_t BH = B * H;
  const Blocks<Isa> blocks(B, H);
#pragma omp parallel num_threads(team_size(blocks.count, B * H * H, num_threads))
  {
    const Share sh = my_share(blocks.count);
    for (int64_t t = 0; t < T; ++t) {
      const StepArgs s{t == 0 ? h0 : out + (t - 1) * BH, out + t * BH, nullptr, nullptr, packed_w_hh_t, B, H};
      step_blocks<Isa, Epilogue::kForward>(act, s, sh.i0, sh.i1);
#pragma omp barrier
    }
  }
}

template <class Isa>
void recurrence_backward(float* dpre, const float* dout, const float* h, const float* packed_w_hh, float* dhx,
                         int64_t T, int64_t B, int64_t H, int64_t act, int num_threads) {
  const int64_t BH = B * H;
  const Blocks<Isa> blocks(B, H);
#pragma omp parallel num_threads(team_size(blocks.count, B * H * H, num_threads))
  {
    const Share sh = my_share(blocks.count);
    for (int64_t t = T - 1; t >= 0; --t) {
      const StepArgs s{t == T - 1 ? nullptr : dpre + (t + 1) * BH, dpre + t * BH, dout + t * BH, h + t * BH,
                       packed_w_hh, B, H};
      step_blocks<Isa, Epilogue::kBackward>(act, s, sh.i0, sh.i1);
#pragma omp barrier
    }
    if (dhx) {
      const StepArgs s{dpre, dhx, nullptr, nullptr, packed_w_hh, B, H};
      step_blocks<Isa, Epilogue::kStore>(act, s, sh.i0, sh.i1);
    }
  }
}

}  // namespace

void rnn_recurrence_forward(KernelIsa isa, float* out, const float* h0, const float* packed_w_hh_t, int64_t T,
                            int64_t B, int64_t H, int64_t act, int num_threads) {
  if (isa == KernelIsa::kAvx512) recurrence_forward<Avx512>(out, h0, packed_w_hh_t, T, B, H, act, num_threads);
  else recurrence_forward<Avx2>(out, h0, packed_w_hh_t, T, B, H, act, num_threads);
}

void rnn_recurrence_backward(KernelIsa isa, float* dpre, const float* dout, const float* h, const float* packed_w_hh,
                             float* dhx, int64_t T, int64_t B, int64_t H, int64_t act, int num_threads) {
  if (isa == KernelIsa::kAvx512)
    recurrence_backward<Avx512>(dpre, dout, h, packed_w_hh, dhx, T, B, H, act, num_threads);
  else
    recurrence_backward<Avx2>(dpre, dout, h, packed_w_hh, dhx, T, B, H, act, num_threads);
}

#else  // no SIMD kernels in this build: kernel_isa() (gemm.h) is kNone, and callers do not call these

void rnn_recurrence_forward(KernelIsa, float*, const float*, const float*, int64_t, int64_t, int64_t, int64_t, int) {}
void rnn_recurrence_backward(KernelIsa, float*, const float*, const float*, const float*, float*, int64_t, int64_t,
                             int64_t, int64_t, int) {}

#endif

}  // namespace mmops::cpu
