"""The memory layer's hand-partitioned ops: search, table lookup and sparse value updates.

Each is one `jax.shard_map` over the ('data', 'model') mesh of `sharding.py`, so what crosses
devices is written here rather than left to XLA's partitioner.

Search: each device runs the product-key search for its own tokens; the sub-keys are replicated
and only their gradient is all-reduced. (Left to the partitioner, top_k all-gathers its
[tokens, heads, n_keys] scores and every device searches the whole global batch.)

Sharded lookup: the table [N, V] is split into contiguous row blocks over `slot_axes`; the tokens
over 'data'. Each device gathers only the picked rows inside its block (the others read as zeros),
weights and sums them, and the blocks' partial [tokens, V] sums are reduced across `slot_axes`:
the wire carries token-sized partials and picks, never table rows. With the FSDP-style rule
('slots', ('model', 'data')) the table is split over every device; the picks are then all-gathered
over 'data' and the partials reduce-scattered back, so a dense table gradient is never all-reduced.

Sparse value updates: each device builds the gradients of the picked rows of its own block from
all-gathered picks and output gradients (`sharded_row_gradients`; one scalar psum for the global
gradient norm), then steps those rows in place (`sharded_row_update`; no collective).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pkm_jax import chunks
from pkm_jax import lookup_kernels
from pkm_jax import sparse_adam
from pkm_jax.product_keys import product_key_topk
from pkm_jax.sharding import DATA, MODEL, is_row_leaf


# ---------------------------------------------------------------------------------------------
# Search and lookup
# ---------------------------------------------------------------------------------------------


def sharded_product_key_topk(query: jax.Array, sub_keys: jax.Array, k: int, *,
                             token_axes: Sequence[str] = (DATA,)) -> tuple[jax.Array, jax.Array]:
  """`memory.product_key_topk` with the tokens split over `token_axes` of the current mesh.

  query [B, ..., H, Kd] (B split over token_axes), sub_keys [H, 2, n, Kd/2] (replicated) ->
  scores, indices [B, ..., H, k], split like the query. Each device searches its own tokens; the
  only collective is the all-reduce of the sub-keys' gradient. (Left to XLA's partitioner, top_k
  all-gathers its [B, ..., H, n] scores and every device searches the whole global batch.)
  """
  token_axes = tuple(token_axes)
  mesh = _context_mesh((), token_axes, "sharded_product_key_topk")
  token_axes = _real_axes(token_axes, mesh)
  if not token_axes:
    return product_key_topk(query, sub_keys, k)
  ways = math.prod(mesh.shape[a] for a in token_axes)
  if query.shape[0] % ways:
    raise ValueError(f"sharded_product_key_topk: batch {query.shape[0]} does not split over mesh "
                     f"axes {token_axes} of size {ways}")

  def local_search(q, keys):
    # The keys enter each device's search as its own copy; the transpose of this cast is the
    # psum of their gradient over the token axes.
    return product_key_topk(q, jax.lax.pcast(keys, token_axes, to="varying"), k)

  spec = P(_axes_entry(token_axes))
  return jax.shard_map(local_search, in_specs=(spec, P()), out_specs=(spec, spec))(query, sub_keys)


def _context_mesh(slot_axes: tuple[str, ...], token_axes: tuple[str, ...], caller: str):
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    raise ValueError(f"{caller} needs a device mesh: call it under `with jax.set_mesh(mesh):`")
  missing = [a for a in slot_axes + token_axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"{caller}: mesh axes {missing} are not in the mesh {mesh.axis_names}")
  return mesh


def _check_row_split(n: int, slot_axes: tuple[str, ...], mesh, caller: str) -> None:
  blocks = math.prod(mesh.shape[a] for a in slot_axes)
  if n % blocks:
    raise ValueError(f"{caller}: {n} table rows do not split into {blocks} blocks over mesh "
                     f"axes {slot_axes}")


def _real_axes(axes: tuple[str, ...], mesh) -> tuple[str, ...]:
  return tuple(a for a in axes if mesh.shape[a] > 1)


def _axes_entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def _to_local_rows(ids: jax.Array, n_local: int, slot_axes: tuple[str, ...]) -> jax.Array:
  """Global row ids -> ids into this device's row block; rows elsewhere become n_local, which
  gathers with mode='fill' read as zeros and scatters with mode='drop' skip."""
  shard = 0
  for axis in slot_axes:  # row-major over the axes, as PartitionSpec((a, b)) lays out blocks
    shard = shard * jax.lax.axis_size(axis) + jax.lax.axis_index(axis)
  local = ids - shard * n_local
  return jnp.where((local >= 0) & (local < n_local), local, n_local)


def _local_lookup(values_nxV, lidx_MxP, w_MxP, chunk):
  """sum_p w * values[lidx] over picks, scanning `chunk` picks at a time; -> [M, V] float32."""
  idx_CxMxc = chunks.to_chunks(lidx_MxP, chunk, values_nxV.shape[0])
  w_CxMxc = chunks.to_chunks(w_MxP, chunk, 0)

  def add_chunk(acc_MxV, xs):
    idx, w = xs
    rows_Mxcxv = jnp.take(values_nxV, idx, axis=0, mode="fill", fill_value=0)
    # Weights stay float32 (product_keys.weighted_lookup): a bf16 table rounds only itself.
    return acc_MxV + jnp.einsum("mc,mcv->mv", w.astype(jnp.float32), rows_Mxcxv,
                                preferred_element_type=jnp.float32), None

  init = chunks.zeros_varying((lidx_MxP.shape[0], values_nxV.shape[1]), jnp.float32,
                              values_nxV, lidx_MxP, w_MxP)
  return jax.lax.scan(add_chunk, init, (idx_CxMxc, w_CxMxc))[0]


def _local_lookup_grads(values_nxV, lidx_MxP, w_MxP, g_MxV, chunk):
  """Gradients of `_local_lookup`: d values (scatter-add into the carried block, in place) and
  d weights (<row, g>), chunk by chunk, so [M, P, V] is never built."""
  idx_CxMxc = chunks.to_chunks(lidx_MxP, chunk, values_nxV.shape[0])
  w_CxMxc = chunks.to_chunks(w_MxP, chunk, 0)
  g_MxV = g_MxV.astype(jnp.float32)

  def chunk_grads(g_values_nxV, xs):
    idx, w = xs
    rows_Mxcxv = jnp.take(values_nxV, idx, axis=0, mode="fill", fill_value=0)
    g_w_Mxc = jnp.einsum("mcv,mv->mc", rows_Mxcxv, g_MxV, preferred_element_type=jnp.float32)
    upd_Mxcxv = w.astype(jnp.float32)[..., None] * g_MxV[:, None, :]
    return g_values_nxV.at[idx].add(upd_Mxcxv, mode="drop"), g_w_Mxc

  init = chunks.zeros_varying(values_nxV.shape, jnp.float32, values_nxV, lidx_MxP, w_MxP, g_MxV)
  g_values, g_w_CxMxc = jax.lax.scan(chunk_grads, init, (idx_CxMxc, w_CxMxc))
  g_w_MxP = chunks.from_chunks(g_w_CxMxc, lidx_MxP.shape[1])
  return g_values.astype(values_nxV.dtype), g_w_MxP.astype(w_MxP.dtype)


def _row_op(fwd_local: Callable, bwd_local: Callable, table_spec: P, token_spec: P, *,
            check_vma: bool = True) -> Callable:
  """(table, picks, token operand) -> token result, as a custom_vjp whose forward and backward
  are each one shard_map of the given local functions: bwd_local(table, picks, operand, g) ->
  (d table, d operand); the picks get no gradient."""
  fwd_sm = jax.shard_map(fwd_local, in_specs=(table_spec, token_spec, token_spec),
                         out_specs=token_spec, check_vma=check_vma)
  bwd_sm = jax.shard_map(bwd_local, in_specs=(table_spec, token_spec, token_spec, token_spec),
                         out_specs=(table_spec, token_spec), check_vma=check_vma)

  @jax.custom_vjp
  def op(table, idx, operand):
    return fwd_sm(table, idx, operand)

  def op_fwd(table, idx, operand):
    return fwd_sm(table, idx, operand), (table, idx, operand)

  def op_bwd(res, g):
    g_table, g_operand = bwd_sm(*res, g)
    return g_table, None, g_operand

  op.defvjp(op_fwd, op_bwd)
  return op


def _make_lookup(slot_axes: tuple[str, ...], token_axes: tuple[str, ...], chunk: int,
                 kernel: str = "xla"):
  """custom_vjp lookup on [B, S, P] picks; forward and backward are each one shard_map whose
  only collectives act on token-sized arrays (picks, [tokens, V] partials / gradients).
  kernel 'pallas': each block's forward sum is `lookup_kernels.gather_sum` (ids of rows held
  elsewhere are out of the block's range, which the kernel reads as nothing)."""
  gathered = tuple(a for a in token_axes if a in slot_axes)  # tokens must visit these shards
  reduced = tuple(a for a in slot_axes if a not in token_axes)  # partials summed over these
  table_copies = tuple(a for a in token_axes if a not in slot_axes)  # table replicated here
  table_spec = P(_axes_entry(slot_axes), None)
  token_spec = P(_axes_entry(token_axes))

  def gather_tokens(*xs):
    return [jax.lax.all_gather(x, gathered, axis=0, tiled=True) if gathered else x for x in xs]

  def combine(partial):
    if gathered:  # each device keeps the sum for its own tokens
      partial = jax.lax.psum_scatter(partial, gathered, scatter_dimension=0, tiled=True)
    return jax.lax.psum(partial, reduced) if reduced else partial

  def fwd_local(values_nxV, idx_BxSxP, w_BxSxP):
    idx, w = gather_tokens(idx_BxSxP, w_BxSxP)
    b, s, p = idx.shape
    lidx = _to_local_rows(idx.reshape(b * s, p), values_nxV.shape[0], slot_axes)
    if kernel == "pallas":
      out_MxV = lookup_kernels.gather_sum(values_nxV, lidx, w.reshape(b * s, p))
    else:
      out_MxV = _local_lookup(values_nxV, lidx, w.reshape(b * s, p), chunk)
    # Partials are summed across blocks in float32 and stay float32, whatever the table's
    # dtype, as the one-device lookup's output does.
    return combine(out_MxV.reshape(b, s, -1))

  def bwd_local(values_nxV, idx_BxSxP, w_BxSxP, g_BxSxV):
    idx, w, g = gather_tokens(idx_BxSxP, w_BxSxP, g_BxSxV)
    b, s, p = idx.shape
    lidx = _to_local_rows(idx.reshape(b * s, p), values_nxV.shape[0], slot_axes)
    g_values, g_w = _local_lookup_grads(values_nxV, lidx, w.reshape(b * s, p),
                                        g.reshape(b * s, -1), chunk)
    if table_copies:  # a data-parallel copy of the block: its gradient sums over the copies
      g_values = jax.lax.psum(g_values, table_copies)
    return g_values, combine(g_w.reshape(b, s, p))

  # Pallas' interpret mode (how the kernel runs on CPU) cannot type its loop carries inside a
  # shard_map that checks varying axes (jax 0.10): the kernel's shard_maps skip that check,
  # which types the program and changes none of its values.
  return _row_op(fwd_local, bwd_local, table_spec, token_spec, check_vma=kernel != "pallas")


def sharded_weighted_lookup(values_NxV: jax.Array, indices: jax.Array, weights: jax.Array, *,
                            slot_axes: Sequence[str] = (MODEL,),
                            token_axes: Sequence[str] = (DATA,),
                            pick_chunk: int | None = None, kernel: str = "xla") -> jax.Array:
  """`memory.weighted_lookup` with the table's rows split over `slot_axes` of the current mesh.

  values [N, V] (rows in contiguous blocks over slot_axes), indices/weights [B, ..., H, K]
  (B split over token_axes) -> [B, ..., V]. Differentiable in values and weights; the gradient
  of each table block is that device's own scatter-add. `pick_chunk` picks are gathered per loop
  step (default: `chunks.GATHER_CHUNK_BYTES` of rows), so [B, T, H, K, V] is never built.
  `kernel='pallas'` sums each block's picks in `lookup_kernels`' forward kernel instead.
  """
  slot_axes, token_axes = tuple(slot_axes), tuple(token_axes)
  mesh = _context_mesh(slot_axes, token_axes, "sharded_weighted_lookup")
  n, v = values_NxV.shape
  if indices.shape != weights.shape or indices.ndim < 3:
    raise ValueError(f"sharded_weighted_lookup: indices {indices.shape} and weights "
                     f"{weights.shape} must both be [B, ..., H, K]")
  _check_row_split(n, slot_axes, mesh, "sharded_weighted_lookup")
  b, lead = indices.shape[0], indices.shape[:-2]
  token_ways = math.prod(mesh.shape[a] for a in token_axes)
  if b % token_ways:
    raise ValueError(f"sharded_weighted_lookup: batch {b} does not split over mesh axes "
                     f"{token_axes} of size {token_ways}")
  picks = indices.shape[-2] * indices.shape[-1]
  idx_BxSxP = indices.reshape(b, -1, picks).astype(jnp.int32)
  w_BxSxP = weights.reshape(b, -1, picks)
  if pick_chunk is None:
    # Tokens a device sees: its batch shard, or the whole batch if picks are gathered.
    seen = b // token_ways * math.prod(mesh.shape[a] for a in token_axes if a in slot_axes)
    pick_chunk = chunks.pick_chunk(picks, seen * idx_BxSxP.shape[1] * v * 4)
  # Size-1 axes are dropped: a collective over one device is still an op in the program.
  lookup = _make_lookup(_real_axes(slot_axes, mesh), _real_axes(token_axes, mesh),
                        max(1, min(int(pick_chunk), picks)), kernel)
  return lookup(values_NxV, idx_BxSxP, w_BxSxP).reshape(*lead, v)


def _local_row_dots(table_nxD, lidx_MxP, x_MxD, chunk):
  """table[lidx] . x per pick (rows outside the block read zeros) -> [M, P] float32."""
  def dots(_, idx_Mxc):
    rows = jnp.take(table_nxD, idx_Mxc, axis=0, mode="fill", fill_value=0)
    ct = jnp.promote_types(rows.dtype, x_MxD.dtype)  # as memory_kinds.row_dots
    return None, jnp.einsum("mcd,md->mc", rows.astype(ct), x_MxD.astype(ct),
                            preferred_element_type=jnp.float32)

  _, s_CxMxc = jax.lax.scan(dots, None, chunks.to_chunks(lidx_MxP, chunk, table_nxD.shape[0]))
  return chunks.from_chunks(s_CxMxc, lidx_MxP.shape[1])


def sharded_row_dots(table_NxD: jax.Array, indices: jax.Array, x: jax.Array, *,
                     slot_axes: Sequence[str] = (MODEL,), token_axes: Sequence[str] = (DATA,)
                     ) -> jax.Array:
  """`memory_kinds.row_dots` (PEER's expert scores u_i . x) with the table's rows split over
  `slot_axes`: table [N, D], indices [B, ..., H, K], x [B, ..., D] (B split over token_axes) ->
  [B, ..., H, K] float32. As the lookup: each block dots its own picked rows and the partial
  [tokens, picks] scores are summed over the blocks; its backward is the lookup (d x) and each
  block's own scatter-add (d table)."""
  slot_axes, token_axes = tuple(slot_axes), tuple(token_axes)
  mesh = _context_mesh(slot_axes, token_axes, "sharded_row_dots")
  n, d = table_NxD.shape
  _check_row_split(n, slot_axes, mesh, "sharded_row_dots")
  slot_axes, token_axes = _real_axes(slot_axes, mesh), _real_axes(token_axes, mesh)
  b, lead, picks = indices.shape[0], indices.shape[:-2], indices.shape[-2] * indices.shape[-1]
  idx_BxSxP = indices.reshape(b, -1, picks).astype(jnp.int32)
  x_BxSxD = x.reshape(b, -1, d)
  gathered = tuple(a for a in token_axes if a in slot_axes)
  reduced = tuple(a for a in slot_axes if a not in token_axes)
  table_copies = tuple(a for a in token_axes if a not in slot_axes)
  seen = b // math.prod(mesh.shape[a] for a in token_axes) * math.prod(
      mesh.shape[a] for a in gathered)
  chunk = chunks.pick_chunk(picks, seen * idx_BxSxP.shape[1] * d * 4)
  table_spec, token_spec = P(_axes_entry(slot_axes), None), P(_axes_entry(token_axes))

  def gather_tokens(*xs):
    return [jax.lax.all_gather(v, gathered, axis=0, tiled=True) if gathered else v for v in xs]

  def combine(partial):
    if gathered:
      partial = jax.lax.psum_scatter(partial, gathered, scatter_dimension=0, tiled=True)
    return jax.lax.psum(partial, reduced) if reduced else partial

  def local(table, idx, x):
    idx, x = gather_tokens(idx, x)
    bb, s, p = idx.shape
    return bb, s, _to_local_rows(idx.reshape(bb * s, p), table.shape[0], slot_axes), x

  def fwd_local(table, idx, x):
    bb, s, lidx, x = local(table, idx, x)
    return combine(_local_row_dots(table, lidx, x.reshape(bb * s, d), chunk).reshape(bb, s, -1))

  def bwd_local(table, idx, x, g_s):
    bb, s, lidx, x = local(table, idx, x)
    (g_s,) = gather_tokens(g_s)
    g_table, _ = _local_lookup_grads(table, lidx, g_s.reshape(bb * s, -1).astype(jnp.float32),
                                     x.reshape(bb * s, d), chunk)
    if table_copies:
      g_table = jax.lax.psum(g_table, table_copies)
    g_x = _local_lookup(table, lidx, g_s.reshape(bb * s, -1), chunk)
    return g_table, combine(g_x.reshape(bb, s, d)).astype(x.dtype)

  dots = _row_op(fwd_local, bwd_local, table_spec, token_spec)
  return dots(table_NxD, idx_BxSxP, x_BxSxD).reshape(*lead, *indices.shape[-2:])


# ---------------------------------------------------------------------------------------------
# Sharded sparse optimizer step
# ---------------------------------------------------------------------------------------------


def sharded_row_gradients(indices: jax.Array, weights: jax.Array, grad_out: jax.Array, *,
                          num_rows: int, slot_axes: Sequence[str] = (MODEL,),
                          token_axes: Sequence[str] = (DATA,)
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """d loss / d table at the picked rows, built inside each device's row block.

  indices/weights [B, T, H, K] (ids >= num_rows: padding) and grad_out [B, T, V] (d loss / d
  memory output), split over `token_axes` -> row_ids [blocks * R] (ids local to their block,
  padding = block size), row_grads [blocks * R, V] (both split over `slot_axes`, R rows per
  block, as `sparse_adam.row_gradients` makes them) and the squared norm of all row gradients
  [] (replicated, for global-norm clipping). Each device all-gathers the picks and output
  gradients (token-sized) and coalesces only the picks that land in its own block: coalescing
  replicated would all-reduce [min(picks, N), V] row gradients -- the whole table once a
  batch's picks outnumber its rows.
  """
  slot_axes, token_axes = tuple(slot_axes), tuple(token_axes)
  mesh = _context_mesh(slot_axes, token_axes, "sharded_row_gradients")
  _check_row_split(num_rows, slot_axes, mesh, "sharded_row_gradients")
  slot_axes, token_axes = _real_axes(slot_axes, mesh), _real_axes(token_axes, mesh)
  n_local = num_rows // math.prod(mesh.shape[a] for a in slot_axes)
  row_spec, token_spec = P(_axes_entry(slot_axes)), P(_axes_entry(token_axes))

  def local_rows(idx, w, g):
    if token_axes:
      # Invariant over the token axes: every copy of a block builds the same rows.
      idx, w, g = (jax.lax.all_gather(x, token_axes, axis=0, tiled=True, to="invarying")
                   for x in (idx, w, g))
    row_ids, row_grads, sq_norm = sparse_adam.row_gradients_and_norm(
        _to_local_rows(idx, n_local, slot_axes), w, g, num_rows=n_local)
    return row_ids, row_grads, jax.lax.psum(sq_norm, slot_axes) if slot_axes else sq_norm

  return jax.shard_map(local_rows, in_specs=(token_spec,) * 3,
                       out_specs=(row_spec, row_spec, P()))(indices, weights, grad_out)


def sharded_row_update(tx: sparse_adam.SparseGradientTransformation, row_ids: jax.Array,
                       row_grads: jax.Array, opt_state: Any, table: jax.Array, *,
                       slot_axes: Sequence[str] = (MODEL,),
                       grad_scale: jax.Array | None = None) -> tuple[jax.Array, Any]:
  """One row-wise optimizer step (e.g. `sparse_adam`) on a table split over `slot_axes`.

  row_ids [blocks * R] (block-local, unique within a block; ids >= block size are padding) and
  row_grads [blocks * R, V], split over `slot_axes` as `sharded_row_gradients` returns them; the
  table [N, V] and the row-wise state split the same way; grad_scale [] (the clip's factor)
  replicated. Each device steps its own rows: no collective at all. -> (table, opt_state).
  """
  slot_axes = tuple(slot_axes)
  mesh = _context_mesh(slot_axes, (), "sharded_row_update")
  n = table.shape[0]
  _check_row_split(n, slot_axes, mesh, "sharded_row_update")
  slot_axes = _real_axes(slot_axes, mesh)
  row_spec = P(_axes_entry(slot_axes))
  state_specs = jax.tree.map(lambda x: row_spec if is_row_leaf(x, n) else P(), opt_state)

  scale = jnp.ones([], jnp.float32) if grad_scale is None else grad_scale
  step = jax.shard_map(tx.step, in_specs=(row_spec, row_spec, state_specs, row_spec, P()),
                       out_specs=(row_spec, state_specs))
  return step(row_ids, row_grads, opt_state, table, scale)
