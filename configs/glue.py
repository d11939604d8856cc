"""Fine-tune a pretrained model on a GLUE task and report dev metrics (run with eval.py).

  python eval.py --config configs/glue.py --config.task=sst2 --config.init.pretrained=WORKDIR \
      --config.data.data_dir=/data/glue [--workdir FT_DIR]
  python eval.py --config configs/glue.py --config.tasks=all_glue \
      --config.init.pretrained=WORKDIR --config.data.data_dir=/data/glue  # + the paper's table

BERT's fine-tuning recipe: AdamW lr 2e-5, batch 32, 3 epochs, 10% warmup then linear decay,
max_len 128. Every key: pkm_jax/tasks/task_config.py: base_config().
"""

from pkm_jax.tasks.task_config import base_config


def get_config():
  config = base_config()
  config.task = "sst2"
  config.data.update(max_len=128, batch_size=32)
  config.optim.update(lr=2e-5, warmup_fraction=0.1)
  config.train.epochs = 3.0
  return config
