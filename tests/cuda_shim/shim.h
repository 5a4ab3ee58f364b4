// TEST-ONLY CPU shim for the CUDA device code of csrc/cuda/*.cuh: not part of mmops, never built into it.
//
// It lets the tests compile the very kernel headers that nvcc compiles as host C++ and run them on the CPU:
// a launch runs the block's threads as std::threads (one per CUDA thread), which walk the grid's blocks one
// after another; threadIdx/blockIdx are thread_local, blockDim/gridDim global; __shared__ is `static` (all threads
// of the block share it, and blocks do not overlap); __syncthreads is a barrier; a warp shuffle goes through a
// scratch array and one barrier, so the kernels must reach every shuffle with the whole block (they do: see
// csrc/cuda/device.cuh). bfloat16/float16 are 16-bit storage types converted with round-to-nearest-even, as
// __float2bfloat16_rn / __float2half_rn do. A barrier that waits 60 s aborts with a message (a kernel that
// misses a barrier would otherwise hang the test run).
#pragma once
#define MMOPS_CUDA_SHIM 1

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <tuple>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace mmops_shim {

// A barrier for up to 1024 threads on a few cores: arrivals count up atomically and waiters yield the core until
// the generation moves on (a condition variable would wake the whole herd through one mutex).
class Barrier {
 public:
  void reset(unsigned n) { n_ = n, count_ = 0; }
  void wait() {
    const unsigned gen = generation_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      count_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_acq_rel);
      return;
    }
    const auto start = std::chrono::steady_clock::now();
    for (unsigned spins = 0; generation_.load(std::memory_order_acquire) == gen; ++spins) {
      std::this_thread::yield();
      if (spins % 4096 == 4095 && std::chrono::steady_clock::now() - start > std::chrono::seconds(60)) {
        std::fprintf(stderr, "cuda shim: a barrier waited 60 s (a thread of the block missed a __syncthreads or "
                             "shuffle)\n");
        std::abort();
      }
    }
  }

 private:
  unsigned n_ = 1;
  std::atomic<unsigned> count_{0}, generation_{0};
};
inline Barrier block_barrier;
// Two scratch arrays used in turn: a shuffle needs one barrier (between the writes and the reads); the next
// shuffle writes the other array, and the one after that comes after everyone passed the next barrier.
inline unsigned char shuffle_scratch[2][1024 * 16];
inline thread_local unsigned shuffle_turn = 0;

struct bfloat16 {
  uint16_t bits;
};
struct half {
  uint16_t bits;
};
inline float to_float(bfloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline bfloat16 to_bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40)};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {static_cast<uint16_t>(u >> 16)};
}
inline float to_float(half v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, 2);
  return static_cast<float>(h);
}
inline half to_half(float f) {
  const _Float16 h = static_cast<_Float16>(f);  // IEEE conversion, round to nearest even
  half v;
  std::memcpy(&v.bits, &h, 2);
  return v;
}

inline int flat_tid() { return static_cast<int>((threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x); }

// launch(grid, block, &kernel, args...): kernel<<<grid, block>>>(args...) on the CPU; returns when it is done.
struct Launch {
  template <typename... P, typename... A>
  void operator()(dim3 grid, dim3 block, void (*kernel)(P...), A... args) const {
    const unsigned n = block.x * block.y * block.z;
    if (n == 0 || n > 1024 || n % 32 != 0) {
      std::fprintf(stderr, "cuda shim: block of %u threads (need a multiple of 32, at most 1024)\n", n);
      std::abort();
    }
    blockDim = block;
    gridDim = grid;
    block_barrier.reset(n);
    std::tuple<P...> params(static_cast<P>(args)...);
    std::vector<std::thread> team;
    team.reserve(n);
    for (unsigned t = 0; t < n; ++t) {
      team.emplace_back([&, t] {
        threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        shuffle_turn = 0;
        for (unsigned bz = 0; bz < grid.z; ++bz)
          for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
              blockIdx = dim3(bx, by, bz);
              std::apply(kernel, params);
              block_barrier.wait();  // the next block reuses the `static` shared memory
            }
      });
    }
    for (auto& th : team) th.join();
  }
};

}  // namespace mmops_shim

inline void __syncthreads() { mmops_shim::block_barrier.wait(); }

template <typename T>
inline T shim_shuffle(T v, int src_of_lane_xor, bool is_xor) {
  static_assert(sizeof(T) <= 16, "shuffle of a value wider than 16 bytes");
  const int tid = mmops_shim::flat_tid();
  unsigned char* scratch = mmops_shim::shuffle_scratch[mmops_shim::shuffle_turn++ & 1];
  std::memcpy(scratch + tid * 16, &v, sizeof(T));
  __syncthreads();
  const int lane = tid % 32;
  const int src = (tid - lane) + (is_xor ? (lane ^ src_of_lane_xor) : src_of_lane_xor);
  T r;
  std::memcpy(&r, scratch + src * 16, sizeof(T));
  return r;
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) {
  return shim_shuffle(v, lane_mask, true);
}
template <typename T>
inline T __shfl_sync(unsigned, T v, int src_lane, int = 32) {
  return shim_shuffle(v, src_lane, false);
}
