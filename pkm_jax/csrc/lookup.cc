// The memory layer's weighted lookup's gradients as XLA FFI custom calls for CPUs.
//
// The same functions as `product_keys.weighted_lookup`'s backward (the pure-JAX code the tests
// compare with). The forward had a kernel too (each token's rows summed in cache); at BERT-base
// it was 1.06-1.08x of XLA's loop in two runs, within the noise, and was removed. XLA runs the
// backward as a loop over a token's picks, each step a gather of every token's row, a dot with
// its gradient, and a scatter-add of w * g into a zeroed [N, V] gradient: a few small ops with
// a table-sized or token-sized array in and out. Here each picked row is dotted with its
// token's gradient in cache, and the table's gradient is built by a counting sort of the picks
// by row: each row summed once, pick-major (the reference loop's order when it takes one pick a
// step), rows not picked written as zeros.
//
// Quantised tables (int8, float8_e4m3fn rows; pkm_jax.quantize) have a forward kernel: XLA's loop
// gathers each chunk of picks' rows, widens them to float32 in memory and sums; here each row is
// widened in registers as it is added. The per-row scales are already folded into the weights.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowsPerChunk = 64;  // tokens (or table rows) per claimed chunk of work

bool Valid(int32_t id, int64_t n) { return id >= 0 && id < n; }

// Rows are read in the order of a token's picks: scattered over a table far larger than the
// caches, each a DRAM (and TLB) miss. The row two picks ahead is requested while this one is
// dotted, into L2 only (locality 2): an L1 prefetch of a whole 3 KB row holds the few L1 miss
// buffers the row being read needs (measured on the removed forward kernel and d weights).
constexpr int64_t kPrefetchPicks = 2;
// An 8-bit row is a quarter of a float32 one (12 cache lines at V = 768): requested 8 picks
// ahead, more rows are in flight (at 2 picks ahead the int8 sum was ~2x slower than at 8 under
// load on a 2-core CPU; 16 was no better).
constexpr int64_t kPrefetchPicks8 = 8;
inline void PrefetchRow(const float* row, int64_t v) {
  for (int64_t e = 0; e < v; e += 16) __builtin_prefetch(row + e, /*rw=*/0, /*locality=*/2);
}

// acc += weight * row (separate arrays: vectorised).
inline void AddScaled(float weight, const float* __restrict row, float* __restrict acc,
                      int64_t v) {
  for (int64_t e = 0; e < v; ++e) acc[e] += weight * row[e];
}

// a . b in kLanes partial sums, so the compiler may vectorise it (one running sum could not be
// reordered without -ffast-math).
constexpr int64_t kLanes = 16;
inline float Dot(const float* __restrict a, const float* __restrict b, int64_t v) {
  float part[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= v; e += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) part[l] += a[e + l] * b[e + l];
  }
  float sum = 0.0f;
  for (; e < v; ++e) sum += a[e] * b[e];
  for (int64_t l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

// values [N, V], idx [M, P], g [M, V] -> g_w [M, P]: g[m] . values[idx[m, p]] (0 at padding),
// the gradient of the lookup with respect to its weights.
ffi::Error GatherDotImpl(ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> idx,
                         ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> g_w,
                         ffi::ThreadPool pool) {
  return pkm_jax::Guarded("gather_dot", [&]() -> ffi::Error {
    const auto t_dims = values.dimensions();
    const auto id_dims = idx.dimensions();
    const auto g_dims = g.dimensions();
    if (t_dims.size() != 2 || id_dims.size() != 2 || g_dims.size() != 2 ||
        g_dims[0] != id_dims[0] || g_dims[1] != t_dims[1] ||
        g_w->element_count() != idx.element_count()) {
      return ffi::Error::InvalidArgument(
          "gather_dot: values [N, V], idx [M, P], g [M, V] -> [M, P]");
    }
    const int64_t n = t_dims[0], v = t_dims[1], m = id_dims[0], p = id_dims[1];
    const float* table = values.typed_data();
    const int32_t* ids = idx.typed_data();
    const float* grads = g.typed_data();
    float* result = g_w->typed_data();
    pkm_jax::ParallelFor(pool, (m + kRowsPerChunk - 1) / kRowsPerChunk, [&](int64_t c) {
      for (int64_t t = c * kRowsPerChunk; t < std::min(m, (c + 1) * kRowsPerChunk); ++t) {
        for (int64_t j = 0; j < p; ++j) {
          const int64_t ahead = t * p + j + kPrefetchPicks;
          if (ahead < m * p && Valid(ids[ahead], n)) {
            PrefetchRow(table + int64_t{ids[ahead]} * v, v);
          }
          const int32_t id = ids[t * p + j];
          result[t * p + j] = Valid(id, n) ? Dot(grads + t * v, table + int64_t{id} * v, v) : 0.0f;
        }
      }
    });
    return ffi::Error::Success();
  });
}

// idx/w [M, P] (ids outside [0, N): padding), g [M, V] -> g_values [N, V]: row i is the sum
// over the picks of row i of w * g[token] (zeros for rows not picked), the gradient of the
// lookup with respect to the table. A counting sort by row (O(N + picks)) keeps the picks of a
// row in pick-major order (pick j of every token, then pick j + 1), the order the reference's
// loop adds them in when it takes one pick a step.
ffi::Error ScatterSumImpl(ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> w,
                          ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> g_values,
                          ffi::ThreadPool pool) {
  return pkm_jax::Guarded("scatter_sum", [&]() -> ffi::Error {
    const auto id_dims = idx.dimensions();
    const auto g_dims = g.dimensions();
    const auto out_dims = g_values->dimensions();
    if (id_dims.size() != 2 || g_dims.size() != 2 || out_dims.size() != 2 ||
        w.element_count() != idx.element_count() || g_dims[0] != id_dims[0] ||
        out_dims[1] != g_dims[1] || out_dims[0] >= int64_t{1} << 31 ||
        idx.element_count() > int64_t{UINT32_MAX}) {
      return ffi::Error::InvalidArgument("scatter_sum: idx/w [M, P], g [M, V] -> [N, V]");
    }
    const int64_t m = id_dims[0], p = id_dims[1], v = g_dims[1], n = out_dims[0];
    const int32_t* ids = idx.typed_data();
    std::vector<uint32_t> start(n + 1, 0);  // start[i]: row i's first pick in `sorted`
    for (int64_t i = 0; i < m * p; ++i) {
      if (Valid(ids[i], n)) ++start[ids[i] + 1];
    }
    for (int64_t i = 0; i < n; ++i) start[i + 1] += start[i];
    std::vector<uint32_t> sorted(start[n]);
    {
      std::vector<uint32_t> next(start.begin(), start.end() - 1);
      for (int64_t j = 0; j < p; ++j) {
        for (int64_t t = 0; t < m; ++t) {
          const int32_t id = ids[t * p + j];
          if (Valid(id, n)) sorted[next[id]++] = static_cast<uint32_t>(t * p + j);
        }
      }
    }
    const float* weights = w.typed_data();
    const float* grads = g.typed_data();
    float* result = g_values->typed_data();
    pkm_jax::ParallelFor(pool, (n + kRowsPerChunk - 1) / kRowsPerChunk, [&](int64_t c) {
      for (int64_t i = c * kRowsPerChunk; i < std::min(n, (c + 1) * kRowsPerChunk); ++i) {
        float* row = result + i * v;
        std::fill(row, row + v, 0.0f);
        for (uint32_t s = start[i]; s < start[i + 1]; ++s) {
          AddScaled(weights[sorted[s]], grads + (sorted[s] / p) * v, row, v);
        }
      }
    });
    return ffi::Error::Success();
  });
}

// float8_e4m3fn's 256 values (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no
// infinities, S.1111.111 is NaN), decoded once: a row byte is read through this table.
struct Fp8E4M3Table {
  float value[256];
  Fp8E4M3Table() {
    for (int b = 0; b < 256; ++b) {
      const int exponent = (b >> 3) & 0xF, mantissa = b & 7;
      float v;
      if (exponent == 15 && mantissa == 7) {
        v = NAN;
      } else if (exponent == 0) {
        v = std::ldexp(static_cast<float>(mantissa) / 8.0f, -6);  // subnormal
      } else {
        v = std::ldexp(1.0f + static_cast<float>(mantissa) / 8.0f, exponent - 7);
      }
      value[b] = (b & 0x80) ? -v : v;
    }
  }
};
const Fp8E4M3Table kFp8E4M3;

// acc += weight * widen(row): built for AVX-512, AVX2 and the baseline, picked at load time by
// the CPU, so the widening vectorises with the host's instructions as XLA's own loop does (it
// compiles for the host's CPU; the baseline, SSE2, has no byte-to-int32 widening).
#define PKM_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
PKM_CPU_CLONES void AddInt8Row(float weight, const int8_t* __restrict row,
                               float* __restrict acc, int64_t v) {
  for (int64_t e = 0; e < v; ++e) acc[e] += weight * static_cast<float>(row[e]);
}
PKM_CPU_CLONES void AddFp8E4M3Row(float weight, const uint8_t* __restrict row,
                                  float* __restrict acc, int64_t v) {
  const float* decode = kFp8E4M3.value;
  for (int64_t e = 0; e < v; ++e) acc[e] += weight * decode[row[e]];
}

struct Int8Row {
  using Byte = int8_t;
  static void Add(float w, const int8_t* row, float* acc, int64_t v) { AddInt8Row(w, row, acc, v); }
};
struct Fp8E4M3Row {
  using Byte = uint8_t;
  static void Add(float w, const uint8_t* row, float* acc, int64_t v) {
    AddFp8E4M3Row(w, row, acc, v);
  }
};

// values [N, V] (8-bit rows), idx/w [M, P] -> out [M, V] float32: out[m] = sum_p w[m, p] *
// values[idx[m, p]] (ids outside [0, N): padding, nothing added), each token's picks in order.
template <typename Row>
ffi::Error GatherSum8Impl(ffi::AnyBuffer values, ffi::Buffer<ffi::S32> idx,
                          ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out,
                          ffi::ThreadPool pool) {
  return pkm_jax::Guarded("gather_sum_8bit", [&]() -> ffi::Error {
    const auto t_dims = values.dimensions();
    const auto id_dims = idx.dimensions();
    const auto out_dims = out->dimensions();
    if (t_dims.size() != 2 || id_dims.size() != 2 || out_dims.size() != 2 ||
        w.element_count() != idx.element_count() || out_dims[0] != id_dims[0] ||
        out_dims[1] != t_dims[1]) {
      return ffi::Error::InvalidArgument(
          "gather_sum_8bit: values [N, V], idx/w [M, P] -> [M, V]");
    }
    const int64_t n = t_dims[0], v = t_dims[1], m = id_dims[0], p = id_dims[1];
    const auto* table = static_cast<const typename Row::Byte*>(values.untyped_data());
    const int32_t* ids = idx.typed_data();
    const float* weights = w.typed_data();
    float* result = out->typed_data();
    pkm_jax::ParallelFor(pool, (m + kRowsPerChunk - 1) / kRowsPerChunk, [&](int64_t c) {
      for (int64_t t = c * kRowsPerChunk; t < std::min(m, (c + 1) * kRowsPerChunk); ++t) {
        float* acc = result + t * v;
        std::fill(acc, acc + v, 0.0f);
        for (int64_t j = 0; j < p; ++j) {
          const int64_t ahead = t * p + j + kPrefetchPicks8;
          if (ahead < m * p && Valid(ids[ahead], n)) {
            // A quarter of a float32 row's bytes: one prefetch per 64-byte line.
            const auto* row = table + int64_t{ids[ahead]} * v;
            for (int64_t e = 0; e < v; e += 64) __builtin_prefetch(row + e, 0, 2);
          }
          const int32_t id = ids[t * p + j];
          if (!Valid(id, n)) continue;
          Row::Add(weights[t * p + j], table + int64_t{id} * v, acc, v);
        }
      }
    });
    return ffi::Error::Success();
  });
}

}  // namespace

#define PKM_GATHER_SUM_8BIT(symbol, Row)                                                 \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, GatherSum8Impl<Row>,                             \
                                ffi::Ffi::Bind()                                          \
                                    .Arg<ffi::AnyBuffer>()                                \
                                    .Arg<ffi::Buffer<ffi::S32>>()                         \
                                    .Arg<ffi::Buffer<ffi::F32>>()                         \
                                    .Ret<ffi::Buffer<ffi::F32>>()                         \
                                    .Ctx<ffi::ThreadPool>());
PKM_GATHER_SUM_8BIT(PkmGatherSumS8, Int8Row)
PKM_GATHER_SUM_8BIT(PkmGatherSumF8E4M3FN, Fp8E4M3Row)

XLA_FFI_DEFINE_HANDLER_SYMBOL(PkmGatherDotF32, GatherDotImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PkmScatterSumF32, ScatterSumImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>());
