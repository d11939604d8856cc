"""Llama (RMSNorm, RoPE, SwiGLU, grouped-query attention) whose chosen layers replace (PKM) or
augment (ResM) the MLP with memory (decoder_blocks.py). Qwen2 (q/k/v biases: `qkv_bias`) and
Mistral (`sliding_window`) checkpoints are this model with their switches.

Parameter names follow Hugging Face's LlamaForCausalLM, so conversion is a renaming:
  decoder.embed_tokens, decoder.layers[i].attention_norm (input_layernorm),
  .attention.{q,k,v,o}_proj (self_attn.*), .mlp_norm (post_attention_layernorm),
  .mlp.{gate,up,down}_proj, .memory, decoder.norm; lm_head (None when tied).
Kernels are [in, out] (torch's weight transposed); RMSNorm's weight is `scale`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pkm_jax.architecture import ModelConfig
from pkm_jax.models.causal_attention import RMSNorm, dense
from pkm_jax.models.decoder_blocks import CausalLM, Decoder
from pkm_jax.placement import SINGLE_DEVICE, MemoryPlacement


def rms_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> RMSNorm:
  return RMSNorm(cfg.hidden_size, cfg.layer_norm_eps, jnp.dtype(cfg.param_dtype), rngs=rngs)


class LlamaMLP(nnx.Module):
  """down_proj(silu(gate_proj(x)) * up_proj(x)): SwiGLU."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, m = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = dense(d, m, ("embed", "mlp"), cfg, rngs, bias=cfg.mlp_bias)
    self.up_proj = dense(d, m, ("embed", "mlp"), cfg, rngs, bias=cfg.mlp_bias)
    self.down_proj = dense(m, d, ("mlp", "embed"), cfg, rngs, bias=cfg.mlp_bias)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x_BxTxD)) * self.up_proj(x_BxTxD))


class LlamaForCausalLM(CausalLM):
  """Llama / Qwen2 / Mistral causal LM with memory; the interface is decoder_blocks.CausalLM's."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs,
               placement: MemoryPlacement = SINGLE_DEVICE):
    self.cfg = cfg
    self.decoder = Decoder(cfg, make_norm=rms_norm, make_mlp=LlamaMLP, learned_positions=False,
                           qkv_bias=cfg.attention_bias or cfg.qkv_bias,
                           o_bias=cfg.attention_bias, rngs=rngs, placement=placement)
    self.lm_head = (None if cfg.tie_embeddings else
                    dense(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), cfg, rngs,
                          bias=False))
