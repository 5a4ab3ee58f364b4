// TEST-ONLY: C entry points that run the CUDA device code of csrc/cuda/*.cuh on the CPU through the shim, with the
// same host-side schedules the .cu launchers use. Built by tests/test_cuda_device_code.py with the system C++
// compiler into a temporary shared library and called through ctypes (no torch header, no nvcc).
// dtype codes: 0 float32, 1 float64, 2 bfloat16, 3 float16.
#include "shim.h"  // first: provides the CUDA names to the device code

#include <cmath>
#include <vector>

#include "cuda/cross_entropy.cuh"

using namespace mmops::cuda;

namespace {

template <typename F>
int with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f(float{});
    case 1: return f(double{});
    case 2: return f(mmops_shim::bfloat16{});
    case 3: return f(mmops_shim::half{});
  }
  return -1;
}

constexpr int kShimSMs = 2;

}  // namespace

extern "C" {

// The forward of cross_entropy_forward(_inplace): returns -1 when done, or the first row with an out-of-range
// target (nothing written then, as the launcher raises before the row kernel). grad may be x (in place) or null.
int64_t shim_ce_forward(int dtype, const void* x, int64_t N, int64_t C, const int64_t* y, const void* t,
                        const void* w, int64_t ignore_index, double eps, int reduction, void* grad, void* out,
                        int max_threads, int force_kind, int64_t max_blocks) {
  int64_t result = -1;
  with_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    using A = acc_t<T>;
    mmops_shim::Launch launch;
    CEParams<T> p;
    p.x = static_cast<const T*>(x);
    p.N = N;
    p.C = C;
    p.y = y;
    p.t = static_cast<const T*>(t);
    p.w = static_cast<const T*>(w);
    p.ignore_index = ignore_index;
    p.eps = static_cast<A>(eps);
    p.grad = static_cast<T*>(grad);
    A W = static_cast<A>(C);
    if (p.w) {
      W = 0;
      for (int64_t c = 0; c < C; ++c) W += Num<T>::load(p.w[c]);
    }
    p.W = W;
    std::vector<A> row_loss(N > 0 ? N : 1);
    p.row_loss = row_loss.data();
    double denom = static_cast<double>(N);
    A row_scale = A(1);
    if (p.y) {
      int64_t bad = -1;
      ce_launch_denominator(launch, p, reduction == 1, &denom, &row_scale, &bad, max_threads);
      if (bad >= 0) {
        result = bad;
        return 0;
      }
    } else {
      row_scale = static_cast<A>(1.0 / denom);
    }
    if (reduction == 1) p.row_scale = &row_scale;
    CEPlan plan = ce_plan<T>(N, C, kShimSMs, max_threads, force_kind);
    if (max_blocks > 0 && plan.blocks > max_blocks) plan.blocks = max_blocks;  // blocks loop over several rows
    ce_launch_rows(launch, p, plan, reduction, &denom, static_cast<T*>(out));
    return 0;
  });
  return result;
}

// The plan the launcher would pick (kind, threads) for these sizes: lets the tests check they cover each kind.
int shim_ce_plan_kind(int dtype, int64_t N, int64_t C, int max_threads) {
  return with_dtype(dtype, [&](auto zero) { return ce_plan<decltype(zero)>(N, C, kShimSMs, max_threads).kind; });
}

void shim_ce_scale_grad(int dtype, const void* g, void* out, int64_t N, int64_t C, const void* go,
                        int64_t go_stride) {
  with_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    mmops_shim::Launch launch;
    ce_launch_scale_grad(launch, static_cast<const T*>(g), static_cast<T*>(out), N, C, static_cast<const T*>(go),
                         go_stride, kShimSMs, 64);
    return 0;
  });
}

}  // extern "C"

// ---- BatchNorm ---------------------------------------------------------------------------------------------
#include "cuda/batch_norm.cuh"

namespace {
template <typename T>
struct BNWorkspace {
  std::vector<unsigned char> partial;
  std::vector<acc_t<T>> coef;
  BNWorkspace(const BNPlan& p, int64_t C) : partial(bn_partial_bytes<T>(p, C) + 16), coef(3 * C + 1) {}
};
}  // namespace

extern "C" {

void shim_bn_forward(int dtype, const void* x, void* h, int64_t N, int64_t C, int64_t L, const void* weight,
                     const void* bias, void* running_mean, void* running_var, void* mean, void* invstd, int training,
                     double momentum, double eps, int bessel, int act, int max_threads, int splits) {
  with_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    mmops_shim::Launch launch;
    const BNShape s{N, C, L};
    const BNPlan plan = bn_plan(s, kShimSMs, max_threads, splits);
    BNWorkspace<T> ws(plan, C);
    bn_launch_forward(launch, plan, s, static_cast<const T*>(x), static_cast<T*>(h), static_cast<const T*>(weight),
                      static_cast<const T*>(bias), static_cast<T*>(running_mean), static_cast<T*>(running_var),
                      training != 0, momentum, eps, bessel != 0, act, static_cast<T*>(mean), static_cast<T*>(invstd),
                      ws.partial.data());
    return 0;
  });
}

void shim_bn_backward(int dtype, const void* dh, const void* h, const void* x, void* dx, void* dgamma, void* dbeta,
                      int64_t N, int64_t C, int64_t L, const void* weight, const void* mean, const void* invstd,
                      int training, int bessel, int act, int max_threads, int splits) {
  with_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    mmops_shim::Launch launch;
    const BNShape s{N, C, L};
    const BNPlan plan = bn_plan(s, kShimSMs, max_threads, splits);
    BNWorkspace<T> ws(plan, C);
    bn_launch_backward(launch, plan, s, static_cast<const T*>(dh), static_cast<const T*>(h),
                       static_cast<const T*>(x), static_cast<T*>(dx), static_cast<T*>(dgamma),
                       static_cast<T*>(dbeta), static_cast<const T*>(weight), static_cast<const T*>(mean),
                       static_cast<const T*>(invstd), training != 0, bessel != 0, act, ws.partial.data(),
                       ws.coef.data());
    return 0;
  });
}

void shim_bn_stats(int dtype, const void* x, int64_t N, int64_t C, int64_t L, double* mean64, double* m2_64,
                   int max_threads, int splits) {
  with_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    mmops_shim::Launch launch;
    const BNShape s{N, C, L};
    const BNPlan plan = bn_plan(s, kShimSMs, max_threads, splits);
    BNWorkspace<T> ws(plan, C);
    bn_launch_stats(launch, plan, s, static_cast<const T*>(x), mean64, m2_64, ws.partial.data());
    return 0;
  });
}

void shim_bn_backward_reduce(int dtype, const void* dh, const void* h, const void* x, const void* mean, int64_t N,
                             int64_t C, int64_t L, int act, double* sum_dy, double* sum_dy_xmu, int max_threads,
                             int splits) {
  with_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    mmops_shim::Launch launch;
    const BNShape s{N, C, L};
    const BNPlan plan = bn_plan(s, kShimSMs, max_threads, splits);
    BNWorkspace<T> ws(plan, C);
    bn_launch_backward_reduce(launch, plan, s, static_cast<const T*>(dh), static_cast<const T*>(h),
                              static_cast<const T*>(x), static_cast<const T*>(mean), act, sum_dy, sum_dy_xmu,
                              ws.partial.data());
    return 0;
  });
}

void shim_bn_backward_elemt(int dtype, const void* dh, const void* h, const void* x, void* dx, int64_t N, int64_t C,
                            int64_t L, const void* weight, const void* mean, const void* invstd, const double* sum_dy,
                            const double* sum_dy_xmu, int64_t count, int bessel, int act, int max_threads) {
  with_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    mmops_shim::Launch launch;
    const BNShape s{N, C, L};
    const BNPlan plan = bn_plan(s, kShimSMs, max_threads);
    BNWorkspace<T> ws(plan, C);
    bn_launch_backward_elemt(launch, plan, s, static_cast<const T*>(dh), static_cast<const T*>(h),
                             static_cast<const T*>(x), static_cast<T*>(dx), static_cast<const T*>(weight),
                             static_cast<const T*>(mean), static_cast<const T*>(invstd), sum_dy, sum_dy_xmu, count,
                             bessel != 0, act, ws.coef.data());
    return 0;
  });
}

}  // extern "C"

// ---- RNN ---------------------------------------------------------------------------------------------------
#include "cuda/rnn.cuh"

namespace {
// The schedules' GEMM (cuBLAS in rnn.cu) as a plain loop, accumulating in acc_t<T>.
struct ShimGemm {
  template <typename T>
  void operator()(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const T* a, int64_t lda,
                  const T* b, int64_t ldb, double beta, T* c, int64_t ldc) const {
    using A = acc_t<T>;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        A s = A(0);
        for (int64_t p = 0; p < k; ++p) {
          const A av = Num<T>::load(ta ? a[p * lda + i] : a[i * lda + p]);
          const A bv = Num<T>::load(tb ? b[j * ldb + p] : b[p * ldb + j]);
          s += av * bv;
        }
        const A old = beta != 0 ? static_cast<A>(beta) * Num<T>::load(c[i * ldc + j]) : A(0);
        c[i * ldc + j] = Num<T>::store(static_cast<A>(alpha) * s + old);
      }
  }
};
}  // namespace

extern "C" {

// tok != null: token input, table = W_ih^T (I, H).
void shim_rnn_forward(int dtype, const void* x, const int64_t* tok, const void* table, const void* hx, const void* w_ih,
                      const void* w_hh, const void* bias, void* out, int64_t T_, int64_t B, int64_t I, int64_t H,
                      int act, int max_threads) {
  with_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    mmops_shim::Launch launch;
    ShimGemm gemm;
    rnn_forward_schedule(launch, gemm, RNNDims{T_, B, I, H}, static_cast<const T*>(x), tok,
                         static_cast<const T*>(table), static_cast<const T*>(hx), static_cast<const T*>(w_ih),
                         static_cast<const T*>(w_hh), static_cast<const T*>(bias), static_cast<T*>(out), act, kShimSMs,
                         max_threads);
    return 0;
  });
}

void shim_rnn_backward(int dtype, const void* dout, const void* h, const void* x, const int64_t* tok, const void* hx,
                       const void* w_ih, const void* w_hh, void* dpre, void* d_input, void* d_hx, void* d_w_ih,
                       void* d_w_hh, void* d_b, int64_t T_, int64_t B, int64_t I, int64_t H, int act,
                       int max_threads) {
  with_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    mmops_shim::Launch launch;
    ShimGemm gemm;
    rnn_backward_schedule(launch, gemm, RNNDims{T_, B, I, H}, static_cast<const T*>(dout), static_cast<const T*>(h),
                          static_cast<const T*>(x), tok, static_cast<const T*>(hx), static_cast<const T*>(w_ih),
                          static_cast<const T*>(w_hh), act, static_cast<T*>(dpre), static_cast<T*>(d_input),
                          static_cast<T*>(d_hx), static_cast<T*>(d_w_ih), static_cast<T*>(d_w_hh),
                          static_cast<T*>(d_b), kShimSMs, max_threads);
    return 0;
  });
}

}  // extern "C"
