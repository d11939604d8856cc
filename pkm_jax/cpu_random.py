"""pkm-jax's dropout keys: jax's Threefry-2x32, with random bits computed unrolled on CPUs.

Every draw from a Threefry key (dropout's masks here) hashes a counter per element: 20 rounds of
add / rotate / xor, with a key injection after every four (Salmon et al., "Parallel random
numbers: as easy as 1, 2, 3", SC 2011). jax lowers its `threefry2x32` primitive on CPUs as a
loop over the five groups of four rounds (a smaller program that compiles faster), so XLA runs
each group as its own pass over the [n] words. Written out as below, the whole hash is one
elementwise fusion: a bernoulli draw of [32, 4, 64, 64] (one attention-dropout mask of the
default run) took 1.0 ms instead of 3.5 ms on this project's 2-core CPU.

Nothing of jax is changed for code that is not pkm-jax's: `KEY_IMPL` is a PRNG implementation of
its own (`jax.extend.random.define_prng_impl`), used only for the train step's dropout keys
(`steps.make_train_step`). Its seed, split and fold_in are jax's Threefry ones, and its random
bits are jax's partitionable Threefry bits (`bits_hi ^ bits_lo` of the hashed 64-bit element
index), so a key of it gives exactly the bits the same default key gives (tested against jax
for the shapes and widths dropout draws). Only on CPUs is the hash the one written out here
(`jax.lax.platform_dependent`): GPUs and TPUs lower jax's own primitive as before.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.random import define_prng_impl, threefry2x32_p, threefry_prng_impl

ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)  # round r rotates by ROTATIONS[r % 8]
KEY_PARITY = np.uint32(0x1BD11BDA)  # the third key word: k0 ^ k1 ^ this constant
_UINT = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}


def threefry2x32(key0: jax.Array, key1: jax.Array, x0: jax.Array, x1: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32 with 20 rounds, written out: uint32 arrays (broadcast together) -> the two
  output words, each of the broadcast shape."""
  shape = jnp.broadcast_shapes(*(jnp.shape(a) for a in (key0, key1, x0, x1)))
  keys = (key0, key1, key0 ^ key1 ^ KEY_PARITY)
  x0, x1 = x0 + keys[0], x1 + keys[1]
  for group in range(5):
    for r in range(4):
      rot = ROTATIONS[(4 * group + r) % 8]
      x0 = x0 + x1
      x1 = x0 ^ ((x1 << np.uint32(rot)) | (x1 >> np.uint32(32 - rot)))
    s = group + 1  # the s-th key injection
    x0 = x0 + keys[s % 3]
    x1 = x1 + keys[(s + 1) % 3] + np.uint32(s)
  return jnp.broadcast_to(x0, shape), jnp.broadcast_to(x1, shape)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """uint32[shape]: each element's row-major index (the low word of jax's 64-bit counter)."""
  strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
  return sum((lax.broadcasted_iota(jnp.uint32, shape, d) * np.uint32(s)
              for d, s in enumerate(strides)), jnp.zeros(shape, jnp.uint32))


def _random_bits(key_2: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
  """uint{bit_width}[shape]: jax's partitionable Threefry bits of this key."""
  if (not jax.config.jax_threefry_partitionable or bit_width == 64 or not shape
      or math.prod(shape) >= 2**32):  # jax's own layouts for the cases dropout never draws
    return threefry_prng_impl.random_bits(key_2, bit_width, shape)
  lo = _flat_index(shape)
  hi = jnp.zeros(shape, jnp.uint32)  # the high word of an index below 2^32
  k0, k1 = key_2[0], key_2[1]
  bits1, bits2 = lax.platform_dependent(
      k0, k1, hi, lo, cpu=lambda *a: threefry2x32(*a),
      default=lambda *a: tuple(threefry2x32_p.bind(*a)))
  bits = bits1 ^ bits2
  return bits if bit_width == 32 else lax.convert_element_type(bits, _UINT[bit_width])


KEY_IMPL = define_prng_impl(
    key_shape=(2,), seed=threefry_prng_impl.seed, split=threefry_prng_impl.split,
    random_bits=_random_bits, fold_in=threefry_prng_impl.fold_in, name="pkm_jax_threefry2x32",
    tag="pkmfry")


def key(seed: int | jax.Array) -> jax.Array:
  """A typed key of `KEY_IMPL` (the same key data as `jax.random.key(seed)`)."""
  return jax.random.key(seed, impl=KEY_IMPL)
