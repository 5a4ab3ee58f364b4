// The cross-entropy forward's AVX2 short-row kernel (csrc/cpu/cross_entropy_short_rows.h, included as built):
// checks it against float64 math for every C from 1 to 32, reductions "mean" and "none", with ignored rows, NaN and
// -inf logits, and with the gradient written over the logits (inplace_backward, which must give the same bits); then
// times the kernel at (4096, C), 1 thread, with 1, 2 and 4 rows through each stage together, every candidate once per
// round in one process, 41 rounds, medians.
//
//   g++ -O3 -fno-math-errno -fno-trapping-math -Icsrc bench/loops/ce_short_rows_avx2.cpp -o /tmp/ce_short_rows_avx2
//   /tmp/ce_short_rows_avx2          (C = 27; or give C)
//
// Measured on an AMD EPYC Zen 3 (this project's VM, 2.45 GHz, no AVX-512), 1 thread, (4096, 27), "mean": see the
// kernel's comment in cross_entropy_short_rows.h.
#include "../../csrc/cpu/cross_entropy_short_rows.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

using mmops::cpu::CEArgs;
namespace simd = mmops::simd;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

template <int kRows>
MMOPS_AVX2_TARGET __attribute__((noinline)) double kernel(const CEArgs<float>& a, int64_t begin, int64_t end) {
  switch ((a.C + 7) / 8) {
    case 1: return mmops::cpu::ce_short_rows_avx2<1, kRows>(a, begin, end);
    case 2: return mmops::cpu::ce_short_rows_avx2<2, kRows>(a, begin, end);
    case 3: return mmops::cpu::ce_short_rows_avx2<3, kRows>(a, begin, end);
    default: return mmops::cpu::ce_short_rows_avx2<4, kRows>(a, begin, end);
  }
}

struct Case {
  std::vector<float> x, grad, loss;
  std::vector<int64_t> y;
  CEArgs<float> args;
};

// N rows of C logits (normal, scale 3; a -inf, a large one and a NaN), every 7th target ignored when `ignored`.
Case make_case(int64_t N, int64_t C, bool none, bool ignored, bool inplace, unsigned seed) {
  Case k;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  k.x.resize(N * C);
  for (auto& v : k.x) v = normal(rng);
  if (N * C > 40) k.x[13] = -__builtin_inff(), k.x[29] = 80.0f;
  if (N * C > 60) k.x[57] = __builtin_nanf("");
  k.y.resize(N);
  for (int64_t i = 0; i < N; ++i) k.y[i] = ignored && i % 7 == 3 ? -100 : static_cast<int64_t>(rng() % C);
  k.grad.assign(N * C, -7.0f);  // the kernel must write every gradient value
  k.loss.assign(N, -7.0f);
  k.args.x = k.x.data();
  k.args.C = C;
  k.args.y = k.y.data();
  k.args.grad_scale = none ? 1.0f : 1.0f / static_cast<float>(N);
  k.args.grad = inplace ? k.x.data() : k.grad.data();
  k.args.loss_rows = none ? k.loss.data() : nullptr;
  return k;
}

// |got - want| <= 1e-5 (|want| + scale); NaN and inf where want is (a target on a -inf logit has an inf loss); scale is the size of the terms that cancel (p - 1 in
// a gradient, log s and m - x_y in a loss).
bool close(double got, double want, double scale) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= 1e-5 * (std::fabs(want) + scale);
}

// One case against float64 math (the loss as log s + (m - x_y), the gradient r (p - onehot(y))); returns whether
// every loss and gradient value is close and the total too.
bool matches_float64(const Case& in, const CEArgs<float>& a, int64_t N, double total, const float* grad) {
  const int64_t C = a.C;
  double want_total = 0;
  bool ok = true;
  for (int64_t i = 0; i < N; ++i) {
    const float* x = in.x.data() + i * C;
    const int64_t y = a.y[i];
    if (y == a.ignore_index) {
      for (int64_t j = 0; j < C; ++j) ok &= grad[i * C + j] == 0.0f;
      if (a.loss_rows) ok &= a.loss_rows[i] == 0.0f;
      continue;
    }
    double m = -INFINITY, s = 0;
    bool nan = false;
    for (int64_t j = 0; j < C; ++j) nan |= std::isnan(x[j]), m = std::max(m, static_cast<double>(x[j]));
    for (int64_t j = 0; j < C; ++j) s += std::exp(static_cast<double>(x[j]) - m);
    const double loss = nan ? NAN : std::log(s) + (m - x[y]);
    want_total += loss;
    if (a.loss_rows) ok &= close(a.loss_rows[i], loss, 1.0);
    for (int64_t j = 0; j < C; ++j) {
      const double p = nan ? NAN : std::exp(static_cast<double>(x[j]) - m) / s;
      ok &= close(grad[i * C + j], a.grad_scale * (p - (j == y)), a.grad_scale);
    }
  }
  return ok && close(total, want_total, static_cast<double>(N));
}

}  // namespace

int main(int argc, char** argv) {
  if (!simd::cpu_has_avx2()) {
    std::printf("this CPU has no AVX2\n");
    return 0;
  }
  // ---- checks: against float64 math, and in place bitwise equal to out of place ----
  int cases = 0, differ = 0;
  for (int64_t C = 1; C <= 32; ++C)
    for (int64_t N : {1, 3, 4, 5, 16, 17, 61})
      for (int flags = 0; flags < 4; ++flags) {
        const bool none = flags & 1, ignored = flags & 2;
        const unsigned seed = static_cast<unsigned>(C * 100 + N);
        Case a = make_case(N, C, none, ignored, false, seed), b = make_case(N, C, none, ignored, true, seed);
        const Case ref = make_case(N, C, none, ignored, false, seed);
        const double ta = kernel<MMOPS_CE_AVX2_ROWS>(a.args, 0, N), tb = kernel<MMOPS_CE_AVX2_ROWS>(b.args, 0, N);
        const bool same = matches_float64(ref, a.args, N, ta, a.grad.data()) &&
                          std::memcmp(&ta, &tb, sizeof ta) == 0 &&
                          std::memcmp(a.grad.data(), b.x.data(), sizeof(float) * N * C) == 0 &&
                          std::memcmp(a.loss.data(), b.loss.data(), sizeof(float) * N) == 0;
        ++cases;
        if (!same) {
          ++differ;
          std::printf("differs: N=%ld C=%ld none=%d ignored=%d\n", static_cast<long>(N), static_cast<long>(C), none,
                      ignored);
        }
      }
  std::printf("%d cases checked, %d differ\n", cases, differ);

  // ---- timing ----
  const int64_t N = 4096, C = argc > 1 ? std::atoi(argv[1]) : 27;
  if (C < 1 || C > 32) return std::printf("C must be 1..32\n"), 2;
  using Kernel = double (*)(const CEArgs<float>&, int64_t, int64_t);
  const Kernel kernels[] = {kernel<1>, kernel<2>, kernel<4>};
  const char* names[] = {"1 row", "2 rows", "4 rows"};
  for (int none = 0; none < 2; ++none) {
    Case k = make_case(N, C, none, false, false, 1);
    std::vector<double> t[3];
    for (int round = 0; round < 41; ++round)
      for (int c = 0; c < 3; ++c) {
        const double t0 = now();
        for (int rep = 0; rep < 20; ++rep) kernels[c](k.args, 0, N);
        t[c].push_back((now() - t0) / 20);
      }
    std::printf("(%ld, %ld) %s, 1 thread, medians:", static_cast<long>(N), static_cast<long>(C), none ? "none" : "mean");
    for (int c = 0; c < 3; ++c) {
      std::sort(t[c].begin(), t[c].end());
      std::printf("  %s %.1f us", names[c], t[c][20] * 1e6);
    }
    std::printf("\n");
  }
  return differ == 0 ? 0 : 1;
}
