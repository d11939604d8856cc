"""Quantised value tables: a memory model's row tables stored as int8 or float8_e4m3fn with one
float32 scale per row, for inference.

  python -m pkm_jax.quantize --model DIR --out OUT --dtype int8|fp8

DIR: a pkm-jax training workdir (its latest checkpoint, BatchNorm statistics included) or a
converted checkpoint. Every row table is quantised -- each layer's values, PEER's down vectors,
shared tables -- symmetrically per row: scale_i = max_j |row_ij| / qmax (127 for int8, 448 for
float8_e4m3fn), stored_ij = round(row_ij / scale_i) (int8: to nearest, clipped; fp8: the
dtype's own rounding). Everything else is copied as it is. OUT is a training workdir like any
other (config.json, model_config.json with memory.value_dtype 'int8' | 'float8_e4m3fn',
tokenizer.json, one checkpoint at DIR's step), written whole or not at all: eval.py --workdir
OUT, `pkm_jax.fill_mask --model OUT` and `pkm_jax.generate --model OUT` read it. The lookups
read the stored rows and fold the scales into the pick weights (`memory_kinds.pick_scales`);
training or fine-tuning from OUT is refused (`config_checks.check_trainable`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import flags
from flax import nnx

from pkm_jax import checkpoint as ckpt_lib
from pkm_jax import cli
from pkm_jax import config as config_lib
from pkm_jax import config_checks
from pkm_jax import converted
from pkm_jax import memory_kinds
from pkm_jax import pretrained as pretrained_lib
from pkm_jax import storage
from pkm_jax import architecture
from pkm_jax.architecture import ModelConfig
from pkm_jax.config import ConfigError
from pkm_jax.models.registry import build_lm
from pkm_jax.models.tables import row_tables, state_at
from pkm_jax.staged_dir import staged_dir

DTYPES = {"int8": "int8", "fp8": "float8_e4m3fn"}  # --dtype -> memory.value_dtype


def quantize_rows(table_NxD: np.ndarray, value_dtype: str) -> tuple[np.ndarray, np.ndarray]:
  """table [N, D] float -> (stored [N, D] int8 | float8_e4m3fn, scale [N] float32), symmetric
  per row: row ~= scale * stored. An all-zero row gets scale 0 (it reads as zeros)."""
  table = np.asarray(table_NxD, np.float32)
  qmax = memory_kinds.QMAX[value_dtype]
  scale_N = np.max(np.abs(table), axis=1) / qmax
  safe = np.where(scale_N > 0, scale_N, 1.0)[:, None]
  scaled = table / safe
  if value_dtype == "int8":
    stored = np.clip(np.rint(scaled), -127, 127).astype(np.int8)
  else:
    stored = np.asarray(jnp.asarray(np.clip(scaled, -qmax, qmax)).astype(jnp.float8_e4m3fn))
  return stored, scale_N.astype(np.float32)


def quantized_config(cfg: ModelConfig, value_dtype: str) -> ModelConfig:
  """`cfg` with its row tables stored as `value_dtype`."""
  return dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, value_dtype=value_dtype))


def quantize_params(cfg: ModelConfig, params: dict, value_dtype: str) -> dict:
  """A params pure dict of `cfg`'s model -> the quantised model's: each row table replaced by
  its stored rows, with '<name>_scale' beside it. `params` is not changed."""
  out = jax.tree.map(np.asarray, params)
  for path, name, _ in row_tables(cfg).values():
    *parent_path, leaf = path
    parent = out
    for p in parent_path:
      parent = parent[p]
    stored, scale = quantize_rows(parent[leaf], value_dtype)
    parent[leaf] = stored
    parent[leaf + memory_kinds.SCALE_SUFFIX] = scale
  return out


def _load(path: str) -> tuple[nnx.Module, Any, int, dict | None]:
  """(model, tokenizer, step, the run's config.json dict or None) of a workdir or converted
  checkpoint; one line when it is neither or cannot be read."""
  if pretrained_lib.is_workdir(path):
    model, tokenizer, step = ckpt_lib.restore_model(path)
    config_path = os.path.join(path, "config.json")
    saved = (ckpt_lib.read_json(config_path, "the run's settings")
             if storage.isfile(config_path) else None)
    return model, tokenizer, step, saved
  if pretrained_lib.is_converted_dir(path):
    cfg, params, tokenizer = converted.read_checkpoint(path)
    model = pretrained_lib.build_model(cfg, params, rngs=nnx.Rngs(0))
    return model, tokenizer, 0, None
  raise FileNotFoundError(f"--model {path} is neither a pkm-jax training workdir "
                          "(model_config.json + checkpoints/) nor a converted checkpoint "
                          "(model_config.json + params/)")


def _run_config(saved: dict | None, cfg: ModelConfig) -> dict:
  """OUT's config.json: DIR's (a workdir's) with the new value_dtype; for a converted
  checkpoint, base_config() with the model's sizes."""
  if saved is not None:
    config = config_lib.from_json_dict(config_lib.upgrade(saved), config_lib.base_config(),
                                       where="config.json")
  else:  # every model and memory key the ModelConfig has; data sized to the model
    config = config_lib.base_config()
    for group, source in ((config.model, cfg), (config.memory, cfg.memory)):
      for key in group.keys():
        if hasattr(source, key):
          group[key] = config_checks.as_tuples(getattr(source, key))
    config.memory.update(mode=cfg.memory_mode, layers=tuple(cfg.memory_layers))
    config.data.max_len = min(config.data.max_len, cfg.max_position_embeddings)
  config.memory.value_dtype = cfg.memory.value_dtype
  config.init.pretrained = ""
  return json.loads(config.to_json())


def quantize_model(model_dir: str, out: str, dtype: str) -> dict:
  """Writes DIR's model with quantised row tables to OUT (see the module docstring); returns a
  summary: {'out', 'dtype', 'step', 'table_bytes_before', 'table_bytes_after'}."""
  if dtype not in DTYPES:
    raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
  value_dtype = DTYPES[dtype]
  out = storage.absolute(out)
  if storage.exists(out):
    raise FileExistsError(f"--out {out} exists: choose a new folder")
  if not storage.isdir(model_dir):
    raise FileNotFoundError(f"--model {model_dir} not found")
  # The model's config first: a model that cannot be quantised is refused before any weights
  # are read. (Both layouts hold model_config.json.)
  cfg = ckpt_lib.read_model_config(model_dir)
  if not cfg.memory_layers:
    raise ValueError(f"--model {model_dir} has no memory layers: nothing to quantise")
  if memory_kinds.is_quantized(cfg.memory):
    raise ValueError(f"--model {model_dir} is already quantised "
                     f"(memory.value_dtype={cfg.memory.value_dtype!r})")
  model, tokenizer, step, saved = _load(model_dir)
  cfg = model.cfg
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  model_state = nnx.state(model, nnx.BatchStat)
  new_cfg = quantized_config(cfg, value_dtype)
  new_params = quantize_params(cfg, params, value_dtype)
  # The quantised model's own tree: every leaf must be given, with its shape and dtype.
  abstract = nnx.eval_shape(lambda: build_lm(new_cfg, rngs=nnx.Rngs(0)))
  target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  new_params = jax.tree.map(lambda t, x: jnp.asarray(x, t.dtype), target, new_params)
  # Saved as the State a training run saves (restore_model reads it back into that tree).
  param_state = nnx.state(abstract, nnx.Param)
  nnx.replace_by_pure_dict(param_state, new_params)
  before = sum(int(np.asarray(state_at(params, p)).nbytes) for p, _, _ in row_tables(cfg).values())
  after = sum(int(np.asarray(state_at(new_params, p)).nbytes)
              + int(np.asarray(state_at(new_params, p[:-1] + (p[-1] + memory_kinds.SCALE_SUFFIX,)
                                        )).nbytes)
              for p, _, _ in row_tables(cfg).values())
  with staged_dir(out) as tmp:
    ckpt_lib.write_json(os.path.join(tmp, "config.json"), _run_config(saved, new_cfg))
    ckpt_lib.write_json(os.path.join(tmp, "model_config.json"), architecture.to_dict(new_cfg))
    tokenizer.save(os.path.join(tmp, "tokenizer.json"))
    manager = ckpt_lib.make_manager(tmp)
    items = {"params": ocp.args.StandardSave(param_state)}
    if jax.tree.leaves(model_state):
      items["model_state"] = ocp.args.StandardSave(model_state)
    with ckpt_lib.sigint_deferred():
      manager.save(step, args=ocp.args.Composite(data=ocp.args.JsonSave({}), **items))
      manager.wait_until_finished()
    manager.close()
  return {"out": out, "dtype": value_dtype, "step": int(step),
          "table_bytes_before": before, "table_bytes_after": after}


def main(argv: list[str]) -> None:
  f = flags.FLAGS
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not f.model or not f.out:
    raise ValueError("--model DIR and --out OUT are required")
  print(json.dumps(quantize_model(f.model, f.out, f.dtype), sort_keys=True))


if __name__ == "__main__":
  # Defined here, not at import: other entry points importing this module define --model too.
  flags.DEFINE_string("model", None, "A training workdir or a converted checkpoint.")
  flags.DEFINE_string("out", None, "The new workdir (must not exist).")
  flags.DEFINE_string("dtype", "int8", "int8 | fp8 (float8_e4m3fn).")
  cli.run(main)
