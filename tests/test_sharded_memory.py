"""The memory's hand-partitioned ops (pkm_jax.sharded_memory) on 8 virtual CPU devices.

References: the single-device `memory.weighted_lookup` and `memory.product_key_topk` (values and
gradients), and the compiled HLO's collectives (shapes parsed from the text) for the
communication claims, each with a positive control.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from pkm_jax import sharded_memory, sharding  # noqa: E402
from pkm_jax.product_keys import product_key_topk, weighted_lookup  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")

COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                        r"(-start)?\(")
SHAPE = re.compile(r"\b(?:f16|bf16|f32|f64|s8|s16|s32|s64|u8|u32|pred)\[([\d,]*)\]")


def collective_sizes(hlo_text: str) -> list[int]:
  """Element counts of every array a collective produces or consumes (shapes on its line)."""
  sizes = []
  for line in hlo_text.splitlines():
    if COLLECTIVE.search(line):
      head = line.split("metadata=")[0]
      sizes += [int(np.prod([int(d) for d in dims.split(",") if d])) for dims in SHAPE.findall(head)]
  return sizes


def lookup_inputs(n=64, v=8, b=8, t=3, h=2, k=4, seed=0):
  rng = np.random.default_rng(seed)
  values = rng.normal(size=(n, v)).astype(np.float32)
  idx = rng.integers(0, n, size=(b, t, h, k))
  # Rows on both sides of every 8-row and 32-row block boundary, the first and the last row, and
  # the same row picked twice by one token and by several tokens.
  edges = [0, 7, 8, 15, 16, 31, 32, 33, 47, 48, 63]
  idx[0, 0].flat[:len(edges[:8])] = edges[:8]
  idx[1, 2].flat[:3] = edges[8:]
  idx[2, 1, 0, :] = 9
  idx[3, :, 1, 0] = 9
  weights = rng.random(size=(b, t, h, k)).astype(np.float32)
  g_out = rng.normal(size=(b, t, v)).astype(np.float32)
  return jnp.asarray(values), jnp.asarray(idx, jnp.int32), jnp.asarray(weights), jnp.asarray(g_out)


@pytest.mark.parametrize("data,model,slot_axes,chunk", [
    (4, 2, ("model",), None),
    (8, 1, ("model",), 3),  # chunk 3 does not divide the 8 picks: padded last chunk
    (1, 8, ("model",), None),
    (4, 2, ("model", "data"), 3),  # FSDP-style: rows over all 8 devices, picks gathered
])
def test_sharded_lookup_matches_dense(data, model, slot_axes, chunk):
  _check_lookup(data, model, slot_axes, (), ("data",), chunk)


@pytest.mark.parametrize("data,model,rows,cols,tokens", [
    (4, 2, (), ("model",), ("data", "model")),  # columns, tokens over every device
    (4, 2, ("model",), (), ("data", "model")),  # rows, tokens over every device
    (2, 4, ("data",), ("model",), ("data", "model")),  # rows and columns both split
    (4, 2, (), ("model",), ("data",)),  # columns; tokens the same on each 'model' pair
    (2, 4, ("model",), ("data",), ("model",)),  # every kind of step at once
    (2, 4, (), ("model", "data"), ("data", "model")),  # columns over a tuple of axes (FSDP)
    (4, 2, (), ("model", "data"), ("data", "model")),
])
def test_split_lookup_matches_dense(data, model, rows, cols, tokens):
  """Every TableSplit step (reduce-scatter, all-reduce, all-to-all, column all-gather) against
  the one-device lookup: values and both gradients, the table's gradient split as the table."""
  _check_lookup(data, model, rows, cols, tokens, 3)


def _check_lookup(data, model, slot_axes, col_axes, token_axes, chunk):
  values, idx, weights, g_out = lookup_inputs()

  def loss(lookup):
    return lambda v, w: jnp.sum(lookup(v, idx, w) * g_out)

  want_loss, (want_gv, want_gw) = jax.value_and_grad(loss(weighted_lookup), (0, 1))(values, weights)
  want_out = weighted_lookup(values, idx, weights)
  mesh = sharding.make_mesh(data, model)
  lookup = lambda v, i, w: sharded_memory.sharded_weighted_lookup(  # noqa: E731
      v, i, w, slot_axes=slot_axes, col_axes=col_axes, token_axes=token_axes, pick_chunk=chunk)
  table = NamedSharding(mesh, P(slot_axes or None, col_axes or None))
  tok = NamedSharding(mesh, P(token_axes))
  idx_t, weights_t = jax.device_put(idx, tok), jax.device_put(weights, tok)
  with jax.set_mesh(mesh):
    out = jax.jit(lookup)(jax.device_put(values, table), idx_t, weights_t)
    got_loss, (got_gv, got_gw) = jax.jit(jax.value_and_grad(
        lambda v, w: jnp.sum(lookup(v, idx_t, w) * g_out), (0, 1)))(
        jax.device_put(values, table), weights_t)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(got_gv, want_gv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_gw, want_gw, rtol=1e-5, atol=1e-5)
  # The table gradient stays split like the table.
  assert got_gv.sharding.is_equivalent_to(table, 2)


def test_sharded_lookup_of_a_bf16_table_matches_one_device():
  """memory.value_dtype=bfloat16: like the one-device lookup, the sharded one keeps the weights
  in float32 and returns float32, so both read the same stored rows the same way."""
  values, idx, weights, g_out = lookup_inputs()
  values16 = values.astype(jnp.bfloat16)
  loss = lambda lookup: lambda v, w: jnp.sum(lookup(v, idx, w) * g_out)
  want_out = weighted_lookup(values16, idx, weights)
  want_gv, want_gw = jax.grad(loss(weighted_lookup), (0, 1))(values16, weights)
  mesh = sharding.make_mesh(4, 2)
  lookup = lambda v, i, w: sharded_memory.sharded_weighted_lookup(v, i, w, pick_chunk=3)
  table = jax.device_put(values16, NamedSharding(mesh, P("model", None)))
  with jax.set_mesh(mesh):
    out = jax.jit(lookup)(table, idx, weights)
    got_gv, got_gw = jax.jit(jax.grad(loss(lookup), (0, 1)))(table, weights)
  assert out.dtype == want_out.dtype == jnp.float32 and got_gv.dtype == jnp.bfloat16
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_gv.astype(np.float32), want_gv.astype(np.float32), rtol=1e-2,
                             atol=1e-2)
  np.testing.assert_allclose(got_gw, want_gw, rtol=1e-5, atol=1e-5)


def test_sharded_lookup_needs_mesh_and_divisible_rows():
  values, idx, weights, _ = lookup_inputs()
  with pytest.raises(ValueError, match="needs a device mesh"):
    sharded_memory.sharded_weighted_lookup(values, idx, weights)
  with jax.set_mesh(sharding.make_mesh(1, 8)):
    with pytest.raises(ValueError, match="do not split into 8 blocks"):
      sharded_memory.sharded_weighted_lookup(values[:60], idx % 60, weights)


@pytest.mark.parametrize("data,model", [(8, 1), (4, 2), (2, 4)])
def test_sharded_search_matches_one_device(data, model):
  """Each device's search of its own tokens = the search of the whole batch on one device, in
  scores, picks and the gradients of queries and sub-keys (the latter summed over devices)."""
  r = np.random.default_rng(data)
  query = jnp.asarray(r.normal(size=(8, 3, 2, 8)), jnp.float32)
  sub_keys = jnp.asarray(r.normal(size=(2, 2, 16, 4)), jnp.float32)
  cot = jnp.asarray(r.normal(size=(8, 3, 2, 5)), jnp.float32)

  def loss(search):
    return lambda q, keys: jnp.sum(jnp.sin(search(q, keys)[0]) * cot)

  dense = lambda q, keys: product_key_topk(q, keys, 5)
  sharded = lambda q, keys: sharded_memory.sharded_product_key_topk(q, keys, 5)
  want, want_grads = dense(query, sub_keys), jax.grad(loss(dense), (0, 1))(query, sub_keys)
  mesh = sharding.make_mesh(data, model)
  with jax.set_mesh(mesh):
    q = jax.device_put(query, NamedSharding(mesh, P("data")))
    got, got_grads = jax.jit(sharded)(q, sub_keys), jax.jit(jax.grad(loss(sharded), (0, 1)))(
        q, sub_keys)
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-6, atol=1e-6)
  for g, g_want in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_want), rtol=1e-5, atol=1e-6)
  assert got[1].sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 4)


def test_sharded_search_needs_mesh_and_divisible_batch():
  query, sub_keys = jnp.zeros((6, 2, 1, 4)), jnp.zeros((1, 2, 8, 2))
  with pytest.raises(ValueError, match="needs a device mesh"):
    sharded_memory.sharded_product_key_topk(query, sub_keys, 2)
  with jax.set_mesh(sharding.make_mesh(4, 2)):
    with pytest.raises(ValueError, match="batch 6 does not split over mesh axes"):
      sharded_memory.sharded_product_key_topk(query, sub_keys, 2)


def _compiled_grad_hlo(mesh, slot_axes, lookup, n=8192, v=32, b=8, t=4, h=2, k=4) -> str:
  def loss(values, idx, weights):
    return jnp.sum(lookup(values, idx, weights) ** 2)

  shardings = (NamedSharding(mesh, P(slot_axes, None)), NamedSharding(mesh, P("data")),
               NamedSharding(mesh, P("data")))
  args = (jax.ShapeDtypeStruct((n, v), jnp.float32), jax.ShapeDtypeStruct((b, t, h, k), jnp.int32),
          jax.ShapeDtypeStruct((b, t, h, k), jnp.float32))
  with jax.set_mesh(mesh):
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 2)), in_shardings=shardings)
    return step.lower(*args).compile().as_text()


@pytest.mark.parametrize("data,model,slot_axes", [(1, 8, "model"), (4, 2, ("model", "data"))])
def test_sharded_lookup_moves_no_table_rows(data, model, slot_axes):
  n, v, tokens = 8192, 32, 8 * 4
  mesh = sharding.make_mesh(data, model)
  axes = (slot_axes,) if isinstance(slot_axes, str) else slot_axes
  hlo = _compiled_grad_hlo(mesh, slot_axes, lambda *a: sharded_memory.sharded_weighted_lookup(
      *a, slot_axes=axes))
  sizes = collective_sizes(hlo)
  assert sizes, "expected the partial sums to be reduced across devices"
  # Nothing on the wire is bigger than [tokens, V]; a table block alone is n / 8 * v.
  assert max(sizes) <= tokens * v < n // 8 * v

  # Positive control: replicating the table inside jit makes GSPMD all-gather it.
  naive = _compiled_grad_hlo(mesh, slot_axes, lambda values, *a: weighted_lookup(
      jax.lax.with_sharding_constraint(values, P()), *a))
  assert max(collective_sizes(naive)) >= n * v


def test_frozen_table_costs_no_table_gradient():
  """The sparse-Adam path holds the table fixed (stop_gradient) and differentiates a probe on the
  output: the compiled step must then build no table gradient -- no scatter, and no all-reduce
  of a table block over the data-parallel copies (mesh 4x2, rows over 'model')."""
  mesh = sharding.make_mesh(4, 2)

  def loss(values, idx, weights, probe):
    out = sharded_memory.sharded_weighted_lookup(jax.lax.stop_gradient(values), idx, weights)
    return jnp.sum((out + probe) ** 2)

  n, v, b, t, h, k = 8192, 32, 8, 4, 2, 4
  data = NamedSharding(mesh, P("data"))
  args = (jax.ShapeDtypeStruct((n, v), jnp.float32), jax.ShapeDtypeStruct((b, t, h, k), jnp.int32),
          jax.ShapeDtypeStruct((b, t, h, k), jnp.float32), jax.ShapeDtypeStruct((b, t, v), jnp.float32))

  def compiled(fn, argnums):
    with jax.set_mesh(mesh):
      step = jax.jit(jax.grad(fn, argnums=argnums),
                     in_shardings=(NamedSharding(mesh, P("model", None)), data, data, data))
      return step.lower(*args).compile().as_text()

  hlo = compiled(loss, (2, 3))
  assert " scatter(" not in hlo
  assert max(collective_sizes(hlo)) <= b * t * v

  # Positive control: the same lookup with the table differentiated shows its scatter-add.
  def unfrozen(values, idx, weights, probe):
    return jnp.sum((sharded_memory.sharded_weighted_lookup(values, idx, weights) + probe) ** 2)
  assert " scatter(" in compiled(unfrozen, (0, 2))

