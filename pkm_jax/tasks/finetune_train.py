"""Fine-tuning machinery: task heads built from pretrained weights, the pure jitted steps, and
`run_task` (train with orbax checkpoints and exact resume, then score every dev split).

Batch s is a pure function of (seed, s) and dropout of (seed, step), so a resumed run sees exactly
the batches and noise of an uninterrupted one. Under freeze_memory the memory parameters are
split off before differentiation (no gradients, no Adam moments) and its BatchNorm statistics are
kept, so the memory stays bit-identical. The entry point is pkm_jax/tasks/finetune.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from pkm_jax import checkpoint as ckpt_lib
from pkm_jax import optim as optim_lib
from pkm_jax import sharding as sharding_lib
from pkm_jax.config import ModelConfig
from pkm_jax.placement import SINGLE_DEVICE, MemoryPlacement
from pkm_jax.tasks import heads
from pkm_jax.writer import MetricWriter

KINDS = ("classification", "regression", "span")


def frozen_filter(freeze_memory: bool) -> nnx.filterlib.Filter:
  """The params that stay fixed: every memory parameter under freeze_memory, else none."""
  return nnx.All(nnx.Param, nnx.PathContains("memory")) if freeze_memory else nnx.Nothing


@dataclasses.dataclass
class TaskData:
  """A task ready to train: model inputs [N, ...] and a scorer of dev outputs."""

  name: str
  kind: str  # one of KINDS
  num_labels: int  # classes; 1 for regression; 2 (start, end) for spans
  train: dict[str, np.ndarray]  # input_ids/attention_mask/token_type_ids + labels or positions
  evals: dict[str, dict[str, np.ndarray]]  # split -> model inputs
  # (split, outputs) -> (metrics, JSON-able predictions); outputs: logits [N, L] or (start, end)
  score: Callable[[str, Any], tuple[dict[str, float], Any]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class FinetuneState:
  step: jax.Array
  params: nnx.State  # trained
  frozen: nnx.State  # memory params under freeze_memory (else empty)
  model_state: nnx.State  # BatchNorm statistics of the memory queries
  opt_state: optax.OptState


# ------------------------------------------------------------------------------ model and init
@dataclasses.dataclass
class Pretrained:
  cfg: ModelConfig
  params: dict  # BertForMaskedLM's param tree (pure dict)
  batch_stats: dict  # its BatchNorm statistics ({} when the source has none)
  tokenizer: Any
  source: str  # e.g. 'workdir step 1000'


def load_init(path: str) -> Pretrained:
  """A pretraining workdir (latest step, BatchNorm statistics included), a converted checkpoint
  or a Hugging Face folder."""
  from pkm_jax import pretrained  # pylint: disable=g-import-not-at-top
  if pretrained.is_workdir(path):
    model, tokenizer = ckpt_lib.restore_model(path)
    step = ckpt_lib.latest_step(path)
    return Pretrained(model.cfg, nnx.state(model, nnx.Param).to_pure_dict(),
                      nnx.state(model, nnx.BatchStat).to_pure_dict(), tokenizer,
                      f"pretraining workdir step {step}")
  cfg, params, tokenizer = pretrained.load_pretrained(path)
  return Pretrained(cfg, params, {}, tokenizer, "converted/HF checkpoint")


def task_model_config(src: ModelConfig, config: ml_collections.ConfigDict, kind: str
                      ) -> ModelConfig:
  """The pretrained config with the run's dropout overrides; a pooler for sentence tasks."""
  pick = lambda key, old: old if config[key] < 0 else float(config[key])  # noqa: E731
  memory = dataclasses.replace(
      src.memory, input_dropout=pick("input_dropout", src.memory.input_dropout),
      query_dropout=pick("query_dropout", src.memory.query_dropout),
      value_dropout=pick("value_dropout", src.memory.value_dropout))
  return dataclasses.replace(
      src, memory=memory, use_pooler=kind != "span",
      hidden_dropout=pick("hidden_dropout", src.hidden_dropout),
      attention_dropout=pick("attention_dropout", src.attention_dropout))


def build_task_model(kind: str, cfg: ModelConfig, num_labels: int, *, classifier_dropout: float,
                     seed: int, abstract: bool = False,
                     placement: MemoryPlacement = SINGLE_DEVICE) -> nnx.Module:
  """A freshly initialised head model (abstract: shapes only). classifier_dropout < 0 means
  cfg.hidden_dropout, as Hugging Face's classifier_dropout=None."""
  def make():
    rngs = nnx.Rngs(params=seed)
    if kind == "span":
      return heads.BertForQuestionAnswering(cfg, rngs=rngs, placement=placement)
    dropout = cfg.hidden_dropout if classifier_dropout < 0 else classifier_dropout
    return heads.BertForSequenceClassification(cfg, num_labels, classifier_dropout=dropout,
                                               rngs=rngs, placement=placement)
  # Eager initialisers: their small per-shape compiles are shared by every task and model size
  # (a jitted initialiser recompiles for each head and costs more than it saves).
  return nnx.eval_shape(make) if abstract else make()


def init_task_model(model: nnx.Module, pre: Pretrained) -> str:
  """Copies the pretrained encoder (and pooler, BatchNorm statistics) into `model`; a summary.

  The model gets copies: its arrays are donated to the train step, and `pre` may serve the next
  task of a suite.
  """
  from pkm_jax import pretrained  # pylint: disable=g-import-not-at-top
  report = pretrained.init_from_pretrained(model, jax.tree.map(jnp.array, pre.params), pre.cfg)
  unexpected = [n for n in report.new if n.startswith("bert.") and ".pooler." not in n]
  if unexpected:
    raise ValueError(f"pretrained checkpoint lacks encoder tensor '{unexpected[0]}'")
  stats = nnx.state(model, nnx.BatchStat)
  flat, src = traverse_util.flatten_dict(stats.to_pure_dict()), traverse_util.flatten_dict(
      pre.batch_stats)
  if flat:
    nnx.replace_by_pure_dict(stats, traverse_util.unflatten_dict(
        {k: jnp.array(src.get(k, v)) for k, v in flat.items()}))
    nnx.update(model, stats)
  pooler = "converted" if any(".pooler." in n for n in report.loaded) else "new"
  return (f"{report.summary()}; pooler {pooler}; BatchNorm statistics "
          f"{'restored' if src else 'none'}")


# ------------------------------------------------------------------------------ optimizer, steps
def make_optimizer(config: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Clip -> AdamW (warmup + decay; no decay on 1-D params); value tables: own peak lr."""
  def schedule_for(lr):
    return optim_lib.learning_rate_schedule(ml_collections.ConfigDict(dict(
        lr=lr, warmup_steps=round(config.warmup_fraction * total_steps), decay=config.decay,
        end_lr_factor=0.0)), total_steps)
  schedule = schedule_for(config.lr)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  network = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay, mask=decay_mask)
  values = optax.adamw(schedule_for(config.values_lr or config.lr), b1=config.b1, b2=config.b2,
                       eps=config.eps, weight_decay=config.values_weight_decay)
  tx = optax.multi_transform({optim_lib.DEFAULT: network, optim_lib.VALUES: values},
                             optim_lib.param_labels)
  if config.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
  return tx, schedule


def task_loss(kind: str, outputs, batch: dict) -> jax.Array:
  if kind == "span":
    return heads.span_loss(*outputs, batch["start_positions"], batch["end_positions"])
  if kind == "regression":
    return heads.regression_loss(outputs, batch["labels"])
  return heads.classification_loss(outputs, batch["labels"])


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, kind: str, seed: int, freeze_memory: bool
                    ) -> Callable:
  """(FinetuneState, batch) -> (FinetuneState, metrics)."""
  base_key = jax.random.key(seed)

  def train_step(state: FinetuneState, batch: dict):
    dropout_key = jax.random.fold_in(base_key, state.step)  # (seed, step) only: resumable

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.frozen, state.model_state, copy=True)
      outputs, _ = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                         rngs=nnx.Rngs(dropout=dropout_key))
      return task_loss(kind, outputs, batch), (outputs, nnx.state(model, nnx.BatchStat))

    (loss, (outputs, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "learning_rate": schedule(state.step)}
    if kind == "classification":
      metrics["accuracy"] = jnp.mean(jnp.argmax(outputs, -1) == batch["labels"])
    # A frozen memory keeps its running query statistics too (they are part of the query net).
    return FinetuneState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         frozen=state.frozen,
                         model_state=state.model_state if freeze_memory else model_state,
                         opt_state=opt_state), metrics

  return train_step


def make_predict_step(graphdef: nnx.GraphDef) -> Callable:
  def predict_step(params, frozen, model_state, batch):
    model = nnx.merge(graphdef, params, frozen, model_state)
    outputs, _ = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return outputs
  return predict_step


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
  """Rows of batch `step`: the stream of per-epoch permutations, cut into equal batches (the
  last batch of an epoch continues into the next), so every batch is full and reproducible."""
  out, pos = [], step * batch_size
  while len(out) < batch_size:
    epoch, offset = divmod(pos, n)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    take = perm[offset:offset + batch_size - len(out)]
    out.extend(take.tolist())
    pos += len(take)
  return np.asarray(out)


def _mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  data, model = config.mesh.data, config.mesh.model
  devices = jax.devices()
  if data > 0 and model > 0:  # both given: the first data*model devices
    if data * model > len(devices):
      raise ValueError(f"mesh {data}x{model} needs {data * model} devices, have {len(devices)}")
    devices = devices[:data * model]
  return sharding_lib.make_mesh(data, model, devices)


# ------------------------------------------------------------------------------ one task
def run_task(config: ml_collections.ConfigDict, task_dir: str, task: TaskData,
             model_cfg: ModelConfig, pre: Pretrained | None) -> dict[str, Any]:
  """Fine-tunes `task` into task_dir (resuming when it has checkpoints), then scores dev.

  `pre` gives the initial weights; it is None (and unused) when resuming.
  """
  mesh = _mesh(config)
  for key in ("batch_size", "eval_batch_size"):
    if config[key] % mesh.shape["data"]:
      raise ValueError(f"config.{key}={config[key]} is not divisible by the {mesh.shape['data']} "
                       "data-parallel devices (set --config.mesh.data)")
  placement = MemoryPlacement.from_mesh(mesh)
  n_train = len(task.train["input_ids"])
  total = config.steps or max(1, math.ceil(config.epochs * n_train / config.batch_size))
  tx, schedule = make_optimizer(config, total)
  make = lambda abstract=False: build_task_model(  # noqa: E731
      task.kind, model_cfg, task.num_labels, classifier_dropout=config.classifier_dropout,
      seed=config.seed, abstract=abstract, placement=placement)

  def split(model):
    graphdef, frozen, params, model_state = nnx.split(
        model, frozen_filter(config.freeze_memory), nnx.Param, nnx.BatchStat)
    return graphdef, FinetuneState(jnp.zeros((), jnp.int32), params, frozen, model_state,
                                   tx.init(params))

  graphdef, abstract = split(make(abstract=True))
  shardings = sharding_lib.state_shardings(abstract, mesh, sharding_lib.rules_from_config(config))
  manager = ckpt_lib.make_manager(task_dir, max_to_keep=config.keep_checkpoints)
  start = manager.latest_step() or 0
  extras = lambda s: {k: v for k, v in (("batch_stats", s.model_state),  # noqa: E731
                                        ("frozen", s.frozen)) if jax.tree.leaves(v)}
  if start:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    restored = ckpt_lib.restore(manager, start, abstract_params=target.params,
                                abstract_model_state=extras(target),
                                abstract_opt_state=target.opt_state)
    kept = restored["model_state"]
    # device_put: the step counter must carry its sharding too, or the first step recompiles.
    state = jax.device_put(FinetuneState(
        jnp.asarray(start, jnp.int32), restored["params"], kept.get("frozen", target.frozen),
        kept.get("batch_stats", target.model_state), restored["opt_state"]), shardings)
    print(f"Resuming {task_dir} from step {start}")
  else:
    model = make()
    print(f"Init {task.name} from {config.init} ({pre.source}): {init_task_model(model, pre)}")
    state = jax.device_put(split(model)[1], shardings)

  data_sharding = NamedSharding(mesh, P("data"))
  to_device = lambda b: jax.device_put(b, data_sharding)  # noqa: E731
  train_step = jax.jit(make_train_step(graphdef, tx, schedule, task.kind, config.seed,
                                       config.freeze_memory),
                       in_shardings=(shardings, data_sharding),
                       out_shardings=(shardings, None), donate_argnums=(0,))
  writer = MetricWriter(os.path.join(task_dir, "tensorboard"))
  bar = tqdm(range(start, total), initial=start, total=total, desc=f"finetune {task.name}",
             dynamic_ncols=True)
  t0 = time.perf_counter()
  try:
    for step in bar:
      rows = batch_indices(step, n_train, config.batch_size, config.seed)
      with jax.set_mesh(mesh):
        state, metrics = train_step(state, to_device({k: v[rows] for k, v in task.train.items()}))
      done = step + 1
      if done % config.log_every == 0 or done == total or done % config.checkpoint_every == 0:
        host = jax.device_get(metrics)
        if not np.isfinite(host["loss"]):
          raise FloatingPointError(f"{task.name}: loss is {host['loss']} at step {done}; stopping "
                                   f"(last checkpoint: step {manager.latest_step()})")
        if done % config.log_every == 0 or done == total:
          writer.scalars(done, host, prefix="train/")
          bar.set_postfix(loss=f"{host['loss']:.4f}")
        if done % config.checkpoint_every == 0 or done == total:
          ckpt_lib.save(manager, done, params=state.params, model_state=extras(state),
                        opt_state=state.opt_state, data_state={"step": done})
  finally:
    bar.close()
    manager.wait_until_finished()
  train_seconds = time.perf_counter() - t0

  predict = jax.jit(make_predict_step(graphdef))
  with open(os.path.join(task_dir, "task_model.json")) as f:
    init_source = json.load(f)["init_source"]
  result: dict[str, Any] = {"task": task.name, "init": os.path.abspath(config.init),
                            "init_source": init_source, "step": total, "train_examples": n_train}
  for split_name, arrays in task.evals.items():
    with jax.set_mesh(mesh):
      outputs = predict_all(predict, state, arrays, config.eval_batch_size, to_device)
    metrics, predictions = task.score(split_name, outputs)
    result[split_name] = metrics
    ckpt_lib.write_json(os.path.join(task_dir, f"predictions_{split_name}.json"), predictions)
    writer.scalars(total, metrics, prefix=f"{split_name}/")
  writer.close()
  if start < total:
    result["train_seconds"] = round(train_seconds, 2)
  ckpt_lib.write_json(os.path.join(task_dir, "metrics.json"), result)
  return result


def predict_all(predict: Callable, state: FinetuneState, arrays: dict[str, np.ndarray],
                batch_size: int, to_device: Callable) -> Any:
  """Model outputs for every row (eval mode), in fixed-size batches (the last one padded)."""
  inputs = {k: arrays[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
  n, chunks = len(inputs["input_ids"]), []
  for lo in range(0, n, batch_size):
    rows = np.minimum(np.arange(lo, lo + batch_size), n - 1)  # pad by repeating the last row
    out = predict(state.params, state.frozen, state.model_state,
                  to_device({k: v[rows] for k, v in inputs.items()}))
    chunks.append(jax.tree.map(lambda x: np.asarray(x)[:min(batch_size, n - lo)],
                               jax.device_get(out)))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *chunks)
