// The float32 loop over time of mmops.rnn on AVX-512 or AVX2 CPUs, forward and backward: each step's (B, H) x (H, H)
// product and its elementwise epilogue in one kernel, all steps in one OpenMP region (rnn_recurrence.cpp).
// Raw pointers only: no torch header. isa: gemm.h's kernel_isa(), not kNone, the same
// that packed the weights.
#pragma once
#include <cstdint>

#include "cpu/gemm.h"

namespace mmops::cpu {

// Forward: on entry out[t] (T, B, H) holds the input projection of step t (x_t W_ih^T + biases); on return
// out[t] = act(out[t] + h_{t-1} W_hh^T), h_{-1} = h0 (B, H). packed_w_hh_t: W_hh^T by pack_panels
// (gemm.h). act: simd::kTanh or simd::kRelu.
void rnn_recurrence_forward(KernelIsa isa, float* out, const float* h0, const float* packed_w_hh_t, int64_t T,
                            int64_t B, int64_t H, int64_t act, int num_threads);

// Backward through time: dpre[t] = (dpre[t+1] W_hh + dout[t]) * act'(h[t]) (dpre[T] = 0), act' read from the
// forward's output h (T, B, H). packed_w_hh: W_hh by pack_panels. When dhx is not null it receives
// dpre[0] W_hh (B, H).
void rnn_recurrence_backward(KernelIsa isa, float* dpre, const float* dout, const float* h, const float* packed_w_hh,
                             float* dhx, int64_t T, int64_t B, int64_t H, int64_t act, int num_threads);

}  // namespace mmops::cpu
