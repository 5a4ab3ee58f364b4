// Per-call scratch arrays (per-channel coefficients, partial sums): on the stack when they are small, on the heap
// when not. Why: at batch 32 a BatchNorm forward + backward made eight glibc allocations of 1.6-4.8 KB (the
// coefficients, the sums, the sums before a block), and glibc serves a request of 1 KB or more only after merging
// its fast bins, which the many small allocations around a call (tensors, PyTorch's bookkeeping) keep refilling:
// perf put malloc_consolidate, _int_malloc, _int_free and unlink_chunk at ~3 us of the two ops' ~16-23 us at
// (32, 200) (AMD EPYC Zen 3, 2 threads).
#pragma once
#include <algorithm>
#include <cstddef>
#include <memory>

namespace mmops::cpu {

template <typename T>
class Scratch {
 public:
  // per array: C <= 256 for the sums (double), C <= 341 for three float coefficient rows; an OpenMP worker's stack
  // (OMP_STACKSIZE, megabytes by default) holds it
  static constexpr size_t kStackBytes = 4096;
  static constexpr size_t kStackElements = kStackBytes / sizeof(T);

  explicit Scratch(size_t n) : data_(n <= kStackElements ? stack_ : (heap_ = std::make_unique<T[]>(n)).get()) {}
  Scratch(size_t n, T value) : Scratch(n) { std::fill(data_, data_ + n, value); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  T* data() { return data_; }
  T& operator[](size_t i) { return data_[i]; }
  const T& operator[](size_t i) const { return data_[i]; }

 private:
  alignas(64) T stack_[kStackElements];
  std::unique_ptr<T[]> heap_;
  T* data_;
};

}  // namespace mmops::cpu
