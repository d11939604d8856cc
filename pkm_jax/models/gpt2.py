"""GPT-2 (learned positions, pre-LN LayerNorm, tanh GELU, biases everywhere, tied embeddings)
whose chosen layers replace (PKM) or augment (ResM) the MLP with memory (decoder_blocks.py).

Parameter names follow Hugging Face's GPT2LMHeadModel, so conversion is a renaming (HF's fused
c_attn is split into q/k/v; Conv1D weights are already [in, out]):
  decoder.embed_tokens (wte), decoder.position_embeddings (wpe),
  decoder.layers[i].attention_norm (ln_1), .attention.{q,k,v,o}_proj (attn.c_attn / c_proj),
  .mlp_norm (ln_2), .mlp.{c_fc,c_proj}, .memory, decoder.norm (ln_f); lm_head only when untied.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pkm_jax.architecture import ModelConfig
from pkm_jax.models.causal_attention import dense
from pkm_jax.models.decoder_blocks import CausalLM, Decoder
from pkm_jax.placement import SINGLE_DEVICE, MemoryPlacement


def layer_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # LayerNorm statistics stay float32 under bf16 compute.
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=jnp.float32,
                       param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


class GPT2MLP(nnx.Module):
  """c_proj(gelu_new(c_fc(x))): GPT-2's tanh-approximated GELU."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.c_fc = dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), cfg, rngs,
                      bias=True)
    self.c_proj = dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), cfg, rngs,
                        bias=True)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    return self.c_proj(jax.nn.gelu(self.c_fc(x_BxTxD), approximate=True))


class GPT2LMHeadModel(CausalLM):
  """GPT-2 causal LM with memory; the interface is decoder_blocks.CausalLM's."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs,
               placement: MemoryPlacement = SINGLE_DEVICE):
    self.cfg = cfg
    self.decoder = Decoder(cfg, make_norm=layer_norm, make_mlp=GPT2MLP, learned_positions=True,
                           qkv_bias=True, o_bias=True, rngs=rngs, placement=placement)
    self.lm_head = (None if cfg.tie_embeddings else
                    dense(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), cfg, rngs,
                          bias=False))
