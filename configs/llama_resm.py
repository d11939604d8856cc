"""Tiny Llama + ResM on the embedded generated corpus (RMSNorm, RoPE, SwiGLU, grouped-query
attention, untied head): a causal LM whose loss visibly falls in minutes on a CPU.

  python train.py --config configs/llama_resm.py --config.train.steps=300
  python eval.py --workdir workdirs/llama_resm

The data and memory are configs/gpt2_resm.py's (see there why the memory queries use
LayerNorm, not BatchNorm).
"""

from configs import gpt2_resm


def get_config():
  config = gpt2_resm.get_config()
  config.model.update(family="llama", num_heads=4, num_kv_heads=2, intermediate_size=344,
                      hidden_dropout=0.0, attention_dropout=0.0, layer_norm_eps=1e-6,
                      tie_embeddings=False, rope_theta=10000.0)
  return config
