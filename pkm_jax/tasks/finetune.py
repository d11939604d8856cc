"""Fine-tuning on GLUE / SQuAD v1.1: `finetune_and_evaluate(config, workdir)` (what eval.py runs).

  init (a pretraining workdir's latest checkpoint, a converted checkpoint or an HF folder)
  -> encoder weights (+ BatchNorm statistics of the memory queries, + pooler when present)
  -> task head (tasks/heads.py) -> AdamW with warmup + linear decay -> dev metrics.

Task data comes from finetune_glue.py / finetune_squad.py as a `TaskData`, training from
finetune_train.py; this module owns the config schema, its checks and the run folders. A task's
run lives in WORKDIR/<task>/: config.json, task_model.json, tokenizer.json, checkpoints/ (orbax,
as pretraining), tensorboard/, metrics.json, predictions_<split>.json. Re-running the same
command resumes from the latest checkpoint with exactly the batches and dropout of an
uninterrupted run (different settings in the same folder are refused);
`restore_task_model(task_dir)` gives the fine-tuned model back. One host (all its devices,
data-parallel over mesh.data; mesh.model > 1 shards the value tables as in pretraining).
Memory options: `values_lr` (the value tables' own peak learning rate, same schedule, no weight
decay), `freeze_memory` (keys, values, query net and its BatchNorm statistics are left exactly
as pretrained: they are not even differentiated), and dropout overrides (-1 keeps the
checkpoint's).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import ml_collections
from flax import nnx

from pkm_jax import checkpoint as ckpt_lib
from pkm_jax import config as config_lib
from pkm_jax.config import ModelConfig
from pkm_jax.tasks.finetune_train import (Pretrained, build_task_model, frozen_filter,
                                          load_init, task_model_config)

_NOT_RESUME_RELEVANT = ("tasks", "log_every", "checkpoint_every", "keep_checkpoints",
                        "eval_batch_size", "max_eval_examples", "mesh")


def base_config() -> ml_collections.ConfigDict:
  """Every fine-tuning key (configs/glue.py and configs/squad.py override the defaults)."""
  c = ml_collections.ConfigDict()
  c.task = "sst2"  # a GLUE task (cola sst2 mrpc stsb qqp mnli qnli rte wnli) or 'squad'
  c.tasks = ""  # 'all_glue' or 'sst2,cola,...': a GLUE suite + markdown table; overrides task
  c.init = ""  # pretraining workdir | converted checkpoint | Hugging Face folder
  c.source = "files"  # 'files' (official layouts under data_dir) | 'tfds'
  c.data_dir = ""
  c.seed = 0
  c.max_len = 128
  c.doc_stride, c.max_query_len, c.n_best, c.max_answer_len = 128, 64, 20, 30  # SQuAD only
  c.lr, c.batch_size, c.epochs, c.warmup_fraction = 2e-5, 32, 3.0, 0.1
  c.steps = 0  # >0: train this many steps instead of `epochs`
  c.decay, c.weight_decay, c.grad_clip = "linear", 0.01, 1.0
  c.b1, c.b2, c.eps = 0.9, 0.999, 1e-6
  c.values_lr = 0.0  # memory value tables' peak lr; 0: same as lr
  c.values_weight_decay = 0.0
  c.freeze_memory = False
  # Dropout overrides; -1 keeps the pretrained checkpoint's rate (classifier: hidden_dropout).
  c.hidden_dropout = c.attention_dropout = -1.0
  c.input_dropout = c.query_dropout = c.value_dropout = -1.0
  c.classifier_dropout = -1.0
  c.eval_batch_size = 128
  c.max_train_examples = c.max_eval_examples = 0  # 0: all (>0: quick runs)
  c.log_every, c.checkpoint_every, c.keep_checkpoints = 50, 1000, 2
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  return c


# ------------------------------------------------------------------------------ config checks
def validate(config: ml_collections.ConfigDict) -> None:
  """One-line ValueError for a config that cannot run."""
  from pkm_jax.tasks.glue import TASKS  # pylint: disable=g-import-not-at-top
  ref = base_config()
  for key in config.keys():
    if key not in ref:
      raise ValueError(f"unknown fine-tuning config key {key!r}")
  if not config.tasks and config.task not in (*TASKS, "squad"):
    raise ValueError(f"unknown task {config.task!r}; choose from {', '.join(TASKS)}, squad "
                     "(or --config.tasks=all_glue)")
  if config.tasks and config.tasks != "all_glue":
    for name in config.tasks.split(","):
      if name.strip() not in TASKS:
        raise ValueError(f"config.tasks: unknown GLUE task {name.strip()!r}; choose from "
                         f"{', '.join(TASKS)} or all_glue (SQuAD runs with configs/squad.py)")
  if not config.init:
    raise ValueError("config.init is empty: give a pretraining workdir, a converted checkpoint "
                     "or a Hugging Face folder (--config.init=DIR)")
  if not os.path.isdir(config.init):
    raise FileNotFoundError(f"config.init={config.init}: no such folder")
  if config.source not in ("files", "tfds"):
    raise ValueError(f"config.source={config.source!r} is not 'files' or 'tfds'")
  if config.source == "files" and not config.data_dir:
    raise ValueError("config.source='files' needs --config.data_dir (the GLUE / SQuAD folder)")
  for key in ("batch_size", "eval_batch_size", "max_len", "doc_stride", "max_query_len",
              "n_best", "max_answer_len", "log_every", "checkpoint_every"):
    if config[key] < 1:
      raise ValueError(f"config.{key}={config[key]} must be >= 1")
  if config.lr <= 0 or config.values_lr < 0:
    raise ValueError(f"config.lr={config.lr} must be > 0 and values_lr={config.values_lr} >= 0")
  if config.steps <= 0 and config.epochs <= 0:
    raise ValueError(f"config.epochs={config.epochs} must be > 0 (or config.steps > 0)")
  if not 0 <= config.warmup_fraction < 1:
    raise ValueError(f"config.warmup_fraction={config.warmup_fraction} must be in [0, 1)")
  for key in ("hidden_dropout", "attention_dropout", "input_dropout", "query_dropout",
              "value_dropout", "classifier_dropout"):
    if not (config[key] == -1 or 0 <= config[key] < 1):
      raise ValueError(f"config.{key}={config[key]} must be in [0, 1) (or -1: keep)")


def default_workdir(init: str) -> str:
  """<init>/finetune for a pretraining workdir; workdirs/finetune/<name> for model folders."""
  from pkm_jax import pretrained  # pylint: disable=g-import-not-at-top
  if pretrained.is_workdir(init):
    return os.path.join(init, "finetune")
  return os.path.join("workdirs", "finetune", os.path.basename(os.path.normpath(init)))


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


# ------------------------------------------------------------------------------ entry points
def prepare_task_dir(config: ml_collections.ConfigDict, task_dir: str, task_name: str,
                     kind: str, num_labels: int, load: Callable[[], Pretrained]
                     ) -> tuple[ModelConfig, Any, Pretrained | None]:
  """(model config, tokenizer, Pretrained or None when resuming); writes/validates run files."""
  from pkm_jax.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  run_cfg = {k: v for k, v in json.loads(config.to_json()).items()
             if k not in _NOT_RESUME_RELEVANT}
  run_cfg.update(task=task_name, init=os.path.abspath(config.init))
  has_ckpt = os.path.isdir(ckpt_lib.checkpoint_dir(task_dir)) and bool(
      ckpt_lib.make_manager(task_dir, read_only=True).all_steps())
  if has_ckpt:
    saved = _read_json(os.path.join(task_dir, "config.json"))
    diff = sorted(k for k in set(saved) | set(run_cfg) if saved.get(k) != run_cfg.get(k))
    if diff:
      raise ValueError(f"{task_dir} holds a fine-tuning run with different settings "
                       f"({', '.join(diff)}); use a new --workdir")
    info = _read_json(os.path.join(task_dir, "task_model.json"))
    return (config_lib.from_dict(info["model"]),
            load_tokenizer(os.path.join(task_dir, "tokenizer.json")), None)
  pre = load()
  model_cfg = task_model_config(pre.cfg, config, kind)
  if config.max_len > model_cfg.max_position_embeddings:
    raise ValueError(f"config.max_len={config.max_len} exceeds the model's "
                     f"max_position_embeddings={model_cfg.max_position_embeddings}")
  os.makedirs(task_dir, exist_ok=True)
  pre.tokenizer.save(os.path.join(task_dir, "tokenizer.json"))
  ckpt_lib.write_json(os.path.join(task_dir, "task_model.json"), {
      "model": config_lib.to_dict(model_cfg), "kind": kind, "num_labels": num_labels,
      "init_source": pre.source})
  ckpt_lib.write_json(os.path.join(task_dir, "config.json"), run_cfg)
  return model_cfg, pre.tokenizer, pre


def finetune_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None = None
                          ) -> dict[str, Any]:
  """One task (config.task) or a GLUE suite (config.tasks); returns the JSON-able metrics."""
  from pkm_jax.tasks import finetune_glue, finetune_squad  # pylint: disable=g-import-not-at-top
  validate(config)
  workdir = os.path.abspath(workdir or default_workdir(config.init))
  cache: list[Pretrained] = []

  def load() -> Pretrained:  # the init checkpoint is read once, and only if a task needs it
    if not cache:
      cache.append(load_init(config.init))
    return cache[0]

  if config.tasks:
    return finetune_glue.run_suite(config, workdir, load)
  if config.task == "squad":
    return finetune_squad.run(config, os.path.join(workdir, "squad"), load)
  return finetune_glue.run(config, os.path.join(workdir, config.task), load)


def restore_task_model(task_dir: str, step: int | None = None) -> nnx.Module:
  """A fine-tuning run's model (BertForSequenceClassification / BertForQuestionAnswering) at
  `step` (default latest), in eval mode."""
  info = _read_json(os.path.join(task_dir, "task_model.json"))
  run_cfg = _read_json(os.path.join(task_dir, "config.json"))
  cfg = config_lib.from_dict(info["model"])
  model = build_task_model(info["kind"], cfg, info["num_labels"], classifier_dropout=0.0, seed=0,
                           abstract=True)
  graphdef, frozen, params, stats = nnx.split(model, frozen_filter(run_cfg["freeze_memory"]),
                                              nnx.Param, nnx.BatchStat)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  place = lambda tree: jax.tree.map(  # noqa: E731
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
  extras = {k: place(v) for k, v in (("batch_stats", stats), ("frozen", frozen))
            if jax.tree.leaves(v)}
  restored = ckpt_lib.restore(ckpt_lib.make_manager(task_dir, read_only=True),
                              ckpt_lib.latest_step(task_dir, step),
                              abstract_params=place(params), abstract_model_state=extras)
  kept = restored["model_state"]
  return nnx.merge(graphdef, restored["params"], kept.get("frozen", frozen),
                   kept.get("batch_stats", stats))

