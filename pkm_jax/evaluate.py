"""Held-out evaluation: loss, perplexity, accuracy and per-layer memory usage -- masked-LM
(`mlm_*`) for BERT, next-token (`lm_*`, per predicted token) for the causal families.

`evaluate_workdir` is what `eval.py` runs on a pretraining workdir: it starts from the run's
saved config.json (command-line overrides on top), so a run is evaluated on the data it was
trained for unless told otherwise. `make_eval_step` / `run_eval` are shared with the training
loop's periodic evaluation, so both report identical numbers. The metrics (Kim & Jung 2020,
§4.1) are defined in `pkm_jax.metrics`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from pkm_jax import checkpoint as ckpt_lib
from pkm_jax import config as config_lib
from pkm_jax import config_checks
from pkm_jax import data as data_lib
from pkm_jax import metrics as metrics_lib
from pkm_jax import storage
from pkm_jax.architecture import ModelConfig
from pkm_jax.config import ConfigError


def make_eval_step(graphdef: nnx.GraphDef, model_cfg: ModelConfig) -> Callable:
  """(params, model_state, frozen, batch) -> sums: nll/correct/count and per-layer slot totals."""
  n_slots = model_cfg.memory.n_slots

  def eval_step(params, model_state, frozen, batch):
    model = nnx.merge(graphdef, params, frozen, model_state)
    if model_cfg.causal:
      logits, aux = model(batch["input_ids"], batch["attention_mask"],
                          positions_BxT=batch["positions"], segment_ids_BxT=batch["segment_ids"])
      labels, weights = batch["targets"], batch["target_weights"]
    else:
      logits, aux = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
      labels, weights = batch["mlm_labels"], batch["mlm_weights"]
    _, sums = metrics_lib.mlm_loss_and_metrics(logits, labels, weights)
    # Packed rows evaluated; the all-padding rows that fill the last batch do not count.
    sums["sequences"] = jnp.sum(jnp.any(batch["attention_mask"] > 0, axis=-1))
    usage = {layer: metrics_lib.slot_totals(a, batch["attention_mask"], n_slots)
             for layer, a in aux.items()}
    return sums, usage

  return eval_step


def run_eval(eval_step: Callable, states: tuple, batches: Iterable[dict],
             to_device: Callable[[dict], dict], model_cfg: ModelConfig) -> dict:
  """Sums over all batches on the host (float64), then the metrics. `states` are eval_step's
  leading arguments (params, model_state, frozen)."""
  totals = {"nll_sum": 0.0, "correct": 0.0, "count": 0.0, "sequences": 0.0}
  usage = {layer: metrics_lib.MemoryUsage(model_cfg.memory.n_slots)
           for layer in model_cfg.memory_layers}
  for batch in batches:
    sums, batch_usage = eval_step(*states, to_device(batch))
    for k in totals:
      totals[k] += float(sums[k])
    for layer, (c, w, t) in batch_usage.items():
      usage[layer].add(c, w, t)
  if totals["count"] == 0:
    raise ValueError("evaluation saw no predicted tokens: the held-out split is empty")
  loss = totals["nll_sum"] / totals["count"]
  name = "lm" if model_cfg.causal else "mlm"  # token perplexity of a causal LM: exp(mean NLL)
  return {
      f"{name}_loss": loss,
      f"{name}_perplexity": math.exp(min(loss, 700.0)),
      f"{name}_accuracy": totals["correct"] / totals["count"],
      "eval_tokens": int(totals["count"]),
      "eval_sequences": int(totals["sequences"]),
      "memory": {str(layer): u.stats() for layer, u in usage.items()},
  }


# Overrides that change the model, or the ids it reads, cannot apply to a trained run.
_FIXED_BY_THE_RUN = ("model.", "memory.", "data.tokenizer", "data.vocab_size", "data.lowercase")
_DROPOUTS = ("dropout",)  # not used in evaluation: any value is accepted


def run_config(workdir: str, overrides: dict[str, Any],
               fallback: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The run's saved config.json with command-line `overrides` ({'data.max_len': 32}) on top;
  `fallback` (the command line's config) for workdirs written without a config.json."""
  path = os.path.join(workdir, "config.json")
  if not storage.isfile(path):
    config = fallback
  else:
    saved = config_lib.upgrade(ckpt_lib.read_json(path, "the run's settings"))
    config = config_lib.from_json_dict(saved, config_lib.base_config(), where=path)
    for key, value in overrides.items():
      if key.startswith(_FIXED_BY_THE_RUN) and not any(d in key for d in _DROPOUTS):
        now = _get(config, key)
        if config_checks.as_tuples(value) != config_checks.as_tuples(now):
          raise ConfigError(f"--config.{key}={value!r} differs from the run's {now!r}: "
                            f"{workdir} holds that model; evaluate another run instead")
      _set(config, key, value)
  return config


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  for part in key.split("."):
    config = config[part]
  return config


def _set(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  *groups, last = key.split(".")
  for part in groups:
    config = config[part]
  config[last] = value


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str,
                     step: int | None = None) -> dict:
  """Restores DIR's checkpoint (latest by default), evaluates the held-out split, saves JSON.

  `config` is the run's (see `run_config`); the result names the step whose weights were used.
  """
  config_checks.validate_mesh(config.mesh, training=False)
  model, tokenizer, step = ckpt_lib.restore_model(workdir, step,
                                                  table_memory=config.mesh.table_memory)
  model_cfg = model.cfg
  if config.data.max_len > model_cfg.max_position_embeddings:
    raise ConfigError(f"data.max_len={config.data.max_len} exceeds the model's "
                      f"max_position_embeddings={model_cfg.max_position_embeddings}")
  graphdef, params, model_state = nnx.split(model, nnx.Param, nnx.BatchStat)
  data_cfg = config.data
  if config.eval.batch_size:
    data_cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    data_cfg.batch_size = config.eval.batch_size
  make_eval_iter = data_lib.make_eval_data(data_cfg, tokenizer, causal=model_cfg.causal)
  eval_step = jax.jit(make_eval_step(graphdef, model_cfg))
  result = run_eval(eval_step, (params, model_state, {}),
                    make_eval_iter(config.eval.batches or None),
                    lambda b: jax.tree.map(jnp.asarray, b), model_cfg)
  result = {"step": int(step), **result}
  storage.makedirs(os.path.join(workdir, "eval"))
  ckpt_lib.write_json(os.path.join(workdir, "eval", "metrics.json"), result)
  return result


def usage_histogram(counts: np.ndarray) -> np.ndarray:
  """A slot-usage heat map [sqrt(N), sqrt(N)] (row = first sub-key), log-scaled to [0, 1]."""
  n = int(round(math.sqrt(counts.size)))
  grid = np.log1p(np.asarray(counts, np.float64).reshape(n, n))
  return grid / max(grid.max(), 1e-12)
