"""The weighted lookup's backward as Pallas kernels: Triton for GPUs, Mosaic for TPUs.

For out[m] = sum_p w[m, p] * values[idx[m, p]] and its output gradient g [M, V]:

  - the weights' gradient d w[m, p] = <values[idx[m, p]], g[m]> gathers rows as the forward
    does (`_triton_weight_grads`, `_tpu_weight_grads`) and reduces each against its token's g;
  - the table's gradient d values[r] = sum over picks p with idx[p] = r of w[p] * g[token(p)]
    is a segment sum. The picks are sorted by row id first (one XLA sort of the M x P flat
    picks, `_sorted_picks`), so each row's picks are one contiguous segment, and a program
    owns a block of rows: it sums their segments in registers (Triton) or VMEM (Mosaic) and
    writes each row exactly once, rows without picks as zeros. No scatter-add: TPUs have no
    efficient one, and on GPUs its float atomics would make the sum's order, hence its
    rounding, vary from run to run; a sorted segment sum is deterministic on both.

      * Triton (`_triton_table_grads`): a program per (16 rows, a power-of-two slice of V)
        walks each row's segment, adding w * g[token] slices into a float32 accumulator.
      * Mosaic (`_tpu_table_grads`): a program per 32 rows (a whole output tile for f32,
        bf16 and int8 tables) walks its segment in chunks of 128 sorted picks: it DMAs the
        chunk's tokens into SMEM, their g rows from HBM into VMEM (picks of neighbouring blocks
        are skipped and masked), and adds a one-hot [32, 128] x [128, V] matmul (the picks'
        weights placed at their rows) into a float32 [32, V] accumulator.

Ids outside [0, N) (padding, rows held by other devices) are read as nothing and receive
nothing, as in the forward (`lookup_kernels.gather_sum`). On CPU the Triton kernels run in
Pallas' interpret mode (for tests); `product_keys.weighted_lookup_grads` is the reference.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pkm_jax import lookup_tiles as tiles

TRITON_BLOCK_ROWS = 16  # table rows per program of the table's gradient
TPU_BLOCK_ROWS = 32  # table rows per program: one output tile even for int8 (32 rows)
TPU_CHUNK_PICKS = 128  # sorted picks per step: one lane-width of ids, a [128, V] g buffer


class SortedPicks(NamedTuple):
  """The M x P flat picks sorted by table row, padded to whole TPU chunks (Q picks)."""

  rows: jax.Array  # [Q] int32 row ids, ascending; ids out of range and padding: n_pad
  tokens: jax.Array  # [Q] int32 the token (row of g) of each pick
  weights: jax.Array  # [Q] float32

  def starts(self, n_pad: int, block: int) -> jax.Array:
    """[n_pad / block + 1] int32: the picks of rows [block * i, block * (i + 1)) are the sorted
    picks [starts[i], starts[i + 1]). A binary search per block boundary, a while loop of
    log2(Q) steps; one per row (which the TPU kernel does not need) would be ~1 GB of memory
    traffic at the paper's table by XLA:TPU's count."""
    bounds = jnp.arange(0, n_pad + 1, block, dtype=jnp.int32)
    return jnp.searchsorted(self.rows, bounds).astype(jnp.int32)


def _padded_rows(n: int) -> int:
  """The table's rows rounded up to whole row blocks of both kernels."""
  return -(-n // TPU_BLOCK_ROWS) * TPU_BLOCK_ROWS


def _sorted_picks(idx_MxP: jax.Array, w_MxP: jax.Array, n: int, n_pad: int) -> SortedPicks:
  """One XLA sort of the flat picks by row id (ids outside [0, n) sort last, past every row)."""
  m, p = idx_MxP.shape
  rows = jnp.where((idx_MxP >= 0) & (idx_MxP < n), idx_MxP, n_pad).reshape(-1).astype(jnp.int32)
  rows, order = jax.lax.sort((rows, jnp.arange(m * p, dtype=jnp.int32)), num_keys=1)
  weights = w_MxP.reshape(-1).astype(jnp.float32)[order]
  pad = -rows.shape[0] % TPU_CHUNK_PICKS
  return SortedPicks(jnp.pad(rows, (0, pad), constant_values=n_pad),
                     jnp.pad(order // p, (0, pad)), jnp.pad(weights, (0, pad)))


def _triton_weight_kernel(idx_ref, g_ref, values_ref, out_ref, *, block_v: int, picks: int):
  # idx_ref: [P, 16] ids, pick-major; g_ref: [16, block_v]; values_ref: the table in global
  # memory; out_ref: [P, 16], the dot products over this program's block_v columns.
  cols = pl.ds(pl.program_id(1) * block_v, block_v)
  g = g_ref[...].astype(jnp.float32)

  def dot_pick(p, carry):
    rows = values_ref[idx_ref[p, :], cols].astype(jnp.float32)  # 16 row slices of one pick
    out_ref[p, :] = jnp.sum(rows * g, axis=1)
    return carry

  jax.lax.fori_loop(0, picks, dot_pick, 0)


def _triton_weight_grads(values_NxV: jax.Array, idx_MxP: jax.Array, g_MxV: jax.Array, *,
                         interpret: bool) -> jax.Array:
  """<values[idx[m, p]], g[m]>: values [N, V], idx [M, P] (ids < N), g [M, V] -> [M, P] f32."""
  m, picks = idx_MxP.shape
  v = values_NxV.shape[1]
  bm, bv = tiles.TRITON_BLOCK_TOKENS, tiles.triton_block_v(v)
  idx_PxM = tiles.pad_tokens(idx_MxP, bm).T
  g_MxV = tiles.pad_tokens(g_MxV, bm)
  padded = idx_PxM.shape[1]
  partial_BxPxM = pl.pallas_call(  # one partial sum per column block, added below
      functools.partial(_triton_weight_kernel, block_v=bv, picks=picks),
      grid=(padded // bm, v // bv),
      in_specs=[pl.BlockSpec((picks, bm), lambda i, j: (0, i)),
                pl.BlockSpec((bm, bv), lambda i, j: (i, j)),
                pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec((pl.squeezed, picks, bm), lambda i, j: (j, 0, i)),
      out_shape=tiles.out_shape((v // bv, picks, padded), idx_PxM, g_MxV, values_NxV),
      compiler_params=None if interpret else pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="pkm_lookup_weight_grads")(idx_PxM, g_MxV, values_NxV)
  return partial_BxPxM.sum(0).T[:m]


def _triton_table_kernel(starts_ref, tokens_ref, w_ref, g_ref, out_ref, *, block_v: int):
  # starts_ref [n_pad + 1], tokens_ref / w_ref [Q] (the sorted picks), g_ref [M, V]: all in
  # global memory, read by scalar ids. out_ref: [16, block_v] rows of the table's gradient.
  r0 = pl.program_id(0) * TRITON_BLOCK_ROWS
  cols = pl.ds(pl.program_id(1) * block_v, block_v)

  def row(r, carry):
    def add_pick(j, acc):
      return acc + w_ref[j] * g_ref[tokens_ref[j], cols].astype(jnp.float32)

    acc = jax.lax.fori_loop(starts_ref[r0 + r], starts_ref[r0 + r + 1], add_pick,
                            jnp.zeros((block_v,), jnp.float32))
    out_ref[r, :] = acc.astype(out_ref.dtype)
    return carry

  jax.lax.fori_loop(0, TRITON_BLOCK_ROWS, row, 0)


def _triton_table_grads(values_NxV: jax.Array, picks: SortedPicks, g_MxV: jax.Array, *,
                        interpret: bool) -> jax.Array:
  """sum over picks of row r of w * g[token]: -> [n_pad, V] in the table's dtype."""
  v = values_NxV.shape[1]
  n_pad = _padded_rows(values_NxV.shape[0])
  bv = tiles.triton_block_v(v)
  args = (picks.starts(n_pad, 1), picks.tokens, picks.weights, g_MxV)
  return pl.pallas_call(
      functools.partial(_triton_table_kernel, block_v=bv),
      grid=(n_pad // TRITON_BLOCK_ROWS, v // bv),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * 4,
      out_specs=pl.BlockSpec((TRITON_BLOCK_ROWS, bv), lambda i, j: (i, j)),
      out_shape=tiles.out_shape((n_pad, v), *args, values_NxV, dtype=values_NxV.dtype),
      compiler_params=None if interpret else pltriton.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="pkm_lookup_table_grads")(*args)


def _triton_grads(values_NxV, idx_MxP, picks, g_MxV, *, interpret: bool = False):
  """(d values [n_pad, V] or None without sorted picks, d w [M, P] f32) on a GPU."""
  d_w = _triton_weight_grads(values_NxV, idx_MxP, g_MxV, interpret=interpret)
  if picks is None:
    return None, d_w
  return _triton_table_grads(values_NxV, picks, g_MxV, interpret=interpret), d_w


def _tpu_weight_kernel(idx_ref, g_ref, values_hbm, out_ref, rows_buf, sem, *, picks: int,
                       dtype):
  # idx_ref: [8, P] word-row ids in SMEM; g_ref: [8, V]; out_ref: [pk, P, 8], the dot product
  # of each half-word's row, pick-major (the wanted half is chosen outside).
  bm = tiles.TPU_BLOCK_TOKENS
  tiles.tpu_gather_rows(idx_ref, tiles.word_ref(values_hbm), rows_buf, sem, block_m=bm,
                        picks=picks)
  for t in range(bm):
    g_1xV = g_ref[pl.ds(t, 1), :]
    for s in range(out_ref.shape[0]):
      rows = tiles.unpack_rows(rows_buf[t], s, dtype)
      out_ref[s, :, pl.ds(t, 1)] = jnp.sum(rows * g_1xV, axis=1, keepdims=True)


def _tpu_weight_grads(values_NxV: jax.Array, idx_MxP: jax.Array, g_MxV: jax.Array, *,
                      interpret: bool) -> jax.Array:
  """`_triton_weight_grads` for TPUs: -> [M, P] float32."""
  m, picks = idx_MxP.shape
  v = values_NxV.shape[1]
  bm, pk = tiles.TPU_BLOCK_TOKENS, tiles.packing(values_NxV.dtype)
  idx_MxP, g_MxV = tiles.pad_tokens(idx_MxP, bm), tiles.pad_tokens(g_MxV, bm)
  padded = idx_MxP.shape[0]
  values = tiles.even_rows(values_NxV)
  out = pl.pallas_call(
      functools.partial(_tpu_weight_kernel, picks=picks, dtype=values.dtype),
      grid=(padded // bm,),
      in_specs=[pl.BlockSpec((bm, picks), lambda i: (i, 0), memory_space=pltpu.SMEM),
                pl.BlockSpec((bm, v), lambda i: (i, 0)),
                pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec((pl.squeezed, pk, picks, bm), lambda i: (i, 0, 0, 0)),
      out_shape=tiles.out_shape((padded // bm, pk, picks, bm), idx_MxP, g_MxV, values_NxV),
      scratch_shapes=[pltpu.VMEM((bm, picks, v), jnp.float32 if pk == 1 else jnp.uint32),
                      pltpu.SemaphoreType.DMA((1,))],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=pltpu.InterpretParams() if interpret else False,
      name="pkm_lookup_weight_grads")(
          idx_MxP // pk, g_MxV, tiles.table_words(values) if interpret else values)
  halves_MxKxP = out.transpose(0, 3, 1, 2).reshape(padded, pk, picks)
  return jnp.take_along_axis(halves_MxKxP, (idx_MxP % pk)[:, None, :], axis=1)[:m, 0]


def _tpu_table_kernel(bounds_ref, tokens_hbm, rows_hbm, w_hbm, g_hbm, out_ref, tokens_smem,
                      rows_vmem, w_vmem, g_buf, acc_ref, sem):
  # bounds_ref: [1, 2] in SMEM, this block's sorted picks are [lo, hi); tokens/rows/w_hbm:
  # the sorted picks as [Q / C, C] chunks; g_hbm: [M, V] float32. Scratch: one chunk's tokens
  # (SMEM: scalars address the copies), rows and weights (VMEM vectors), g rows [C, V].
  rb, c = TPU_BLOCK_ROWS, TPU_CHUNK_PICKS
  r0 = pl.program_id(0) * rb
  lo, hi = bounds_ref[0, 0], bounds_ref[0, 1]
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def add_chunk(k, carry):
    meta = [pltpu.make_async_copy(src.at[pl.ds(k, 1)], dst, sem.at[0])
            for src, dst in ((tokens_hbm, tokens_smem), (rows_hbm, rows_vmem), (w_hbm, w_vmem))]
    for copy in meta:
      copy.start()
    for copy in meta:
      copy.wait()
    base = k * c

    def each_pick(fn):  # picks of the neighbouring blocks in this chunk are not fetched
      def body(i, carry):
        pl.when((base + i >= lo) & (base + i < hi))(lambda: fn(pltpu.make_async_copy(
            g_hbm.at[pl.ds(tokens_smem[0, i], 1)], g_buf.at[pl.ds(i, 1)], sem.at[1])))
        return carry
      jax.lax.fori_loop(0, c, body, 0)

    each_pick(lambda copy: copy.start())
    each_pick(lambda copy: copy.wait())
    pick_Cx1 = base + jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    # The rows not fetched hold whatever VMEM held: select, never multiply, them away.
    g_CxV = jnp.where((pick_Cx1 >= lo) & (pick_Cx1 < hi), g_buf[...], 0.0)
    row_Rx1 = r0 + jax.lax.broadcasted_iota(jnp.int32, (rb, 1), 0)
    onehot_RxC = jnp.where(rows_vmem[...] == row_Rx1, w_vmem[...], 0.0)
    acc_ref[...] += jnp.dot(onehot_RxC, g_CxV, precision=jax.lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
    return carry

  # lax.div, not //: lo and hi are >= 0, and floor division's sign fix-up would need to know
  # the TPU generation, which a compile without a TPU cannot ask.
  first = jax.lax.div(lo, c)
  last = jnp.where(hi > lo, jax.lax.div(hi + c - 1, c), first)
  jax.lax.fori_loop(first, last, add_chunk, 0)
  out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _tpu_table_grads(values_NxV: jax.Array, picks: SortedPicks, g_MxV: jax.Array, *,
                     interpret: bool) -> jax.Array:
  """`_triton_table_grads` for TPUs: -> [n_pad, V] in the table's dtype."""
  v = values_NxV.shape[1]
  rb, c = TPU_BLOCK_ROWS, TPU_CHUNK_PICKS
  n_pad = _padded_rows(values_NxV.shape[0])
  block_starts = picks.starts(n_pad, rb)
  bounds = jnp.stack([block_starts[:-1], block_starts[1:]], axis=1)[:, None, :]  # [blocks, 1, 2]
  chunked = [x.reshape(-1, c) for x in (picks.tokens, picks.rows, picks.weights)]
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  return pl.pallas_call(
      _tpu_table_kernel,
      grid=(n_pad // rb,),
      in_specs=[pl.BlockSpec((pl.squeezed, 1, 2), lambda i: (i, 0, 0), memory_space=pltpu.SMEM)]
      + [any_spec] * 4,
      out_specs=pl.BlockSpec((rb, v), lambda i: (i, 0)),
      out_shape=tiles.out_shape((n_pad, v), bounds, *chunked, g_MxV, values_NxV,
                                dtype=values_NxV.dtype),
      scratch_shapes=[pltpu.SMEM((1, c), jnp.int32), pltpu.VMEM((1, c), jnp.int32),
                      pltpu.VMEM((1, c), jnp.float32), pltpu.VMEM((c, v), jnp.float32),
                      pltpu.VMEM((rb, v), jnp.float32), pltpu.SemaphoreType.DMA((2,))],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=pltpu.InterpretParams() if interpret else False,
      name="pkm_lookup_table_grads")(bounds, *chunked, g_MxV)


def _tpu_grads(values_NxV, idx_MxP, picks, g_MxV, *, interpret: bool = False):
  """`_triton_grads` on a TPU."""
  d_w = _tpu_weight_grads(values_NxV, idx_MxP, g_MxV, interpret=interpret)
  if picks is None:
    return None, d_w
  return _tpu_table_grads(values_NxV, picks, g_MxV, interpret=interpret), d_w


def gather_sum_grads(values_NxV: jax.Array, idx_MxP: jax.Array, w_MxP: jax.Array,
                     g_MxV: jax.Array, *, want_values: bool = True
                     ) -> tuple[jax.Array | None, jax.Array]:
  """The VJP of `lookup_kernels.gather_sum` by this platform's kernels: values [N, V],
  idx/w [M, P], d out g [M, V] -> (d values [N, V] in the table's dtype, or None unless
  want_values; d w [M, P] in w's dtype). Ids outside [0, N) get d w = 0 and add to no row.

  The table's gradient is summed in float32 and rounded once to the table's dtype.
  """
  def kernels(*args):
    return jax.lax.platform_dependent(
        *args, cuda=_triton_grads, rocm=_triton_grads, tpu=_tpu_grads,
        default=functools.partial(_triton_grads, interpret=True))

  return _grads(values_NxV, idx_MxP, w_MxP, g_MxV, want_values=want_values, kernels=kernels)


def _grads(values_NxV, idx_MxP, w_MxP, g_MxV, *, want_values: bool, kernels):
  """`gather_sum_grads` by `kernels(values, ids in range, sorted picks or None, g)`."""
  n = values_NxV.shape[0]
  valid = (idx_MxP >= 0) & (idx_MxP < n)
  in_range = jnp.where(valid, idx_MxP, 0).astype(jnp.int32)  # read as row 0, zeroed below
  picks = _sorted_picks(idx_MxP, w_MxP, n, _padded_rows(n)) if want_values else None
  d_values, d_w = kernels(values_NxV, in_range, picks, g_MxV.astype(jnp.float32))
  if d_values is not None and d_values.shape[0] != n:
    d_values = d_values[:n]
  return d_values, jnp.where(valid, d_w, 0).astype(w_MxP.dtype)
