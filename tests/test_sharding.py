"""Mesh, logical-axis rules and sharded init (8 virtual CPU devices)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from pkm_jax import sharding  # noqa: E402
from test_sharded_memory import SHAPE  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")


# ---------------------------------------------------------------------------------------------
# Mesh and logical rules
# ---------------------------------------------------------------------------------------------


def test_make_mesh_fills_and_validates():
  mesh = sharding.make_mesh(-1, 2)
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(sharding.make_mesh(2, -1).shape) == {"data": 2, "model": 4}
  with pytest.raises(ValueError, match="needs more than the 8 available devices"):
    sharding.make_mesh(3, 3)
  small = sharding.make_mesh(1, 1)  # explicit sizes may use a prefix of the devices
  assert small.devices.size == 1 and small.devices.flat[0] == jax.devices()[0]
  with pytest.raises(ValueError, match="cannot be split"):
    sharding.make_mesh(-1, 3)


def test_logical_rules_to_specs():
  rules = sharding.DEFAULT_RULES
  assert sharding.logical_to_spec(("slots", "value_embed"), rules) == P("model", None)
  assert sharding.logical_to_spec(("embed", "mlp"), rules) == P(None, None)
  assert sharding.logical_to_spec(("slots", None), sharding.FSDP_SLOT_RULES) == P(
      ("model", "data"), None)
  assert sharding.rule_axes("batch", rules) == ("data", "model")
  columns = sharding.TABLE_SPLITS["columns"] + rules
  assert sharding.logical_to_spec(("slots", "value_embed"), columns) == P(None, "model")
  assert sharding.column_axes(columns) == ("model",) and sharding.slot_axes(columns) == ()
  assert sharding.slot_axes(sharding.FSDP_SLOT_RULES) == ("model", "data")
  with pytest.raises(ValueError, match="'typo' has no rule"):
    sharding.logical_to_spec(("typo",), rules)
  with pytest.raises(ValueError, match="used twice"):
    sharding.logical_to_spec(("batch", "batch"), rules)


class TinyMemoryModel(nnx.Module):
  """A dense layer plus a big-ish annotated value table (the shapes the real model annotates)."""

  def __init__(self, n: int, v: int, *, rngs: nnx.Rngs):
    self.proj = nnx.Linear(v, v, rngs=rngs, kernel_init=nnx.with_metadata(
        nnx.initializers.lecun_normal(), logical_axes=("embed", "mlp")))
    self.norm = nnx.LayerNorm(v, rngs=rngs)
    self.values = nnx.Param(nnx.initializers.normal(v**-0.5)(rngs.params(), (n, v)),
                            logical_axes=("slots", "value_embed"))


def _values_label(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "values" if jax.tree_util.keystr(path).endswith("['values']") else "rest",
      params)


def _init_state(n, v):
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(
      {"rest": optax.adamw(1e-3), "values": optax.adam(1e-3)}, _values_label))

  def init():
    params = nnx.state(TinyMemoryModel(n, v, rngs=nnx.Rngs(0)), nnx.Param)
    return params, tx.init(params)

  return init


@pytest.mark.parametrize("data,model,rules,spec", [
    (1, 8, sharding.DEFAULT_RULES, P("model", None)),
    (4, 2, sharding.FSDP_SLOT_RULES, P(("model", "data"), None)),
])
def test_state_shardings_split_table_and_its_moments(data, model, rules, spec):
  n, v = 4096, 16
  mesh = sharding.make_mesh(data, model)
  init = _init_state(n, v)
  # What the trainer does: shardings from the abstract state, then init straight into them.
  shardings = sharding.state_shardings(jax.eval_shape(init), mesh, rules)
  with jax.set_mesh(mesh):
    params, opt_state = jax.jit(init, out_shardings=shardings)()

  # Every array of the table's shape -- the table and Adam's mu/nu of it -- is split by rows.
  leaves = jax.tree.leaves((params, opt_state))
  tables = [x for x in leaves if x.shape == (n, v)]
  assert len(tables) == 3
  for x in tables:
    assert x.sharding.spec == spec
    assert {s.data.shape for s in x.addressable_shards} == {(n // 8, v)}
  others = [x for x in leaves if x.shape != (n, v)]
  assert others and all(x.sharding.is_fully_replicated for x in others)
  # The shardings tree zips with the abstract state (how a trainer attaches them for restore).
  jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
               jax.eval_shape(init), shardings)

  # Same numbers as an unsharded init: sharding changes placement, not the model.
  want_params, _ = jax.jit(init)()
  np.testing.assert_array_equal(params["values"][...], want_params["values"][...])

  # No device ever materialises the whole table: the largest array in the compiled,
  # partitioned init program is one block. The plain jit (control) holds the full table.
  with jax.set_mesh(mesh):
    hlo = jax.jit(init, out_shardings=shardings).lower().compile().as_text()
  biggest = max(int(np.prod([int(d) for d in s.split(",") if d])) for s in SHAPE.findall(hlo))
  assert biggest == n // 8 * v
  plain = jax.jit(init).lower().compile().as_text()
  assert f"f32[{n},{v}]" in plain


def test_state_shardings_checks_divisibility():
  mesh = sharding.make_mesh(1, 8)
  abstract = jax.eval_shape(lambda: nnx.state(TinyMemoryModel(100, 4, rngs=nnx.Rngs(0))))
  with pytest.raises(ValueError, match=r"\['values'\] is not divisible by mesh axes \('model',\)"):
    sharding.state_shardings(abstract, mesh)
