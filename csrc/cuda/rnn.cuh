// Elman RNN on the GPU: the device code around cuBLAS, torch-free. The math is csrc/cpu/rnn.cpp's (see the top of
// that file). The launcher (rnn.cu) runs the GEMMs on cuBLAS through ATen:
//   forward:  P = x W_ih^T + (b_ih + b_hh) for all T*B rows, one GEMM (token input: the row gather below), written
//             into the output buffer; per step out[t] = P_t + h_{t-1} W_hh^T, one GEMM with P_t as its C operand
//             (beta = 1: the bias and input projection ride in the GEMM's epilogue), then the activation in place;
//   backward: per step m = dpre_{t+1} W_hh (one GEMM), then dpre_t = (m + dout_t) * act'(h_t) (one pointwise
//             kernel); after the loop dW_hh, dW_ih, d_input as one GEMM each over all T*B rows, db a column sum.
// The kernels here are that pointwise work, the gather, and the column sums (db; dW_ih for tokens); the schedules
// below run the whole forward and backward against a GEMM interface: cuBLAS in rnn.cu, a plain loop in the CPU shim.
#pragma once
#include "cuda/device.cuh"

namespace mmops::cuda {

// out[r, :] = table[tok[r], :] + bias, table = W_ih^T (I, H) so that a row is contiguous; a token outside [0, I)
// (which the launcher rejects before) writes NaN instead of reading outside the table.
template <typename T>
MMOPS_GLOBAL void rnn_gather_kernel(T* out, const T* table, const int64_t* tok, const T* bias, int64_t rows, int64_t H,
                                    int64_t I) {
  using A = acc_t<T>;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t k = tok[r];
    const bool ok = k >= 0 && k < I;
    for (int64_t j = flat_thread(); j < H; j += block_threads()) {
      const A v = ok ? Num<T>::load(table[k * H + j]) : static_cast<A>(NAN);
      out[r * H + j] = Num<T>::store(bias ? v + Num<T>::load(bias[j]) : v);
    }
  }
}

// h = act(h) in place (h holds P_t + h_{t-1} W_hh^T from the GEMM).
template <typename T>
MMOPS_GLOBAL void rnn_activate_kernel(T* h, int64_t n, int act) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) h[i] = Num<T>::store(activate(act, Num<T>::load(h[i])));
}

// g = (m + dout) * act'(h); m may be null (the last step: no gradient from the future), g may be m.
template <typename T>
MMOPS_GLOBAL void rnn_step_backward_kernel(T* g, const T* m, const T* dout, const T* h, int64_t n, int act) {
  using A = acc_t<T>;
  for (int64_t i = global_thread(); i < n; i += grid_threads()) {
    const A d = (m ? Num<T>::load(m[i]) : A(0)) + Num<T>::load(dout[i]);
    g[i] = Num<T>::store(activation_grad(act, d, Num<T>::load(h[i])));
  }
}

// out = rows of bias (or zeros): the C operand of the input-projection GEMM.
template <typename T>
MMOPS_GLOBAL void rnn_fill_bias_kernel(T* out, const T* bias, int64_t rows, int64_t H) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x)
    for (int64_t j = flat_thread(); j < H; j += block_threads()) out[r * H + j] = bias ? bias[j] : Num<T>::store(0);
}

// Column sums of dpre (rows x H), one thread per column j, rows in order (deterministic, no atomics):
// tok == nullptr: out[j] = sum_r dpre[r, j] (db); else out (H x I) row j: out[j, k] = sum of dpre[r, j] over the
// rows r whose token is k (dW_ih for token input, the transpose of a scatter-add into W_ih^T).
template <typename T>
MMOPS_GLOBAL void rnn_column_sum_kernel(T* out, const T* dpre, const int64_t* tok, int64_t rows, int64_t H,
                                        int64_t I) {
  using A = acc_t<T>;
  for (int64_t j = global_thread(); j < H; j += grid_threads()) {
    if (tok == nullptr) {
      A s = A(0);
      for (int64_t r = 0; r < rows; ++r) s += Num<T>::load(dpre[r * H + j]);
      out[j] = Num<T>::store(s);
    } else {
      T* row = out + j * I;
      for (int64_t k = 0; k < I; ++k) row[k] = Num<T>::store(A(0));
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t k = tok[r];
        if (k >= 0 && k < I) row[k] = Num<T>::store(Num<T>::load(row[k]) + Num<T>::load(dpre[r * H + j]));
      }
    }
  }
}

// ---- host-side schedule ------------------------------------------------------------------------------------
inline dim3 rnn_elementwise_grid(int64_t n, int threads, int num_sms) {
  const int64_t cap = static_cast<int64_t>(num_sms) * 8, b = ceil_div(n, threads);
  return dim3(static_cast<unsigned>(b < 1 ? 1 : b > cap ? cap : b));
}

template <typename T, typename Launch>
void rnn_launch_gather(Launch& launch, T* out, const T* table, const int64_t* tok, const T* bias, int64_t rows,
                       int64_t H, int64_t I, int num_sms, int threads = 256) {
  if (rows * H == 0) return;
  const int64_t cap = static_cast<int64_t>(num_sms) * 32;
  launch(dim3(static_cast<unsigned>(rows < cap ? rows : cap)), dim3(threads), &rnn_gather_kernel<T>, out, table, tok,
         bias, rows, H, I);
}

template <typename T, typename Launch>
void rnn_launch_activate(Launch& launch, T* h, int64_t n, int act, int num_sms, int threads = 256) {
  if (n == 0) return;
  launch(rnn_elementwise_grid(n, threads, num_sms), dim3(threads), &rnn_activate_kernel<T>, h, n, act);
}

template <typename T, typename Launch>
void rnn_launch_step_backward(Launch& launch, T* g, const T* m, const T* dout, const T* h, int64_t n, int act,
                              int num_sms, int threads = 256) {
  if (n == 0) return;
  launch(rnn_elementwise_grid(n, threads, num_sms), dim3(threads), &rnn_step_backward_kernel<T>, g, m, dout, h, n,
         act);
}

// The GEMM interface of the schedules, row-major: C (m x n) = alpha op(A) op(B) + beta C, op(X) = X or X^T
// (trans_x), lda/ldb/ldc the row strides as stored:
//   gemm(trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc)
struct RNNDims {
  int64_t T, B, I, H;
};

// Forward: out (T, B, H) = every step's h. x: (T*B, I) floats, or tokens (T*B) with table = W_ih^T (I, H).
// bias: b_ih + b_hh, or null.
template <typename T, typename Launch, typename Gemm>
void rnn_forward_schedule(Launch& launch, Gemm& gemm, RNNDims d, const T* x, const int64_t* tok, const T* table,
                          const T* hx, const T* w_ih, const T* w_hh, const T* bias, T* out, int act, int num_sms,
                          int threads = 256) {
  const int64_t TB = d.T * d.B, BH = d.B * d.H;
  if (TB == 0 || d.H == 0) return;
  if (tok) {
    rnn_launch_gather(launch, out, table, tok, bias, TB, d.H, d.I, num_sms, threads);
  } else {
    const int64_t cap = static_cast<int64_t>(num_sms) * 32;
    if (bias) launch(dim3(static_cast<unsigned>(TB < cap ? TB : cap)), dim3(threads), &rnn_fill_bias_kernel<T>, out,
                     bias, TB, d.H);
    gemm(false, true, TB, d.H, d.I, 1.0, x, d.I, w_ih, d.I, bias ? 1.0 : 0.0, out, d.H);  // x W_ih^T (+ bias)
  }
  for (int64_t t = 0; t < d.T; ++t) {
    T* ht = out + t * BH;
    const T* h_prev = t == 0 ? hx : out + (t - 1) * BH;
    gemm(false, true, d.B, d.H, d.H, 1.0, h_prev, d.H, w_hh, d.H, 1.0, ht, d.H);  // P_t + h_{t-1} W_hh^T
    rnn_launch_activate(launch, ht, BH, act, num_sms, threads);
  }
}

// Backward through time. dpre: (T, B, H) workspace. Outputs (null: not wanted): d_input (T*B, I; float input
// only), d_hx (B, H), d_w_ih (H, I), d_w_hh (H, H), d_b (H).
template <typename T, typename Launch, typename Gemm>
void rnn_backward_schedule(Launch& launch, Gemm& gemm, RNNDims d, const T* dout, const T* h, const T* x,
                           const int64_t* tok, const T* hx, const T* w_ih, const T* w_hh, int act, T* dpre,
                           T* d_input, T* d_hx, T* d_w_ih, T* d_w_hh, T* d_b, int num_sms, int threads = 256) {
  const int64_t TB = d.T * d.B, BH = d.B * d.H, H = d.H;
  for (int64_t t = d.T - 1; t >= 0; --t) {
    T* gt = dpre + t * BH;
    if (t == d.T - 1) {
      rnn_launch_step_backward(launch, gt, static_cast<const T*>(nullptr), dout + t * BH, h + t * BH, BH, act,
                               num_sms, threads);
    } else {
      gemm(false, false, d.B, H, H, 1.0, gt + BH, H, w_hh, H, 0.0, gt, H);  // dpre_{t+1} W_hh
      rnn_launch_step_backward(launch, gt, static_cast<const T*>(gt), dout + t * BH, h + t * BH, BH, act, num_sms,
                               threads);
    }
  }
  if (d_hx) gemm(false, false, d.B, H, H, 1.0, dpre, H, w_hh, H, 0.0, d_hx, H);
  if (d_w_hh) {  // sum_t dpre_t^T h_{t-1}: step 0 against hx, steps 1.. against out[:-1] in one GEMM
    gemm(true, false, H, H, d.B, 1.0, dpre, H, hx, H, 0.0, d_w_hh, H);
    if (d.T > 1) gemm(true, false, H, H, (d.T - 1) * d.B, 1.0, dpre + BH, H, h, H, 1.0, d_w_hh, H);
  }
  const int64_t col_blocks = ceil_div(H, threads);
  const dim3 col_grid(static_cast<unsigned>(col_blocks < 1 ? 1 : col_blocks));
  if (d_b) launch(col_grid, dim3(threads), &rnn_column_sum_kernel<T>, d_b, static_cast<const T*>(dpre),
                  static_cast<const int64_t*>(nullptr), TB, H, int64_t(1));
  if (tok) {
    if (d_w_ih) launch(col_grid, dim3(threads), &rnn_column_sum_kernel<T>, d_w_ih, static_cast<const T*>(dpre), tok,
                       TB, H, d.I);
  } else {
    if (d_w_ih) gemm(true, false, H, d.I, TB, 1.0, dpre, H, x, d.I, 0.0, d_w_ih, d.I);   // dpre^T x
    if (d_input) gemm(false, false, TB, d.I, H, 1.0, dpre, H, w_ih, d.I, 0.0, d_input, d.I);  // dpre W_ih
  }
}

}  // namespace mmops::cuda
