"""pkm_jax.cpu_lookup: on CPU the weighted lookup, its weights' gradient and its table's run as
custom calls that compute what `product_keys.weighted_lookup` and its backward compute (and a
numpy brute force), build no table gradient when the table's is stopped, are what a one-device
memory layer runs, and stay out of GPU/TPU exports."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

from pkm_jax import cpu_kernels, cpu_lookup, product_keys
from pkm_jax.architecture import MemoryConfig
from pkm_jax.memory import ProductKeyMemory

pytestmark = pytest.mark.skipif(os.environ.get("PKM_JAX_CPU_KERNELS") == "0",
                                reason="the custom calls are turned off (PKM_JAX_CPU_KERNELS=0)")


def _case(shape, n, v, seed=0, padding=False):
  """A table, picks [B, T, H, K] (repeats; with padding, ids -1 and >= n too), weights and an
  output gradient."""
  rng = np.random.default_rng(seed)
  values = jnp.asarray(rng.standard_normal((n, v)), jnp.float32)
  idx = rng.integers(0, n, shape)
  if padding:
    idx = np.where(rng.random(shape) < 0.2, rng.choice([-1, n, n + 5], shape), idx)
  w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  g = jnp.asarray(rng.standard_normal(shape[:2] + (v,)), jnp.float32)
  return values, jnp.asarray(idx, jnp.int32), w, g


def _brute_force(values, idx, w, g):
  """Output, d table, d weights in float64 numpy: ids outside [0, n) add nothing."""
  values, idx, w, g = (np.asarray(x, np.float64) if x.dtype != jnp.int32 else np.asarray(x)
                       for x in (values, idx, w, g))
  n, v = values.shape
  valid = (idx >= 0) & (idx < n)
  rows = np.where(valid[..., None], values[np.clip(idx, 0, n - 1)], 0.0)  # [B, T, H, K, V]
  out = np.einsum("bthk,bthkv->btv", w, rows)
  d_w = np.einsum("btv,bthkv->bthk", g, rows)
  d_values = np.zeros((n, v))
  contrib = w[..., None] * g[:, :, None, None, :]
  np.add.at(d_values, idx[valid], contrib[valid])
  return out, d_values, d_w


def _grads(lookup, values, idx, w, g, stop_table=False):
  def loss(values, w):
    values = jax.lax.stop_gradient(values) if stop_table else values
    return jnp.sum(lookup(values, idx, w) * g)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))(values, w)


@pytest.mark.parametrize("shape, n, v", [((2, 33, 4, 8), 300, 24),  # V not a multiple of 16
                                         ((1, 64, 4, 16), 200, 16),  # picks > rows
                                         ((4, 16, 2, 4), 7, 5)])  # a few rows, many repeats
def test_equals_reference_and_brute_force(shape, n, v):
  values, idx, w, g = _case(shape, n, v)
  backward = jax.jit(jax.grad(lambda t, w: jnp.sum(cpu_lookup.weighted_lookup(t, idx, w) * g),
                              argnums=(0, 1))).lower(values, w).as_text()
  assert cpu_lookup.GATHER_DOT in backward and cpu_lookup.SCATTER_SUM in backward
  out = jax.jit(cpu_lookup.weighted_lookup)(values, idx, w)
  d_values, d_w = _grads(cpu_lookup.weighted_lookup, values, idx, w, g)
  want = [jax.jit(product_keys.weighted_lookup)(values, idx, w),
          *_grads(product_keys.weighted_lookup, values, idx, w, g)]
  for got, ref, brute in zip((out, d_values, d_w), want, _brute_force(values, idx, w, g)):
    assert got.shape == ref.shape and got.dtype == ref.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, brute, rtol=1e-5, atol=1e-5)


def test_ids_outside_the_table_are_padding():
  """-1, n and beyond add nothing and receive nothing (the search pads with n)."""
  values, idx, w, g = _case((3, 20, 4, 8), 64, 16, seed=1, padding=True)
  assert (np.asarray(idx) < 0).any() and (np.asarray(idx) >= 64).any()
  out = jax.jit(cpu_lookup.weighted_lookup)(values, idx, w)
  d_values, d_w = _grads(cpu_lookup.weighted_lookup, values, idx, w, g)
  ref = (jax.jit(product_keys.weighted_lookup)(values, idx, w),
         *_grads(product_keys.weighted_lookup, values, idx, w, g))
  for got, want, brute in zip((out, d_values, d_w), ref, _brute_force(values, idx, w, g)):
    np.testing.assert_allclose(got, brute, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(want, brute, rtol=1e-5, atol=1e-5)  # the reference agrees
  assert not np.asarray(d_w)[(np.asarray(idx) < 0) | (np.asarray(idx) >= 64)].any()


def test_a_stopped_table_builds_no_table_gradient():
  """Sparse value updates stop the table's gradient: only the weights' is computed."""
  values, idx, w, g = _case((2, 16, 4, 8), 128, 16)
  grad_w = jax.jit(jax.grad(lambda w: jnp.sum(cpu_lookup.weighted_lookup(
      jax.lax.stop_gradient(values), idx, w) * g)))
  text = grad_w.lower(w).as_text()
  assert cpu_lookup.GATHER_DOT in text and cpu_lookup.SCATTER_SUM not in text
  np.testing.assert_allclose(grad_w(w), _brute_force(values, idx, w, g)[2], rtol=1e-5,
                             atol=1e-5)


def _backward_text(values, idx, w, g) -> str:
  return jax.jit(jax.grad(lambda t, w: jnp.sum(cpu_lookup.weighted_lookup(t, idx, w) * g),
                          argnums=(0, 1))).lower(values, w).as_text()


def test_other_dtypes_and_no_kernels_are_the_reference(monkeypatch):
  values, idx, w, g = _case((2, 8, 4, 4), 64, 16)
  bf16 = values.astype(jnp.bfloat16)
  assert cpu_lookup.GATHER_DOT not in _backward_text(bf16, idx, w, g)
  np.testing.assert_allclose(jax.jit(cpu_lookup.weighted_lookup)(bf16, idx, w),
                             _brute_force(bf16.astype(jnp.float32), idx, w, g)[0], rtol=1e-5,
                             atol=1e-5)
  assert cpu_lookup.GATHER_DOT in _backward_text(values, idx, w, g)
  monkeypatch.setattr(cpu_kernels, "available", lambda: False)
  assert cpu_lookup.GATHER_DOT not in _backward_text(values, idx, w, g)


def test_a_one_device_memory_layer_runs_the_custom_calls():
  layer = ProductKeyMemory(32, MemoryConfig(n_keys=16, heads=2, k=4, k_dim=8, v_dim=32),
                           rngs=nnx.Rngs(0))
  x, mask = jnp.ones((2, 5, 32)), jnp.ones((2, 5))
  graphdef, state = nnx.split(layer)
  text = jax.jit(jax.grad(lambda state: jnp.sum(nnx.merge(graphdef, state)(x, mask)[0]))).lower(
      state).as_text()
  assert cpu_lookup.GATHER_DOT in text


def test_vmap():
  """Under jax.vmap (a batch of tables and picks) the calls run per element."""
  cases = [_case((2, 8, 2, 4), 32, 8, seed=s) for s in range(3)]
  values, idx, w, g = (jnp.stack(xs) for xs in zip(*cases))
  got = jax.jit(jax.vmap(cpu_lookup.weighted_lookup))(values, idx, w)
  grads = jax.jit(jax.vmap(lambda *a: _grads(cpu_lookup.weighted_lookup, *a)))(values, idx, w, g)
  for i, case in enumerate(cases):
    brute = _brute_force(*case)
    np.testing.assert_allclose(got[i], brute[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[0][i], brute[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[1][i], brute[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_exports_keep_the_reference(platform):
  """An export for a GPU or TPU lowers only the pure-JAX branches, forward and backward."""
  values = jax.ShapeDtypeStruct((256, 16), jnp.float32)
  idx = jax.ShapeDtypeStruct((2, 8, 4, 2), jnp.int32)
  w = jax.ShapeDtypeStruct((2, 8, 4, 2), jnp.float32)
  g = jax.ShapeDtypeStruct((2, 8, 16), jnp.float32)
  grads = lambda t, i, w, g: jax.grad(  # noqa: E731
      lambda t, w: jnp.sum(cpu_lookup.weighted_lookup(t, i, w) * g), argnums=(0, 1))(t, w)
  text = export.export(jax.jit(grads), platforms=[platform])(values, idx, w, g).mlir_module()
  assert not any(target in text for target in cpu_kernels.TARGETS)
  assert "scatter" in text  # the reference's backward
