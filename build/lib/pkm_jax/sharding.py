"""Device mesh, logical-axis rules and sharded init.

The mesh has two axes, 'data' (batch) and 'model' (value-table slots). Both are `AxisType.Auto`:
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
# (BERT-base's dense weights fit on any accelerator; the memory tables are what needs splitting).
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", DATA),
    ("slots", MODEL),
    ("value_embed", None),
    ("embed", None), ("embed_out", None), ("mlp", None), ("qkv", None), ("heads", None),
    ("vocab", None),
    ("positions", None), ("types", None),
    ("mem_query", None), ("mem_heads", None), ("mem_keys", None),
)
# Table rows split over every device: no device holds a data-parallel copy of any row.
FSDP_SLOT_RULES = (("slots", (MODEL, DATA)),) + DEFAULT_RULES


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
  """`config.mesh.rules` (overrides, first match wins) followed by DEFAULT_RULES."""
  rules = config.mesh.get("rules", None) or ()
  return tuple((name, _as_axes(axes)) for name, axes in rules) + DEFAULT_RULES


def rule_axes(logical: str, rules: Rules) -> tuple[str, ...]:
  """The mesh axes a logical axis is split over under `rules`, e.g. 'slots' -> ('model',)."""
  return axes_tuple(logical_to_spec((logical,), rules)[0])


def slot_axes(rules: Rules) -> tuple[str, ...]:
  """The mesh axes the value tables' rows are split over under `rules`."""
  return rule_axes("slots", rules)


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


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """NamedShardings with the structure of `abstract_state` (any tree of nnx Variables / arrays).

  A Variable with logical axes is sharded by `rules`; other leaves (LayerNorm params, step
  counters, unannotated arrays) are replicated. Optimizer moments built by optax from the param
  State are Variables with the params' metadata, so they are sharded like their params. Variables
  keep their place in the tree (holding the sharding), so the result can be zipped with the
  state and passed as jit in/out_shardings.
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
      return x.replace(NamedSharding(mesh, spec))
    return replicated

  return jax.tree_util.tree_map_with_path(leaf, abstract_state,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


def row_state_shardings(abstract_state: Any, table_sharding: NamedSharding, num_rows: int) -> Any:
  """Shardings for a row-wise optimizer state (e.g. sparse_adam's): leaves whose leading dim is
  the table's `num_rows` are split like the table, everything else is replicated."""
  replicated = NamedSharding(table_sharding.mesh, P())
  row_spec = P(table_sharding.spec[0] if len(table_sharding.spec) else None)
  return jax.tree.map(
      lambda x: NamedSharding(table_sharding.mesh, row_spec) if is_row_leaf(x, num_rows)
      else replicated, abstract_state)


def is_row_leaf(x, num_rows: int) -> bool:
  """Whether a leaf of a row-wise optimizer state is split like the table (leading dim N)."""
  return getattr(x, "ndim", 0) >= 1 and x.shape[0] == num_rows
