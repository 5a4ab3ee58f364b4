// Fused BatchNorm (training and eval) with an optional fused activation, on the CPU.
//
// Forward, per channel c over the n = N*L values of x (input (N, C) or (N, C, L)):
//   mean = sum x / n,   var = sum (x - mean)^2 / d,   d = n - 1 if bessel (the makemore notebook) else n
//   xhat = (x - mean) * invstd,  invstd = 1 / sqrt(var + eps)
//   y = gamma * xhat + beta,     h = act(y)   (act: identity, tanh or relu)
//   running_mean += momentum * (mean - running_mean)
//   running_var  += momentum * (var_unbiased - running_var)       (PyTorch's rule: always unbiased)
// The statistics take one read of x: shifted sums S1 = sum (x - K), S2 = sum (x - K)^2 with K = the mean of the
// channel's first 16 rows, in blocks of 16 rows summed in the input's dtype and added up in double (no cancellation
// worth the name: the shift puts the data near zero, a block's float sum carries at most 15 roundings, the totals
// carry 29 more bits than float, and a channel whose rows lie far from K is summed again in double;
// batch_norm_kernels.cpp, "the sums"). The second read writes
// h = act((x - mean) * a + b) with a = gamma * invstd, b = beta.
//
// Backward, with dy' = dh * act'(h) (1 - h^2 for tanh, [h > 0] for relu: dhpreact never exists as a tensor):
//   dbeta  = sum dy',   dgamma = sum dy' * xhat
//   dx = gamma * invstd / n * (n dy' - dbeta - k * xhat * dgamma),  k = n / (n - 1) if bessel else 1
//   (the notebook's closed form; k = 1 is its biased-variance twin). In eval mode mean and invstd are
//   constants (the running statistics): dx = gamma * invstd * dy'.
// One reduction pass (dbeta, dgamma) and one elementwise pass, written as dx = A dy' + B (x - mean) + D per
// channel. Both elementwise passes subtract the mean from x first, as the math does: with a + b*x forms,
// x*a and b nearly cancel when |mean| >> std, and float32 loses the digits that matter (tested at mean 1000).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <string>

#include "cpu/batch_norm.h"
#include "cpu/output_cache.h"
#include "cpu/parallel.h"
#include "cpu/scratch.h"
#include "cpu/simd.h"
#include "op_args.h"

namespace mmops::cpu::bn {

Shape shape_of(const at::Tensor& x) { return {x.size(0), x.size(1), x.dim() == 3 ? x.size(2) : 1}; }

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The last-level cache a call can count on, in bytes. The kernel's own description (sysfs) comes first: glibc's
// sysconf(_SC_LEVEL3_CACHE_SIZE) decodes CPUID, which a VM may fill with the host's figure (320 MB on this project's
// 2-core AMD EPYC VM, whose sysfs says 32 MB: with 320 MB no BatchNorm call ever took its from-memory loops, and
// the forward at (32768, 200) ran 4.6-4.8 ms instead of 2.7 ms, 2 threads). The result is capped at 32 MiB: a
// server's L3 is shared with cores this process does not own (an Emerald Rapids socket reports 320 MB), and data
// larger than that comes from memory whatever the CPU says.
int64_t last_level_cache_bytes() {
  int64_t bytes = 0;
  for (int index = 0; index < 8 && bytes == 0; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level"), size_file(dir + "size");
    int level = 0;
    std::string size;  // "32768K"
    if (!(level_file >> level) || !(size_file >> size)) break;
    if (level != 3) continue;
    const int64_t value = std::atoll(size.c_str());
    const char unit = size.empty() ? 'K' : size.back();
    bytes = unit == 'M' ? value << 20 : unit == 'K' ? value << 10 : value;
  }
  if (bytes <= 0) bytes = sysconf(_SC_LEVEL3_CACHE_SIZE);
  constexpr int64_t kCap = 32LL << 20;
  return bytes > 0 && bytes < kCap ? bytes : kCap;
}

// Whether a call's data comes from memory rather than cache: when the bytes it reads and writes exceed the last-level
// cache. Then the statistics read row after row, and the elementwise passes write with streaming stores
// (batch_norm_kernels.h): the output cannot stay in cache for the next op anyway, and an ordinary store would first
// read each line of it from memory. MMOPS_BN_STREAM_ABOVE_BYTES sets another threshold (the tests set 0 to run every
// size through the from-memory loops).
int64_t from_memory_threshold() {
  static const int64_t threshold = [] {
    if (const char* env = std::getenv("MMOPS_BN_STREAM_ABOVE_BYTES"); env && *env) {
      char* end = nullptr;
      const long long bytes = std::strtoll(env, &end, 10);
      TORCH_CHECK_VALUE(*end == '\0' && bytes >= 0, "MMOPS_BN_STREAM_ABOVE_BYTES must be a number of bytes (0 or "
                        "more), got '", env, "'");
      return bytes;
    }
    return static_cast<long long>(last_level_cache_bytes());
  }();
  return threshold;
}

bool streams(int64_t bytes) { return bytes > from_memory_threshold(); }

Reads reads_for(int64_t bytes) { return streams(bytes) ? Reads::kFromMemory : Reads::kCached; }

at::Tensor contiguous_param(const std::optional<at::Tensor>& t) {
  return has(t) ? t->contiguous() : at::Tensor();
}

namespace {

using at::Tensor;

// max(v, 0) that keeps NaN (std::max(0.0, NaN) is 0): rounding can take a sum of squares a hair below 0, but a
// NaN or inf among the values must reach the variance, the output and running_var, as in PyTorch.
double non_negative(double v) { return v < 0 ? 0.0 : v; }


// mean, invstd and the running statistics of each channel from its shifted sums (S1, S2 about K[c]).
template <typename T>
void finish_stats(int64_t C, int64_t n, const T* K, const double* S1, const double* S2, bool bessel, double momentum,
                  double eps, T* mp, T* ip, T* rmp, T* rvp) {
  // reciprocals once: a division per channel and statistic cost microseconds at C = 200 (batch 32)
  const double inv_n = 1.0 / n, inv_d = 1.0 / (bessel ? n - 1 : n), inv_unbiased = 1.0 / (n - 1);
  for (int64_t c = 0; c < C; ++c) {
    const double d1 = S1[c] * inv_n;
    const double m2 = non_negative(S2[c] - S1[c] * d1);  // sum (x - mean)^2
    const double m = static_cast<double>(K[c]) + d1;
    mp[c] = static_cast<T>(m);
    ip[c] = static_cast<T>(1.0 / std::sqrt(m2 * inv_d + eps));
    if (rmp) {
      rmp[c] = static_cast<T>((1 - momentum) * rmp[c] + momentum * m);
      rvp[c] = static_cast<T>((1 - momentum) * rvp[c] + momentum * (m2 * inv_unbiased));
    }
  }
}

// h = act((x - mean) * a + b): a = gamma * invstd, b = beta.
template <typename T>
void affine_coefficients(int64_t C, const T* wp, const T* bp, const T* ip, T* a, T* b) {
  for (int64_t c = 0; c < C; ++c) {
    a[c] = (wp ? wp[c] : T(1)) * ip[c];
    b[c] = bp ? bp[c] : T(0);
  }
}

// The running statistics were updated in contiguous copies when the caller's tensors are views with other strides.
void write_back_running_stats(const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                              const Tensor& rm, const Tensor& rv) {
  if (rm.defined() && !rm.is_same(*running_mean)) running_mean->copy_(rm);
  if (rv.defined() && !rv.is_same(*running_var)) running_var->copy_(rv);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_forward(const Tensor& input, const std::optional<Tensor>& weight,
                                                      const std::optional<Tensor>& bias,
                                                      const std::optional<Tensor>& running_mean,
                                                      const std::optional<Tensor>& running_var, bool training,
                                                      double momentum, double eps, bool bessel, int64_t activation) {
  args::batch_norm_forward(input, weight, bias, running_mean, running_var, training, eps, activation);
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
                   "mmops.batch_norm: input must be float32 or float64 here, got ", input.scalar_type());
  const Shape s = shape_of(input);
  const int64_t n = s.N * s.L;

  // Every per-channel argument is read through a contiguous pointer: views with other strides are copied (the
  // running statistics are updated in the copy and written back through the caller's view at the end).
  const Tensor w = contiguous_param(weight), bb = contiguous_param(bias);
  const Tensor rm = contiguous_param(running_mean), rv = contiguous_param(running_var);
  const Tensor x = input.contiguous();
  Tensor h = empty_output(x.sizes(), x.scalar_type());
  Tensor mean = at::empty({s.C}, x.options());
  Tensor invstd = at::empty({s.C}, x.options());

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmops_batch_norm_forward", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    T *hp = h.mutable_data_ptr<T>(), *mp = mean.mutable_data_ptr<T>(), *ip = invstd.mutable_data_ptr<T>();
    T* rmp = rm.defined() ? rm.mutable_data_ptr<T>() : nullptr;
    T* rvp = rv.defined() ? rv.mutable_data_ptr<T>() : nullptr;
    const T* wp = w.defined() ? w.const_data_ptr<T>() : nullptr;
    const T* bp = bb.defined() ? bb.const_data_ptr<T>() : nullptr;
    // The shift of each channel's sums (batch_norm_kernels.h: shifts): finite (an inf shift would turn the sums
    // into inf - inf = NaN where PyTorch's mean is inf), 0 for an input with no values (possible in eval mode).
    Scratch<T> Kab(3 * s.C);  // one array for the three per-channel vectors
    T *K = Kab.data(), *a = K + s.C, *b = a + s.C;
    if (training) shifts(xp, s, K);
    const int64_t call_bytes = 2 * x.numel() * sizeof(T);  // read x, write h
    reduce_then_elementwise(
        s.N, s.C, s.C * s.L,
        [&](int64_t n0, int64_t n1, double* p) {
          if (training) stats(xp, s, K, n0, n1, p, p + s.C, reads_for(call_bytes));
        },
        [&](const double* S1, const double* S2) {
          if (training) {
            finish_stats(s.C, n, K, S1, S2, bessel, momentum, eps, mp, ip, rmp, rvp);
          } else {  // the running statistics are the constants
            for (int64_t c = 0; c < s.C; ++c) {
              mp[c] = rmp[c];
              ip[c] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(rvp[c]) + eps));
            }
          }
          affine_coefficients(s.C, wp, bp, ip, a, b);
        },
        [&](int64_t n0, int64_t n1) {
          if (streams(call_bytes) && normalize_streaming(activation, xp, hp, s, mp, a, b, n0, n1))
            return;
          normalize(activation, xp, hp, s, mp, a, b, n0, n1);
        });
  });
  write_back_running_stats(running_mean, running_var, rm, rv);
  return {h, mean, invstd};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward(const Tensor& grad_out, const Tensor& output,
                                                       const Tensor& input, const std::optional<Tensor>& weight,
                                                       const Tensor& mean_in, const Tensor& invstd_in, bool training,
                                                       bool bessel, int64_t activation,
                                                       std::array<bool, 3> output_mask) {
  TORCH_CHECK_VALUE(grad_out.sizes() == input.sizes() && output.sizes() == input.sizes(),
                    "mmops.batch_norm backward: grad_output ", grad_out.sizes(), " and output ", output.sizes(),
                    " must have the input's shape ", input.sizes());
  const Shape s = shape_of(input);
  const Tensor x = input.contiguous(), dh = grad_out.contiguous(), h = output.contiguous();
  const Tensor w = contiguous_param(weight), mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  // Outputs that output_mask leaves out are returned empty (shape (0,)), not computed.
  Tensor dx = empty_output(output_mask[0] ? x.sizes() : at::IntArrayRef{0}, x.scalar_type());
  Tensor dgamma = at::empty({output_mask[1] ? s.C : 0}, x.options());
  Tensor dbeta = at::empty({output_mask[2] ? s.C : 0}, x.options());

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmops_batch_norm_backward", [&] {
    using T = scalar_t;
    const T *xp = x.const_data_ptr<T>(), *dhp = dh.const_data_ptr<T>(), *hp = h.const_data_ptr<T>();
    const T *mp = mean.const_data_ptr<T>(), *ip = invstd.const_data_ptr<T>();
    const T* wp = w.defined() ? w.const_data_ptr<T>() : nullptr;
    T* dxp = output_mask[0] ? dx.mutable_data_ptr<T>() : nullptr;
    T* dgp = output_mask[1] ? dgamma.mutable_data_ptr<T>() : nullptr;
    T* dbp = output_mask[2] ? dbeta.mutable_data_ptr<T>() : nullptr;
    // The sums are needed for dgamma / dbeta, and for dx only with batch statistics.
    const bool sums = training || dgp || dbp;
    const int64_t call_bytes = (activation ? 4 : 3) * x.numel() * static_cast<int64_t>(sizeof(T));  // dh, x, (h), dx
    Scratch<T> ABD(3 * s.C);  // one array for the three per-channel vectors
    T *A = ABD.data(), *B = A + s.C, *D = B + s.C;
    reduce_then_elementwise(
        s.N, s.C, s.C * s.L,
        [&](int64_t n0, int64_t n1, double* p) {
          if (sums) backward_sums(activation, dhp, hp, xp, s, mp, n0, n1, p, p + s.C, reads_for(call_bytes));
        },
        [&](const double* Sdy, const double* Sdyx) {
          for (int64_t c = 0; c < s.C; ++c) {
            if (dgp) dgp[c] = static_cast<T>(Sdyx[c] * ip[c]);  // sum dy' * xhat
            if (dbp) dbp[c] = static_cast<T>(Sdy[c]);            // sum dy'
          }
          dx_coefficients(s.C, s.N * s.L, wp, ip, Sdy, Sdyx, bessel, A, B, D);
        },
        [&](int64_t n0, int64_t n1) {
          if (!dxp) return;
          if (streams(call_bytes) &&
              backward_dx_streaming(activation, dhp, hp, xp, dxp, s, mp, A, training ? B : nullptr, D, n0, n1))
            return;
          backward_dx(activation, dhp, hp, xp, dxp, s, mp, A, training ? B : nullptr, D, n0, n1);
        });
  });
  return {dx, dgamma, dbeta};
}

}  // namespace

// dx = A dy' + B (x - mean) + D per channel, from the sums over all n values of the channel (n, Sdy = sum dy',
// Sdyx = sum dy' (x - mean)); see the math at the top of this file. (In eval mode only A = gamma * invstd is used.)
template <typename T>
void dx_coefficients(int64_t C, int64_t n, const T* wp, const T* ip, const double* Sdy, const double* Sdyx, bool bessel,
                     T* A, T* B, T* D) {
  const double k = bessel ? static_cast<double>(n) / (n - 1) : 1.0, inv_n = 1.0 / n;
  for (int64_t c = 0; c < C; ++c) {
    const double inv = ip[c];
    const double a = (wp ? static_cast<double>(wp[c]) : 1.0) * inv;  // gamma * invstd
    A[c] = static_cast<T>(a);
    B[c] = static_cast<T>(-a * k * Sdyx[c] * inv * inv * inv_n);  // coefficient of (x - mean) = xhat / invstd
    D[c] = static_cast<T>(-a * Sdy[c] * inv_n);
  }
}
template void dx_coefficients(int64_t, int64_t, const float*, const float*, const double*, const double*, bool, float*,
                              float*, float*);
template void dx_coefficients(int64_t, int64_t, const double*, const double*, const double*, const double*, bool,
                              double*, double*, double*);

TORCH_LIBRARY_IMPL(mmops, CPU, m) {
  m.impl("batch_norm_forward", &batch_norm_forward);
  m.impl("batch_norm_backward", &batch_norm_backward);
}

}  // namespace mmops::cpu::bn
