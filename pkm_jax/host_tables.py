"""Value tables in the host's pinned memory (`mesh.table_memory='pinned_host'`): a memory layer
reads only its picked rows, so a table larger than an accelerator's memory can stay in host RAM
and only the rows of a step's picks cross the host link.

Each lookup gathers its picks' rows where the table is, on the host (XLA's host compute,
`compute_on('device_host')`: the gather runs on the host thread and writes the rows to device
memory), then weighs and sums them on the device as the device-table path does. The ids are
known only once the layer's query has been scored, so each memory layer pays one host round trip
that nothing can start early (see the README's "Tables in host memory" for its cost).

Inference only (eval, fill-mask, serving): the table gets no gradient here, and training with
host tables is refused by the config checks. On a CPU host and device memory are the same RAM:
the option runs the same program (equal outputs; how its tests check the numbers) and saves
nothing. A pick's rows are fetched in chunks of at most `chunks.ACCELERATOR_CHUNK_BYTES`, each
its own host call, so the device never holds [tokens, picks, V] for a large batch at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.compute_on import compute_on

from pkm_jax import chunks
from pkm_jax import product_keys

DEVICE, PINNED_HOST = "device", "pinned_host"  # jax's memory kinds
TABLE_MEMORIES = (DEVICE, PINNED_HOST)  # config mesh.table_memory


def fetch_rows(table_NxD: jax.Array, idx_MxC: jax.Array) -> jax.Array:
  """table[idx] gathered on the host, returned in device memory: table [N, D] (pinned host),
  ids [M, C] in [0, N) (clamped: a host gather is not bounds-checked) -> rows [M, C, D] of the
  table's dtype. Only these rows cross the host link; the table never leaves the host."""
  n, d = table_NxD.shape
  ids = jax.device_put(jnp.clip(idx_MxC, 0, n - 1), jax.memory.Space.Host)
  with compute_on("device_host"):
    # lax.gather with promise_in_bounds: jnp indexing would add device-side constants (its
    # negative-index wrap and bounds fill) that cannot mix with host values.
    rows = jax.lax.gather(
        table_NxD, ids[..., None],
        jax.lax.GatherDimensionNumbers(offset_dims=(2,), collapsed_slice_dims=(0,),
                                       start_index_map=(0,)),
        slice_sizes=(1, d), mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)
  return jax.device_put(rows, jax.memory.Space.Device)


def _chunk(idx_MxP: jax.Array, width: int, itemsize: int) -> int:
  """Picks per host fetch: [M, chunk, width] rows within ACCELERATOR_CHUNK_BYTES."""
  return chunks.accelerator_chunk(idx_MxP.shape[1], idx_MxP.shape[0] * width * itemsize)


def weighted_lookup(values_NxV: jax.Array, indices: jax.Array, weights: jax.Array) -> jax.Array:
  """`product_keys.weighted_lookup` on a host table: values [N, V] (pinned host), picks and
  weights [..., H, K] -> [..., V] float32, summed on the device a chunk of picks at a time."""
  lead, picks = indices.shape[:-2], indices.shape[-2] * indices.shape[-1]
  idx_MxP = indices.reshape(-1, picks)
  # As product_keys: weights at least float32, rows widened to them (8-bit quantised rows,
  # which jnp does not promote, read as float32; their scales are folded into the weights).
  w_MxP = weights.reshape(-1, picks).astype(product_keys.wide_dtype(values_NxV.dtype))
  chunk = _chunk(idx_MxP, values_NxV.shape[1], values_NxV.dtype.itemsize)
  out_MxV = jnp.zeros((idx_MxP.shape[0], values_NxV.shape[1]), jnp.float32)
  # A Python loop, not a scan: each fetch is its own async host call that XLA may overlap with
  # the previous chunk's sum; a host computation inside a loop body is not supported everywhere.
  for s in range(0, picks, chunk):
    rows = fetch_rows(values_NxV, idx_MxP[:, s:s + chunk])
    out_MxV = out_MxV + jnp.einsum("mc,mcv->mv", w_MxP[:, s:s + chunk],
                                   rows.astype(w_MxP.dtype), preferred_element_type=jnp.float32)
  return out_MxV.reshape(*lead, values_NxV.shape[1])


def row_dots(table_NxD: jax.Array, indices: jax.Array, x: jax.Array) -> jax.Array:
  """`memory_kinds.row_dots` (PEER's u_i . x) on a host table: table [N, D] (pinned host),
  picks [..., H, K], x [..., D] -> [..., H, K] float32."""
  *lead, h, k = indices.shape
  idx_MxP = indices.reshape(-1, h * k)
  x_MxD = x.reshape(-1, x.shape[-1])
  chunk = _chunk(idx_MxP, table_NxD.shape[1], table_NxD.dtype.itemsize)
  parts = []
  for s in range(0, h * k, chunk):
    rows = fetch_rows(table_NxD, idx_MxP[:, s:s + chunk])
    ct = product_keys.wide_dtype(rows.dtype, x_MxD.dtype)  # as memory_kinds.row_dots
    parts.append(jnp.einsum("mcd,md->mc", rows.astype(ct), x_MxD.astype(ct),
                            preferred_element_type=jnp.float32))
  return jnp.concatenate(parts, axis=1).reshape(*lead, h, k)
