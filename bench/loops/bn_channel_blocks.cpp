// The channel-blocked single-read BatchNorm forward the speed issue suggests, against mmops' row passes: for each
// block of 16 (or 32) channels, the statistics down all N rows, then the normalisation of the same block while it is
// still in cache (2 MiB per 16 channels at N = 32768), so x would come from DRAM once instead of twice.
// No torch: plain C++, 1 thread, best of 5 calls, four rounds.
//
//   g++ -O3 -march=x86-64-v4 -fopenmp-simd bench/loops/bn_channel_blocks.cpp -o /tmp/bn_channel_blocks
//   /tmp/bn_channel_blocks [N=32768]      (C = 200)
//
// Measured on an AMD EPYC Zen 4 (this project's VM), 1 thread:
//   N = 32768 (26 MB, from DRAM): rows 4.3-4.7 ms, blocked16 12.0-12.3 ms, blocked32 9.7-9.9 ms;
//   N = 4096 (3.3 MB, in cache):  rows 0.32-0.34 ms, blocked16 0.27-0.28 ms, blocked32 0.25-0.27 ms.
// A block's walk down the rows reads 64 or 128 bytes of every 800-byte row: from DRAM that runs at a third of the
// row passes' speed (the prefetchers follow one sequential stream, not thousands of short ones), which undoes the
// saved read twice over. In cache the gain is the statistics' sums held in registers, which the kernels' tiled
// statistics (csrc/cpu/batch_norm_kernels.cpp) already take. So the kernels keep the row passes.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <vector>
#include <algorithm>
#include <immintrin.h>
static int64_t N = 32768;
static const int64_t C = 200;
static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

__attribute__((noinline)) void rows(const float* x, float* h, double* S1, double* S2, float* m, float* a) {
  for (int64_t c = 0; c < C; c++) S1[c] = S2[c] = 0;
  for (int64_t n = 0; n < N; n++) {
    const float* r = x + n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; c++) { const double d = r[c]; S1[c] += d; S2[c] += d * d; }
  }
  for (int64_t c = 0; c < C; c++) { m[c] = S1[c] / N; a[c] = 1.0 / std::sqrt(S2[c] / N - (S1[c] / N) * (S1[c] / N) + 1e-5); }
  for (int64_t n = 0; n < N; n++) {
    const float* r = x + n * C; float* o = h + n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; c++) o[c] = (r[c] - m[c]) * a[c];
  }
}

// 16-channel blocks (the last one 8): stats down all rows, then normalize the same block.
template <int W>
static inline void block(const float* x, float* h, int64_t c0, double* S1, double* S2, float* m, float* a) {
  double s1[W] = {0}, s2[W] = {0};
  for (int64_t n = 0; n < N; n++) {
    const float* r = x + n * C + c0;
#pragma omp simd
    for (int c = 0; c < W; c++) { const double d = r[c]; s1[c] += d; s2[c] += d * d; }
  }
  float mm[W], aa[W];
  for (int c = 0; c < W; c++) { mm[c] = s1[c] / N; aa[c] = 1.0 / std::sqrt(s2[c] / N - (s1[c] / N) * (s1[c] / N) + 1e-5); S1[c0+c]=s1[c]; S2[c0+c]=s2[c]; m[c0+c]=mm[c]; a[c0+c]=aa[c]; }
  for (int64_t n = 0; n < N; n++) {
    const float* r = x + n * C + c0; float* o = h + n * C + c0;
#pragma omp simd
    for (int c = 0; c < W; c++) o[c] = (r[c] - mm[c]) * aa[c];
  }
}
__attribute__((noinline)) void blocked(const float* x, float* h, double* S1, double* S2, float* m, float* a) {
  int64_t c0 = 0;
  for (; c0 + 16 <= C; c0 += 16) block<16>(x, h, c0, S1, S2, m, a);
  for (; c0 + 8 <= C; c0 += 8) block<8>(x, h, c0, S1, S2, m, a);
}
__attribute__((noinline)) void blocked32(const float* x, float* h, double* S1, double* S2, float* m, float* a) {
  int64_t c0 = 0;
  for (; c0 + 32 <= C; c0 += 32) block<32>(x, h, c0, S1, S2, m, a);
  for (; c0 + 8 <= C; c0 += 8) block<8>(x, h, c0, S1, S2, m, a);
}
int main(int argc, char** argv) {
  if (argc > 1) N = atol(argv[1]);
  float* x = (float*)aligned_alloc(64, N * C * 4); float* h = (float*)aligned_alloc(64, N * C * 4);
  for (int64_t i = 0; i < N * C; i++) x[i] = (i % 977) * 0.001f;
  memset(h, 0, N * C * 4);
  std::vector<double> S1(C), S2(C); std::vector<float> m(C), a(C);
  struct { const char* n; void (*f)(const float*, float*, double*, double*, float*, float*); } fs[] = {{"rows", rows}, {"blocked16", blocked}, {"blocked32", blocked32}};
  for (int round = 0; round < 4; round++) {
    for (auto& f : fs) {
      double best = 1e9;
      for (int k = 0; k < 5; k++) { double t = now(); f.f(x, h, S1.data(), S2.data(), m.data(), a.data()); best = std::min(best, now() - t); }
      printf("%s %.2f  ", f.n, best * 1e3);
    }
    printf("\n");
  }
}
