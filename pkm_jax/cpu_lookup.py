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
On GPUs and TPUs, for tables other than float32, and where the kernels cannot be built
(`cpu_kernels`), `weighted_lookup` is the reference. The sums run in another order than XLA's
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


def usable(values_NxV: jax.Array) -> bool:
  """Whether the kernels can take this table (float32; built)."""
  return values_NxV.dtype == jnp.float32 and cpu_kernels.available()


def weighted_lookup(values_NxV: jax.Array, indices: jax.Array, weights: jax.Array) -> jax.Array:
  """`product_keys.weighted_lookup`: values [N, V], indices/weights [..., H, K] -> [..., V]
  float32; its backward by the custom calls on CPU (see the module docstring). Ids outside
  [0, N) are padding, on both paths."""
  if not usable(values_NxV):
    return product_keys.weighted_lookup(values_NxV, indices, weights)
  lead = indices.shape[:-2]
  picks = indices.shape[-2] * indices.shape[-1]
  out_MxV = _lookup(values_NxV, indices.reshape(-1, picks).astype(jnp.int32),
                    weights.reshape(-1, picks).astype(jnp.float32))
  return out_MxV.reshape(*lead, values_NxV.shape[1])
