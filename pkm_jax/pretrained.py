"""Pretrained weights from any of the places users keep them: a converted checkpoint
(`converted.py`), a Hugging Face folder (converted in memory by `convert.py`) or a pkm-jax
training workdir (its latest checkpoint).
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
from flax import nnx

from pkm_jax import checkpoint as ckpt_lib
from pkm_jax import convert as convert_lib
from pkm_jax import converted, hf_files
from pkm_jax import storage
from pkm_jax.architecture import ModelConfig
from pkm_jax.models.registry import build_lm
from pkm_jax.data.tokenizer import load_tokenizer, resolve_tokenizer_path
from pkm_jax.plus_init import init_from_pretrained

is_hf_folder = hf_files.is_hf_folder
is_converted_dir = converted.is_converted_dir


def is_workdir(path: str) -> bool:
  """A pkm-jax training workdir (pkm_jax.checkpoint's layout)."""
  return (storage.isfile(os.path.join(path, "model_config.json"))
          and storage.isdir(os.path.join(path, "checkpoints")))


def load_pretrained(path: str) -> tuple[ModelConfig, dict, Any]:
  """(ModelConfig, params pure dict, tokenizers.Tokenizer) from a converted checkpoint, a
  Hugging Face folder (converted in memory) or a pkm-jax training workdir (latest step)."""
  if is_converted_dir(path):
    return converted.read_checkpoint(path)
  if is_workdir(path):  # parameters and BatchNorm statistics (init_from_pretrained loads both)
    model, tokenizer, _ = ckpt_lib.restore_model(path)
    return (model.cfg, nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))),
            tokenizer)
  if is_hf_folder(path):
    resolve_tokenizer_path(path)  # fails before any weights are read
    hf = convert_lib.convert_hf(path)
    tokenizer = load_tokenizer(path)
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    if n > hf.cfg.vocab_size:
      raise ValueError(f"the tokenizer in {path} has {n} tokens but the model's vocabulary has "
                       f"only {hf.cfg.vocab_size} rows")
    for note in hf.report["notes"]:
      logging.warning("%s: %s", path, note)
    return hf.cfg, hf.params, tokenizer
  raise FileNotFoundError(
      f"{path} is neither a converted checkpoint (model_config.json + params/), a training "
      f"workdir (model_config.json + checkpoints/), nor a Hugging Face folder (config.json + "
      f"{' | '.join(hf_files.WEIGHT_FILES)})")


def build_model(cfg: ModelConfig, params: dict, *, rngs: nnx.Rngs) -> nnx.Module:
  """The family's language model (`registry.build_lm`) holding exactly `params` (every parameter must be given)."""
  model = build_lm(cfg, rngs=rngs)
  report = init_from_pretrained(model, params, cfg)
  if report.new or report.dropped:
    missing = report.new[0] if report.new else None
    raise ValueError(f"params do not match the model: missing '{missing}'" if missing else
                     f"params do not match the model: unexpected '{report.dropped[0]}'")
  return model




def load_model(path: str) -> tuple[nnx.Module, Any]:
  """(model, tokenizer) from a training workdir (its latest checkpoint, BatchNorm statistics
  included), a converted checkpoint or a Hugging Face folder."""
  if is_workdir(path):
    model, tokenizer, _ = ckpt_lib.restore_model(path)
    return model, tokenizer
  cfg, params, tokenizer = load_pretrained(path)
  return build_model(cfg, params, rngs=nnx.Rngs(0)), tokenizer
