"""One task's run: its folder (settings, model config, tokenizer), training through the shared
program and loop (`pkm_jax.program`, `pkm_jax.loop`), then scoring every dev split.

A task's run lives in WORKDIR/<task>/: config.json, task_model.json, tokenizer.json,
checkpoints/ (orbax, as pretraining), tensorboard/, metrics.json, predictions_<split>.json.
Re-running the same command resumes from the latest checkpoint with exactly the batches and
dropout of an uninterrupted run; other settings in the same folder are refused.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from pkm_jax import architecture
from pkm_jax import checkpoint as ckpt_lib
from pkm_jax import config as config_lib
from pkm_jax import program as program_lib
from pkm_jax import storage
from pkm_jax.architecture import ModelConfig
from pkm_jax.data.tokenizer import load_tokenizer, save_tokenizer
from pkm_jax.loop import Periodic, train_loop
from pkm_jax.program import TrainProgram
from pkm_jax.steps import TrainState
from pkm_jax.tasks import task_config
from pkm_jax.tasks.task_data import TaskData, eval_batches, train_batches
from pkm_jax.tasks.task_model import (Pretrained, build_task_model, init_task_model,
                                      task_loss, task_model_config)
from pkm_jax.writer import MetricWriter


def prepare_task_dir(config: ml_collections.ConfigDict, task_dir: str, task_name: str,
                     kind: str, num_labels: int, load: Callable[[], Pretrained]
                     ) -> tuple[ModelConfig, Any, Pretrained | None]:
  """(model config, tokenizer, Pretrained or None when resuming); writes/checks run files."""
  settings = config.copy_and_resolve_references()
  settings.task = task_name
  settings.init.pretrained = storage.absolute(config.init.pretrained)
  if ckpt_lib.saved_steps(task_dir):
    saved = ckpt_lib.read_json(os.path.join(task_dir, "config.json"), "the run's settings")
    try:
      saved = config_lib.from_json_dict(saved, task_config.base_config(), where=task_dir)
    except config_lib.ConfigError as e:
      raise ValueError(f"{task_dir} holds a fine-tuning run of an earlier version ({e}); use a "
                       "new --workdir") from e
    was, now = task_config.resume_relevant(saved), task_config.resume_relevant(settings)
    diff = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
    if diff:
      raise ValueError(f"{task_dir} holds a fine-tuning run with different settings "
                       f"({', '.join(diff)}); use a new --workdir")
    info = ckpt_lib.read_json(os.path.join(task_dir, "task_model.json"), "not a fine-tuning run")
    return (architecture.from_dict(info["model"]),
            load_tokenizer(os.path.join(task_dir, "tokenizer.json")), None)
  pre = load()
  model_cfg = task_model_config(pre.cfg, config, kind)
  if config.data.max_len > model_cfg.max_position_embeddings:
    raise ValueError(f"data.max_len={config.data.max_len} exceeds the model's "
                     f"max_position_embeddings={model_cfg.max_position_embeddings}")
  storage.makedirs(task_dir)
  save_tokenizer(pre.tokenizer, os.path.join(task_dir, "tokenizer.json"))
  ckpt_lib.write_json(os.path.join(task_dir, "task_model.json"), {
      "model": architecture.to_dict(model_cfg), "kind": kind, "num_labels": num_labels,
      "init_source": pre.source})
  ckpt_lib.write_json(os.path.join(task_dir, "config.json"), json.loads(settings.to_json()))
  return model_cfg, pre.tokenizer, pre


def build_task_program(config: ml_collections.ConfigDict, task: TaskData, model_cfg: ModelConfig,
                       total_steps: int, pretrained_cfg: ModelConfig | None) -> TrainProgram:
  """The fine-tuning program: the task head's loss on the shared program."""

  def make_model(placement):
    return build_task_model(task.kind, model_cfg, task.num_labels,
                            classifier_dropout=config.model.classifier_dropout,
                            seed=config.seed, placement=placement)

  def init_from(model, source):
    params, batch_stats = source
    return init_task_model(model, pretrained_cfg, params, batch_stats)

  return program_lib.build_program(config, make_model=make_model, loss_fn=task_loss(task.kind),
                                   total_steps=total_steps, batch_size=config.data.batch_size,
                                   init_from=init_from)


def run_task(config: ml_collections.ConfigDict, task_dir: str, task: TaskData,
             model_cfg: ModelConfig, pre: Pretrained | None) -> dict[str, Any]:
  """Fine-tunes `task` into task_dir (resuming when it has checkpoints), then scores dev.

  `pre` gives the initial weights; it is None (and unused) when resuming.
  """
  total = config.train.steps or max(1, math.ceil(config.train.epochs * task.num_train
                                                 / config.data.batch_size))
  program = build_task_program(config, task, model_cfg, total, pre.cfg if pre else None)
  data_ways = math.prod(program.mesh.shape[a] for a in program.placement.token_axes)
  if config.eval.batch_size % data_ways:
    raise ValueError(f"eval.batch_size={config.eval.batch_size} is not divisible by the "
                     f"{data_ways} devices the batch is split over (mesh.data x mesh.model)")
  manager = ckpt_lib.make_manager(task_dir, max_to_keep=config.train.keep_checkpoints)
  # Copies on the host: `pre` may serve the next task of a suite, and the state is donated.
  source = jax.tree.map(np.array, (pre.params, pre.batch_stats)) if pre else None
  state, start, data_state = program_lib.restore_or_init(program, manager, source)
  if data_state is not None:
    print(f"Resuming {task_dir} from step {start}")
  else:
    print(f"Init {task.name} from {config.init.pretrained} ({pre.source}): "
          f"{program.init_reports[0]}")

  def save(step: int, state: TrainState) -> None:
    ckpt_lib.save_state(manager, step, state, {"step": step})

  t0 = time.perf_counter()
  with MetricWriter(os.path.join(task_dir, "tensorboard")) as writer:
    try:
      state, _ = train_loop(
          program, state, train_batches(task, start, config.data.batch_size, config.seed),
          start_step=start, total_steps=total, writer=writer, log_every=config.train.log_every,
          save=Periodic(config.train.checkpoint_every, save), latest_saved=manager.latest_step,
          sequences_per_step=config.data.batch_size, desc=f"finetune {task.name}")
    finally:
      manager.wait_until_finished()
    train_seconds = time.perf_counter() - t0
    info = ckpt_lib.read_json(os.path.join(task_dir, "task_model.json"), "not a fine-tuning run")
    result: dict[str, Any] = {"task": task.name, "init": storage.absolute(config.init.pretrained),
                              "init_source": info["init_source"], "step": total,
                              "train_examples": task.num_train}
    predict = jax.jit(make_predict_step(program.graphdef),
                      in_shardings=(program.state_sharding.params,
                                    program.state_sharding.frozen,
                                    program.state_sharding.model_state, program.batch_sharding))
    for split_name, arrays in task.evals.items():
      with jax.set_mesh(program.mesh):
        outputs = predict_all(predict, state, arrays, config.eval.batch_size, program.to_device)
      metrics, predictions = task.score(split_name, outputs)
      result[split_name] = metrics
      ckpt_lib.write_json(os.path.join(task_dir, f"predictions_{split_name}.json"), predictions)
      writer.scalars(total, metrics, prefix=f"{split_name}/")
  if start < total:
    result["train_seconds"] = round(train_seconds, 2)
  ckpt_lib.write_json(os.path.join(task_dir, "metrics.json"), result)
  return result


def make_predict_step(graphdef: nnx.GraphDef) -> Callable:
  """(params, frozen, model_state, inputs) -> the head's outputs, in eval mode."""
  def predict_step(params, frozen, model_state, batch):
    model = nnx.merge(graphdef, params, frozen, model_state)
    outputs, _ = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return outputs
  return predict_step


def predict_all(predict: Callable, state: TrainState, arrays: dict[str, np.ndarray],
                batch_size: int, to_device: Callable) -> Any:
  """Model outputs for every row (eval mode), in fixed-size batches (the last one padded)."""
  chunks = []
  for inputs, n_real in eval_batches(arrays, batch_size):
    out = predict(state.params, state.frozen, state.model_state, to_device(inputs))
    chunks.append(jax.tree.map(lambda x: np.asarray(x)[:n_real], jax.device_get(out)))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *chunks)
