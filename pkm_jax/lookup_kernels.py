"""The weighted lookup as Pallas kernels, forward and backward: Triton for GPUs, Mosaic for TPUs.

`weighted_lookup` computes exactly `product_keys.weighted_lookup` -- the sum of each token's
picked value rows, weighted (EmbeddingBag 'sum' with per-sample weights) -- but gathers the rows
inside a kernel, so no [tokens, picks, V] block ever reaches memory, whatever the batch:

  - GPU (`_triton_gather_sum`): a program per (16 tokens, a power-of-two slice of V) loops over
    the picks; each step gathers one pick's row slice for all 16 tokens straight from the table
    in global memory and adds it, weighted, into a float32 accumulator held in registers.
  - TPU (`_tpu_gather_sum`): a program per 8 tokens DMAs their picked rows from HBM into VMEM
    (one copy per row, all in flight together; a bf16 table is read as 32-bit words, see
    `lookup_tiles`), then sums each token's rows weighted on the vector units.

Its backward (`gather_sum_grads`, in `lookup_grad_kernels`) is kernels too: the weights'
gradient gathers the rows again, the table's gradient sorts the picks by row and sums each
row's segment once, with no scatter-add. Lowering is per platform (`jax.lax.platform_dependent`):
cuda/rocm -> Triton, tpu -> Mosaic; on CPU the Triton kernels run in Pallas' interpret mode
(correct, slow: for tests). `product_keys` stays the reference every kernel is tested against
(`tests/test_lookup_kernels.py`).

Chosen with `--config.mesh.lookup_kernel=pallas` (`placement.MemoryPlacement`), for a whole
table and inside each row block of a split one (`sharded_memory`); 'xla' is the default until an
accelerator run (`benchmarks/accelerator.py`) shows the kernels faster there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pkm_jax import lookup_tiles as tiles
from pkm_jax import product_keys
from pkm_jax.lookup_grad_kernels import gather_sum_grads  # the backward, public here too


def _triton_kernel(idx_ref, w_ref, values_ref, out_ref, *, block_v: int, picks: int):
  # idx_ref, w_ref: this program's [P, 16] picks (pick-major: each step reads 16 contiguous
  # ids); values_ref: the whole [N, V] table in global memory; out_ref: [16, block_v].
  cols = pl.ds(pl.program_id(1) * block_v, block_v)

  def add_pick(p, acc):
    rows = values_ref[idx_ref[p, :], cols]  # a gather: 16 row slices of one pick
    return acc + w_ref[p, :][:, None] * rows.astype(jnp.float32)

  out_ref[...] = jax.lax.fori_loop(0, picks, add_pick, jnp.zeros(out_ref.shape, jnp.float32))


def _triton_gather_sum(values_NxV: jax.Array, idx_MxP: jax.Array, w_MxP: jax.Array, *,
                       interpret: bool = False) -> jax.Array:
  """sum_p w[m, p] * values[idx[m, p]]: values [N, V], idx/w [M, P] (ids < N) -> [M, V] f32."""
  m, picks = idx_MxP.shape
  v = values_NxV.shape[1]
  bm, bv = tiles.TRITON_BLOCK_TOKENS, tiles.triton_block_v(v)
  idx_PxM = tiles.pad_tokens(idx_MxP, bm).T
  w_PxM = tiles.pad_tokens(w_MxP, bm).T
  padded = idx_PxM.shape[1]
  out = pl.pallas_call(
      functools.partial(_triton_kernel, block_v=bv, picks=picks),
      grid=(padded // bm, v // bv),
      in_specs=[pl.BlockSpec((picks, bm), lambda i, j: (0, i)),
                pl.BlockSpec((picks, bm), lambda i, j: (0, i)),
                pl.BlockSpec(memory_space=pl.ANY)],  # the table is read by row ids, unblocked
      out_specs=pl.BlockSpec((bm, bv), lambda i, j: (i, j)),
      out_shape=tiles.out_shape((padded, v), idx_PxM, w_PxM, values_NxV),
      compiler_params=None if interpret else pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="pkm_weighted_lookup")(idx_PxM, w_PxM, values_NxV)
  return out[:m]


def _tpu_kernel(idx_ref, w_ref, values_hbm, out_ref, rows_buf, sem, *, picks: int, dtype):
  # idx_ref: [8, P] word-row ids in SMEM (scalars address the copies); w_ref: [pk, P, 8], the
  # weights by half-word, pick-major; values_hbm: the table left in HBM; rows_buf: [8, P, V]
  # 32-bit VMEM scratch (lookup_tiles says why words).
  bm = tiles.TPU_BLOCK_TOKENS
  tiles.tpu_gather_rows(idx_ref, tiles.word_ref(values_hbm), rows_buf, sem,
                        block_m=bm, picks=picks)
  for t in range(bm):
    # A weighted sum over the P rows on the vector units: [P, 1] weights broadcast along the
    # lanes, then a reduction over sublanes. (As a [1, P] x [P, V] matmul the MXU would load
    # all P x V rows as weights to stream a single LHS row: mostly idle.)
    acc = jnp.zeros((1, out_ref.shape[1]), jnp.float32)
    for s in range(w_ref.shape[0]):
      rows = tiles.unpack_rows(rows_buf[t], s, dtype)
      acc += jnp.sum(w_ref[s, :, pl.ds(t, 1)] * rows, axis=0, keepdims=True)
    out_ref[pl.ds(t, 1), :] = acc


def _tpu_gather_sum(values_NxV: jax.Array, idx_MxP: jax.Array, w_MxP: jax.Array, *,
                    interpret: bool = False) -> jax.Array:
  """`_triton_gather_sum` for TPUs: values [N, V], idx/w [M, P] (ids < N) -> [M, V] f32."""
  m, picks = idx_MxP.shape
  v = values_NxV.shape[1]
  bm, pk = tiles.TPU_BLOCK_TOKENS, tiles.packing(values_NxV.dtype)
  idx_MxP, w_MxP = tiles.pad_tokens(idx_MxP, bm), tiles.pad_tokens(w_MxP, bm)
  padded = idx_MxP.shape[0]
  values = tiles.even_rows(values_NxV)
  w_halves = tiles.tpu_weights_by_half(idx_MxP, w_MxP, pk)
  table = tiles.table_words(values) if interpret else values
  out = pl.pallas_call(
      functools.partial(_tpu_kernel, picks=picks, dtype=values.dtype),
      grid=(padded // bm,),
      in_specs=[pl.BlockSpec((bm, picks), lambda i: (i, 0), memory_space=pltpu.SMEM),
                pl.BlockSpec((None, pk, picks, bm), lambda i: (i, 0, 0, 0)),
                pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec((bm, v), lambda i: (i, 0)),
      out_shape=tiles.out_shape((padded, v), idx_MxP, w_MxP, values_NxV),
      scratch_shapes=[pltpu.VMEM((bm, picks, v), jnp.float32 if pk == 1 else jnp.uint32),
                      pltpu.SemaphoreType.DMA((1,))],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=pltpu.InterpretParams() if interpret else False,
      name="pkm_weighted_lookup")(idx_MxP // pk, w_halves, table)
  return out[:m]


def gather_sum(values_NxV: jax.Array, idx_MxP: jax.Array, w_MxP: jax.Array) -> jax.Array:
  """The kernel of this platform: values [N, V], idx/w [M, P] -> [M, V] float32.

  Ids outside [0, N) (padding) add nothing: they are read as row 0 with weight 0, since a
  kernel's out-of-range read would be undefined rather than zero.
  """
  n = values_NxV.shape[0]
  valid = (idx_MxP >= 0) & (idx_MxP < n)
  idx_MxP = jnp.where(valid, idx_MxP, 0).astype(jnp.int32)
  w_MxP = jnp.where(valid, w_MxP, 0).astype(jnp.float32)
  args = (values_NxV, idx_MxP, w_MxP)
  return jax.lax.platform_dependent(
      *args,
      cuda=_triton_gather_sum, rocm=_triton_gather_sum, tpu=_tpu_gather_sum,
      default=functools.partial(_triton_gather_sum, interpret=True))


# The backward is Pallas kernels too (`lookup_grad_kernels`); the table's gradient is built only
# when the table is differentiated (`product_keys.lookup_vjp`'s want_values).
_lookup = product_keys.lookup_vjp(gather_sum, gather_sum_grads)


def weighted_lookup(values_NxV: jax.Array, indices: jax.Array, weights: jax.Array) -> jax.Array:
  """`product_keys.weighted_lookup` with a Pallas forward and backward: values [N, V],
  indices/weights [..., H, K] -> [..., V] float32."""
  lead = indices.shape[:-2]
  picks = indices.shape[-2] * indices.shape[-1]
  w_MxP = weights.reshape(-1, picks).astype(product_keys.wide_dtype(values_NxV.dtype))
  out_MxV = _lookup(values_NxV, indices.reshape(-1, picks), w_MxP)
  return out_MxV.reshape(*lead, values_NxV.shape[1])
