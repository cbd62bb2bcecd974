// The CPU gradient of a loss over [rows, V] logits is hundreds of MiB. From torch::empty, glibc
// maps such a block afresh on every call (above malloc's mmap threshold, at most 32 MiB, it
// never reuses freed memory) and unmaps it when autograd drops it, and the first write to each
// page faults into the kernel, which zeroes it. So once autograd frees a gradient of 32 MiB or
// more, its buffer is kept for the next call. This pays only with the streaming stores
// (cpu_rows.h, store_gradient): on the operator benchmark's 2-core Zen 5 (4096 x 32000 fp32,
// logit live, forward 70-76 ms without a gradient) writing the gradient cost 13-26 ms into fresh
// pages, and into a kept buffer 26-31 ms with ordinary stores, 7-10 ms with streaming ones (fresh
// pages come zeroed, presumably with their lines still cached, so ordinary stores into them read
// no line from memory). One buffer, since a training step's loss frees its gradient in its own
// backward, before the next microbatch's forward asks for one; held until a larger one replaces
// it: at most the largest gradient the process has asked for, which its peak already held.
// Buffers ask for 2 MiB pages (transparent huge pages in "madvise" mode, the common default,
// serve only such ranges; a hint the kernel may ignore): 4 KiB pages cost a fault and a TLB
// entry each.
#include "cpu_gradient.h"

#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>

#include <cstdlib>
#include <mutex>
#include <new>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace anchored_kl {
namespace {

constexpr size_t kHugePage = size_t{1} << 21;
constexpr size_t kKeptFrom = size_t{32} << 20;  // smaller blocks: malloc reuses them itself

struct Buffer {
  void* data = nullptr;
  size_t bytes = 0;  // capacity, a multiple of kHugePage
};

Buffer allocate(size_t bytes) {
  const size_t capacity = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* data = std::aligned_alloc(kHugePage, capacity);
  if (data == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(data, capacity, MADV_HUGEPAGE);
#endif
  return {data, capacity};
}

// The one idle buffer. Autograd frees gradients on any thread, hence the mutex; never destroyed,
// so that a tensor outliving static destruction (at interpreter exit) can still give its back.
class IdleBuffer {
 public:
  Buffer take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (idle_.bytes < bytes) return {};
    return std::exchange(idle_, Buffer{});
  }
  void give_back(Buffer returned) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (returned.bytes >= idle_.bytes) std::swap(idle_, returned);
    }
    std::free(returned.data);  // the smaller of the two (null: nothing)
  }
  size_t bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return idle_.bytes;
  }

 private:
  std::mutex mutex_;
  Buffer idle_;
};

IdleBuffer& idle_buffer() {
  static IdleBuffer* idle = new IdleBuffer;
  return *idle;
}

}  // namespace

at::Tensor cpu_gradient_like(const at::Tensor& z) {
  const size_t bytes = static_cast<size_t>(z.numel()) * z.element_size();
  if (bytes < kKeptFrom) return at::empty_like(z);
  Buffer buffer = idle_buffer().take(bytes);
  if (buffer.data == nullptr) buffer = allocate(bytes);
  return at::from_blob(
      buffer.data, z.sizes(), [buffer](void*) { idle_buffer().give_back(buffer); }, z.options());
}

int64_t idle_cpu_gradient_bytes() { return static_cast<int64_t>(idle_buffer().bytes()); }

}  // namespace anchored_kl
