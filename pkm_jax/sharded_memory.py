"""The memory layer's hand-partitioned ops: search, table lookup and sparse value updates.

Each is one `jax.shard_map` over the ('data', 'model') mesh of `sharding.py`, so what crosses
devices is written here rather than left to XLA's partitioner.

Search: each device runs the product-key search for its own tokens; the sub-keys are replicated
and only their gradient is all-reduced. (Left to the partitioner, top_k all-gathers its
[tokens, heads, n_keys] scores and every device searches the whole global batch.)

Sharded lookup: the table [N, V] is split into blocks, contiguous rows over `slot_axes` and/or
columns over `col_axes`; the tokens over `token_axes`. The picks of the tokens a block may serve
are all-gathered; each device gathers only the picked rows inside its block (the others read as
zeros), for its own columns, weights and sums them, and the partial sums go back to the tokens'
owners (`table_split.TableSplit`: reduce-scatter over row axes, all-to-all over column axes):
the wire carries token-sized partials and picks, never table rows.

Sparse value updates: each device builds the gradients of the picked rows of its own block (its
columns) from all-gathered picks and output gradients (`sharded_row_gradients`; one scalar psum
for the global gradient norm), then steps those rows in place (`sharded_row_update`; no
collective).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pkm_jax import chunks
from pkm_jax import lookup_kernels
from pkm_jax import product_keys
from pkm_jax import sparse_adam
from pkm_jax.product_keys import product_key_topk
from pkm_jax.table_split import TableSplit, axes_entry, real_axes, to_local_rows
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
  token_axes = real_axes(token_axes, mesh)
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

  spec = P(axes_entry(token_axes))
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


def _local_lookup(values_nxV, lidx_MxP, w_MxP, chunk):
  """sum_p w * values[lidx] over picks, scanning `chunk` picks at a time; -> [M, V] float32."""
  idx_CxMxc = chunks.to_chunks(lidx_MxP, chunk, values_nxV.shape[0])
  w_CxMxc = chunks.to_chunks(w_MxP, chunk, 0)

  def add_chunk(acc_MxV, xs):
    idx, w = xs
    rows_Mxcxv = jnp.take(values_nxV, idx, axis=0, mode="fill", fill_value=0)
    # Weights stay float32 (product_keys.weighted_lookup): a bf16 table rounds only itself.
    return acc_MxV + jnp.einsum("mc,mcv->mv", w.astype(jnp.float32),
                                rows_Mxcxv.astype(product_keys.wide_dtype(rows_Mxcxv.dtype)),
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
    g_w_Mxc = jnp.einsum("mcv,mv->mc", rows_Mxcxv.astype(product_keys.wide_dtype(
        rows_Mxcxv.dtype)), g_MxV, preferred_element_type=jnp.float32)
    upd_Mxcxv = w.astype(jnp.float32)[..., None] * g_MxV[:, None, :]
    return g_values_nxV.at[idx].add(upd_Mxcxv, mode="drop"), g_w_Mxc

  init = chunks.zeros_varying(values_nxV.shape, jnp.float32, values_nxV, lidx_MxP, w_MxP, g_MxV)
  g_values, g_w_CxMxc = jax.lax.scan(chunk_grads, init, (idx_CxMxc, w_CxMxc))
  g_w_MxP = chunks.from_chunks(g_w_CxMxc, lidx_MxP.shape[1])
  return g_values.astype(values_nxV.dtype), g_w_MxP.astype(w_MxP.dtype)


def _local_row_dots(table_nxD, lidx_MxP, x_MxD, chunk):
  """table[lidx] . x per pick (rows outside the block read zeros) -> [M, P] float32."""
  def dots(_, idx_Mxc):
    rows = jnp.take(table_nxD, idx_Mxc, axis=0, mode="fill", fill_value=0)
    ct = product_keys.wide_dtype(rows.dtype, x_MxD.dtype)  # as memory_kinds.row_dots
    return None, jnp.einsum("mcd,md->mc", rows.astype(ct), x_MxD.astype(ct),
                            preferred_element_type=jnp.float32)

  _, s_CxMxc = jax.lax.scan(dots, None, chunks.to_chunks(lidx_MxP, chunk, table_nxD.shape[0]))
  return chunks.from_chunks(s_CxMxc, lidx_MxP.shape[1])


def _chunked(fn: Callable, cpu_chunk: int, accelerator: int) -> Callable:
  """fn(*xs, chunk) with the chunk of the platform the program is lowered for."""
  return lambda *xs: chunks.per_platform(lambda c: lambda *ys: fn(*ys, c), cpu_chunk,
                                         accelerator, *xs)


def _row_op(fwd_local: Callable, bwd_local: Callable, split: TableSplit, *,
            check_vma: bool = True) -> Callable:
  """(table, picks, token operand) -> token result, as a custom_vjp whose forward and backward
  are each one shard_map of the given local functions: bwd_local(table, picks, operand, g) ->
  (d table, d operand); the picks get no gradient."""
  table_spec, token_spec = split.table_spec, split.token_spec
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


def _make_lookup(split: TableSplit, chunk: tuple[int, int], kernel: str = "xla"):
  """custom_vjp lookup on [B, S, P] picks; forward and backward are each one shard_map whose
  collectives (`TableSplit`) act on picks and token-sized arrays, never on table rows.
  kernel 'pallas': each block's forward sum is `lookup_kernels.gather_sum` and its gradients
  `lookup_kernels.gather_sum_grads` (ids of rows held elsewhere are out of the block's range,
  which the kernels read as nothing and give nothing)."""
  lookup_fn, grads_fn = _chunked(_local_lookup, *chunk), _chunked(_local_lookup_grads, *chunk)

  def fwd_local(values_nxV, idx_BxSxP, w_BxSxP):
    idx, w = split.gather_tokens(idx_BxSxP), split.gather_tokens(w_BxSxP)
    b, s, p = idx.shape
    lidx, w = split.local_rows(idx, values_nxV.shape[0]), w.reshape(b * s, p)
    if kernel == "pallas":
      out_Mxv = lookup_kernels.gather_sum(values_nxV, lidx, w)
    else:
      out_Mxv = lookup_fn(values_nxV, lidx, w)
    # Partials are summed across blocks in float32 and stay float32, whatever the table's
    # dtype, as the one-device lookup's output does.
    return split.combine_out(out_Mxv.reshape(b, s, -1))

  def bwd_local(values_nxV, idx_BxSxP, w_BxSxP, g_BxSxV):
    idx, w = split.gather_tokens(idx_BxSxP), split.gather_tokens(w_BxSxP)
    g = split.spread_out(g_BxSxV.astype(jnp.float32))
    b, s, p = idx.shape
    lidx, w, g = split.local_rows(idx, values_nxV.shape[0]), w.reshape(b * s, p), g.reshape(
        b * s, -1)
    if kernel == "pallas":  # the block's picks sorted by row, one segment sum per row
      g_values, g_w = lookup_kernels.gather_sum_grads(values_nxV, lidx, w, g)
    else:
      g_values, g_w = grads_fn(values_nxV, lidx, w, g)
    if split.copies:  # a data-parallel copy of the block: its gradient sums over the copies
      g_values = jax.lax.psum(g_values, split.copies)
    return g_values, split.combine_picks(g_w.reshape(b, s, p))

  # Pallas' interpret mode (how the kernel runs on CPU) cannot type its loop carries inside a
  # shard_map that checks varying axes (jax 0.10): the kernel's shard_maps skip that check,
  # which types the program and changes none of its values.
  return _row_op(fwd_local, bwd_local, split, check_vma=kernel != "pallas")


def _split_for(caller: str, n: int, v: int, batch: int, slot_axes, col_axes, token_axes
               ) -> tuple[TableSplit, jax.sharding.AbstractMesh]:
  slot_axes, col_axes, token_axes = tuple(slot_axes), tuple(col_axes), tuple(token_axes)
  mesh = _context_mesh(slot_axes + col_axes, token_axes, caller)
  _check_row_split(n, slot_axes, mesh, caller)
  cols = math.prod(mesh.shape[a] for a in col_axes)
  if v % cols:
    raise ValueError(f"{caller}: {v} table columns do not split over mesh axes {col_axes} of "
                     f"size {cols}")
  token_ways = math.prod(mesh.shape[a] for a in token_axes)
  if batch % token_ways:
    raise ValueError(f"{caller}: batch {batch} does not split over mesh axes {token_axes} of "
                     f"size {token_ways}")
  # Size-1 axes are dropped: a collective over one device is still an op in the program.
  split = TableSplit(real_axes(slot_axes, mesh), real_axes(col_axes, mesh),
                     real_axes(token_axes, mesh))
  return split, mesh


def _block_chunks(split: TableSplit, mesh, b: int, s: int, picks: int, v: int
                  ) -> tuple[int, int]:
  """Picks per loop step inside a block, (on CPUs, on GPUs / TPUs), from the rows it gathers:
  the tokens it sees x its columns."""
  seen = b // math.prod(mesh.shape[a] for a in split.tokens) * split.seen_ways(mesh)
  v_block = v // math.prod(mesh.shape[a] for a in split.cols)
  bytes_per_pick = seen * s * v_block * 4
  return chunks.pick_chunk(picks, bytes_per_pick), chunks.accelerator_chunk(picks, bytes_per_pick)


def sharded_weighted_lookup(values_NxV: jax.Array, indices: jax.Array, weights: jax.Array, *,
                            slot_axes: Sequence[str] = (MODEL,), col_axes: Sequence[str] = (),
                            token_axes: Sequence[str] = (DATA,),
                            pick_chunk: int | None = None, kernel: str = "xla") -> jax.Array:
  """`memory.weighted_lookup` with the table split over the current mesh (`TableSplit`).

  values [N, V] (rows in contiguous blocks over slot_axes, columns over col_axes),
  indices/weights [B, ..., H, K] (B split over token_axes) -> [B, ..., V]. Differentiable in
  values and weights; the gradient of each table block is that device's own scatter-add.
  `pick_chunk` picks are gathered per loop step (default: `chunks.GATHER_CHUNK_BYTES` of rows
  on CPUs, `chunks.ACCELERATOR_CHUNK_BYTES` on GPUs / TPUs), so [B, T, H, K, V] is never built.
  `kernel='pallas'` runs each block's sum and gradients as `lookup_kernels`' Pallas kernels.
  """
  n, v = values_NxV.shape
  if indices.shape != weights.shape or indices.ndim < 3:
    raise ValueError(f"sharded_weighted_lookup: indices {indices.shape} and weights "
                     f"{weights.shape} must both be [B, ..., H, K]")
  b, lead = indices.shape[0], indices.shape[:-2]
  split, mesh = _split_for("sharded_weighted_lookup", n, v, b, slot_axes, col_axes, token_axes)
  picks = indices.shape[-2] * indices.shape[-1]
  idx_BxSxP = indices.reshape(b, -1, picks).astype(jnp.int32)
  w_BxSxP = weights.reshape(b, -1, picks)
  chunk = _block_chunks(split, mesh, b, idx_BxSxP.shape[1], picks, v)
  if pick_chunk is not None:
    chunk = (max(1, min(int(pick_chunk), picks)),) * 2
  lookup = _make_lookup(split, chunk, kernel)
  return lookup(values_NxV, idx_BxSxP, w_BxSxP).reshape(*lead, v)


def sharded_row_dots(table_NxD: jax.Array, indices: jax.Array, x: jax.Array, *,
                     slot_axes: Sequence[str] = (MODEL,), col_axes: Sequence[str] = (),
                     token_axes: Sequence[str] = (DATA,)) -> jax.Array:
  """`memory_kinds.row_dots` (PEER's expert scores u_i . x) with the table split over the mesh
  as `sharded_weighted_lookup`'s: table [N, D], indices [B, ..., H, K], x [B, ..., D] (B split
  over token_axes) -> [B, ..., H, K] float32. Each block dots its own picked rows' columns with
  x's and the partial [tokens, picks] scores are summed over the blocks; its backward is the
  lookup (d x) and each block's own scatter-add (d table)."""
  n, d = table_NxD.shape
  b, lead, picks = indices.shape[0], indices.shape[:-2], indices.shape[-2] * indices.shape[-1]
  split, mesh = _split_for("sharded_row_dots", n, d, b, slot_axes, col_axes, token_axes)
  idx_BxSxP = indices.reshape(b, -1, picks).astype(jnp.int32)
  x_BxSxD = x.reshape(b, -1, d)
  chunk = _block_chunks(split, mesh, b, idx_BxSxP.shape[1], picks, d)
  dots_fn, grads_fn = _chunked(_local_row_dots, *chunk), _chunked(_local_lookup_grads, *chunk)
  lookup_fn = _chunked(_local_lookup, *chunk)

  def local(table, idx, x):
    idx = split.gather_tokens(idx)
    bb, s, _ = idx.shape
    x = split.spread_out(x)
    return bb, s, split.local_rows(idx, table.shape[0]), x.reshape(bb * s, -1)

  def fwd_local(table, idx, x):
    bb, s, lidx, x = local(table, idx, x)
    return split.combine_picks(dots_fn(table, lidx, x).reshape(bb, s, -1))

  def bwd_local(table, idx, x, g_s):
    bb, s, lidx, x_local = local(table, idx, x)
    g_s = split.gather_tokens(g_s).reshape(bb * s, -1).astype(jnp.float32)
    g_table, _ = grads_fn(table, lidx, g_s, x_local)
    if split.copies:
      g_table = jax.lax.psum(g_table, split.copies)
    g_x = lookup_fn(table, lidx, g_s)
    return g_table, split.combine_out(g_x.reshape(bb, s, -1)).astype(x.dtype)

  dots = _row_op(fwd_local, bwd_local, split)
  return dots(table_NxD, idx_BxSxP, x_BxSxD).reshape(*lead, *indices.shape[-2:])


# ---------------------------------------------------------------------------------------------
# Sharded sparse optimizer step
# ---------------------------------------------------------------------------------------------


def sharded_row_gradients(indices: jax.Array, weights: jax.Array, grad_out: jax.Array, *,
                          num_rows: int, slot_axes: Sequence[str] = (MODEL,),
                          col_axes: Sequence[str] = (), token_axes: Sequence[str] = (DATA,)
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """d loss / d table at the picked rows, built inside each device's table block.

  indices/weights [B, T, H, K] (ids >= num_rows: padding) and grad_out [B, T, V] (d loss / d
  memory output), split over `token_axes` -> row_ids [blocks * R] (ids local to their row block,
  padding = block size; split over `slot_axes`), row_grads [blocks * R, V] (split over
  `slot_axes` and `col_axes`: each block's R rows and its columns, as `sparse_adam.row_gradients`
  makes them) and the squared norm of all row gradients [] (replicated, for global-norm
  clipping). Each device all-gathers the picks and output gradients (token-sized) and coalesces
  only the picks that land in its own rows, for its own columns: coalescing replicated would
  all-reduce [min(picks, N), V] row gradients -- the whole table once a batch's picks outnumber
  its rows.
  """
  slot_axes, col_axes, token_axes = tuple(slot_axes), tuple(col_axes), tuple(token_axes)
  mesh = _context_mesh(slot_axes + col_axes, token_axes, "sharded_row_gradients")
  _check_row_split(num_rows, slot_axes, mesh, "sharded_row_gradients")
  slot_axes, col_axes = real_axes(slot_axes, mesh), real_axes(col_axes, mesh)
  token_axes = real_axes(token_axes, mesh)
  n_local = num_rows // math.prod(mesh.shape[a] for a in slot_axes)
  id_spec, token_spec = P(axes_entry(slot_axes)), P(axes_entry(token_axes))
  grad_spec = P(axes_entry(slot_axes), axes_entry(col_axes))

  def local_rows(idx, w, g):
    if token_axes:
      # Invariant over the token axes: every copy of a block builds the same rows.
      idx, w, g = (jax.lax.all_gather(x, token_axes, axis=0, tiled=True, to="invarying")
                   for x in (idx, w, g))
    for axis in col_axes:  # this block's columns (row-major over the axes, as the spec)
      width = g.shape[-1] // jax.lax.axis_size(axis)
      g = jax.lax.dynamic_slice_in_dim(g, jax.lax.axis_index(axis) * width, width, g.ndim - 1)
    row_ids, row_grads, sq_norm = sparse_adam.row_gradients_and_norm(
        to_local_rows(idx, n_local, slot_axes), w, g, num_rows=n_local)
    if slot_axes + col_axes:
      sq_norm = jax.lax.psum(sq_norm, slot_axes + col_axes)
    return row_ids, row_grads, sq_norm

  return jax.shard_map(local_rows, in_specs=(token_spec,) * 3,
                       out_specs=(id_spec, grad_spec, P()),
                       # Column blocks make the same ids from the same gathered picks; the CPU
                       # kernel's outputs are typed as varying over every axis its inputs are.
                       check_vma=not col_axes)(indices, weights, grad_out)


def sharded_row_update(tx: sparse_adam.SparseGradientTransformation, row_ids: jax.Array,
                       row_grads: jax.Array, opt_state: Any, table: jax.Array, *,
                       slot_axes: Sequence[str] = (MODEL,), col_axes: Sequence[str] = (),
                       grad_scale: jax.Array | None = None) -> tuple[jax.Array, Any]:
  """One row-wise optimizer step (e.g. `sparse_adam`) on a table split over `slot_axes` (rows)
  and `col_axes` (columns).

  row_ids [blocks * R] (row-block-local, unique within a block; ids >= block size are padding)
  and row_grads [blocks * R, V], split as `sharded_row_gradients` returns them; the table
  [N, V] and the row-wise state split like the table; grad_scale [] (the clip's factor)
  replicated. Each device steps its own block: no collective at all. -> (table, opt_state).
  """
  slot_axes, col_axes = tuple(slot_axes), tuple(col_axes)
  mesh = _context_mesh(slot_axes + col_axes, (), "sharded_row_update")
  n = table.shape[0]
  _check_row_split(n, slot_axes, mesh, "sharded_row_update")
  slot_axes, col_axes = real_axes(slot_axes, mesh), real_axes(col_axes, mesh)
  id_spec = P(axes_entry(slot_axes))
  block_spec = P(axes_entry(slot_axes), axes_entry(col_axes))
  state_specs = jax.tree.map(
      lambda x: (block_spec if x.ndim == 2 else id_spec) if is_row_leaf(x, n) else P(), opt_state)

  scale = jnp.ones([], jnp.float32) if grad_scale is None else grad_scale
  step = jax.shard_map(tx.step, in_specs=(id_spec, block_spec, state_specs, block_spec, P()),
                       out_specs=(block_spec, state_specs))
  return step(row_ids, row_grads, opt_state, table, scale)
