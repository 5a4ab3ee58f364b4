// Fused cross-entropy (log-softmax + NLL) on the CPU: the forward, which also writes the gradient, and
// the backward, which only scales it.
//
// The math, for row i of logits x with C classes, m = max_c x_c, s = sum_c exp(x_c - m), p = exp(x - m) / s
// (lse = m + log s is never formed: it would be subtracted from a logit of the same size, and at 1e8 the
// log s would be lost to rounding; every loss below is a sum of log s and of gaps m - x_c >= 0):
//   class-index target y (weights w, 1 when absent; W = sum_c w_c; label smoothing e):
//     loss_i        = (1-e) w_y (log s + (m - x_y)) + e/C (W log s + sum_c w_c (m - x_c))   [0 if y is ignored]
//     dloss_i/dx_ij = ((1-e) w_y + e/C W) p_j - e/C w_j - (1-e) w_y [j == y]                 [0 if y is ignored]
//     (e = 0, w = 1: the notebook's one-liner  dlogits = softmax; dlogits[range(n), Y] -= 1; /= n)
//   probability target t (t' = (1-e) t + e/C, T = sum_c w_c t'_c):
//     loss_i        = T log s + sum_c w_c t'_c (m - x_c)
//     dloss_i/dx_ij = T p_j - w_j t'_j
//   reduction: "none" keeps loss_i; "sum" adds; "mean" divides by D = sum of w_y over the rows that are
//   not ignored (PyTorch's nll_loss rule; 0/0 = nan when all are) or by N for probability targets.
//   The forward writes G_ij = r dloss_i/dx_ij, r = 1/D for "mean", else 1 (the gradient of the loss it returns).
//   The backward, given grad_output g (a scalar for "mean"/"sum", one value per row for "none"):
//     dL/dx_ij = g_i G_ij   (g_i = g for a scalar), a copy scaled row by row, or in place for inplace_backward
//     (there a scalar g = 1 leaves G as it is).
//
// Why the gradient is written by the forward: the row is in L1 right after its softmax, so writing G costs
// one store and no second read of x. The backward is then free when grad_output == 1 (loss.backward()) and
// one multiply otherwise. The other design (save lse, recompute p in backward) reads x twice and computes
// exp twice; it is not implemented here, so the two have not been measured against each other.
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/cross_entropy_short_rows.h"
#include "cpu/output_cache.h"
#include "cpu/simd.h"
#include "op_args.h"

namespace mmops {
namespace {

using at::Tensor;

using cpu::CEArgs;

// Rows shorter than kBlockElements are processed in blocks of about kBlockElements values (so that a block
// of x and of the gradient stays in L1 between the passes): for short rows (C = 27) a per-row exp
// loop would spend most of its time in the scalar remainder of each row, so the block does
//   pass 1, per row: max m, x[y], work = x - m, and the sums of gaps (cheap short loops);
//   pass 2, flat:    work = exp(work) over the whole block at full vector width;
//   pass 3, per row: s = sum(work), the loss as log s + (m - x_y) (never lse = m + log s minus a logit: two
//                    large numbers would cancel), and the gradient from work in place.
// `work` is the gradient rows themselves (or a scratch block when no gradient is wanted), so when the
// gradient aliases x (inplace_backward) everything that reads x happens in pass 1, before it is overwritten.
constexpr int64_t kBlockElements = 2048;
constexpr int64_t kMaxBlockRows = 256;

// What pass 1 leaves for pass 3, per row of a block.
template <typename T>
struct IndexRowBlock {
  T m[kMaxBlockRows];
  T x_y[kMaxBlockRows];
  T smooth_gap[kMaxBlockRows];  // sum_c w_c (m - x_c), with smoothing
};
template <typename T>
struct ProbRowBlock {
  T m[kMaxBlockRows];
  T target_mass[kMaxBlockRows];  // T = sum_c w_c t'_c
  T target_gap[kMaxBlockRows];   // sum_c w_c t'_c (m - x_c)
};

MMOPS_INLINE int64_t block_rows(int64_t C) {
  return std::min<int64_t>(kMaxBlockRows, std::max<int64_t>(1, kBlockElements / C));
}

template <typename T>
MMOPS_INLINE void sub_store(const T* x, T* out, int64_t n, T m) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = x[j] - m;
}

template <typename T>
MMOPS_INLINE void exp_inplace(T* v, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) v[j] = simd::exp(v[j]);
}

// The loss and gradient of one row, written once for the block kernels and the long-row kernels below (the math
// and its names are at the top of this file). e_over_C = e / C, keep = 1 - e.

// Class-index target y: loss_i = (1-e) w_y (log s + (m - x_y)) + e/C (W log s + sum_c w_c (m - x_c)),
// gap_y = m - x_y, smooth_gap = sum_c w_c (m - x_c).
template <typename T, bool kSmooth>
MMOPS_INLINE T index_row_loss(const CEArgs<T>& a, T log_s, T gap_y, T w_y, T smooth_gap, T e_over_C) {
  const T loss = w_y * (log_s + gap_y);
  return kSmooth ? (1 - a.smoothing) * loss + e_over_C * (a.weight_sum * log_s + smooth_gap) : loss;
}

// Class-index target y: G_ij = r (((1-e) w_y + e/C W) p_j - e/C w_j - (1-e) w_y [j == y]), p_j = g_j / s, written
// over g_j = exp(x_j - m).
template <typename T, bool kWeight, bool kSmooth>
MMOPS_INLINE void index_row_grad(const CEArgs<T>& a, T* g, int64_t y, T s, T w_y, T e_over_C) {
  const T hot = kSmooth ? (1 - a.smoothing) * w_y : w_y;
  const T coef = a.grad_scale * (kSmooth ? hot + e_over_C * a.weight_sum : hot) / s;
  const T smooth_share = a.grad_scale * e_over_C;
#pragma omp simd
  for (int64_t j = 0; j < a.C; ++j)
    g[j] = g[j] * coef - (kSmooth ? (kWeight ? smooth_share * a.w[j] : smooth_share) : T(0));
  g[y] -= a.grad_scale * hot;
}

// Probability target t: w_j t'_j, t'_j = (1-e) t_j + e/C.
template <typename T, bool kWeight, bool kSmooth>
MMOPS_INLINE T weighted_target(const CEArgs<T>& a, const T* t, int64_t j, T keep, T e_over_C) {
  const T tj = kSmooth ? keep * t[j] + e_over_C : t[j];
  return kWeight ? tj * a.w[j] : tj;
}

// Probability target t: G_ij = r (T p_j - w_j t'_j), mass = T = sum_c w_c t'_c, written over g_j = exp(x_j - m).
template <typename T, bool kWeight, bool kSmooth>
MMOPS_INLINE void prob_row_grad(const CEArgs<T>& a, T* g, const T* t, T s, T mass, T keep, T e_over_C) {
  const T coef = a.grad_scale * mass / s;
#pragma omp simd
  for (int64_t j = 0; j < a.C; ++j)
    g[j] = g[j] * coef - a.grad_scale * weighted_target<T, kWeight, kSmooth>(a, t, j, keep, e_over_C);
}

// Rows [begin, end) with class-index targets. Returns the sum of their losses.
template <typename T, bool kWeight, bool kSmooth, bool kGrad>
MMOPS_INLINE double ce_index_rows(const CEArgs<T>& a, int64_t begin, int64_t end, T* scratch) {
  const int64_t C = a.C, R = block_rows(C);
  const T e_over_C = a.smoothing / static_cast<T>(C);
  IndexRowBlock<T> rb;
  double total = 0;
  for (int64_t i0 = begin; i0 < end; i0 += R) {
    const int64_t rows = std::min(R, end - i0);
    T* work = kGrad ? a.grad + i0 * C : scratch;
    for (int64_t r = 0; r < rows; ++r) {  // pass 1
      const int64_t y = a.y[i0 + r];
      const T* x = a.x + (i0 + r) * C;
      T* work_row = work + r * C;
      if (y == a.ignore_index) {
        for (int64_t j = 0; j < C; ++j) work_row[j] = -__builtin_inf();  // exp -> 0: an all-zero gradient row
        continue;
      }
      const T m = simd::row_max(x, C);
      rb.m[r] = m;
      rb.x_y[r] = x[y];
      sub_store(x, work_row, C, m);
      if (kSmooth) rb.smooth_gap[r] = -(kWeight ? simd::dot(a.w, work_row, C) : simd::sum(work_row, C));
    }
    exp_inplace(work, rows * C);  // pass 2
    for (int64_t r = 0; r < rows; ++r) {  // pass 3
      const int64_t i = i0 + r, y = a.y[i];
      T* g = work + r * C;
      if (y == a.ignore_index) {
        if (a.loss_rows) a.loss_rows[i] = 0;
        continue;
      }
      const T s = simd::sum(g, C);
      const T w_y = kWeight ? a.w[y] : T(1);
      const T loss = index_row_loss<T, kSmooth>(a, std::log(s), rb.m[r] - rb.x_y[r], w_y,
                                                kSmooth ? rb.smooth_gap[r] : T(0), e_over_C);
      total += loss;
      if (a.loss_rows) a.loss_rows[i] = loss;
      if (kGrad) index_row_grad<T, kWeight, kSmooth>(a, g, y, s, w_y, e_over_C);
    }
  }
  return total;
}

// Rows [begin, end) with probability targets (same three passes).
template <typename T, bool kWeight, bool kSmooth, bool kGrad>
MMOPS_INLINE double ce_prob_rows(const CEArgs<T>& a, int64_t begin, int64_t end, T* scratch) {
  const int64_t C = a.C, R = block_rows(C);
  const T keep = 1 - a.smoothing, e_over_C = a.smoothing / static_cast<T>(C);
  ProbRowBlock<T> rb;
  double total = 0;
  for (int64_t i0 = begin; i0 < end; i0 += R) {
    const int64_t rows = std::min(R, end - i0);
    T* work = kGrad ? a.grad + i0 * C : scratch;
    for (int64_t r = 0; r < rows; ++r) {  // pass 1
      const T* x = a.x + (i0 + r) * C;
      const T* t = a.t + (i0 + r) * C;
      const T m = simd::row_max(x, C);
      T* work_row = work + r * C;
      sub_store(x, work_row, C, m);
      T mass = 0, gap_sum = 0;  // sum_c w_c t'_c and sum_c w_c t'_c (m - x_c)
#pragma omp simd reduction(+ : mass, gap_sum)
      for (int64_t j = 0; j < C; ++j) {
        const T tj = weighted_target<T, kWeight, kSmooth>(a, t, j, keep, e_over_C);
        mass += tj;
        gap_sum -= tj * work_row[j];
      }
      rb.m[r] = m;
      rb.target_mass[r] = mass;
      rb.target_gap[r] = gap_sum;
    }
    exp_inplace(work, rows * C);  // pass 2
    for (int64_t r = 0; r < rows; ++r) {  // pass 3
      const int64_t i = i0 + r;
      T* g = work + r * C;
      const T* t = a.t + i * C;
      const T s = simd::sum(g, C);
      const T loss = rb.target_mass[r] * std::log(s) + rb.target_gap[r];
      total += loss;
      if (a.loss_rows) a.loss_rows[i] = loss;
      if (kGrad) prob_row_grad<T, kWeight, kSmooth>(a, g, t, s, rb.target_mass[r], keep, e_over_C);
    }
  }
  return total;
}

// Long rows (C >= kBlockElements): the row alone fills the vector loops, so no block is needed and the
// passes fuse: max; then exp(x - m) with its sum (and the smoothing or target sums) in one loop, writing
// the gradient row (nothing when no gradient is wanted); then the gradient scaled in place. Three passes
// over the row instead of five; x[y] and every sum that reads x come before the write that may overwrite it.
template <typename T, bool kWeight, bool kSmooth, bool kGrad>
MMOPS_INLINE double ce_index_long_rows(const CEArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t C = a.C;
  const T e_over_C = a.smoothing / static_cast<T>(C);
  double total = 0;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t y = a.y[i];
    const T* x = a.x + i * C;
    T* g = kGrad ? a.grad + i * C : nullptr;
    if (y == a.ignore_index) {
      if (kGrad) std::fill(g, g + C, T(0));
      if (a.loss_rows) a.loss_rows[i] = 0;
      continue;
    }
    const T m = simd::row_max(x, C);
    const T x_y = x[y];
    T s = 0, smooth_gap = 0;  // sum_c exp(x_c - m) and sum_c w_c (m - x_c)
#pragma omp simd reduction(+ : s, smooth_gap)
    for (int64_t j = 0; j < C; ++j) {
      const T d = x[j] - m;
      if (kSmooth) smooth_gap -= kWeight ? a.w[j] * d : d;
      const T e = simd::exp(d);
      if (kGrad) g[j] = e;
      s += e;
    }
    const T w_y = kWeight ? a.w[y] : T(1);
    const T loss = index_row_loss<T, kSmooth>(a, std::log(s), m - x_y, w_y, smooth_gap, e_over_C);
    total += loss;
    if (a.loss_rows) a.loss_rows[i] = loss;
    if (kGrad) index_row_grad<T, kWeight, kSmooth>(a, g, y, s, w_y, e_over_C);
  }
  return total;
}

template <typename T, bool kWeight, bool kSmooth, bool kGrad>
MMOPS_INLINE double ce_prob_long_rows(const CEArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t C = a.C;
  const T keep = 1 - a.smoothing, e_over_C = a.smoothing / static_cast<T>(C);
  double total = 0;
  for (int64_t i = begin; i < end; ++i) {
    const T* x = a.x + i * C;
    const T* t = a.t + i * C;
    T* g = kGrad ? a.grad + i * C : nullptr;
    const T m = simd::row_max(x, C);
    T s = 0, mass = 0, gap_sum = 0;  // sum exp(x - m), sum_c w_c t'_c, sum_c w_c t'_c (m - x_c)
#pragma omp simd reduction(+ : s, mass, gap_sum)
    for (int64_t j = 0; j < C; ++j) {
      const T d = x[j] - m;
      const T tj = weighted_target<T, kWeight, kSmooth>(a, t, j, keep, e_over_C);
      mass += tj;
      gap_sum -= tj * d;
      const T e = simd::exp(d);
      if (kGrad) g[j] = e;
      s += e;
    }
    const T loss = mass * std::log(s) + gap_sum;
    total += loss;
    if (a.loss_rows) a.loss_rows[i] = loss;
    if (kGrad) prob_row_grad<T, kWeight, kSmooth>(a, g, t, s, mass, keep, e_over_C);
  }
  return total;
}

#ifdef MMOPS_X86
using cpu::ce_short_rows_avx512;

// out[i, :] = g[i, :] * go[i * go_stride] with full vectors and one masked tail per row (no scalar loop).
MMOPS_AVX512_TARGET void scale_rows_avx512(const float* g, float* out, int64_t rows, int64_t C, const float* go,
                                           int64_t go_stride) {
  const int64_t full = C / 16 * 16;
  const __mmask16 tail = __mmask16((1u << (C - full)) - 1);
  for (int64_t i = 0; i < rows; ++i) {
    const __m512 scale = _mm512_set1_ps(go[i * go_stride]);
    const float* gi = g + i * C;
    float* oi = out + i * C;
    for (int64_t j = 0; j < full; j += 16) _mm512_storeu_ps(oi + j, _mm512_mul_ps(_mm512_loadu_ps(gi + j), scale));
    if (tail) _mm512_mask_storeu_ps(oi + full, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, gi + full), scale));
  }
}
#endif

// Picks the instantiation for the options once per block of rows, not per row.
template <typename T>
MMOPS_INLINE double ce_rows(const CEArgs<T>& a, int64_t begin, int64_t end) {
  const bool weight = a.w != nullptr, smooth = a.smoothing != 0, grad = a.grad != nullptr;
  const bool long_rows = a.C >= kBlockElements;
  T scratch[kBlockElements];  // the exp block of short rows when no gradient is written
#define MMOPS_CE_CASE(W, S, G)                                                   \
  if (weight == W && smooth == S && grad == G) {                                 \
    if (long_rows)                                                               \
      return a.t ? ce_prob_long_rows<T, W, S, G>(a, begin, end)                  \
                 : ce_index_long_rows<T, W, S, G>(a, begin, end);                \
    return a.t ? ce_prob_rows<T, W, S, G>(a, begin, end, scratch)                \
               : ce_index_rows<T, W, S, G>(a, begin, end, scratch);              \
  }
  MMOPS_CE_CASE(false, false, true)
  MMOPS_CE_CASE(false, false, false)
  MMOPS_CE_CASE(false, true, true)
  MMOPS_CE_CASE(false, true, false)
  MMOPS_CE_CASE(true, false, true)
  MMOPS_CE_CASE(true, false, false)
  MMOPS_CE_CASE(true, true, true)
  MMOPS_CE_CASE(true, true, false)
#undef MMOPS_CE_CASE
  return 0;
}

// The SIMD-dispatched entry points (one ifunc call per block of rows).
MMOPS_SIMD_CLONES double ce_rows_f32(const CEArgs<float>& a, int64_t begin, int64_t end) {
  return ce_rows<float>(a, begin, end);
}
double ce_rows_f64(const CEArgs<double>& a, int64_t begin, int64_t end) { return ce_rows<double>(a, begin, end); }
double ce_rows_on_this_cpu(const CEArgs<float>& a, int64_t b, int64_t e) {
#ifdef MMOPS_X86
  if (a.C <= 32 && a.y && !a.w && a.smoothing == 0) {
    if (simd::cpu_has_avx512()) return ce_short_rows_avx512(a, b, e);
    if (simd::cpu_has_avx2()) return cpu::ce_short_rows_avx2(a, b, e);
  }
#endif
  return ce_rows_f32(a, b, e);
}
double ce_rows_on_this_cpu(const CEArgs<double>& a, int64_t b, int64_t e) { return ce_rows_f64(a, b, e); }

// out[i, :] = g[i, :] * go[i * go_stride] (out may be g).
MMOPS_SIMD_CLONES void scale_rows_f32(const float* g, float* out, int64_t rows, int64_t C, const float* go,
                                      int64_t go_stride) {
  for (int64_t i = 0; i < rows; ++i) {
    const float s = go[i * go_stride];
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) out[i * C + j] = g[i * C + j] * s;
  }
}
void scale_rows_on_this_cpu(const float* g, float* out, int64_t rows, int64_t C, const float* go, int64_t st) {
#ifdef MMOPS_X86
  if (simd::cpu_has_avx512()) return scale_rows_avx512(g, out, rows, C, go, st);
#endif
  scale_rows_f32(g, out, rows, C, go, st);
}
void scale_rows_on_this_cpu(const double* g, double* out, int64_t rows, int64_t C, const double* go, int64_t st) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < C; ++j) out[i * C + j] = g[i * C + j] * go[i * st];
}

constexpr int64_t kReductionNone = 0, kReductionMean = 1, kReductionSum = 2;  // at::Reduction's values

// The schema's checks (csrc/op_args.h) plus this backend's dtypes.
void check_forward_args(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                        int64_t reduction, double label_smoothing) {
  args::cross_entropy(input, target, weight, reduction, label_smoothing);
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
                   "mmops.cross_entropy: input must be float32 or float64 here, got ", input.scalar_type());
}

// The range check of every class-index target and the denominator of "mean" (the number of rows not
// ignored, or the sum of their weights) in one vectorisable pass, before anything is written
// (inplace_backward overwrites the logits, so a bad target must fail first). Returns the number of bad targets.
template <bool kWeight, typename T>
MMOPS_INLINE int64_t scan_targets(const int64_t* y, int64_t N, int64_t C, int64_t ignore_index, const T* w,
                                  double& denom) {
  int64_t bad = 0;
  double counted = 0;
#pragma omp simd reduction(+ : bad, counted)
  for (int64_t i = 0; i < N; ++i) {
    const bool ignored = y[i] == ignore_index;
    const bool in_range = static_cast<uint64_t>(y[i]) < static_cast<uint64_t>(C);
    bad += !ignored && !in_range;
    const double w_y = kWeight ? static_cast<double>(w[in_range ? y[i] : 0]) : 1.0;
    counted += !ignored && in_range ? w_y : 0.0;
  }
  denom = counted;
  return bad;
}
MMOPS_SIMD_CLONES int64_t scan_targets_unweighted(const int64_t* y, int64_t N, int64_t C, int64_t ignore_index,
                                                  double& denom) {
  return scan_targets<false, float>(y, N, C, ignore_index, nullptr, denom);
}
template <typename T>
int64_t scan_targets_any(const int64_t* y, int64_t N, int64_t C, int64_t ignore_index, const T* w, double& denom) {
  return w ? scan_targets<true>(y, N, C, ignore_index, w, denom)
           : scan_targets_unweighted(y, N, C, ignore_index, denom);
}

// Runs the fused forward; writes the gradient into `grad` (nullptr: no gradient). Returns the loss.
Tensor ce_forward_impl(const Tensor& x, const Tensor& target_in, const std::optional<Tensor>& weight_in,
                       int64_t reduction, int64_t ignore_index, double label_smoothing, const Tensor* grad) {
  const int64_t N = x.size(0), C = x.size(1);
  const bool prob = at::isFloatingType(target_in.scalar_type());
  const c10::MaybeOwned<Tensor> target = target_in.expect_contiguous();
  // The Python layer passes the weight in the input's dtype, contiguous: no copy then.
  Tensor weight_copy;
  const Tensor* weight = nullptr;
  if (weight_in.has_value() && weight_in->defined()) {
    weight = &*weight_in;
    if (weight->scalar_type() != x.scalar_type() || !weight->is_contiguous()) {
      weight_copy = weight->to(x.scalar_type()).contiguous();
      weight = &weight_copy;
    }
  }
  Tensor loss = reduction == kReductionNone ? at::detail::empty_cpu({N}, x.scalar_type())
                                            : at::detail::empty_cpu({}, x.scalar_type());

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmops_cross_entropy_forward", [&] {
    CEArgs<scalar_t> a;
    a.x = x.const_data_ptr<scalar_t>();
    a.C = C;
    a.ignore_index = ignore_index;
    a.smoothing = static_cast<scalar_t>(label_smoothing);
    a.grad = grad ? grad->mutable_data_ptr<scalar_t>() : nullptr;
    a.loss_rows = reduction == kReductionNone ? loss.mutable_data_ptr<scalar_t>() : nullptr;
    if (weight) {
      a.w = weight->const_data_ptr<scalar_t>();
      a.weight_sum = static_cast<scalar_t>(simd::sum(a.w, C));
    } else {
      a.weight_sum = static_cast<scalar_t>(C);
    }
    double denom = static_cast<double>(N);
    if (prob) {
      a.t = target->const_data_ptr<scalar_t>();
    } else {
      a.y = target->const_data_ptr<int64_t>();
      if (scan_targets_any(a.y, N, C, ignore_index, a.w, denom) != 0) {
        for (int64_t i = 0; i < N; ++i) {
          const int64_t y = a.y[i];
          TORCH_CHECK_INDEX(y == ignore_index || (y >= 0 && y < C), "mmops.cross_entropy: target[", i, "] = ", y,
                            " is out of range: expected 0 <= target < ", C, " (the number of classes) or target == "
                            "ignore_index (", ignore_index, ")");
        }
      }
    }
    a.grad_scale = reduction == kReductionMean ? static_cast<scalar_t>(1.0 / denom) : scalar_t(1);

    // Below a grain of work the rows run here: no parallel region, no per-thread partial sums.
    const int64_t grain_rows = std::max<int64_t>(1, simd::kGrainElements / C);
    double total = 0;
    if (N <= grain_rows || at::get_num_threads() == 1 || at::in_parallel_region()) {
      total = ce_rows_on_this_cpu(a, 0, N);
    } else {
      std::vector<double> partial(at::get_num_threads(), 0.0);
      at::parallel_for(0, N, grain_rows, [&](int64_t begin, int64_t end) {
        partial[at::get_thread_num()] += ce_rows_on_this_cpu(a, begin, end);
      });
      for (double p : partial) total += p;
    }
    if (reduction != kReductionNone) {
      if (reduction == kReductionMean) total /= denom;  // all rows ignored: 0/0 = nan, as in PyTorch
      *loss.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(total);
    }
  });
  return loss;
}

std::tuple<Tensor, Tensor> cross_entropy_forward(const Tensor& input, const Tensor& target,
                                                 const std::optional<Tensor>& weight, int64_t reduction,
                                                 int64_t ignore_index, double label_smoothing, bool compute_grad) {
  check_forward_args(input, target, weight, reduction, label_smoothing);
  const c10::MaybeOwned<Tensor> x = input.expect_contiguous();
  // empty_output / at::detail::empty_cpu: these kernels are registered for the CPU only, so no dispatch is needed.
  Tensor grad = compute_grad ? cpu::empty_output(x->sizes(), x->scalar_type())
                             : at::detail::empty_cpu({0}, x->scalar_type());
  Tensor loss = ce_forward_impl(*x, target, weight, reduction, ignore_index, label_smoothing,
                                compute_grad ? &grad : nullptr);
  return {std::move(loss), std::move(grad)};
}

// inplace_backward: the gradient overwrites the logits (saves one logits-sized buffer).
Tensor cross_entropy_forward_inplace(Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                                     int64_t reduction, int64_t ignore_index, double label_smoothing) {
  check_forward_args(input, target, weight, reduction, label_smoothing);
  TORCH_CHECK_VALUE(input.is_contiguous(), "mmops.cross_entropy(inplace_backward=True): input must be contiguous");
  return ce_forward_impl(input, target, weight, reduction, ignore_index, label_smoothing, &input);
}

// Backward: grad_input = grad_output * G (the saved r dloss/dx). grad_output is a scalar for mean/sum or
// one value per row for "none". `out` may be `grad` (in place); a scalar 1 in place is a no-op.
void scale_grad(const Tensor& grad, const Tensor& grad_output, Tensor& out) {
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.is_contiguous(), "mmops.cross_entropy backward: saved gradient must be "
                    "a contiguous (N, C) tensor");
  const int64_t N = grad.size(0), C = grad.size(1);
  TORCH_CHECK_VALUE(grad_output.numel() == 1 || (grad_output.dim() == 1 && grad_output.size(0) == N),
                    "mmops.cross_entropy backward: grad_output must be a scalar or of shape (", N, ",), got ",
                    grad_output.sizes());
  const c10::MaybeOwned<Tensor> go = grad_output.scalar_type() == grad.scalar_type()
                                         ? c10::MaybeOwned<Tensor>::borrowed(grad_output)
                                         : c10::MaybeOwned<Tensor>::owned(grad_output.to(grad.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "mmops_cross_entropy_scale_grad", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const scalar_t* gp = go->const_data_ptr<scalar_t>();
    const int64_t stride = go->numel() == 1 ? 0 : go->stride(0);
    if (o == g && stride == 0 && *gp == scalar_t(1)) return;
    at::parallel_for(0, N, std::max<int64_t>(1, simd::kGrainElements / std::max<int64_t>(C, 1)),
                     [&](int64_t b, int64_t e) {
                       if (stride == 0)  // one scale for all: the rows are one flat run
                         scale_rows_on_this_cpu(g + b * C, o + b * C, 1, (e - b) * C, gp, 0);
                       else
                         scale_rows_on_this_cpu(g + b * C, o + b * C, e - b, C, gp + b * stride, stride);
                     });
  });
}

Tensor cross_entropy_backward(const Tensor& grad, const Tensor& grad_output) {
  Tensor out = cpu::empty_output(grad.sizes(), grad.scalar_type());
  scale_grad(grad, grad_output, out);
  return out;
}

void cross_entropy_scale_grad_(Tensor& grad, const Tensor& grad_output) { scale_grad(grad, grad_output, grad); }

}  // namespace

TORCH_LIBRARY_IMPL(mmops, CPU, m) {
  m.impl("cross_entropy_forward", &cross_entropy_forward);
  m.impl("cross_entropy_forward_inplace", &cross_entropy_forward_inplace);
  m.impl("cross_entropy_backward", &cross_entropy_backward);
  m.impl("cross_entropy_scale_grad_", &cross_entropy_scale_grad_);
}

}  // namespace mmops
