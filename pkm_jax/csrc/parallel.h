// ParallelFor: the custom calls' one way of splitting work over XLA's intra-op thread pool.
// Guarded: a handler's body with C++ exceptions turned into FFI errors.

#ifndef PKM_JAX_CSRC_PARALLEL_H_
#define PKM_JAX_CSRC_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <exception>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace pkm_jax {

// Chunks of one call's work, claimed from a counter by the calling thread and by helpers on
// the pool. The caller never waits for a helper to start, only for chunks a running helper has
// claimed, so a busy pool cannot deadlock it; a helper that starts after every chunk is claimed
// finds nothing to do (the shared_ptr keeps the counters alive, and `work` is not called).
struct ParallelJob {
  std::function<void(int64_t)> work;
  int64_t chunks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};

  void Run() {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
      work(c);
      finished.fetch_add(1, std::memory_order_release);
    }
  }
};

// Calls work(c) once for every c in [0, chunks), on this thread and the pool's; returns when
// all have returned.
inline void ParallelFor(xla::ffi::ThreadPool pool, int64_t chunks,
                        std::function<void(int64_t)> work) {
  if (chunks <= 0) return;
  auto job = std::make_shared<ParallelJob>();
  job->work = std::move(work);
  job->chunks = chunks;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  std::exception_ptr failed;
  try {
    for (int64_t t = 0; t < helpers; ++t) pool.Schedule([job] { job->Run(); });
  } catch (...) {  // helpers already queued may still run `work`: finish every chunk first
    failed = std::current_exception();
  }
  job->Run();
  while (job->finished.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
  if (failed) std::rethrow_exception(failed);
}

// Runs a handler's body: an exception must not cross the FFI's `extern "C"` boundary (it would
// end the process), so a failed allocation (std::bad_alloc) becomes a RESOURCE_EXHAUSTED
// error and anything else an INTERNAL one, which XLA raises in Python. Work inside ParallelFor
// allocates nothing; the buffers are made before it.
template <typename Body>
xla::ffi::Error Guarded(const char* name, Body&& body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return xla::ffi::Error(xla::ffi::ErrorCode::kResourceExhausted,
                           std::string(name) + ": out of host memory for its working buffers");
  } catch (const std::exception& e) {
    return xla::ffi::Error(xla::ffi::ErrorCode::kInternal, std::string(name) + ": " + e.what());
  }
}

}  // namespace pkm_jax

#endif  // PKM_JAX_CSRC_PARALLEL_H_
