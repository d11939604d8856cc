"""Row-sparse value updates on CPUs: the custom calls of `csrc/sparse_rows.cc`.

`row_gradients` and `lazy_adam_step` compute what `sparse_adam.row_gradients` and
`sparse_adam.sparse_adam(...).step` compute in pure JAX (which `sparse_adam` runs on GPUs and
TPUs, for other dtypes, and where the kernels cannot be built: `cpu_kernels`). The picks are
sorted by row once; each row's gradient is summed in cache and written once; Adam reads and
writes each picked row of the table and of its moments once, in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pkm_jax import cpu_kernels

ROW_GRADIENTS = "pkm_jax_row_gradients_f32"
LAZY_ADAM = "pkm_jax_lazy_adam_f32"


def usable(*arrays: jax.Array) -> bool:
  """Whether the kernels can take these arrays (float32 tables and gradients; built)."""
  return all(x.dtype == jnp.float32 for x in arrays) and cpu_kernels.available()


def row_gradients(idx_MxP: jax.Array, w_MxP: jax.Array, g_MxV: jax.Array, *, num_rows: int
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """idx/w [M, P] (ids outside [0, num_rows): padding), g [M, V] float32 -> row_ids [R] (sorted
  unique, padded with num_rows), row_grads [R, V] (zeros at padding), each row's squared norm
  [R]; R = min(M * P, num_rows)."""
  m, p = idx_MxP.shape
  r, v = min(m * p, num_rows), g_MxV.shape[1]
  like = (idx_MxP, w_MxP, g_MxV)
  out = (cpu_kernels.varying_type((r,), jnp.int32, *like),
         cpu_kernels.varying_type((r, v), jnp.float32, *like),
         cpu_kernels.varying_type((r,), jnp.float32, *like))
  return jax.ffi.ffi_call(ROW_GRADIENTS, out)(
      idx_MxP.astype(jnp.int32), w_MxP, g_MxV, num_rows=np.int64(num_rows))


def lazy_adam_step(row_ids: jax.Array, row_grads: jax.Array, table: jax.Array, mu: jax.Array,
                   nu: jax.Array, *, grad_scale: jax.Array, lr: jax.Array, bias1: jax.Array,
                   bias2: jax.Array, b1: float, b2: float, eps: float, weight_decay: float
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Lazy Adam(W) on rows row_ids [R] (unique; others padding) of table/mu/nu [N, V] float32
  with row_grads [R, V] * grad_scale -> (table, mu, nu), in place when they are donated.
  bias1/bias2: 1 - b1**count, 1 - b2**count (float32, computed as sparse_adam does)."""
  scalars = jnp.stack([jnp.asarray(x, jnp.float32) for x in (grad_scale, lr, bias1, bias2)])
  # The constants as the reference's float32 arithmetic sees them: (1 - b1) rounded once.
  f32 = np.float32
  return jax.ffi.ffi_call(
      LAZY_ADAM, (jax.typeof(table), jax.typeof(mu), jax.typeof(nu)),
      input_output_aliases={3: 0, 4: 1, 5: 2})(
          row_ids.astype(jnp.int32), row_grads, scalars, table, mu, nu, b1=f32(b1),
          one_minus_b1=f32(1 - b1), b2=f32(b2), one_minus_b2=f32(1 - b2), eps=f32(eps),
          weight_decay=f32(weight_decay))
