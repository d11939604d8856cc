"""Device mesh, logical-axis rules and sharded init.

The mesh has two axes, 'data' and 'model'. The batch is split over both, so every device runs
the dense model on 1/n of the tokens whatever the mesh's shape; the value tables are split over
'model', by columns (default) or by rows (`TABLE_SPLITS`), and with `fsdp` over 'data' too, as
is every other large weight and its optimizer state (`state_shardings`). Both axes are
`AxisType.Auto`:
the model code carries no sharding annotations, the trainer fixes shardings at jit boundaries
(in/out_shardings) and GSPMD propagates them through BERT. The only hand-partitioned code is the
memory's search, lookup and optimizer step (`sharded_memory.py`, written with `jax.shard_map`).
With Explicit axes (jax's default for `jax.make_mesh`) every op in the model would have to be
sharding-type-correct, e.g. a gather from a row-sharded table needs an explicit `out_sharding`, so
sharding would leak into model code; Auto keeps it in these two modules and the trainer.

Params name their axes with Variable metadata `logical_axes` (e.g. values ('slots', 'value_embed'));
`rules` map logical names to mesh axes (first match wins). optax builds its moments with
`jax.tree.map` over the param State, which keeps each Variable's metadata, so Adam's mu/nu of the
table get the table's logical axes -- and thus its sharding -- from the same rules.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from absl import logging

import jax
import ml_collections
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"
MESH_AXES = (DATA, MODEL)

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

# Every logical name used by bert.py / memory.py; all but the batch and the slots are replicated
# unless `fsdp` (the memory tables are what needs splitting first). The batch goes over every
# device: over 'data' alone, each device of a 'model' group would run the same dense model on
# the same tokens (8x the work per device at model=8).
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", (DATA, MODEL)),
    ("slots", MODEL),
    ("value_embed", None),
    ("embed", None), ("embed_out", None), ("mlp", None), ("qkv", None), ("heads", None),
    ("vocab", None),
    ("positions", None), ("types", None),
    ("mem_query", None), ("mem_heads", None), ("mem_keys", None),
)
# Table rows split over every device: no device holds a data-parallel copy of any row.
FSDP_SLOT_RULES = (("slots", (MODEL, DATA)),) + DEFAULT_RULES
# How `mesh.table_split` splits the value tables over 'model' (rules tried before the defaults).
# rows: each device holds N/m whole rows; a lookup sends every token's picks to every block and
# reduce-scatters [tokens, V] partial sums. columns (Memory Layers at Scale): each device holds
# V/m of every row; a lookup sends the picks to every device, each sums its column slice for
# all of them, and an all-to-all returns [tokens, V/m] slices: 1/m of the rows' gathering work
# per device and 1/m of the rows' traffic, where the row split gathers and reduces [tokens, V].
TABLE_SPLITS: dict[str, tuple[tuple[str, MeshAxes], ...]] = {
    "rows": (("slots", MODEL),),
    "columns": (("slots", None), ("value_embed", MODEL)),
}
# With fsdp, a weight (or optimizer moment) with fewer elements stays replicated: a collective's
# fixed cost outweighs the bytes it would save.
FSDP_MIN_SIZE = 1 << 10


# ---------------------------------------------------------------------------------------------
# Mesh and rules
# ---------------------------------------------------------------------------------------------


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'model') mesh with Auto axes; one of the sizes may be -1 (fill from devices)."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if data == -1 and model == -1:
    raise ValueError("mesh: only one of data/model may be -1")
  if data == -1 or model == -1:
    known = model if data == -1 else data
    if known <= 0 or n % known:
      raise ValueError(f"mesh: {n} devices cannot be split with {'model' if data == -1 else 'data'}"
                       f"={known}")
    data, model = (n // known, model) if data == -1 else (data, n // known)
  if data <= 0 or model <= 0 or data * model > n:
    raise ValueError(f"mesh: data={data} x model={model} needs more than the {n} available "
                     "devices")
  if data * model < n:
    # Explicit sizes may use fewer devices (e.g. a one-device reference run in tests).
    logging.warning("mesh: using %d of %d devices (data=%d x model=%d)", data * model, n, data,
                    model)
    devices = devices[:data * model]
  return jax.make_mesh((data, model), MESH_AXES, axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """Leading (batch) dimension split as the 'batch' rule says (default: over 'data')."""
  return NamedSharding(mesh, logical_to_spec(("batch",), rules))


def rules_from_config(config: ml_collections.ConfigDict) -> Rules:
  """`config.mesh.rules` (overrides, first match wins), then `mesh.table_split`'s rules, then
  DEFAULT_RULES. Rules that name 'slots' or 'value_embed' lay the tables out themselves:
  mesh.table_split is then not applied."""
  rules = tuple((name, _as_axes(axes)) for name, axes in config.mesh.get("rules", None) or ())
  own_table_rules = any(name in ("slots", "value_embed") for name, _ in rules)
  split = () if own_table_rules else TABLE_SPLITS[config.mesh.get("table_split", "columns")]
  if split and config.mesh.get("fsdp", False):
    # FSDP keeps no data-parallel copy of anything: the tables go over 'data' too, so each
    # device holds 1/n of every table (at the cost of seeing every token's picks).
    split = tuple((name, (MODEL, DATA) if axes == MODEL else axes) for name, axes in split)
  return rules + split + DEFAULT_RULES


def fsdp_axes_from_config(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The mesh axes `state_shardings` splits dense weights over: all of them with mesh.fsdp."""
  return MESH_AXES if config.mesh.get("fsdp", False) else ()


def rule_axes(logical: str, rules: Rules) -> tuple[str, ...]:
  """The mesh axes a logical axis is split over under `rules`, e.g. 'slots' -> ('model',)."""
  return axes_tuple(logical_to_spec((logical,), rules)[0])


def slot_axes(rules: Rules) -> tuple[str, ...]:
  """The mesh axes the value tables' rows are split over under `rules`."""
  return rule_axes("slots", rules)


def column_axes(rules: Rules) -> tuple[str, ...]:
  """The mesh axes the value tables' columns are split over under `rules`."""
  return rule_axes("value_embed", rules)


def axes_tuple(axes: MeshAxes | list) -> tuple[str, ...]:
  """A rule's or PartitionSpec entry's mesh axes as a tuple: None -> (), 'model' -> ('model',)."""
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _as_axes(axes) -> MeshAxes:
  if axes is None or isinstance(axes, str):
    return axes
  return tuple(axes)


def logical_to_spec(logical: Sequence[str | None], rules: Rules,
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None,
                    where: str = "") -> P:
  """Logical axis names -> PartitionSpec of mesh axes (first matching rule wins).

  With `shape` and `mesh`, also checks each dimension divides over its mesh axes.
  """
  table: dict[str, MeshAxes] = {}
  for name, axes in rules:
    table.setdefault(name, axes)
  where = f" of {where}" if where else ""
  if shape is not None and len(shape) != len(logical):
    raise ValueError(f"logical axes {tuple(logical)}{where} do not match its shape {tuple(shape)}")
  entries, used = [], set()
  for dim, name in enumerate(logical):
    if name is None:
      entries.append(None)
      continue
    if name not in table:
      raise ValueError(f"logical axis {name!r}{where} has no rule; add ({name!r}, None) to "
                       "replicate it")
    axes = axes_tuple(table[name])
    if used & set(axes):
      raise ValueError(f"mesh axes {axes} are used twice in logical axes {tuple(logical)}{where}")
    used |= set(axes)
    if shape is not None and mesh is not None:
      ways = math.prod(mesh.shape[a] for a in axes)
      if shape[dim] % ways:
        raise ValueError(f"dimension {dim} ({name!r}, size {shape[dim]}){where} is not divisible "
                         f"by mesh axes {axes} of size {ways}")
    entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*entries)


def _variable_logical_axes(var: nnx.Variable) -> tuple | None:
  meta = var.get_metadata()
  # Our params use `logical_axes`; flax's own nnx.with_partitioning spells it `out_sharding`.
  return meta.get("logical_axes") or meta.get("out_sharding")


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                    fsdp_axes: Sequence[str] = ()) -> Any:
  """NamedShardings with the structure of `abstract_state` (any tree of nnx Variables / arrays).

  A Variable with logical axes is sharded by `rules`; other leaves (LayerNorm params, step
  counters, unannotated arrays) are replicated. Optimizer moments built by optax from the param
  State are Variables with the params' metadata, so they are sharded like their params. Variables
  keep their place in the tree (holding the sharding), so the result can be zipped with the
  state and passed as jit in/out_shardings.

  fsdp_axes (FSDP / ZeRO-3): an annotated Variable of at least FSDP_MIN_SIZE elements that is
  not a value table also has its largest dimension that divides split over those of these axes
  its rules leave free. The step then all-gathers each weight where a layer uses it (XLA
  inserts it: the model code is unchanged) and reduce-scatters its gradient, so no device holds
  a whole dense weight or its Adam moments; the tables keep their own split (`TABLE_SPLITS`).
  """
  replicated = NamedSharding(mesh, P())

  def leaf(path, x):
    if isinstance(x, nnx.Variable):
      value = x.get_value()
      if not hasattr(value, "shape"):  # e.g. optax's MaskedNode: a Variable with no array
        return x
      logical = _variable_logical_axes(x)
      if logical is None:
        return x.replace(replicated)
      spec = logical_to_spec(logical, rules, value.shape, mesh, jax.tree_util.keystr(path))
      if fsdp_axes and "slots" not in logical and value.size >= FSDP_MIN_SIZE:
        spec = _with_fsdp(spec, value.shape, mesh, fsdp_axes)
      return x.replace(NamedSharding(mesh, spec))
    return replicated

  return jax.tree_util.tree_map_with_path(leaf, abstract_state,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


def _with_fsdp(spec: P, shape: Sequence[int], mesh: Mesh, fsdp_axes: Sequence[str]) -> P:
  """`spec` with its largest unsplit dimension that divides also split over the free fsdp axes
  (those `spec` does not use and of size > 1); unchanged if no dimension divides."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  used = {a for e in entries for a in axes_tuple(e)}
  free = tuple(a for a in fsdp_axes if a not in used and mesh.shape[a] > 1)
  ways = math.prod(mesh.shape[a] for a in free)
  if not free:
    return spec
  dims = sorted((d for d, e in enumerate(entries) if e is None and shape[d] % ways == 0),
                key=lambda d: -shape[d])
  if not dims:
    return spec
  entries[dims[0]] = free[0] if len(free) == 1 else free
  return P(*entries)


def row_state_shardings(abstract_state: Any, table_sharding: NamedSharding, num_rows: int) -> Any:
  """Shardings for a row-wise optimizer state (e.g. sparse_adam's): leaves whose leading dim is
  the table's `num_rows` are split like the table (its rows, and its columns for [N, V] leaves),
  everything else is replicated."""
  replicated = NamedSharding(table_sharding.mesh, P())
  spec = tuple(table_sharding.spec) + (None, None)

  def leaf(x):
    if not is_row_leaf(x, num_rows):
      return replicated
    return NamedSharding(table_sharding.mesh, P(*spec[:min(x.ndim, 2)]))

  return jax.tree.map(leaf, abstract_state)


def is_row_leaf(x, num_rows: int) -> bool:
  """Whether a leaf of a row-wise optimizer state is split like the table (leading dim N)."""
  return getattr(x, "ndim", 0) >= 1 and x.shape[0] == num_rows
