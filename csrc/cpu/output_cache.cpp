// Large op outputs come from a cache of freed blocks of the same size.
//
// Why: a fresh large buffer costs a page fault per 4 KiB page the first time it is written. glibc hands a freed
// block of a few MB back to the kernel (munmap, or a trim of the heap) and maps new zeroed pages for the next
// allocation of that size, so every training step pays again: BatchNorm's h and dx at (32768, 200) float32 are
// 6,400 pages each. On this project's VM (AMD EPYC, KVM) a fault costs ~1-1.6 us, which made the faults of one
// BatchNorm forward+backward (~11 ms) as long as its kernels; PyTorch's ops pay the same for their outputs. A
// training loop allocates the same shapes every step, so a block freed by one step's tensor is the next step's
// output, already mapped: what PyTorch's CUDA caching allocator does on the GPU, and what a CPU user otherwise gets
// by preloading jemalloc or tcmalloc.
//
// Bounded: blocks of at least kMinBytes only, exact sizes (rounded to 4 KiB), at most MMOPS_CPU_CACHE_MB megabytes
// held (default 1024; 0 turns the cache off), the oldest block freed first when a new one does not fit;
// mmops.empty_cache() frees them all. The tensors are ordinary allocator-backed CPU tensors (resizable; the
// allocator is called again for a resize). Builds with MMOPS_SANITIZE do not cache, so that AddressSanitizer sees
// every free and reports a use after it.
#include "cpu/output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <pthread.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace mmops::cpu {
namespace {

constexpr size_t kMinBytes = size_t{256} << 10;

// Every block this allocator made has its size in `sizes` while it is alive or cached; the data pointer is the
// block itself (64-byte aligned, as PyTorch's), so PyTorch sees a simple data pointer (copy-on-write clones work).
struct Cache {
  std::mutex mu;
  std::vector<std::pair<size_t, void*>> blocks;  // cached: (bytes, block), oldest first
  std::unordered_map<void*, size_t> sizes;
  size_t held = 0;
  size_t limit = 0;
};

size_t limit_from_env() {
#ifdef MMOPS_SANITIZE
  return 0;
#else
  const char* mb = std::getenv("MMOPS_CPU_CACHE_MB");
  if (mb == nullptr || *mb == '\0') return size_t{1024} << 20;
  char* end = nullptr;
  const long long v = std::strtoll(mb, &end, 10);
  return (end && *end == '\0' && v > 0) ? static_cast<size_t>(v) << 20 : 0;
#endif
}

// Never destroyed: an output may be freed after static destruction has begun (a tensor held by a global).
Cache& cache() {
  static Cache* c = [] {
    auto* made = new Cache;
    made->limit = limit_from_env();
    // fork() (a DataLoader worker) happens with the lock held, so the child inherits consistent lists and a lock
    // it can take.
    pthread_atfork([] { cache().mu.lock(); }, [] { cache().mu.unlock(); }, [] { cache().mu.unlock(); });
    return made;
  }();
  return *c;
}

void release(void* block) {
  Cache& c = cache();
  std::vector<void*> freed;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    const size_t bytes = c.sizes.at(block);
    if (bytes > c.limit) {
      freed.push_back(block);
    } else {
      size_t drop = 0;
      while (c.held + bytes > c.limit) {
        c.held -= c.blocks[drop].first;
        freed.push_back(c.blocks[drop++].second);
      }
      c.blocks.erase(c.blocks.begin(), c.blocks.begin() + static_cast<std::ptrdiff_t>(drop));
      c.blocks.emplace_back(bytes, block);
      c.held += bytes;
    }
    for (void* p : freed) c.sizes.erase(p);
  }
  for (void* p : freed) std::free(p);  // outside the lock: munmap takes time
}

// Takes the most recently cached block of `bytes`, or nullptr.
void* take(Cache& c, size_t bytes) {
  std::lock_guard<std::mutex> lock(c.mu);
  for (size_t i = c.blocks.size(); i-- > 0;) {
    if (c.blocks[i].first == bytes) {
      void* block = c.blocks[i].second;
      c.held -= bytes;
      c.blocks.erase(c.blocks.begin() + static_cast<std::ptrdiff_t>(i));
      return block;
    }
  }
  return nullptr;
}

struct CachingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    Cache& c = cache();
    if (n < kMinBytes || c.limit == 0) return c10::GetDefaultCPUAllocator()->allocate(n);
    const size_t bytes = (n + 4095) / 4096 * 4096;
    void* block = take(c, bytes);
    if (block == nullptr) {
      block = std::aligned_alloc(64, bytes);
      if (block == nullptr) {  // the cached blocks of other sizes may be what is missing
        empty_output_cache();
        block = std::aligned_alloc(64, bytes);
      }
      TORCH_CHECK(block != nullptr, "mmops: out of memory: could not allocate ", n, " bytes for an op's output");
      std::lock_guard<std::mutex> lock(c.mu);
      c.sizes.emplace(block, bytes);
    }
    return {block, block, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

CachingAllocator allocator;

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

size_t output_cache_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return c.held;
}

size_t empty_output_cache() {
  Cache& c = cache();
  std::vector<std::pair<size_t, void*>> blocks;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    blocks.swap(c.blocks);
    c.held = 0;
    for (auto& block : blocks) c.sizes.erase(block.second);
  }
  size_t freed = 0;
  for (auto& [bytes, block] : blocks) {
    freed += bytes;
    std::free(block);
  }
  return freed;
}

}  // namespace mmops::cpu
