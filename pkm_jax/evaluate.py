"""Held-out MLM evaluation: loss, perplexity, accuracy and per-layer memory usage (SPEC.md §3).

`evaluate_workdir` is what `eval.py` runs; `make_eval_step` / `run_eval` are shared with the
training loop's periodic evaluation so both report identical numbers.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from pkm_jax import checkpoint as ckpt_lib
from pkm_jax import metrics as metrics_lib
from pkm_jax.config import ModelConfig


def make_eval_step(graphdef: nnx.GraphDef, model_cfg: ModelConfig) -> Callable:
  """(params, model_state, batch) -> sums: nll/correct/count and per-layer slot totals."""
  n_slots = model_cfg.memory.n_slots

  def eval_step(params, model_state, batch):
    model = nnx.merge(graphdef, params, model_state)
    logits, aux = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    _, sums = metrics_lib.mlm_loss_and_metrics(logits, batch["mlm_labels"], batch["mlm_weights"])
    # Packed rows evaluated; the all-padding rows that fill the last batch do not count.
    sums["sequences"] = jnp.sum(jnp.any(batch["attention_mask"] > 0, axis=-1))
    usage = {layer: metrics_lib.slot_totals(a, batch["attention_mask"], n_slots)
             for layer, a in aux.items()}
    return sums, usage

  return eval_step


def run_eval(eval_step: Callable, params, model_state, batches: Iterable[dict],
             to_device: Callable[[dict], dict], model_cfg: ModelConfig) -> dict:
  """Sums over all batches on the host (float64), then the metrics of SPEC.md §3."""
  totals = {"nll_sum": 0.0, "correct": 0.0, "count": 0.0, "sequences": 0.0}
  usage = {layer: metrics_lib.MemoryUsage(model_cfg.memory.n_slots)
           for layer in model_cfg.memory_layers}
  for batch in batches:
    sums, batch_usage = eval_step(params, model_state, to_device(batch))
    for k in totals:
      totals[k] += float(sums[k])
    for layer, (c, w, t) in batch_usage.items():
      usage[layer].add(c, w, t)
  if totals["count"] == 0:
    raise ValueError("evaluation saw no masked tokens: the held-out split is empty")
  loss = totals["nll_sum"] / totals["count"]
  return {
      "mlm_loss": loss,
      "mlm_perplexity": math.exp(min(loss, 700.0)),
      "mlm_accuracy": totals["correct"] / totals["count"],
      "eval_tokens": int(totals["count"]),
      "eval_sequences": int(totals["sequences"]),
      "memory": {str(layer): u.stats() for layer, u in usage.items()},
  }


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str,
                     step: int | None = None) -> dict:
  """Restores DIR's checkpoint (latest by default), evaluates the held-out split, saves JSON."""
  from pkm_jax import data as data_lib  # pylint: disable=g-import-not-at-top

  model, tokenizer = ckpt_lib.restore_model(workdir, step)
  step = ckpt_lib.latest_step(workdir, step)
  model_cfg = model.cfg
  graphdef, params, model_state = nnx.split(model, nnx.Param, nnx.BatchStat)
  data_cfg = config.data
  if config.eval.batch_size:
    data_cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    data_cfg.batch_size = config.eval.batch_size
  make_eval_iter = data_lib.make_eval_data(data_cfg, tokenizer)
  eval_step = jax.jit(make_eval_step(graphdef, model_cfg))
  result = run_eval(eval_step, params, model_state,
                    make_eval_iter(config.eval.batches or None),
                    lambda b: jax.tree.map(jnp.asarray, b), model_cfg)
  result = {"step": int(step), **result}
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  ckpt_lib.write_json(os.path.join(workdir, "eval", "metrics.json"), result)
  return result


def usage_histogram(counts: np.ndarray) -> np.ndarray:
  """A slot-usage heat map [sqrt(N), sqrt(N)] (row = first sub-key), log-scaled to [0, 1]."""
  n = int(round(math.sqrt(counts.size)))
  grid = np.log1p(np.asarray(counts, np.float64).reshape(n, n))
  return grid / max(grid.max(), 1e-12)
