// The cross-entropy forward's AVX-512 short-row kernel (csrc/cpu/cross_entropy_short_rows.h, included as built)
// against the one it replaced, which took one row at a time; the kernel takes 4 rows through each stage together.
// Checks that the two write bitwise the same gradient, per-row losses and total, for C from 1 to 32, reductions
// "mean" and "none", with ignored rows, and with the gradient written over the logits (inplace_backward); then
// times each at (4096, C), 1 thread, every candidate once per round in one process, 41 rounds, medians.
//
//   g++ -O3 -fno-math-errno -fno-trapping-math -Icsrc bench/loops/ce_short_rows.cpp -o /tmp/ce_short_rows
//   /tmp/ce_short_rows          (C = 27; or give C)
//
// Measured on an AMD EPYC Zen 4 (this project's VM), 1 thread, (4096, 27), "mean": a row at a time 76-89 us, the
// kernel 57-68 us (C = 16: 66 -> 50 us, C = 32: 76 -> 57 us).
#include "../../csrc/cpu/cross_entropy_short_rows.h"
#include "ce_cases.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

using ce_cases::Case;
using mmops::cpu::CEArgs;
namespace simd = mmops::simd;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// ---- the former kernel: one row at a time (otherwise the same instructions; the group's losses are the
// kernel's own ce_short_group_losses) ----
template <bool kTwoVectors>
MMOPS_AVX512 double row_at_a_time(const CEArgs<float>& a, int64_t begin, int64_t end) {
  const int64_t C = a.C;
  const __mmask16 k0 = C >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << C) - 1);
  const __mmask16 k1 = C > 16 ? __mmask16((1u << (C - 16)) - 1) : __mmask16(0);
  const __m512 neg_inf = _mm512_set1_ps(-__builtin_inff());
  const __m512 grad_scale = _mm512_set1_ps(a.grad_scale);
  float row_sum[16], gap[16];
  double total = 0;
  for (int64_t i0 = begin; i0 < end; i0 += 16) {
    const int rows = static_cast<int>(std::min<int64_t>(16, end - i0));
    for (int r = 0; r < rows; ++r) {
      const int64_t i = i0 + r, y = a.y[i];
      const float* x = a.x + i * C;
      float* g = a.grad ? a.grad + i * C : nullptr;
      if (y == a.ignore_index) {
        row_sum[r] = 1.0f;
        gap[r] = 0.0f;
        if (g) {
          _mm512_mask_storeu_ps(g, k0, _mm512_setzero_ps());
          if (kTwoVectors) _mm512_mask_storeu_ps(g + 16, k1, _mm512_setzero_ps());
        }
        continue;
      }
      const float x_y = x[y];
      const __m512 x0 = _mm512_mask_loadu_ps(neg_inf, k0, x);
      const __m512 x1 = kTwoVectors ? _mm512_mask_loadu_ps(neg_inf, k1, x + 16) : neg_inf;
      const float m = _mm512_reduce_max_ps(kTwoVectors ? _mm512_max_ps(x0, x1) : x0);
      const __m512 vm = _mm512_set1_ps(m);
      const __m512 e0 = _mm512_maskz_mov_ps(k0, simd::exp(_mm512_sub_ps(x0, vm)));
      const __m512 e1 = kTwoVectors ? _mm512_maskz_mov_ps(k1, simd::exp(_mm512_sub_ps(x1, vm))) : _mm512_setzero_ps();
      const float s = _mm512_reduce_add_ps(kTwoVectors ? _mm512_add_ps(e0, e1) : e0);
      row_sum[r] = s;
      gap[r] = m - x_y;
      if (g) {
        const __m512 coef = _mm512_set1_ps(a.grad_scale / s);
        const __mmask16 hot0 = y < 16 ? __mmask16(1u << y) : __mmask16(0);
        const __m512 p0 = _mm512_mul_ps(e0, coef);
        _mm512_mask_storeu_ps(g, k0, _mm512_mask_sub_ps(p0, hot0, p0, grad_scale));
        if (kTwoVectors) {
          const __mmask16 hot1 = y >= 16 ? __mmask16(1u << (y - 16)) : __mmask16(0);
          const __m512 p1 = _mm512_mul_ps(e1, coef);
          _mm512_mask_storeu_ps(g + 16, k1, _mm512_mask_sub_ps(p1, hot1, p1, grad_scale));
        }
      }
    }
    total += mmops::cpu::ce_short_group_losses(a, i0, rows, row_sum, gap);
  }
  return total;
}
MMOPS_AVX512_TARGET __attribute__((noinline)) double former(const CEArgs<float>& a, int64_t begin, int64_t end) {
  return a.C > 16 ? row_at_a_time<true>(a, begin, end) : row_at_a_time<false>(a, begin, end);
}
__attribute__((noinline)) double kernel(const CEArgs<float>& a, int64_t begin, int64_t end) {
  return mmops::cpu::ce_short_rows_avx512(a, begin, end);
}

// N rows of C logits (normal, scale 3, a -inf, a large one and a NaN), every 7th target ignored when `ignored`.
Case make_case(int64_t N, int64_t C, bool none, bool ignored, bool inplace, unsigned seed) {
  return ce_cases::make_case(N, C, none, ignored, /*specials=*/true, inplace, seed, /*guard=*/0, /*fill=*/0.0f);
}

}  // namespace

int main(int argc, char** argv) {
  if (!simd::cpu_has_avx512()) {
    std::printf("this CPU has no AVX-512\n");
    return 0;
  }
  // ---- bitwise checks ----
  int cases = 0, differ = 0;
  for (int64_t C = 1; C <= 32; ++C)
    for (int64_t N : {1, 3, 4, 5, 16, 17, 61})
      for (int flags = 0; flags < 8; ++flags) {
        const bool none = flags & 1, ignored = flags & 2, inplace = flags & 4;
        Case a = make_case(N, C, none, ignored, inplace, static_cast<unsigned>(C * 100 + N));
        Case b = make_case(N, C, none, ignored, inplace, static_cast<unsigned>(C * 100 + N));
        const double ta = former(a.args, 0, N), tb = kernel(b.args, 0, N);
        const bool same = std::memcmp(&ta, &tb, sizeof ta) == 0 &&
                          std::memcmp(inplace ? a.x.data() : a.grad.data(), inplace ? b.x.data() : b.grad.data(),
                                      sizeof(float) * N * C) == 0 &&
                          std::memcmp(a.loss.data(), b.loss.data(), sizeof(float) * N) == 0;
        ++cases;
        if (!same) {
          ++differ;
          std::printf("differs: N=%ld C=%ld none=%d ignored=%d inplace=%d\n", static_cast<long>(N),
                      static_cast<long>(C), none, ignored, inplace);
        }
      }
  std::printf("%d cases checked, %d differ\n", cases, differ);

  // ---- timing ----
  const int64_t N = 4096, C = argc > 1 ? std::atoi(argv[1]) : 27;
  if (C < 1 || C > 32) return std::printf("C must be 1..32\n"), 2;
  for (int none = 0; none < 2; ++none) {
    Case a = make_case(N, C, none, false, false, 1), b = make_case(N, C, none, false, false, 1);
    std::vector<double> t_former, t_kernel;
    for (int round = 0; round < 41; ++round) {
      double t = now();
      for (int rep = 0; rep < 20; ++rep) former(a.args, 0, N);
      t_former.push_back((now() - t) / 20);
      t = now();
      for (int rep = 0; rep < 20; ++rep) kernel(b.args, 0, N);
      t_kernel.push_back((now() - t) / 20);
    }
    std::sort(t_former.begin(), t_former.end());
    std::sort(t_kernel.begin(), t_kernel.end());
    std::printf("(%ld, %ld) %s, 1 thread, medians: row at a time %.1f us, kernel %.1f us\n", static_cast<long>(N),
                static_cast<long>(C), none ? "none" : "mean", t_former[20] * 1e6, t_kernel[20] * 1e6);
  }
  return differ == 0 ? 0 : 1;
}
