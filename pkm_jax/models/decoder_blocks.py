"""The causal LMs' shared body: a pre-LN decoder layer that places memory, the decoder stack, and
the causal-LM interface (forward, hidden / logits, KV-cache decode) GPT-2 and Llama build on.

Memory placement in a pre-LN block (Kim & Jung 2020's PKM / ResM carried over from BERT's
post-LN layer):
    x += attn(norm1(x));  h = norm2(x);  x += mlp(h) [+ memory(h)]
ResM (memory_mode 'residual') puts the memory beside the MLP on the MLP's normalised input h, so a
zero value table (memory.value_zero_init) leaves the dense model exactly; PKM ('replace') drops
the MLP at that layer: x += memory(h). The memory's mask is the attention mask (real tokens), so
padding never moves its batch-norm statistics. Memory layers keep no KV cache: they see one token
at a time. Families differ only in the pieces passed in (norm, MLP, positions, biases).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pkm_jax import memory_kinds
from pkm_jax.architecture import ModelConfig
from pkm_jax.memory import ProductKeyMemory
from pkm_jax.models.causal_attention import INIT, CausalSelfAttention, head_dim, kv_heads
from pkm_jax.placement import SINGLE_DEVICE, MemoryPlacement
from pkm_jax.product_keys import MemoryAux

MakeModule = Callable[[ModelConfig, nnx.Rngs], nnx.Module]


class DecoderLayer(nnx.Module):
  """x += attn(norm1(x)); h = norm2(x); x += mlp(h) | memory(h) | mlp(h) + memory(h)."""

  def __init__(self, cfg: ModelConfig, index: int, *, make_norm: MakeModule,
               make_mlp: MakeModule, rope: bool, qkv_bias: bool, o_bias: bool,
               rngs: nnx.Rngs, placement: MemoryPlacement = SINGLE_DEVICE):
    self.attention_norm = make_norm(cfg, rngs)
    self.attention = CausalSelfAttention(cfg, rope=rope, qkv_bias=qkv_bias, o_bias=o_bias,
                                         rngs=rngs)
    self.mlp_norm = make_norm(cfg, rngs)
    self.mlp = make_mlp(cfg, rngs) if cfg.has_ffn(index) else None
    self.memory = (ProductKeyMemory(cfg.hidden_size, cfg.memory, dtype=jnp.dtype(cfg.dtype),
                                    param_dtype=jnp.dtype(cfg.param_dtype),
                                    placement=placement, rngs=rngs)
                   if cfg.has_memory(index) else None)
    self.dropout = nnx.Dropout(cfg.hidden_dropout)

  def feed_forward(self, x_BxTxD, mask_BxT, *, rngs=None, value_probe=None, tables=None
                   ) -> tuple[jax.Array, MemoryAux | None]:
    """x [B, T, D] -> x + mlp(h) [+ memory(h)], h = norm2(x)."""
    dtype = x_BxTxD.dtype
    h_BxTxD = self.mlp_norm(x_BxTxD).astype(dtype)
    update = jnp.zeros_like(x_BxTxD)
    if self.mlp is not None:
      update += self.dropout(self.mlp(h_BxTxD), deterministic=rngs is None, rngs=rngs)
    aux = None
    if self.memory is not None:
      mem, aux = self.memory(h_BxTxD, mask_BxT, rngs=rngs, value_probe=value_probe,
                             tables=tables)
      update += mem.astype(dtype)
    return x_BxTxD + update, aux

  def __call__(self, x_BxTxD, mask_BxT, positions_BxT, segment_ids_BxT=None, *, rngs=None,
               value_probe=None, tables=None) -> tuple[jax.Array, MemoryAux | None]:
    dtype = x_BxTxD.dtype
    attn = self.attention(self.attention_norm(x_BxTxD).astype(dtype), mask_BxT, positions_BxT,
                          segment_ids_BxT, rngs=rngs)
    x_BxTxD = x_BxTxD + self.dropout(attn, deterministic=rngs is None, rngs=rngs)
    return self.feed_forward(x_BxTxD, mask_BxT, rngs=rngs, value_probe=value_probe,
                             tables=tables)

  def decode(self, x_BxTxD, mask_BxT, positions_BxT, cache: dict, cache_index, key_mask_BxS
             ) -> tuple[jax.Array, dict]:
    dtype = x_BxTxD.dtype
    attn, cache = self.attention.decode(self.attention_norm(x_BxTxD).astype(dtype),
                                        positions_BxT, cache, cache_index, key_mask_BxS)
    x_BxTxD, _ = self.feed_forward(x_BxTxD + attn, mask_BxT)
    return x_BxTxD, cache


def _call_layer(layer: DecoderLayer, h_BxTxD, mask_BxT, positions_BxT, segment_ids_BxT, rngs,
                probe, tables):
  return layer(h_BxTxD, mask_BxT, positions_BxT, segment_ids_BxT, rngs=rngs, value_probe=probe,
               tables=tables)


class Decoder(nnx.Module):
  """Token (+ learned position) embeddings, decoder layers, final norm; shared memory tables.

  Param root 'decoder': embed_tokens, position_embeddings (GPT-2 only), layers[i], norm,
  memory_values (memory_down) with memory.share_values.
  """

  def __init__(self, cfg: ModelConfig, *, make_norm: MakeModule, make_mlp: MakeModule,
               learned_positions: bool, qkv_bias: bool, o_bias: bool, rngs: nnx.Rngs,
               placement: MemoryPlacement = SINGLE_DEVICE):
    self.cfg = cfg
    self.placement = placement  # also pins the hidden states to the batch's split
    embed = lambda n, axis: nnx.Embed(  # noqa: E731
        n, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
        embedding_init=nnx.with_metadata(INIT, logical_axes=(axis, "embed")), rngs=rngs)
    self.embed_tokens = embed(cfg.vocab_size, "vocab")
    self.position_embeddings = (embed(cfg.max_position_embeddings, "positions")
                                if learned_positions else None)
    self.dropout = nnx.Dropout(cfg.hidden_dropout)
    self.layers = nnx.List([
        DecoderLayer(cfg, i, make_norm=make_norm, make_mlp=make_mlp,
                     rope=not learned_positions, qkv_bias=qkv_bias, o_bias=o_bias, rngs=rngs,
                     placement=placement) for i in range(cfg.num_layers)])
    self.norm = make_norm(cfg, rngs)
    if cfg.memory.share_values and cfg.memory_layers:
      # One table for all memory layers (memory_values, and memory_down for peer): read by each,
      # so its gradient is the sum of theirs.
      for name, table in memory_kinds.make_tables(cfg.memory, cfg.hidden_size,
                                                  jnp.dtype(cfg.param_dtype), rngs).items():
        setattr(self, memory_kinds.SHARED_PREFIX + name, table)

  def embed(self, input_ids_BxT, positions_BxT, *, rngs=None) -> jax.Array:
    x_BxTxD = self.embed_tokens(input_ids_BxT)
    if self.position_embeddings is not None:
      x_BxTxD = x_BxTxD + self.position_embeddings(positions_BxT)
    return self.dropout(x_BxTxD, deterministic=rngs is None, rngs=rngs)

  def shared_tables(self, sparse: bool) -> dict[str, jax.Array] | None:
    if not (self.cfg.memory.share_values and self.cfg.memory_layers):
      return None
    tables = {name: getattr(self, memory_kinds.SHARED_PREFIX + name)[...]
              for name in memory_kinds.stored_names(self.cfg.memory)}
    # Sparse updates: the step builds the tables' row gradients from the probes.
    return jax.lax.stop_gradient(tables) if sparse else tables

  def __call__(self, input_ids_BxT, mask_BxT, positions_BxT, segment_ids_BxT=None, *,
               rngs=None, value_probes: dict[int, jax.Array] | None = None
               ) -> tuple[jax.Array, dict[int, MemoryAux]]:
    """ids / mask / positions / segments [B, T] -> hidden after the final norm [B, T, D], aux."""
    h_BxTxD = self.placement.constrain_tokens(self.embed(input_ids_BxT, positions_BxT, rngs=rngs))
    call = nnx.remat(_call_layer) if self.cfg.remat else _call_layer
    tables = self.shared_tables(bool(value_probes))
    aux = {}
    for i, layer in enumerate(self.layers):
      probe = value_probes.get(i) if value_probes else None
      h_BxTxD, layer_aux = call(layer, h_BxTxD, mask_BxT, positions_BxT, segment_ids_BxT, rngs,
                                probe, tables)
      h_BxTxD = self.placement.constrain_tokens(h_BxTxD)
      if layer_aux is not None:
        aux[i] = layer_aux
    return self.norm(h_BxTxD).astype(h_BxTxD.dtype), aux

  def decode(self, input_ids_BxT, mask_BxT, positions_BxT, cache: dict, cache_index
             ) -> tuple[jax.Array, dict]:
    h_BxTxD = self.embed(input_ids_BxT, positions_BxT)
    key_mask_BxS = jax.lax.dynamic_update_slice(
        cache["key_mask"], mask_BxT.astype(cache["key_mask"].dtype), (0, cache_index))
    layers = []
    for layer, layer_cache in zip(self.layers, cache["layers"]):
      h_BxTxD, layer_cache = layer.decode(h_BxTxD, mask_BxT, positions_BxT, layer_cache,
                                          cache_index, key_mask_BxS)
      layers.append(layer_cache)
    return (self.norm(h_BxTxD).astype(h_BxTxD.dtype),
            {"key_mask": key_mask_BxS, "layers": layers})


class CausalLM(nnx.Module):
  """The causal-LM interface (issue 28) over a Decoder: forward, hidden / logits, KV cache.

  Subclasses build `self.decoder` and set `self.lm_head` (None: tied to the token embeddings).
  """

  cfg: ModelConfig
  decoder: Decoder
  lm_head: nnx.Linear | None

  def hidden(self, input_ids_BxT, attention_mask_BxT=None, *, positions_BxT=None,
             segment_ids_BxT=None, rngs=None, value_probes=None
             ) -> tuple[jax.Array, dict[int, MemoryAux]]:
    """ids [B, T] (mask 1 = real; segment ids: packed documents, 0 = padding; positions: per
    document, default arange) -> hidden after the final norm [B, T, D], {layer: MemoryAux}."""
    b, t = input_ids_BxT.shape
    if attention_mask_BxT is None:
      attention_mask_BxT = (jnp.ones((b, t), jnp.int32) if segment_ids_BxT is None
                            else (segment_ids_BxT > 0).astype(jnp.int32))
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
    return self.decoder(input_ids_BxT, attention_mask_BxT, positions_BxT, segment_ids_BxT,
                        rngs=rngs, value_probes=value_probes)

  def logits(self, h_BxTxD: jax.Array) -> jax.Array:
    """hidden [..., D] -> float32 logits [..., V]."""
    if self.lm_head is None:
      emb = self.decoder.embed_tokens
      return emb.attend(h_BxTxD.astype(emb.dtype)).astype(jnp.float32)
    return self.lm_head(h_BxTxD).astype(jnp.float32)

  def __call__(self, input_ids_BxT, attention_mask_BxT=None, *, positions_BxT=None,
               segment_ids_BxT=None, rngs=None, value_probes=None
               ) -> tuple[jax.Array, dict[int, MemoryAux]]:
    """ids [B, T] -> logits [B, T, V] (float32), {layer: MemoryAux}; arguments as `hidden`."""
    h_BxTxD, aux = self.hidden(input_ids_BxT, attention_mask_BxT, positions_BxT=positions_BxT,
                               segment_ids_BxT=segment_ids_BxT, rngs=rngs,
                               value_probes=value_probes)
    return self.logits(h_BxTxD), aux

  def init_cache(self, batch_size: int, max_len: int) -> dict:
    """An empty KV cache: {'key_mask': [B, S] int32, 'layers': [{'k', 'v'}: [B, S, H_kv, K]]}."""
    cfg = self.cfg
    shape = (batch_size, max_len, kv_heads(cfg), head_dim(cfg))
    dtype = jnp.dtype(cfg.dtype)
    return {"key_mask": jnp.zeros((batch_size, max_len), jnp.int32),
            "layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                       for _ in range(cfg.num_layers)]}

  def decode(self, input_ids_BxT, positions_BxT, cache: dict, *, cache_index,
             attention_mask_BxT=None) -> tuple[jax.Array, dict]:
    """T tokens written at cache slots cache_index.. (prefill: the prompt; then T = 1 steps),
    each attending to the cached slots before it -> (logits [B, T, V] float32, new cache).
    attention_mask [B, T] (optional, 1 = real): padded prompt tokens are never attended to."""
    if attention_mask_BxT is None:
      attention_mask_BxT = jnp.ones(input_ids_BxT.shape, jnp.int32)
    h_BxTxD, cache = self.decoder.decode(input_ids_BxT, attention_mask_BxT, positions_BxT, cache,
                                         cache_index)
    return self.logits(h_BxTxD), cache
