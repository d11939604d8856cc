"""pkm_jax.cpu_sparse_rows: on CPU, sparse_adam's row gradients and lazy Adam step run as custom
calls that compute what their pure-JAX versions compute (and a brute-force dense gradient and
per-row Adam in numpy), update the table and moments in place, and stay out of GPU/TPU exports."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export

from pkm_jax import cpu_kernels, cpu_sparse_rows
from pkm_jax import sparse_adam as sa

pytestmark = pytest.mark.skipif(os.environ.get("PKM_JAX_CPU_KERNELS") == "0",
                                reason="the custom calls are turned off (PKM_JAX_CPU_KERNELS=0)")


def _picks(rng, shape, n, v):
  """Random picks (with duplicates, and ids >= n: padding), weights and output gradients."""
  b, t, h, k = shape
  idx = jnp.asarray(rng.integers(0, n + n // 8 + 1, shape), jnp.int32)
  w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  g = jnp.asarray(rng.standard_normal((b, t, v)), jnp.float32)
  return idx, w, g


def _pure_jax(monkeypatch):
  monkeypatch.setattr(cpu_kernels, "available", lambda: False)


@pytest.mark.parametrize("shape, n, v", [((2, 33, 4, 8), 300, 24),  # picks < rows
                                         ((1, 64, 4, 16), 200, 16),  # picks > rows: R = N
                                         ((4, 16, 2, 4), 7, 5)])  # a few rows, many repeats
def test_row_gradients_equal_pure_jax_and_brute_force(monkeypatch, shape, n, v):
  idx, w, g = _picks(np.random.default_rng(0), shape, n, v)
  run = lambda: jax.jit(lambda *a: sa.row_gradients_and_norm(*a, num_rows=n))  # noqa: E731
  assert cpu_sparse_rows.ROW_GRADIENTS in run().lower(idx, w, g).as_text()
  ids, grads, sq = run()(idx, w, g)
  _pure_jax(monkeypatch)
  assert cpu_sparse_rows.ROW_GRADIENTS not in run().lower(idx, w, g).as_text()
  want_ids, want_grads, want_sq = run()(idx, w, g)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(grads, want_grads, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(sq, want_sq, rtol=1e-5)
  # Brute force: the dense gradient of the table, d table[r] = sum of w * g over r's picks.
  dense = np.zeros((n + n // 8 + 1, v))
  h, k = shape[2:]
  tokens = np.repeat(np.asarray(g, np.float64).reshape(-1, v), h * k, axis=0)
  np.add.at(dense, np.asarray(idx).ravel(), np.asarray(w, np.float64).ravel()[:, None] * tokens)
  picked = np.unique(np.asarray(idx)[np.asarray(idx) < n])
  r = min(idx.size, n)
  np.testing.assert_array_equal(ids[:len(picked)], picked)
  assert ids.shape == (r,) and np.all(np.asarray(ids)[len(picked):] == n)
  np.testing.assert_allclose(grads[:len(picked)], dense[picked], rtol=1e-5, atol=1e-5)
  assert not np.asarray(grads)[len(picked):].any()
  np.testing.assert_allclose(sq, np.sum(dense[picked] ** 2), rtol=1e-5)


def test_out_of_range_ids_are_padding_in_both(monkeypatch):
  """Ids >= num_rows or negative are dropped alike (a few picks, most of them padding)."""
  idx = jnp.asarray([[[[3, 9, -1, 12], [9, 40, 0, 3]]]], jnp.int32)  # num_rows 10
  w = jnp.asarray(np.arange(1.0, 9.0).reshape(1, 1, 2, 4), jnp.float32)
  g = jnp.ones((1, 1, 2), jnp.float32)
  got = jax.jit(lambda *a: sa.row_gradients_and_norm(*a, num_rows=10))(idx, w, g)
  want = jax.jit(lambda *a: sa.row_gradients_and_norm(*a, num_rows=10, use_cpu_kernel=False))(
      idx, w, g)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(got[0], [0, 3, 9, 10, 10, 10, 10, 10])
  np.testing.assert_array_equal(got[1][:3, 0], [7.0, 1.0 + 8.0, 2.0 + 5.0])


@pytest.mark.parametrize("weight_decay, schedule", [(0.0, False), (0.01, True)])
def test_lazy_adam_step_equals_pure_jax_and_numpy(weight_decay, schedule):
  rng = np.random.default_rng(1)
  n, v = 4096, 24  # most rows not picked
  idx, w, g = _picks(rng, (2, 33, 4, 8), n, v)
  ids, grads = sa.row_gradients(idx, w, g, num_rows=n)
  lr = optax.linear_schedule(1e-2, 1e-3, 10) if schedule else 1e-2
  tx = sa.sparse_adam(lr, weight_decay=weight_decay)
  reference = sa.sparse_adam(lr, weight_decay=weight_decay, use_cpu_kernel=False)
  table = jnp.asarray(rng.standard_normal((n, v)), jnp.float32)
  state = sa.SparseAdamState(count=jnp.asarray(4, jnp.int32),
                             mu=jnp.asarray(rng.standard_normal((n, v)) * 0.1, jnp.float32),
                             nu=jnp.asarray(rng.random((n, v)) * 0.1, jnp.float32))
  scale = jnp.float32(0.7)
  args = (ids, grads, state, table, scale)
  assert cpu_sparse_rows.LAZY_ADAM in jax.jit(tx.step).lower(*args).as_text()
  assert cpu_sparse_rows.LAZY_ADAM not in jax.jit(reference.step).lower(*args).as_text()
  got_table, got = jax.jit(tx.step)(*args)
  want_table, want = jax.jit(reference.step)(*args)
  for a, b in ((got_table, want_table), (got.mu, want.mu), (got.nu, want.nu)):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
  assert int(got.count) == int(want.count) == 5
  # Rows not picked (most of them): bit for bit as they were.
  rest = np.setdiff1d(np.arange(n), np.asarray(ids))
  assert len(rest) > n // 2
  for new, old in ((got_table, table), (got.mu, state.mu), (got.nu, state.nu)):
    np.testing.assert_array_equal(np.asarray(new)[rest], np.asarray(old)[rest])
  # numpy Adam(W) on the picked rows, in float64.
  real = np.asarray(ids) < n
  r_ids = np.asarray(ids)[real]
  gr = np.asarray(grads, np.float64)[real] * 0.7
  mu = 0.1 * gr + 0.9 * np.asarray(state.mu, np.float64)[r_ids]
  nu = 0.001 * gr**2 + 0.999 * np.asarray(state.nu, np.float64)[r_ids]
  step = (mu / (1 - 0.9**5)) / (np.sqrt(nu / (1 - 0.999**5)) + 1e-8)
  step = step + weight_decay * np.asarray(table, np.float64)[r_ids]
  rate = float(lr(4)) if schedule else lr
  np.testing.assert_allclose(np.asarray(got_table)[r_ids],
                             np.asarray(table, np.float64)[r_ids] - rate * step, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(got.mu)[r_ids], mu, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(got.nu)[r_ids], nu, rtol=1e-5, atol=1e-9)


def test_lazy_adam_step_updates_donated_buffers_in_place():
  rng = np.random.default_rng(2)
  n, v = 4096, 64
  idx, w, g = _picks(rng, (1, 32, 4, 8), n, v)
  ids, grads = sa.row_gradients(idx, w, g, num_rows=n)
  tx = sa.sparse_adam(1e-3)
  table = jnp.asarray(rng.standard_normal((n, v)), jnp.float32)
  state = tx.init(table)
  before = [x.unsafe_buffer_pointer() for x in (table, state.mu, state.nu)]
  # Outputs in the order of the donated inputs, which jit pairs by position.
  state, table = jax.jit(lambda *a: tx.step(*a)[::-1], donate_argnums=(2, 3))(
      ids, grads, state, table)
  assert [x.unsafe_buffer_pointer() for x in (table, state.mu, state.nu)] == before


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_exports_keep_pure_jax(platform):
  """An export for a GPU or TPU lowers only the pure-JAX branches."""
  n, v = 256, 16
  ids = jax.ShapeDtypeStruct((64,), jnp.int32)
  grads = jax.ShapeDtypeStruct((64, v), jnp.float32)
  table = jax.ShapeDtypeStruct((n, v), jnp.float32)
  state = sa.SparseAdamState(count=jax.ShapeDtypeStruct((), jnp.int32), mu=table, nu=table)
  step = export.export(jax.jit(sa.sparse_adam(1e-3).step), platforms=[platform])(
      ids, grads, state, table)
  picks = jax.ShapeDtypeStruct((2, 8, 4, 2), jnp.int32)
  rows = export.export(jax.jit(lambda i, w, g: sa.row_gradients_and_norm(i, w, g, num_rows=n)),
                       platforms=[platform])(
      picks, jax.ShapeDtypeStruct((2, 8, 4, 2), jnp.float32),
      jax.ShapeDtypeStruct((2, 8, v), jnp.float32))
  for exported in (step, rows):
    text = exported.mlir_module()
    assert not any(target in text for target in cpu_kernels.TARGETS)
    assert "scatter" in text  # the pure-JAX loop's


def test_duplicate_row_ids_are_an_error_before_any_write():
  """Two threads would step one row at once: a caller's duplicates are refused, nothing moves."""
  table = jnp.arange(12, dtype=jnp.float32).reshape(6, 2)
  assert cpu_sparse_rows.usable(table)  # built and registered
  kwargs = dict(grad_scale=1.0, lr=0.1, bias1=0.1, bias2=0.001, b1=0.9, b2=0.999, eps=1e-8,
                weight_decay=0.0)
  step = jax.jit(lambda ids, g, t, m, n: cpu_sparse_rows.lazy_adam_step(ids, g, t, m, n,
                                                                        **kwargs))
  ok = step(jnp.asarray([1, 6, 6, 3]), jnp.ones((4, 2)), table, jnp.zeros_like(table),
            jnp.zeros_like(table))  # padding (6 = N) may repeat
  assert not np.array_equal(ok[0][1], table[1]) and np.array_equal(ok[0][0], table[0])
  with pytest.raises(Exception, match="row id 3 appears more than once"):
    jax.block_until_ready(step(jnp.asarray([3, 1, 3, 6]), jnp.ones((4, 2)), table,
                               jnp.zeros_like(table), jnp.zeros_like(table)))


def test_a_failed_allocation_is_an_error_not_an_abort():
  """Under an address-space limit the row gradients' working buffers cannot be had: the call
  raises RESOURCE_EXHAUSTED in Python; the process lives on (exit 0)."""
  import subprocess
  import sys
  import textwrap

  code = textwrap.dedent("""
      import resource, jax, jax.numpy as jnp
      from pkm_jax import cpu_sparse_rows
      picks = 1 << 25  # 32M picks: 256 MB of ids and weights; ~500 MB of sort buffers inside
      idx = (jnp.arange(picks, dtype=jnp.int32) % 1000).reshape(-1, 32)
      w = jnp.ones(idx.shape, jnp.float32)
      g = jnp.ones((idx.shape[0], 1), jnp.float32)
      assert cpu_sparse_rows.usable(w)  # built and registered
      f = jax.jit(lambda i, w, g: cpu_sparse_rows.row_gradients(i, w, g, num_rows=1000))
      jax.block_until_ready(f(idx[:64], w[:64], g[:64]))  # compiled, and the kernel loaded
      with open("/proc/self/status") as s:
        vm = next(int(l.split()[1]) for l in s if l.startswith("VmSize:")) * 1024
      resource.setrlimit(resource.RLIMIT_AS, (vm + (160 << 20), resource.RLIM_INFINITY))
      try:
        jax.block_until_ready(f(idx, w, g))
        print("no error")
      except Exception as e:
        print("raised", "RESOURCE_EXHAUSTED" in str(e), "out of host memory" in str(e))
      """)
  # Without the suite's huge-page tunable: its 2 MB-aligned mappings would eat the headroom.
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["raised", "True", "True"], proc.stdout + proc.stderr[-2000:]
