"""Fine-tune a pretrained model on a GLUE task and report dev metrics (run with eval.py).

  python eval.py --config configs/glue.py --config.task=sst2 --config.init=WORKDIR \
      --config.data_dir=/data/glue [--workdir FT_DIR]
  python eval.py --config configs/glue.py --config.tasks=all_glue --config.init=WORKDIR \
      --config.data_dir=/data/glue          # every task found + the paper's table

BERT's fine-tuning recipe: AdamW lr 2e-5, batch 32, 3 epochs, 10% warmup then linear decay,
max_len 128. Every key: pkm_jax.tasks.finetune.base_config().
"""

from pkm_jax.tasks.finetune import base_config


def get_config():
  config = base_config()
  config.update(task="sst2", max_len=128, lr=2e-5, batch_size=32, epochs=3.0,
                warmup_fraction=0.1)
  return config
