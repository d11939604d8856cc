"""BERT-large + PKM (Lample et al.): the FFN of each memory layer is replaced by memory.

Two memory layers of 512**2 slots (4 heads, k=32, k_dim 256, v_dim = hidden): 860M parameters,
as in the paper's table. Add --config.init.from=DIR for "+Init" (start from dense BERT weights).
"""

from pkm_jax.config import base_config


def get_config():
  config = base_config()
  config.model.update(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                      max_position_embeddings=512)
  config.memory.update(mode="replace", layers=(11, 19), n_keys=512, heads=4, k=32, k_dim=256,
                       v_dim=0, query_norm="batchnorm")
  config.data.update(vocab_size=30522, max_len=128, batch_size=256)
  config.optim.update(lr=1e-4, warmup_steps=10_000, decay="linear", weight_decay=0.01,
                      values_optimizer="adam", values_lr=1e-3, values_weight_decay=0.0)
  config.train.update(steps=1_000_000, checkpoint_every=10_000, eval_every=10_000)
  return config
