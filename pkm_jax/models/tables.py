"""Where a model's memory row tables live in its parameter tree, for every model family.

A family's backbone sits under one root attribute of the task model (`bert` for BERT, `decoder`
for the causal LMs), and each memory layer's tables under `ROOT.layers[i].memory`, or, with
`memory.share_values`, one table per name on the root (`ROOT.memory_values`, ...). The optimizer,
the sparse updates and the metrics find the tables through these functions, never by a family's
own names.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from flax import nnx

from pkm_jax import memory_kinds
from pkm_jax.architecture import ModelConfig

_TABLES = (memory_kinds.VALUES, memory_kinds.DOWN)


def root(cfg: ModelConfig) -> str:
  """The task model's attribute that holds the backbone: 'bert' or 'decoder'."""
  return "bert" if cfg.family == "bert" else "decoder"


def is_value_table(names: Sequence[str]) -> bool:
  """Whether a parameter path (e.g. ('bert', 'layers', '3', 'memory', 'values'), or a shared
  ('decoder', 'memory_values')) names a memory row table -- values, or PEER's down vectors: what
  the value optimizer trains and sparse updates touch row by row."""
  names = [str(n) for n in names]
  return ((len(names) >= 2 and names[-2] == "memory" and names[-1] in _TABLES)
          or (bool(names) and names[-1] in [memory_kinds.SHARED_PREFIX + t for t in _TABLES]))


def row_tables(cfg: ModelConfig) -> dict[str, tuple[tuple[str | int, ...], str, tuple[int, ...]]]:
  """Every memory row table: key (a layer's value table keeps the key str(layer) it always had)
  -> (path in a param State under its task model, table name, the layers that read it)."""
  out, top = {}, root(cfg)
  for name in memory_kinds.table_names(cfg.memory):
    if cfg.memory.share_values and cfg.memory_layers:
      out[memory_kinds.SHARED_PREFIX + name] = (
          (top, memory_kinds.SHARED_PREFIX + name), name, tuple(cfg.memory_layers))
      continue
    for layer in cfg.memory_layers:
      key = str(layer) if name == memory_kinds.VALUES else f"{layer}.{name}"
      out[key] = ((top, "layers", layer, "memory", name), name, (layer,))
  return out


def state_at(params: nnx.State, path: tuple[str | int, ...]) -> nnx.Variable:
  """params[path[0]][path[1]]..."""
  for p in path:
    params = params[p]
  return params


def value_table(params: nnx.State, layer: int, cfg: ModelConfig | None = None) -> nnx.Variable:
  """The value table layer `layer` reads (its own or the shared one) in a param State of a task
  model (BERT's MLM model or task heads: root 'bert'; a causal LM: root 'decoder')."""
  backbone = params[root(cfg) if cfg is not None else "bert"]
  shared = memory_kinds.SHARED_PREFIX + memory_kinds.VALUES
  return (backbone[shared] if shared in backbone
          else backbone["layers"][layer]["memory"]["values"])


def map_row_tables(params: nnx.State, cfg: ModelConfig, fn: Callable[[Any], Any]) -> nnx.State:
  """`params` (any tree with the param State's structure: arrays, ShapeDtypeStructs or
  shardings) with every row table's leaf replaced by fn(leaf); the other leaves unchanged."""
  paths = {path for path, _, _ in row_tables(cfg).values()}

  def leaf(path, x):
    # A Variable's leaf sits under its '.value' attribute.
    names = tuple(getattr(p, "key", getattr(p, "idx", getattr(p, "name", None))) for p in path)
    return fn(x) if names in paths or names[:-1] in paths else x

  return jax.tree_util.tree_map_with_path(leaf, params)
