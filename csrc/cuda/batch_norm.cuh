// Fused BatchNorm (+ tanh/relu) on the GPU: device code and its host-side schedule, torch-free. The math is
// csrc/cpu/batch_norm.cpp's (see the top of that file). Input (N, C) or (N, C, L), contiguous: channel c of row n
// starts at (n*C + c)*L; (N, C) is L = 1.
//   statistics: per channel, Welford (count, mean, M2) over the N*L values in one read of x -- a block reduces a
//     tile of channels over a slice of the rows ("split"); a second tiny kernel merges the splits of each channel
//     in a fixed order in double (deterministic), writes mean and invstd and updates the running statistics
//     (running_var with Bessel's n/(n-1); the normalising variance biased, or unbiased with `bessel`);
//   forward elementwise: h = act((x - mean) * gamma * invstd + beta);
//   backward: (sum dy', sum dy' (x - mean)) per channel, dy' = dh * act'(h), in the same two-level reduction
//     (one read of dh, h, x); then dx = A dy' + B (x - mean) + D in one elementwise pass.
// Block shapes: L = 1, a block of 32 x Y threads covers 32 consecutive channels (a warp reads 32 neighbouring
// values of a row: coalesced) and Y rows at a time; L > 1, a block covers one channel, its threads walking the
// channel's values in order (coalesced along L).
#pragma once
#include "cuda/device.cuh"

namespace mmops::cuda {

struct BNShape {
  int64_t N, C, L;
};

template <typename A>
struct Welford {
  A mean, m2;
  int n;  // per block at most 2^31 - 1 values (the plan splits the rows so)
  static MMOPS_DEVICE Welford identity() { return {A(0), A(0), 0}; }
  static MMOPS_DEVICE Welford combine(const Welford& a, const Welford& b) {
    const int n = a.n + b.n;
    if (n == 0) return identity();
    const A delta = b.mean - a.mean, fb = static_cast<A>(b.n) / static_cast<A>(n);
    return {a.mean + delta * fb, a.m2 + b.m2 + delta * delta * static_cast<A>(a.n) * fb, n};
  }
  MMOPS_DEVICE Welford shuffle_xor(int o) const {
    return {__shfl_xor_sync(kFullMask, mean, o), __shfl_xor_sync(kFullMask, m2, o), __shfl_xor_sync(kFullMask, n, o)};
  }
  MMOPS_DEVICE void add(A x) {
    ++n;
    const A delta = x - mean;
    mean += delta / static_cast<A>(n);
    m2 += delta * (x - mean);
  }
};

// The reductions' per-element steps.
template <typename T>
struct StatsOp {
  using A = acc_t<T>;
  using State = Welford<A>;
  const T* x;
  MMOPS_DEVICE void add(State& st, int64_t i, int64_t) const { st.add(Num<T>::load(x[i])); }
};

template <typename T>
struct BackwardSumsOp {
  using A = acc_t<T>;
  using State = Sums<A, 2>;  // sum dy', sum dy' (x - mean)
  const T *dh, *h, *x, *mean;
  int act;
  MMOPS_DEVICE void add(State& st, int64_t i, int64_t c) const {
    const A d = activation_grad(act, Num<T>::load(dh[i]), Num<T>::load(h[i]));
    st.v[0] += d;
    st.v[1] += d * (Num<T>::load(x[i]) - Num<T>::load(mean[c]));
  }
};

constexpr int kBNTileChannels = 32;

// partial[split * C + c] = the state of channel c over this block's slice of the values. kRows: L == 1.
template <typename Op, bool kRows>
MMOPS_GLOBAL void MMOPS_LAUNCH_BOUNDS(256) bn_reduce_kernel(Op op, BNShape s, typename Op::State* partial) {
  using State = typename Op::State;
  State st = State::identity();
  const int64_t split = blockIdx.y, splits = gridDim.y;
  if constexpr (kRows) {
    // blockDim = (32, Y), Y a power of two; rows split into `splits` equal slices
    MMOPS_SHARED State tile[256];
    const int64_t c = static_cast<int64_t>(blockIdx.x) * kBNTileChannels + threadIdx.x;
    const int64_t rows = ceil_div(s.N, splits), n0 = split * rows, n1 = n0 + rows < s.N ? n0 + rows : s.N;
    if (c < s.C)
      for (int64_t n = n0 + threadIdx.y; n < n1; n += blockDim.y) op.add(st, n * s.C + c, c);
    const int tx = threadIdx.x, ty = threadIdx.y;
    tile[ty * kBNTileChannels + tx] = st;
    __syncthreads();
    for (int stride = blockDim.y / 2; stride > 0; stride /= 2) {  // fixed tree: deterministic
      if (ty < stride)
        tile[ty * kBNTileChannels + tx] =
            State::combine(tile[ty * kBNTileChannels + tx], tile[(ty + stride) * kBNTileChannels + tx]);
      __syncthreads();
    }
    if (ty == 0 && c < s.C) partial[split * s.C + c] = tile[tx];
  } else {
    MMOPS_SHARED State scratch[kWarpSize];
    const int64_t c = blockIdx.x, count = s.N * s.L;
    const int64_t per = ceil_div(count, splits), r0 = split * per, r1 = r0 + per < count ? r0 + per : count;
    for (int64_t r = r0 + flat_thread(); r < r1; r += block_threads()) {
      const int64_t n = r / s.L, l = r - n * s.L;
      op.add(st, (n * s.C + c) * s.L + l, c);
    }
    st = block_reduce(st, scratch);
    if (flat_thread() == 0) partial[split * s.C + c] = st;
  }
}

// Per channel: the splits merged in order, in double. Writes what is asked for (null pointers: not asked):
// mean/invstd in T (training forward), the running statistics, mean/M2 in double (SyncBatchNorm's local stats).
template <typename T>
MMOPS_GLOBAL void bn_stats_finish_kernel(const Welford<acc_t<T>>* partial, int splits, int64_t C, bool bessel,
                                         double momentum, double eps, T* mean, T* invstd, T* running_mean,
                                         T* running_var, double* mean64, double* m2_64) {
  for (int64_t c = global_thread(); c < C; c += grid_threads()) {
    double n = 0, m = 0, m2 = 0;
    for (int k = 0; k < splits; ++k) {
      const Welford<acc_t<T>> w = partial[static_cast<int64_t>(k) * C + c];
      if (w.n == 0) continue;
      const double nb = w.n, tot = n + nb, delta = static_cast<double>(w.mean) - m;
      m += delta * nb / tot;
      m2 += static_cast<double>(w.m2) + delta * delta * n * nb / tot;
      n = tot;
    }
    if (mean64) {
      mean64[c] = m;
      m2_64[c] = m2;
    }
    if (mean) {
      const double var = m2 / (bessel ? n - 1 : n);
      mean[c] = Num<T>::store(static_cast<acc_t<T>>(m));
      invstd[c] = Num<T>::store(static_cast<acc_t<T>>(1.0 / sqrt(var + eps)));
    }
    if (running_mean) {
      running_mean[c] = Num<T>::store(static_cast<acc_t<T>>((1 - momentum) * Num<T>::load(running_mean[c]) +
                                                            momentum * m));
      running_var[c] = Num<T>::store(static_cast<acc_t<T>>((1 - momentum) * Num<T>::load(running_var[c]) +
                                                           momentum * (m2 / (n - 1))));
    }
  }
}

// Eval mode: mean and invstd from the running statistics.
template <typename T>
MMOPS_GLOBAL void bn_eval_stats_kernel(const T* running_mean, const T* running_var, int64_t C, double eps, T* mean,
                                       T* invstd) {
  for (int64_t c = global_thread(); c < C; c += grid_threads()) {
    mean[c] = running_mean[c];
    invstd[c] = Num<T>::store(static_cast<acc_t<T>>(1.0 / sqrt(static_cast<double>(Num<T>::load(running_var[c])) + eps)));
  }
}

// Elementwise passes walk "lines": L = 1, line n is row n (C values, the channel is the position); L > 1, line
// n*C + c is channel c of row n (L values). One division per line, none per element.
template <typename T>
MMOPS_GLOBAL void bn_normalize_kernel(const T* x, T* h, BNShape s, const T* mean, const T* invstd, const T* weight,
                                      const T* bias, int act) {
  using A = acc_t<T>;
  const bool rows = s.L == 1;
  const int64_t lines = rows ? s.N : s.N * s.C, len = rows ? s.C : s.L;
  for (int64_t line = blockIdx.x; line < lines; line += gridDim.x) {
    const int64_t c_line = rows ? 0 : line % s.C;
    for (int64_t j = flat_thread(); j < len; j += block_threads()) {
      const int64_t c = rows ? j : c_line, i = line * len + j;
      const A a = (weight ? Num<T>::load(weight[c]) : A(1)) * Num<T>::load(invstd[c]);
      const A y = (Num<T>::load(x[i]) - Num<T>::load(mean[c])) * a + (bias ? Num<T>::load(bias[c]) : A(0));
      h[i] = Num<T>::store(activate(act, y));
    }
  }
}

// Per channel, from the backward sums (partials merged in double, or SyncBatchNorm's all-reduced double sums):
// dgamma = sum dy' * invstd, dbeta = sum dy', and coef = (A, B, D) per channel for dx = A dy' + B (x - mean) + D.
template <typename T>
MMOPS_GLOBAL void bn_backward_finish_kernel(const Sums<acc_t<T>, 2>* partial, int splits, const double* sum_dy,
                                            const double* sum_dy_xmu, int64_t C, int64_t n, const T* weight,
                                            const T* invstd, bool training, bool bessel, T* dgamma, T* dbeta,
                                            acc_t<T>* coef, double* sum_dy_out, double* sum_dy_xmu_out) {
  using A = acc_t<T>;
  for (int64_t c = global_thread(); c < C; c += grid_threads()) {
    double sdy = 0, sdyx = 0;
    if (partial) {
      for (int k = 0; k < splits; ++k) {
        sdy += static_cast<double>(partial[static_cast<int64_t>(k) * C + c].v[0]);
        sdyx += static_cast<double>(partial[static_cast<int64_t>(k) * C + c].v[1]);
      }
    } else if (sum_dy) {
      sdy = sum_dy[c];
      sdyx = sum_dy_xmu[c];
    }  // else: eval mode with neither dgamma nor dbeta wanted, where dx needs no sums
    if (sum_dy_out) {
      sum_dy_out[c] = sdy;
      sum_dy_xmu_out[c] = sdyx;
    }
    if (!coef) continue;
    const double inv = static_cast<double>(Num<T>::load(invstd[c]));
    if (dgamma) dgamma[c] = Num<T>::store(static_cast<A>(sdyx * inv));
    if (dbeta) dbeta[c] = Num<T>::store(static_cast<A>(sdy));
    const double a = (weight ? static_cast<double>(Num<T>::load(weight[c])) : 1.0) * inv;  // gamma * invstd
    if (training) {
      const double k = bessel ? static_cast<double>(n) / static_cast<double>(n - 1) : 1.0;
      coef[c] = static_cast<A>(a);
      coef[C + c] = static_cast<A>(-a * k * sdyx * inv * inv / static_cast<double>(n));
      coef[2 * C + c] = static_cast<A>(-a * sdy / static_cast<double>(n));
    } else {
      coef[c] = static_cast<A>(a);
      coef[C + c] = coef[2 * C + c] = A(0);
    }
  }
}

// Training: dx = A dy' + B (x - mean) + D. Eval: dx = A dy' (no 0 * (x - mean) term, which would turn an inf in x
// into NaN).
template <typename T>
MMOPS_GLOBAL void bn_backward_dx_kernel(const T* dh, const T* h, const T* x, T* dx, BNShape s, const T* mean,
                                        const acc_t<T>* coef, int act, bool training) {
  using A = acc_t<T>;
  const bool rows = s.L == 1;
  const int64_t lines = rows ? s.N : s.N * s.C, len = rows ? s.C : s.L;
  for (int64_t line = blockIdx.x; line < lines; line += gridDim.x) {
    const int64_t c_line = rows ? 0 : line % s.C;
    for (int64_t j = flat_thread(); j < len; j += block_threads()) {
      const int64_t c = rows ? j : c_line, i = line * len + j;
      const A d = activation_grad(act, Num<T>::load(dh[i]), Num<T>::load(h[i]));
      const A v = training ? coef[c] * d + coef[s.C + c] * (Num<T>::load(x[i]) - Num<T>::load(mean[c])) +
                                 coef[2 * s.C + c]
                           : coef[c] * d;
      dx[i] = Num<T>::store(v);
    }
  }
}

// ---- host-side schedule ------------------------------------------------------------------------------------
struct BNPlan {
  bool rows;       // L == 1: channel tiles of 32; else one channel per block
  dim3 grid, block;
  int splits;      // slices of the values per channel (grid.y), merged by the finish kernels
  int threads;     // elementwise blocks
  int64_t lines_grid;
};

// max_threads: threads per block (256 on the GPU; smaller in the CPU shim's tests); splits > 0 forces the split.
inline BNPlan bn_plan(BNShape s, int num_sms, int max_threads = 256, int force_splits = 0) {
  BNPlan p;
  p.rows = s.L == 1;
  const int64_t count = s.N * s.L;  // values per channel
  const int y = max_threads / kBNTileChannels;
  p.block = p.rows ? dim3(kBNTileChannels, y) : dim3(max_threads);
  const int64_t tiles = p.rows ? ceil_div(s.C, kBNTileChannels) : s.C;
  const int64_t per_block_min = static_cast<int64_t>(max_threads) * 16;  // >= 16 values per thread of a split
  int64_t splits = ceil_div(static_cast<int64_t>(num_sms) * 4, tiles > 0 ? tiles : 1);  // fill the GPU
  const int64_t by_work = p.rows ? ceil_div(s.N, static_cast<int64_t>(y) * 16) : ceil_div(count, per_block_min);
  if (splits > by_work) splits = by_work;
  const int64_t by_count = ceil_div(count, int64_t(1) << 30);  // Welford counts stay int
  if (splits < by_count) splits = by_count;
  if (splits > 65535) splits = 65535;
  if (splits < 1) splits = 1;
  if (force_splits > 0) splits = force_splits;
  p.splits = static_cast<int>(splits);
  p.grid = dim3(static_cast<unsigned>(tiles > 0 ? tiles : 1), p.splits);
  p.threads = max_threads;
  const int64_t lines = p.rows ? s.N : s.N * s.C;
  p.lines_grid = lines < static_cast<int64_t>(num_sms) * 32 ? (lines > 0 ? lines : 1) : static_cast<int64_t>(num_sms) * 32;
  return p;
}

// Workspace: the partial states (the larger of the two ops') and the backward coefficients.
template <typename T>
inline int64_t bn_partial_bytes(const BNPlan& p, int64_t C) {
  const int64_t per = sizeof(Welford<acc_t<T>>) > sizeof(Sums<acc_t<T>, 2>) ? sizeof(Welford<acc_t<T>>)
                                                                            : sizeof(Sums<acc_t<T>, 2>);
  return per * C * p.splits;
}

template <typename Op, typename Launch>
void bn_launch_reduce(Launch& launch, const BNPlan& p, const Op& op, BNShape s, typename Op::State* partial) {
  if (p.rows) launch(p.grid, p.block, &bn_reduce_kernel<Op, true>, op, s, partial);
  else launch(p.grid, p.block, &bn_reduce_kernel<Op, false>, op, s, partial);
}

inline dim3 bn_channels_grid(int64_t C, int threads) {
  const int64_t b = ceil_div(C, threads);
  return dim3(static_cast<unsigned>(b < 1 ? 1 : b > 1024 ? 1024 : b));
}

// Training forward: statistics, running statistics, mean/invstd, h. Eval forward: mean/invstd from the running
// statistics, h. `partial`: bn_partial_bytes of workspace.
template <typename T, typename Launch>
void bn_launch_forward(Launch& launch, const BNPlan& p, BNShape s, const T* x, T* h, const T* weight, const T* bias,
                       T* running_mean, T* running_var, bool training, double momentum, double eps, bool bessel,
                       int act, T* mean, T* invstd, void* partial) {
  if (training) {
    auto* part = static_cast<Welford<acc_t<T>>*>(partial);
    bn_launch_reduce(launch, p, StatsOp<T>{x}, s, part);
    launch(bn_channels_grid(s.C, p.threads), dim3(p.threads), &bn_stats_finish_kernel<T>,
           static_cast<const Welford<acc_t<T>>*>(part), p.splits, s.C, bessel, momentum, eps, mean, invstd,
           running_mean, running_var, static_cast<double*>(nullptr), static_cast<double*>(nullptr));
  } else {
    launch(bn_channels_grid(s.C, p.threads), dim3(p.threads), &bn_eval_stats_kernel<T>,
           static_cast<const T*>(running_mean), static_cast<const T*>(running_var), s.C, eps, mean, invstd);
  }
  if (s.N * s.C * s.L > 0)
    launch(dim3(static_cast<unsigned>(p.lines_grid)), dim3(p.threads), &bn_normalize_kernel<T>, x, h, s,
           static_cast<const T*>(mean), static_cast<const T*>(invstd), weight, bias, act);
}

// Backward: dgamma / dbeta / dx (null: not wanted). coef: 3*C acc_t<T> of workspace.
template <typename T, typename Launch>
void bn_launch_backward(Launch& launch, const BNPlan& p, BNShape s, const T* dh, const T* h, const T* x, T* dx,
                        T* dgamma, T* dbeta, const T* weight, const T* mean, const T* invstd, bool training,
                        bool bessel, int act, void* partial, acc_t<T>* coef) {
  auto* part = static_cast<Sums<acc_t<T>, 2>*>(partial);
  const bool need_sums = training || dgamma || dbeta;
  if (need_sums) bn_launch_reduce(launch, p, BackwardSumsOp<T>{dh, h, x, mean, act}, s, part);
  launch(bn_channels_grid(s.C, p.threads), dim3(p.threads), &bn_backward_finish_kernel<T>,
         static_cast<const Sums<acc_t<T>, 2>*>(need_sums ? part : nullptr), need_sums ? p.splits : 0,
         static_cast<const double*>(nullptr), static_cast<const double*>(nullptr), s.C, s.N * s.L, weight, invstd,
         training, bessel, dgamma, dbeta, coef, static_cast<double*>(nullptr), static_cast<double*>(nullptr));
  if (dx && s.N * s.C * s.L > 0)
    launch(dim3(static_cast<unsigned>(p.lines_grid)), dim3(p.threads), &bn_backward_dx_kernel<T>, dh, h, x, dx, s,
           mean, static_cast<const acc_t<T>*>(coef), act, training);
}

// SyncBatchNorm's pieces: local (mean, M2) in double; local (sum dy', sum dy' (x - mean)) in double; dx from the
// all-reduced sums and the global count.
template <typename T, typename Launch>
void bn_launch_stats(Launch& launch, const BNPlan& p, BNShape s, const T* x, double* mean64, double* m2_64,
                     void* partial) {
  auto* part = static_cast<Welford<acc_t<T>>*>(partial);
  bn_launch_reduce(launch, p, StatsOp<T>{x}, s, part);
  launch(bn_channels_grid(s.C, p.threads), dim3(p.threads), &bn_stats_finish_kernel<T>,
         static_cast<const Welford<acc_t<T>>*>(part), p.splits, s.C, false, 0.0, 0.0, static_cast<T*>(nullptr),
         static_cast<T*>(nullptr), static_cast<T*>(nullptr), static_cast<T*>(nullptr), mean64, m2_64);
}

template <typename T, typename Launch>
void bn_launch_backward_reduce(Launch& launch, const BNPlan& p, BNShape s, const T* dh, const T* h, const T* x,
                               const T* mean, int act, double* sum_dy, double* sum_dy_xmu, void* partial) {
  auto* part = static_cast<Sums<acc_t<T>, 2>*>(partial);
  bn_launch_reduce(launch, p, BackwardSumsOp<T>{dh, h, x, mean, act}, s, part);
  launch(bn_channels_grid(s.C, p.threads), dim3(p.threads), &bn_backward_finish_kernel<T>,
         static_cast<const Sums<acc_t<T>, 2>*>(part), p.splits, static_cast<const double*>(nullptr),
         static_cast<const double*>(nullptr), s.C, s.N * s.L, static_cast<const T*>(nullptr),
         static_cast<const T*>(nullptr), true, false, static_cast<T*>(nullptr), static_cast<T*>(nullptr),
         static_cast<acc_t<T>*>(nullptr), sum_dy, sum_dy_xmu);
}

template <typename T, typename Launch>
void bn_launch_backward_elemt(Launch& launch, const BNPlan& p, BNShape s, const T* dh, const T* h, const T* x, T* dx,
                              const T* weight, const T* mean, const T* invstd, const double* sum_dy,
                              const double* sum_dy_xmu, int64_t count, bool bessel, int act, acc_t<T>* coef) {
  launch(bn_channels_grid(s.C, p.threads), dim3(p.threads), &bn_backward_finish_kernel<T>,
         static_cast<const Sums<acc_t<T>, 2>*>(nullptr), 0, sum_dy, sum_dy_xmu, s.C, count, weight, invstd, true,
         bessel, static_cast<T*>(nullptr), static_cast<T*>(nullptr), coef, static_cast<double*>(nullptr),
         static_cast<double*>(nullptr));
  if (s.N * s.C * s.L > 0)
    launch(dim3(static_cast<unsigned>(p.lines_grid)), dim3(p.threads), &bn_backward_dx_kernel<T>, dh, h, x, dx, s,
           mean, static_cast<const acc_t<T>*>(coef), act, true);
}

}  // namespace mmops::cuda
