// Loop shapes for BatchNorm's per-channel sums over an (N, C) float32 array (csrc/cpu/batch_norm_kernels.cpp):
// which order of reads feeds the hardware prefetchers from DRAM, and which is fastest from cache.
// No torch: plain C++, timed in one process, best of 5 calls per shape, three rounds.
//
//   g++ -O3 -march=x86-64-v4 -fopenmp-simd bench/loops/bn_sums.cpp -o /tmp/bn_sums
//   /tmp/bn_sums [N=32768] [prefetch rows ahead=32]      (C = 200)
//
// Measured on an AMD EPYC Zen 4 (this project's VM), 1 thread, N = 32768 (26 MB, from DRAM):
//   sum_all 0.9-1.9 ms, float_rows 1.4-3.3, double_rows 1.9-2.8, double_rows4 3.7-6.5, blocks16 4.0-6.5,
//   double_rows4_prefetch 1.6-4.8 (bimodal run to run), double_rows_prefetch 2.0-2.9;
// N = 4096 (3.3 MB, from cache): double_rows 0.18-0.22 ms, double_rows4 0.10-0.12, blocks16 0.10-0.14.
// So the kernels use double_rows: reading several rows at once wins from cache and loses twice that from DRAM.
// tiles_same_order keeps each channel's additions in row order (bitwise the sums of double_rows) with the sums in
// registers down 4, 8 or 16 rows: (4096, 200) 0.19-0.21 / 0.15 / 0.14 ms, (32768, 200) 3.5-5.7 / 2.9-3.1 / 2.6 ms.
// The kernels' statistics use it (16 rows) for data in cache, and double_rows for data from memory.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <vector>

typedef float vf8 __attribute__((vector_size(32)));
typedef double vd8 __attribute__((vector_size(64)));
static inline vf8 load8(const float* p) {
  vf8 v;
  memcpy(&v, p, 32);
  return v;
}
static inline vd8 widen8(vf8 v) { return __builtin_convertvector(v, vd8); }

static int64_t N = 32768, PF = 32;
static const int64_t C = 200;

static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// The memory limit: one sequential read into 16 float accumulators.
__attribute__((noinline)) void sum_all(const float* x, double* S1, double*) {
  float a[16] = {0};
  for (int64_t i = 0; i < N * C; i += 16) {
#pragma omp simd
    for (int j = 0; j < 16; j++) a[j] += x[i + j];
  }
  S1[0] = a[0] + a[5];
}

// ATen's shape for channels-last statistics: float sums per channel, row after row.
__attribute__((noinline)) void float_rows(const float* x, double* S1, double* S2) {
  std::vector<float> a(C, 0), b(C, 0);
  for (int64_t n = 0; n < N; n++) {
    const float* r = x + n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; c++) {
      a[c] += r[c];
      b[c] += r[c] * r[c];
    }
  }
  for (int c = 0; c < C; c++) S1[c] = a[c], S2[c] = b[c];
}

// mmops' shape: double sums per channel, row after row.
__attribute__((noinline)) void double_rows(const float* x, double* S1, double* S2) {
  for (int64_t n = 0; n < N; n++) {
    const float* r = x + n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; c++) {
      const double d = r[c];
      S1[c] += d;
      S2[c] += d * d;
    }
  }
}

// Four rows per update of the sums.
__attribute__((noinline)) void double_rows4(const float* x, double* S1, double* S2) {
  for (int64_t n = 0; n < N; n += 4) {
    const float *r0 = x + n * C, *r1 = r0 + C, *r2 = r1 + C, *r3 = r2 + C;
#pragma omp simd
    for (int64_t c = 0; c < C; c++) {
      const double d0 = r0[c], d1 = r1[c], d2 = r2[c], d3 = r3[c];
      S1[c] += (d0 + d1) + (d2 + d3);
      S2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
    }
  }
}

// The same, with the rows PF ahead prefetched.
__attribute__((noinline)) void double_rows4_prefetch(const float* x, double* S1, double* S2) {
  for (int64_t n = 0; n < N; n += 4) {
    const float *r0 = x + n * C, *r1 = r0 + C, *r2 = r1 + C, *r3 = r2 + C;
    for (int64_t j = 0; j < 4 * C; j += 16) __builtin_prefetch(r0 + PF * C + j);
#pragma omp simd
    for (int64_t c = 0; c < C; c++) {
      const double d0 = r0[c], d1 = r1[c], d2 = r2[c], d3 = r3[c];
      S1[c] += (d0 + d1) + (d2 + d3);
      S2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
    }
  }
}

__attribute__((noinline)) void double_rows_prefetch(const float* x, double* S1, double* S2) {
  for (int64_t n = 0; n < N; n++) {
    const float* r = x + n * C;
    for (int64_t j = 0; j < C; j += 16) __builtin_prefetch(r + PF * C + j);
#pragma omp simd
    for (int64_t c = 0; c < C; c++) {
      const double d = r[c];
      S1[c] += d;
      S2[c] += d * d;
    }
  }
}

// Blocks of 16 rows: each 8-channel slice summed down the block in registers, added to memory once per block.
__attribute__((noinline)) void blocks16(const float* x, double* S1, double* S2) {
  for (int64_t n = 0; n + 16 <= N; n += 16) {
    const float* blk = x + n * C;
    for (int64_t c = 0; c + 8 <= C; c += 8) {
      vd8 a0 = {}, a1 = {}, b0 = {}, b1 = {};
      for (int r = 0; r < 16; r += 2) {
        const vd8 d0 = widen8(load8(blk + r * C + c)), d1 = widen8(load8(blk + (r + 1) * C + c));
        a0 += d0, b0 += d0 * d0, a1 += d1, b1 += d1 * d1;
      }
      vd8 s;
      memcpy(&s, S1 + c, 64), s += a0 + a1, memcpy(S1 + c, &s, 64);
      memcpy(&s, S2 + c, 64), s += b0 + b1, memcpy(S2 + c, &s, 64);
    }
  }
}

// Blocks of R rows, 32-channel tiles: each tile's sums in registers down the block, every channel's additions in
// the same order as double_rows (row after row), so the sums are bitwise those of double_rows.
template <int R>
__attribute__((noinline)) void tiles_same_order(const float* x, double* S1, double* S2) {
  constexpr int64_t W = 32;
  int64_t n = 0;
  for (; n + R <= N; n += R) {
    const float* blk = x + n * C;
    int64_t c0 = 0;
    for (; c0 + W <= C; c0 += W) {
      double a[W], b[W];
#pragma omp simd
      for (int c = 0; c < W; c++) a[c] = S1[c0 + c], b[c] = S2[c0 + c];
      for (int r = 0; r < R; r++) {
        const float* row = blk + r * C + c0;
#pragma omp simd
        for (int c = 0; c < W; c++) {
          const double d = row[c];
          a[c] += d;
          b[c] += d * d;
        }
      }
#pragma omp simd
      for (int c = 0; c < W; c++) S1[c0 + c] = a[c], S2[c0 + c] = b[c];
    }
    for (int r = 0; r < R; r++) {
      const float* row = blk + r * C;
#pragma omp simd
      for (int64_t c = c0; c < C; c++) {
        const double d = row[c];
        S1[c] += d;
        S2[c] += d * d;
      }
    }
  }
  for (; n < N; n++) {
    const float* row = x + n * C;
    for (int64_t c = 0; c < C; c++) {
      const double d = row[c];
      S1[c] += d;
      S2[c] += d * d;
    }
  }
}

int main(int argc, char** argv) {
  if (argc > 1) N = atol(argv[1]);
  if (argc > 2) PF = atol(argv[2]);
  float* x = static_cast<float*>(aligned_alloc(64, N * C * 4));
  for (int64_t i = 0; i < N * C; i++) x[i] = (i % 977) * 0.001f;
  std::vector<double> S1(C), S2(C), R1(C), R2(C);
  double_rows(x, R1.data(), R2.data());
  tiles_same_order<8>(x, S1.data(), S2.data());
  if (memcmp(S1.data(), R1.data(), C * 8) || memcmp(S2.data(), R2.data(), C * 8)) printf("tiles_same_order differs!\n");
  struct {
    const char* name;
    void (*f)(const float*, double*, double*);
  } shapes[] = {{"sum_all", sum_all},
                {"float_rows", float_rows},
                {"double_rows", double_rows},
                {"double_rows4", double_rows4},
                {"double_rows4_prefetch", double_rows4_prefetch},
                {"double_rows_prefetch", double_rows_prefetch},
                {"blocks16", blocks16},
                {"tiles_same_order<4>", tiles_same_order<4>},
                {"tiles_same_order<8>", tiles_same_order<8>},
                {"tiles_same_order<16>", tiles_same_order<16>}};
  printf("(%ld, %ld) float32, 1 thread, best of 5 per round, ms\n", static_cast<long>(N), static_cast<long>(C));
  for (int round = 0; round < 3; round++) {
    for (auto& s : shapes) {
      double best = 1e9;
      for (int k = 0; k < 5; k++) {
        const double t = now();
        s.f(x, S1.data(), S2.data());
        best = std::min(best, now() - t);
      }
      printf("%s %.2f  ", s.name, best * 1e3);
    }
    printf("\n");
  }
  free(x);
}
