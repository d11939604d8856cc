"""The model a task trains: a head on the pretrained encoder, its initialisation from the
pretrained weights, its loss, and restoring it from a fine-tuning run.

Under optim.freeze_memory the memory's parameters and BatchNorm statistics are split off before
differentiation (no gradients, no Adam moments) and stay bit-identical.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx, traverse_util

from pkm_jax import architecture
from pkm_jax import checkpoint as ckpt_lib
from pkm_jax import config_checks
from pkm_jax import pretrained as pretrained_lib
from pkm_jax.architecture import ModelConfig
from pkm_jax.continual import freezing
from pkm_jax.placement import SINGLE_DEVICE, MemoryPlacement
from pkm_jax.plus_init import init_from_pretrained
from pkm_jax.steps import LossFn
from pkm_jax.tasks import heads


@dataclasses.dataclass
class Pretrained:
  cfg: ModelConfig
  params: dict  # BertForMaskedLM's param tree (pure dict)
  batch_stats: dict  # its BatchNorm statistics ({} when the source has none)
  tokenizer: Any
  source: str  # e.g. 'pretraining workdir step 1000'


def load_init(path: str) -> Pretrained:
  """A pretraining workdir (latest step, BatchNorm statistics included), a converted checkpoint
  or a Hugging Face folder."""
  if pretrained_lib.is_workdir(path):
    # Quantised tables (pkm_jax.quantize) are not fine-tuned: refused before any weights load.
    config_checks.check_trainable(ckpt_lib.read_model_config(path).memory.value_dtype, path)
    model, tokenizer, step = ckpt_lib.restore_model(path)
    return Pretrained(model.cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                      nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), tokenizer,
                      f"pretraining workdir step {step}")
  cfg, params, tokenizer = pretrained_lib.load_pretrained(path)
  config_checks.check_trainable(cfg.memory.value_dtype, path)
  return Pretrained(cfg, params, {}, tokenizer, "converted/HF checkpoint")


def task_model_config(src: ModelConfig, config: ml_collections.ConfigDict, kind: str
                      ) -> ModelConfig:
  """The pretrained config with the run's dropout overrides; a pooler for sentence tasks."""
  pick = lambda group, key, old: old if group[key] < 0 else float(group[key])  # noqa: E731
  mem = config.memory
  memory = dataclasses.replace(
      src.memory, input_dropout=pick(mem, "input_dropout", src.memory.input_dropout),
      query_dropout=pick(mem, "query_dropout", src.memory.query_dropout),
      value_dropout=pick(mem, "value_dropout", src.memory.value_dropout))
  return dataclasses.replace(
      src, memory=memory, use_pooler=kind != "span",
      hidden_dropout=pick(config.model, "hidden_dropout", src.hidden_dropout),
      attention_dropout=pick(config.model, "attention_dropout", src.attention_dropout))


def build_task_model(kind: str, cfg: ModelConfig, num_labels: int, *, classifier_dropout: float,
                     seed: int, placement: MemoryPlacement = SINGLE_DEVICE) -> nnx.Module:
  """A freshly initialised head model. classifier_dropout < 0 means cfg.hidden_dropout, as
  Hugging Face's classifier_dropout=None."""
  rngs = nnx.Rngs(params=seed)
  if kind == "span":
    return heads.BertForQuestionAnswering(cfg, rngs=rngs, placement=placement)
  dropout = cfg.hidden_dropout if classifier_dropout < 0 else classifier_dropout
  return heads.BertForSequenceClassification(cfg, num_labels, classifier_dropout=dropout,
                                             rngs=rngs, placement=placement)


def init_task_model(model: nnx.Module, pre_cfg: ModelConfig, params: dict,
                    batch_stats: dict) -> str:
  """Copies the pretrained encoder (and pooler, BatchNorm statistics) into `model`; a summary."""
  report = init_from_pretrained(model, params, pre_cfg)
  unexpected = [n for n in report.new if n.startswith("bert.") and ".pooler." not in n]
  if unexpected:
    raise ValueError(f"pretrained checkpoint lacks encoder tensor '{unexpected[0]}'")
  stats = nnx.state(model, nnx.BatchStat)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(stats))
  src = traverse_util.flatten_dict(batch_stats)
  if flat:
    nnx.replace_by_pure_dict(stats, traverse_util.unflatten_dict(
        {k: jnp.asarray(src.get(k, v)) for k, v in flat.items()}))
    nnx.update(model, stats)
  pooler = "converted" if any(".pooler." in n for n in report.loaded) else "new"
  return (f"{report.summary()}; pooler {pooler}; BatchNorm statistics "
          f"{'restored' if src else 'none'}")


def task_loss(kind: str) -> LossFn:
  """The LossFn of a task head: its loss summed over the batch's examples."""

  def loss_fn(model, batch, rngs, value_probes):
    outputs, aux = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                         rngs=rngs, value_probes=value_probes)
    if kind == "span":
      losses_B = heads.span_loss(*outputs, batch["start_positions"], batch["end_positions"])
    elif kind == "regression":
      losses_B = heads.regression_loss(outputs, batch["labels"])
    else:
      losses_B = heads.classification_loss(outputs, batch["labels"])
    total = jnp.sum(losses_B)
    sums = {"count": jnp.asarray(losses_B.shape[0], jnp.float32), "loss": total}
    if kind == "classification":
      sums["accuracy"] = jnp.sum(jnp.argmax(outputs, -1) == batch["labels"]).astype(jnp.float32)
    return total, sums, aux

  return loss_fn


def restore_task_model(task_dir: str, step: int | None = None) -> nnx.Module:
  """A fine-tuning run's model (BertForSequenceClassification / BertForQuestionAnswering) at
  `step` (default latest), on one device, in eval mode."""
  info = ckpt_lib.read_json(os.path.join(task_dir, "task_model.json"), "not a fine-tuning run")
  run_cfg = ckpt_lib.read_json(os.path.join(task_dir, "config.json"), "not a fine-tuning run")
  cfg = architecture.from_dict(info["model"])
  model = nnx.eval_shape(lambda: build_task_model(info["kind"], cfg, info["num_labels"],
                                                  classifier_dropout=0.0, seed=0))
  freeze = freezing.run_frozen_filter(run_cfg)  # as the run split it (optim.freeze_memory)
  graphdef, frozen, params, stats = nnx.split(model, freeze, nnx.Param, nnx.BatchStat)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  place = lambda tree: jax.tree.map(  # noqa: E731
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
  restored = ckpt_lib.restore_items(
      ckpt_lib.make_manager(task_dir, read_only=True), ckpt_lib.latest_step(task_dir, step),
      {"params": place(params), "model_state": place(stats), "frozen": place(frozen)})
  return nnx.merge(graphdef, restored["params"], restored["frozen"], restored["model_state"])
