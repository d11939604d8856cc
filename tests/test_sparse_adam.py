"""Lazy Adam on table rows: against a numpy lazy-Adam reference, optax.adamw, jax.grad, and the
unsharded update; plus a compiled-HLO check that a step does no table-sized work."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from pkm_jax import cpu_kernels, sharded_memory, sharding  # noqa: E402
from pkm_jax import sparse_adam as sa  # noqa: E402
from pkm_jax.product_keys import weighted_lookup  # noqa: E402

B1, B2, EPS = 0.9, 0.99, 1e-6


def numpy_lazy_adam(table, steps, lr, weight_decay):
  """Straight from the LazyAdam definition, float64: per step, sum duplicate ids' gradients,
  then Adam(W) on each touched row with the global step count; other rows are not visited."""
  table = table.astype(np.float64)
  mu, nu = np.zeros_like(table), np.zeros_like(table)
  for t, (ids, grads) in enumerate(steps, start=1):
    g = np.zeros_like(table)
    np.add.at(g, ids, grads)
    for r in np.unique(ids):
      mu[r] = B1 * mu[r] + (1 - B1) * g[r]
      nu[r] = B2 * nu[r] + (1 - B2) * g[r] ** 2
      step = (mu[r] / (1 - B1**t)) / (np.sqrt(nu[r] / (1 - B2**t)) + EPS)
      table[r] = table[r] - lr(t - 1) * (step + weight_decay * table[r])
  return table, mu, nu


def sparse_step(tx, num_rows, fused=False):
  def step(table, state, ids, grads):
    ids, grads = sa.coalesce_rows(ids, grads, num_rows)
    if fused:
      return tx.step(ids, grads, state, table)
    ids, updates, state = tx.update(ids, grads, state, table)
    return sa.apply_row_updates(table, ids, updates), state
  return jax.jit(step)


@pytest.mark.parametrize("fused", [False, True])
def test_matches_numpy_lazy_adam_and_leaves_untouched_rows_bit_identical(fused, monkeypatch):
  monkeypatch.setattr(sa, "STEP_CHUNK_BYTES", 5 * 4 * 4)  # tx.step: 5-row chunks, the last padded
  n, v, r = 32, 4, 12
  rng = np.random.default_rng(0)
  table0 = rng.normal(size=(n, v)).astype(np.float32)
  # Rows 20.. are never picked; picks repeat within a step; the rate follows a schedule.
  steps = [(rng.integers(0, 20, size=r), rng.normal(size=(r, v)).astype(np.float32))
           for _ in range(5)]
  schedule = optax.linear_schedule(1e-2, 2e-3, 5)
  tx = sa.sparse_adam(schedule, B1, B2, EPS, weight_decay=0.1)
  step = sparse_step(tx, n, fused)
  table, state = jnp.asarray(table0), tx.init(jnp.asarray(table0))
  for ids, grads in steps:
    prev = jax.tree.map(np.asarray, (table, state.mu, state.nu))
    table, state = step(table, state, jnp.asarray(ids, jnp.int32), jnp.asarray(grads))
    untouched = np.setdiff1d(np.arange(n), ids)
    for before, after in zip(prev, (table, state.mu, state.nu)):
      np.testing.assert_array_equal(np.asarray(after)[untouched], before[untouched])
  want_table, want_mu, want_nu = numpy_lazy_adam(table0, steps, lambda t: float(schedule(t)), 0.1)
  assert int(state.count) == len(steps)
  np.testing.assert_allclose(table, want_table, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.mu, want_mu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.nu, want_nu, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(table)[20:], table0[20:])


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 64])
def test_step_equals_update_then_apply(chunk_rows, monkeypatch):
  """tx.step (one in-place loop over row chunks) gives what tx.update followed by
  apply_row_updates gives (to XLA's rounding of the same expressions), padding ids (>= N)
  included, whatever the chunk size; rows never picked stay bit-identical."""
  monkeypatch.setattr(sa, "STEP_CHUNK_BYTES", chunk_rows * 4 * 4)
  n, v = 40, 4
  rng = np.random.default_rng(3)
  tx = sa.sparse_adam(optax.linear_schedule(1e-2, 1e-3, 4), B1, B2, EPS, weight_decay=0.05)

  @jax.jit
  def update_then_apply(ids, grads, state, table):
    _, updates, state = tx.update(ids, grads, state, table)
    return sa.apply_row_updates(table, ids, updates), state

  table0 = jnp.asarray(rng.normal(size=(n, v)).astype(np.float32))
  want = got = (table0, tx.init(table0))
  picked = set()
  for _ in range(3):
    ids = np.concatenate([rng.choice(n - 8, 17, replace=False), [n, n]]).astype(np.int32)
    grads = rng.normal(size=(19, v)).astype(np.float32)
    grads[-2:] = 0  # padding rows carry zero gradients, as row_gradients makes them
    picked |= set(ids[:-2].tolist())
    want = update_then_apply(ids, grads, want[1], want[0])
    got = jax.jit(tx.step)(ids, grads, got[1], got[0])
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
  never = np.setdiff1d(np.arange(n), sorted(picked))
  np.testing.assert_array_equal(np.asarray(got[0])[never], np.asarray(table0)[never])
  assert not np.asarray(got[1].mu)[never].any() and len(never) >= 8


def test_equals_optax_adamw_when_every_row_is_touched():
  n, v = 16, 3
  rng = np.random.default_rng(1)
  table0 = jnp.asarray(rng.normal(size=(n, v)), jnp.float32)
  schedule = optax.cosine_decay_schedule(3e-3, 4)
  tx = sa.sparse_adam(schedule, B1, B2, EPS, weight_decay=0.05)
  ref = optax.adamw(schedule, B1, B2, EPS, weight_decay=0.05)
  table, state = table0, tx.init(table0)
  ref_table, ref_state = table0, ref.init(table0)
  for _ in range(4):
    grads = jnp.asarray(rng.normal(size=(n, v)), jnp.float32)
    # All rows in a shuffled order, plus two padding ids (>= n) that must change nothing.
    perm = rng.permutation(n)
    ids = jnp.asarray(np.concatenate([perm, [n, n + 5]]), jnp.int32)
    row_grads = jnp.concatenate([grads[perm], jnp.ones((2, v))])
    ids, updates, state = tx.update(ids, row_grads, state, table)
    table = sa.apply_row_updates(table, ids, updates)
    ref_updates, ref_state = ref.update(grads, ref_state, ref_table)
    ref_table = optax.apply_updates(ref_table, ref_updates)
  np.testing.assert_allclose(table, ref_table, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(state.mu, ref_state[0].mu, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(state.nu, ref_state[0].nu, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("pick_chunk", [None, 3])
def test_row_gradients_equal_dense_table_gradient(pick_chunk):
  n, v, b, t, h, k = 40, 5, 3, 4, 2, 4
  rng = np.random.default_rng(2)
  values = jnp.asarray(rng.normal(size=(n, v)), jnp.float32)
  idx = rng.integers(0, 25, size=(b, t, h, k))
  idx[0, 0, :, :] = 7  # one token picks the same row 8 times
  idx = jnp.asarray(idx, jnp.int32)
  weights = jnp.asarray(rng.random(size=(b, t, h, k)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(b, t, v)), jnp.float32)

  def loss(values, probe):  # nonlinear in the memory output, as the MLM loss is
    return jnp.sum(jnp.tanh(weighted_lookup(values, idx, weights) + probe) * target)

  dense = jax.grad(loss)(values, jnp.zeros((b, t, v)))
  # What the trainer does: the table is held fixed, a zero probe on the output takes the grad.
  grad_out = jax.grad(loss, argnums=1)(jax.lax.stop_gradient(values), jnp.zeros((b, t, v)))
  row_ids, row_grads = jax.jit(lambda *a: sa.row_gradients(
      *a, num_rows=n, pick_chunk=pick_chunk))(idx, weights, grad_out)

  touched = np.unique(np.asarray(idx))
  assert row_ids.shape == (min(idx.size, n),) and row_grads.shape == (min(idx.size, n), v)
  np.testing.assert_array_equal(row_ids[:len(touched)], touched)
  np.testing.assert_array_equal(row_ids[len(touched):], n)  # padding
  np.testing.assert_allclose(row_grads[:len(touched)], dense[touched], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(row_grads[len(touched):], 0)
  np.testing.assert_array_equal(np.asarray(dense)[np.setdiff1d(np.arange(n), touched)], 0)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
@pytest.mark.parametrize("data,model,slot_axes", [(1, 8, ("model",)), (4, 2, ("model", "data")),
                                                  (4, 2, ("model",))])
def test_sharded_rows_and_update_equal_unsharded(data, model, slot_axes):
  # Row gradients built inside each device's row block, then stepped there, against the same
  # three steps on one device: picks with duplicates and every block's first/last row, padding.
  n, v, b, t, h, k = 64, 4, 8, 3, 2, 4
  rng = np.random.default_rng(3)
  table0 = jnp.asarray(rng.normal(size=(n, v)), jnp.float32)
  tx = sa.sparse_adam(1e-2, B1, B2, EPS, weight_decay=0.01)
  mesh = sharding.make_mesh(data, model)
  table_sharding = NamedSharding(mesh, P(slot_axes, None))
  state0 = tx.init(table0)
  state_sharding = sharding.row_state_shardings(state0, table_sharding, n)
  tokens = NamedSharding(mesh, P("data"))

  def sharded_step(idx, w, g, state, table):
    ids, grads, sq_norm = sharded_memory.sharded_row_gradients(idx, w, g, num_rows=n,
                                                               slot_axes=slot_axes)
    table, state = sharded_memory.sharded_row_update(tx, ids, grads, state, table,
                                                     slot_axes=slot_axes)
    return table, state, sq_norm

  sharded_step = jax.jit(sharded_step, in_shardings=(tokens, tokens, tokens, state_sharding,
                                                     table_sharding),
                         out_shardings=(table_sharding, state_sharding, None))
  table, state = table0, state0
  s_table = jax.device_put(table0, table_sharding)
  s_state = jax.device_put(state0, state_sharding)
  for _ in range(3):
    idx = rng.integers(0, n, size=(b, t, h, k))
    idx[0, 0, 0, :] = [0, 7, 8, 63]
    idx[1, 1, 1, :] = 8  # one token picks the same row four times
    idx[2, 2] = n  # a padding token
    idx = jnp.asarray(idx, jnp.int32)
    w = jnp.asarray(rng.random(size=(b, t, h, k)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(b, t, v)), jnp.float32)
    ids, grads = sa.row_gradients(idx, w, g, num_rows=n)
    ids, updates, state = tx.update(ids, grads, state, table)
    table = sa.apply_row_updates(table, ids, updates)
    with jax.set_mesh(mesh):
      s_table, s_state, sq_norm = sharded_step(idx, w, g, s_state, s_table)
    np.testing.assert_allclose(sq_norm, np.sum(np.square(grads)), rtol=1e-5)
  assert s_table.sharding.is_equivalent_to(table_sharding, 2)
  assert s_state.mu.sharding.is_equivalent_to(table_sharding, 2)
  # Separately compiled programs may fuse differently (FMA): equal to float32 rounding.
  np.testing.assert_allclose(s_table, table, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(s_state.mu, state.mu, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(s_state.nu, state.nu, rtol=1e-6, atol=1e-9)
  assert int(s_state.count) == int(state.count) == 3


def _compiled_step(n, v, r, fused=False):
  tx = sa.sparse_adam(1e-3, weight_decay=0.01)

  def step(table, state, ids, grads):
    if fused:
      return tx.step(ids, grads, state, table)
    ids, updates, state = tx.update(ids, grads, state, table)
    return sa.apply_row_updates(table, ids, updates), state

  table = jax.ShapeDtypeStruct((n, v), jnp.float32)
  args = (table, jax.eval_shape(tx.init, table), jax.ShapeDtypeStruct((r,), jnp.int32),
          jax.ShapeDtypeStruct((r, v), jnp.float32))
  return jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()


def _hlo_computations(hlo: str) -> dict[str, list[str]]:
  """Computation name ('ENTRY' for the entry) -> its instruction lines."""
  comps, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r"(ENTRY )?%(\S+) .*\{$", line)
    if head:
      name = "ENTRY" if head.group(1) else head.group(2)
      comps[name] = []
    elif line.startswith("}"):
      name = None
    elif name:
      comps[name].append(line)
  return comps


def _opcode(line: str) -> tuple[str, str] | None:
  """(result type, opcode) of an HLO instruction line."""
  m = re.match(r"\s*(?:ROOT )?%\S+ = (\([^)]*\)|\S+) ([\w-]+)\(", line)
  return (m.group(1), m.group(2)) if m else None


def test_step_does_no_table_sized_work():
  n, v, r = 65536, 8, 16
  small, big = _compiled_step(4096, v, r), _compiled_step(n, v, r)
  # Arithmetic does not grow with N (dense Adam's would be 16x bigger here).
  assert small.cost_analysis()["flops"] == big.cost_analysis()["flops"]
  comps = _hlo_computations(big.as_text())
  roots = {name: (_opcode(line) or ("", ""))[1]
           for name, lines in comps.items() for line in lines if "ROOT" in line}
  # The only table-shaped values the program makes are scatters (plain or as the root of a
  # fusion) into the donated table/mu/nu buffers: no elementwise op, copy or broadcast over N.
  made = []
  for line in comps["ENTRY"]:
    parsed = _opcode(line)
    if parsed and parsed[0].startswith(f"f32[{n},{v}]"):
      called = re.search(r"calls=%([^,\s]+)", line)
      made.append(roots.get(called.group(1)) if parsed[1] == "fusion" and called else parsed[1])
  assert sorted(made) == ["parameter"] * 3 + ["scatter"] * 3, made
  assert big.as_text().count("may-alias") >= 3  # scatters write into the donated inputs


def test_fused_step_does_no_table_sized_work(monkeypatch):
  """tx.step's loop (pure JAX: GPUs, TPUs) carries the donated table and moments: the only
  table-shaped values are the parameters, the loop's tuples and the scatters into them (no
  copy, nothing elementwise)."""
  monkeypatch.setattr(cpu_kernels, "available", lambda: False)
  monkeypatch.setattr(sa, "STEP_CHUNK_BYTES", 4 * 8 * 4)  # 4 chunks of 4 rows: a real loop
  n, v, r = 65536, 8, 16
  small, big = _compiled_step(4096, v, r, fused=True), _compiled_step(n, v, r, fused=True)
  assert small.cost_analysis()["flops"] == big.cost_analysis()["flops"]
  comps = _hlo_computations(big.as_text())
  ops = {(parsed[1]) for lines in comps.values() for line in lines
         if (parsed := _opcode(line)) and f"f32[{n},{v}]" in parsed[0]}
  assert "while" in ops and "scatter" in ops, ops
  assert ops <= {"parameter", "scatter", "get-tuple-element", "tuple", "while", "fusion"}, ops
  fused_roots = {(_opcode(line) or ("", ""))[1] for lines in comps.values() for line in lines
                 if "ROOT" in line and f"f32[{n},{v}]" in line}
  assert fused_roots <= {"scatter", "tuple", "parameter"}, fused_roots


def test_cpu_step_updates_the_donated_table_in_its_custom_call():
  """On CPU, tx.step is one custom call on the donated table and moments: no copy of them."""
  if not cpu_kernels.available():
    pytest.skip("the CPU kernels are not built here")
  n, v = 65536, 8
  comps = _hlo_computations(_compiled_step(n, v, 16, fused=True).as_text())
  ops = {(parsed[1]) for lines in comps.values() for line in lines
         if (parsed := _opcode(line)) and f"f32[{n},{v}]" in parsed[0]}
  assert "custom-call" in ops and ops <= {"parameter", "custom-call", "get-tuple-element",
                                          "tuple"}, ops
