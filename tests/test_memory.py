"""pkm_jax.memory vs brute force: every product key built explicitly, lookups as numpy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pkm_jax import chunks
from pkm_jax.architecture import MemoryConfig
from pkm_jax.memory import ProductKeyMemory
from pkm_jax.product_keys import candidate_pairs, product_key_topk, weighted_lookup


# ---------------------------------------------------------------------------------------------
# Independent numpy references.

def brute_force_topk(query, sub_keys, k):
  """Scores every one of the n**2 product keys; query [..., H, Kd] -> scores, slots [..., H, k]."""
  query = np.asarray(query, np.float64)
  sub_keys = np.asarray(sub_keys, np.float64)
  heads, _, n, _ = sub_keys.shape
  q_MxHxK = query.reshape(-1, heads, query.shape[-1])
  scores = np.empty(q_MxHxK.shape[:2] + (k,))
  slots = np.empty(q_MxHxK.shape[:2] + (k,), np.int64)
  for h in range(heads):
    # Row i * n + j of the full key matrix is concat(sub1[i], sub2[j]).
    full_keys = np.stack([np.concatenate([sub_keys[h, 0, i], sub_keys[h, 1, j]])
                          for i in range(n) for j in range(n)])
    all_scores = q_MxHxK[:, h] @ full_keys.T  # [M, n*n]
    order = np.argsort(-all_scores, axis=-1, kind="stable")[:, :k]
    slots[:, h] = order
    scores[:, h] = np.take_along_axis(all_scores, order, axis=-1)
  lead = query.shape[:-1] + (k,)
  return scores.reshape(lead), slots.reshape(lead)


def loop_lookup(values, indices, weights):
  """sum_{h,k} w[h,k] * values[idx[h,k]] with explicit loops; indices [..., H, K] -> [..., V]."""
  values = np.asarray(values, np.float64)
  idx = np.asarray(indices).reshape(-1, *indices.shape[-2:])
  w = np.asarray(weights, np.float64).reshape(idx.shape)
  out = np.zeros((idx.shape[0], values.shape[1]))
  for m in range(idx.shape[0]):
    for h in range(idx.shape[1]):
      for j in range(idx.shape[2]):
        out[m] += w[m, h, j] * values[idx[m, h, j]]
  return out.reshape(*indices.shape[:-2], values.shape[1])


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def dense_memory_reference(mem, x, norm_stats=None):
  """ProductKeyMemory recomputed in numpy from its params (dropout off).

  norm_stats: (mean, var) for batchnorm; None uses the running statistics (eval mode).
  """
  cfg = mem.cfg
  x = np.asarray(x, np.float64)
  q = x @ np.asarray(mem.query_proj.kernel[...]) + np.asarray(mem.query_proj.bias[...])
  norm = mem.query_norm
  if isinstance(norm, nnx.BatchNorm):
    mean, var = norm_stats if norm_stats is not None else (norm.mean[...], norm.var[...])
    q = (q - mean) / np.sqrt(np.asarray(var) + norm.epsilon)
    q = q * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])
  elif isinstance(norm, nnx.LayerNorm):
    q = (q - q.mean(-1, keepdims=True)) / np.sqrt(q.var(-1, keepdims=True) + norm.epsilon)
    q = q * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])
  q = q.reshape(*x.shape[:-1], cfg.heads, cfg.k_dim)
  scores, slots = brute_force_topk(q, mem.keys[...], cfg.k)
  weights = softmax(scores)
  return loop_lookup(mem.values[...], slots, weights), slots, weights


def make_memory(query_norm="batchnorm", seed=0, **kw):
  cfg = MemoryConfig(**{**dict(n_keys=8, heads=2, k=4, k_dim=8, v_dim=6, query_norm=query_norm),
                        **kw})
  return ProductKeyMemory(10, cfg, rngs=nnx.Rngs(seed))


def randomize_norm(mem, seed=1):
  """Non-trivial norm params/stats, so the reference really checks how they are applied."""
  r = np.random.default_rng(seed)
  norm = mem.query_norm
  norm.scale[...] = jnp.asarray(r.uniform(0.5, 1.5, norm.scale[...].shape), jnp.float32)
  norm.bias[...] = jnp.asarray(r.normal(0, 0.3, norm.bias[...].shape), jnp.float32)
  if isinstance(norm, nnx.BatchNorm):
    norm.mean[...] = jnp.asarray(r.normal(0, 0.5, norm.mean[...].shape), jnp.float32)
    norm.var[...] = jnp.asarray(r.uniform(0.5, 2.0, norm.var[...].shape), jnp.float32)


# ---------------------------------------------------------------------------------------------
# product_key_topk

@pytest.mark.parametrize("lead, heads, n, k_dim, k", [
    ((7,), 1, 8, 8, 3),
    ((2, 3), 4, 16, 12, 16),  # k == n_keys: the candidate grid is every product key
    ((2, 2, 3), 2, 10, 6, 7),
    ((5,), 3, 6, 4, 1),
])
def test_topk_equals_brute_force(lead, heads, n, k_dim, k):
  r = np.random.default_rng(sum(lead) + heads + n + k)
  query = r.normal(size=lead + (heads, k_dim)).astype(np.float32)
  sub_keys = r.normal(size=(heads, 2, n, k_dim // 2)).astype(np.float32)
  scores, slots = product_key_topk(jnp.asarray(query), jnp.asarray(sub_keys), k)
  ref_scores, ref_slots = brute_force_topk(query, sub_keys, k)
  assert scores.shape == slots.shape == lead + (heads, k)
  np.testing.assert_array_equal(np.asarray(slots), ref_slots)
  np.testing.assert_allclose(np.asarray(scores), ref_scores, rtol=1e-5, atol=1e-5)
  assert np.all(np.diff(np.asarray(scores), axis=-1) <= 0), "scores not sorted descending"


def _full_grid_topk(query, sub_keys, k):
  """The search as it was before the candidate pruning: one lax.top_k over all k x k pairs of
  the per-half top-k lists (ties: the first pair row-major)."""
  n, half = sub_keys.shape[2], sub_keys.shape[3]
  v1, i1 = jax.lax.top_k(jnp.einsum("...hd,hnd->...hn", query[..., :half], sub_keys[:, 0]), k)
  v2, i2 = jax.lax.top_k(jnp.einsum("...hd,hnd->...hn", query[..., half:], sub_keys[:, 1]), k)
  grid = lambda a, b: a.reshape(*a.shape, 1) + b.reshape(*b.shape[:-1], 1, k)
  scores, pos = jax.lax.top_k(grid(v1, v2).reshape(*v1.shape[:-1], k * k), k)
  slots = jnp.take_along_axis(grid(i1 * n, i2).reshape(*i1.shape[:-1], k * k), pos, axis=-1)
  return scores, slots


def test_candidate_pairs_are_the_pruned_grid():
  for k, count in ((1, 1), (4, 8), (32, 119), (64, 280)):
    i_P, j_P = candidate_pairs(k)
    want = [(i, j) for i in range(k) for j in range(k) if (i + 1) * (j + 1) <= k]
    assert list(zip(i_P.tolist(), j_P.tolist())) == want and len(want) == count


@pytest.mark.parametrize("levels, n, k", [(3, 8, 8), (2, 32, 32), (5, 12, 12), (1, 6, 5)])
def test_pruned_search_on_ties_equals_full_grid_and_brute_force(levels, n, k):
  """Tie-heavy inputs (sub-keys and queries on a few integer levels; levels=1: every score
  equal): the same picks, in the same order, as the unpruned k x k grid, and the brute-force
  top-k scores over all n**2 product keys, each pick scoring what the brute force gives it."""
  r = np.random.default_rng(levels * 100 + n + k)
  heads, half = 2, 3
  query = r.integers(0, levels, size=(4, 5, heads, 2 * half)).astype(np.float32)
  sub_keys = r.integers(0, levels, size=(heads, 2, n, half)).astype(np.float32)
  scores, slots = product_key_topk(jnp.asarray(query), jnp.asarray(sub_keys), k)
  grid_scores, grid_slots = _full_grid_topk(jnp.asarray(query), jnp.asarray(sub_keys), k)
  np.testing.assert_array_equal(np.asarray(slots), np.asarray(grid_slots))
  np.testing.assert_array_equal(np.asarray(scores), np.asarray(grid_scores))
  ref_scores, _ = brute_force_topk(query, sub_keys, k)
  np.testing.assert_array_equal(np.asarray(scores), ref_scores)  # small integers: exact
  # Every pick is a distinct slot whose own product-key score is the one returned.
  slots = np.asarray(slots)
  assert all(len(set(row)) == k for row in slots.reshape(-1, k))
  i_sub, j_sub = slots // n, slots % n
  h_idx = np.arange(heads)[:, None]
  own = (np.einsum("bthd,bthkd->bthk", query[..., :half], sub_keys[h_idx, 0, i_sub])
         + np.einsum("bthd,bthkd->bthk", query[..., half:], sub_keys[h_idx, 1, j_sub]))
  np.testing.assert_array_equal(own, ref_scores)


def _full_key_topk(query, sub_keys, k):
  """Differentiable reference: all n**2 product keys built explicitly, one lax.top_k over them
  (autodiff through top_k's own rule, not through the product structure)."""
  heads, _, n, half = sub_keys.shape
  full_HxNNxK = jnp.concatenate([jnp.repeat(sub_keys[:, 0], n, axis=1),
                                 jnp.tile(sub_keys[:, 1], (1, n, 1))], axis=-1)
  return jax.lax.top_k(jnp.einsum("...hd,hnd->...hn", query, full_HxNNxK), k)


@pytest.mark.parametrize("lead, heads, n, k_dim, k, chunk_bytes", [
    ((2, 5), 2, 12, 8, 4, None),
    ((3,), 3, 9, 6, 9, None),  # k == n_keys
    ((2, 3), 2, 16, 8, 6, 200),  # 6 tokens x 2 heads x 4 dims x 4 B = 192 B a pick: chunks of 1
    ((2, 3), 2, 16, 8, 6, 800),  # chunks of 4 of the 6 picks: the last one padded
    ((4,), 1, 10, 4, 4, 64),  # 4 x 1 x 2 x 4 = 32 B a pick: chunks of 2
])
def test_topk_gradient_equals_full_key_autodiff(lead, heads, n, k_dim, k, chunk_bytes,
                                                monkeypatch):
  if chunk_bytes is not None:
    monkeypatch.setattr(chunks, "GATHER_CHUNK_BYTES", chunk_bytes)
  r = np.random.default_rng(n + k)
  query = jnp.asarray(r.normal(size=lead + (heads, k_dim)), jnp.float32)
  sub_keys = jnp.asarray(r.normal(size=(heads, 2, n, k_dim // 2)), jnp.float32)
  cot = jnp.asarray(r.normal(size=lead + (heads, k)), jnp.float32)

  def loss(search):
    return lambda q, keys: jnp.sum(jnp.sin(search(q, keys, k)[0]) * cot)

  grads = jax.grad(loss(product_key_topk), argnums=(0, 1))(query, sub_keys)
  ref = jax.grad(loss(_full_key_topk), argnums=(0, 1))(query, sub_keys)
  for g, g_ref in zip(grads, ref):
    assert np.any(np.asarray(g_ref))
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-5)


def _backward_shapes(f, *args):
  """Shapes of every array the backward pass of f computes (nested jaxprs included)."""
  _, f_vjp = jax.vjp(f, *args)
  shapes = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      shapes.extend(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if hasattr(sub, "eqns"):
            walk(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)

  walk(jax.make_jaxpr(f_vjp)(jnp.ones(jax.eval_shape(f, *args).shape)).jaxpr)
  return shapes


def test_topk_backward_never_builds_dense_scores():
  """The backward gathers / scatters at the k picks: no [tokens, n_keys]-sized score gradient."""
  m, heads, n, k = 5, 3, 64, 4  # tokens and n_keys differ from every other dimension
  r = np.random.default_rng(0)
  query = jnp.asarray(r.normal(size=(m, heads, 8)), jnp.float32)
  sub_keys = jnp.asarray(r.normal(size=(heads, 2, n, 4)), jnp.float32)
  dense = lambda shapes: [s for s in shapes if m in s and n in s]
  # Positive control: autodiff of lax.top_k over the sub-key scores does build them.
  autodiff = lambda q, keys: jax.lax.top_k(
      jnp.einsum("mhd,hnd->mhn", q[..., :4], keys[:, 0]), k)[0]
  assert dense(_backward_shapes(autodiff, query, sub_keys))
  shapes = _backward_shapes(lambda q, keys: product_key_topk(q, keys, k)[0], query, sub_keys)
  assert shapes and not dense(shapes)


def test_topk_rejects_k_above_n_keys():
  with pytest.raises(ValueError, match="k=9 exceeds n_keys=8"):
    product_key_topk(jnp.zeros((2, 1, 4)), jnp.zeros((1, 2, 8, 2)), 9)
  mem = make_memory(k=9)  # k is only checked when the search runs
  with pytest.raises(ValueError, match="n_keys"):
    mem(jnp.zeros((1, 2, 10)), jnp.ones((1, 2)))


# ---------------------------------------------------------------------------------------------
# weighted_lookup

def _lookup_inputs(seed=0, lead=(2, 3), heads=3, k=5, n=11, v=4):
  r = np.random.default_rng(seed)
  values = r.normal(size=(n, v)).astype(np.float32)
  # Few slots, many picks: duplicate rows within a token exercise the scatter-add gradient.
  indices = r.integers(0, n, size=lead + (heads, k)).astype(np.int32)
  weights = r.uniform(size=lead + (heads, k)).astype(np.float32)
  return values, indices, weights


def _traced_lookup_has_scan(*args):
  # A fresh lambda each time: jax caches traces per function, and the chunk size is read at
  # trace time.
  return "scan" in str(jax.make_jaxpr(lambda *a: weighted_lookup(*a))(*args))


def _einsum_lookup(values, indices, weights):
  return jnp.einsum("...hk,...hkv->...v", weights, values[indices])


@pytest.mark.parametrize("chunked", [False, True])
def test_weighted_lookup_equals_loop(chunked, monkeypatch):
  values, indices, weights = _lookup_inputs()
  if chunked:
    # 6 tokens x 4 dims x 4 bytes = 96 B per pick column: a 200 B budget forces chunks of picks.
    monkeypatch.setattr(chunks, "GATHER_CHUNK_BYTES", 200)
  assert _traced_lookup_has_scan(values, indices, weights) == chunked
  out = weighted_lookup(jnp.asarray(values), jnp.asarray(indices), jnp.asarray(weights))
  np.testing.assert_allclose(np.asarray(out), loop_lookup(values, indices, weights),
                             rtol=1e-5, atol=1e-5)


def test_chunked_lookup_gradient_equals_einsum(monkeypatch):
  values, indices, weights = _lookup_inputs(seed=3, heads=2, k=6, n=7)
  cot = np.random.default_rng(4).normal(size=indices.shape[:-2] + (values.shape[1],))

  def loss(lookup):
    return lambda v, w: jnp.sum(jnp.sin(lookup(v, indices, w)) * cot)

  ref_grads = jax.grad(loss(_einsum_lookup), argnums=(0, 1))(values, weights)
  # 6 tokens x 4 dims x 4 B = 96 B a pick: chunks of 5 of the 12 picks, the last one padded.
  monkeypatch.setattr(chunks, "GATHER_CHUNK_BYTES", 500)
  assert _traced_lookup_has_scan(values, indices, weights)
  grads = jax.grad(loss(lambda *a: weighted_lookup(*a)), argnums=(0, 1))(values, weights)
  for g, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_bytes", [96, 200, 1 << 30])  # 1 pick a step; 2, padded; no loop
def test_lookup_gradient_equals_take_einsum(chunk_bytes, monkeypatch):
  """The lookup's own backward (gathers for d weights, scatter-adds into one [N, V] buffer for
  d values) against jax.grad of take + einsum, duplicate rows included; with the table's
  gradient stopped (sparse updates) no scatter is traced at all."""
  monkeypatch.setattr(chunks, "CACHE_CHUNK_BYTES", chunk_bytes)
  values, indices, weights = _lookup_inputs(seed=5, heads=3, k=5, n=7)  # 6 tokens x 4 dims
  cot = np.random.default_rng(6).normal(size=indices.shape[:-2] + (values.shape[1],))

  def loss(lookup):
    return lambda v, w: jnp.sum(jnp.sin(lookup(v, indices, w)) * cot)

  lookup = lambda *a: weighted_lookup(*a)
  assert _traced_lookup_has_scan(values, indices, weights) == (chunk_bytes < 1 << 30)
  ref_grads = jax.grad(loss(_einsum_lookup), argnums=(0, 1))(values, weights)
  grads = jax.jit(jax.grad(loss(lookup), argnums=(0, 1)))(values, weights)
  for g, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-5, atol=1e-6)
  frozen = lambda w: loss(lookup)(jax.lax.stop_gradient(jnp.asarray(values)), w)
  np.testing.assert_allclose(np.asarray(jax.grad(frozen)(weights)), np.asarray(ref_grads[1]),
                             rtol=1e-5, atol=1e-6)
  if chunk_bytes < 1 << 30:
    assert "scatter" not in str(jax.make_jaxpr(jax.grad(frozen))(weights))


def test_bf16_table_lookup_gradient_sums_in_float32(monkeypatch):
  """A bf16 table through the lookup loop: the output is float32, d values comes back bf16 but
  is summed in float32 (duplicate picks included) and rounded once."""
  monkeypatch.setattr(chunks, "CACHE_CHUNK_BYTES", 1)  # one pick a step
  values, indices, weights = _lookup_inputs(seed=7, heads=3, k=5, n=7)
  values16 = jnp.asarray(values, jnp.bfloat16)
  cot = np.random.default_rng(8).normal(size=indices.shape[:-2] + (values.shape[1],))
  loss = lambda lookup: lambda v, w: jnp.sum(lookup(v, indices, w) * cot)
  out = weighted_lookup(values16, indices, weights)
  assert out.dtype == jnp.float32
  g_values, g_weights = jax.grad(loss(lambda *a: weighted_lookup(*a)), argnums=(0, 1))(
      values16, weights)
  ref_values, ref_weights = jax.grad(loss(_einsum_lookup), argnums=(0, 1))(
      values16.astype(jnp.float32), weights)
  assert g_values.dtype == jnp.bfloat16
  # One rounding of the float32 sum: within half a bf16 ulp of the float32 reference.
  np.testing.assert_allclose(np.asarray(g_values, np.float32), np.asarray(ref_values),
                             rtol=2.0**-8, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g_weights), np.asarray(ref_weights), rtol=1e-5,
                             atol=1e-5)


# ---------------------------------------------------------------------------------------------
# ProductKeyMemory

def test_bf16_value_table_equals_dense_reference():
  """memory.value_dtype=bfloat16: the table is stored in bf16, the weighted sum of its rows is
  accumulated in float32 (the reference reads the same bf16 rows in float64)."""
  mem = make_memory("none", value_dtype="bfloat16", n_keys=16, k=8, v_dim=32)
  assert mem.values[...].dtype == jnp.bfloat16
  x = np.random.default_rng(2).normal(size=(3, 4, 10)).astype(np.float32)
  out, aux = mem(jnp.asarray(x), jnp.ones((3, 4)))
  ref_out, ref_slots, _ = dense_memory_reference(mem, x)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(aux.indices), ref_slots)
  np.testing.assert_allclose(np.asarray(out), ref_out, rtol=1e-5, atol=1e-6)
  grad = jax.grad(lambda v: jnp.sum(mem.placement.lookup(v, aux.indices, aux.weights)))(
      mem.values[...])
  assert grad.dtype == jnp.bfloat16


@pytest.mark.parametrize("query_norm", ["batchnorm", "layernorm", "none"])
def test_memory_equals_dense_reference(query_norm):
  mem = make_memory(query_norm)
  if query_norm != "none":
    randomize_norm(mem)
  x = np.random.default_rng(0).normal(size=(2, 5, 10)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)
  out, aux = mem(jnp.asarray(x), jnp.asarray(mask))
  ref_out, ref_slots, ref_weights = dense_memory_reference(mem, x)
  assert out.shape == (2, 5, 6) and aux.indices.shape == (2, 5, 2, 4)
  np.testing.assert_array_equal(np.asarray(aux.indices), ref_slots)
  np.testing.assert_allclose(np.asarray(aux.weights), ref_weights, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out), ref_out, rtol=1e-4, atol=1e-5)


def test_batchnorm_statistics_ignore_padding():
  r = np.random.default_rng(0)
  x = r.normal(size=(3, 6, 10)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], np.int32)
  x_junk = np.where(mask[..., None] > 0, x, r.normal(0, 1e5, x.shape)).astype(np.float32)
  real = mask > 0

  runs = []
  for inputs in (x, x_junk):
    mem = make_memory(seed=5)  # identical params for both runs
    randomize_norm(mem)
    mean0, var0 = np.asarray(mem.query_norm.mean[...]), np.asarray(mem.query_norm.var[...])
    out, aux = mem(jnp.asarray(inputs), jnp.asarray(mask), rngs=nnx.Rngs(dropout=0))
    runs.append((mem, np.asarray(out), aux))
  (mem, out, aux), (mem_junk, out_junk, aux_junk) = runs

  np.testing.assert_allclose(out_junk[real], out[real], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(aux_junk.indices)[real], np.asarray(aux.indices)[real])
  for name in ("mean", "var"):
    np.testing.assert_allclose(np.asarray(getattr(mem_junk.query_norm, name)[...]),
                               np.asarray(getattr(mem.query_norm, name)[...]), rtol=1e-5)

  # Statistics over real tokens only, in numpy (biased variance, momentum 0.9).
  q_real = (x[real].astype(np.float64) @ np.asarray(mem.query_proj.kernel[...])
            + np.asarray(mem.query_proj.bias[...]))
  mean, var = q_real.mean(0), q_real.var(0)
  np.testing.assert_allclose(np.asarray(mem.query_norm.mean[...]), 0.9 * mean0 + 0.1 * mean,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(mem.query_norm.var[...]), 0.9 * var0 + 0.1 * var,
                             rtol=1e-4, atol=1e-5)
  # The training-mode output normalises with those batch statistics.
  ref_out, _, _ = dense_memory_reference(mem, x, norm_stats=(mean, var))
  np.testing.assert_allclose(out[real], ref_out[real], rtol=1e-4, atol=1e-5)


def _loss(out):
  cot = np.random.default_rng(7).normal(size=out.shape).astype(np.float32)
  return jnp.sum(jnp.tanh(out) * cot)


def test_value_probe_gradient():
  mem = make_memory("layernorm")
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 10)), jnp.float32)
  mask = jnp.ones((2, 3), jnp.int32)
  probe = jnp.zeros((2, 3, 6))

  def loss_fn(mem, probe):
    out, aux = mem(x, mask, value_probe=probe)
    return _loss(out), aux

  (grads, g_probe), aux = nnx.grad(loss_fn, argnums=(0, 1), has_aux=True)(mem, probe)
  out, _ = mem(x, mask)
  # d loss / d (weighted sum) for loss = sum(tanh(out) * cot), computed by hand.
  cot = np.random.default_rng(7).normal(size=out.shape)
  expected = (1 - np.tanh(np.asarray(out, np.float64)) ** 2) * cot
  np.testing.assert_allclose(np.asarray(g_probe), expected, rtol=1e-5, atol=1e-6)
  assert not np.any(np.asarray(grads["values"][...])), "the probe must cut the table's gradient"
  # The probe gradient is what sparse updates scatter: it must rebuild the dense table gradient.
  dense_grads = nnx.grad(lambda m: _loss(m(x, mask)[0]))(mem)
  idx = np.asarray(aux.indices).reshape(-1)
  w_g = (np.asarray(aux.weights)[..., None] * np.asarray(g_probe)[:, :, None, None, :])
  rebuilt = np.zeros(mem.values[...].shape)
  np.add.at(rebuilt, idx, w_g.reshape(-1, 6))
  np.testing.assert_allclose(np.asarray(dense_grads["values"][...]), rebuilt,
                             rtol=1e-5, atol=1e-6)
  # Keys and the query net are still trained through the scores.
  assert np.any(np.asarray(grads["keys"][...]))
  assert np.any(np.asarray(grads["query_proj"]["kernel"][...]))


def test_gradients_reach_keys_and_query_net():
  mem = make_memory("batchnorm")
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 10)), jnp.float32)
  mask = jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0]], jnp.int32)

  def loss_fn(mem):
    out, aux = mem(x, mask, rngs=nnx.Rngs(dropout=0))
    return _loss(out), aux

  grads, aux = nnx.grad(loss_fn, has_aux=True)(mem)
  for g in (grads["keys"][...], grads["query_proj"]["kernel"][...],
            grads["query_proj"]["bias"][...], grads["values"][...]):
    g = np.asarray(g)
    assert np.all(np.isfinite(g)) and np.any(g)
  # Only sub-keys that took part in a selected product key can receive gradient.
  n = mem.cfg.n_keys
  slots = np.asarray(aux.indices)  # [B, T, H, K]
  g_keys = np.abs(np.asarray(grads["keys"][...])).sum(-1)  # [H, 2, n]
  for h in range(mem.cfg.heads):
    for half, sub in ((0, slots[..., h, :] // n), (1, slots[..., h, :] % n)):
      used = np.zeros(n, bool)
      used[np.unique(sub)] = True
      np.testing.assert_array_equal(g_keys[h, half] > 0, used)


def test_value_zero_init_outputs_zero():
  mem = make_memory(value_zero_init=True)
  out, aux = mem(jnp.ones((2, 3, 10)), jnp.ones((2, 3)))
  assert not np.any(np.asarray(out))
  np.testing.assert_allclose(np.asarray(aux.weights).sum(-1), 1.0, rtol=1e-6)


def test_bfloat16_memory_searches_in_float32():
  # Under bf16 compute the whole query path (projection, norm, scores) stays float32, so the
  # picks are those of the float32 layer on the same (bf16-rounded) input.
  cfg = dict(n_keys=64, heads=2, k=8, k_dim=32, v_dim=16, query_norm="layernorm")
  mem32 = ProductKeyMemory(48, MemoryConfig(**cfg), rngs=nnx.Rngs(0))
  mem16 = ProductKeyMemory(48, MemoryConfig(**cfg), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x16 = jnp.asarray(np.random.default_rng(0).normal(size=(16, 32, 48)), jnp.bfloat16)
  mask = jnp.ones((16, 32), jnp.int32)
  out16, aux16 = mem16(x16, mask)
  _, aux32 = mem32(x16.astype(jnp.float32), mask)
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(aux16.indices), np.asarray(aux32.indices))
  np.testing.assert_allclose(np.asarray(aux16.weights), np.asarray(aux32.weights), rtol=1e-6)
  # Control: a bf16 projection (what the check guards against) changes some of the picks.
  proj = mem32.query_proj
  q16 = (x16 @ proj.kernel[...].astype(jnp.bfloat16) + proj.bias[...].astype(jnp.bfloat16))
  q = mem32.query_norm(q16.astype(jnp.float32)).reshape(16, 32, 2, 32)
  _, bf16_picks = product_key_topk(q, mem32.keys[...], 8)
  assert np.any(np.asarray(bf16_picks) != np.asarray(aux32.indices))
