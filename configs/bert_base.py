"""BERT-base (110M) without memory: the paper's baseline (a) and the dense model for +Init."""

from pkm_jax.config import base_config


def get_config():
  config = base_config()
  config.model.update(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                      max_position_embeddings=512)
  config.memory.mode = "none"
  config.data.update(vocab_size=30522, max_len=128, batch_size=256)
  config.optim.update(lr=1e-4, warmup_steps=10_000, decay="linear", weight_decay=0.01)
  config.train.update(steps=1_000_000, checkpoint_every=10_000, eval_every=10_000)
  return config
