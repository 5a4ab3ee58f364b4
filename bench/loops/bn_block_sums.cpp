// BatchNorm's per-channel sums (csrc/cpu/batch_norm_kernels.cpp, "the sums"): the kernels' block sums (each
// channel's values added in float32 over blocks of 16 rows, the blocks added in double) against the loops they
// replaced, which added every value to a double. Includes the kernels' source, so it times the kernels as built.
// No torch: plain C++, 1 thread, every candidate once per round in one process, 41 rounds, min and median.
//
//   g++ -O3 -fopenmp -fno-math-errno -fno-trapping-math -Icsrc bench/loops/bn_block_sums.cpp -o /tmp/bn_block_sums
//   /tmp/bn_block_sums 4096 cached       (C = 200; 3.3 MB per tensor: in cache)
//   /tmp/bn_block_sums 32768 memory      (26 MB per tensor: from DRAM)
//
// Measured on an AMD EPYC Zen 4 (this project's VM), 1 thread, medians:
//   (4096, 200) in cache:  statistics double rows 169-170 us, double tiles (the former kernel) 142-143 us, kernel
//                          77-79 us; backward sums double rows (the former kernel) 196 us, kernel 132 us;
//   (32768, 200) memory:   statistics double rows (the former kernel) 2.2-2.3 ms, kernel 1.3 ms; backward sums
//                          double rows (the former kernel) 2.9-3.0 ms, kernel 2.2 ms, block rows without the
//                          software prefetch 4.1-4.4 ms.
// Printed with each: the largest difference to the double rows' sums, relative to the sum of the terms' magnitudes
// (~1e-8).
#include "../../csrc/cpu/batch_norm_kernels.cpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>

namespace {
using mmops::cpu::bn::Reads;
using mmops::cpu::bn::Shape;

int64_t N = 4096;
constexpr int64_t C = 200;

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// ---- the loops the block sums replaced: every value added to a double (compiled as the kernels are: the SIMD
// clones of simd.h, AVX-512 on a CPU that has it) ----
MMOPS_SIMD_CLONES __attribute__((noinline)) void double_rows_stats(const float* x, const float* K, double* S1, double* S2) {
  for (int64_t n = 0; n < N; ++n) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const double d = static_cast<double>(x[n * C + c]) - K[c];
      S1[c] += d;
      S2[c] += d * d;
    }
  }
}

// the former in-cache statistics: 16-row x 32-channel tiles, the double sums in registers
MMOPS_SIMD_CLONES __attribute__((noinline)) void double_tiles_stats(const float* x, const float* K, double* S1, double* S2) {
  const int64_t tiled_c = C - C % 32;
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    const int64_t n1 = std::min(N, n0 + 16);
    for (int64_t c0 = 0; c0 < tiled_c; c0 += 32) {
      double a[32], b[32];
      for (int c = 0; c < 32; ++c) a[c] = S1[c0 + c], b[c] = S2[c0 + c];
      for (int64_t n = n0; n < n1; ++n) {
#pragma omp simd
        for (int c = 0; c < 32; ++c) {
          const double d = static_cast<double>(x[n * C + c0 + c]) - K[c0 + c];
          a[c] += d;
          b[c] += d * d;
        }
      }
      for (int c = 0; c < 32; ++c) S1[c0 + c] = a[c], S2[c0 + c] = b[c];
    }
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t c = tiled_c; c < C; ++c) {
        const double d = static_cast<double>(x[n * C + c]) - K[c];
        S1[c] += d;
        S2[c] += d * d;
      }
  }
}

MMOPS_SIMD_CLONES __attribute__((noinline)) void double_rows_bsums(const float* dy, const float* x, const float* m, double* A,
                                                 double* B) {
  for (int64_t n = 0; n < N; ++n) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float g = dy[n * C + c];
      A[c] += static_cast<double>(g);
      B[c] += static_cast<double>(g * (x[n * C + c] - m[c]));
    }
  }
}

// the block rows without the software prefetch (why the kernels prefetch)
MMOPS_SIMD_CLONES __attribute__((noinline)) void block_rows_bsums_no_prefetch(const float* dy, const float* x, const float* m,
                                                            double* A, double* B) {
  alignas(64) float a[C], b[C];
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    std::memset(a, 0, sizeof a);
    std::memset(b, 0, sizeof b);
    for (int64_t n = n0; n < std::min(N, n0 + 16); ++n) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const float g = dy[n * C + c];
        a[c] += g;
        b[c] += g * (x[n * C + c] - m[c]);
      }
    }
    for (int64_t c = 0; c < C; ++c) A[c] += a[c], B[c] += b[c];
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) N = std::atoll(argv[1]);
  const Reads reads = argc > 2 && argv[2][0] == 'm' ? Reads::kFromMemory : Reads::kCached;
  std::vector<float> x(N * C), dy(N * C), h(N * C), K(C), m(C);
  srand(1);
  for (auto& v : x) v = 3.0f * rand() / RAND_MAX + 100.0f;  // an offset, as after a Linear layer
  for (auto& v : dy) v = 2.0f * rand() / RAND_MAX - 1.0f;
  for (int64_t c = 0; c < C; ++c) K[c] = x[c], m[c] = 101.5f;
  const Shape s{N, C, 1};

  // the sums of the terms' magnitudes, for the differences printed below
  std::vector<double> abs_stats(2 * C), abs_bsums(2 * C);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const double d = static_cast<double>(x[n * C + c]) - K[c], g = dy[n * C + c];
      abs_stats[c] += std::abs(d), abs_stats[C + c] += d * d;
      abs_bsums[c] += std::abs(g), abs_bsums[C + c] += std::abs(g * (x[n * C + c] - m[c]));
    }
  struct Cand {
    const char* name;
    std::function<void(double*, double*)> run;
    std::vector<double> t;
    std::vector<double> S1, S2;
  };
  std::vector<Cand> cands = {
      {"statistics, double rows", [&](double* a, double* b) { double_rows_stats(x.data(), K.data(), a, b); }},
      {"statistics, double tiles", [&](double* a, double* b) { double_tiles_stats(x.data(), K.data(), a, b); }},
      {"statistics, kernel (block sums)",
       [&](double* a, double* b) { mmops::cpu::bn::stats(x.data(), s, K.data(), 0, N, a, b, reads); }},
      {"backward sums, double rows",
       [&](double* a, double* b) { double_rows_bsums(dy.data(), x.data(), m.data(), a, b); }},
      {"backward sums, block rows, no prefetch",
       [&](double* a, double* b) { block_rows_bsums_no_prefetch(dy.data(), x.data(), m.data(), a, b); }},
      {"backward sums, kernel (block sums)",
       [&](double* a, double* b) {
         mmops::cpu::bn::backward_sums(0, dy.data(), h.data(), x.data(), s, m.data(), 0, N, a, b, reads);
       }},
  };
  for (int round = 0; round < 41; ++round)
    for (auto& cand : cands) {
      cand.S1.assign(C, 0.0), cand.S2.assign(C, 0.0);
      const double t0 = now();
      cand.run(cand.S1.data(), cand.S2.data());
      cand.t.push_back(now() - t0);
    }
  std::printf("(%lld, %lld) %s, 1 thread\n", static_cast<long long>(N), static_cast<long long>(C),
              reads == Reads::kCached ? "cached" : "from memory");
  for (size_t k = 0; k < cands.size(); ++k) {
    auto& cand = cands[k];
    std::sort(cand.t.begin(), cand.t.end());
    const auto& ref = cands[k < 3 ? 0 : 3];  // the double rows of the same sums
    double err = 0;  // the largest difference, relative to the sum of the terms' magnitudes
    for (int64_t c = 0; c < C; ++c) {
      err = std::max(err, std::abs(cand.S1[c] - ref.S1[c]) / (k < 3 ? abs_stats[c] : abs_bsums[c]));
      err = std::max(err, std::abs(cand.S2[c] - ref.S2[c]) / (k < 3 ? abs_stats[C + c] : abs_bsums[C + c]));
    }
    std::printf("  %-40s min %8.1f us  median %8.1f us  difference to double rows %.1e\n", cand.name,
                cand.t.front() * 1e6, cand.t[cand.t.size() / 2] * 1e6, err);
  }
}
