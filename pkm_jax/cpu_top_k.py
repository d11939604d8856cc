"""`top_k`: jax.lax.top_k, computed on CPUs by this package's XLA FFI custom call.

XLA:CPU's TopK partial-sorts an index array per row through a comparator: its cost grows with
n * k (8,192 rows of 512 scores, k = 32: ~54 ms on two cores, most of the memory layer's search).
`csrc/top_k.cc` returns the same indices, ties and NaNs ordered alike, from one pass per row
that inserts only the elements beating the current k-th, its rows split over XLA's intra-op
threads (3.4-4.8x faster on two cores); the values are gathered at those indices. On GPUs and
TPUs, and for dtypes other than float32, `top_k` is `jax.lax.top_k`.

Built and loaded with the package's other CPU kernels (`cpu_kernels`); without a compiler, or
with `PKM_JAX_CPU_KERNELS=0`, `top_k` is `jax.lax.top_k` everywhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pkm_jax import cpu_kernels

TARGET = "pkm_jax_top_k_f32"
MAX_K = 1024  # the kernel's buffer (csrc/top_k.cc kMaxK)


def _custom_call(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  # The scores' type with another shape: inside a shard_map the indices then vary over the mesh
  # axes the scores vary over, as jax.lax.top_k's do.
  out = jax.typeof(x).update(shape=x.shape[:-1] + (k,), dtype=jnp.dtype(jnp.int32))
  indices = jax.ffi.ffi_call(TARGET, out, vmap_method="broadcast_all")(jax.lax.stop_gradient(x))
  # Gathered (exact bits, and differentiable as jax.lax.top_k's values: the tangent of each is
  # the input's tangent at its index).
  return jnp.take_along_axis(x, indices, axis=-1), indices


def _lax_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  return tuple(jax.lax.top_k(x, k))


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """jax.lax.top_k(x, k): x [..., n] -> values, indices [..., k], best first, ties to the lower
  index; the custom call on CPU for float32 (see the module docstring)."""
  if (x.dtype != jnp.float32 or not 1 <= k <= min(x.shape[-1], MAX_K)
      or not cpu_kernels.available()):
    return _lax_top_k(x, k)
  # The platform the computation is lowered for picks the branch: exports for GPU/TPU never see
  # the CPU-only custom call.
  return jax.lax.platform_dependent(
      x, cpu=functools.partial(_custom_call, k=k), default=functools.partial(_lax_top_k, k=k))
