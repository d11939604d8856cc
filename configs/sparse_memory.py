"""Continued training of a pretrained memory model on new text, writing only the memory slots
the new text uses far more than pretraining text did (sparse memory fine-tuning, Lin et al.
2025; pkm_jax.continual):

  python train.py --config configs/sparse_memory.py --workdir FT \\
      --config.init.pretrained=PRE --config.data.source=files --config.data.files=new.txt

PRE: a pkm-jax training workdir (its memory config and tokenizer are taken; the idf's
background sample is its own training data unless finetune.background_files is set), or a
converted checkpoint / Hugging Face folder of a memory model with finetune.background_files.
`--config.finetune.method=full|lora|memory` runs the other methods on the same settings.
"""

from pkm_jax.config import base_config


def get_config():
  config = base_config()
  # Model sizes and memory come from init.pretrained (model.* / memory.mode left at defaults).
  config.model.update(hidden_dropout=0.0, attention_dropout=0.0)
  config.finetune.update(method="sparse_memory", top_t=1000, refresh="batch",
                         background_batches=16)
  config.data.update(source="generated", max_len=64, batch_size=32, eval_fraction=0.05)
  # Fine-tuning rates: the network (full, lora) gently, the value rows at XLM's 1e-3; sparse
  # Adam on the value rows, so an unselected (or unread) row is never written.
  config.optim.update(lr=1e-4, warmup_steps=0, decay="constant", weight_decay=0.0,
                      values_lr=1e-3, values_optimizer="sparse_adam", grad_clip=1.0)
  config.train.update(steps=200, log_every=20, eval_every=100, checkpoint_every=100,
                      keep_checkpoints=1, eval_batches=10, memory_stats_every=100)
  return config
