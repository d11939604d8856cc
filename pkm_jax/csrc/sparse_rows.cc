// Row-sparse value updates as XLA FFI custom calls for CPUs: the gradients of the picked rows
// of a memory table, and lazy Adam on those rows, in place.
//
// The same functions as `sparse_adam.row_gradients` and `sparse_adam.sparse_adam(...).step`
// (their pure-JAX code is the reference the tests compare with). At BERT-base a step picks
// 131,072 rows of 768 per layer; XLA builds their gradients with a scatter-add into a zeroed
// [R, V] buffer and steps Adam with gathers and scatters of chunks, so every [R, V]-sized array
// crosses memory several times. Here the picks are sorted by row once (a stable radix sort:
// O(picks), whatever the table's size), each row's gradient is summed in cache and written
// once, and Adam reads and writes each picked row of the table and its moments once.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowsPerChunk = 64;  // rows of a [*, V] array per claimed chunk of work

// Sorts (key, value) pairs by key, stably (equal keys keep their order): LSD radix sort with
// 11-bit digits, as many passes as the largest key needs.
void RadixSortPairs(std::vector<uint32_t>& keys, std::vector<uint32_t>& values,
                    uint32_t max_key) {
  const size_t n = keys.size();
  std::vector<uint32_t> keys_tmp(n), values_tmp(n);
  constexpr int kBits = 11;
  constexpr uint32_t kBuckets = 1u << kBits;
  for (int shift = 0; shift < 32 && (max_key >> shift) != 0; shift += kBits) {
    std::vector<size_t> start(kBuckets + 1, 0);
    for (size_t i = 0; i < n; ++i) ++start[((keys[i] >> shift) & (kBuckets - 1)) + 1];
    for (uint32_t b = 0; b < kBuckets; ++b) start[b + 1] += start[b];
    for (size_t i = 0; i < n; ++i) {
      const size_t to = start[(keys[i] >> shift) & (kBuckets - 1)]++;
      keys_tmp[to] = keys[i];
      values_tmp[to] = values[i];
    }
    keys.swap(keys_tmp);
    values.swap(values_tmp);
  }
}

// row += weight * token (separate arrays: vectorised).
inline void AddScaled(float weight, const float* __restrict token, float* __restrict row,
                      int64_t v) {
  for (int64_t e = 0; e < v; ++e) row[e] += weight * token[e];
}

// idx [M, P] (ids outside [0, num_rows): padding), w [M, P], g [M, V] -> row_ids [R] (the
// picked ids, ascending, then num_rows), row_grads [R, V] (sum over the picks of a row of
// w * g[token]; zeros at padding), row_sq [R] (each row gradient's squared norm).
ffi::Error RowGradientsImpl(ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> w,
                            ffi::Buffer<ffi::F32> g, int64_t num_rows,
                            ffi::ResultBuffer<ffi::S32> row_ids,
                            ffi::ResultBuffer<ffi::F32> row_grads,
                            ffi::ResultBuffer<ffi::F32> row_sq, ffi::ThreadPool pool) {
  return pkm_jax::Guarded("row_gradients", [&]() -> ffi::Error {
    const auto id_dims = idx.dimensions();
    const auto g_dims = g.dimensions();
    const auto out_dims = row_grads->dimensions();
    if (id_dims.size() != 2 || g_dims.size() != 2 || out_dims.size() != 2 ||
        w.element_count() != idx.element_count() || g_dims[0] != id_dims[0] ||
        out_dims[1] != g_dims[1] || row_ids->element_count() != out_dims[0] ||
        row_sq->element_count() != out_dims[0] || num_rows < 1 ||
        num_rows >= int64_t{1} << 31 || idx.element_count() > int64_t{UINT32_MAX}) {
      return ffi::Error::InvalidArgument(
          "row_gradients: idx, w [M, P], g [M, V] -> row_ids [R], row_grads [R, V], row_sq [R]");
    }
    const int64_t m = id_dims[0], p = id_dims[1], v = g_dims[1], r = out_dims[0];
    const int32_t* ids = idx.typed_data();
    // Picks in pick-major order (the reference's: pick j of every token, then pick j + 1), so
    // a row's terms are added in the order XLA's loop adds them.
    std::vector<uint32_t> keys, picks;
    keys.reserve(m * p);
    picks.reserve(m * p);
    for (int64_t j = 0; j < p; ++j) {
      for (int64_t t = 0; t < m; ++t) {
        const int32_t id = ids[t * p + j];
        if (id >= 0 && id < num_rows) {
          keys.push_back(static_cast<uint32_t>(id));
          picks.push_back(static_cast<uint32_t>(t * p + j));
        }
      }
    }
    RadixSortPairs(keys, picks, static_cast<uint32_t>(num_rows - 1));
    std::vector<int64_t> starts;  // starts[u]: the first sorted pick of unique row u
    for (size_t i = 0; i < keys.size(); ++i) {
      if (i == 0 || keys[i] != keys[i - 1]) starts.push_back(static_cast<int64_t>(i));
    }
    const int64_t unique = static_cast<int64_t>(starts.size());
    if (unique > r) return ffi::Error::InvalidArgument("row_gradients: more rows than R");
    starts.push_back(static_cast<int64_t>(keys.size()));

    const float* weights = w.typed_data();
    const float* grads = g.typed_data();
    int32_t* out_ids = row_ids->typed_data();
    float* out = row_grads->typed_data();
    float* out_sq = row_sq->typed_data();
    pkm_jax::ParallelFor(pool, (r + kRowsPerChunk - 1) / kRowsPerChunk, [&](int64_t c) {
      for (int64_t u = c * kRowsPerChunk; u < std::min(r, (c + 1) * kRowsPerChunk); ++u) {
        float* row = out + u * v;
        std::fill(row, row + v, 0.0f);
        if (u >= unique) {
          out_ids[u] = static_cast<int32_t>(num_rows);
          out_sq[u] = 0.0f;
          continue;
        }
        out_ids[u] = static_cast<int32_t>(keys[starts[u]]);
        for (int64_t s = starts[u]; s < starts[u + 1]; ++s) {
          AddScaled(weights[picks[s]], grads + (picks[s] / p) * v, row, v);
        }
        float sq = 0.0f;
        for (int64_t e = 0; e < v; ++e) sq += row[e] * row[e];
        out_sq[u] = sq;
      }
    });
    return ffi::Error::Success();
  });
}

struct AdamConstants {
  float scale, lr, bc1, bc2, b1, one_minus_b1, b2, one_minus_b2, eps, weight_decay;
};

// One row: its gradient times the scale, its moments and its value updated in place. The
// pointers never alias (separate arrays), which lets the compiler vectorise the loop.
template <bool kDecay>
void AdamRow(const float* __restrict grad_row, float* __restrict t, float* __restrict m1,
             float* __restrict m2, int64_t v, const AdamConstants& k) {
  for (int64_t e = 0; e < v; ++e) {
    const float grad = grad_row[e] * k.scale;
    const float mu_e = k.one_minus_b1 * grad + k.b1 * m1[e];
    const float nu_e = k.one_minus_b2 * (grad * grad) + k.b2 * m2[e];
    float step = (mu_e / k.bc1) / (std::sqrt(nu_e / k.bc2) + k.eps);
    if (kDecay) step = step + k.weight_decay * t[e];
    m1[e] = mu_e;
    m2[e] = nu_e;
    t[e] = t[e] + (-k.lr) * step;
  }
}

// One lazy Adam(W) step of the rows row_ids (unique, else an INVALID_ARGUMENT error before any
// write: two threads would step one row at once; ids outside [0, N): padding, skipped) of
// table/mu/nu [N, V], in place (the results alias those arguments). scalars: [grad_scale, lr,
// 1 - b1^count, 1 - b2^count]. The same expressions, in the same order, as sparse_adam's.
ffi::Error LazyAdamImpl(ffi::Buffer<ffi::S32> row_ids, ffi::Buffer<ffi::F32> row_grads,
                        ffi::Buffer<ffi::F32> scalars, ffi::Buffer<ffi::F32> table_in,
                        ffi::Buffer<ffi::F32> mu_in, ffi::Buffer<ffi::F32> nu_in, float b1,
                        float one_minus_b1, float b2, float one_minus_b2, float eps,
                        float weight_decay, ffi::ResultBuffer<ffi::F32> table,
                        ffi::ResultBuffer<ffi::F32> mu, ffi::ResultBuffer<ffi::F32> nu,
                        ffi::ThreadPool pool) {
  return pkm_jax::Guarded("lazy_adam", [&]() -> ffi::Error {
    const auto t_dims = table->dimensions();
    const auto g_dims = row_grads.dimensions();
    if (t_dims.size() != 2 || g_dims.size() != 2 || g_dims[1] != t_dims[1] ||
        row_ids.element_count() != g_dims[0] || scalars.element_count() != 4 ||
        mu->element_count() != table->element_count() ||
        nu->element_count() != table->element_count()) {
      return ffi::Error::InvalidArgument(
          "lazy_adam: row_ids [R], row_grads [R, V], scalars [4], table/mu/nu [N, V]");
    }
    {
      const int64_t n = t_dims[0], r = g_dims[0];
      const int32_t* ids = row_ids.typed_data();
      std::vector<uint64_t> seen((n + 63) / 64, 0);  // n bits: ~32 KB for 262,144 rows
      for (int64_t u = 0; u < r; ++u) {
        const int32_t id = ids[u];
        if (id < 0 || id >= n) continue;
        const uint64_t bit = uint64_t{1} << (id % 64);
        if (seen[id / 64] & bit) {
          return ffi::Error::InvalidArgument("lazy_adam: row id " + std::to_string(id) +
                                             " appears more than once; row ids must be unique");
        }
        seen[id / 64] |= bit;
      }
    }
    // The results alias table/mu/nu (input_output_aliases), so XLA hands over the same buffers;
    // should it ever not, the rows not picked must still come through: copy them first.
    const std::pair<ffi::Buffer<ffi::F32>*, ffi::Result<ffi::Buffer<ffi::F32>>*> pairs[] = {
        {&table_in, &table}, {&mu_in, &mu}, {&nu_in, &nu}};
    for (auto& [in, out] : pairs) {
      if (in->element_count() != (*out)->element_count()) {
        return ffi::Error::InvalidArgument("lazy_adam: table/mu/nu and their results differ");
      }
      if (in->untyped_data() != (*out)->untyped_data()) {
        std::memcpy((*out)->untyped_data(), in->untyped_data(), in->size_bytes());
      }
    }
    const int64_t n = t_dims[0], v = t_dims[1], r = g_dims[0];
    const float* s = scalars.typed_data();
    const float scale = s[0], lr = s[1], bc1 = s[2], bc2 = s[3];
    const int32_t* ids = row_ids.typed_data();
    const float* grads = row_grads.typed_data();
    float* t_all = table->typed_data();
    float* mu_all = mu->typed_data();
    float* nu_all = nu->typed_data();
    const AdamConstants k{scale, lr, bc1, bc2, b1, one_minus_b1, b2, one_minus_b2, eps,
                          weight_decay};
    pkm_jax::ParallelFor(pool, (r + kRowsPerChunk - 1) / kRowsPerChunk, [&](int64_t c) {
      for (int64_t u = c * kRowsPerChunk; u < std::min(r, (c + 1) * kRowsPerChunk); ++u) {
        const int32_t id = ids[u];
        if (id < 0 || id >= n) continue;
        const int64_t at = int64_t{id} * v;
        if (weight_decay != 0.0f) {
          AdamRow<true>(grads + u * v, t_all + at, mu_all + at, nu_all + at, v, k);
        } else {
          AdamRow<false>(grads + u * v, t_all + at, mu_all + at, nu_all + at, v, k);
        }
      }
    });
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PkmRowGradientsF32, RowGradientsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_rows")
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PkmLazyAdamF32, LazyAdamImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("b1")
                                  .Attr<float>("one_minus_b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("weight_decay")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>());
