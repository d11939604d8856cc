"""The product-key memory family: what each `memory.kind` computes from the same search.

With picks i (slot ids from the product-key search, per head) and softmax weights w_i:
  pkm          out = sum_i w_i v_i                                (Lample et al. 2019)
  memory_plus  out = W_o((sum_i w_i v_i) * act(W_g x)), act silu | sigmoid
                                                                  (Berges et al. 2024, Memory+)
  peer         out = sum_i w_i act(u_i . x) v_i                   (He 2024, PEER)
Sums run over heads and picks. PEER's slot i is a tiny expert: a down vector u_i [D] (the
"down" table) and an up vector v_i [V] (the value table), both [N, .] row tables read only at
the picks. `memory.share_values` keeps one value table (and one down table) on the BERT model
that every memory layer reads; each layer keeps its own query network and keys.

PEER's expert scores are `row_dots`, the lookup's dual: sum_d table[idx, d] * x[d]. Its
gradient is a lookup (into x) and a scatter into the picked rows, so the sparse value updates
apply to the down table exactly as to the values (`steps.py`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pkm_jax import chunks
from pkm_jax import product_keys
from pkm_jax.architecture import MemoryConfig

VALUES, DOWN = "values", "down"  # row-table names, in a layer and (prefixed) on the BERT model
SHARED_PREFIX = "memory_"  # shared tables live on BertModel as memory_values, memory_down
# Quantised tables (`memory.value_dtype`, written by `pkm_jax.quantize`): the stored rows' dtype
# and the largest magnitude a row's scale maps to. Each table then has a float32 scale per row,
# '<table>_scale' [N], and a row reads as scale[i] * stored[i].
QUANTIZED = {"int8": jnp.int8, "float8_e4m3fn": jnp.float8_e4m3fn}
QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0}
SCALE_SUFFIX = "_scale"

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu, "sigmoid": jax.nn.sigmoid, "identity": lambda x: x,
}


def table_names(cfg: MemoryConfig) -> tuple[str, ...]:
  """The row tables a memory layer of this kind reads: ('values',) or ('values', 'down')."""
  return (VALUES, DOWN) if cfg.kind == "peer" else (VALUES,)


def is_quantized(cfg: MemoryConfig) -> bool:
  """Whether the row tables are stored quantised with a per-row scale (int8 / fp8)."""
  return cfg.value_dtype in QUANTIZED


def stored_names(cfg: MemoryConfig) -> tuple[str, ...]:
  """Every array a layer's row tables are stored as: `table_names`, then their scales when
  quantised ('values', 'values_scale', ...)."""
  names = table_names(cfg)
  return names + tuple(n + SCALE_SUFFIX for n in names) if is_quantized(cfg) else names


def pick_scales(tables: dict[str, jax.Array], name: str, indices: jax.Array
                ) -> jax.Array | None:
  """scale[indices] of table `name` ([..., H, K] float32), or None for an unquantised table.
  Gathered per pick (N floats are never expanded to the table's shape): the lookups fold it
  into the pick's weight, out = sum_i (w_i s_i) q_i."""
  scale = tables.get(name + SCALE_SUFFIX)
  if scale is None:
    return None
  return jnp.take(scale, indices, axis=0, mode="fill", fill_value=0)


def make_tables(cfg: MemoryConfig, d_in: int, param_dtype, rngs: nnx.Rngs
                ) -> dict[str, nnx.Param]:
  """Fresh row tables for `cfg`: values [N, V] (zeros with value_zero_init, so ResM starts as
  the dense model) and, for peer, down [N, d_in] scaled so that u . x is ~unit for a
  layer-normed x. `memory.value_dtype` 'bfloat16' stores both in bf16 whatever param_dtype."""
  if is_quantized(cfg):  # filled by pkm_jax.quantize (or a checkpoint restore)
    return _quantized_tables(cfg, d_in)
  if cfg.value_dtype == "bfloat16":
    param_dtype = jnp.bfloat16
  value_init = (nnx.initializers.zeros if cfg.value_zero_init
                else nnx.initializers.normal(stddev=cfg.v_dim**-0.5))
  tables = {VALUES: nnx.Param(value_init(rngs.params(), (cfg.n_slots, cfg.v_dim), param_dtype),
                              logical_axes=("slots", "value_embed"))}
  if cfg.kind == "peer":
    down = nnx.initializers.normal(stddev=d_in**-0.5)(rngs.params(), (cfg.n_slots, d_in),
                                                       param_dtype)
    tables[DOWN] = nnx.Param(down, logical_axes=("slots", "value_embed"))
  return tables


def _quantized_tables(cfg: MemoryConfig, d_in: int) -> dict[str, nnx.Param]:
  """Zero rows of the stored dtype and unit scales: a quantised model's shapes and dtypes."""
  dtype = QUANTIZED[cfg.value_dtype]
  widths = {VALUES: cfg.v_dim, DOWN: d_in}
  tables = {}
  for name in table_names(cfg):
    tables[name] = nnx.Param(jnp.zeros((cfg.n_slots, widths[name]), dtype),
                             logical_axes=("slots", "value_embed"))
    # Split like the rows: a device holding rows holds their scales.
    tables[name + SCALE_SUFFIX] = nnx.Param(jnp.ones((cfg.n_slots,), jnp.float32),
                                            logical_axes=("slots",))
  return tables


def row_dots(table_NxD: jax.Array, indices: jax.Array, x: jax.Array) -> jax.Array:
  """table[indices] . x per pick: table [N, D], indices [..., H, K], x [..., D] -> [..., H, K]
  float32. Scans pick chunks (`pkm_jax.chunks`) so [tokens, picks, D] is never built."""
  *lead, h, k = indices.shape
  idx_MxP = indices.reshape(-1, h * k)
  x_MxD = x.reshape(-1, x.shape[-1])
  chunk = chunks.pick_chunk(h * k, idx_MxP.shape[0] * table_NxD.shape[1] *
                            table_NxD.dtype.itemsize)

  def dots(_, idx_Mxc):
    rows = jnp.take(table_NxD, idx_Mxc, axis=0, mode="fill", fill_value=0)
    # The wider of the two dtypes: a bf16 table must not round a float32 x.
    ct = product_keys.wide_dtype(rows.dtype, x_MxD.dtype)
    return None, jnp.einsum("mcd,md->mc", rows.astype(ct), x_MxD.astype(ct),
                            preferred_element_type=jnp.float32)

  _, s_CxMxc = jax.lax.scan(dots, None, chunks.to_chunks(idx_MxP, chunk, table_NxD.shape[0]))
  return chunks.from_chunks(s_CxMxc, h * k).reshape(*lead, h, k)


class Gate(nnx.Module):
  """Memory+'s output: W_o(m * act(W_g x)); x [B, T, D], m [B, T, V] -> [B, T, D]."""

  def __init__(self, d_in: int, cfg: MemoryConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    zeros = nnx.initializers.zeros
    self.act = ACTIVATIONS[cfg.gate]
    self.gate = nnx.Linear(d_in, cfg.v_dim, dtype=dtype, param_dtype=param_dtype,
                           kernel_init=nnx.with_metadata(init, logical_axes=("embed", "mlp")),
                           bias_init=nnx.with_metadata(zeros, logical_axes=("mlp",)), rngs=rngs)
    self.output = nnx.Linear(cfg.v_dim, d_in, dtype=dtype, param_dtype=param_dtype,
                             kernel_init=nnx.with_metadata(init, logical_axes=("mlp", "embed")),
                             bias_init=nnx.with_metadata(zeros, logical_axes=("embed",)),
                             rngs=rngs)

  def __call__(self, x_BxTxD: jax.Array, m_BxTxV: jax.Array) -> jax.Array:
    return self.output(m_BxTxV * self.act(self.gate(x_BxTxD)).astype(m_BxTxV.dtype))
