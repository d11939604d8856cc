"""pkm_jax.cpu_random: the unrolled Threefry-2x32 is the Threefry of the spec (a numpy one, and
the Random123 known-answer vectors); pkm-jax's own keys draw the bits jax's default keys draw,
and nothing of jax changes for other code."""

import os
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


def test_own_keys_give_jax_bits_and_jax_is_untouched():
  """pkm-jax's keys draw exactly what jax's default keys draw (dropout's shapes and widths,
  under jit and vmap); on CPU in one unrolled pass (no while loop); and a jax.random function of
  the user's lowers the same text before and after pkm-jax's keys were used."""
  def draws(key):
    k1, k2 = jax.random.split(key)
    return (jax.random.bernoulli(k1, 0.9, (4, 64, 33)), jax.random.normal(k2, (5, 7)),
            jax.random.key_data(jax.random.split(jax.random.fold_in(key, 3), 4)),
            jax.random.bits(key, (999,), jnp.uint8), jax.random.uniform(key, (17,)),
            jax.random.bits(key, (3, 5), jnp.uint16),
            jax.vmap(lambda k: jax.random.bernoulli(k, 0.5, (6,)))(jax.random.split(k2, 3)))

  user = jax.jit(lambda k: jax.random.bits(k, (8, 8)))
  text_before = user.lower(jax.random.key(7)).as_text()
  ours = jax.jit(draws)(cpu_random.key(7))
  theirs = jax.jit(draws)(jax.random.key(7))
  for a, b in zip(ours, theirs):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(jax.random.key_data(cpu_random.key(7)),
                                jax.random.key_data(jax.random.key(7)))
  ours_text = jax.jit(draws).lower(cpu_random.key(7)).compile().as_text()
  theirs_text = jax.jit(draws).lower(jax.random.key(7)).compile().as_text()
  assert " while(" in theirs_text
  # Split and fold_in are jax's (small, loops allowed); the draws themselves run unrolled.
  assert ours_text.count(" while(") < theirs_text.count(" while(")
  assert user.lower(jax.random.key(7)).as_text() == text_before


def test_no_process_wide_change_in_a_fresh_process():
  """Building a program leaves jax's lowering of a user's random function as it was."""
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp
      from configs import default
      from pkm_jax import trainer
      # A new function object each time (no cache shared), from the same source line.
      lowered = lambda: jax.jit(lambda k: jax.random.bits(k, (999,))).lower(jax.random.key(3))
      before = lowered().as_text()
      assert before == lowered().as_text()  # the comparison's control
      config = default.get_config()
      config.model.hidden_size, config.model.intermediate_size, config.model.num_layers = 32, 64, 2
      config.model.num_heads, config.memory.layers, config.memory.n_keys = 2, (1,), 8
      config.memory.k, config.memory.k_dim, config.memory.heads = 4, 16, 2
      program = trainer.build_train_program(config, vocab_size=100)
      assert lowered().as_text() == before
      print("OK")
      """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]
