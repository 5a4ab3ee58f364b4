// Fused cross-entropy on the GPU: device code and its host-side schedule (which kernels, which grid), torch-free.
// The math is csrc/cpu/cross_entropy.cpp's (see the top of that file); here, for row i of logits x (C classes):
//   pass 1, one read of the row: the online max m and sum s of exp(x - m) (rescaled whenever the max grows),
//     plus x_y and the smoothing dot sum_c w_c x_c (class-index targets) or T = sum w t' and sum w t' x
//     (probability targets); one reduction of these over the row's threads; lse = m + log s; the loss.
//   pass 2: the gradient rs * dloss/dx = coef * exp(x - lse) - (per-class constant) - [j == y] hot, from the
//     row's registers (rows up to 45056 bf16 / 32768 fp32 classes: the row is read from memory once) or from
//     a second read (longer rows; the row was just read by the same block, so it usually comes from L2).
// The gradient may overwrite the logits (inplace_backward): every thread writes only elements it read itself,
// and x_y arrives through the reduction (never re-read from memory after another thread may have written it).
// Loads and stores are 16-byte vectors from the row's first 16-byte-aligned element on (a row of C = 50257 bf16
// starts anywhere); the unaligned head and tail elements go one per thread.
// The mean's denominator (sum of w_y over the rows not ignored) comes from a first tiny one-block kernel, which
// also finds the first out-of-range target; the loss of every row goes to a float buffer, which a last one-block
// kernel adds up in a fixed order (deterministic) in double.
#pragma once
#include "cuda/device.cuh"

namespace mmops::cuda {

// Threads of a row block at most: 128 registers per thread for the register-resident row (16 vectors).
constexpr int kCERowThreads = 512;

template <typename T>
struct CEParams {
  const T* x = nullptr;  // (N, C) logits, contiguous rows
  int64_t N = 0, C = 0;
  const int64_t* y = nullptr;  // (N,) class indices, or
  const T* t = nullptr;        // (N, C) class probabilities
  const T* w = nullptr;        // (C,) class weights or nullptr
  acc_t<T> W = 0;              // sum of w (C when w is absent)
  int64_t ignore_index = -100;
  acc_t<T> eps = 0;                        // label smoothing
  const acc_t<T>* row_scale = nullptr;     // device scalar 1/D (mean), or nullptr: 1
  T* grad = nullptr;                       // (N, C) gradient (may be x itself), or nullptr
  acc_t<T>* row_loss = nullptr;            // (N,) loss of each row, always written
};

// The state one thread accumulates over its elements of a row and the group of threads then combines.
template <typename A>
struct RowState {
  A m, s;  // running max, sum of exp(x - m)
  A a, b;  // index targets: x_y, smoothing dot; probability targets: sum w t', sum w t' x
  static MMOPS_DEVICE RowState identity() { return {lowest_acc<A>(), A(0), A(0), A(0)}; }
  static MMOPS_DEVICE RowState combine(const RowState& p, const RowState& q) {
    const A m = p.m > q.m ? p.m : q.m;
    return {m, p.s * exp_acc(p.m - m) + q.s * exp_acc(q.m - m), p.a + q.a, p.b + q.b};
  }
  MMOPS_DEVICE RowState shuffle_xor(int o) const {
    return {__shfl_xor_sync(kFullMask, m, o), __shfl_xor_sync(kFullMask, s, o), __shfl_xor_sync(kFullMask, a, o),
            __shfl_xor_sync(kFullMask, b, o)};
  }
  // One element: one exp either way (exp(m - x) rescales s when x is the new max). NaN never becomes the max,
  // and makes s NaN (so the row's loss and gradient are NaN, as in PyTorch); -inf adds exp(-inf) = 0.
  MMOPS_DEVICE void add(A x) {
    const bool up = x > m;
    const A e = exp_acc(up ? m - x : x - m);
    s = up ? s * e + A(1) : s + e;
    m = up ? x : m;
  }
};

// Where a row's elements are: `head` scalars up to the first 16-byte boundary, `nvec` vectors of V, `tail` scalars.
// Positions inside a row are 32-bit (C < 2^31, checked by the launcher); row offsets are 64-bit.
template <typename T>
struct RowSplit {
  int head, nvec, tail;
  MMOPS_DEVICE RowSplit(const T* row, int C) {
    constexpr int V = kVecOf<T>;
    const int misalign = static_cast<int>(reinterpret_cast<uintptr_t>(row) % 16);
    head = misalign == 0 ? 0 : (16 - misalign) / static_cast<int>(sizeof(T));
    head = head < C ? head : C;
    nvec = (C - head) / V;
    tail = C - head - nvec * V;
  }
  // The one head-or-tail element thread g of the group takes, or -1.
  MMOPS_DEVICE int extra(int g) const {
    constexpr int V = kVecOf<T>;
    if (g < head) return g;
    if (g - head < tail) return head + nvec * V + (g - head);
    return -1;
  }
};

template <typename T, int V>
MMOPS_DEVICE Vec<T, V> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

// Element j of a row whose companion row (targets, gradient) may not share the logits' alignment: vector access
// when it does (`aligned`), element by element otherwise.
template <typename T, int V>
MMOPS_DEVICE Vec<T, V> load_vec_any(const T* p, bool aligned) {
  if (aligned) return load_vec<T, V>(p);
  Vec<T, V> v;
#pragma unroll
  for (int i = 0; i < V; ++i) v.v[i] = p[i];
  return v;
}
template <typename T, int V>
MMOPS_DEVICE void store_vec_any(T* p, const Vec<T, V>& v, bool aligned) {
  if (aligned) {
    *reinterpret_cast<Vec<T, V>*>(p) = v;
    return;
  }
#pragma unroll
  for (int i = 0; i < V; ++i) p[i] = v.v[i];
}

// What one row needs besides its logits, and the per-element steps of the two passes (always inlined: the
// thread's register-resident vectors must never have their address taken by a call).
template <typename T, bool kGeneral>
struct RowContext {
  using A = acc_t<T>;
  const T* w;   // class weights or nullptr
  const T* tr;  // the row's probability targets, or nullptr (index targets)
  int y;  // the target (valid only on rows that are neither ignored nor bad)
  bool smooth, ignored;
  A e_over_C, keep;
  A lse, coef, c2, hot, rs;  // pass 2: g_j = coef * exp(x_j - lse) - c2 * w_j [- hot at j == y], or with t'_j

  MMOPS_DEVICE A target_prob(int j) const {  // w_j t'_j
    A tj = Num<T>::load(tr[j]);
    if (smooth) tj = keep * tj + e_over_C;
    return w ? tj * Num<T>::load(w[j]) : tj;
  }
  MMOPS_DEVICE void take(RowState<A>& st, int j, A xv) const {
    st.add(xv);
    if (!kGeneral) {
      st.a += j == y ? xv : A(0);
    } else if (tr == nullptr) {
      st.a += j == y ? xv : A(0);
      if (smooth) st.b += (w ? Num<T>::load(w[j]) : A(1)) * xv;
    } else {
      const A tj = target_prob(j);
      st.a += tj;
      st.b += tj * xv;
    }
  }
  MMOPS_DEVICE A grad(int j, A xv) const {
    if (ignored) return A(0);
    const A p = coef * exp_acc(xv - lse);
    if (!kGeneral) return j == y ? p - hot : p;
    if (tr != nullptr) return p - rs * target_prob(j);
    A gj = smooth ? p - c2 * (w ? Num<T>::load(w[j]) : A(1)) : p;
    return j == y ? gj - hot : gj;
  }
};

// Row kernel. kWarpRows: one warp per row (short rows), else one block per row. kItems > 0: the thread keeps its
// kItems vectors of the row in registers between the passes; kItems == 0: it streams the row twice.
// kGeneral: weights, label smoothing or probability targets; without it (class indices and nothing else, the
// training loop's case) the per-element work is the online max/sum and one select.
template <typename T, int kItems, bool kWarpRows, bool kGeneral>
MMOPS_GLOBAL void MMOPS_LAUNCH_BOUNDS(kCERowThreads) ce_rows_kernel(CEParams<T> p) {
  using A = acc_t<T>;
  constexpr int V = kVecOf<T>;
  using VecT = Vec<T, V>;
  MMOPS_SHARED RowState<A> scratch[kWarpSize];
  const int tid = flat_thread();
  const int G = kWarpRows ? kWarpSize : block_threads();
  const int g = kWarpRows ? tid % kWarpSize : tid;
  const int64_t rows_per_block = kWarpRows ? block_threads() / kWarpSize : 1;
  const int64_t my_group = kWarpRows ? tid / kWarpSize : 0;
  const bool index_target = p.y != nullptr;

  RowContext<T, kGeneral> ctx;
  ctx.w = p.w;
  ctx.smooth = p.eps != A(0);
  ctx.e_over_C = p.eps / static_cast<A>(p.C);
  ctx.keep = A(1) - p.eps;
  ctx.rs = p.row_scale ? *p.row_scale : A(1);

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rows_per_block; base < p.N;
       base += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t row = base + my_group;
    const bool live = row < p.N;  // a warp past the last row still joins the block's reductions
    const int64_t y = live && index_target ? p.y[row] : 0;
    ctx.ignored = index_target && y == p.ignore_index;
    const bool bad = index_target && !ctx.ignored && (y < 0 || y >= p.C);  // the host checks first
    ctx.y = bad || ctx.ignored ? -1 : static_cast<int>(y);
    const int C = live && !ctx.ignored ? static_cast<int>(p.C) : 0;  // elements pass 1 reads
    const T* xr = p.x + (live ? row : 0) * p.C;
    ctx.tr = index_target ? nullptr : p.t + (live ? row : 0) * p.C;
    const RowSplit<T> split(xr, C);

    // ---- pass 1
    RowState<A> st = RowState<A>::identity();
    VecT regs[kItems > 0 ? kItems : 1];
    const int j_extra = split.extra(g);
    const A x_extra = j_extra >= 0 ? Num<T>::load(xr[j_extra]) : A(0);
    if constexpr (kItems > 0) {
#pragma unroll
      for (int k = 0; k < kItems; ++k) {  // all loads first: kItems independent 16-byte loads in flight
        const int q = g + k * G;
        if (q < split.nvec) regs[k] = load_vec<T, V>(xr + split.head + q * V);
      }
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int q = g + k * G;
        if (q < split.nvec) {
#pragma unroll
          for (int i = 0; i < V; ++i) ctx.take(st, split.head + q * V + i, Num<T>::load(regs[k].v[i]));
        }
      }
    } else {
      for (int q = g; q < split.nvec; q += G) {
        const VecT v = load_vec<T, V>(xr + split.head + q * V);
#pragma unroll
        for (int i = 0; i < V; ++i) ctx.take(st, split.head + q * V + i, Num<T>::load(v.v[i]));
      }
    }
    if (j_extra >= 0) ctx.take(st, j_extra, x_extra);

    if constexpr (kWarpRows) st = warp_reduce(st);
    else st = block_reduce(st, scratch);

    // ---- the row's loss and gradient coefficients
    ctx.lse = st.m + log_acc(st.s);
    A loss;
    if (index_target) {
      const A w_y = p.w && !ctx.ignored && !bad ? Num<T>::load(p.w[y]) : A(1);
      const A h = ctx.keep * w_y;  // (1 - eps) w_y
      loss = w_y * (ctx.lse - st.a);
      if (ctx.smooth) loss = ctx.keep * loss + ctx.e_over_C * (p.W * ctx.lse - st.b);
      ctx.coef = ctx.rs * (h + ctx.e_over_C * p.W);
      ctx.c2 = ctx.rs * ctx.e_over_C;
      ctx.hot = ctx.rs * h;
      if (ctx.ignored) loss = A(0);
      if (bad) loss = ctx.coef = static_cast<A>(NAN);
    } else {
      loss = st.a * ctx.lse - st.b;
      ctx.coef = ctx.rs * st.a;
    }
    if (live && g == 0) p.row_loss[row] = loss;

    // ---- pass 2: every element, ignored rows too (they get zeros)
    if (p.grad != nullptr && live) {
      T* gr = p.grad + row * p.C;
      const RowSplit<T> gsplit(xr, static_cast<int>(p.C));
      const bool g_aligned = reinterpret_cast<uintptr_t>(gr) % 16 == reinterpret_cast<uintptr_t>(xr) % 16;
      const int j_extra2 = gsplit.extra(g);
      const bool from_registers = kItems > 0 && !ctx.ignored;
      if (from_registers) {
#pragma unroll
        for (int k = 0; k < (kItems > 0 ? kItems : 1); ++k) {
          const int q = g + k * G;
          if (q < gsplit.nvec) {
            const int j0 = gsplit.head + q * V;
            VecT out;
#pragma unroll
            for (int i = 0; i < V; ++i) out.v[i] = Num<T>::store(ctx.grad(j0 + i, Num<T>::load(regs[k].v[i])));
            store_vec_any<T, V>(gr + j0, out, g_aligned);
          }
        }
        if (j_extra2 >= 0) gr[j_extra2] = Num<T>::store(ctx.grad(j_extra2, x_extra));
      } else {
        for (int q = g; q < gsplit.nvec; q += G) {
          const int j0 = gsplit.head + q * V;
          VecT xv, out;
          if (!ctx.ignored) xv = load_vec<T, V>(xr + j0);
#pragma unroll
          for (int i = 0; i < V; ++i)
            out.v[i] = Num<T>::store(ctx.ignored ? A(0) : ctx.grad(j0 + i, Num<T>::load(xv.v[i])));
          store_vec_any<T, V>(gr + j0, out, g_aligned);
        }
        if (j_extra2 >= 0) gr[j_extra2] = Num<T>::store(ctx.ignored ? A(0) : ctx.grad(j_extra2, Num<T>::load(xr[j_extra2])));
      }
    }
  }
}

// The first out-of-range target (or -1), and the mean's denominator sum of w_y over the rows not ignored (its
// reciprocal to row_scale when given). One block.
struct FirstIndex {
  int64_t i;
  static MMOPS_DEVICE FirstIndex identity() { return {INT64_MAX}; }
  static MMOPS_DEVICE FirstIndex combine(const FirstIndex& a, const FirstIndex& b) { return {a.i < b.i ? a.i : b.i}; }
  MMOPS_DEVICE FirstIndex shuffle_xor(int o) const {
    return {static_cast<int64_t>(__shfl_xor_sync(kFullMask, static_cast<long long>(i), o))};
  }
};

template <typename T>
MMOPS_GLOBAL void ce_denominator_kernel(const int64_t* y, int64_t N, int64_t C, const T* w, int64_t ignore_index,
                                        double* denom, acc_t<T>* row_scale, int64_t* bad_row) {
  MMOPS_SHARED Sums<double, 1> sum_scratch[kWarpSize];
  MMOPS_SHARED FirstIndex bad_scratch[kWarpSize];
  Sums<double, 1> d = Sums<double, 1>::identity();
  FirstIndex bad = FirstIndex::identity();
  for (int64_t i = flat_thread(); i < N; i += block_threads()) {
    const int64_t yi = y[i];
    if (yi == ignore_index) continue;
    if (yi < 0 || yi >= C) {
      bad.i = bad.i < i ? bad.i : i;
      continue;
    }
    d.v[0] += w ? static_cast<double>(Num<T>::load(w[yi])) : 1.0;
  }
  d = block_reduce(d, sum_scratch);
  bad = block_reduce(bad, bad_scratch);
  if (flat_thread() == 0) {
    *denom = d.v[0];
    if (row_scale) *row_scale = static_cast<acc_t<T>>(1.0 / d.v[0]);
    *bad_row = bad.i == INT64_MAX ? -1 : bad.i;
  }
}

// reduction 0 (none): out[i] = row_loss[i] (any grid); 1 (mean) / 2 (sum): out[0] = the rows' sum in double, in
// a fixed order (one block), divided by *denom for mean (0/0 = NaN when every row is ignored, as in PyTorch).
template <typename T>
MMOPS_GLOBAL void ce_finish_kernel(const acc_t<T>* row_loss, int64_t N, int reduction, const double* denom, T* out) {
  if (reduction == 0) {
    for (int64_t i = global_thread(); i < N; i += grid_threads()) out[i] = Num<T>::store(row_loss[i]);
    return;  // uniform: no barrier below is reached by anyone
  }
  MMOPS_SHARED Sums<double, 1> scratch[kWarpSize];
  Sums<double, 1> s = Sums<double, 1>::identity();
  for (int64_t i = flat_thread(); i < N; i += block_threads()) s.v[0] += static_cast<double>(row_loss[i]);
  s = block_reduce(s, scratch);
  if (flat_thread() == 0) {
    const double total = reduction == 1 ? s.v[0] / *denom : s.v[0];
    out[0] = Num<T>::store(static_cast<acc_t<T>>(total));
  }
}

// Backward: out[i, :] = g[i, :] * go[i * go_stride] (out may be g); in place with a grad_output of 1 (the
// common loss.backward()) every block returns at once: nothing to do, and no host sync to find that out.
template <typename T>
MMOPS_GLOBAL void ce_scale_grad_kernel(const T* g, T* out, int64_t N, int64_t C, const T* go, int64_t go_stride) {
  using A = acc_t<T>;
  if (out == g && go_stride == 0 && Num<T>::load(go[0]) == A(1)) return;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const A s = Num<T>::load(go[row * go_stride]);
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x)
      out[row * C + j] = Num<T>::store(Num<T>::load(g[row * C + j]) * s);
  }
}

// ---- host-side schedule (torch-free: the .cu launcher and the CPU shim call the same functions) ------------

// Row-kernel shapes: 0 one warp per row, 4 vectors per thread in registers; 1 one block per row, 16 vectors per
// thread in registers; 2 one block per row, streamed twice.
enum CEKind : int { kCEWarpRows = 0, kCEBlockRows = 1, kCEStream = 2 };
constexpr int kCEWarpItems = 4, kCEWarpRowsPerBlock = 8;
// Vectors per thread of a register-resident row block: as many as 128 registers hold without spilling (checked by
// tests/test_cuda_compile.py for sm_80 and sm_90): rows up to 45056 bf16/fp16 or 32768 fp32 classes are read once.
// C = 50257 (a GPT-2 vocabulary) in bf16 needs 13 vectors of 8, which spilled (nvcc 13): it streams, and its second
// read comes from L2 (one row is 100 KB; the rows in flight fit in L2) -- unmeasured on a GPU.
template <typename T>
constexpr int kCEBlockItems = sizeof(T) == 2 ? 11 : sizeof(T) == 4 ? 16 : 8;

struct CEPlan {
  int kind;
  int threads;
  int64_t blocks;
};

// max_threads below kCERowThreads and `force_kind` are for the CPU shim's tests (small blocks, every shape on small rows).
template <typename T>
inline CEPlan ce_plan(int64_t N, int64_t C, int num_sms, int max_threads = kCERowThreads, int force_kind = -1) {
  constexpr int V = kVecOf<T>;
  // +2V: the head and tail elements ride on top of the vectors
  const bool fits_warp = C <= static_cast<int64_t>(kWarpSize) * kCEWarpItems * V;
  const bool fits_block = C <= static_cast<int64_t>(max_threads) * kCEBlockItems<T> * V;
  int kind = fits_warp ? kCEWarpRows : fits_block ? kCEBlockRows : kCEStream;
  // a forced shape is taken only where the row fits it (streaming always does)
  if (force_kind == kCEStream || (force_kind == kCEBlockRows && fits_block)) kind = force_kind;
  CEPlan plan{kind, 0, 0};
  const int64_t per_sm = 2048 / max_threads;
  if (kind == kCEWarpRows) {
    plan.threads = kWarpSize * (max_threads / kWarpSize < kCEWarpRowsPerBlock ? max_threads / kWarpSize
                                                                              : kCEWarpRowsPerBlock);
    const int64_t rows_per_block = plan.threads / kWarpSize;
    plan.blocks = ceil_div(N, rows_per_block);
  } else {
    const int64_t items = kind == kCEBlockRows ? kCEBlockItems<T> : 4;
    int64_t t = ceil_div(ceil_div(C, V), items);
    t = ceil_div(t, kWarpSize) * kWarpSize;
    plan.threads = static_cast<int>(t < kWarpSize ? kWarpSize : t > max_threads ? max_threads : t);
    plan.blocks = N;
  }
  const int64_t cap = static_cast<int64_t>(num_sms) * per_sm * 8;  // enough blocks in flight; the rest loop
  if (plan.blocks > cap) plan.blocks = cap;
  if (plan.blocks < 1) plan.blocks = 1;
  return plan;
}

// Step 1 (index targets): denominator, row scale (when mean) and the first bad target, into device memory.
template <typename T, typename Launch>
void ce_launch_denominator(Launch& launch, const CEParams<T>& p, bool mean, double* denom, acc_t<T>* row_scale,
                           int64_t* bad_row, int max_threads = kCERowThreads) {
  launch(dim3(1), dim3(max_threads), &ce_denominator_kernel<T>, p.y, p.N, p.C, p.w, p.ignore_index, denom,
         mean ? row_scale : static_cast<acc_t<T>*>(nullptr), bad_row);
}

template <typename T, bool kGeneral, typename Launch>
void ce_launch_row_kernel(Launch& launch, dim3 grid, dim3 block, int kind, const CEParams<T>& p) {
  if (kind == kCEWarpRows) launch(grid, block, &ce_rows_kernel<T, kCEWarpItems, true, kGeneral>, p);
  else if (kind == kCEBlockRows) launch(grid, block, &ce_rows_kernel<T, kCEBlockItems<T>, false, kGeneral>, p);
  else launch(grid, block, &ce_rows_kernel<T, 0, false, kGeneral>, p);
}

// Step 2: the rows, then the loss (out: (N,) for none, a scalar otherwise). denom: the device denominator for
// mean (index targets: step 1's; probability targets: N, written by the caller).
template <typename T, typename Launch>
void ce_launch_rows(Launch& launch, const CEParams<T>& p, const CEPlan& plan, int reduction, const double* denom,
                    T* out) {
  if (p.N > 0) {
    const dim3 grid(static_cast<unsigned>(plan.blocks)), block(plan.threads);
    const bool general = p.w != nullptr || p.eps != acc_t<T>(0) || p.y == nullptr;
    if (general) ce_launch_row_kernel<T, true>(launch, grid, block, plan.kind, p);
    else ce_launch_row_kernel<T, false>(launch, grid, block, plan.kind, p);
  }
  const int threads = plan.threads < 256 ? plan.threads : 256;
  const int64_t blocks = reduction == 0 ? (p.N > 0 ? ceil_div(p.N, threads) : 1) : 1;
  launch(dim3(static_cast<unsigned>(blocks < 4096 ? blocks : 4096)), dim3(threads), &ce_finish_kernel<T>,
         static_cast<const acc_t<T>*>(p.row_loss), p.N, reduction, denom, out);
}

template <typename T, typename Launch>
void ce_launch_scale_grad(Launch& launch, const T* g, T* out, int64_t N, int64_t C, const T* go, int64_t go_stride,
                          int num_sms, int max_threads = 256) {
  int64_t blocks = N < static_cast<int64_t>(num_sms) * 32 ? N : static_cast<int64_t>(num_sms) * 32;
  if (blocks < 1) blocks = 1;
  int threads = static_cast<int>(ceil_div(C < max_threads ? C : max_threads, kWarpSize) * kWarpSize);
  launch(dim3(static_cast<unsigned>(blocks)), dim3(threads), &ce_scale_grad_kernel<T>, g, out, N, C, go, go_stride);
}

}  // namespace mmops::cuda
