"""The config schema (one ConfigDict tree) and the frozen dataclasses model code receives.

Every config file in `configs/` starts from `base_config()` and overrides values, so the set of
keys is defined here once; `validate()` rejects anything else before any work starts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

MEMORY_MODES = ("none", "replace", "residual")
QUERY_NORMS = ("batchnorm", "layernorm", "none")
DECAYS = ("linear", "cosine", "constant")


class ConfigError(ValueError):
  """A config that cannot run; the message is one line naming the key."""


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
  """Product-key memory hyper-parameters (Lample et al. 2019; SPEC.md §1)."""

  n_keys: int = 512  # sub-keys per half: n_keys**2 slots
  heads: int = 4
  k: int = 32  # picks per head
  k_dim: int = 256  # query / product-key dimension (two halves of k_dim // 2)
  v_dim: int = 768  # value dimension (= hidden size in BERT)
  query_norm: str = "batchnorm"
  input_dropout: float = 0.0
  query_dropout: float = 0.0
  value_dropout: float = 0.0
  value_zero_init: bool = False  # ResM then starts as exactly the dense model (+Init)

  @property
  def n_slots(self) -> int:
    return self.n_keys**2


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """BERT sizes plus where and how memory enters it (Kim & Jung 2020; SPEC.md §2)."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  layer_norm_eps: float = 1e-12
  memory_mode: str = "none"  # 'replace' = PKM, 'residual' = ResM
  memory_layers: tuple[int, ...] = ()
  memory: MemoryConfig = MemoryConfig()
  use_pooler: bool = False
  remat: bool = False  # recompute each encoder layer in the backward pass (less activation memory)
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"

  def has_memory(self, layer: int) -> bool:
    return self.memory_mode != "none" and layer in self.memory_layers

  def has_ffn(self, layer: int) -> bool:
    return not (self.memory_mode == "replace" and layer in self.memory_layers)


def base_config() -> ml_collections.ConfigDict:
  """All keys a config may have, with BERT-base sizes and the paper's memory settings."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=0,  # 0: taken from the tokenizer
      hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
      max_position_embeddings=512, type_vocab_size=2,
      hidden_dropout=0.1, attention_dropout=0.1, layer_norm_eps=1e-12,
      use_pooler=False, remat=False, dtype="float32", param_dtype="float32"))

  c.memory = ml_collections.ConfigDict(dict(
      mode="none", layers=(3, 7),  # "4L/8L" of the paper's tables, 0-based
      n_keys=512, heads=4, k=32, k_dim=256, v_dim=0,  # v_dim 0: hidden size
      query_norm="batchnorm", input_dropout=0.0, query_dropout=0.0, value_dropout=0.0,
      value_zero_init=False))

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

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-4, warmup_steps=10000, decay="linear", end_lr_factor=0.0,
      weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-6, grad_clip=1.0,
      # Memory value tables: their own Adam (XLM: lr 1e-3, constant, no decay); 'sparse_adam'
      # updates only the rows a step reads. (Not "optim.values": ConfigDict.values() is a method.)
      values_optimizer="adam", values_lr=1e-3, values_weight_decay=0.0))

  c.train = ml_collections.ConfigDict(dict(
      steps=1_000_000, log_every=100, eval_every=10_000, checkpoint_every=10_000,
      keep_checkpoints=3, eval_batches=50, memory_stats_every=1000,
      grad_accum_steps=1))  # the batch is split into this many sequential micro-batches

  # mesh.rules: (logical axis, mesh axes) pairs tried before pkm_jax.sharding.DEFAULT_RULES,
  # e.g. (("slots", ("model", "data")),) splits the value tables over every device (FSDP-style).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1, rules=()))
  c.eval = ml_collections.ConfigDict(dict(batches=0, batch_size=0))  # 0: whole split, train size
  c.init = ml_collections.ConfigDict({"from": ""})  # +Init: a pretrained checkpoint or HF folder
  return c


def _check_keys(cfg: ml_collections.ConfigDict, ref: ml_collections.ConfigDict, path: str) -> None:
  for key in cfg.keys():
    where = f"{path}.{key}" if path else key
    if key not in ref:
      raise ConfigError(f"unknown config key '{where}'")
    if isinstance(ref[key], ml_collections.ConfigDict):
      if not isinstance(cfg[key], ml_collections.ConfigDict):
        raise ConfigError(f"config key '{where}' must be a group, got {cfg[key]!r}")
      _check_keys(cfg[key], ref[key], where)


def validate(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> None:
  """Raises ConfigError (one line) for anything that would fail later in a run."""
  _check_keys(config, base_config(), "")
  m, mem = config.model, config.memory
  if m.hidden_size % m.num_heads:
    raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by "
                      f"model.num_heads={m.num_heads}")
  if mem.mode not in MEMORY_MODES:
    raise ConfigError(f"memory.mode={mem.mode!r} is not one of {MEMORY_MODES}")
  if mem.query_norm not in QUERY_NORMS:
    raise ConfigError(f"memory.query_norm={mem.query_norm!r} is not one of {QUERY_NORMS}")
  if mem.mode != "none":
    if not mem.layers:
      raise ConfigError(f"memory.mode={mem.mode!r} needs at least one index in memory.layers")
    for layer in mem.layers:
      if not 0 <= layer < m.num_layers:
        raise ConfigError(f"memory.layers has {layer}, out of range for model.num_layers="
                          f"{m.num_layers} (indices are 0-based)")
    if len(set(mem.layers)) != len(mem.layers):
      raise ConfigError(f"memory.layers={list(mem.layers)} has duplicates")
    if mem.k_dim % 2:
      raise ConfigError(f"memory.k_dim={mem.k_dim} must be even (two sub-key halves)")
    if not 0 < mem.k <= mem.n_keys:
      raise ConfigError(f"memory.k={mem.k} must be in 1..memory.n_keys={mem.n_keys}")
    if mem.v_dim not in (0, m.hidden_size):
      raise ConfigError(f"memory.v_dim={mem.v_dim} must equal model.hidden_size="
                        f"{m.hidden_size} (or 0): memory output is added to the residual")
  _check_data(config.data)
  if config.data.max_len > m.max_position_embeddings:
    raise ConfigError(f"data.max_len={config.data.max_len} exceeds "
                      f"model.max_position_embeddings={m.max_position_embeddings}")
  if vocab_size is not None and m.vocab_size not in (0, vocab_size):
    raise ConfigError(f"model.vocab_size={m.vocab_size} disagrees with the tokenizer's "
                      f"vocabulary of {vocab_size}")
  if config.optim.values_optimizer not in ("adam", "sparse_adam"):
    raise ConfigError(f"optim.values_optimizer={config.optim.values_optimizer!r} is not 'adam' "
                      "or 'sparse_adam'")
  accum = config.train.grad_accum_steps
  if accum < 1 or config.data.batch_size % accum:
    raise ConfigError(f"train.grad_accum_steps={accum} must be >= 1 and divide "
                      f"data.batch_size={config.data.batch_size}")
  if config.train.steps <= 0:
    raise ConfigError(f"train.steps={config.train.steps} must be positive")
  for key in ("log_every", "eval_every", "checkpoint_every"):
    if config.train[key] <= 0:
      raise ConfigError(f"train.{key}={config.train[key]} must be positive")
  if config.train.memory_stats_every < 0:
    raise ConfigError(f"train.memory_stats_every={config.train.memory_stats_every} must be >= 0 "
                      "(0: off)")
  o = config.optim
  for key in ("lr", "values_lr"):
    if not o[key] >= 0:  # also catches NaN
      raise ConfigError(f"optim.{key}={o[key]} must be a number >= 0")
  if o.decay not in DECAYS:
    raise ConfigError(f"optim.decay={o.decay!r} is not one of {DECAYS}")
  _check_mesh(config)


def _check_data(data: ml_collections.ConfigDict) -> None:
  """The data keys that can be checked without reading any data."""
  sources = ("generated", "files", "tfds", "prepared")
  if data.source not in sources:
    raise ConfigError(f"data.source={data.source!r} is not one of {sources}")
  if data.source == "prepared" and not data.path:
    raise ConfigError("data.source='prepared' needs data.path (a folder made by python -m "
                      "pkm_jax.data.prepare)")
  if data.eval_files and data.eval_path:
    raise ConfigError("set data.eval_files (text) or data.eval_path (a prepared folder), "
                      "not both")
  for key in ("workers", "prefetch"):
    if data[key] < 0:
      raise ConfigError(f"data.{key}={data[key]} must be >= 0")


def _check_mesh(config: ml_collections.ConfigDict) -> None:
  """Mesh sizes and rules that can be checked without devices (the trainer checks the rest)."""
  from pkm_jax import sharding  # pylint: disable=g-import-not-at-top

  mesh = config.mesh
  for key in ("data", "model"):
    if mesh[key] == 0 or mesh[key] < -1:
      raise ConfigError(f"mesh.{key}={mesh[key]} must be positive or -1 (all remaining devices)")
  for rule in mesh.rules or ():
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ConfigError(f"mesh.rules entry {rule!r} is not a (logical axis, mesh axes) pair")
    unknown = [a for a in sharding.axes_tuple(rule[1]) if a not in sharding.MESH_AXES]
    if unknown:
      raise ConfigError(f"mesh.rules maps {rule[0]!r} to unknown mesh axes {unknown}; the mesh "
                        f"axes are {sharding.MESH_AXES}")
  if mesh.data > 0 and not any(rule[0] == "batch" for rule in mesh.rules or ()):
    check_batch_split(config, mesh.data)


def check_batch_split(config: ml_collections.ConfigDict, data_ways: int) -> None:
  """Each micro-batch must split evenly over the devices the batch is split over."""
  micro_batch = config.data.batch_size // config.train.grad_accum_steps
  if micro_batch % data_ways:
    raise ConfigError(f"data.batch_size={config.data.batch_size} / train.grad_accum_steps="
                      f"{config.train.grad_accum_steps} = {micro_batch} sequences per "
                      f"micro-batch do not split over the {data_ways} devices of the batch "
                      "axes (mesh.data)")


def model_config(config: ml_collections.ConfigDict, *, vocab_size: int | None = None
                 ) -> ModelConfig:
  """The frozen ModelConfig for `config` (vocab size from the tokenizer when model's is 0)."""
  m, mem = config.model, config.memory
  vocab = m.vocab_size or vocab_size
  if not vocab:
    raise ConfigError("model.vocab_size is 0 and no tokenizer vocabulary size was given")
  memory = MemoryConfig(
      n_keys=mem.n_keys, heads=mem.heads, k=mem.k, k_dim=mem.k_dim,
      v_dim=mem.v_dim or m.hidden_size, query_norm=mem.query_norm,
      input_dropout=mem.input_dropout, query_dropout=mem.query_dropout,
      value_dropout=mem.value_dropout, value_zero_init=mem.value_zero_init)
  return ModelConfig(
      vocab_size=vocab, hidden_size=m.hidden_size, num_layers=m.num_layers,
      num_heads=m.num_heads, intermediate_size=m.intermediate_size,
      max_position_embeddings=m.max_position_embeddings, type_vocab_size=m.type_vocab_size,
      hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
      layer_norm_eps=m.layer_norm_eps, memory_mode=mem.mode,
      memory_layers=tuple(mem.layers) if mem.mode != "none" else (),
      memory=memory, use_pooler=m.use_pooler, remat=m.remat, dtype=m.dtype,
      param_dtype=m.param_dtype)


def to_dict(cfg: Any) -> dict:
  """A ModelConfig as plain JSON-able data (saved beside checkpoints)."""
  return dataclasses.asdict(cfg)


# Mesh placement that model_config.json files written before placement left the model config
# (pkm_jax.placement) still carry; it says nothing about the model, so it is dropped on reading.
_PLACEMENT_KEYS = ("lookup", "slot_axes", "token_axes")


def from_dict(d: dict) -> ModelConfig:
  """A ModelConfig from `to_dict`'s data (also from files of earlier versions)."""
  d = dict(d)
  d["memory"] = {k: v for k, v in d["memory"].items() if k not in _PLACEMENT_KEYS}
  d["memory"] = MemoryConfig(**d["memory"])
  d["memory_layers"] = tuple(d["memory_layers"])
  return ModelConfig(**d)
