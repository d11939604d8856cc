"""What a run keeps fixed, by `finetune.method` (and `optim.freeze_memory`): the filter that
splits the frozen parameters and statistics off the trained ones (TrainState.frozen).

Imported by the program (training) and by checkpoint.restore_model (evaluation), which must
split a saved model the way its run did.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from pkm_jax import memory_kinds
from pkm_jax.models.tables import is_value_table

# finetune.method values whose frozen part is everything but some parameters.
MEMORY_METHODS = ("memory", "sparse_memory")


def _names(path: tuple) -> list[str]:
  return [str(p) for p in path]


def _is_row_table(path: tuple, _: Any) -> bool:
  return is_value_table(_names(path))


def memory_filter() -> nnx.filterlib.Filter:
  """Every memory parameter and statistic (optim.freeze_memory)."""
  shared = [nnx.PathContains(memory_kinds.SHARED_PREFIX + name)  # tables on the backbone
            for name in (memory_kinds.VALUES, memory_kinds.DOWN)]
  return nnx.All(nnx.Any(nnx.Param, nnx.BatchStat), nnx.Any(nnx.PathContains("memory"), *shared))


def frozen_filter(method: str = "full", freeze_memory: bool = False) -> nnx.filterlib.Filter:
  """What stays fixed: 'full' -> nothing (or the memory under freeze_memory); 'memory' /
  'sparse_memory' -> every parameter and BatchNorm statistic but the memory row tables;
  'lora' -> every parameter and statistic but the LoRA adapters (nnx.LoRAParam)."""
  if method in MEMORY_METHODS:
    return nnx.All(nnx.Any(nnx.Param, nnx.BatchStat), nnx.Not(_is_row_table))
  if method == "lora":
    return nnx.All(nnx.Any(nnx.Param, nnx.BatchStat), nnx.Not(nnx.LoRAParam))
  return memory_filter() if freeze_memory else nnx.Nothing


def run_frozen_filter(run_config: dict) -> nnx.filterlib.Filter:
  """frozen_filter of a run's saved config.json (a dict; missing keys: their defaults)."""
  method = run_config.get("finetune", {}).get("method", "full")
  return frozen_filter(method, bool(run_config.get("optim", {}).get("freeze_memory", False)))
