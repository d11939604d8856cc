"""What the lookup's Pallas kernels share: token padding, output shapes that work inside a
shard_map, Triton's column blocks, and the TPU kernels' row gather from a table of any dtype.

The TPU gather (`tpu_gather_rows`) copies one picked row per DMA from the table in HBM into a
[tokens, P, V] VMEM buffer. Mosaic addresses VMEM in (8, 128) tiles of 32-bit words, and it can
only start a DMA at a row that is either tile-aligned or, for a 32-bit dtype, any row (one row
is whole words). A bfloat16 table packs two rows into each word ((8, 128)(2, 1) tiles: rows
2i and 2i + 1 share the words of one sublane), so a single bf16 row cannot be copied into VMEM
at an arbitrary row: Mosaic refuses ("Offsets along tiled dimensions must be aligned to tiles").
So the kernels read every table through its 32-bit word view (`table_words`: a bf16 [N, V]
table is a uint32 [N / 2, V] one, a free bitcast of the ref), copy the word row holding the
pick (id // packing), and take the wanted half-word in registers (`unpack_rows`: bf16 -> f32 is
a 16-bit shift). The copy moves the neighbour row too, which costs no extra HBM traffic: the
two rows share every 32-bit word, which is the DMA's granularity.

An int8 or float8_e4m3fn table (quantised, pkm_jax.quantize: 4 rows per word, (8, 128)(4, 1)
tiles) fits the same scheme: `packing` = 4; int8's byte is taken with an arithmetic shift pair
((word << (24 - 8 s)) >> 24, sign-extended) and converted to float32, fp8's byte is shifted
down, masked and bitcast to float8_e4m3fn, then widened. The per-row scale folds into the pick's
weight outside the kernel (w * scale[id], `memory_kinds.pick_scales`), so the kernels' loops
stay as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

TRITON_BLOCK_TOKENS = 16  # tokens per program: the rows of one gathered [16, block_v] tile
TRITON_MAX_BLOCK_V = 256  # value columns per program (Triton tiles are powers of two)
TPU_BLOCK_TOKENS = 8  # tokens per program: one sublane tile of the [8, V] output block


def pad_tokens(x_MxP: jax.Array, multiple: int) -> jax.Array:
  """Rows of zeros up to a multiple of the token block: id 0 with weight 0 adds nothing."""
  return jnp.pad(x_MxP, ((0, -x_MxP.shape[0] % multiple),) + ((0, 0),) * (x_MxP.ndim - 1))


def out_shape(shape: tuple[int, ...], *like: jax.Array, dtype=jnp.float32
              ) -> jax.ShapeDtypeStruct:
  """A kernel's output. Inside a shard_map (a split table's row blocks) it varies over every
  mesh axis an input varies over, which pallas_call needs to be told."""
  varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in like))
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(
      like[0]).manual_axis_type.update(varying=varying))


def triton_block_v(v: int) -> int:
  """The largest power of two dividing V, at most TRITON_MAX_BLOCK_V (256 for V = 768)."""
  return min(v & -v, TRITON_MAX_BLOCK_V)


TPU_TABLE_DTYPES = tuple(map(jnp.dtype, (jnp.float32, jnp.bfloat16, jnp.int8,
                                         jnp.float8_e4m3fn)))


def packing(dtype) -> int:
  """Table rows per 32-bit word on a TPU: 1 for float32, 2 for bfloat16, 4 for int8 / fp8."""
  if jnp.dtype(dtype) not in TPU_TABLE_DTYPES:
    raise ValueError(f"TPU lookup kernels take float32, bfloat16, int8 or float8_e4m3fn "
                     f"tables, not {dtype}")
  return 4 // jnp.dtype(dtype).itemsize


def even_rows(values_NxV: jax.Array) -> jax.Array:
  """A packed table whose row count is not a multiple of its packing gets zero rows at the
  end (a copy of the table: only odd-sized tables, which no config makes, pay it)."""
  pad = -values_NxV.shape[0] % packing(values_NxV.dtype)
  return jnp.pad(values_NxV, ((0, pad), (0, 0))) if pad else values_NxV


def table_words(values_NxV: jax.Array) -> jax.Array:
  """The table as 32-bit words [N / packing, V], word row i holding row packing * i + s in its
  s-th half-word (least significant first), done in XLA. Only for Pallas' TPU interpreter,
  which copies plain refs only: compiled, the kernels bitcast the HBM ref instead
  (`word_ref`), which is free because Mosaic's tiles pack rows exactly so."""
  pk = packing(values_NxV.dtype)
  if pk == 1:
    return values_NxV
  n, v = values_NxV.shape
  if values_NxV.dtype.itemsize == 1:  # fp8 bytes as plain bytes first (same bits)
    values_NxV = jax.lax.bitcast_convert_type(values_NxV, jnp.uint8)
  # [N / pk, V, pk]: row pk i + s -> bits (32 / pk) s of word row i
  pairs = values_NxV.reshape(n // pk, pk, v).swapaxes(1, 2)
  return jax.lax.bitcast_convert_type(pairs, jnp.uint32)


def word_ref(values_ref):
  """A kernel's view of the table in 32-bit words (a bf16 ref bitcast; see `table_words`)."""
  return values_ref.bitcast(jnp.uint32) if values_ref.dtype.itemsize < 4 else values_ref


def unpack_rows(words_PxV: jax.Array, s: int, dtype) -> jax.Array:
  """Rows packing * i + s of the gathered words, as float32 [P, V]."""
  if packing(dtype) == 1:
    return words_PxV.astype(jnp.float32)
  if jnp.dtype(dtype) == jnp.int8:  # byte s to the top, then an arithmetic shift back down
    signed = jax.lax.bitcast_convert_type(words_PxV, jnp.int32)
    return ((signed << (24 - 8 * s)) >> 24).astype(jnp.float32)
  if jnp.dtype(dtype) == jnp.float8_e4m3fn:
    byte = ((words_PxV >> (8 * s)) & jnp.uint32(0xFF)).astype(jnp.uint8)
    return jax.lax.bitcast_convert_type(byte, jnp.float8_e4m3fn).astype(jnp.float32)
  # bf16 is float32's top half: shift the half-word there, zero the other.
  bits = words_PxV << 16 if s == 0 else words_PxV & jnp.uint32(0xFFFF0000)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def tpu_gather_rows(idx_ref, words_hbm, rows_buf, sem, *, block_m: int, picks: int):
  """Copies word row idx[t, p] of the table in HBM into rows_buf[t, p] for every token t of the
  block and pick p: idx_ref [block_m, P] in SMEM, rows_buf [block_m, P, V] in VMEM. Every copy
  is started before the first wait, so the DMA engines have all rows in flight."""
  def row_copy(t, p):
    return pltpu.make_async_copy(words_hbm.at[pl.ds(idx_ref[t, p], 1)],
                                 rows_buf.at[t, pl.ds(p, 1)], sem.at[0])

  def each_row(fn):
    def token(t, carry):
      return jax.lax.fori_loop(0, picks, lambda p, c: (fn(row_copy(t, p)), c)[1], carry)
    jax.lax.fori_loop(0, block_m, token, 0)

  each_row(lambda copy: copy.start())
  each_row(lambda copy: copy.wait())


def tpu_weights_by_half(idx_MxP: jax.Array, w_MxP: jax.Array, pk: int) -> jax.Array:
  """w split by which half-word of its word row a pick is, token-block-major and pick-major
  within a block: [M, P] -> [M / 8, pk, P, 8] (M a multiple of 8). In the kernels a token's
  weights are then a [P, 1] column, which broadcasts along the row's lanes."""
  m, p = idx_MxP.shape
  halves = jnp.stack([jnp.where(idx_MxP % pk == s, w_MxP, 0) for s in range(pk)])  # [pk, M, P]
  return halves.reshape(pk, m // TPU_BLOCK_TOKENS, TPU_BLOCK_TOKENS, p).transpose(1, 0, 3, 2)
