"""The config's checks: the choices each key may take, and one-line ConfigErrors per group.

`pkm_jax.config.validate` runs them over a whole config; the fine-tuning tasks' configs
(`pkm_jax.tasks.task_config`) reuse the groups' checks.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from pkm_jax import host_tables
from pkm_jax import sharding
from pkm_jax.models.causal_attention import ROPE_TYPES

FAMILIES = ("bert", "gpt2", "llama")  # model.family: pkm_jax.models
MEMORY_MODES = ("none", "replace", "residual")
QUERY_NORMS = ("auto", "batchnorm", "layernorm", "none")  # auto: resolved by model.family
MEMORY_KINDS = ("pkm", "memory_plus", "peer")  # pkm_jax.memory_kinds says what each computes
GATES = ("none", "silu", "sigmoid")
PEER_ACTIVATIONS = ("relu", "gelu", "silu", "sigmoid", "identity")
DECAYS = ("linear", "cosine", "constant")
VALUE_OPTIMIZERS = ("adam", "sparse_adam")
VALUE_SCHEDULES = ("constant", "network")
LOOKUP_KERNELS = ("xla", "pallas")  # mesh.lookup_kernel: pkm_jax.lookup_kernels or not
TABLE_SPLITS = tuple(sharding.TABLE_SPLITS)  # mesh.table_split
TABLE_MEMORIES = host_tables.TABLE_MEMORIES  # mesh.table_memory: jax's memory kinds
DTYPES = ("float32", "bfloat16", "float16")
VALUE_DTYPES = ("float32", "bfloat16")  # memory.value_dtype a run can train
DATA_SOURCES = ("generated", "files", "tfds", "prepared")
FINETUNE_METHODS = ("full", "lora", "memory", "sparse_memory")  # pkm_jax.continual
SLOT_REFRESHES = ("batch", "epoch")  # finetune.refresh: continual.slot_selection
MIN_VOCAB = 16  # a trained WordPiece needs room for its special tokens and some characters
MIN_BPE_VOCAB = 258  # a causal run's byte-level BPE: 256 bytes, EOS, pad (data.bpe.MIN_VOCAB)
QUANTIZED_DTYPES = ("int8", "float8_e4m3fn")  # value_dtypes of pkm_jax.quantize's tables


def as_tuples(x: Any) -> Any:
  """JSON lists (and flag-parsed lists) as the tuples a config holds, recursively."""
  return tuple(as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


class ConfigError(ValueError):
  """A config that cannot run; the message is one line naming the key."""


def check_number(group: ml_collections.ConfigDict, path: str, key: str, *,
                 lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False, special: tuple = ()) -> None:
  """ConfigError unless group[key] is a finite number in the range (or one of `special`)."""
  value = group[key]
  if value in special and not isinstance(value, bool):
    return
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  ok = ok and (lo is None or (value > lo if lo_open else value >= lo))
  ok = ok and (hi is None or (value < hi if hi_open else value <= hi))
  if not ok:
    lower = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
    upper = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
    also = f" (or {', '.join(map(str, special))})" if special else ""
    bounds = " and ".join(b for b in (lower, upper) if b)
    raise ConfigError(f"{path}.{key}={value!r} must be a number {bounds}{also}")


def check_choice(group: ml_collections.ConfigDict, path: str, key: str, choices: tuple) -> None:
  if group[key] not in choices:
    raise ConfigError(f"{path}.{key}={group[key]!r} is not one of {choices}")


def validate_optim(o: ml_collections.ConfigDict) -> None:
  """Every `optim` key (shared by pretraining and fine-tuning)."""
  for key in ("lr", "values_lr", "weight_decay", "values_weight_decay", "grad_clip",
              "end_lr_factor", "warmup_steps"):
    check_number(o, "optim", key, lo=0)
  check_number(o, "optim", "warmup_fraction", lo=0, hi=1, hi_open=True)
  for key in ("b1", "b2"):
    check_number(o, "optim", key, lo=0, hi=1, hi_open=True)
  check_number(o, "optim", "eps", lo=0, lo_open=True)
  check_choice(o, "optim", "decay", DECAYS)
  check_choice(o, "optim", "values_optimizer", VALUE_OPTIMIZERS)
  check_choice(o, "optim", "values_schedule", VALUE_SCHEDULES)
  if o.freeze_memory and o.values_optimizer == "sparse_adam":
    raise ConfigError("optim.freeze_memory=True leaves the value tables untrained: "
                      "optim.values_optimizer='sparse_adam' has nothing to update")


def validate_run_lengths(t: ml_collections.ConfigDict, keys: tuple[str, ...]) -> None:
  """`train` keys counted in steps: positive, and checkpoints kept >= 1 (never none)."""
  for key in keys:
    check_number(t, "train", key, lo=1)
  # Retention must never remove the latest checkpoint (orbax's max_to_keep=0 deletes them all).
  check_number(t, "train", "keep_checkpoints", lo=1)
  check_number(t, "train", "grad_accum_steps", lo=1)


def validate_mesh(mesh: ml_collections.ConfigDict, *, training: bool = True) -> None:
  """Mesh sizes and rules that can be checked without devices (the program checks the rest);
  `training`: the run trains, which host-memory tables do not support."""
  for key in ("data", "model"):
    value = mesh[key]
    if isinstance(value, bool) or not isinstance(value, int) or value == 0 or value < -1:
      raise ConfigError(f"mesh.{key}={value!r} must be a positive integer or -1 (all remaining "
                        "devices)")
  if mesh.data == -1 and mesh.model == -1:
    raise ConfigError("mesh.data and mesh.model cannot both be -1")
  check_choice(mesh, "mesh", "lookup_kernel", LOOKUP_KERNELS)
  check_choice(mesh, "mesh", "table_split", TABLE_SPLITS)
  check_choice(mesh, "mesh", "table_memory", TABLE_MEMORIES)
  if training and mesh.table_memory != host_tables.DEVICE:
    raise ConfigError(f"mesh.table_memory={mesh.table_memory!r} serves inference only (eval.py, "
                      "fill_mask, benchmarks/serving.py); training keeps the tables on the device")
  if not isinstance(mesh.fsdp, bool):
    raise ConfigError(f"mesh.fsdp={mesh.fsdp!r} must be True or False")
  for rule in mesh.rules or ():
    if (not isinstance(rule, (tuple, list)) or len(rule) != 2
        or not isinstance(rule[0], str)):
      raise ConfigError(f"mesh.rules entry {rule!r} is not a (logical axis, mesh axes) pair")
    unknown = [a for a in sharding.axes_tuple(rule[1]) if a not in sharding.MESH_AXES]
    if unknown:
      raise ConfigError(f"mesh.rules maps {rule[0]!r} to unknown mesh axes {unknown}; the mesh "
                        f"axes are {sharding.MESH_AXES}")


def validate_dropouts(group: ml_collections.ConfigDict, path: str, keys: tuple[str, ...],
                      special: tuple = ()) -> None:
  for key in keys:
    check_number(group, path, key, lo=0, hi=1, hi_open=True, special=special)


def validate_finetune(f: ml_collections.ConfigDict, mem: ml_collections.ConfigDict,
                      o: ml_collections.ConfigDict) -> None:
  """The `finetune` group; what needs the model (a memory layer, top_t against its slots once
  inherited from init.pretrained) is checked by pkm_jax.continual.methods.check_model."""
  check_choice(f, "finetune", "method", FINETUNE_METHODS)
  check_choice(f, "finetune", "refresh", SLOT_REFRESHES)
  for key in ("lora_rank", "top_t", "background_batches"):
    check_number(f, "finetune", key, lo=1)
    if not isinstance(f[key], int):
      raise ConfigError(f"finetune.{key}={f[key]!r} must be an integer")
  check_number(f, "finetune", "lora_alpha", lo=0, lo_open=True)
  if f.method != "full" and o.freeze_memory:
    raise ConfigError(f"optim.freeze_memory=True goes with finetune.method='full' only; "
                      f"finetune.method={f.method!r} decides what is frozen itself")
  if f.method == "sparse_memory" and o.values_optimizer != "sparse_adam":
    raise ConfigError("finetune.method='sparse_memory' writes only the selected rows: it needs "
                      f"optim.values_optimizer='sparse_adam', not {o.values_optimizer!r}")
  if f.method == "sparse_memory" and mem.mode != "none" and f.top_t > mem.n_keys ** 2:
    raise ConfigError(f"finetune.top_t={f.top_t} exceeds the memory's {mem.n_keys ** 2} slots "
                      f"(memory.n_keys={mem.n_keys} squared)")


def validate_rope_scaling(scaling: Any) -> None:
  """model.rope_scaling: (key, value) pairs, e.g. (("rope_type", "linear"), ("factor", 4.0))."""
  pairs = as_tuples(scaling or ())
  if not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in pairs):
    raise ConfigError(f"model.rope_scaling={scaling!r} must be (key, value) pairs, e.g. "
                      "(('rope_type', 'linear'), ('factor', 4.0))")
  rope_type = dict(pairs).get("rope_type", dict(pairs).get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise ConfigError(f"model.rope_scaling's rope_type={rope_type!r} is not one of "
                      f"{', '.join(ROPE_TYPES)}")


def validate_memory(mem: ml_collections.ConfigDict, m: ml_collections.ConfigDict) -> None:
  """The `memory` group against the model it goes into."""
  check_choice(mem, "memory", "mode", MEMORY_MODES)
  check_choice(mem, "memory", "query_norm", QUERY_NORMS)
  check_choice(mem, "memory", "kind", MEMORY_KINDS)
  check_choice(mem, "memory", "gate", GATES)
  check_choice(mem, "memory", "peer_activation", PEER_ACTIVATIONS)
  if (mem.kind == "memory_plus") != (mem.gate != "none"):
    raise ConfigError(f"memory.gate={mem.gate!r} does not go with memory.kind={mem.kind!r}: "
                      "memory_plus needs gate 'silu' or 'sigmoid', the other kinds 'none'")
  check_trainable(mem.value_dtype, "the config")
  check_choice(mem, "memory", "value_dtype", VALUE_DTYPES)
  for key in ("n_keys", "heads", "k", "k_dim"):
    check_number(mem, "memory", key, lo=1)
  check_number(mem, "memory", "v_dim", lo=0)
  validate_dropouts(mem, "memory", ("input_dropout", "query_dropout", "value_dropout"))
  if mem.mode == "none":
    return
  if not mem.layers:
    raise ConfigError(f"memory.mode={mem.mode!r} needs at least one index in memory.layers")
  for layer in mem.layers:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < m.num_layers:
      raise ConfigError(f"memory.layers has {layer!r}, out of range for model.num_layers="
                        f"{m.num_layers} (indices are 0-based)")
  if len(set(mem.layers)) != len(mem.layers):
    raise ConfigError(f"memory.layers={list(mem.layers)} has duplicates")
  if mem.k_dim % 2:
    raise ConfigError(f"memory.k_dim={mem.k_dim} must be even (two sub-key halves)")
  if mem.k > mem.n_keys:
    raise ConfigError(f"memory.k={mem.k} must be in 1..memory.n_keys={mem.n_keys}")
  if mem.v_dim not in (0, m.hidden_size):
    raise ConfigError(f"memory.v_dim={mem.v_dim} must equal model.hidden_size="
                      f"{m.hidden_size} (or 0): memory output is added to the residual")


def check_trainable(value_dtype: str, what: str) -> None:
  """Quantised tables (pkm_jax.quantize) are for inference: training from them is refused."""
  if value_dtype in QUANTIZED_DTYPES:
    raise ConfigError(f"{what}: memory.value_dtype={value_dtype!r} is a quantised table "
                      "(python -m pkm_jax.quantize), for inference only: train or fine-tune "
                      "from a float32 / bfloat16 model (the one it was quantised from)")


def check_batch_split(config: ml_collections.ConfigDict, data_ways: int) -> None:
  """Each micro-batch must split evenly over the devices the batch is split over."""
  micro_batch = config.data.batch_size // config.train.grad_accum_steps
  if micro_batch % data_ways:
    raise ConfigError(f"data.batch_size={config.data.batch_size} / train.grad_accum_steps="
                      f"{config.train.grad_accum_steps} = {micro_batch} sequences per "
                      f"micro-batch do not split over the {data_ways} devices of the batch "
                      "axes (mesh.data x mesh.model)")
