"""Product-key memory layer (Lample et al. 2019), Flax NNX: query network, exact product-key
search, softmax weights and a weighted sum of value rows (the operations are in `product_keys.py`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from pkm_jax.config import MemoryConfig
from pkm_jax.placement import SINGLE_DEVICE, MemoryPlacement
from pkm_jax.product_keys import MemoryAux


class ProductKeyMemory(nnx.Module):
  """Query net -> product-key top-k per head -> softmax -> weighted sum of value rows.

  Params: query_proj (Linear d_in -> heads*k_dim), query_norm, keys [H, 2, n_keys, k_dim/2],
  values [n_keys**2, v_dim]. Heads are summed, as XLM's EmbeddingBag(mode='sum').
  """

  def __init__(self, d_in: int, cfg: MemoryConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, placement: MemoryPlacement = SINGLE_DEVICE,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.placement = placement  # how search and lookup run on the mesh (not what they compute)
    self.dtype = dtype
    h, kd = cfg.heads, cfg.k_dim
    self.input_dropout = nnx.Dropout(cfg.input_dropout)
    # The whole query path runs in float32 even under bf16 compute: near-ties between product
    # keys decide which rows are read, and the projection is a small part of the layer's cost.
    self.query_proj = nnx.Linear(
        d_in, h * kd, dtype=jnp.float32, param_dtype=param_dtype,
        kernel_init=nnx.with_metadata(nnx.initializers.lecun_normal(),
                                      logical_axes=("embed", "mem_query")),
        bias_init=nnx.with_metadata(nnx.initializers.zeros, logical_axes=("mem_query",)),
        rngs=rngs)
    if cfg.query_norm == "batchnorm":
      # XLM's authors found batchnorm on the query best: it spreads queries over the keys.
      self.query_norm = nnx.BatchNorm(h * kd, momentum=0.9, epsilon=1e-5, dtype=jnp.float32,
                                      param_dtype=param_dtype, rngs=rngs)
    elif cfg.query_norm == "layernorm":
      self.query_norm = nnx.LayerNorm(h * kd, epsilon=1e-5, dtype=jnp.float32,
                                      param_dtype=param_dtype, rngs=rngs)
    else:
      self.query_norm = None
    self.query_dropout = nnx.Dropout(cfg.query_dropout)
    bound = 1.0 / math.sqrt(kd // 2)
    self.keys = nnx.Param(
        jax.random.uniform(rngs.params(), (h, 2, cfg.n_keys, kd // 2), param_dtype,
                           -bound, bound),
        logical_axes=("mem_heads", None, "mem_keys", None))
    value_init = (nnx.initializers.zeros if cfg.value_zero_init
                  else nnx.initializers.normal(stddev=cfg.v_dim**-0.5))
    value_dtype = jnp.bfloat16 if cfg.value_dtype == "bfloat16" else param_dtype
    self.values = nnx.Param(value_init(rngs.params(), (cfg.n_slots, cfg.v_dim), value_dtype),
                            logical_axes=("slots", "value_embed"))
    self.value_dropout = nnx.Dropout(cfg.value_dropout)

  def __call__(self, x_BxTxD: jax.Array, mask_BxT: jax.Array, *, rngs: nnx.Rngs | None = None,
               value_probe: jax.Array | None = None) -> tuple[jax.Array, MemoryAux]:
    """x [B, T, D], mask [B, T] (1 = real token) -> out [B, T, V], MemoryAux.

    Training mode (dropout, batch statistics) iff `rngs` is given. With `value_probe` (zeros
    [B, T, V]) the table gets no gradient; the probe's gradient is d loss / d (weighted sum),
    from which sparse updates build per-row gradients without a dense [N, V] gradient.
    """
    cfg, train = self.cfg, rngs is not None
    b, t, _ = x_BxTxD.shape
    x = self.input_dropout(x_BxTxD, deterministic=not train, rngs=rngs)
    q_BxTxQ = self.query_proj(x)
    if isinstance(self.query_norm, nnx.BatchNorm):
      # Statistics over real tokens only: padding would otherwise shift every query.
      mask = jnp.broadcast_to(mask_BxT[..., None].astype(bool), q_BxTxQ.shape)
      q_BxTxQ = self.query_norm(q_BxTxQ, use_running_average=not train, mask=mask)
    elif self.query_norm is not None:
      q_BxTxQ = self.query_norm(q_BxTxQ)
    q_BxTxQ = self.query_dropout(q_BxTxQ, deterministic=not train, rngs=rngs)
    q_BxTxHxK = q_BxTxQ.reshape(b, t, cfg.heads, cfg.k_dim).astype(jnp.float32)
    keys = self.keys[...].astype(jnp.float32)
    scores, indices = self.placement.search(q_BxTxHxK, keys, cfg.k)
    weights = jax.nn.softmax(scores, axis=-1)
    values = self.values[...]
    if value_probe is not None:
      values = jax.lax.stop_gradient(values)
    out_BxTxV = self.placement.lookup(values, indices, weights)
    if value_probe is not None:
      out_BxTxV = out_BxTxV + value_probe
    out_BxTxV = self.value_dropout(out_BxTxV, deterministic=not train, rngs=rngs)
    return out_BxTxV.astype(self.dtype), MemoryAux(indices, weights)
