"""Evaluate a pretraining workdir's checkpoint on the held-out split.

  python eval.py --config configs/default.py --workdir workdirs/default [--step N]

Prints MLM loss / perplexity / accuracy and, per memory layer, MU, top-1 MU, KL_u and KL_w
(SPEC.md §3) as one JSON object on the last line, and writes it to DIR/eval/metrics.json.

A fine-tuning config (one with a `task` key: configs/glue.py, configs/squad.py) instead
fine-tunes --config.init on the task and prints its dev metrics (pkm_jax/tasks/finetune.py):

  python eval.py --config configs/glue.py --config.task=sst2 --config.init=DIR \
      --config.data_dir=/data/glue [--workdir FT_DIR]
"""

import json
import os

from absl import flags

from pkm_jax import cli

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = cli.define_config(os.path.join(_HERE, "configs", "default.py"))
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the run to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  from pkm_jax import evaluate  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  if "task" in config or "tasks" in config:
    if _STEP.value is not None:
      raise ValueError("--step does not apply to fine-tuning (it starts from the latest "
                       "checkpoint of --config.init)")
    from pkm_jax.tasks import finetune  # pylint: disable=g-import-not-at-top
    print(json.dumps(finetune.finetune_and_evaluate(config, _WORKDIR.value), sort_keys=True))
    return
  workdir = _WORKDIR.value or os.path.join(
      "workdirs", os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0])
  result = evaluate.evaluate_workdir(config, workdir, _STEP.value)
  print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  cli.run(main)
