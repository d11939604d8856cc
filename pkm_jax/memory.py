"""Product-key memory layer (Lample et al. 2019), Flax NNX: query network, exact product-key
search, softmax weights and a weighted sum of value rows (the operations are in `product_keys.py`).
Its later variants -- Memory+'s gate, PEER's experts, shared tables -- are in `memory_kinds.py`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from pkm_jax import memory_kinds
from pkm_jax.architecture import MemoryConfig
from pkm_jax.placement import SINGLE_DEVICE, MemoryPlacement
from pkm_jax.product_keys import MemoryAux


class ProductKeyMemory(nnx.Module):
  """Query net -> product-key top-k per head -> softmax -> weighted sum of value rows.

  Params: query_proj (Linear d_in -> heads*k_dim), query_norm, keys [H, 2, n_keys, k_dim/2],
  values [n_keys**2, v_dim] (+ down [n_keys**2, d_in] for peer; neither with share_values: the
  caller passes the shared tables), gate (memory_plus). Quantised tables (memory.value_dtype
  int8 / float8_e4m3fn) hold 8-bit rows and a scale per row (values_scale [N], down_scale),
  folded into each pick's weight: the lookups read the rows as stored. Heads are summed, as XLM's
  EmbeddingBag(mode='sum').
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
        precision=jax.lax.Precision.HIGHEST,  # float32 products on GPUs / TPUs too
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
    if not cfg.share_values:
      for name, table in memory_kinds.make_tables(cfg, d_in, param_dtype, rngs).items():
        setattr(self, name, table)
    self.gate = (memory_kinds.Gate(d_in, cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                 if cfg.gate != "none" else None)
    self.value_dropout = nnx.Dropout(cfg.value_dropout)

  def __call__(self, x_BxTxD: jax.Array, mask_BxT: jax.Array, *, rngs: nnx.Rngs | None = None,
               value_probe: jax.Array | tuple[jax.Array, jax.Array] | None = None,
               tables: dict[str, jax.Array] | None = None) -> tuple[jax.Array, MemoryAux]:
    """x [B, T, D], mask [B, T] (1 = real token) -> out [B, T, V], MemoryAux.

    Training mode (dropout, batch statistics) iff `rngs` is given. With `value_probe` (zeros
    [B, T, V]) the table gets no gradient; the probe's gradient is d loss / d (weighted sum),
    from which sparse updates build per-row gradients without a dense [N, V] gradient. For peer
    it is a pair (that, zeros [B, T, H, K] added to the expert scores u . x, whose gradient
    builds the down table's row gradients). `tables`: the shared tables (share_values).
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
    if cfg.key_norm:  # cosine-like scores: no sub-key wins by its length alone
      keys = keys * jax.lax.rsqrt(jnp.sum(keys * keys, axis=-1, keepdims=True) + 1e-12)
    scores, indices = self.placement.search(q_BxTxHxK, keys, cfg.k)
    weights = jax.nn.softmax(scores, axis=-1)
    if tables is None:
      tables = {name: getattr(self, name)[...] for name in memory_kinds.stored_names(cfg)}
    sparse = value_probe is not None
    value_probe, down_probe = value_probe if isinstance(value_probe, tuple) else (value_probe,
                                                                                  None)
    row_weights, inputs = weights, None
    if cfg.kind == "peer":
      down = tables[memory_kinds.DOWN]
      expert_BxTxHxK = self.placement.row_dots(jax.lax.stop_gradient(down) if sparse else down,
                                               indices, x)
      if down_probe is not None:
        expert_BxTxHxK = expert_BxTxHxK + down_probe
      down_scale = memory_kinds.pick_scales(tables, memory_kinds.DOWN, indices)
      if down_scale is not None:  # u_i . x = s_i (q_i . x)
        expert_BxTxHxK = expert_BxTxHxK * down_scale
      row_weights = weights * memory_kinds.ACTIVATIONS[cfg.peer_activation](expert_BxTxHxK)
      inputs = x
    values = tables[memory_kinds.VALUES]
    if sparse:
      values = jax.lax.stop_gradient(values)
    # A quantised table's rows are read as stored; their scales weight the picks.
    value_scale = memory_kinds.pick_scales(tables, memory_kinds.VALUES, indices)
    lookup_weights = row_weights if value_scale is None else row_weights * value_scale
    out_BxTxV = self.placement.lookup(values, indices, lookup_weights)
    if value_probe is not None:
      out_BxTxV = out_BxTxV + value_probe
    if self.gate is not None:
      out_BxTxV = self.gate(x, out_BxTxV.astype(self.dtype))
    out_BxTxV = self.value_dropout(out_BxTxV, deterministic=not train, rngs=rngs)
    aux = MemoryAux(indices, weights, row_weights if cfg.kind == "peer" else None, inputs)
    return out_BxTxV.astype(self.dtype), aux
