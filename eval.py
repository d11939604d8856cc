"""Evaluate a pretraining workdir, or fine-tune a pretrained model on GLUE / SQuAD.

  python eval.py --workdir workdirs/default [--step N] [--config.data.files=...]

evaluates the run's checkpoint (latest by default) on its held-out split: MLM loss, perplexity,
accuracy (a causal LM's run: next-token lm_loss, lm_perplexity, lm_accuracy over eval_tokens
predicted tokens) and, per memory layer, MU, top-1 MU, KL_u and KL_w (Kim & Jung 2020, §4.1),
as one JSON object on the last line and in DIR/eval/metrics.json. It starts from the run's saved
config.json; --config.x.y overrides apply on top (those that would change the model are refused).

A fine-tuning config (one with a `task` key: configs/glue.py, configs/squad.py) instead
fine-tunes --config.init.pretrained on the task and prints its dev metrics:

  python eval.py --config configs/glue.py --config.task=sst2 --config.init.pretrained=DIR \\
      --config.data.data_dir=/data/glue [--workdir FT_DIR]
"""

import json
import os

from pkm_jax import host_memory

if __name__ == "__main__":
  host_memory.reexec_with_huge_pages()  # first: the imports below would otherwise run twice

from absl import flags  # noqa: E402

from pkm_jax import cli  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = cli.define_config(os.path.join(_HERE, "configs", "default.py"))
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the run to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  if "task" in config or "tasks" in config:
    if _STEP.value is not None:
      raise ValueError("--step does not apply to fine-tuning (it starts from the latest "
                       "checkpoint of --config.init.pretrained)")
    from pkm_jax.tasks import finetune  # pylint: disable=g-import-not-at-top  # start-up time
    print(json.dumps(finetune.finetune_and_evaluate(config, _WORKDIR.value), sort_keys=True))
    return
  from pkm_jax import evaluate  # pylint: disable=g-import-not-at-top  # start-up time
  workdir = _WORKDIR.value or os.path.join("workdirs", cli.config_name())
  config = evaluate.run_config(workdir, cli.config_overrides(), config)
  result = evaluate.evaluate_workdir(config, workdir, _STEP.value)
  print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  cli.run(main)
