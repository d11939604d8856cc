"""Product-key memory's pure operations: the exact search, the weighted lookup, their gradients.

A query is split into two halves; each half is scored against its own set of `n_keys` sub-keys.
Because a product key's score is the sum of its two halves' scores, the top-k over all n_keys**2
product keys lies inside the k x k grid of the per-half top-k: the exact search costs O(n_keys).
Of that grid only the ~k ln k pairs with (i + 1)(j + 1) <= k can make the top k (`candidate_pairs`).

These functions know nothing of meshes: the layer (`memory.py`) calls them on one device, and
`sharded_memory.py` calls them inside each device's block of a `jax.shard_map`.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pkm_jax import chunks
from pkm_jax.cpu_top_k import top_k

class MemoryAux(NamedTuple):
  """What a memory layer picked, for the usage metrics and sparse value updates."""

  indices: jax.Array  # [B, T, H, K] int32 slot ids, best first
  weights: jax.Array  # [B, T, H, K] softmax weights
  # peer (pkm_jax.memory_kinds): what each value row is weighted by, w * act(u . x), and the
  # layer's input x [B, T, D] -- what sparse updates of the two tables need. None otherwise.
  row_weights: jax.Array | None = None
  inputs: jax.Array | None = None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def subkey_topk(q_HxMxD: jax.Array, keys_HxNxD: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Top-k sub-keys of each query, per head: q [H, M, D], keys [H, n, D] -> scores, ids [H, M, k].

  Head-major, so the [H, M, n] scores come out of the batched matmul in the layout top_k reads.
  The backward touches only the k picked sub-keys of each query (see `_subkey_topk_bwd`).
  """
  # HIGHEST: float32 products on every platform. GPUs default to TF32 and TPUs to one bf16
  # pass, where near-ties between sub-keys -- which decide the rows read -- would differ.
  scores, ids = top_k(jnp.einsum("hmd,hnd->hmn", q_HxMxD, keys_HxNxD,
                                 precision=jax.lax.Precision.HIGHEST), k)
  return scores, ids


def _subkey_topk_fwd(q_HxMxD, keys_HxNxD, k):
  scores, ids = subkey_topk(q_HxMxD, keys_HxNxD, k)
  return (scores, ids), (q_HxMxD, keys_HxNxD, ids)


def _subkey_topk_bwd(k, res, cotangents):
  """score[h, m, j] = q[h, m] . keys[h, ids[h, m, j]], so the gradients are gathered from / added
  into the picked rows only: O(H M k D) work, where autodiff of top_k would fill a dense
  [H, M, n] score gradient and run two matmuls over it -- growing with n_keys, i.e. with sqrt(N).
  Picks go in chunks (`chunks.cache_chunk` on CPUs, `chunks.accelerator_chunk` on GPUs / TPUs)
  so that a gathered [H, M, chunk, D] block stays bounded at large batches."""
  q_HxMxD, keys_HxNxD, ids_HxMxk = res
  g_HxMxk = cotangents[0].astype(q_HxMxD.dtype)
  h, m, d = q_HxMxD.shape
  n = keys_HxNxD.shape[1]
  bytes_per_pick = h * m * d * q_HxMxD.dtype.itemsize
  take_rows = jax.vmap(  # over heads; padding ids (n) read zeros
      lambda keys_NxD, ids: jnp.take(keys_NxD, ids, axis=0, mode="fill", fill_value=0))
  add_rows = jax.vmap(lambda g_NxD, ids, upd: g_NxD.at[ids.reshape(-1)].add(
      upd.reshape(-1, d), mode="drop"))

  def add_chunk(carry, xs):
    g_q, g_keys = carry
    ids_HxMxc, g_HxMxc = xs
    g_q = g_q + jnp.einsum("hmc,hmcd->hmd", g_HxMxc, take_rows(keys_HxNxD, ids_HxMxc))
    g_keys = add_rows(g_keys, ids_HxMxc, g_HxMxc[..., None] * q_HxMxD[:, :, None, :])
    return (g_q, g_keys), None

  def make(chunk):
    def run(ids_HxMxk, g_HxMxk):
      init = (jnp.zeros_like(q_HxMxD), jnp.zeros_like(keys_HxNxD))
      xs = (chunks.to_chunks(ids_HxMxk, chunk, n), chunks.to_chunks(g_HxMxk, chunk, 0))
      return jax.lax.scan(add_chunk, init, xs)[0]
    return run

  return chunks.per_platform(make, chunks.cache_chunk(k, bytes_per_pick),
                             chunks.accelerator_chunk(k, bytes_per_pick), ids_HxMxk, g_HxMxk)


subkey_topk.defvjp(_subkey_topk_fwd, _subkey_topk_bwd)


def candidate_pairs(k: int) -> tuple[np.ndarray, np.ndarray]:
  """The (i, j) of the k x k grid with (i + 1)(j + 1) <= k, row-major: two int32 arrays [P].

  With both per-half lists sorted descending, every pair (i' <= i, j' <= j) scores at least as
  much as (i, j) and comes before it row-major, so a pair with (i + 1)(j + 1) > k is beaten by
  k others even under ties broken by grid position: it can never be in the top k. P is about
  k ln k (119 of 1,024 for k = 32; 280 of 4,096 for k = 64).
  """
  pairs = [(i, j) for i in range(k) for j in range(k // (i + 1))]
  i_P, j_P = zip(*pairs)
  return np.asarray(i_P, np.int32), np.asarray(j_P, np.int32)


def candidate_topk(v1: jax.Array, i1: jax.Array, v2: jax.Array, i2: jax.Array, n: int
                   ) -> tuple[jax.Array, jax.Array]:
  """Top-k of the sums v1[i] + v2[j] over the pairs of `candidate_pairs`: exact, and the same
  picks as a top_k over the whole k x k grid (ties: the first pair row-major).

  v1, i1, v2, i2 [..., k] (scores sorted descending, sub-key ids), n sub-keys per half ->
  scores, slots i1[i] * n + i2[j] [..., k] (descending).
  """
  k = v1.shape[-1]
  # Where jax.lax.top_k runs (GPUs, TPUs, PKM_JAX_CPU_KERNELS=0), XLA turns it into its TopK call
  # only when the sort's results are read through one slice; fused with the slices below, the
  # first-stage top_k would stay a full sort of n scores. The barrier keeps the stages apart.
  v1, i1, v2, i2 = jax.lax.optimization_barrier((v1, i1, v2, i2))
  # Row i of the pruned grid is a contiguous slice v2[:k // (i + 1)], so the candidates are
  # built by concatenating slices (cheaper than a gather with the static index table).
  cand_scores = jnp.concatenate([v1[..., i:i + 1] + v2[..., :k // (i + 1)] for i in range(k)],
                                axis=-1)

  return jax.lax.platform_dependent(
      cand_scores, i1, i2, cpu=functools.partial(_pick_by_top_k, k=k, n=n),
      default=functools.partial(_pick_by_sort, k=k, n=n))


def _pick_by_top_k(cand_scores: jax.Array, i1: jax.Array, i2: jax.Array, *, k: int, n: int
                   ) -> tuple[jax.Array, jax.Array]:
  """CPUs: top_k (the CPU kernel) of the candidates, their slots gathered at its positions."""
  i_P, j_P = candidate_pairs(k)
  scores, pos = top_k(cand_scores, k)
  slots = (jnp.take_along_axis(i1, jnp.asarray(i_P)[pos], axis=-1) * n
           + jnp.take_along_axis(i2, jnp.asarray(j_P)[pos], axis=-1))
  return scores, slots


def _pick_by_sort(cand_scores: jax.Array, i1: jax.Array, i2: jax.Array, *, k: int, n: int
                  ) -> tuple[jax.Array, jax.Array]:
  """GPUs / TPUs: the slots ride along in one stable key-value sort of the ~k ln k candidates
  (ties: the first pair row-major, as top_k's), read through a slice. The gathers of
  `_pick_by_top_k`, along the last axis with [H, M] batch dimensions, cost XLA:TPU ~70 GB of
  memory traffic per layer at 8,192 tokens by its cost analysis; this search, 5.5 GB."""
  cand_slots = jnp.concatenate([i1[..., i:i + 1] * n + i2[..., :k // (i + 1)]
                                for i in range(k)], axis=-1)
  neg, slots = jax.lax.sort((-cand_scores, cand_slots), dimension=-1, is_stable=True,
                            num_keys=1)
  return -neg[..., :k], slots[..., :k]


def product_key_topk(query: jax.Array, sub_keys: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Exact top-k over all n_keys**2 product keys.

  query [..., H, Kd], sub_keys [H, 2, n, Kd/2] -> scores, indices [..., H, k] (descending);
  the slot of sub-key i (first half) and j (second half) is i * n + j.
  """
  n = sub_keys.shape[2]
  if k > n:
    raise ValueError(f"product_key_topk: k={k} exceeds n_keys={n}")
  *lead, h, kd = query.shape
  # Only the small [..., H, Kd] queries and [..., H, k] results are transposed, never the
  # [..., H, n] scores (the search's largest arrays).
  q_HxMxK = query.reshape(-1, h, kd).transpose(1, 0, 2)
  q1, q2 = jnp.split(q_HxMxK, 2, axis=-1)
  v1, i1 = subkey_topk(q1, sub_keys[:, 0], k)  # [H, M, k], each sorted descending
  v2, i2 = subkey_topk(q2, sub_keys[:, 1], k)
  scores, slots = candidate_topk(v1, i1, v2, i2, n)
  to_lead = lambda x: x.transpose(1, 0, 2).reshape(*lead, h, k)
  return to_lead(scores), to_lead(slots)


def wide_dtype(*dtypes) -> jnp.dtype:
  """The dtype a table's rows meet float32 operands in: the widest of `dtypes` and float32. An
  8-bit table's rows (int8, float8_e4m3fn: quantised, `memory_kinds.QUANTIZED`), which jnp
  does not promote implicitly, read as float32."""
  return jnp.result_type(jnp.float32, *(d for d in dtypes if jnp.dtype(d).itemsize > 1))


def weighted_lookup(values_NxV: jax.Array, indices: jax.Array, weights: jax.Array) -> jax.Array:
  """sum_{h,k} weights * values[indices] (EmbeddingBag 'sum' with per-sample weights).

  values [N, V], indices/weights [..., H, K] -> [..., V] float32. Picks are gathered a chunk
  at a time (`chunks.CACHE_CHUNK_BYTES` on CPUs, `chunks.ACCELERATOR_CHUNK_BYTES` on GPUs and
  TPUs), so [tokens, picks, V] is never built, forward or backward;
  the sum is accumulated in float32 whatever the table's dtype (a bf16 table, 128 picks). Ids
  outside [0, N) are padding: no row, no gradient (as in the CPU and Pallas kernels).
  """
  lead = indices.shape[:-2]
  picks = indices.shape[-2] * indices.shape[-1]
  n = values_NxV.shape[0]
  idx_MxP = indices.reshape(-1, picks)
  # Row N, past the end: `take` fills it with zeros, scatters drop it (negative ids would wrap).
  idx_MxP = jnp.where((idx_MxP >= 0) & (idx_MxP < n), idx_MxP, n)
  # Weights stay at least float32: rounding them to a bf16 table's dtype would cost more
  # precision than the table's own rounding.
  w_MxP = weights.reshape(-1, picks).astype(wide_dtype(values_NxV.dtype))
  out_MxV = _chunked_lookup(values_NxV, idx_MxP, w_MxP)
  return out_MxV.reshape(*lead, values_NxV.shape[1])


def weighted_lookup_grads(values_NxV: jax.Array, idx_MxP: jax.Array, w_MxP: jax.Array,
                          g_MxV: jax.Array, *, want_values: bool
                          ) -> tuple[jax.Array | None, jax.Array]:
  """The VJP of `weighted_lookup` on flat picks: values [N, V], idx/w [M, P], d out [M, V] ->
  (d values [N, V], or None unless want_values; d weights [M, P]). The backward of the
  lookup kernels that have only their own forward, and the reference of those with both."""
  def lookup(values, w):
    return weighted_lookup(values, idx_MxP[:, None, :], w[:, None, :])

  if not want_values:
    _, vjp = jax.vjp(lambda w: lookup(values_NxV, w), w_MxP)
    return None, vjp(g_MxV)[0]
  _, vjp = jax.vjp(lookup, values_NxV, w_MxP)
  return vjp(g_MxV)


def lookup_vjp(forward: Callable[..., jax.Array], grads: Callable[..., tuple]
               ) -> Callable[..., jax.Array]:
  """A weighted lookup (values [N, V], ids, weights) -> [M, V] float32 as a custom_vjp: `forward`
  its primal, `grads(values, ids, weights, d_out [M, V], want_values=)` -> (d values [N, V] or
  None, d weights) its VJP. The ids get no gradient. The table's gradient is asked for
  (`want_values`) only when the table is differentiated: the sparse value updates stop it, and
  then no [N, V] gradient is built at all. `weighted_lookup` here and the lookup kernels
  (`cpu_lookup`, `lookup_kernels`) are made by it."""
  lookup = jax.custom_vjp(forward)

  def fwd(values, ids, weights):
    # symbolic_zeros: the primals come wrapped, saying whether each one is differentiated. The
    # marker is a pytree structure (a residual must be one): () build the table's gradient.
    out = lookup(values.value, ids.value, weights.value)
    return out, (values.value, ids.value, weights.value, () if values.perturbed else None)

  def bwd(res, g_MxV):
    values, ids, weights, want = res
    if isinstance(g_MxV, jax.custom_derivatives.SymbolicZero):
      g_MxV = jnp.zeros(g_MxV.shape, jnp.float32)
    g_values, g_w = grads(values, ids, weights, g_MxV, want_values=want is not None)
    return g_values, None, g_w

  lookup.defvjp(fwd, bwd, symbolic_zeros=True)
  return lookup


def _lookup_chunks(values_NxV: jax.Array, idx_MxP: jax.Array) -> tuple[int, int]:
  """Picks per loop step of the lookup and its backward: (on CPUs, on GPUs / TPUs)."""
  m, picks = idx_MxP.shape
  bytes_per_pick = m * values_NxV.shape[1] * values_NxV.dtype.itemsize
  return chunks.cache_chunk(picks, bytes_per_pick), chunks.accelerator_chunk(picks, bytes_per_pick)


def _chunked_lookup_primal(values_NxV: jax.Array, idx_MxP: jax.Array, w_MxP: jax.Array
                           ) -> jax.Array:
  """sum over picks p of w[m, p] * values[idx[m, p]] -> [M, V] float32, a chunk of picks per
  loop step (the chunk of the platform it is lowered for)."""
  def make(chunk):
    def run(values, idx, w):
      def add_chunk(acc_MxV, xs):
        idx, w = xs
        rows = jnp.take(values, idx, axis=0, mode="fill", fill_value=0).astype(w.dtype)
        return acc_MxV + jnp.einsum("mc,mcv->mv", w, rows,
                                    preferred_element_type=jnp.float32), None

      init = jnp.zeros((idx.shape[0], values.shape[1]), jnp.float32)
      if chunk >= idx.shape[1]:  # one chunk: no loop
        return add_chunk(init, (idx, w))[0]
      xs = (chunks.to_chunks(idx, chunk, values.shape[0]), chunks.to_chunks(w, chunk, 0))
      return jax.lax.scan(add_chunk, init, xs)[0]
    return run

  return chunks.per_platform(make, *_lookup_chunks(values_NxV, idx_MxP), values_NxV, idx_MxP,
                             w_MxP)


def _chunked_lookup_grads(values_NxV: jax.Array, idx_MxP: jax.Array, w_MxP: jax.Array,
                          g_MxV: jax.Array, *, want_values: bool
                          ) -> tuple[jax.Array | None, jax.Array]:
  """Per chunk: d w = g . values[idx] (a gather), d values[idx] += w * g (an in-place
  scatter-add into one carried [N, V] buffer). Measured on CPU at BERT-base (1,024 tokens):
  0.66 s against 1.8 s for autodiff of the same loop, and 2.1 s for a sorted segment sum of
  the row gradients (argsort of the picks first), which is why neither is used."""
  v = values_NxV.shape[1]

  def make(chunk):
    def run(values, idx_MxP, w_MxP, g_MxV):
      def chunk_grads(g_values, xs):
        idx, w = xs
        rows = jnp.take(values, idx, axis=0, mode="fill", fill_value=0)
        rows = rows.astype(wide_dtype(rows.dtype, g_MxV.dtype))
        g_w = jnp.einsum("mv,mcv->mc", g_MxV, rows, preferred_element_type=jnp.float32)
        if g_values is not None:
          row_grads = (w[..., None].astype(jnp.float32) * g_MxV[:, None, :]).reshape(-1, v)
          g_values = g_values.at[idx.reshape(-1)].add(row_grads, mode="drop")
        return g_values, g_w.astype(w.dtype)

      # Row gradients are summed in float32 and cast once: scatter-adds into a bf16 buffer were
      # ~10x slower on CPU (and round at every duplicate pick).
      init = jnp.zeros(values.shape, jnp.float32) if want_values else None
      if chunk >= idx_MxP.shape[1]:  # one chunk: no loop
        g_values, g_w = chunk_grads(init, (idx_MxP, w_MxP))
      else:
        xs = (chunks.to_chunks(idx_MxP, chunk, values.shape[0]),
              chunks.to_chunks(w_MxP, chunk, 0))
        g_values, g_w = jax.lax.scan(chunk_grads, init, xs)
        g_w = chunks.from_chunks(g_w, idx_MxP.shape[1])
      if g_values is not None:
        g_values = g_values.astype(values.dtype)
      return g_values, g_w
    return run

  return chunks.per_platform(make, *_lookup_chunks(values_NxV, idx_MxP), values_NxV, idx_MxP,
                             w_MxP, g_MxV)


_chunked_lookup = lookup_vjp(_chunked_lookup_primal, _chunked_lookup_grads)
