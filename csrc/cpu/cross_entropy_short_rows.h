// The cross-entropy forward's row kernels' operands (CEArgs), and its kernels for short rows (C <= 32): AVX-512, and
// AVX2 for CPUs without it. A header with no torch in it, so that bench/loops/ce_short_rows.cpp and
// ce_short_rows_avx2.cpp can time and check the kernels as built. The math is at the top of cross_entropy.cpp, the
// only file of the extension that includes this one.
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

// The max (kMax) or the sum of a row's kVectors registers, in every lane: the registers combined, then the halves,
// the pairs and the neighbours.
template <bool kMax>
MMOPS_AVX2 __m256 combine(__m256 a, __m256 b) {  // (a lambda would not inherit the target: no intrinsics in it)
  return kMax ? _mm256_max_ps(a, b) : _mm256_add_ps(a, b);
}
template <bool kMax, int kVectors>
MMOPS_AVX2 __m256 across_row(const __m256* v) {
  __m256 r = v[0];
#pragma GCC unroll 4
  for (int i = 1; i < kVectors; ++i) r = combine<kMax>(r, v[i]);
  r = combine<kMax>(r, _mm256_permute2f128_ps(r, r, 1));
  r = combine<kMax>(r, _mm256_permute_ps(r, 0x4E));
  return combine<kMax>(r, _mm256_permute_ps(r, 0xB1));
}

// Short rows on AVX2 (C <= 32 on a CPU without AVX-512: AMD Zen 1-3, Intel's client cores since Alder Lake), the
// same plan as the AVX-512 kernel above on 8-lane registers: a row sits in kVectors = ceil(C / 8) ymm registers, and
// kRows rows go through each stage together. Before it, these rows took the generic blocks of cross_entropy.cpp,
// whose per-row loops over 27 values spend most of their time in scalar remainders. Measured on an AMD EPYC Zen 3
// (2.45 GHz, no AVX-512), (4096, 27), both paths in one build behind a temporary switch, interleaved, medians:
// cross_entropy_forward 1 thread 237 -> 122 us, 2 threads 141 -> 81 us; mmops.cross_entropy forward + backward
// 2 threads 251 -> 203 us (F.cross_entropy 443 us); at (32768, 27) 1488 -> 929 us (3383 us). The kernel alone, 1
// thread (bench/loops/ce_short_rows_avx2.cpp): a row at a time 149-185 us, 2 rows 118-147, 3 rows 110, 4 rows
// 102-128 (the 4-row step spills some ymm registers at C > 24 and is still the fastest). What differs from the
// AVX-512 kernel:
//   * Only a row's last vector has lanes past C. It is loaded with vmaskmovps (masked lanes read nothing) and
//     blended with -inf; after the exp an AND with the lane mask makes those lanes 0. The last row of each range
//     goes through copies (ce_short_row_through_copies), so no masked lane ever lies past the tensor. simd::exp
//     clamps those lanes at e^-87 (a normal number) before the AND, so no lane past C ever holds a subnormal (which
//     would cost an Intel core a microcode assist; the row's own values can be tiny, as in every path).
//   * The max and the sum across a row's lanes stay in registers (swap the halves, then pairs, then neighbours):
//     every lane ends up holding the row's sum, and its max (or, in a row with a NaN, a value that makes the row's
//     sum NaN all the same), so 1/s is one vdivps and no value leaves for a scalar register until the losses.
//   * The gradient r e / s - r [j == y] contracts to one vfmsub231ps in the target's lane, so that lane can differ by
//     an ulp from the AVX-512 and generic paths; nothing is bitwise shared between the kernels of different ISAs.
//   * A row's last vector is stored whole unless it is the step's last row: its lanes past C (fewer than 8, and
//     fewer than C when C > 8) land on the first elements of the next row of the step, whose own first store comes
//     later and overwrites them (every row of the step was read before the first store, so in place that is safe
//     too). The step's last row stores it with vmaskmovps: the next row may be another thread's or not have been read
//     yet. With C <= 8 a store could reach past the step's rows: every row masked.
template <int kVectors, int kRows>
MMOPS_AVX2 void ce_short_rows_step_avx2(const CEArgs<float>& a, int64_t i, __m256i tail, float* row_sum, float* gap) {
  constexpr int kLast = kVectors - 1;  // the vector with the lanes past C
  const int64_t C = a.C;
  const __m256 neg_inf = _mm256_set1_ps(-__builtin_inff()), tail_lanes = _mm256_castsi256_ps(tail);
  __m256 x[kRows][kVectors], e[kRows][kVectors], vm[kRows], vs[kRows];
  float x_y[kRows];
  int64_t y[kRows];
#pragma GCC unroll 8
  for (int k = 0; k < kRows; ++k) {
    const float* row = a.x + (i + k) * C;
    y[k] = a.y[i + k];
    x_y[k] = row[y[k]];
#pragma GCC unroll 4
    for (int v = 0; v < kLast; ++v) x[k][v] = _mm256_loadu_ps(row + 8 * v);
    x[k][kLast] = _mm256_blendv_ps(neg_inf, _mm256_maskload_ps(row + 8 * kLast, tail), tail_lanes);
  }
#pragma GCC unroll 8
  for (int k = 0; k < kRows; ++k) vm[k] = across_row<true, kVectors>(x[k]);  // the row's max in every lane
#pragma GCC unroll 8
  for (int k = 0; k < kRows; ++k) {
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v) e[k][v] = simd::exp(_mm256_sub_ps(x[k][v], vm[k]));
    e[k][kLast] = _mm256_and_ps(e[k][kLast], tail_lanes);
  }
#pragma GCC unroll 8
  for (int k = 0; k < kRows; ++k) {
    vs[k] = across_row<false, kVectors>(e[k]);  // the row's sum in every lane
    row_sum[k] = _mm256_cvtss_f32(vs[k]);
    gap[k] = _mm256_cvtss_f32(vm[k]) - x_y[k];
  }
  if (!a.grad) return;
  const __m256 grad_scale = _mm256_set1_ps(a.grad_scale);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
#pragma GCC unroll 8
  for (int k = 0; k < kRows; ++k) {  // r (e / s - onehot(y)): the one-hot subtraction in the register
    float* g = a.grad + (i + k) * C;
    const __m256 coef = _mm256_div_ps(grad_scale, vs[k]);
    const __m256i yk = _mm256_set1_epi32(static_cast<int>(y[k]));
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v) {
      const __m256 hot = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_add_epi32(lane, _mm256_set1_epi32(8 * v)), yk));
      const __m256 p = _mm256_sub_ps(_mm256_mul_ps(e[k][v], coef), _mm256_and_ps(hot, grad_scale));
      if (v < kLast || (kVectors > 1 && k < kRows - 1)) _mm256_storeu_ps(g + 8 * v, p);
      else _mm256_maskstore_ps(g + 8 * v, tail, p);
    }
  }
}

// Row i, the last of a range, through copies: its masked lanes would lie past the row, and the row may end the tensor
// at a page boundary. Intel documents that masked vmaskmovps lanes never fault; AMD's manual leaves it to the
// implementation (none faulted on a Zen 3 with an unmapped page after the tensor), so the one row per range where it
// could matter reads and writes 32-float copies instead. An ignored row's gradient is zeros.
template <int kVectors>
MMOPS_AVX2 void ce_short_row_through_copies(const CEArgs<float>& a, int64_t i, __m256i tail, float* row_sum,
                                            float* gap) {
  const int64_t C = a.C;
  if (a.y[i] == a.ignore_index) {  // loss log(1) + 0 = 0, gradient row 0
    *row_sum = 1.0f;
    *gap = 0.0f;
    for (int64_t j = 0; a.grad && j < C; ++j) a.grad[i * C + j] = 0.0f;
    return;
  }
  alignas(32) float x[32], g[32];
  for (int64_t j = 0; j < C; ++j) x[j] = a.x[i * C + j];
  CEArgs<float> row = a;
  row.x = x;
  row.y = a.y + i;
  row.grad = a.grad ? g : nullptr;
  ce_short_rows_step_avx2<kVectors, 1>(row, 0, tail, row_sum, gap);
  for (int64_t j = 0; a.grad && j < C; ++j) a.grad[i * C + j] = g[j];
}

template <int kVectors, int kRows>
MMOPS_AVX2 double ce_short_rows_avx2(const CEArgs<float>& a, int64_t begin, int64_t end) {
  const int64_t C = a.C;
  const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(C - 8 * (kVectors - 1))),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  float row_sum[kShortRowGroup], gap[kShortRowGroup];  // s and m - x_y per row of the group
  double total = 0;
  for (int64_t i0 = begin; i0 < end; i0 += kShortRowGroup) {
    const int rows = static_cast<int>(std::min<int64_t>(kShortRowGroup, end - i0));
    const int direct = i0 + rows == end ? rows - 1 : rows;  // the range's last row goes through copies
    for (int r = 0; r < direct;) {
      bool step = r + kRows <= direct;
      for (int k = 0; step && k < kRows; ++k) step = a.y[i0 + r + k] != a.ignore_index;
      if (step) {
        ce_short_rows_step_avx2<kVectors, kRows>(a, i0 + r, tail, row_sum + r, gap + r);
        r += kRows;
      } else if (a.y[i0 + r] != a.ignore_index) {  // the group's last rows, or a step with an ignored row
        ce_short_rows_step_avx2<kVectors, 1>(a, i0 + r, tail, row_sum + r, gap + r);
        ++r;
      } else {  // loss log(1) + 0 = 0, gradient row 0
        row_sum[r] = 1.0f;
        gap[r] = 0.0f;
        if (float* g = a.grad ? a.grad + (i0 + r) * C : nullptr) {
          for (int v = 0; v < kVectors - 1; ++v) _mm256_storeu_ps(g + 8 * v, _mm256_setzero_ps());
          _mm256_maskstore_ps(g + 8 * (kVectors - 1), tail, _mm256_setzero_ps());
        }
        ++r;
      }
    }
    if (direct < rows) ce_short_row_through_copies<kVectors>(a, end - 1, tail, row_sum + direct, gap + direct);
    total += ce_short_group_losses(a, i0, rows, row_sum, gap);
  }
  return total;
}

#ifndef MMOPS_CE_AVX2_ROWS
#define MMOPS_CE_AVX2_ROWS 4
#endif
inline MMOPS_AVX2_TARGET double ce_short_rows_avx2(const CEArgs<float>& a, int64_t begin, int64_t end) {
  switch ((a.C + 7) / 8) {
    case 1: return ce_short_rows_avx2<1, MMOPS_CE_AVX2_ROWS>(a, begin, end);
    case 2: return ce_short_rows_avx2<2, MMOPS_CE_AVX2_ROWS>(a, begin, end);
    case 3: return ce_short_rows_avx2<3, MMOPS_CE_AVX2_ROWS>(a, begin, end);
    default: return ce_short_rows_avx2<4, MMOPS_CE_AVX2_ROWS>(a, begin, end);
  }
}
#endif

}  // namespace mmops::cpu
