"""pkm_jax.cpu_top_k: the CPU custom call returns exactly jax.lax.top_k's values and indices
(ties, signed zeros, infinities and NaNs included), differentiates like it, is what the search
runs on CPU, stays out of GPU/TPU exports, and falls back to jax.lax.top_k when it cannot build."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pkm_jax import cpu_top_k, product_keys
from pkm_jax.cpu_top_k import top_k

pytestmark = pytest.mark.skipif(os.environ.get("PKM_JAX_CPU_TOP_K") == "0",
                                reason="the custom call is turned off (PKM_JAX_CPU_TOP_K=0)")


def _same(got, want):
  """Bit-identical values (NaN payloads and -0.0 included) and identical indices."""
  (gv, gi), (wv, wi) = got, want
  assert gv.shape == wv.shape and gi.shape == wi.shape
  np.testing.assert_array_equal(np.asarray(gi), np.asarray(wi))
  np.testing.assert_array_equal(np.asarray(gv).view(np.int32), np.asarray(wv).view(np.int32))


def test_builds_and_is_what_cpu_runs():
  assert cpu_top_k.available()  # a C++ compiler is part of this project's machines
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
  monkeypatch.setattr(cpu_top_k, "available", lambda: False)
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


def _run(code: str, **env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                        text=True, env={**os.environ, **env}, timeout=300)


CHECK = """
    import warnings
    warnings.simplefilter("always")
    import jax, jax.numpy as jnp
    from pkm_jax import cpu_top_k
    x = jnp.asarray([[3.0, 1.0, 2.0, 3.0]])
    v, i = jax.jit(lambda x: cpu_top_k.top_k(x, 2))(x)
    print(cpu_top_k.available(), i.tolist(),
          cpu_top_k.TARGET in jax.jit(lambda x: cpu_top_k.top_k(x, 2)).lower(x).as_text())
"""


def test_build_cache_and_fallbacks(tmp_path):
  """Built once into PKM_JAX_CACHE_DIR (two processes starting together leave one whole
  library), or in a private folder under the temporary one when that cannot be made (never in
  one others can write to); a missing compiler or a library without the handler: one warning
  and jax.lax.top_k; PKM_JAX_CPU_TOP_K=0 turns it off."""
  cache = tmp_path / "cache"
  procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHECK)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PKM_JAX_CACHE_DIR": str(cache)})
           for _ in range(2)]
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert out.split("\n")[0] == "True [[0, 3]] True"
  assert [f.suffix for f in cache.iterdir()] == [".so"]  # one library, no leftovers

  # A cache folder that cannot be made: built in a private folder under the temporary one;
  # a temporary folder others can write to (a library planted there) is never used.
  (tmp_path / "file").write_text("")
  temp = tmp_path / "temp"
  temp.mkdir()
  fallback = _run(CHECK, PKM_JAX_CACHE_DIR=str(tmp_path / "file" / "cache"), TMPDIR=str(temp))
  assert fallback.returncode == 0 and fallback.stdout.startswith("True [[0, 3]] True"), \
      fallback.stderr
  private = temp / f"pkm_jax-{os.getuid()}"
  assert [f.suffix for f in private.iterdir()] == [".so"] and private.stat().st_mode & 0o077 == 0
  private.chmod(0o777)
  shared = _run(CHECK, PKM_JAX_CACHE_DIR=str(tmp_path / "file" / "cache"), TMPDIR=str(temp))
  assert shared.returncode == 0 and shared.stdout.startswith("False [[0, 3]] False")
  assert "not a private folder" in shared.stderr
  # A library that loads but lacks the handler: one warning, jax.lax.top_k.
  odd = tmp_path / "odd"
  odd.mkdir()
  subprocess.run(["c++", "-shared", "-fPIC", "-x", "c++", "-", "-o", str(odd / "lib.so")],
                 input="int unrelated() { return 0; }", text=True, check=True)
  broken_lib = _run("""
      import warnings
      warnings.simplefilter("always")
      from pathlib import Path
      from pkm_jax import cpu_top_k
      cpu_top_k.build = lambda: Path(%r)
      print(cpu_top_k.available())
  """ % str(odd / "lib.so"))
  assert broken_lib.returncode == 0 and broken_lib.stdout.strip() == "False", broken_lib.stderr
  assert broken_lib.stderr.count("RuntimeWarning") == 1 and "PkmTopKF32" in broken_lib.stderr

  broken = _run(CHECK, PKM_JAX_CACHE_DIR=str(tmp_path / "none"), CXX="no-such-compiler++")
  assert broken.returncode == 0, broken.stderr
  assert broken.stdout.split("\n")[0] == "False [[0, 3]] False"
  assert broken.stderr.count("RuntimeWarning") == 1 and "no-such-compiler++" in broken.stderr
  off = _run(CHECK, PKM_JAX_CACHE_DIR=str(tmp_path / "off"), PKM_JAX_CPU_TOP_K="0")
  assert off.returncode == 0 and off.stdout.split("\n")[0] == "False [[0, 3]] False", off.stderr
  assert not (tmp_path / "off").exists()
