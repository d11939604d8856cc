"""Tiny GPT-2 + ResM on the embedded generated corpus: a causal LM whose loss visibly falls in
minutes on a CPU.

  python train.py --config configs/gpt2_resm.py --config.train.steps=300
  python eval.py --workdir workdirs/gpt2_resm

Next-token loss on documents packed with EOS between them (attention never crosses a document;
pkm_jax/data/causal.py), a byte-level BPE learnt from the corpus (data.vocab_size).
"""

from pkm_jax.config import base_config


def get_config():
  config = base_config()
  config.model.update(family="gpt2", hidden_size=128, num_layers=4, num_heads=4,
                      intermediate_size=512, max_position_embeddings=128, hidden_dropout=0.1,
                      attention_dropout=0.1, layer_norm_eps=1e-5, tie_embeddings=True)
  # ResM (FFN + memory) at the middle and the top layer; 128**2 = 16,384 slots. The queries are
  # normalised per token (LayerNorm): BatchNorm's statistics over a batch would mix later
  # tokens into every position (allowed, with a warning; "auto" picks LayerNorm for decoders).
  config.memory.update(mode="residual", layers=(1, 3), n_keys=128, heads=4, k=16, k_dim=64,
                       query_norm="layernorm", input_dropout=0.1, query_dropout=0.0,
                       value_dropout=0.1)
  config.data.update(source="generated", vocab_size=2000, max_len=64, batch_size=32,
                     eval_fraction=0.05)
  config.data.generated.update(num_entities=600, num_docs=6000, seed=0)
  config.optim.update(lr=1e-3, warmup_steps=100, decay="linear", weight_decay=0.01,
                      values_lr=1e-3)
  config.train.update(steps=1500, log_every=50, eval_every=500, checkpoint_every=500,
                      keep_checkpoints=2, eval_batches=20, memory_stats_every=250)
  return config
