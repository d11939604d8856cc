"""BERT (post-LN, exact GELU) whose chosen layers replace (PKM) or augment (ResM) the FFN with memory.

Parameter names follow Hugging Face's BertModel closely so conversion is a renaming:
  bert.embeddings.{word,position,token_type}_embeddings, bert.embeddings.layer_norm,
  bert.layers[i].attention.{query,key,value,output}, .attention_norm, .ffn.{intermediate,output},
  .memory, .output_norm, bert.pooler, mlm_head.{transform,transform_norm,bias}.
Linear kernels are [in, out] (torch's weight transposed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pkm_jax import memory_kinds
from pkm_jax.architecture import ModelConfig
from pkm_jax.memory import ProductKeyMemory
from pkm_jax.placement import SINGLE_DEVICE, MemoryPlacement
from pkm_jax.product_keys import MemoryAux

_INIT = nnx.initializers.truncated_normal(stddev=0.02)  # BERT's initializer_range


def _dense(d_in: int, d_out: int, axes: tuple[str, str], cfg: ModelConfig, rngs: nnx.Rngs):
  return nnx.Linear(
      d_in, d_out, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
      kernel_init=nnx.with_metadata(_INIT, logical_axes=axes),
      bias_init=nnx.with_metadata(nnx.initializers.zeros, logical_axes=axes[1:]), rngs=rngs)


def _layer_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # LayerNorm statistics stay float32 under bf16 compute.
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=jnp.float32,
                       param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


def _embed(n: int, cfg: ModelConfig, axis: str, rngs: nnx.Rngs) -> nnx.Embed:
  return nnx.Embed(n, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype),
                   param_dtype=jnp.dtype(cfg.param_dtype),
                   embedding_init=nnx.with_metadata(_INIT, logical_axes=(axis, "embed")),
                   rngs=rngs)


def gelu(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=False)  # BERT's exact erf GELU


class Embeddings(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.word_embeddings = _embed(cfg.vocab_size, cfg, "vocab", rngs)
    self.position_embeddings = _embed(cfg.max_position_embeddings, cfg, "positions", rngs)
    self.token_type_embeddings = _embed(cfg.type_vocab_size, cfg, "types", rngs)
    self.layer_norm = _layer_norm(cfg, rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout)

  def __call__(self, input_ids_BxT, token_type_ids_BxT, *, rngs=None) -> jax.Array:
    t = input_ids_BxT.shape[1]
    x_BxTxD = (self.word_embeddings(input_ids_BxT)
               + self.position_embeddings(jnp.arange(t)[None, :])
               + self.token_type_embeddings(token_type_ids_BxT))
    x_BxTxD = self.layer_norm(x_BxTxD).astype(self.word_embeddings.dtype)
    return self.dropout(x_BxTxD, deterministic=rngs is None, rngs=rngs)


class SelfAttention(nnx.Module):
  """Multi-head self-attention; output projection included, residual and LN outside."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.num_heads = cfg.num_heads
    self.query = _dense(d, d, ("embed", "qkv"), cfg, rngs)
    self.key = _dense(d, d, ("embed", "qkv"), cfg, rngs)
    self.value = _dense(d, d, ("embed", "qkv"), cfg, rngs)
    self.output = _dense(d, d, ("qkv", "embed"), cfg, rngs)
    self.attention_dropout = nnx.Dropout(cfg.attention_dropout)

  def __call__(self, x_BxTxD, mask_BxT, *, rngs=None) -> jax.Array:
    b, t, d = x_BxTxD.shape
    h = self.num_heads
    q_BxTxHxK = self.query(x_BxTxD).reshape(b, t, h, d // h)
    k_BxSxHxK = self.key(x_BxTxD).reshape(b, t, h, d // h)
    v_BxSxHxK = self.value(x_BxTxD).reshape(b, t, h, d // h)
    logits_BxHxTxS = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxSxHxK) / jnp.sqrt(d // h)
    logits_BxHxTxS = logits_BxHxTxS.astype(jnp.float32)
    # Padding keys get the dtype's minimum, as HF does, so a fully padded row stays finite.
    bias_Bx1x1xS = jnp.where(mask_BxT[:, None, None, :] > 0, 0.0,
                             jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits_BxHxTxS + bias_Bx1x1xS, axis=-1).astype(x_BxTxD.dtype)
    probs = self.attention_dropout(probs, deterministic=rngs is None, rngs=rngs)
    ctx_BxTxHxK = jnp.einsum("bhts,bshk->bthk", probs, v_BxSxHxK)
    return self.output(ctx_BxTxHxK.reshape(b, t, d))


class FeedForward(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.intermediate = _dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), cfg,
                               rngs)
    self.output = _dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), cfg, rngs)

  def __call__(self, x_BxTxD) -> jax.Array:
    return self.output(gelu(self.intermediate(x_BxTxD)))


class EncoderLayer(nnx.Module):
  """a = LN(x + Attn(x));  h = LN(a + FFN(a)) | LN(a + PKM(a)) | LN(a + FFN(a) + PKM(a))."""

  def __init__(self, cfg: ModelConfig, index: int, *, rngs: nnx.Rngs,
               placement: MemoryPlacement = SINGLE_DEVICE):
    self.attention = SelfAttention(cfg, rngs=rngs)
    self.attention_norm = _layer_norm(cfg, rngs)
    self.ffn = FeedForward(cfg, rngs=rngs) if cfg.has_ffn(index) else None
    self.memory = (ProductKeyMemory(cfg.hidden_size, cfg.memory, dtype=jnp.dtype(cfg.dtype),
                                    param_dtype=jnp.dtype(cfg.param_dtype),
                                    placement=placement, rngs=rngs)
                   if cfg.has_memory(index) else None)
    self.output_norm = _layer_norm(cfg, rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout)

  def __call__(self, x_BxTxD, mask_BxT, *, rngs=None, value_probe=None, tables=None
               ) -> tuple[jax.Array, MemoryAux | None]:
    det = rngs is None
    dtype = x_BxTxD.dtype
    attn = self.dropout(self.attention(x_BxTxD, mask_BxT, rngs=rngs), deterministic=det,
                        rngs=rngs)
    a_BxTxD = self.attention_norm(x_BxTxD + attn).astype(dtype)
    update = jnp.zeros_like(a_BxTxD)
    if self.ffn is not None:
      update += self.dropout(self.ffn(a_BxTxD), deterministic=det, rngs=rngs)
    aux = None
    if self.memory is not None:
      mem, aux = self.memory(a_BxTxD, mask_BxT, rngs=rngs, value_probe=value_probe,
                             tables=tables)
      update += mem
    return self.output_norm(a_BxTxD + update).astype(dtype), aux


class Pooler(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.dense = _dense(cfg.hidden_size, cfg.hidden_size, ("embed", "embed_out"), cfg, rngs)

  def __call__(self, h_BxTxD) -> jax.Array:
    return jnp.tanh(self.dense(h_BxTxD[:, 0]))


def _call_layer(layer: EncoderLayer, h_BxTxD, mask_BxT, rngs, probe, tables):
  return layer(h_BxTxD, mask_BxT, rngs=rngs, value_probe=probe, tables=tables)


class BertModel(nnx.Module):
  """Embeddings + encoder (+ optional pooler). Returns hidden states and memory picks.

  `placement` tells the memory layers how their search and lookup run on the device mesh.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs,
               placement: MemoryPlacement = SINGLE_DEVICE):
    self.cfg = cfg
    self.placement = placement  # also pins the hidden states to the batch's split
    self.embeddings = Embeddings(cfg, rngs=rngs)
    self.layers = nnx.List([EncoderLayer(cfg, i, rngs=rngs, placement=placement)
                            for i in range(cfg.num_layers)])
    if cfg.memory.share_values and cfg.memory_layers:
      # One table for all memory layers (memory_values, and memory_down for peer): read by each,
      # so its gradient is the sum of theirs.
      for name, table in memory_kinds.make_tables(cfg.memory, cfg.hidden_size,
                                                  jnp.dtype(cfg.param_dtype), rngs).items():
        setattr(self, memory_kinds.SHARED_PREFIX + name, table)
    self.pooler = Pooler(cfg, rngs=rngs) if cfg.use_pooler else None

  def __call__(self, input_ids_BxT, attention_mask_BxT, token_type_ids_BxT=None, *, rngs=None,
               value_probes: dict[int, jax.Array] | None = None
               ) -> tuple[jax.Array, dict[int, MemoryAux]]:
    """ids/mask/types [B, T] -> hidden [B, T, D], {layer: MemoryAux}."""
    if token_type_ids_BxT is None:
      token_type_ids_BxT = jnp.zeros_like(input_ids_BxT)
    h_BxTxD = self.placement.constrain_tokens(
        self.embeddings(input_ids_BxT, token_type_ids_BxT, rngs=rngs))
    aux = {}
    call = _call_layer
    if self.cfg.remat:  # activations of each layer are recomputed in the backward pass
      call = nnx.remat(_call_layer)
    tables = None
    if self.cfg.memory.share_values and self.cfg.memory_layers:
      tables = {name: getattr(self, memory_kinds.SHARED_PREFIX + name)[...]
                for name in memory_kinds.stored_names(self.cfg.memory)}
      if value_probes:  # sparse updates: the step builds the tables' row gradients
        tables = jax.lax.stop_gradient(tables)
    for i, layer in enumerate(self.layers):
      probe = value_probes.get(i) if value_probes else None
      h_BxTxD, layer_aux = call(layer, h_BxTxD, attention_mask_BxT, rngs, probe, tables)
      h_BxTxD = self.placement.constrain_tokens(h_BxTxD)
      if layer_aux is not None:
        aux[i] = layer_aux
    return h_BxTxD, aux


class MLMHead(nnx.Module):
  """dense -> GELU -> LN -> logits with the decoder tied to the word embeddings, own bias."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.transform = _dense(cfg.hidden_size, cfg.hidden_size, ("embed", "embed_out"), cfg, rngs)
    self.transform_norm = _layer_norm(cfg, rngs)
    self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.dtype(cfg.param_dtype)),
                          logical_axes=("vocab",))

  def __call__(self, h_BxTxD, word_embeddings: nnx.Embed) -> jax.Array:
    x = self.transform_norm(gelu(self.transform(h_BxTxD)))
    logits_BxTxV = word_embeddings.attend(x.astype(word_embeddings.dtype))
    return logits_BxTxV.astype(jnp.float32) + self.bias[...]


class BertForMaskedLM(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs,
               placement: MemoryPlacement = SINGLE_DEVICE):
    self.cfg = cfg
    self.bert = BertModel(cfg, rngs=rngs, placement=placement)
    self.mlm_head = MLMHead(cfg, rngs=rngs)

  def __call__(self, input_ids_BxT, attention_mask_BxT, token_type_ids_BxT=None, *, rngs=None,
               value_probes: dict[int, jax.Array] | None = None
               ) -> tuple[jax.Array, dict[int, MemoryAux]]:
    """ids/mask/types [B, T] -> logits [B, T, vocab] (float32), {layer: MemoryAux}."""
    h_BxTxD, aux = self.bert(input_ids_BxT, attention_mask_BxT, token_type_ids_BxT, rngs=rngs,
                             value_probes=value_probes)
    return self.mlm_head(h_BxTxD, self.bert.embeddings.word_embeddings), aux
