"""The fine-tuning methods of continued training (`finetune.method`): their config rules, checks
and the data sparse_memory ranks slots against.

  full           every parameter trains (optim.freeze_memory may still freeze the memory)
  lora           rank-r adapters on the attention and FFN projections (continual.lora); the
                 base, memory included, frozen; saved and evaluated merged
  memory         every memory row table trains (values; PEER's down vectors too) with the value
                 optimizer; everything else -- query BatchNorm statistics included -- frozen
  sparse_memory  as memory, but each step writes only the top-t slots of each table by TF-IDF
                 (continual.slot_selection); needs optim.values_optimizer='sparse_adam'

A fine-tuning run is `train.py` with init.pretrained set: with memory.mode left at 'none' and a
pretrained model that has memory layers, the memory config is the pretrained one (`resolve`).
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np

from pkm_jax import checkpoint as ckpt_lib
from pkm_jax import config as config_lib
from pkm_jax import data as data_lib
from pkm_jax import storage
from pkm_jax.pretrained import is_workdir
from pkm_jax.architecture import MemoryConfig, ModelConfig
from pkm_jax.config import ConfigError
from pkm_jax.continual.freezing import MEMORY_METHODS

_MEMORY_FIELDS = tuple(f for f in MemoryConfig.__dataclass_fields__)


def resolve(config: ml_collections.ConfigDict, pretrained_cfg: ModelConfig
            ) -> ml_collections.ConfigDict:
  """`config` with the pretrained model's memory (mode, layers and every memory.* key) when
  config.memory.mode is 'none' and the pretrained model has memory layers: continued training
  keeps the model it starts from. Otherwise `config` as it is."""
  if config.memory.mode != "none" or pretrained_cfg.memory_mode == "none":
    return config
  out = config.copy_and_resolve_references()
  out.memory.mode = pretrained_cfg.memory_mode
  out.memory.layers = tuple(pretrained_cfg.memory_layers)
  for field in _MEMORY_FIELDS:
    if field in out.memory:
      out.memory[field] = getattr(pretrained_cfg.memory, field)
  return out


def check_model(config: ml_collections.ConfigDict, model_cfg: ModelConfig) -> None:
  """ConfigError (one line) when finetune.method cannot run on the model."""
  f = config.finetune
  if f.method in MEMORY_METHODS:
    if not model_cfg.memory_layers:
      raise ConfigError(f"finetune.method={f.method!r} trains memory slots, but the model has "
                        "no memory layer (memory.mode='none'"
                        + (f" and init.pretrained={config.init.pretrained!r} has none"
                           if config.init.pretrained else "") + ")")
    if f.method == "sparse_memory" and f.top_t > model_cfg.memory.n_slots:
      raise ConfigError(f"finetune.top_t={f.top_t} exceeds the memory's "
                        f"{model_cfg.memory.n_slots} slots")
  if f.method != "full" and not config.init.pretrained:
    raise ConfigError(f"finetune.method={f.method!r} continues training a pretrained model: "
                      "set init.pretrained (a workdir, converted checkpoint or HF folder)")


def background_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `data` group the background sample is read with: finetune.background_files, else the
  pretrained workdir's own data (its config.json), with the fine-tuning run's tokenizer and
  batch shape. ConfigError when there is neither."""
  f, pre = config.finetune, config.init.pretrained
  data = config.data.copy_and_resolve_references()
  if f.background_files:
    data.source, data.files = "files", f.background_files
  elif pre and is_workdir(pre) and storage.isfile(os.path.join(pre, "config.json")):
    saved = config_lib.upgrade(ckpt_lib.read_json(os.path.join(pre, "config.json"),
                                                  "the pretrained run's settings"))
    pre_cfg = config_lib.from_json_dict(saved, config_lib.base_config(),
                                        where=os.path.join(pre, "config.json"))
    data = pre_cfg.data
    for key in ("tokenizer", "vocab_size", "lowercase", "batch_size", "max_len", "mask_prob"):
      data[key] = config.data[key]
  else:
    raise ConfigError(f"finetune.method='sparse_memory' needs finetune.background_files: "
                      f"init.pretrained={pre!r} is not a pkm-jax training workdir, so there is "
                      "no pretraining data to sample for the idf")
  data.eval_files, data.eval_path, data.workers = "", "", 0
  return data


def background_batches(config: ml_collections.ConfigDict, tokenizer: Any, causal: bool
                       ) -> list[dict]:
  """finetune.background_batches global batches of background text (numpy, this process's
  rows), as the fine-tuning step would see them (same batch size, length and masking)."""
  data = background_data_config(config)
  try:
    it, _ = data_lib.make_mlm_data(data, tokenizer, seed=config.seed,
                                   shard_index=jax.process_index(),
                                   shard_count=jax.process_count(), causal=causal)
  except ValueError as e:  # e.g. files with no text: one line naming the sample
    raise ValueError(f"the background sample (finetune.background_files={data.files!r}) "
                     f"cannot be read: {e}") from e
  return [next(it) for _ in range(config.finetune.background_batches)]


def epoch_batches(train_iter: Any) -> Iterator[dict]:
  """One pass over the training split's rows (refresh='epoch': what tf counts), as this
  process's rows of ceil(rows / batch) global batches of the run's iterator."""
  steps = epoch_steps(train_iter)
  per_host = train_iter.batch_size // jax.process_count()
  lo = jax.process_index() * per_host
  for step in range(steps):
    batch = train_iter.global_batch(step)
    yield {k: np.asarray(v)[lo:lo + per_host] for k, v in batch.items()}


def epoch_steps(train_iter: Any) -> int:
  """Steps one pass over the training split takes (refresh='epoch' recounts after each)."""
  return math.ceil(len(train_iter.source) / train_iter.batch_size)
