"""The converted-checkpoint format: a pretrained model's parameters, config and tokenizer.

Layout (written by `python -m pkm_jax.convert` or `save_pretrained`):
  OUT/model_config.json   our ModelConfig (`pkm_jax.config.to_dict`)
  OUT/tokenizer.json      the tokenizer, byte for byte (+ vocab.txt, tokenizer_config.json,
                          special_tokens_map.json, generation_config.json copied when the
                          source had them)
  OUT/params/             orbax StandardCheckpointer of nnx.to_pure_dict(nnx.state(model, nnx.Param))
  OUT/conversion.json     {"format", "source", "architecture", "report"}
  OUT/checksums.sha256    every file's SHA-256 (`checksums`), checked before a restore
A folder is written under a temporary name beside OUT and renamed when complete, so OUT is
either absent, the previous contents, or the whole new checkpoint. OUT may be gs:// (any
etils.epath URL): it is then written locally and uploaded, model_config.json and the checksums
last (`staged_dir`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from pkm_jax import architecture
from pkm_jax import checkpoint as ckpt_lib
from pkm_jax import checksums
from pkm_jax import storage
from pkm_jax.architecture import ModelConfig
from pkm_jax.models.registry import build_lm
from pkm_jax.data import tokenizer as tok_lib
from pkm_jax.staged_dir import staged_dir

FORMAT = "pkm-jax-pretrained/1"
# generation_config.json: a causal LM's bos / eos / pad ids (data.tokenizer.causal_special_ids).
_TOKENIZER_EXTRAS = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                     "generation_config.json")


def is_converted_dir(path: str) -> bool:
  return (storage.isfile(os.path.join(path, "model_config.json"))
          and storage.isdir(os.path.join(path, "params")))


def _write_tokenizer(tmp: str, tokenizer: Any, vocab_size: int) -> None:
  if isinstance(tokenizer, (str, os.PathLike)):
    src_file = tok_lib.resolve_tokenizer_path(os.fspath(tokenizer))
    tok = tok_lib.load_tokenizer(src_file)
    if src_file.endswith(".json"):
      storage.download(src_file, os.path.join(tmp, "tokenizer.json"))  # byte-exact
    else:
      tok.save(os.path.join(tmp, "tokenizer.json"))
    src_dir = os.path.dirname(src_file)
    for name in _TOKENIZER_EXTRAS:
      if storage.isfile(os.path.join(src_dir, name)):
        storage.download(os.path.join(src_dir, name), os.path.join(tmp, name))
  else:
    tok = tokenizer
    tok.save(os.path.join(tmp, "tokenizer.json"))
  n = tok.get_vocab_size(with_added_tokens=True)
  if n > vocab_size:
    raise ValueError(f"the tokenizer has {n} tokens but the model's vocabulary has only "
                     f"{vocab_size} rows")


def write_checkpoint(out_dir: str, cfg: ModelConfig, params: dict, tokenizer: Any, *,
                     info: dict[str, Any] | None = None, overwrite: bool = False) -> str:
  """Writes the converted-checkpoint layout atomically; returns the absolute OUT path.

  `tokenizer`: a tokenizers.Tokenizer, or a path to a tokenizer file / a folder holding one.
  """
  out = storage.absolute(out_dir)
  storage.check_bucket(out)
  if storage.exists(out):
    if not storage.isdir(out):
      raise FileExistsError(f"--out {out} exists and is not a folder")
    if storage.listdir(out) and not overwrite:
      raise FileExistsError(f"--out {out} exists and is not empty (pass --overwrite to "
                            f"replace it)")
  with staged_dir(out, last=("model_config.json", checksums.MANIFEST)) as tmp:
    _write_tokenizer(tmp, tokenizer, cfg.vocab_size)
    with open(os.path.join(tmp, "model_config.json"), "w") as f:
      json.dump(architecture.to_dict(cfg), f, indent=2, sort_keys=True)
    with open(os.path.join(tmp, "conversion.json"), "w") as f:
      json.dump({"format": FORMAT, **(info or {})}, f, indent=2, sort_keys=True)
    with ckpt_lib.sigint_deferred(), ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, "params"), jax.tree.map(jnp.asarray, params))
      ckptr.wait_until_finished()
    checksums.write(tmp)
  return out


def save_pretrained(out_dir: str, model: nnx.Module, tokenizer: Any, *,
                    info: dict[str, Any] | None = None, overwrite: bool = False) -> str:
  """Saves a model's parameters in the converted-checkpoint layout (see module docstring)."""
  if jax.tree.leaves(nnx.state(model, nnx.BatchStat)):
    raise ValueError("save_pretrained stores parameters only, and this model has BatchNorm "
                     "statistics (memory query_norm='batchnorm'): keep its training checkpoint")
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return write_checkpoint(out_dir, model.cfg, params, tokenizer, info=info, overwrite=overwrite)


def _abstract_params(cfg: ModelConfig) -> dict:
  model = nnx.eval_shape(lambda: build_lm(cfg, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def read_checkpoint(path: str) -> tuple[ModelConfig, dict, Any]:
  """(ModelConfig, params pure dict, tokenizers.Tokenizer) of a converted checkpoint."""
  what = f"{path} is not a complete converted checkpoint"
  verified = ckpt_lib.verify_files(storage.absolute(path), f"converted checkpoint {path}",
                                   "convert it again")
  try:
    cfg = architecture.from_dict(ckpt_lib.read_json(os.path.join(path, "model_config.json"), what))
  except (TypeError, KeyError, AttributeError) as e:
    raise ValueError(f"{path}/model_config.json is not a pkm-jax ModelConfig: "
                     f"{type(e).__name__}: {e}") from e
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        _abstract_params(cfg))
  params_dir = os.path.join(storage.absolute(path), "params")
  ckpt_lib.ignore_closed_event_loop()
  try:
    with ckpt_lib.sigint_deferred(), ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(params_dir, target)
  except Exception as e:  # orbax raises many types; the user needs the path and the cause
    raise ValueError(f"{params_dir} could not be restored (corrupt or from another model"
                     f"{'' if verified else '; it has no checksums'}): "
                     f"{ckpt_lib.orbax_cause(e)}; convert it again") from e
  if not verified:
    checksums.warn_unverified(storage.absolute(path), "converted")
  info_path = os.path.join(path, "conversion.json")
  info = ckpt_lib.read_json(info_path, what) if storage.isfile(info_path) else {}
  for note in info.get("report", {}).get("notes", []):
    logging.warning("%s: %s", path, note)
  return cfg, params, tok_lib.load_tokenizer(os.path.join(path, "tokenizer.json"))
