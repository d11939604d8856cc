// Exact top-k along the last axis of a float32 array, as an XLA FFI custom call for CPUs.
//
// The same function as XLA:CPU's TopK (jax.lax.top_k): values compared as XLA compares them
// (through a total-order int32 key, so -0.0 < 0.0 and NaNs sort by their bits), ties broken by
// the lower index, results best first. XLA:CPU's TopK partial-sorts an index array per row
// through a comparator; its cost grows with n * k. Here one pass over the row keeps the best k
// in a small sorted buffer: an element that does not beat the current k-th costs one compare,
// and only ~k ln(n / k) elements of a row in random order get inserted.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// XLA:CPU's key: monotone in the float's value, -0.0 below 0.0.
inline int32_t OrderKey(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return static_cast<int32_t>(bits) < 0
             ? static_cast<int32_t>(std::numeric_limits<int32_t>::max() - bits)
             : static_cast<int32_t>(bits);
}

// Inserts (key, id) into the sorted keys[0:filled] (best first), after any equal key: an equal
// key comes from a later index, which loses the tie.
inline void Insert(int32_t key, int32_t id, int64_t filled, int32_t* keys, int32_t* ids) {
  int64_t p = filled;
  for (; p > 0 && keys[p - 1] < key; --p) {
    keys[p] = keys[p - 1];
    ids[p] = ids[p - 1];
  }
  keys[p] = key;
  ids[p] = id;
}

constexpr int64_t kBlock = 16;
constexpr int64_t kMaxK = 1024;

// Keys and indices of the best k of row[0:n], best first (k <= n).
void TopKRow(const float* row, int64_t n, int64_t k, int32_t* keys, int32_t* ids) {
  for (int64_t j = 0; j < k; ++j) Insert(OrderKey(row[j]), static_cast<int32_t>(j), j, keys, ids);
  int64_t j0 = k;
  // Whole blocks: keys and the compare with the current k-th in a loop the compiler
  // vectorises; only the elements that beat it are inserted (the k-th only rises).
  for (; j0 + kBlock <= n; j0 += kBlock) {
    int32_t block[kBlock];
    uint32_t beats = 0;
    const int32_t kth = keys[k - 1];
    for (int64_t t = 0; t < kBlock; ++t) {
      block[t] = OrderKey(row[j0 + t]);
      beats |= static_cast<uint32_t>(block[t] > kth) << t;
    }
    while (beats) {
      const int t = __builtin_ctz(beats);
      beats &= beats - 1;
      if (block[t] > keys[k - 1]) Insert(block[t], static_cast<int32_t>(j0 + t), k - 1, keys, ids);
    }
  }
  for (int64_t j = j0; j < n; ++j) {
    const int32_t key = OrderKey(row[j]);
    if (key > keys[k - 1]) Insert(key, static_cast<int32_t>(j), k - 1, keys, ids);
  }
}

// x [..., n] -> the indices [..., k] of each row's best k, best first (the caller gathers the
// values: the same bits, and differentiable).
ffi::Error TopKImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> indices,
                    ffi::ThreadPool pool) {
  return pkm_jax::Guarded("top_k", [&]() -> ffi::Error {
    const auto dims = x.dimensions();
    const auto out_dims = indices->dimensions();
    if (dims.size() == 0 || out_dims.size() != dims.size() ||
        !std::equal(dims.begin(), dims.end() - 1, out_dims.begin())) {
      return ffi::Error::InvalidArgument("top_k: x [..., n] and indices [..., k]");
    }
    const int64_t n = dims.back(), k = out_dims.back();
    if (k < 1 || k > n || k > kMaxK) {
      return ffi::Error::InvalidArgument("top_k needs 1 <= k <= min(n, 1024)");
    }
    const float* in = x.typed_data();
    int32_t* out_ids = indices->typed_data();
    const int64_t rows = static_cast<int64_t>(x.element_count()) / n;
    // ~64K scores per chunk: large enough that claiming one costs nothing next to it.
    const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 16) / n);
    pkm_jax::ParallelFor(pool, (rows + chunk - 1) / chunk, [&](int64_t c) {
      int32_t keys[kMaxK];
      for (int64_t r = c * chunk; r < std::min(rows, (c + 1) * chunk); ++r) {
        TopKRow(in + r * n, n, k, keys, out_ids + r * k);
      }
    });
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PkmTopKF32, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ctx<ffi::ThreadPool>());
