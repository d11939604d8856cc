"""Pretrain BERT with product-key memory by masked language modelling, or a causal LM
(configs/gpt2_resm.py, configs/llama_resm.py) by next-token prediction.

  python train.py                                    # configs/default.py -> workdirs/default
  python train.py --config configs/bert_base_resm.py --workdir /ckpt/resm --config.train.steps=500000

Re-running the same command on the same --workdir resumes from its latest checkpoint.
"""

import os

from pkm_jax import host_memory

if __name__ == "__main__":
  host_memory.reexec_with_huge_pages()  # first: the imports below would otherwise run twice

from absl import flags  # noqa: E402

from pkm_jax import cli  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = cli.define_config(os.path.join(_HERE, "configs", "default.py"))
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Output folder (default: workdirs/<config file name>).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-host: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Multi-host with the cluster's own settings "
                               "(TPU pod, SLURM...): jax.distributed.initialize() finds them.")


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  # pylint: disable-next=g-import-not-at-top  # start-up time: --help and flag errors are quick
  from pkm_jax import distributed, trainer
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         auto=_MULTIHOST.value)
  workdir = _WORKDIR.value or os.path.join("workdirs", cli.config_name())
  result = trainer.train_and_evaluate(_CONFIG.value, workdir)
  name = "lm" if "lm_loss" in result else "mlm"
  print(f"Finished: {workdir} step {result['step']} eval {name}_loss={result[f'{name}_loss']:.4f} "
        f"perplexity={result[f'{name}_perplexity']:.3f} "
        f"accuracy={result[f'{name}_accuracy']:.4f}")


if __name__ == "__main__":
  cli.run(main)
