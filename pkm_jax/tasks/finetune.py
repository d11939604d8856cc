"""Fine-tuning on GLUE / SQuAD v1.1: `finetune_and_evaluate(config, workdir)` (what eval.py runs).

  init.pretrained (a pretraining workdir's latest checkpoint, a converted checkpoint or an HF
  folder) -> encoder weights (+ BatchNorm statistics of the memory queries, + pooler when
  present) -> task head (heads.py) -> the shared training program and loop -> dev metrics.

Task data comes from finetune_glue.py / finetune_squad.py, the run from task_run.py; the config
schema is task_config.py. Memory options: optim.values_lr (the value tables' own peak learning
rate), optim.values_optimizer='sparse_adam', optim.freeze_memory (keys, values, query net and its
BatchNorm statistics are left exactly as pretrained: they are not even differentiated), and
dropout overrides (-1 keeps the checkpoint's).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from pkm_jax import pretrained as pretrained_lib
from pkm_jax import storage
from pkm_jax.tasks import finetune_glue, finetune_squad, task_config
from pkm_jax.tasks.task_model import Pretrained, load_init, restore_task_model

__all__ = ["finetune_and_evaluate", "default_workdir", "restore_task_model"]


def default_workdir(init: str) -> str:
  """<init>/finetune for a pretraining workdir; workdirs/finetune/<name> for model folders."""
  if pretrained_lib.is_workdir(init):
    return os.path.join(init, "finetune")
  return os.path.join("workdirs", "finetune", os.path.basename(os.path.normpath(init)))


def finetune_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None = None
                          ) -> dict[str, Any]:
  """One task (config.task) or a GLUE suite (config.tasks); returns the JSON-able metrics."""
  task_config.validate(config)
  workdir = storage.absolute(workdir or default_workdir(config.init.pretrained))
  cache: list[Pretrained] = []

  def load() -> Pretrained:  # the init checkpoint is read once, and only if a task needs it
    if not cache:
      cache.append(load_init(config.init.pretrained))
    return cache[0]

  if config.tasks:
    return finetune_glue.run_suite(config, workdir, load)
  if config.task == "squad":
    return finetune_squad.run(config, os.path.join(workdir, "squad"), load)
  return finetune_glue.run(config, os.path.join(workdir, config.task), load)
