"""The fine-tuning config schema: the same groups and key names as pretraining's
(`pkm_jax.config`) for the same things, plus the task's own keys.

Every key (`--config.group.key=value`):
  task / tasks     one GLUE task or 'squad' / a GLUE suite ('all_glue' or 'sst2,cola,...')
  init.pretrained  a pretraining workdir | converted checkpoint | Hugging Face folder
  data.*           source ('files' | 'tfds'), data_dir, max_len, batch_size, SQuAD windows
                   (doc_stride, max_query_len), max_train_examples / max_eval_examples (0: all)
  model.*, memory.*  dropout overrides; -1 keeps the pretrained checkpoint's rate
                   (classifier_dropout -1: the model's hidden_dropout)
  optim.*          pretraining's optim group (AdamW, warmup, decay, clipping, value tables)
  train.*          steps (> 0: instead of epochs), epochs, log_every, checkpoint_every,
                   keep_checkpoints, grad_accum_steps
  eval.*           batch_size; SQuAD decoding: n_best, max_answer_len
  mesh.*           data, model, rules (as pretraining)
"""

from __future__ import annotations

import json

import ml_collections

from pkm_jax import config as config_lib
from pkm_jax import config_checks
from pkm_jax import storage
from pkm_jax.config import ConfigError
from pkm_jax.config_checks import check_number
from pkm_jax.tasks.glue import TASKS

# Keys that may change between a run and its resume (how it is run, logged or evaluated).
NOT_RESUME_RELEVANT = ("tasks", "train.log_every", "train.checkpoint_every",
                       "train.keep_checkpoints", "eval.batch_size", "data.max_eval_examples",
                       "mesh")


def base_config() -> ml_collections.ConfigDict:
  """Every fine-tuning key (configs/glue.py and configs/squad.py override the defaults)."""
  c = ml_collections.ConfigDict()
  c.task = "sst2"  # a GLUE task (cola sst2 mrpc stsb qqp mnli qnli rte wnli) or 'squad'
  c.tasks = ""  # 'all_glue' or 'sst2,cola,...': a GLUE suite + markdown table; overrides task
  c.seed = 0  # head initialisation, batch order, dropout
  c.init = config_lib.init_group()
  c.data = ml_collections.ConfigDict(dict(
      source="files",  # 'files' (official layouts under data_dir) | 'tfds'
      data_dir="", max_len=128, batch_size=32,
      doc_stride=128, max_query_len=64,  # SQuAD windows
      max_train_examples=0, max_eval_examples=0))  # 0: all (> 0: quick runs)
  c.model = ml_collections.ConfigDict(dict(
      hidden_dropout=-1.0, attention_dropout=-1.0, classifier_dropout=-1.0))
  c.memory = ml_collections.ConfigDict(dict(
      input_dropout=-1.0, query_dropout=-1.0, value_dropout=-1.0))
  # BERT's recipe: AdamW 2e-5, 10% warmup then linear decay, clip 1.0; value tables follow the
  # network's schedule at optim.values_lr (0: optim.lr).
  c.optim = config_lib.optim_group(lr=2e-5, warmup_steps=0, warmup_fraction=0.1,
                                   values_lr=0.0, values_schedule="network")
  c.train = ml_collections.ConfigDict(dict(
      steps=0, epochs=3.0, log_every=50, checkpoint_every=1000, keep_checkpoints=2,
      grad_accum_steps=1))
  c.eval = ml_collections.ConfigDict(dict(batch_size=128, n_best=20, max_answer_len=30))
  c.mesh = config_lib.mesh_group()
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """One-line ConfigError (or FileNotFoundError) for a config that cannot run."""
  config_lib.check_keys(config, base_config())
  if not config.tasks and config.task not in (*TASKS, "squad"):
    raise ConfigError(f"unknown task {config.task!r}; choose from {', '.join(TASKS)}, squad "
                      "(or --config.tasks=all_glue)")
  if config.tasks and config.tasks != "all_glue":
    for name in config.tasks.split(","):
      if name.strip() not in TASKS:
        raise ConfigError(f"config.tasks: unknown GLUE task {name.strip()!r}; choose from "
                          f"{', '.join(TASKS)} or all_glue (SQuAD runs with configs/squad.py)")
  if not config.init.pretrained:
    raise ConfigError("init.pretrained is empty: give a pretraining workdir, a converted "
                      "checkpoint or a Hugging Face folder (--config.init.pretrained=DIR)")
  if not storage.isdir(config.init.pretrained):
    raise FileNotFoundError(f"init.pretrained={config.init.pretrained}: no such folder")
  check_number(config, "config", "seed", lo=0)
  d = config.data
  config_checks.check_choice(d, "data", "source", ("files", "tfds"))
  if d.source == "files" and not d.data_dir:
    raise ConfigError("data.source='files' needs --config.data.data_dir (the GLUE / SQuAD "
                      "folder)")
  check_number(d, "data", "max_len", lo=3)
  for key in ("batch_size", "doc_stride", "max_query_len"):
    check_number(d, "data", key, lo=1)
  for key in ("max_train_examples", "max_eval_examples"):
    check_number(d, "data", key, lo=0)
  config_checks.validate_dropouts(config.model, "model",
                               ("hidden_dropout", "attention_dropout", "classifier_dropout"),
                               special=(-1, -1.0))
  config_checks.validate_dropouts(config.memory, "memory",
                               ("input_dropout", "query_dropout", "value_dropout"),
                               special=(-1, -1.0))
  config_checks.validate_optim(config.optim)
  t = config.train
  config_checks.validate_run_lengths(t, ("log_every", "checkpoint_every"))
  check_number(t, "train", "steps", lo=0)
  check_number(t, "train", "epochs", lo=0)
  if t.steps <= 0 and t.epochs <= 0:
    raise ConfigError(f"train.epochs={t.epochs} must be > 0 (or train.steps > 0)")
  if d.batch_size % t.grad_accum_steps:
    raise ConfigError(f"train.grad_accum_steps={t.grad_accum_steps} must divide "
                      f"data.batch_size={d.batch_size}")
  for key in ("batch_size", "n_best", "max_answer_len"):
    check_number(config.eval, "eval", key, lo=1)
  config_checks.validate_mesh(config.mesh)


def resume_relevant(config: ml_collections.ConfigDict) -> dict[str, object]:
  """The settings a resumed run must share with the run in its folder: {'optim.lr': 2e-5, ...}."""
  def flat(d, prefix=""):
    for k, v in d.items():
      name = f"{prefix}{k}"
      if isinstance(v, dict):
        yield from flat(v, name + ".")
      else:
        yield name, v
  return {k: v for k, v in flat(json.loads(config.to_json()))
          if not any(k == n or k.startswith(n + ".") for n in NOT_RESUME_RELEVANT)}
