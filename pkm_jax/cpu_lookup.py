"""`weighted_lookup`: `product_keys.weighted_lookup`, its backward computed on CPUs by the
custom calls of `csrc/lookup.cc`.

XLA runs the reference's backward as a loop over a token's picks: per step a gather of every
token's row, a dot with its gradient, and a scatter-add of w * g into one carried [N, V]
gradient. At the default run's sizes (2,048 tokens, 64 picks, V = 128) that is 64 steps of a
few small ops each, per layer. Here:
  - d weights (`pkm_jax_gather_dot_f32`): each picked row dotted with the token's gradient;
  - d table (`pkm_jax_scatter_sum_f32`), only when the table is differentiated (dense value
    updates; the sparse ones stop it and build row gradients in `sparse_adam`): the picks are
    counting-sorted by row, each row's gradient summed once, rows not picked written as zeros.
The forward is the reference's: its kernel (each token's rows summed in cache) was 1.06-1.08x
of XLA's loop at BERT-base in two runs, within the noise, and was removed; d weights is ~1.8x.
A quantised table (int8 / float8_e4m3fn rows, pkm_jax.quantize; its scales already folded into
the weights) has a forward kernel instead (`pkm_jax_gather_sum_s8` / `_f8e4m3fn`): each picked
row widened to float32 in registers as it is added, where XLA's loop widens each chunk of
gathered rows in memory first; its weights' gradient is the reference's. On GPUs and TPUs, for
bf16 tables, and where the kernels cannot be built (`cpu_kernels`), `weighted_lookup` is the
reference. The sums run in another order than XLA's
(equal to ~1e-6 relative). Ids outside [0, N) are padding on both paths (no row, no gradient).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pkm_jax import cpu_kernels
from pkm_jax import product_keys

GATHER_DOT = "pkm_jax_gather_dot_f32"
SCATTER_SUM = "pkm_jax_scatter_sum_f32"
# Under jax.vmap the calls run once per batch element: the kernels take [M, P] / [N, V] arrays
# only, and both branches of platform_dependent are traced, on every platform.
VMAP = "sequential"


def _reference(values_NxV: jax.Array, idx_MxP: jax.Array, w_MxP: jax.Array) -> jax.Array:
  return product_keys.weighted_lookup(values_NxV, idx_MxP[:, None, :], w_MxP[:, None, :])


def _kernel_grads(values_NxV, idx_MxP, w_MxP, g_MxV, want_values: bool):
  g_w = jax.ffi.ffi_call(GATHER_DOT, cpu_kernels.varying_type(
      idx_MxP.shape, jnp.float32, values_NxV, idx_MxP, g_MxV), vmap_method=VMAP)(
          values_NxV, idx_MxP, g_MxV)
  if not want_values:
    return None, g_w
  g_values = jax.ffi.ffi_call(SCATTER_SUM, cpu_kernels.varying_type(
      values_NxV.shape, jnp.float32, idx_MxP, w_MxP, g_MxV), vmap_method=VMAP)(
          idx_MxP, w_MxP, g_MxV)
  return g_values, g_w


def _grads(values_NxV: jax.Array, idx_MxP: jax.Array, w_MxP: jax.Array, g_MxV: jax.Array, *,
           want_values: bool) -> tuple[jax.Array | None, jax.Array]:
  # The platform the computation is lowered for picks the branch: GPU/TPU exports never see the
  # CPU-only custom calls.
  branch = lambda grads: functools.partial(grads, want_values=want_values)  # noqa: E731
  return jax.lax.platform_dependent(
      values_NxV, idx_MxP, w_MxP, g_MxV, cpu=branch(_kernel_grads),
      default=branch(product_keys.weighted_lookup_grads))


_lookup = product_keys.lookup_vjp(_reference, _grads)

GATHER_SUM_8BIT = {jnp.dtype(jnp.int8): "pkm_jax_gather_sum_s8",
                   jnp.dtype(jnp.float8_e4m3fn): "pkm_jax_gather_sum_f8e4m3fn"}


def _kernel_sum_8bit(values_NxV, idx_MxP, w_MxP):
  out_type = cpu_kernels.varying_type((idx_MxP.shape[0], values_NxV.shape[1]), jnp.float32,
                                      values_NxV, idx_MxP, w_MxP)
  return jax.ffi.ffi_call(GATHER_SUM_8BIT[values_NxV.dtype], out_type, vmap_method=VMAP)(
      values_NxV, idx_MxP, w_MxP)


def _sum_8bit(values_NxV: jax.Array, idx_MxP: jax.Array, w_MxP: jax.Array) -> jax.Array:
  return jax.lax.platform_dependent(values_NxV, idx_MxP, w_MxP, cpu=_kernel_sum_8bit,
                                    default=_reference)


# The table is never differentiated (quantised tables are not trained): only d weights, by the
# reference.
_lookup_8bit = product_keys.lookup_vjp(_sum_8bit, product_keys.weighted_lookup_grads)


def usable(values_NxV: jax.Array) -> bool:
  """Whether the kernels can take this table (float32, int8 or float8_e4m3fn; built)."""
  return ((values_NxV.dtype == jnp.float32 or values_NxV.dtype in GATHER_SUM_8BIT)
          and cpu_kernels.available())


def weighted_lookup(values_NxV: jax.Array, indices: jax.Array, weights: jax.Array) -> jax.Array:
  """`product_keys.weighted_lookup`: values [N, V], indices/weights [..., H, K] -> [..., V]
  float32; its backward by the custom calls on CPU (see the module docstring). Ids outside
  [0, N) are padding, on both paths."""
  if not usable(values_NxV):
    return product_keys.weighted_lookup(values_NxV, indices, weights)
  lead = indices.shape[:-2]
  picks = indices.shape[-2] * indices.shape[-1]
  lookup = _lookup_8bit if values_NxV.dtype in GATHER_SUM_8BIT else _lookup
  out_MxV = lookup(values_NxV, indices.reshape(-1, picks).astype(jnp.int32),
                   weights.reshape(-1, picks).astype(jnp.float32))
  return out_MxV.reshape(*lead, values_NxV.shape[1])
