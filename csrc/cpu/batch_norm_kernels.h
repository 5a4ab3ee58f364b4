// BatchNorm's CPU kernels on raw pointers (no torch header): each works on the rows [n0, n1) of a contiguous
// (N, C, L) input ((N, C) is L = 1), so the entry points (batch_norm.cpp, sync_batch_norm.cpp) can split the rows
// across threads and run a reduction and its elementwise pass in one parallel region (parallel.h).
// The math they compute is written once, at the top of batch_norm.cpp. float runs the SIMD clones (AVX-512 /
// AVX2 / SSE2, chosen at load time); double is the checking path.
#pragma once
#include <cstdint>

namespace mmops::cpu::bn {

struct Shape {
  int64_t N, C, L;  // channel c of row n starts at (n * C + c) * L
};

// Where the sums' inputs are: in cache (read in tiles of rows, faster there) or coming from memory (read row after
// row, what the prefetchers keep up with). The sums are bitwise the same either way (batch_norm_kernels.cpp).
enum class Reads { kCached, kFromMemory };

// The shift K[c] of channel c's statistics below: the mean of its finite values in the first 16 rows (the first value
// of each row when L > 1), always finite; 0 when there is none. It centres the sums, so that float32 block sums
// of (x - K)^2 do not cancel (batch_norm_kernels.cpp, "the sums").
void shifts(const float* x, Shape s, float* K);
void shifts(const double* x, Shape s, double* K);

// Statistics: S1[c] += sum (x - K[c]), S2[c] += sum (x - K[c])^2, in blocks of rows added in double.
void stats(const float* x, Shape s, const float* K, int64_t n0, int64_t n1, double* S1, double* S2, Reads reads);
void stats(const double* x, Shape s, const double* K, int64_t n0, int64_t n1, double* S1, double* S2, Reads reads);

// h = act((x - m[c]) * a[c] + b[c]).
void normalize(int64_t act, const float* x, float* h, Shape s, const float* m, const float* a, const float* b,
               int64_t n0, int64_t n1);
void normalize(int64_t act, const double* x, double* h, Shape s, const double* m, const double* a, const double* b,
               int64_t n0, int64_t n1);

// The backward's sums: Sdy[c] += sum dy', Sdyx[c] += sum dy' (x - mean[c]), dy' = dh * act'(h), in blocks of rows
// added in double.
void backward_sums(int64_t act, const float* dh, const float* h, const float* x, Shape s, const float* mean,
                   int64_t n0, int64_t n1, double* Sdy, double* Sdyx, Reads reads);
void backward_sums(int64_t act, const double* dh, const double* h, const double* x, Shape s, const double* mean,
                   int64_t n0, int64_t n1, double* Sdy, double* Sdyx, Reads reads);

// dx = A[c] dy' + B[c] (x - m[c]) + D[c] (batch statistics), or dx = A[c] dy' when B is null (eval mode: the
// (x - mean) term is absent, not 0 * (x - mean), so a NaN or inf in x does not reach dx, as in PyTorch).
void backward_dx(int64_t act, const float* dh, const float* h, const float* x, float* dx, Shape s, const float* m,
                 const float* A, const float* B, const float* D, int64_t n0, int64_t n1);
void backward_dx(int64_t act, const double* dh, const double* h, const double* x, double* dx, Shape s,
                 const double* m, const double* A, const double* B, const double* D, int64_t n0, int64_t n1);

// The two elementwise passes above for (N, C) float32 with non-temporal stores, for outputs that cannot stay in
// cache (batch_norm.cpp decides): the output goes to memory without being read first. AVX-512 or AVX2; they return
// false, having written nothing, where the CPU has neither or the layout is not (N, C).
bool normalize_streaming(int64_t act, const float* x, float* h, Shape s, const float* m, const float* a,
                         const float* b, int64_t n0, int64_t n1);
bool backward_dx_streaming(int64_t act, const float* dh, const float* h, const float* x, float* dx, Shape s,
                           const float* m, const float* A, const float* B, const float* D, int64_t n0, int64_t n1);
// double (the checking path) has none.
inline bool normalize_streaming(int64_t, const double*, double*, Shape, const double*, const double*, const double*,
                                int64_t, int64_t) {
  return false;
}
inline bool backward_dx_streaming(int64_t, const double*, const double*, const double*, double*, Shape,
                                  const double*, const double*, const double*, const double*, int64_t, int64_t) {
  return false;
}

}  // namespace mmops::cpu::bn
