"""pkm_jax.cpu_top_k: the CPU custom call returns exactly jax.lax.top_k's values and indices
(ties, signed zeros, infinities and NaNs included), differentiates like it, is what the search
runs on CPU and stays out of GPU/TPU exports (building and fallbacks: test_cpu_kernels.py)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pkm_jax import cpu_kernels, cpu_top_k, product_keys
from pkm_jax.cpu_top_k import top_k

pytestmark = pytest.mark.skipif(os.environ.get("PKM_JAX_CPU_KERNELS") == "0",
                                reason="the custom calls are turned off (PKM_JAX_CPU_KERNELS=0)")


def _same(got, want):
  """Bit-identical values (NaN payloads and -0.0 included) and identical indices."""
  (gv, gi), (wv, wi) = got, want
  assert gv.shape == wv.shape and gi.shape == wi.shape
  np.testing.assert_array_equal(np.asarray(gi), np.asarray(wi))
  np.testing.assert_array_equal(np.asarray(gv).view(np.int32), np.asarray(wv).view(np.int32))


def test_builds_and_is_what_cpu_runs():
  assert cpu_kernels.available()  # a C++ compiler is part of this project's machines
  text = jax.jit(lambda x: top_k(x, 4)).lower(jnp.zeros((3, 20))).as_text()
  assert cpu_top_k.TARGET in text


@pytest.mark.parametrize("shape, k", [((8192, 128), 16),  # the default run's first stage
                                      ((4, 1024, 512), 32),  # BERT-base's, several row chunks
                                      ((3, 119), 16),  # the candidate stage's pruned grid
                                      ((2, 3, 37), 37),  # k = n
                                      ((5, 1), 1), ((7, 300), 1), ((0, 20), 5),
                                      ((3, 1500), 1024)])  # the kernel's largest k
def test_equals_lax_top_k_on_random_scores(shape, k):
  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  _same(jax.jit(lambda x: top_k(x, k))(x), jax.lax.top_k(x, k))


def test_equals_lax_top_k_on_ties_zeros_infinities_and_nans():
  """Rows drawn from a few values, most of them repeated: the order among equal scores (the
  lower index first), -0.0 below 0.0, and where NaNs and infinities go all match XLA's."""
  specials = np.array([0.0, -0.0, 1.0, -1.0, 2.0, np.inf, -np.inf, np.nan, -np.nan, 1.0],
                      np.float32)
  rng = np.random.default_rng(1)
  for _ in range(60):
    n = int(rng.integers(1, 70))
    k = int(rng.integers(1, n + 1))
    x = jnp.asarray(rng.choice(specials, size=(4, n)))
    _same(jax.jit(lambda x, k=k: top_k(x, k))(x), jax.lax.top_k(x, k))
  # Blocks of equal scores cut by the k-th place, in rows long enough for the blocked scan.
  x = jnp.asarray(np.repeat(rng.integers(0, 6, size=(64, 20)), 5, axis=1), jnp.float32)
  _same(jax.jit(lambda x: top_k(x, 17))(x), jax.lax.top_k(x, 17))


def test_beyond_the_kernels_k_is_lax_top_k():
  x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 1500)), jnp.float32)
  run = jax.jit(lambda x: top_k(x, 1025))
  assert cpu_top_k.TARGET not in run.lower(x).as_text()
  _same(run(x), jax.lax.top_k(x, 1025))


def test_gradients_vmap_and_other_dtypes_match_lax():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((6, 40)), jnp.float32)
  w = jnp.arange(5.0)
  loss = lambda f: lambda x: jnp.sum(jnp.sin(f(x, 5)[0]) * w)  # noqa: E731
  np.testing.assert_allclose(jax.grad(loss(top_k))(x), jax.grad(loss(jax.lax.top_k))(x))
  np.testing.assert_allclose(jax.jvp(lambda x: top_k(x, 5)[0], (x,), (x * 3,))[1],
                             jax.jvp(lambda x: jax.lax.top_k(x, 5)[0], (x,), (x * 3,))[1])
  _same(jax.vmap(lambda r: top_k(r, 5))(x.reshape(2, 3, 40)),
        jax.lax.top_k(x.reshape(2, 3, 40), 5))
  xb = x.astype(jnp.bfloat16)  # not float32: jax.lax.top_k itself
  assert cpu_top_k.TARGET not in jax.jit(lambda x: top_k(x, 5)).lower(xb).as_text()
  np.testing.assert_array_equal(top_k(xb, 5)[1], jax.lax.top_k(xb, 5)[1])


def test_search_with_custom_call_equals_lax_top_k_and_brute_force(monkeypatch):
  """The product-key search through the custom call picks what it picks through
  jax.lax.top_k, and both equal a brute-force top-k over every product key."""
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.standard_normal((2, 33, 4, 16)), jnp.float32)
  keys = jnp.asarray(rng.standard_normal((4, 2, 24, 8)), jnp.float32)
  got = jax.jit(lambda q, kk: product_keys.product_key_topk(q, kk, 6))(q, keys)
  assert cpu_top_k.TARGET in jax.jit(
      lambda q, kk: product_keys.product_key_topk(q, kk, 6)).lower(q, keys).as_text()
  monkeypatch.setattr(cpu_kernels, "available", lambda: False)
  want = jax.jit(lambda q, kk: product_keys.product_key_topk(q, kk, 6))(q, keys)
  _same(got, want)
  full = (jnp.einsum("bthd,hnd->bthn", q[..., :8], keys[:, 0])[..., :, None]
          + jnp.einsum("bthd,hnd->bthn", q[..., 8:], keys[:, 1])[..., None, :])
  brute = jax.lax.top_k(full.reshape(*full.shape[:3], -1), 6)
  np.testing.assert_array_equal(got[1], brute[1])
  np.testing.assert_allclose(got[0], brute[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_exports_keep_lax_top_k(platform):
  """An export for a GPU or TPU lowers only the jax.lax.top_k branch."""
  q = jax.ShapeDtypeStruct((64, 4, 32), jnp.float32)
  keys = jax.ShapeDtypeStruct((4, 2, 128, 16), jnp.float32)
  exported = export.export(jax.jit(lambda q, kk: product_keys.product_key_topk(q, kk, 16)),
                           platforms=[platform])(q, keys)
  text = exported.mlir_module()
  assert cpu_top_k.TARGET not in text and "top_k" in text.lower()
