// The float32 recurrence of mmops.rnn on AVX-512 CPUs: the loop over time, forward and backward, with the
// (B, H) x (H, H) product of each step and its elementwise epilogue in one hand-written kernel (see
// rnn_recurrence.cpp). Raw pointers only: no torch header, so this unit compiles in a second.
#pragma once
#include <cstdint>

namespace mmops::cpu {

// True where the kernels below can run (x86-64 built with GCC, and the CPU has AVX-512F).
bool rnn_recurrence_available();

// B (K, N), element (k, n) at b[k * sk + n * sn], packed into panels of 32 columns (K x 32 floats each, zero past
// N) for the products below; `packed` holds rnn_packed_floats(K, N) floats. W_hh for the recurrence (K = N = H):
// forward (C = A W_hh^T) sk = 1, sn = H; backward (C = A W_hh) sk = H, sn = 1.
int64_t rnn_packed_floats(int64_t K, int64_t N);
void rnn_pack_panels(const float* b, int64_t K, int64_t N, int64_t sk, int64_t sn, float* packed, int num_threads);

// C (M, N) = A (M, K; rows lda apart) B + bias (N,; may be null), B packed by rnn_pack_panels, C contiguous:
// the input projection x W_ih^T + b and d_input = dpre W_ih.
void rnn_packed_product(const float* a, int64_t M, int64_t K, int64_t lda, const float* packed, int64_t N,
                        const float* bias, float* c, int num_threads);

// Forward: on entry out[t] (T, B, H) holds the input projection of step t (x_t W_ih^T + biases); on return
// out[t] = act(out[t] + h_{t-1} W_hh^T), h_{-1} = h0 (B, H). act: simd::kTanh or simd::kRelu.
void rnn_recurrence_forward(float* out, const float* h0, const float* packed_t, int64_t T, int64_t B, int64_t H,
                            int64_t act, int num_threads);

// Backward through time: dpre[t] = (dpre[t+1] W_hh + dout[t]) * act'(h[t]) (dpre[T] = 0), act' read from the
// forward's output h (T, B, H). When dhx is not null it receives dpre[0] W_hh (B, H).
void rnn_recurrence_backward(float* dpre, const float* dout, const float* h, const float* packed, float* dhx,
                             int64_t T, int64_t B, int64_t H, int64_t act, int num_threads);

// C (M, N) = sum over the segments of G^T P, i.e. sum over their rows r of the outer product G[r]^T P[r]:
// dW_hh = sum_t dpre_t^T h_{t-1} and dW_ih = sum_t dpre_t^T x_t as one pass over all rows. G has rows of M
// floats (ldg apart), P rows of N floats (ldp apart); C is written (not accumulated into), row-major.
struct RowSegment {
  const float* g;
  int64_t ldg;
  const float* p;
  int64_t ldp;
  int64_t rows;
};
void rnn_weight_grad(const RowSegment* segments, int num_segments, int64_t M, int64_t N, float* C, int num_threads);

}  // namespace mmops::cpu
