// Float32 matrix products on AVX-512 or AVX2 (the micro-kernel of gemm_kernel.h, the ISA chosen at run time) for the
// RNN (and anyone else): a packed-panel product C = A B + bias and a transposed product C = sum_s G_s^T P_s that
// reads both operands in place. Raw pointers only: no torch header. Call them with an isa other than kNone only
// (in a build without MMOPS_X86 kernel_isa() is kNone and they do nothing).
//
// Why these exist beside MKL and oneDNN: see bench/results/rnn.md (per-shape GFLOP/s of each choice). In short,
// MKL's sgemm runs its AVX2 path on AMD CPUs, and oneDNN copies transposed operands before a product; these
// kernels run at AVX-512 width on any vendor's CPU that has it, and take either operand's layout as it is.
#pragma once
#include <cstdint>

namespace mmops::cpu {

// Which kernels a call runs: a caller reads kernel_isa() once and passes it to every function below, so that
// panels packed for one width are never read by the other.
enum class KernelIsa { kNone, kAvx2, kAvx512 };

// The CPU's best: AVX-512 where it has it, else AVX2 + FMA, else none (and none in a build without MMOPS_X86).
// (rnn.cpp lets MMOPS_KERNEL_ISA=avx2 take the AVX2 kernels on an AVX-512 CPU, so that its tests run both.)
KernelIsa kernel_isa();

// B (K, N), element (k, n) at b[k * sk + n * sn], packed into panels of the ISA's width (32 columns on AVX-512, 16
// on AVX2; K x width floats each, zero past N); `packed` holds packed_floats(isa, K, N) floats. B = W^T for a
// row-major W (N, K): sk = 1, sn = K; B = W (K, N): sk = N, sn = 1.
int64_t packed_floats(KernelIsa isa, int64_t K, int64_t N);
void pack_panels(KernelIsa isa, const float* b, int64_t K, int64_t N, int64_t sk, int64_t sn, float* packed,
                 int num_threads);

// C (M, N) = A (M, K; rows lda apart) B + bias (N,; may be null), B packed by pack_panels, C contiguous.
void gemm_packed(KernelIsa isa, const float* a, int64_t M, int64_t K, int64_t lda, const float* packed, int64_t N,
                 const float* bias, float* c, int num_threads);

// C (M, N) = sum over the segments s of G_s^T P_s, i.e. the sum over their rows r of the outer products
// G_s[r]^T P_s[r]; G_s has rows of M floats (ldg apart), P_s rows of N floats (ldp apart), both read in place
// (no transpose, no packing). C is written (not accumulated into), row-major. Segments let one call sum
// products whose rows live in different buffers (dW_hh: step 0 against hx, the rest against output[:-1]).
struct RowSegment {
  const float* g;
  int64_t ldg;
  const float* p;
  int64_t ldp;
  int64_t rows;
};
void gemm_tn(KernelIsa isa, const RowSegment* segments, int num_segments, int64_t M, int64_t N, float* c,
             int num_threads);

}  // namespace mmops::cpu
