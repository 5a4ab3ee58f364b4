// What BatchNorm's two entry-point files (batch_norm.cpp: the op; sync_batch_norm.cpp: SyncBatchNorm's pieces)
// share: argument helpers and the coefficients of the backward's elementwise pass.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "cpu/batch_norm_kernels.h"

namespace mmops::cpu::bn {

Shape shape_of(const at::Tensor& x);  // (N, C) or (N, C, L)
bool has(const std::optional<at::Tensor>& t);
// A 1-D per-channel argument as a contiguous tensor (a view with any stride, e.g. w[::3] or an expanded scalar,
// is copied; a contiguous one is returned as it is), or an undefined tensor when absent.
at::Tensor contiguous_param(const std::optional<at::Tensor>& t);
// How the statistics read a call's data, from the bytes the call reads and writes (batch_norm.cpp: streams).
Reads reads_for(int64_t bytes);
// The bytes a call reads and writes above which it takes the from-memory loops: the last-level cache, at most
// 32 MiB, or MMOPS_BN_STREAM_ABOVE_BYTES.
int64_t from_memory_threshold();

// dx = A dy' + B (x - mean) + D per channel, from the sums over all n values of each channel (Sdy = sum dy',
// Sdyx = sum dy' (x - mean)), invstd ip and gamma wp (null: 1).
template <typename T>
void dx_coefficients(int64_t C, int64_t n, const T* wp, const T* ip, const double* Sdy, const double* Sdyx, bool bessel,
                     T* A, T* B, T* D);

}  // namespace mmops::cpu::bn
