// The cross-entropy forward's row kernels' operands (CEArgs), and its AVX-512 kernel for short rows (C <= 32), in a
// header with no torch in it, so that bench/loops/ce_short_rows.cpp can time and check the kernel as built. The
// math is at the top of cross_entropy.cpp, the only file of the extension that includes this one.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/simd.h"

namespace mmops::cpu {

// One forward call's operands, in the names of the math in cross_entropy.cpp.
template <typename T>
struct CEArgs {
  const T* x = nullptr;        // (N, C) logits, contiguous
  int64_t C = 0;
  const int64_t* y = nullptr;  // (N,) class indices, or
  const T* t = nullptr;        // (N, C) class probabilities
  const T* w = nullptr;        // (C,) class weights or nullptr
  T weight_sum = 0;            // W = sum of w (C when w is absent)
  int64_t ignore_index = -100;
  T smoothing = 0;             // e
  T grad_scale = 1;            // r = 1/D for "mean", else 1
  T* grad = nullptr;           // (N, C) gradient out (may alias x: inplace_backward), or nullptr
  T* loss_rows = nullptr;      // (N,) per-row loss for reduction "none", or nullptr
};

#ifdef MMOPS_X86
// Short rows on AVX-512 (C <= 32: makemore's 27 characters), for the plain case (class-index targets, no
// weight, no smoothing; the others take the generic blocks). A whole row sits in one or two zmm registers
// filled by masked loads, so max, exp, sum and the gradient store take a handful of instructions and no
// scalar remainder loop. Lanes past C load as -inf (they never win the max) and are zeroed after the exp
// with maskz; nothing outside the row is read or written (masked lanes do not fault).
//
// A row is one long chain of dependent instructions (max across lanes, exp, sum across lanes, the division
// r / s, the scaled store), about 110 instructions and 150 cycles from load to store, which the out-of-order
// window overlapped with little of the next row's. So kShortRowStep rows go through each stage together, their
// instructions interleaved: the same instructions in another order, so the same bits. One thread, (4096, 27),
// bench/loops/ce_short_rows.cpp, AMD EPYC Zen 4: a row at a time 76-89 us, 2 rows 65-69, 3 rows 77, 4 rows
// 57-68, 8 rows 69 (medians; 4 rows: no zmm spilled). Every CPU runs the same instructions either way, and
// interleaving only shortens the distance between independent ones, so the step can't cost on another core.
//
// Rows go in groups of 16: the per-row work (no call inside) first, then the losses, whose log is a libm
// call: a call clobbers every zmm register, so none may sit between a row's exp and its gradient store.
// For "mean"/"sum" the 16 rows share one log: sum_r log(s_r) = log(prod_r s_r), and with 1 <= s_r <= 32
// (exp(0) = 1 at the max) the product stays below 2^80 in double; a NaN s propagates through it.
constexpr int kShortRowGroup = 16, kShortRowStep = 4;

// GCC 12 warns that the reduce intrinsics' internal __Y "may be used uninitialized" once they work on array
// elements; each is assigned before use (the K-row arrays below are filled in full by the first loop).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// A group's losses from its rows' s and m - x_y: "none" writes log(s) + (m - x_y) per row; "mean"/"sum" add the
// gaps and one log of the product of the sums (above). Returns the group's total.
MMOPS_INLINE double ce_short_group_losses(const CEArgs<float>& a, int64_t i0, int rows, const float* row_sum,
                                          const float* gap) {
  double total = 0;
  if (a.loss_rows) {
    for (int r = 0; r < rows; ++r) {
      const float loss = std::log(row_sum[r]) + gap[r];
      a.loss_rows[i0 + r] = loss;
      total += loss;
    }
  } else {
    double prod = 1;
    for (int r = 0; r < rows; ++r) {
      total += gap[r];
      prod *= row_sum[r];
    }
    total += std::log(prod);
  }
  return total;
}

// Rows [i, i + K), none of them ignored: s and m - x_y of each into row_sum and gap, and the gradient rows. Every
// row's logits are read before any gradient is stored (the gradient may be the logits: inplace_backward).
template <bool kTwoVectors, int K>
MMOPS_AVX512 void ce_short_rows_step(const CEArgs<float>& a, int64_t i, __mmask16 k0, __mmask16 k1, float* row_sum,
                                     float* gap) {
  const int64_t C = a.C;
  const __m512 neg_inf = _mm512_set1_ps(-__builtin_inff()), grad_scale = _mm512_set1_ps(a.grad_scale);
  __m512 x0[K], x1[K], e0[K], e1[K];
  float m[K], s[K], x_y[K];
  int64_t y[K];
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) {
    const float* x = a.x + (i + k) * C;
    y[k] = a.y[i + k];
    x_y[k] = x[y[k]];
    x0[k] = _mm512_mask_loadu_ps(neg_inf, k0, x);
    x1[k] = kTwoVectors ? _mm512_mask_loadu_ps(neg_inf, k1, x + 16) : neg_inf;
  }
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) m[k] = _mm512_reduce_max_ps(kTwoVectors ? _mm512_max_ps(x0[k], x1[k]) : x0[k]);
  // Padded lanes hold -inf - m = -inf: simd::exp clamps them to exp(-87) (a normal number) and selects 0 through a
  // compare, so no lane ever holds a subnormal; maskz makes them 0 even when m is -inf or NaN.
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) {
    const __m512 vm = _mm512_set1_ps(m[k]);
    e0[k] = _mm512_maskz_mov_ps(k0, simd::exp(_mm512_sub_ps(x0[k], vm)));
    e1[k] = kTwoVectors ? _mm512_maskz_mov_ps(k1, simd::exp(_mm512_sub_ps(x1[k], vm))) : _mm512_setzero_ps();
  }
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) {
    s[k] = _mm512_reduce_add_ps(kTwoVectors ? _mm512_add_ps(e0[k], e1[k]) : e0[k]);
    row_sum[k] = s[k];
    gap[k] = m[k] - x_y[k];
  }
  if (!a.grad) return;
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) {  // r (e / s - onehot(y)): the one-hot subtraction in the register
    float* g = a.grad + (i + k) * C;
    const __m512 coef = _mm512_set1_ps(a.grad_scale / s[k]);
    const __mmask16 hot0 = y[k] < 16 ? __mmask16(1u << y[k]) : __mmask16(0);
    const __m512 p0 = _mm512_mul_ps(e0[k], coef);
    _mm512_mask_storeu_ps(g, k0, _mm512_mask_sub_ps(p0, hot0, p0, grad_scale));
    if (kTwoVectors) {
      const __mmask16 hot1 = y[k] >= 16 ? __mmask16(1u << (y[k] - 16)) : __mmask16(0);
      const __m512 p1 = _mm512_mul_ps(e1[k], coef);
      _mm512_mask_storeu_ps(g + 16, k1, _mm512_mask_sub_ps(p1, hot1, p1, grad_scale));
    }
  }
}

template <bool kTwoVectors>
MMOPS_AVX512 double ce_short_rows_avx512(const CEArgs<float>& a, int64_t begin, int64_t end) {
  const int64_t C = a.C;
  const __mmask16 k0 = C >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << C) - 1);
  const __mmask16 k1 = C > 16 ? __mmask16((1u << (C - 16)) - 1) : __mmask16(0);
  float row_sum[kShortRowGroup], gap[kShortRowGroup];  // s and m - x_y per row of the group
  double total = 0;
  for (int64_t i0 = begin; i0 < end; i0 += kShortRowGroup) {
    const int rows = static_cast<int>(std::min<int64_t>(kShortRowGroup, end - i0));
    for (int r = 0; r < rows;) {
      bool step = r + kShortRowStep <= rows;
      for (int k = 0; step && k < kShortRowStep; ++k) step = a.y[i0 + r + k] != a.ignore_index;
      if (step) {
        ce_short_rows_step<kTwoVectors, kShortRowStep>(a, i0 + r, k0, k1, row_sum + r, gap + r);
        r += kShortRowStep;
      } else if (a.y[i0 + r] != a.ignore_index) {  // the group's last rows, or a step with an ignored row
        ce_short_rows_step<kTwoVectors, 1>(a, i0 + r, k0, k1, row_sum + r, gap + r);
        ++r;
      } else {  // loss log(1) + 0 = 0, gradient row 0
        row_sum[r] = 1.0f;
        gap[r] = 0.0f;
        if (float* g = a.grad ? a.grad + (i0 + r) * C : nullptr) {
          _mm512_mask_storeu_ps(g, k0, _mm512_setzero_ps());
          if (kTwoVectors) _mm512_mask_storeu_ps(g + 16, k1, _mm512_setzero_ps());
        }
        ++r;
      }
    }
    total += ce_short_group_losses(a, i0, rows, row_sum, gap);
  }
  return total;
}

inline MMOPS_AVX512_TARGET double ce_short_rows_avx512(const CEArgs<float>& a, int64_t begin, int64_t end) {
  return a.C > 16 ? ce_short_rows_avx512<true>(a, begin, end) : ce_short_rows_avx512<false>(a, begin, end);
}
#pragma GCC diagnostic pop
#endif

}  // namespace mmops::cpu
