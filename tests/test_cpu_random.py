"""pkm_jax.cpu_random: the unrolled Threefry-2x32 is the Threefry of the spec (a numpy one, and
the Random123 known-answer vectors) and, once registered for CPU, every jax.random draw gives the
bits jax's own lowering gave."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from pkm_jax import cpu_random


def _numpy_threefry(k0, k1, x0, x1):
  """Threefry-2x32-20 in numpy uint32 arithmetic (wrapping), one round at a time."""
  k0, k1, x0, x1 = (np.asarray(a, np.uint32) for a in (k0, k1, x0, x1))
  keys = [k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA)]
  rot = [13, 15, 26, 6, 17, 29, 16, 24]
  with np.errstate(over="ignore"):
    x0, x1 = x0 + keys[0], x1 + keys[1]
    for r in range(20):
      x0 = x0 + x1
      x1 = np.uint32(((x1 << np.uint32(rot[r % 8])) | (x1 >> np.uint32(32 - rot[r % 8]))))
      x1 = x0 ^ x1
      if r % 4 == 3:
        s = r // 4 + 1
        x0 = x0 + keys[s % 3]
        x1 = x1 + keys[(s + 1) % 3] + np.uint32(s)
  return x0, x1


def test_known_answers_and_numpy():
  # Random123's kat_vectors for threefry2x32_20: (counter, key) -> output.
  kat = [((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
         ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
         ((0x243F6A88, 0x85A308D3), (0x13198A2E, 0x03707344), (0xC4923A9C, 0x483DF7A0))]
  for (x0, x1), (k0, k1), want in kat:
    got = jax.jit(cpu_random.threefry2x32)(*(jnp.uint32(a) for a in (k0, k1, x0, x1)))
    assert tuple(int(a) for a in got) == want
  rng = np.random.default_rng(0)
  x0, x1 = (rng.integers(0, 2**32, (3, 1000), dtype=np.uint32) for _ in range(2))
  k0, k1 = (rng.integers(0, 2**32, (3, 1), dtype=np.uint32) for _ in range(2))  # broadcast
  got = jax.jit(cpu_random.threefry2x32)(k0, k1, x0, x1)
  for a, b in zip(got, _numpy_threefry(k0, k1, x0, x1)):
    assert a.shape == (3, 1000)
    np.testing.assert_array_equal(a, b)


def test_registered_lowering_gives_jax_bits_faster_program():
  """In a fresh process (this one may have registered it already): draws before and after."""
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from pkm_jax import cpu_random
      def draws(key):
        k1, k2 = jax.random.split(key)
        return (jax.random.bernoulli(k1, 0.9, (4, 64, 33)), jax.random.normal(k2, (5, 7)),
                jax.random.key_data(jax.random.split(jax.random.fold_in(key, 3), 4)),
                jax.random.bits(key, (999,), jnp.uint8), jax.random.uniform(key, (17,)))
      key = jax.random.key(7)
      before = jax.jit(draws)(key)
      text_before = jax.jit(draws).lower(key).compile().as_text()
      cpu_random.use_unrolled_threefry()
      after = jax.jit(lambda k: draws(k))(key)
      text_after = jax.jit(lambda k: draws(k)).lower(key).compile().as_text()
      for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
      assert " while(" in text_before and " while(" not in text_after
      print("OK")
      """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]
