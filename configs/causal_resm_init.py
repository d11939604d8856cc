"""+Init ResM for a pretrained causal LM (GPT-2, Llama, Qwen2, Mistral): the memory goes beside
the MLP of two layers of the pretrained model, its values start at zero, so at step 0 the model
computes exactly the pretrained logits; then next-token training on your text.

  python -m pkm_jax.convert --hf_dir /models/gpt2 --out /ckpt/gpt2
  python train.py --config configs/causal_resm_init.py --config.init.pretrained=/ckpt/gpt2 \\
      --config.data.source=files --config.data.files='/data/wiki/*.txt'

The model's sizes, family and tokenizer are the pretrained model's (`model.*` stays at
base_config's defaults: plus_init.resolve_model_config takes them); `memory.layers` are 0-based
and must exist in it (GPT-2 small has 12: 5 and 9 here, as benchmarks/decoder_speed.py).
The memory queries are LayerNorm-normalised (`memory.query_norm='auto'` for a causal model).
"""

from pkm_jax.config import base_config


def get_config():
  config = base_config()
  config.model.update(hidden_dropout=0.0, attention_dropout=0.0)
  # The paper's memory (512^2 slots, 4 heads, k = 32) beside the MLP of two middle layers.
  config.memory.update(mode="residual", layers=(5, 9), n_keys=512, heads=4, k=32, k_dim=256,
                       value_zero_init=True)
  config.data.update(source="generated", max_len=128, batch_size=16, eval_fraction=0.05)
  config.data.generated.update(num_entities=600, num_docs=6000, seed=0)
  # The pretrained network continues gently; the new values learn at XLM's rate.
  config.optim.update(lr=5e-5, warmup_steps=100, decay="linear", weight_decay=0.01,
                      values_lr=1e-3)
  config.train.update(steps=2000, log_every=50, eval_every=500, checkpoint_every=500,
                      keep_checkpoints=2, eval_batches=20, memory_stats_every=250)
  return config
