"""Where a memory layer's table rows and tokens live on the device mesh, and so how it runs.

A `MemoryPlacement` is built once, from (mesh, rules), by whoever builds the jitted program
(`run_setup.build_placement`), and handed to the model: the layer asks it to search, to look up
and (for sparse value updates) to build and apply row gradients. The model config says *what*
the memory computes; the placement says *where*, so it is never saved with a checkpoint, and the
same checkpoint restores onto any mesh.

Rules of choice (each computes the same function, only the communication differs):
  - rows or columns split over mesh axes of size > 1 (`slot_axes`, `col_axes`): the
    hand-partitioned lookup and row updates of `sharded_memory` (the table stays put; picks and
    token-sized partials move);
  - tokens split over mesh axes of size > 1 (`token_axes`): each device runs the search for its
    own tokens (`sharded_memory.sharded_product_key_topk`);
  - neither (one device, or a replicated table with replicated tokens): the plain operations of
    `product_keys`, the lookup through `cpu_lookup` (its custom calls on CPU, summing in
    another order: equal to ~1e-6). Those calls have no partitioner: a model built with this
    placement for a sharded jit would run them on gathered inputs.
`lookup_kernel='pallas'` (config `mesh.lookup_kernel`) runs the lookup's forward sum as a Pallas
kernel (`lookup_kernels`): on the whole table, or inside each device's row block of a split one.
`table_memory='pinned_host'` (config `mesh.table_memory`): the row tables are in the host's
pinned memory and only the picked rows come to the device (`host_tables`; inference only, on
unsplit tables).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from pkm_jax import cpu_lookup
from pkm_jax import host_tables
from pkm_jax import lookup_kernels
from pkm_jax import memory_kinds
from pkm_jax import product_keys
from pkm_jax import sharded_memory
from pkm_jax import sharding as sharding_lib
from pkm_jax import sparse_adam


@dataclasses.dataclass(frozen=True)
class MemoryPlacement:
  """Mesh axes (of size > 1) that split the value-table rows and the tokens; () = not split;
  and which kernel computes the lookup ('xla' | 'pallas')."""

  slot_axes: tuple[str, ...] = ()
  token_axes: tuple[str, ...] = ()
  lookup_kernel: str = "xla"
  col_axes: tuple[str, ...] = ()  # mesh axes that split the value tables' columns
  table_memory: str = host_tables.DEVICE  # the row tables' memory kind (host_tables)

  @classmethod
  def from_mesh(cls, mesh: jax.sharding.Mesh,
                rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES, *,
                lookup_kernel: str = "xla", table_memory: str = host_tables.DEVICE
                ) -> MemoryPlacement:
    """The placement `rules` give on `mesh`: 'slots' -> row axes, 'value_embed' -> column
    axes, 'batch' -> token axes."""
    real = lambda axes: tuple(a for a in axes if mesh.shape[a] > 1)  # noqa: E731
    return cls(slot_axes=real(sharding_lib.slot_axes(rules)),
               token_axes=real(sharding_lib.rule_axes("batch", rules)),
               lookup_kernel=lookup_kernel,
               col_axes=real(sharding_lib.column_axes(rules)), table_memory=table_memory)

  def constrain_tokens(self, x_BxT: jax.Array) -> jax.Array:
    """x [B, T, ...] held split over the token axes, as the batch arrives. Between layers
    nothing else pins the activations: under FSDP (weights split over every device) XLA chose
    to all-reduce the whole batch's hidden states after each dense matmul of a model without
    memory (77.6 GB per device and step, BERT-large at 8 devices; the memory layers' shard_maps
    pinned them in the others). Outside a mesh context (one device) it does nothing."""
    if not self.token_axes or jax.sharding.get_abstract_mesh().empty:
      return x_BxT
    return jax.lax.with_sharding_constraint(
        x_BxT, jax.sharding.PartitionSpec(self.token_axes))

  @property
  def split(self) -> bool:
    """Whether the value tables are split (by rows, columns or both)."""
    return bool(self.slot_axes or self.col_axes)

  def search(self, query: jax.Array, sub_keys: jax.Array, k: int
             ) -> tuple[jax.Array, jax.Array]:
    """`product_keys.product_key_topk`: query [B, T, H, Kd] -> scores, slots [B, T, H, k]."""
    if self.token_axes:
      return sharded_memory.sharded_product_key_topk(query, sub_keys, k,
                                                     token_axes=self.token_axes)
    return product_keys.product_key_topk(query, sub_keys, k)

  def lookup(self, values_NxV: jax.Array, indices: jax.Array, weights: jax.Array) -> jax.Array:
    """`product_keys.weighted_lookup`: values [N, V], picks [B, T, H, k] -> [B, T, V]."""
    if self.table_memory == host_tables.PINNED_HOST:
      return host_tables.weighted_lookup(values_NxV, indices, weights)
    if self.split:
      return sharded_memory.sharded_weighted_lookup(values_NxV, indices, weights,
                                                    slot_axes=self.slot_axes,
                                                    col_axes=self.col_axes,
                                                    token_axes=self.token_axes,
                                                    kernel=self.lookup_kernel)
    if self.lookup_kernel == "pallas":
      return lookup_kernels.weighted_lookup(values_NxV, indices, weights)
    if not self.token_axes:  # one device's tokens: on CPU, the lookup's custom calls
      return cpu_lookup.weighted_lookup(values_NxV, indices, weights)
    return product_keys.weighted_lookup(values_NxV, indices, weights)

  def row_dots(self, table_NxD: jax.Array, indices: jax.Array, x: jax.Array) -> jax.Array:
    """`memory_kinds.row_dots` (PEER's u_i . x): table [N, D], picks [B, T, H, k], x [B, T, D]
    -> [B, T, H, k] float32."""
    if self.table_memory == host_tables.PINNED_HOST:
      return host_tables.row_dots(table_NxD, indices, x)
    if self.split:
      return sharded_memory.sharded_row_dots(table_NxD, indices, x, slot_axes=self.slot_axes,
                                             col_axes=self.col_axes, token_axes=self.token_axes)
    return memory_kinds.row_dots(table_NxD, indices, x)

  def row_gradients(self, indices: jax.Array, weights: jax.Array, grad_out: jax.Array, *,
                    num_rows: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of the picked rows: picks [B, T, H, k] (ids >= num_rows: padding), d out
    [B, T, V] -> row ids [R], row grads [R, V], their squared norm [] (for joint clipping).
    Split tables build them inside each row block (`sharded_memory.sharded_row_gradients`)."""
    if self.split:
      return sharded_memory.sharded_row_gradients(indices, weights, grad_out, num_rows=num_rows,
                                                  slot_axes=self.slot_axes,
                                                  col_axes=self.col_axes,
                                                  token_axes=self.token_axes)
    return sparse_adam.row_gradients_and_norm(indices, weights, grad_out, num_rows=num_rows)

  def row_update(self, tx: sparse_adam.SparseGradientTransformation, row_ids: jax.Array,
                 row_grads: jax.Array, opt_state: Any, table_NxV: jax.Array,
                 grad_scale: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """One row-wise optimizer step on the rows `row_gradients` returned, their gradients times
    grad_scale (the clip's factor) -> (table, opt_state)."""
    if self.split:
      return sharded_memory.sharded_row_update(tx, row_ids, row_grads, opt_state, table_NxV,
                                               slot_axes=self.slot_axes, col_axes=self.col_axes,
                                               grad_scale=grad_scale)
    return tx.step(row_ids, row_grads, opt_state, table_NxV, grad_scale)


SINGLE_DEVICE = MemoryPlacement()
