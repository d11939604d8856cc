"""Evaluate a pretraining workdir's checkpoint on the held-out split.

  python eval.py --config configs/default.py --workdir workdirs/default [--step N]

Prints MLM loss / perplexity / accuracy and, per memory layer, MU, top-1 MU, KL_u and KL_w
(SPEC.md §3) as one JSON object on the last line, and writes it to DIR/eval/metrics.json.
"""

import json
import os

from absl import flags
from ml_collections import config_flags

from pkm_jax import cli

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "default.py"), "Config file (get_config()).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the run to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  from pkm_jax import evaluate  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join(
      "workdirs", os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0])
  result = evaluate.evaluate_workdir(config, workdir, _STEP.value)
  print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  cli.run(main)
