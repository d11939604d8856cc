"""How a value table [N, V] and the tokens lie on the device mesh, and the collectives that
follow: what `sharded_memory`'s lookups send between devices, written out axis by axis.

Every device holds the block P(rows, cols) of the table and its own tokens. Tokens of the token
axes the table is split over are gathered first (picks only: ids and weights), so each block sees
every token that may read it; a block's partial result for those tokens then goes back to the
tokens' owners. Which collective does that, per axis, is `TableSplit._steps`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def real_axes(axes: tuple[str, ...], mesh) -> tuple[str, ...]:
  """`axes` without those of size 1: a collective over one device is still an op."""
  return tuple(a for a in axes if mesh.shape[a] > 1)


def axes_entry(axes: tuple[str, ...]):
  """Mesh axes as one PartitionSpec entry: () -> None, ('a',) -> 'a', else the tuple."""
  return None if not axes else axes[0] if len(axes) == 1 else axes


def to_local_rows(ids: jax.Array, n_local: int, slot_axes: tuple[str, ...]) -> jax.Array:
  """Global row ids -> ids into this device's row block; rows elsewhere become n_local, which
  gathers with mode='fill' read as zeros and scatters with mode='drop' skip."""
  shard = 0
  for axis in slot_axes:  # row-major over the axes, as PartitionSpec((a, b)) lays out blocks
    shard = shard * jax.lax.axis_size(axis) + jax.lax.axis_index(axis)
  local = ids - shard * n_local
  return jnp.where((local >= 0) & (local < n_local), local, n_local)


@dataclasses.dataclass(frozen=True)
class TableSplit:
  """How a table [N, V] and the tokens lie on the mesh (axes of size > 1), and so what a lookup
  sends between devices. Every device holds the block P(rows, cols) of the table and its own
  tokens; the tokens of the token axes the table is split over are gathered (picks only: ids and
  weights), so each block sees every token that may read it. A block's partial result for those
  tokens is then returned, axis by axis (`_steps`):
    row axis, tokens split over it -> reduce-scatter (partial sums over row blocks);
    row axis, tokens not split     -> all-reduce;
    column axis, tokens split      -> all-to-all (tokens back to their owner, columns joined);
    column axis, tokens not split  -> all-gather of the columns.
  Table copies (token axes the table is not split over) all-reduce the table's gradient."""

  rows: tuple[str, ...] = ()
  cols: tuple[str, ...] = ()
  tokens: tuple[str, ...] = ()

  @property
  def table_spec(self) -> P:
    return P(axes_entry(self.rows), axes_entry(self.cols))

  @property
  def token_spec(self) -> P:
    return P(axes_entry(self.tokens))

  @property
  def copies(self) -> tuple[str, ...]:
    return tuple(a for a in self.tokens if a not in self.rows + self.cols)

  def _steps(self) -> list[tuple[str, str]]:
    # Rows first (a reduce-scatter leaves fewer tokens to move); columns innermost first, so
    # that joining them rebuilds PartitionSpec((a, b))'s row-major column blocks.
    steps = [(a, "scatter" if a in self.tokens else "sum") for a in self.rows]
    return steps + [(a, "all_to_all" if a in self.tokens else "concat")
                    for a in reversed(self.cols)]

  def seen_ways(self, mesh) -> int:
    """How many devices' tokens each block sees."""
    return math.prod(mesh.shape[a] for a, op in self._steps() if op in ("scatter", "all_to_all"))

  def gather_tokens(self, x_BxS: jax.Array) -> jax.Array:
    """[b, ...] this device's tokens -> [b * seen_ways, ...], every token its block may serve.
    Gathered in the reverse of the order `combine_out` returns them, one axis at a time."""
    for a, op in reversed(self._steps()):
      if op in ("scatter", "all_to_all"):
        x_BxS = jax.lax.all_gather(x_BxS, a, axis=0, tiled=True)
    return x_BxS

  def combine_out(self, x_BxSxv: jax.Array) -> jax.Array:
    """A block's partial [b_seen, S, V_block] -> this device's tokens' [b, S, V] (see above)."""
    for a, op in self._steps():
      if op == "scatter":
        x_BxSxv = jax.lax.psum_scatter(x_BxSxv, a, scatter_dimension=0, tiled=True)
      elif op == "sum":
        x_BxSxv = jax.lax.psum(x_BxSxv, a)
      elif op == "all_to_all":
        x_BxSxv = jax.lax.all_to_all(x_BxSxv, a, 0, 2, tiled=True)
      else:
        # Every device of `a` ends with the same columns: say so (the output is replicated).
        x_BxSxv = jax.lax.all_gather(x_BxSxv, a, axis=2, tiled=True, to="invarying")
    return x_BxSxv

  def spread_out(self, x_BxSxV: jax.Array) -> jax.Array:
    """The transpose of `combine_out`: this device's [b, S, V] -> [b_seen, S, V_block]."""
    for a, op in reversed(self._steps()):
      if op == "scatter":
        x_BxSxV = jax.lax.all_gather(x_BxSxV, a, axis=0, tiled=True)
      elif op == "all_to_all":
        x_BxSxV = jax.lax.all_to_all(x_BxSxV, a, 2, 0, tiled=True)
      elif op == "concat":  # the same on every device of `a`: keep this block's columns
        width = x_BxSxV.shape[2] // jax.lax.axis_size(a)
        x_BxSxV = jax.lax.dynamic_slice_in_dim(x_BxSxV, jax.lax.axis_index(a) * width, width, 2)
    return x_BxSxV

  def combine_picks(self, x_BxSxP: jax.Array) -> jax.Array:
    """Per-pick partials over a block's rows and columns [b_seen, S, P] -> sums [b, S, P]."""
    for a, op in self._steps():
      if op in ("scatter", "all_to_all"):
        x_BxSxP = jax.lax.psum_scatter(x_BxSxP, a, scatter_dimension=0, tiled=True)
      else:
        x_BxSxP = jax.lax.psum(x_BxSxP, a)
    return x_BxSxP

  def local_rows(self, idx_BxSxP: jax.Array, n_local: int) -> jax.Array:
    """Gathered picks -> [M, P] ids into this device's row block (n_local: held elsewhere)."""
    b, s, p = idx_BxSxP.shape
    return to_local_rows(idx_BxSxP.reshape(b * s, p), n_local, self.rows)
