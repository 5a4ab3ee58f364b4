// The cross-entropy forward's AVX2 short-row kernel (csrc/cpu/cross_entropy_short_rows.h, included as built): checks
// it, with steps of 4 rows (the kernel's) and of 1 and 2, for every C from 1 to 32, reductions "mean" and "none",
// ignored rows and NaN / +-inf logits: against float64 math (3e-6 relative, the target's lane relative to r); in
// place (the gradient over the logits, inplace_backward), without a gradient, and split into two ranges at every row
// (two threads' rows, the second range first, in place) it must give the same bits; and it must write nothing past
// its buffers or outside its range. Then times it at (4096, C), 1 thread, with 1, 2 and 4 rows through each stage
// together, every candidate once per round in one process, 41 rounds, medians.
//
//   g++ -O3 -fno-math-errno -fno-trapping-math -Icsrc bench/loops/ce_short_rows_avx2.cpp -o /tmp/ce_short_rows_avx2
//   /tmp/ce_short_rows_avx2          (C = 27; or give C)
//
// Measured on an AMD EPYC Zen 3 (this project's VM that session, 2.45 GHz, no AVX-512), 1 thread, (4096, 27), "mean",
// three runs: 1 row 149-185 us, 2 rows 118-147 us, 4 rows 102-128 us (3 rows, tried once: 110 us); C = 16: 91 / 79 /
// 65 us; C = 32: 149 / 119 / 106 us. The op's former path (the generic blocks) took 237 us with its overheads.
#include "../../csrc/cpu/cross_entropy_short_rows.h"
#include "ce_cases.h"

#include <algorithm>
#include <chrono>
#include <cmath>
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

template <int kRows>
MMOPS_AVX2_TARGET __attribute__((noinline)) double kernel(const CEArgs<float>& a, int64_t begin, int64_t end) {
  switch ((a.C + 7) / 8) {
    case 1: return mmops::cpu::ce_short_rows_avx2<1, kRows>(a, begin, end);
    case 2: return mmops::cpu::ce_short_rows_avx2<2, kRows>(a, begin, end);
    case 3: return mmops::cpu::ce_short_rows_avx2<3, kRows>(a, begin, end);
    default: return mmops::cpu::ce_short_rows_avx2<4, kRows>(a, begin, end);
  }
}

constexpr int64_t kGuard = 16;       // floats after each buffer, which the kernel must leave alone
constexpr float kUnwritten = -7.0f;  // the gradient's fill: the kernel must overwrite every value of it

// ce_cases.h's cases with kGuard floats after every buffer, the outputs filled with kUnwritten; with `specials` also
// a +inf (its row's loss and gradient are NaN).
Case make_case(int64_t N, int64_t C, bool none, bool ignored, bool specials, bool inplace, unsigned seed) {
  Case k = ce_cases::make_case(N, C, none, ignored, specials, inplace, seed, kGuard, kUnwritten);
  if (specials && N * C > 60) k.x[N * C - 2] = __builtin_inff();
  return k;
}

// |got - want| <= tol (|want| + scale); NaN and inf where want is (a target on a -inf logit has an inf loss). scale
// is the size of the terms that cancel: r for the target's lane of a gradient (r (p - 1)), 1 for a loss (log s and
// m - x_y), and for the other lanes r e-30, so that they are checked relative to their own size down to values that
// the exp flushes to 0 (below e^-87).
double worst = 0;  // the largest |got - want| / (|want| + scale) seen among finite values
bool close(double got, double want, double scale, double tol) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  const double err = std::fabs(got - want) / (std::fabs(want) + scale);
  worst = std::max(worst, err);
  return err <= tol;
}
constexpr double kTol = 3e-6;  // ~25 float ulps: exp, a sum of up to 32 terms, a division, a product

// One case against float64 math: the loss as log s + (m - x_y), the gradient r (p - onehot(y)); a "mean" total
// against the sum of the rows' losses. Rows outside [begin, end) are not checked here.
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
    const bool undefined = nan || std::isinf(m);  // +inf - +inf: PyTorch's softmax is NaN there too
    const double loss = undefined ? NAN : std::log(s) + (m - x[y]);
    want_total += loss;
    if (a.loss_rows) ok &= close(a.loss_rows[i], loss, 1.0, kTol);
    for (int64_t j = 0; j < C; ++j) {
      const double p = undefined ? NAN : std::exp(static_cast<double>(x[j]) - m) / s;
      ok &= close(grad[i * C + j], a.grad_scale * (p - (j == y)), a.grad_scale * (j == y ? 1.0 : 1e-30), kTol);
    }
  }
  return ok && close(total, want_total, static_cast<double>(N), kTol);
}

}  // namespace

int main(int argc, char** argv) {
  if (!simd::cpu_has_avx2()) {
    std::printf("this CPU has no AVX2\n");
    return 0;
  }
  // ---- checks ----
  // Each case: against float64 math; in place bitwise the same as out of place; without a gradient the same losses
  // and total; the guard floats after every buffer untouched; and split in two ranges at every row (what two threads
  // get), run second range first, in place: the same gradient and per-row losses bitwise, nothing written outside
  // each range while it runs.
  // Every step size the timing compares (the kernel's own is 4 rows, MMOPS_CE_AVX2_ROWS).
  using Kernel = double (*)(const CEArgs<float>&, int64_t, int64_t);
  const Kernel kernels[] = {kernel<1>, kernel<2>, kernel<4>};
  const char* names[] = {"1 row", "2 rows", "4 rows"};
  int cases = 0, differ = 0;
  for (const Kernel run : kernels)
    for (int64_t C = 1; C <= 32; ++C)
      for (int64_t N : {1, 3, 4, 5, 16, 17, 61})
        for (int flags = 0; flags < 8; ++flags) {
          const bool none = flags & 1, ignored = flags & 2, specials = flags & 4;
          const unsigned seed = static_cast<unsigned>(C * 100 + N);
          Case a = make_case(N, C, none, ignored, specials, false, seed);
          Case b = make_case(N, C, none, ignored, specials, true, seed);
          Case c = make_case(N, C, none, ignored, specials, false, seed);
          const Case ref = make_case(N, C, none, ignored, specials, false, seed);
          c.args.grad = nullptr;
          const double ta = run(a.args, 0, N), tb = run(b.args, 0, N), tc = run(c.args, 0, N);
          bool same = matches_float64(ref, a.args, N, ta, a.grad.data()) && std::memcmp(&ta, &tb, sizeof ta) == 0 &&
                      std::memcmp(&ta, &tc, sizeof ta) == 0 &&
                      std::memcmp(a.grad.data(), b.x.data(), sizeof(float) * N * C) == 0 &&
                      std::memcmp(a.loss.data(), b.loss.data(), sizeof(float) * N) == 0 &&
                      std::memcmp(a.loss.data(), c.loss.data(), sizeof(float) * N) == 0 &&
                      std::memcmp(c.x.data(), ref.x.data(), sizeof(float) * c.x.size()) == 0 &&
                      std::all_of(c.grad.begin(), c.grad.end(), [](float v) { return v == kUnwritten; });
          for (int64_t g = 0; g < kGuard; ++g)
            same &= a.grad[N * C + g] == kUnwritten && a.loss[N + g] == kUnwritten &&
                    std::memcmp(&b.x[N * C + g], &ref.x[N * C + g], sizeof(float)) == 0;
          for (int64_t split = 1; split < N; ++split) {
            Case d = make_case(N, C, none, ignored, specials, true, seed);
            run(d.args, split, N);
            same &= std::memcmp(d.x.data(), ref.x.data(), sizeof(float) * split * C) == 0 &&
                    std::memcmp(d.x.data() + N * C, ref.x.data() + N * C, sizeof(float) * kGuard) == 0;
            run(d.args, 0, split);
            same &= std::memcmp(d.x.data(), b.x.data(), sizeof(float) * (N * C + kGuard)) == 0 &&
                    std::memcmp(d.loss.data(), b.loss.data(), sizeof(float) * (N + kGuard)) == 0;
          }
          ++cases;
          if (!same) {
            ++differ;
            std::printf("differs: N=%ld C=%ld none=%d ignored=%d specials=%d\n", static_cast<long>(N),
                        static_cast<long>(C), none, ignored, specials);
          }
        }
  std::printf("%d cases checked, %d differ (largest relative error of a finite value: %.1e, bound %.0e)\n", cases,
              differ, worst, kTol);

  // ---- timing ----
  const int64_t N = 4096, C = argc > 1 ? std::atoi(argv[1]) : 27;
  if (C < 1 || C > 32) return std::printf("C must be 1..32\n"), 2;
  for (int none = 0; none < 2; ++none) {
    Case k = make_case(N, C, none, false, false, false, 1);
    std::vector<double> t[3];
    for (int round = 0; round < 41; ++round)
      for (int c = 0; c < 3; ++c) {
        const double t0 = now();
        for (int rep = 0; rep < 20; ++rep) kernels[c](k.args, 0, N);
        t[c].push_back((now() - t0) / 20);
      }
    std::printf("(%ld, %ld) %s, 1 thread, medians:", static_cast<long>(N), static_cast<long>(C),
                none ? "none" : "mean");
    for (int c = 0; c < 3; ++c) {
      std::sort(t[c].begin(), t[c].end());
      std::printf("  %s %.1f us", names[c], t[c][20] * 1e6);
    }
    std::printf("\n");
  }
  return differ == 0 ? 0 : 1;
}
