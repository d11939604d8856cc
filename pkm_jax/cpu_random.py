"""Threefry-2x32 unrolled on CPUs: the same random bits as jax.random's, at a third of the cost.

Every draw from a default jax.random key (dropout's masks here) runs the `threefry2x32`
primitive: 20 rounds of add / rotate / xor over the counters, with a key injection after every
four (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011). On CPUs jax lowers
it as a loop over the five groups of four rounds (a smaller program that compiles faster), so
XLA runs each group as its own pass over the [n] words. Lowered unrolled, the whole hash is one
elementwise fusion: a bernoulli draw of [32, 4, 64, 64] (one attention-dropout mask of the
default run) took 1.0 ms instead of 3.5 ms on this project's 2-core CPU. It computes the same
function, so every key gives the bits it gave before (`tests/test_cpu_random.py` checks them
against jax's own lowering and a numpy Threefry).

`use_unrolled_threefry()` registers this lowering for CPU in the running process (jax's GPU and
TPU lowerings are untouched); `program.build_program` calls it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p
from jax.interpreters import mlir

ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)  # round r rotates by ROTATIONS[r % 8]
KEY_PARITY = np.uint32(0x1BD11BDA)  # the third key word: k0 ^ k1 ^ this constant


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


@functools.cache
def use_unrolled_threefry() -> None:
  """Lowers jax's threefry2x32 on CPU as `threefry2x32` above, from now on in this process
  (computations already compiled keep theirs; they compute the same bits)."""
  mlir.register_lowering(threefry2x32_p, mlir.lower_fun(threefry2x32, multiple_results=True),
                         platform="cpu")
