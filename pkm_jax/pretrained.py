"""Pretrained dense BERT weights: the converted-checkpoint format, loading, and +Init.

Converted checkpoint layout (written by `python -m pkm_jax.convert` or `save_pretrained`):
  OUT/model_config.json   our ModelConfig (`pkm_jax.config.to_dict`)
  OUT/tokenizer.json      the tokenizer (+ vocab.txt, tokenizer_config.json,
                          special_tokens_map.json copied when the source had them)
  OUT/params/             orbax StandardCheckpointer of nnx.state(model, nnx.Param).to_pure_dict()
  OUT/conversion.json     {"format", "source", "architecture", "report"}
A folder is written under a temporary name beside OUT and renamed when complete, so OUT is
either absent, the previous contents, or the whole new checkpoint.

+Init (Kim & Jung 2020, SPEC.md §2): `init_from_pretrained` copies every pretrained tensor whose
path exists in the target model; memory parameters stay as initialised; with memory mode
'replace' the FFN weights of memory layers have no place and are dropped, with 'residual'
everything is kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx, traverse_util

from pkm_jax import config as config_lib
from pkm_jax import convert as convert_lib
from pkm_jax.bert import BertForMaskedLM
from pkm_jax.cli import one_line
from pkm_jax.config import ConfigError, ModelConfig

FORMAT = "pkm-jax-pretrained/1"
_TOKENIZER_EXTRAS = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
# Fields that fix parameter shapes or the function computed: source and target must agree.
SIZE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
               "max_position_embeddings", "type_vocab_size", "layer_norm_eps")

is_hf_folder = convert_lib.is_hf_folder


def is_converted_dir(path: str) -> bool:
  return (os.path.isfile(os.path.join(path, "model_config.json"))
          and os.path.isdir(os.path.join(path, "params")))


def is_workdir(path: str) -> bool:
  """A pkm-jax training workdir (pkm_jax.checkpoint's layout)."""
  return (os.path.isfile(os.path.join(path, "model_config.json"))
          and os.path.isdir(os.path.join(path, "checkpoints")))


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _write_tokenizer(tmp: str, tokenizer: Any, vocab_size: int) -> None:
  from pkm_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  if isinstance(tokenizer, (str, os.PathLike)):
    src_file = tok_lib.resolve_tokenizer_path(os.fspath(tokenizer))
    tok = tok_lib.load_tokenizer(src_file)
    if src_file.endswith(".json"):
      shutil.copyfile(src_file, os.path.join(tmp, "tokenizer.json"))  # byte-exact
    else:
      tok.save(os.path.join(tmp, "tokenizer.json"))
    src_dir = os.path.dirname(src_file)
    for name in _TOKENIZER_EXTRAS:
      if os.path.isfile(os.path.join(src_dir, name)):
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(tmp, name))
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
  out = os.path.abspath(out_dir)
  if os.path.exists(out):
    if not os.path.isdir(out):
      raise FileExistsError(f"--out {out} exists and is not a folder")
    if os.listdir(out) and not overwrite:
      raise FileExistsError(f"--out {out} exists and is not empty (pass --overwrite to "
                            f"replace it)")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
  try:
    _write_tokenizer(tmp, tokenizer, cfg.vocab_size)
    with open(os.path.join(tmp, "model_config.json"), "w") as f:
      json.dump(config_lib.to_dict(cfg), f, indent=2, sort_keys=True)
    with open(os.path.join(tmp, "conversion.json"), "w") as f:
      json.dump({"format": FORMAT, **(info or {})}, f, indent=2, sort_keys=True)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, "params"), jax.tree.map(jnp.asarray, params))
      ckptr.wait_until_finished()
    if os.path.exists(out):  # empty, or --overwrite: swap, then delete the old one
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
      os.rename(out, os.path.join(old, "x"))
      os.rename(tmp, out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def save_pretrained(out_dir: str, model: BertForMaskedLM, tokenizer: Any, *,
                    info: dict[str, Any] | None = None, overwrite: bool = False) -> str:
  """Saves a model's parameters in the converted-checkpoint layout (see module docstring)."""
  if jax.tree.leaves(nnx.state(model, nnx.BatchStat)):
    raise ValueError("save_pretrained stores parameters only, and this model has BatchNorm "
                     "statistics (memory query_norm='batchnorm'): keep its training checkpoint")
  params = nnx.state(model, nnx.Param).to_pure_dict()
  return write_checkpoint(out_dir, model.cfg, params, tokenizer, info=info, overwrite=overwrite)


def convert_to_dir(hf_dir: str, out_dir: str, *, overwrite: bool = False, seed: int = 0) -> str:
  """`python -m pkm_jax.convert`: HF folder -> converted checkpoint; prints a summary."""
  _require_tokenizer(hf_dir)
  converted = convert_lib.convert_hf(hf_dir, seed=seed)
  info = {"source": converted.report["source"],
          "architecture": converted.report["architecture"], "report": converted.report}
  out = write_checkpoint(out_dir, converted.cfg, converted.params, hf_dir, info=info,
                         overwrite=overwrite)
  for note in converted.report["notes"]:
    print(f"note: {note}")
  r = converted.report
  print(f"Converted {r['architecture']} ({r['num_params']:,} parameters, "
        f"{r['num_tensors']} tensors, MLM head {r['mlm_head']}) -> {out}")
  return out


def _require_tokenizer(hf_dir: str) -> None:
  """Fails before any weights are read: a converted model is useless without its tokenizer."""
  from pkm_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  tok_lib.resolve_tokenizer_path(hf_dir)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _abstract_params(cfg: ModelConfig) -> dict:
  return nnx.state(nnx.eval_shape(lambda: BertForMaskedLM(cfg, rngs=nnx.Rngs(0))),
                   nnx.Param).to_pure_dict()


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} could not be read: {one_line(e)}") from e


def load_pretrained(path: str) -> tuple[ModelConfig, dict, Any]:
  """(ModelConfig, params pure dict, tokenizers.Tokenizer) from a converted checkpoint, a
  Hugging Face folder (converted in memory) or a pkm-jax training workdir (latest step)."""
  from pkm_jax.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  if is_converted_dir(path):
    try:
      cfg = config_lib.from_dict(_read_json(os.path.join(path, "model_config.json")))
    except (TypeError, KeyError) as e:
      raise ValueError(f"{path}/model_config.json is not a pkm-jax ModelConfig: "
                       f"{one_line(e)}") from e
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          _abstract_params(cfg))
    params_dir = os.path.join(os.path.abspath(path), "params")
    try:
      with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(params_dir, target)
    except Exception as e:  # orbax raises many types; the user needs the path and the cause
      raise ValueError(f"{params_dir} could not be restored: "
                       f"{one_line(e)[:300]}") from e
    info_path = os.path.join(path, "conversion.json")
    info = _read_json(info_path) if os.path.isfile(info_path) else {}
    for note in info.get("report", {}).get("notes", []):
      logging.warning("%s: %s", path, note)
    return cfg, params, load_tokenizer(os.path.join(path, "tokenizer.json"))
  if is_workdir(path):
    from pkm_jax import checkpoint  # pylint: disable=g-import-not-at-top
    model, tokenizer = checkpoint.restore_model(path)
    return model.cfg, nnx.state(model, nnx.Param).to_pure_dict(), tokenizer
  if is_hf_folder(path):
    _require_tokenizer(path)
    converted = convert_lib.convert_hf(path)
    tokenizer = load_tokenizer(path)
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    if n > converted.cfg.vocab_size:
      raise ValueError(f"the tokenizer in {path} has {n} tokens but the model's vocabulary has "
                       f"only {converted.cfg.vocab_size} rows")
    for note in converted.report["notes"]:
      logging.warning("%s: %s", path, note)
    return converted.cfg, converted.params, tokenizer
  raise FileNotFoundError(
      f"{path} is neither a converted checkpoint (model_config.json + params/), a training "
      f"workdir (model_config.json + checkpoints/), nor a Hugging Face folder (config.json + "
      f"{' | '.join(convert_lib.WEIGHT_FILES)})")


def build_model(cfg: ModelConfig, params: dict, *, rngs: nnx.Rngs) -> BertForMaskedLM:
  """A BertForMaskedLM holding exactly `params` (every parameter must be given)."""
  model = BertForMaskedLM(cfg, rngs=rngs)
  report = init_from_pretrained(model, params, cfg)
  if report.new or report.dropped:
    missing = report.new[0] if report.new else None
    raise ValueError(f"params do not match the model: missing '{missing}'" if missing else
                     f"params do not match the model: unexpected '{report.dropped[0]}'")
  return model


# ---------------------------------------------------------------------------------------------
# +Init
# ---------------------------------------------------------------------------------------------


def _name(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def _group(name: str) -> str:
  """'bert.layers.3.ffn.output.kernel' -> 'bert.layers.3.ffn'; 'bert.pooler.dense.bias' ->
  'bert.pooler'."""
  parts = name.split(".")
  return ".".join(parts[:4] if parts[1:2] == ["layers"] else parts[:2])


@dataclasses.dataclass
class InitReport:
  """What +Init did: names of loaded / new (left as initialised) / dropped pretrained tensors."""

  loaded: list[str]
  new: list[str]
  dropped: list[str]
  loaded_params: int
  new_params: int
  dropped_params: int

  def summary(self) -> str:
    def groups(names):
      return ", ".join(dict.fromkeys(_group(n) for n in names)) or "-"
    return (f"loaded {len(self.loaded)} pretrained tensors ({self.loaded_params / 1e6:.2f}M "
            f"values); new {len(self.new)} ({self.new_params / 1e6:.2f}M: {groups(self.new)}); "
            f"dropped {len(self.dropped)} ({self.dropped_params / 1e6:.2f}M: "
            f"{groups(self.dropped)})")


def init_from_pretrained(model: BertForMaskedLM, pretrained_params: dict,
                         pretrained_cfg: ModelConfig) -> InitReport:
  """Copies every pretrained tensor whose path exists in `model` into it, in place.

  Tensors the model has no place for (the FFN of a 'replace' memory layer, a pooler the model
  lacks) are dropped; the model's other parameters (memory) keep their initial values.
  """
  target_cfg = model.cfg
  diffs = [f"{f} {getattr(target_cfg, f)} vs pretrained {getattr(pretrained_cfg, f)}"
           for f in SIZE_FIELDS
           if not np.isclose(getattr(target_cfg, f), getattr(pretrained_cfg, f), rtol=1e-6,
                             atol=0)]
  if diffs:
    raise ValueError(f"the model to initialise disagrees with the pretrained config: "
                     f"{'; '.join(diffs)}")
  state = nnx.state(model, nnx.Param)
  target = traverse_util.flatten_dict(state.to_pure_dict())
  source = traverse_util.flatten_dict(pretrained_params)
  merged, loaded, dropped = dict(target), [], []
  for path, x in source.items():
    if path not in target:
      dropped.append(path)
      continue
    if tuple(np.shape(x)) != tuple(target[path].shape):
      raise ValueError(f"pretrained tensor '{_name(path)}' has shape {tuple(np.shape(x))} but "
                       f"the model's is {tuple(target[path].shape)}")
    merged[path] = jnp.asarray(x, dtype=target[path].dtype)
    loaded.append(path)
  new = [p for p in target if p not in source]
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(merged))
  nnx.update(model, state)
  size = lambda paths, tree: int(sum(np.size(tree[p]) for p in paths))
  return InitReport(loaded=[_name(p) for p in loaded], new=[_name(p) for p in new],
                    dropped=[_name(p) for p in dropped], loaded_params=size(loaded, source),
                    new_params=size(new, target), dropped_params=size(dropped, source))


def resolve_model_config(config: ml_collections.ConfigDict,
                         pretrained_cfg: ModelConfig) -> ml_collections.ConfigDict:
  """A copy of `config` whose model sizes are the pretrained model's.

  "Explicitly set" means different from `base_config()`'s default (vocab_size: non-zero): such
  a value must equal the pretrained one, else ConfigError naming every conflicting key. So
  leave config.model sizes at their defaults (or set them to the pretrained values) when using
  init.from. use_pooler is on if either side has a pooler. data.tokenizer, when empty, becomes
  config.init.from: the pretrained token ids are only meaningful with its own tokenizer.
  """
  defaults = config_lib.base_config().model
  out = config.copy_and_resolve_references()
  conflicts = []
  for field in SIZE_FIELDS:
    user, pre = config.model[field], getattr(pretrained_cfg, field)
    if user != defaults[field] and not np.isclose(user, pre, rtol=1e-6, atol=0):
      conflicts.append(f"model.{field}={user} (pretrained: {pre})")
    out.model[field] = type(defaults[field])(pre)
  if conflicts:
    raise ConfigError(f"config conflicts with the pretrained model {config.init['from']!r}: "
                      f"{', '.join(conflicts)}; leave these at base_config() defaults to take "
                      f"the pretrained values")
  out.model.use_pooler = bool(config.model.use_pooler or pretrained_cfg.use_pooler)
  if not out.data.tokenizer and config.init["from"]:
    out.data.tokenizer = config.init["from"]
  return out
