"""Lazy (row-sparse) Adam for the memory value table, as TF's LazyAdam / PyTorch's SparseAdam.

A step touches only the rows picked in the batch: their first/second moments are updated with
the row's coalesced gradient (duplicate picks summed first) and the row moves by Adam's update,
bias-corrected with the GLOBAL step count. Every other row -- its value and both moments -- is
left bit-identical. All table-sized arrays are only ever gathered from / scattered into at the
picked rows, so with donated buffers XLA updates them in place and a step's cost depends on the
number of picked rows, not on N.

How this differs from dense Adam on the same gradients (they agree exactly when every row is
touched every step):
- An untouched row's moments do not decay (dense Adam multiplies them by b1/b2 every step).
- An untouched row does not move, although dense Adam would keep moving it with its old
  momentum (mu_hat / sqrt(nu_hat) is non-zero long after the row's gradient stops).
- A row touched again after a gap is corrected with the global count, so its first update after
  the gap uses moments that decayed only over the steps it was touched.
- Weight decay (decoupled, AdamW-style) applies to touched rows only.

Interface (optax in spirit, but on rows):
  tx = sparse_adam(learning_rate, b1, b2, eps, weight_decay)
  state = tx.init(table)
  row_ids, row_grads = row_gradients(indices, weights, grad_out, num_rows=N)
  row_ids, row_updates, state = tx.update(row_ids, row_grads, state, table)
  table = apply_row_updates(table, row_ids, row_updates)
or, the same step as one in-place loop over row chunks (what the train step runs):
  table, state = tx.step(row_ids, row_grads, state, table)
row_ids are unique; entries >= N are padding (their gathers read zeros, their scatters drop), so
every array has a static shape and the step jits once. On a row-sharded table,
`sharded_memory.sharded_row_gradients` builds each block's row gradients inside that block and
`sharded_memory.sharded_row_update` runs this update there, so no [rows, V] array crosses devices.
The train step clips row gradients together with the dense ones, by their joint global norm.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from pkm_jax import chunks
from pkm_jax import cpu_sparse_rows


class SparseAdamState(NamedTuple):
  count: jax.Array  # int32 [], steps taken (all rows share it)
  mu: jax.Array  # [N, V] first moments
  nu: jax.Array  # [N, V] second moments


class SparseGradientTransformation(NamedTuple):
  """init(table) -> state; update(row_ids [R], row_grads [R, V], state, table) ->
  (row_ids, row_updates [R, V], state); step(row_ids, row_grads, state, table, grad_scale=None)
  -> (table, state): update and apply_row_updates in one, in place, the row gradients first
  multiplied by grad_scale (a scalar; None: 1). row_ids unique; ids >= N are padding."""

  init: Callable[[jax.Array], Any]
  update: Callable[[jax.Array, jax.Array, Any, jax.Array], tuple[jax.Array, jax.Array, Any]]
  step: Callable[..., tuple[jax.Array, Any]]  # (row_ids, row_grads, state, table, grad_scale)


# Rows per loop step of `step`: each gathers this many bytes of every [N, V] array at most.
# Cache-sized, as chunks.CACHE_CHUNK_BYTES: at BERT-base (131,072 rows of 768, with the row
# gradients) 8 MB took 457 ms, 2 MB 346 ms, 1 MB 356 ms on this project's 2-core CPU.
STEP_CHUNK_BYTES = 1 << 21


def sparse_adam(learning_rate: float | optax.Schedule, b1: float = 0.9, b2: float = 0.999,
                eps: float = 1e-8, weight_decay: float = 0.0, *, use_cpu_kernel: bool = True
                ) -> SparseGradientTransformation:
  """Lazy Adam(W) on table rows; matches optax.adamw(learning_rate, b1, b2, eps, weight_decay=...)
  on every row that is touched at every step. A schedule is evaluated at the global step count.
  use_cpu_kernel=False: `step` runs its pure-JAX loop on CPUs too (the reference)."""

  def init(table: jax.Array) -> SparseAdamState:
    return SparseAdamState(count=jnp.zeros([], jnp.int32), mu=jnp.zeros_like(table),
                           nu=jnp.zeros_like(table))

  def bias_corrections(count, dtype):
    return (1 - b1**count).astype(dtype), (1 - b2**count).astype(dtype)

  def check(row_ids, row_grads, table):
    if row_grads.shape != (row_ids.shape[0], table.shape[1]):
      raise ValueError(f"sparse_adam: row_grads {row_grads.shape} must be [len(row_ids)="
                       f"{row_ids.shape[0]}, V={table.shape[1]}]")

  def adam_rows(g, mu_rows, nu_rows, table_rows, bias1, bias2, lr):
    """New moments and the update of some rows; the same expressions, in the same order, as
    optax.scale_by_adam (+ add_decayed_weights, scale_by_learning_rate)."""
    g = g.astype(mu_rows.dtype)
    mu = (1 - b1) * g + b1 * mu_rows
    nu = (1 - b2) * (g * g) + b2 * nu_rows
    mu_hat = mu / bias1
    nu_hat = nu / bias2
    step = mu_hat / (jnp.sqrt(nu_hat) + eps)
    if weight_decay:
      step = step + weight_decay * table_rows
    return mu, nu, (-lr * step).astype(table_rows.dtype)

  def rows(x, ids):
    return x.at[ids].get(mode="fill", fill_value=0)

  def update(row_ids: jax.Array, row_grads: jax.Array, state: SparseAdamState,
             table: jax.Array) -> tuple[jax.Array, jax.Array, SparseAdamState]:
    check(row_ids, row_grads, table)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    count = optax.safe_increment(state.count)
    mu, nu, row_updates = adam_rows(row_grads, rows(state.mu, row_ids), rows(state.nu, row_ids),
                                    rows(table, row_ids), *bias_corrections(count, state.mu.dtype),
                                    lr)
    new_state = SparseAdamState(count=count,
                                mu=state.mu.at[row_ids].set(mu, mode="drop"),
                                nu=state.nu.at[row_ids].set(nu, mode="drop"))
    return row_ids, row_updates, new_state

  def step(row_ids: jax.Array, row_grads: jax.Array, state: SparseAdamState,
           table: jax.Array, grad_scale: jax.Array | float | None = None
           ) -> tuple[jax.Array, SparseAdamState]:
    """update + apply_row_updates in one, in place (donate table and state), the row gradients
    first multiplied by grad_scale (the global-norm clip's factor). On CPUs a custom call
    (`cpu_sparse_rows.lazy_adam_step`) reads and writes each picked row once; elsewhere a loop
    over chunks of rows, each gathering, stepping and scattering back into the carried table
    and moments: no [R, V] array is built."""
    check(row_ids, row_grads, table)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    count = optax.safe_increment(state.count)

    bias1, bias2 = bias_corrections(count, state.mu.dtype)

    r, v = row_grads.shape
    row_bytes = v * state.mu.dtype.itemsize
    # Per platform: cache-sized on CPUs; on GPUs / TPUs few large steps (chunks.py).
    cpu_chunk = max(1, min(r, STEP_CHUNK_BYTES // row_bytes))
    accelerator = chunks.accelerator_chunk(r, row_bytes)

    def chunked(row_ids, row_grads, table, mu, nu, scale, lr, bias1, bias2, chunk=cpu_chunk):
      pad = -r % chunk  # padding rows: id N (gathers read zeros, scatters drop), gradient 0
      ids_CxC = jnp.pad(row_ids, (0, pad), constant_values=table.shape[0]).reshape(-1, chunk)
      g_CxCxV = jnp.pad(row_grads, ((0, pad), (0, 0))).reshape(-1, chunk, v)

      def chunk_step(carry, xs):
        table, mu_all, nu_all = carry
        ids, g = xs
        if scale is not None:
          g = (g * scale).astype(g.dtype)
        mu, nu, upd = adam_rows(g, rows(mu_all, ids), rows(nu_all, ids), rows(table, ids),
                                bias1, bias2, lr)
        return (table.at[ids].add(upd, mode="drop"), mu_all.at[ids].set(mu, mode="drop"),
                nu_all.at[ids].set(nu, mode="drop")), None

      (table, mu, nu), _ = jax.lax.scan(chunk_step, (table, mu, nu), (ids_CxC, g_CxCxV))
      return table, mu, nu

    def kernel(row_ids, row_grads, table, mu, nu, scale, lr, bias1, bias2):
      return cpu_sparse_rows.lazy_adam_step(
          row_ids, row_grads, table, mu, nu, grad_scale=scale, lr=lr, bias1=bias1,
          bias2=bias2, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)

    args = (row_ids, row_grads, table, state.mu, state.nu)
    if use_cpu_kernel and cpu_sparse_rows.usable(row_grads, table, state.mu, state.nu):
      scalars = [jnp.asarray(x, jnp.float32) for x in
                 (1.0 if grad_scale is None else grad_scale, lr, bias1, bias2)]
      table, mu, nu = jax.lax.platform_dependent(
          *args, *scalars, cpu=kernel, default=functools.partial(chunked, chunk=accelerator))
    else:
      table, mu, nu = chunks.per_platform(
          lambda c: lambda *a: chunked(*a, grad_scale, lr, bias1, bias2, chunk=c), cpu_chunk,
          accelerator, *args)
    return table, SparseAdamState(count=count, mu=mu, nu=nu)

  return SparseGradientTransformation(init, update, step)


def apply_row_updates(table: jax.Array, row_ids: jax.Array, row_updates: jax.Array) -> jax.Array:
  """table[row_ids] += row_updates (row_ids unique; ids >= N are dropped), in place if donated."""
  return table.at[row_ids].add(row_updates.astype(table.dtype), mode="drop")


def coalesce_rows(row_ids: jax.Array, row_grads: jax.Array, num_rows: int
                  ) -> tuple[jax.Array, jax.Array]:
  """Sums the gradients of duplicate ids: ([R], [R, V]) -> unique ids [R] (sorted, padded with
  num_rows) and their summed gradients [R, V] (zeros at padding)."""
  ids, inverse = jnp.unique(row_ids, size=row_ids.shape[0], fill_value=num_rows,
                            return_inverse=True)
  grads = jax.ops.segment_sum(row_grads, inverse.reshape(-1), num_segments=row_ids.shape[0])
  return ids.astype(jnp.int32), grads


def row_gradients(indices: jax.Array, weights: jax.Array, grad_out: jax.Array, *,
                  num_rows: int, pick_chunk: int | None = None, use_cpu_kernel: bool = True
                  ) -> tuple[jax.Array, jax.Array]:
  """d loss / d values, only at picked rows, from d loss / d (memory output).

  indices/weights [B, T, H, K], grad_out [B, T, V] -> row_ids [R] (unique, sorted, padded with
  num_rows), row_grads [R, V] (zeros at padding), R = min(B*T*H*K, num_rows). Row r gets the sum
  over picks with index r of weight * grad_out; picks with ids >= num_rows are dropped.
  """
  row_ids, row_grads, _ = row_gradients_and_norm(indices, weights, grad_out, num_rows=num_rows,
                                                 pick_chunk=pick_chunk,
                                                 use_cpu_kernel=use_cpu_kernel)
  return row_ids, row_grads


def row_gradients_and_norm(indices: jax.Array, weights: jax.Array, grad_out: jax.Array, *,
                           num_rows: int, pick_chunk: int | None = None,
                           use_cpu_kernel: bool = True
                           ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`row_gradients`, and the squared norm [] of all row gradients (for global-norm clipping).

  On CPUs (float32) a custom call (`cpu_sparse_rows.row_gradients`) sorts the picks by row and
  writes each row's gradient once. Elsewhere (and with `pick_chunk`, or use_cpu_kernel=False): a
  fixed-size jnp.unique plus a segment sum done as a scan of in-place scatter-adds over pick
  chunks (`chunks.cache_chunk` on CPUs, `chunks.accelerator_chunk` on GPUs / TPUs), so
  [B, T, H, K, V] is never built.
  """
  if indices.shape != weights.shape or grad_out.shape[:-1] != indices.shape[:-2]:
    raise ValueError(f"row_gradients: indices {indices.shape}, weights {weights.shape} and "
                     f"grad_out {grad_out.shape} must be [B, T, H, K], [B, T, H, K], [B, T, V]")
  v = grad_out.shape[-1]
  picks = indices.shape[-2] * indices.shape[-1]
  idx_MxP, w_MxP = indices.reshape(-1, picks), weights.reshape(-1, picks)
  g_MxV = grad_out.reshape(-1, v)
  m = idx_MxP.shape[0]
  size = min(m * picks, num_rows)

  cpu_chunk = max(1, min(pick_chunk or chunks.cache_chunk(picks, m * v * 4), picks))
  accelerator = max(1, min(pick_chunk or chunks.accelerator_chunk(picks, m * v * 4), picks))

  def scanned(idx_MxP, w_MxP, g_MxV, chunk=cpu_chunk):
    # Ids outside [0, num_rows) are padding (as the kernel takes them): one id past the end.
    idx_MxP = jnp.where((idx_MxP >= 0) & (idx_MxP < num_rows), idx_MxP, num_rows)
    row_ids, inverse = jnp.unique(idx_MxP, size=size, fill_value=num_rows, return_inverse=True)
    # Padding picks of the last chunk point at `size`, past the end: their scatters drop.
    inv_CxMxc = chunks.to_chunks(inverse.reshape(m, picks), chunk, size)
    w_CxMxc = chunks.to_chunks(w_MxP, chunk, 0)
    g_MxV = g_MxV.astype(jnp.float32)

    def add_chunk(acc_RxV, xs):
      inv, w = xs
      return acc_RxV.at[inv].add(w.astype(jnp.float32)[..., None] * g_MxV[:, None, :],
                                 mode="drop"), None

    # Inside shard_map (sharded_memory.sharded_row_gradients) the carry must vary over the
    # mesh axes its inputs vary over.
    init = chunks.zeros_varying((size, v), jnp.float32, inverse, w_MxP, g_MxV)
    row_grads, _ = jax.lax.scan(add_chunk, init, (inv_CxMxc, w_CxMxc))
    # Padding picks coalesce into the padding id itself; its gradient is zeroed so that the
    # rows' norm (for clipping) counts real rows only.
    row_grads = jnp.where((row_ids < num_rows)[:, None], row_grads, 0.0).astype(grad_out.dtype)
    return (row_ids.astype(jnp.int32), row_grads,
            jnp.sum(jnp.square(row_grads.astype(jnp.float32))))

  def kernel(idx_MxP, w_MxP, g_MxV):
    row_ids, row_grads, row_sq = cpu_sparse_rows.row_gradients(idx_MxP, w_MxP, g_MxV,
                                                               num_rows=num_rows)
    return row_ids, row_grads, jnp.sum(row_sq)

  if use_cpu_kernel and pick_chunk is None and cpu_sparse_rows.usable(w_MxP, g_MxV):
    return jax.lax.platform_dependent(idx_MxP, w_MxP, g_MxV, cpu=kernel,
                                      default=functools.partial(scanned, chunk=accelerator))
  return chunks.per_platform(lambda c: functools.partial(scanned, chunk=c), cpu_chunk,
                             accelerator, idx_MxP, w_MxP, g_MxV)
