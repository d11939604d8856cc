"""The causal LMs' attention pieces: RMSNorm, rotary embeddings, masks, and causal self-attention
with grouped-query heads and a KV cache.

Formulas follow Hugging Face transformers so converted checkpoints give the same logits:
RMSNorm's statistics in float32 (LlamaRMSNorm), RoPE's inverse frequencies per rope_type
(modeling_rope_utils: default, linear, llama3) applied in the rotate-half layout, softmax in
float32 whatever the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pkm_jax.architecture import ModelConfig

INIT = nnx.initializers.normal(stddev=0.02)  # GPT-2's and Llama's initializer_range
ROPE_TYPES = ("default", "linear", "llama3")


def dense(d_in: int, d_out: int, axes: tuple[str, str], cfg: ModelConfig, rngs: nnx.Rngs, *,
          bias: bool) -> nnx.Linear:
  """A Linear with kernel [in, out] and logical axes for sharding."""
  return nnx.Linear(
      d_in, d_out, use_bias=bias, dtype=jnp.dtype(cfg.dtype),
      param_dtype=jnp.dtype(cfg.param_dtype),
      kernel_init=nnx.with_metadata(INIT, logical_axes=axes),
      bias_init=nnx.with_metadata(nnx.initializers.zeros, logical_axes=axes[1:]), rngs=rngs)


class RMSNorm(nnx.Module):
  """x / rms(x) * weight, statistics in float32; the result in the input's dtype (as Llama)."""

  def __init__(self, d: int, eps: float, param_dtype, *, rngs: nnx.Rngs | None = None):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((d,), param_dtype))

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    dtype = x_BxTxD.dtype
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return self.scale[...] * x.astype(dtype)


def head_dim(cfg: ModelConfig) -> int:
  return cfg.head_dim or cfg.hidden_size // cfg.num_heads


def kv_heads(cfg: ModelConfig) -> int:
  return cfg.num_kv_heads or cfg.num_heads


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies [K/2] for cfg.rope_scaling's rope_type (transformers' formulas)."""
  scaling = dict(cfg.rope_scaling)
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"rope_type {rope_type!r} is not supported (one of {ROPE_TYPES})")
  dim = head_dim(cfg)
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  inv_freq = inv_freq.astype(np.float32)
  if rope_type == "linear":
    inv_freq = inv_freq / np.float32(scaling["factor"])
  elif rope_type == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def apply_rope(x_BxTxHxK: jax.Array, positions_BxT: jax.Array, inv_freq: np.ndarray
               ) -> jax.Array:
  """Rotate-half RoPE: x * cos + rotate_half(x) * sin, angles in float32, applied in x's dtype."""
  freqs_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(
      np.asarray(inv_freq, np.float32))
  emb = jnp.concatenate([freqs_BxTxF, freqs_BxTxF], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x_BxTxHxK.dtype), jnp.sin(emb).astype(x_BxTxHxK.dtype)
  half = x_BxTxHxK.shape[-1] // 2
  rotated = jnp.concatenate([-x_BxTxHxK[..., half:], x_BxTxHxK[..., :half]], axis=-1)
  return x_BxTxHxK * cos + rotated * sin


def attention_bias(q_slot_T: jax.Array, k_slot_S: jax.Array, key_mask_BxS: jax.Array,
                   q_segment_BxT: jax.Array | None, k_segment_BxS: jax.Array | None,
                   sliding_window: int) -> jax.Array:
  """Additive bias [B, 1, T, S]: 0 where query t may see key s, else float32's minimum.

  A query sees keys at slots <= its own (causal), that are real (key_mask), of its own document
  (segment ids equal) and, with a sliding window W, fewer than W slots back (Mistral: q - k < W).
  The minimum (not -inf) keeps a fully masked row (a padding query) finite, as HF does.
  """
  ok_TxS = k_slot_S[None, :] <= q_slot_T[:, None]
  if sliding_window:
    ok_TxS &= q_slot_T[:, None] - k_slot_S[None, :] < sliding_window
  ok_BxTxS = ok_TxS[None] & (key_mask_BxS[:, None, :] > 0)
  if q_segment_BxT is not None:
    ok_BxTxS &= q_segment_BxT[:, :, None] == k_segment_BxS[:, None, :]
  return jnp.where(ok_BxTxS, 0.0, jnp.finfo(jnp.float32).min)[:, None]


class CausalSelfAttention(nnx.Module):
  """Grouped-query self-attention (H query heads share H_kv key/value heads), optional RoPE.

  Projections q_proj / k_proj / v_proj / o_proj as HF's Llama (GPT-2's fused c_attn is split
  on conversion); output projection included, residual and norms outside.
  """

  def __init__(self, cfg: ModelConfig, *, rope: bool, qkv_bias: bool, o_bias: bool,
               rngs: nnx.Rngs):
    d, k = cfg.hidden_size, head_dim(cfg)
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, kv_heads(cfg), k
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                       f"{self.num_kv_heads}")
    self.sliding_window = cfg.sliding_window
    # A tuple of floats, not an array: NNX would take an array attribute for state, which the
    # trainer's split (params, statistics, frozen) does not cover.
    self.inv_freq = tuple(rope_inv_freq(cfg).tolist()) if rope else None
    self.q_proj = dense(d, self.num_heads * k, ("embed", "qkv"), cfg, rngs, bias=qkv_bias)
    self.k_proj = dense(d, self.num_kv_heads * k, ("embed", "qkv"), cfg, rngs, bias=qkv_bias)
    self.v_proj = dense(d, self.num_kv_heads * k, ("embed", "qkv"), cfg, rngs, bias=qkv_bias)
    self.o_proj = dense(self.num_heads * k, d, ("qkv", "embed"), cfg, rngs, bias=o_bias)
    self.attention_dropout = nnx.Dropout(cfg.attention_dropout)

  def project(self, x_BxTxD: jax.Array, positions_BxT: jax.Array
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, T, D] -> q [B, T, H, K], k and v [B, T, H_kv, K] (RoPE applied to q and k)."""
    b, t, _ = x_BxTxD.shape
    q = self.q_proj(x_BxTxD).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x_BxTxD).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x_BxTxD).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.inv_freq is not None:
      q, k = apply_rope(q, positions_BxT, self.inv_freq), apply_rope(k, positions_BxT,
                                                                      self.inv_freq)
    return q, k, v

  def attend(self, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, bias_Bx1xTxS, *, rngs=None) -> jax.Array:
    """Softmax(q k^T / sqrt(K) + bias) v over grouped heads, then o_proj -> [B, T, D]."""
    b, t, h, kd = q_BxTxHxK.shape
    g = self.num_kv_heads
    q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, g, h // g, kd)  # query head i uses kv head i // (h/g)
    logits = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxSxGxK) / math.sqrt(kd)
    logits = logits.astype(jnp.float32) + bias_Bx1xTxS[:, :, None]
    probs = jax.nn.softmax(logits, axis=-1).astype(q_BxTxHxK.dtype)
    probs = self.attention_dropout(probs, deterministic=rngs is None, rngs=rngs)
    ctx = jnp.einsum("bgrts,bsgk->btgrk", probs, v_BxSxGxK)
    return self.o_proj(ctx.reshape(b, t, h * kd))

  def __call__(self, x_BxTxD, mask_BxT, positions_BxT, segment_ids_BxT=None, *, rngs=None
               ) -> jax.Array:
    """Full-sequence attention: x [B, T, D], mask / positions / segment ids [B, T] -> [B, T, D]."""
    q, k, v = self.project(x_BxTxD, positions_BxT)
    slots = jnp.arange(x_BxTxD.shape[1])
    bias = attention_bias(slots, slots, mask_BxT, segment_ids_BxT, segment_ids_BxT,
                          self.sliding_window)
    return self.attend(q, k, v, bias, rngs=rngs)

  def decode(self, x_BxTxD, positions_BxT, cache: dict, cache_index, key_mask_BxS
             ) -> tuple[jax.Array, dict]:
    """T new tokens written into cache slots cache_index.. and attended with the cached ones.

    cache {'k', 'v'}: [B, S, H_kv, K]; key_mask [B, S] (1 = a real token in that slot).
    """
    q, k, v = self.project(x_BxTxD, positions_BxT)
    start = (0, cache_index, 0, 0)
    cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start),
             "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)}
    q_slots = cache_index + jnp.arange(x_BxTxD.shape[1])
    k_slots = jnp.arange(cache["k"].shape[1])
    bias = attention_bias(q_slots, k_slots, key_mask_BxS, None, None, self.sliding_window)
    return self.attend(q, cache["k"], cache["v"], bias), cache
