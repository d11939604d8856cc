"""The config schema: one ConfigDict tree, its checks, and the model config it yields.

Every config file in `configs/` starts from `base_config()` and overrides values, so the set of
keys is defined here once; `validate()` rejects anything else before any work starts.
"""

from __future__ import annotations

import difflib

import json
import math
from typing import Any

import ml_collections
from absl import logging

from pkm_jax import sharding
from pkm_jax.architecture import MemoryConfig, ModelConfig
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
DTYPES = ("float32", "bfloat16", "float16")
VALUE_DTYPES = ("float32", "bfloat16")  # memory.value_dtype
DATA_SOURCES = ("generated", "files", "tfds", "prepared")
FINETUNE_METHODS = ("full", "lora", "memory", "sparse_memory")  # pkm_jax.continual
SLOT_REFRESHES = ("batch", "epoch")  # finetune.refresh: continual.slot_selection
MIN_VOCAB = 16  # a trained WordPiece needs room for its special tokens and some characters
MIN_BPE_VOCAB = 258  # a causal run's byte-level BPE: 256 bytes, EOS, pad (data.bpe.MIN_VOCAB)


class ConfigError(ValueError):
  """A config that cannot run; the message is one line naming the key."""


def optim_group(**overrides: Any) -> ml_collections.ConfigDict:
  """The `optim` group, shared by pretraining and fine-tuning (each overrides its defaults)."""
  g = ml_collections.ConfigDict(dict(
      lr=1e-4, warmup_steps=10000,
      warmup_fraction=0.0,  # > 0: warm up for this fraction of the run (overrides warmup_steps)
      decay="linear", end_lr_factor=0.0, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-6,
      grad_clip=1.0,  # joint global norm of every gradient (dense and sparse rows); 0: off
      # Memory value tables: their own Adam (XLM: lr 1e-3, constant, no decay); 'sparse_adam'
      # updates only the rows a step reads. (Not "optim.values": ConfigDict.values() is a method.)
      values_optimizer="adam",
      values_lr=1e-3,  # 0: optim.lr
      # 'constant': values_lr throughout (XLM); 'network': the network's warmup and decay.
      values_schedule="constant",
      values_weight_decay=0.0,
      freeze_memory=False))  # memory params and statistics stay as they are (not differentiated)
  g.update(overrides)
  return g


def mesh_group() -> ml_collections.ConfigDict:
  """The `mesh` group: device mesh sizes and logical-axis rules (pkm_jax.sharding)."""
  # rules: (logical axis, mesh axes) pairs tried before pkm_jax.sharding.DEFAULT_RULES, e.g.
  # (("slots", ("model", "data")),) splits the value tables over every device (FSDP-style).
  # lookup_kernel: 'pallas' runs the memory lookup's forward as a Pallas kernel on GPU/TPU
  # (pkm_jax.lookup_kernels; interpret mode, slow, on CPU); 'xla' the pure-JAX one.
  # table_split: the value tables split over 'model' by 'columns' or by 'rows'
  # (pkm_jax.sharding.TABLE_SPLITS says what each moves; rules naming 'slots' or 'value_embed'
  # replace it). fsdp: dense weights and their optimizer state split over every device too
  # (FSDP / ZeRO-3), gathered where a layer uses them.
  return ml_collections.ConfigDict(dict(data=-1, model=1, rules=(), lookup_kernel="xla",
                                        table_split="columns", fsdp=False))


def init_group() -> ml_collections.ConfigDict:
  """The `init` group: where a run's weights come from."""
  # A converted checkpoint, a Hugging Face folder or a pkm-jax training workdir (+Init).
  # (Not "init.from": `from` is a Python keyword, which the --config.x.y parser cannot take.)
  return ml_collections.ConfigDict(dict(pretrained=""))


def finetune_group() -> ml_collections.ConfigDict:
  """The `finetune` group: how continued training from init.pretrained trains (pkm_jax.continual).

  method: 'full' (every parameter), 'lora' (rank lora_rank adapters on the attention and FFN
  projections, scaled by lora_alpha / lora_rank; all else frozen), 'memory' (every memory row
  table; all else, query BatchNorm statistics included, frozen), 'sparse_memory' (as 'memory',
  but a step writes only the top_t slots of each table by TF-IDF against a background sample
  of background_batches batches of background_files, or of the pretrained run's own data when
  empty; refresh 'batch': ranked on each step's batch, 'epoch': on one pass of the new data,
  recounted after each pass).
  """
  return ml_collections.ConfigDict(dict(method="full", lora_rank=8, lora_alpha=16.0,
                                        top_t=1000, refresh="batch", background_files="",
                                        background_batches=16))


def base_config() -> ml_collections.ConfigDict:
  """All keys a pretraining config may have, with BERT-base sizes and the paper's memory."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=0,  # 0: taken from the tokenizer
      hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
      max_position_embeddings=512, type_vocab_size=2,
      hidden_dropout=0.1, attention_dropout=0.1, layer_norm_eps=1e-12,
      use_pooler=False, remat=False, dtype="float32", param_dtype="float32",
      # The backbone: 'bert' (masked LM) or a causal LM, 'gpt2' | 'llama' (see
      # pkm_jax.architecture.ModelConfig); the keys below are the causal LMs' only.
      family="bert", num_kv_heads=0, head_dim=0, attention_bias=False, qkv_bias=False,
      mlp_bias=False, tie_embeddings=True, rope_theta=10000.0,
      rope_scaling=(),  # e.g. (("rope_type", "llama3"), ("factor", 8.0), ...)
      sliding_window=0))

  c.memory = ml_collections.ConfigDict(dict(
      mode="none", layers=(3, 7),  # "4L/8L" of the paper's tables, 0-based
      n_keys=512, heads=4, k=32, k_dim=256, v_dim=0,  # v_dim 0: hidden size
      # 'auto': BatchNorm for BERT (XLM's choice), LayerNorm for the causal LMs, where a batch's
      # statistics would carry later tokens into every position (`query_norm_for`).
      query_norm="auto", input_dropout=0.0, query_dropout=0.0, value_dropout=0.0,
      value_zero_init=False, kind="pkm", gate="none", share_values=False, key_norm=False,
      peer_activation="relu",
      value_dtype="float32"))  # 'bfloat16': the value table (and its Adam moments) in bf16

  c.data = ml_collections.ConfigDict(dict(
      source="generated", files="", tfds_name="", tfds_split="train",
      tfds_eval_split="", text_key="text", data_dir="",
      path="",  # source='prepared': a folder made by `python -m pkm_jax.data.prepare`
      eval_files="",  # evaluate on every document of these text files (paths/globs)
      eval_path="",  # evaluate on every row of this prepared folder ('eval' or its only split)
      workers=0,  # grain worker processes making batches (0: threads in the training process)
      prefetch=2,  # batches made ahead (per worker; 0: each batch made when asked for)
      tokenizer="", vocab_size=30522, lowercase=True,
      max_len=128, batch_size=256, mask_prob=0.15, eval_fraction=0.05,
      generated=ml_collections.ConfigDict(dict(num_entities=2000, num_docs=20000, seed=0))))

  c.optim = optim_group()
  c.train = ml_collections.ConfigDict(dict(
      steps=1_000_000, log_every=100, eval_every=10_000, checkpoint_every=10_000,
      keep_checkpoints=3, eval_batches=50, memory_stats_every=1000,
      grad_accum_steps=1))  # the batch is split into this many sequential micro-batches
  c.mesh = mesh_group()
  c.eval = ml_collections.ConfigDict(dict(batches=0, batch_size=0))  # 0: whole split, train size
  c.init = init_group()
  c.finetune = finetune_group()
  return c


# Keys of earlier versions -> their names now, so that saved config.json files still load.
RENAMED_KEYS = {"init.from": "init.pretrained"}


def upgrade(saved: dict) -> dict:
  """A config.json dict of an earlier version with today's key names (a copy)."""
  out = json.loads(json.dumps(saved))
  for old, new in RENAMED_KEYS.items():
    (og, ok), (ng, nk) = old.split("."), new.split(".")
    if ok in out.get(og, {}):
      out.setdefault(ng, {})[nk] = out[og].pop(ok)
  return out


def as_tuples(x: Any) -> Any:
  """JSON lists (and flag-parsed lists) as the tuples a config holds, recursively."""
  return tuple(as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def from_json_dict(saved: dict, ref: ml_collections.ConfigDict, *,
                   where: str = "config.json") -> ml_collections.ConfigDict:
  """A ConfigDict of `ref`'s schema holding `saved` (a config.json as read by json.load): JSON
  lists become the tuples the schema has; a key the schema lacks is a ConfigError."""
  out = ref.copy_and_resolve_references()

  def fill(group: ml_collections.ConfigDict, values: dict, path: str) -> None:
    for key, value in values.items():
      name = f"{path}.{key}" if path else key
      if key not in group:
        raise ConfigError(f"{where}: unknown config key '{name}'")
      if isinstance(group[key], ml_collections.ConfigDict):
        if not isinstance(value, dict):
          raise ConfigError(f"{where}: config key '{name}' must be a group")
        fill(group[key], value, name)
        continue
      value = as_tuples(value) if isinstance(group[key], tuple) else value
      if isinstance(group[key], float) and isinstance(value, int):
        value = float(value)
      try:
        group[key] = value
      except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: config key '{name}'={value!r}: {e}") from e

  fill(out, saved, "")
  return out


def flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every leaf key of a config, dotted: ['data.batch_size', ..., 'seed']."""
  out = []
  for key, value in cfg.items():
    if isinstance(value, ml_collections.ConfigDict):
      out += flat_keys(value, f"{prefix}{key}.")
    else:
      out.append(f"{prefix}{key}")
  return out


def unknown_key(cfg: ml_collections.ConfigDict, key: str) -> str | None:
  """None when `key` ('data.batch_size') is in `cfg`; else one line naming it as typed and the
  closest keys that exist (the same last name under another group first, then spelling)."""
  keys = flat_keys(cfg)
  groups = {k.rsplit(".", 1)[0] for k in keys if "." in k}
  if key in keys or key in groups:
    return None
  leaf = key.rsplit(".", 1)[-1]
  near = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
  near += [k for k in difflib.get_close_matches(key, keys, n=4, cutoff=0.6) if k not in near]
  near += [k for k in difflib.get_close_matches(leaf, keys, n=2, cutoff=0.6) if k not in near]
  hint = f"; closest: {', '.join(near[:4])}" if near else ""
  return f"config.{key} is not a key of this config (--config.{key}){hint}"


def check_keys(cfg: ml_collections.ConfigDict, ref: ml_collections.ConfigDict,
               path: str = "") -> None:
  """ConfigError for a key `ref` does not have, or a group given as a value."""
  for key in cfg.keys():
    where = f"{path}.{key}" if path else key
    if key not in ref:
      raise ConfigError(f"unknown config key '{where}'")
    if isinstance(ref[key], ml_collections.ConfigDict):
      if not isinstance(cfg[key], ml_collections.ConfigDict):
        raise ConfigError(f"config key '{where}' must be a group, got {cfg[key]!r}")
      check_keys(cfg[key], ref[key], where)


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


def validate_mesh(mesh: ml_collections.ConfigDict) -> None:
  """Mesh sizes and rules that can be checked without devices (the program checks the rest)."""
  for key in ("data", "model"):
    value = mesh[key]
    if isinstance(value, bool) or not isinstance(value, int) or value == 0 or value < -1:
      raise ConfigError(f"mesh.{key}={value!r} must be a positive integer or -1 (all remaining "
                        "devices)")
  if mesh.data == -1 and mesh.model == -1:
    raise ConfigError("mesh.data and mesh.model cannot both be -1")
  check_choice(mesh, "mesh", "lookup_kernel", LOOKUP_KERNELS)
  check_choice(mesh, "mesh", "table_split", TABLE_SPLITS)
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


def validate(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> None:
  """Raises ConfigError (one line) for anything that would fail later in a run."""
  check_keys(config, base_config())
  check_number(config, "config", "seed", lo=0)
  m, mem, data, t = config.model, config.memory, config.data, config.train
  check_number(m, "model", "vocab_size", lo=0)
  for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size",
              "max_position_embeddings", "type_vocab_size"):
    check_number(m, "model", key, lo=1)
  validate_dropouts(m, "model", ("hidden_dropout", "attention_dropout"))
  check_number(m, "model", "layer_norm_eps", lo=0, lo_open=True)
  check_choice(m, "model", "dtype", DTYPES)
  check_choice(m, "model", "param_dtype", DTYPES)
  check_choice(m, "model", "family", FAMILIES)
  for key in ("num_kv_heads", "head_dim", "sliding_window"):
    check_number(m, "model", key, lo=0)
  check_number(m, "model", "rope_theta", lo=0, lo_open=True)
  validate_rope_scaling(m.rope_scaling)
  if m.num_kv_heads and m.num_heads % m.num_kv_heads:
    raise ConfigError(f"model.num_kv_heads={m.num_kv_heads} must divide "
                      f"model.num_heads={m.num_heads}")
  if m.hidden_size % m.num_heads and not (m.family != "bert" and m.head_dim):
    raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by "
                      f"model.num_heads={m.num_heads}")
  validate_memory(mem, m)
  check_choice(data, "data", "source", DATA_SOURCES)
  if data.source == "prepared" and not data.path:
    raise ConfigError("data.source='prepared' needs data.path (a folder made by python -m "
                      "pkm_jax.data.prepare)")
  if data.eval_files and data.eval_path:
    raise ConfigError("set data.eval_files (text) or data.eval_path (a prepared folder), "
                      "not both")
  for key in ("workers", "prefetch"):
    check_number(data, "data", key, lo=0)
  check_number(data, "data", "max_len", lo=3)
  check_number(data, "data", "batch_size", lo=1)
  check_number(data, "data", "mask_prob", lo=0, hi=1, lo_open=True)
  check_number(data, "data", "eval_fraction", lo=0, hi=1, hi_open=True)
  causal = m.family != "bert"
  if not data.tokenizer:
    check_number(data, "data", "vocab_size", lo=MIN_BPE_VOCAB if causal else MIN_VOCAB)
  if causal and mem.mode != "none" and mem.query_norm == "batchnorm":
    # Allowed, as asked: training-mode BatchNorm normalises each query by statistics over the
    # whole batch, later tokens included, so every position sees the future through them (and
    # evaluation, with running statistics, then differs from training).
    logging.warning("memory.query_norm='batchnorm' in a causal LM (%s): the batch statistics "
                    "carry later tokens into every position while training", m.family)
  check_number(data.generated, "data.generated", "num_entities", lo=1)
  check_number(data.generated, "data.generated", "num_docs", lo=2)
  check_number(data.generated, "data.generated", "seed", lo=0)
  external_eval = data.source == "prepared" or data.eval_files or data.eval_path
  if data.eval_fraction == 0 and not (data.source == "tfds" and data.tfds_eval_split
                                      or external_eval):
    raise ConfigError(f"data.eval_fraction=0 leaves no held-out text for evaluation with "
                      f"data.source={data.source!r}; hold out a fraction > 0"
                      + (" or give data.tfds_eval_split" if data.source == "tfds" else ""))
  if data.max_len > m.max_position_embeddings:
    raise ConfigError(f"data.max_len={data.max_len} exceeds "
                      f"model.max_position_embeddings={m.max_position_embeddings}")
  if vocab_size is not None and m.vocab_size not in (0, vocab_size):
    raise ConfigError(f"model.vocab_size={m.vocab_size} disagrees with the tokenizer's "
                      f"vocabulary of {vocab_size}")
  validate_optim(config.optim)
  validate_run_lengths(t, ("steps", "log_every", "eval_every", "checkpoint_every"))
  for key in ("eval_batches", "memory_stats_every"):
    check_number(t, "train", key, lo=0)
  if data.batch_size % t.grad_accum_steps:
    raise ConfigError(f"train.grad_accum_steps={t.grad_accum_steps} must divide "
                      f"data.batch_size={data.batch_size}")
  for key in ("batches", "batch_size"):
    check_number(config.eval, "eval", key, lo=0)
  validate_mesh(config.mesh)
  validate_finetune(config.finetune, config.memory, config.optim)
  if not any(rule[0] == "batch" for rule in config.mesh.rules or ()):
    # The batch goes over both mesh axes (sharding.DEFAULT_RULES); a -1 size is known only
    # once the devices are (the program checks the whole split then).
    check_batch_split(config, max(config.mesh.data, 1) * max(config.mesh.model, 1))


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


def check_batch_split(config: ml_collections.ConfigDict, data_ways: int) -> None:
  """Each micro-batch must split evenly over the devices the batch is split over."""
  micro_batch = config.data.batch_size // config.train.grad_accum_steps
  if micro_batch % data_ways:
    raise ConfigError(f"data.batch_size={config.data.batch_size} / train.grad_accum_steps="
                      f"{config.train.grad_accum_steps} = {micro_batch} sequences per "
                      f"micro-batch do not split over the {data_ways} devices of the batch "
                      "axes (mesh.data x mesh.model)")


def query_norm_for(query_norm: str, family: str) -> str:
  """memory.query_norm with 'auto' resolved: 'batchnorm' for BERT, 'layernorm' for a causal LM."""
  if query_norm != "auto":
    return query_norm
  return "batchnorm" if family == "bert" else "layernorm"


def model_config(config: ml_collections.ConfigDict, *, vocab_size: int | None = None
                 ) -> ModelConfig:
  """The frozen ModelConfig for `config` (vocab size from the tokenizer when model's is 0)."""
  m, mem = config.model, config.memory
  vocab = m.vocab_size or vocab_size
  if not vocab:
    raise ConfigError("model.vocab_size is 0 and no tokenizer vocabulary size was given")
  memory = MemoryConfig(
      n_keys=mem.n_keys, heads=mem.heads, k=mem.k, k_dim=mem.k_dim,
      v_dim=mem.v_dim or m.hidden_size, query_norm=query_norm_for(mem.query_norm, m.family),
      input_dropout=mem.input_dropout, query_dropout=mem.query_dropout,
      value_dropout=mem.value_dropout, value_zero_init=mem.value_zero_init, kind=mem.kind,
      gate=mem.gate, share_values=bool(mem.share_values), key_norm=bool(mem.key_norm),
      peer_activation=mem.peer_activation, value_dtype=mem.value_dtype)
  return ModelConfig(
      vocab_size=vocab, hidden_size=m.hidden_size, num_layers=m.num_layers,
      num_heads=m.num_heads, intermediate_size=m.intermediate_size,
      max_position_embeddings=m.max_position_embeddings, type_vocab_size=m.type_vocab_size,
      hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
      layer_norm_eps=m.layer_norm_eps, memory_mode=mem.mode,
      memory_layers=tuple(mem.layers) if mem.mode != "none" else (),
      memory=memory, use_pooler=m.use_pooler, remat=m.remat, dtype=m.dtype,
      param_dtype=m.param_dtype, family=m.family, num_kv_heads=m.num_kv_heads,
      head_dim=m.head_dim, attention_bias=bool(m.attention_bias), qkv_bias=bool(m.qkv_bias),
      mlp_bias=bool(m.mlp_bias), tie_embeddings=bool(m.tie_embeddings),
      rope_theta=float(m.rope_theta),
      rope_scaling=tuple((str(k), v) for k, v in (m.rope_scaling or ())),
      sliding_window=m.sliding_window)
