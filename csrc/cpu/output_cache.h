// Large op outputs from a cache of freed blocks (output_cache.cpp says why).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstddef>

namespace mmops::cpu {

// An uninitialised contiguous CPU tensor for an op's output: at::empty, its memory reused from a freed output of
// the same size when it is large.
at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype);

// The bytes the cache holds now, and freeing them (mmops.empty_cache()); returns the bytes freed.
size_t output_cache_bytes();
size_t empty_output_cache();

}  // namespace mmops::cpu
