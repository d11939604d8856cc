"""Loops over chunks of a token's picks, so that [tokens, picks, V] is never built at once.

Gathering every picked row of a batch at once costs tokens x picks x V floats: ~13 GB for a
BERT-base batch of 256 x 128 tokens with 4 heads x 32 picks and V = 768. The lookup, its
gradients, the search's backward and the coalescing of row gradients therefore scan over chunks
of picks, each gathering at most GATHER_CHUNK_BYTES. A pick count that the chunk does not divide
is padded: padding picks point at a row id past the end (gathers read zeros, scatters drop them)
and carry weight 0.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

GATHER_CHUNK_BYTES = 1 << 27  # bytes of gathered rows per loop step
# Bytes per step of the loops that gather or scatter rows of every token at once (the lookup
# and its backward, the search's backward, the row gradients of sparse updates). Far below
# GATHER_CHUNK_BYTES: a step's rows and accumulator then stay in cache, which on a CPU made the
# lookup ~3x, the search's backward ~2.5x and the row gradients ~1.3x faster at BERT-base
# (1,024 tokens: one pick a step).
CACHE_CHUNK_BYTES = 1 << 20
# Bytes per loop step on GPUs and TPUs. There a loop step is a sequential kernel launch (or TPU
# loop iteration) that reads and writes the whole float32 accumulator: few, large steps. One
# pick per step at BERT-base's paper batch (8,192 tokens) made a lookup 128 steps, each moving
# 2 x 25 MB of accumulator for 1.6 MB of bf16 rows. XLA:TPU does not fuse the gather into the
# sum (compiled for a v5e: unchunked, the whole [8192, 128, 768] bf16 block is a 1.6 GB
# temporary, 6.4 GB in the backward), so the chunk still bounds memory: 256 MiB -> 7 steps there.
# The Pallas kernels (`lookup_kernels`) gather inside the kernel and need no chunks at all.
ACCELERATOR_CHUNK_BYTES = 1 << 28


def pick_chunk(picks: int, bytes_per_pick: int) -> int:
  """Picks per loop step so that one step gathers at most GATHER_CHUNK_BYTES (at least 1)."""
  return max(1, min(picks, GATHER_CHUNK_BYTES // max(bytes_per_pick, 1)))


def cache_chunk(picks: int, bytes_per_pick: int) -> int:
  """Picks per loop step: within both GATHER_CHUNK_BYTES and CACHE_CHUNK_BYTES (at least 1)."""
  return min(pick_chunk(picks, bytes_per_pick),
             max(1, CACHE_CHUNK_BYTES // max(bytes_per_pick, 1)))


def accelerator_chunk(picks: int, bytes_per_pick: int) -> int:
  """Picks per loop step on GPUs and TPUs: within ACCELERATOR_CHUNK_BYTES (at least 1)."""
  return max(1, min(picks, ACCELERATOR_CHUNK_BYTES // max(bytes_per_pick, 1)))


def per_platform(make: Callable[[int], Callable[..., Any]], cpu_chunk: int, accelerator: int,
                 *operands: Any) -> Any:
  """make(chunk)(*operands) with the chunk of the platform the program is lowered for: CPU ->
  cpu_chunk, GPU / TPU -> accelerator (`jax.lax.platform_dependent`: a program lowered for one
  platform holds only its own loop, no conditional; one compiled for a TPU from a CPU process
  -- benchmarks/pod_plan.py -- gets the TPU's)."""
  if cpu_chunk == accelerator:
    return make(cpu_chunk)(*operands)
  return jax.lax.platform_dependent(*operands, cpu=make(cpu_chunk), default=make(accelerator))


def to_chunks(x_XxP: jax.Array, chunk: int, pad_value: Any) -> jax.Array:
  """[..., P] -> [C, ..., chunk] (C = ceil(P / chunk)), the last chunk padded with pad_value."""
  pad = -x_XxP.shape[-1] % chunk
  x = jnp.pad(x_XxP, [(0, 0)] * (x_XxP.ndim - 1) + [(0, pad)], constant_values=pad_value)
  x = x.reshape(*x.shape[:-1], -1, chunk)
  return jnp.moveaxis(x, -2, 0)


def from_chunks(x_CxXxc: jax.Array, picks: int) -> jax.Array:
  """The inverse of `to_chunks`: [C, ..., chunk] -> [..., P], padding dropped."""
  x = jnp.moveaxis(x_CxXxc, 0, -2)
  return x.reshape(*x.shape[:-2], -1)[..., :picks]


def zeros_varying(shape: tuple[int, ...], dtype: Any, *like: jax.Array) -> jax.Array:
  """Zeros that vary over the same manual mesh axes as `like`: inside shard_map a scan carry
  must keep its type, and the loop body makes it vary over every axis its inputs vary over."""
  vma = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in like))
  zeros = jnp.zeros(shape, dtype)
  return jax.lax.pcast(zeros, tuple(sorted(vma)), to="varying") if vma else zeros
