"""Sharded training (8 virtual CPU devices) against the same run on one device.

References: `train_and_evaluate` on a 1x1 mesh (the same config, data and seed) for the final
parameters and held-out loss of runs on 4x2, 1x8, 8x1 and FSDP-style meshes; the run without
gradient accumulation for one with it; and, for the communication claim, the compiled HLO of the
trainer's own jitted train step (`trainer.build_train_program`), whose collectives must never
carry a value table, with a replicated-table data-parallel step as the positive control.
"""

import math
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from pkm_jax import sharding, trainer  # noqa: E402
from pkm_jax.product_keys import product_key_topk  # noqa: E402
from pkm_jax.steps import MLM_BATCH_KEYS  # noqa: E402
from test_sharded_memory import COLLECTIVE, SHAPE, collective_sizes  # noqa: E402
from test_trainer import final_params, tiny_config  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")

FSDP = (("slots", ("model", "data")),)
ROWS = {"mesh.table_split": "rows"}
COLUMNS = {"mesh.table_split": "columns"}
COLUMNS_FSDP = {"mesh.table_split": "columns", "mesh.fsdp": True}
# Few steps, one eval and one checkpoint at the end, no usage stats: the runs are compile-bound.
SHORT = {"train.steps": 5, "train.log_every": 5, "train.eval_every": 5,
         "train.checkpoint_every": 5, "train.memory_stats_every": 0, "train.eval_batches": 2}
# float32 sums over devices / micro-batches associate differently: ~1e-7 measured. atol covers
# biases that BatchNorm / softmax make gradient-free (|p| ~1e-8, Adam turns rounding into steps).
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Memoised runs: run(**overrides) -> (eval loss, final params, the program's placement)."""
  cache = {}

  def run(**overrides):
    key = tuple(sorted((k, repr(v)) for k, v in overrides.items()))
    if key not in cache:
      workdir = str(tmp_path_factory.mktemp("run"))
      config = tiny_config(**SHORT, **overrides)
      result = trainer.train_and_evaluate(config, workdir)
      placement = trainer.build_train_program(config, VOCAB).placement
      cache[key] = (result["mlm_loss"], final_params(workdir), placement)
    return cache[key]

  return run


def assert_params_close(got, want):
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
  assert len(flat_got) == len(flat_want)
  for path, value in flat_got:
    np.testing.assert_allclose(value, flat_want[path], rtol=RTOL, atol=ATOL,
                               err_msg=jax.tree_util.keystr(path))


# PKM with dense Adam keeps BatchNorm queries and dropout (statistics and dropout masks must not
# depend on the mesh). ResM with sparse updates is deterministic with LayerNorm queries, so its
# one-device run is also the reference for gradient accumulation (BatchNorm statistics of a
# micro-batch differ from the full batch's by design).
GROUPS = {
    "pkm_adam": {"memory.mode": "replace", "optim.values_optimizer": "adam"},
    "resm_sparse": {"memory.mode": "residual", "optim.values_optimizer": "sparse_adam",
                    "memory.query_norm": "layernorm", "model.hidden_dropout": 0.0,
                    "model.attention_dropout": 0.0, "memory.input_dropout": 0.0,
                    "memory.query_dropout": 0.0, "memory.value_dropout": 0.0},
}


# The meshes -- model=4 x data=2, 8x1 and 1x8 -- for PKM and ResM, plus FSDP-style rows.
@pytest.mark.parametrize("group, data, model, rules", [
    ("pkm_adam", 2, 4, ROWS),
    ("pkm_adam", 8, 1, ()),  # pure data parallel: the table not split, dense lookup
    ("pkm_adam", 1, 8, ROWS),  # rows over every device
    ("resm_sparse", 2, 4, ROWS),  # row blocks copied over 'data'
    ("resm_sparse", 8, 1, ()),
    ("resm_sparse", 1, 8, ROWS),
    ("resm_sparse", 4, 2, FSDP),  # rows over all 8 devices
    ("pkm_adam", 2, 4, COLUMNS),  # columns over 'model', copies over 'data'
    ("resm_sparse", 2, 4, COLUMNS_FSDP),  # columns, and every dense weight over all devices
])
def test_sharded_training_matches_one_device(runs, group, data, model, rules):
  want_loss, want_params, _ = runs(**GROUPS[group], **{"mesh.data": 1, "mesh.model": 1})
  layout = rules if isinstance(rules, dict) else {"mesh.rules": rules}
  got_loss, got_params, placement = runs(**GROUPS[group], **{
      "mesh.data": data, "mesh.model": model, **layout})
  # The sharded run really split the table (else it is the one-device program again), and the
  # batch over every device.
  if layout.get("mesh.table_split") == "columns":  # with fsdp over every device: no copies
    want = ("model", "data") if layout.get("mesh.fsdp") else ("model",)
    assert placement.col_axes == want and not placement.slot_axes
  else:
    slot_ways = model * (data if "mesh.rules" in layout and rules else 1)
    assert bool(placement.slot_axes) == (slot_ways > 1) and not placement.col_axes
  assert math.prod({"data": data, "model": model}[a] for a in placement.token_axes) == 8
  assert got_loss == pytest.approx(want_loss, rel=1e-5)
  assert_params_close(got_params, want_params)


def test_grad_accumulation_matches_full_batch(runs):
  # Two micro-batches of 4, themselves split over both axes (2x2 mesh), against one batch of 8
  # on one device: the summed gradients, the sparse row updates and the loss must all agree.
  want_loss, want_params, _ = runs(**GROUPS["resm_sparse"], **{"mesh.data": 1, "mesh.model": 1})
  got_loss, got_params, _ = runs(**GROUPS["resm_sparse"], **{
      "train.grad_accum_steps": 2, "mesh.data": 2, "mesh.model": 2})
  assert got_loss == pytest.approx(want_loss, rel=1e-5)
  assert_params_close(got_params, want_params)


# ---------------------------------------------------------------------------------------------
# Communication of the real train step
# ---------------------------------------------------------------------------------------------

VOCAB = 400


def compiled_train_step_hlo(**overrides) -> tuple[str, int]:
  """The optimised HLO of the trainer's jitted train step, and the value table's size."""
  # One layer (the memory layer) keeps the compiles short; the step is the trainer's all the same.
  config = tiny_config(**{"model.num_layers": 1, "memory.layers": (0,), "memory.n_keys": 64,
                          "data.max_len": 16, **overrides})
  program = trainer.build_train_program(config, VOCAB)
  b, t = config.data.batch_size, config.data.max_len
  batch = {k: jax.ShapeDtypeStruct((b, t), jnp.float32 if k == "mlm_weights" else jnp.int32)
           for k in MLM_BATCH_KEYS}
  with jax.set_mesh(program.mesh):
    hlo = program.train_step.lower(program.abstract_state, batch).compile().as_text()
  return hlo, program.model_cfg.memory.n_slots * program.model_cfg.memory.v_dim


# What must never cross devices is a table block (or its gradient): with data-parallel copies of
# each block, dense Adam all-reduces that block's gradient over 'data', and sparse updates would
# too if row gradients were coalesced anywhere but inside the block. So every collective must be
# smaller than one block. Sizes are chosen so that the largest legitimate ones -- the 400 x 32
# word embedding's gradient, the [tokens, 32] lookup partials and output gradients -- are
# smaller than a block: 64^2 rows / 8 blocks for dense Adam; 72^2 = 5184 rows in 2 or 8 blocks for
# sparse updates, with 16 x 32 tokens x 2 heads x 8 picks = 8192 picks per step, more than the
# rows, so every row may be touched and coalesced row gradients would be table-sized.
SPARSE_SIZES = {"memory.n_keys": 72, "memory.k": 8, "data.batch_size": 16, "data.max_len": 32}


@pytest.mark.parametrize("data, model, rules, values_optimizer, sizes", [
    (1, 8, (), "adam", {"memory.n_keys": 64, "data.max_len": 16}),
    (4, 2, (), "sparse_adam", SPARSE_SIZES),  # column blocks copied over 'data'
    (4, 2, ROWS, "sparse_adam", SPARSE_SIZES),  # row blocks copied over 'data'
    (4, 2, FSDP, "sparse_adam", SPARSE_SIZES),  # rows over all devices
])
def test_train_step_moves_no_table_block(data, model, rules, values_optimizer, sizes):
  layout = rules if isinstance(rules, dict) else {"mesh.rules": rules}
  hlo, table = compiled_train_step_hlo(**{"mesh.data": data, "mesh.model": model,
                                          **layout, **sizes,
                                          "optim.values_optimizer": values_optimizer})
  block = table // (model * (data if "mesh.rules" in layout and rules else 1))
  sizes = collective_sizes(hlo)
  assert sizes, "expected the lookup's partial sums to cross devices"
  assert max(sizes) < block, (max(sizes), block)


def collective_shapes(hlo_text: str) -> list[tuple[int, ...]]:
  return [tuple(int(d) for d in dims.split(",") if d)
          for line in hlo_text.splitlines() if COLLECTIVE.search(line)
          for dims in SHAPE.findall(line.split("metadata=")[0])]


def score_collectives(hlo_text: str, n_keys: int, keys_shape: tuple[int, ...]) -> list:
  """Collectives on arrays with an n_keys-sized axis, other than the sub-keys (their gradient)."""
  return [s for s in collective_shapes(hlo_text) if n_keys in s and s != keys_shape]


@pytest.mark.parametrize("data, model, values_optimizer", [
    (8, 1, "adam"), (4, 2, "sparse_adam")])
def test_train_step_searches_each_devices_tokens(data, model, values_optimizer):
  """The product-key search runs on each device's own tokens: no [.., H, n_keys] scores cross
  devices, only the sub-keys' gradient is all-reduced."""
  n_keys = 48  # no other dimension of the model or the batch is 48
  hlo, _ = compiled_train_step_hlo(**{"mesh.data": data, "mesh.model": model,
                                      "memory.n_keys": n_keys,
                                      "optim.values_optimizer": values_optimizer})
  cfg = tiny_config().memory
  keys_shape = (cfg.heads, 2, n_keys, cfg.k_dim // 2)
  assert keys_shape in collective_shapes(hlo)  # the check sees the sub-keys' gradient
  assert not score_collectives(hlo, n_keys, keys_shape)


def test_partitioner_alone_all_gathers_the_scores():
  """Positive control for the check above: the search left to XLA's partitioner (batch split
  over 'data', no shard_map) all-gathers the scores before top_k."""
  n_keys, heads, half = 48, 2, 8
  mesh = sharding.make_mesh(8, 1)
  query = jax.ShapeDtypeStruct((16, 4, heads, 2 * half), jnp.float32,
                               sharding=NamedSharding(mesh, P("data")))
  keys = jax.ShapeDtypeStruct((heads, 2, n_keys, half), jnp.float32)
  with jax.set_mesh(mesh):
    hlo = jax.jit(lambda q, k: product_key_topk(q, k, 4)).lower(query, keys).compile().as_text()
  assert score_collectives(hlo, n_keys, (heads, 2, n_keys, half))


def test_replicated_table_step_all_reduces_the_table():
  """Positive control for the check above: data-parallel training with the table replicated
  (dense Adam) all-reduces its [N, V] gradient, and the parser sees it."""
  hlo, table = compiled_train_step_hlo(**{"mesh.data": 4, "mesh.model": 2,
                                          "mesh.rules": (("slots", None),)})
  assert max(collective_sizes(hlo)) >= table


@pytest.mark.parametrize("data, model, rules, values_optimizer", [
    (1, 8, (), "adam"),  # table + Adam moments, rows over 'model'
    (4, 2, FSDP, "sparse_adam"),  # table + row-wise moments, rows over every device
])
def test_trainer_init_never_holds_a_whole_table(data, model, rules, values_optimizer):
  """The trainer's jitted init creates each array in its shards: the largest array anywhere in
  the compiled, partitioned init program is one table block (the plain jit holds the table)."""
  config = tiny_config(**{"model.num_layers": 1, "memory.layers": (0,), "memory.n_keys": 64,
                          "mesh.data": data, "mesh.model": model, "mesh.rules": rules,
                          "optim.values_optimizer": values_optimizer})
  program = trainer.build_train_program(config, VOCAB)
  mem = program.model_cfg.memory
  with jax.set_mesh(program.mesh):
    hlo = program.init_state.lower().compile().as_text()
  biggest = max(int(np.prod([int(d) for d in s.split(",") if d])) for s in SHAPE.findall(hlo))
  assert biggest == mem.n_slots * mem.v_dim // 8
  plain = jax.jit(program.init_state.__wrapped__).lower().compile().as_text()
  assert f"f32[{mem.n_slots},{mem.v_dim}]" in plain


def test_fsdp_splits_dense_weights_and_their_moments():
  """mesh.fsdp=True: every annotated dense weight of FSDP_MIN_SIZE or more elements, and its
  Adam moments, is split over all 8 devices, and the value table's columns too; small ones and
  unannotated ones (LayerNorm) stay replicated. Without it, all of them are replicated but the
  table, whose columns are split over 'model' (copies over 'data')."""
  def specs(**overrides):
    config = tiny_config(**{"mesh.data": 2, "mesh.model": 4, **overrides})
    program = trainer.build_train_program(config, VOCAB)
    flat = jax.tree_util.tree_flatten_with_path(
        program.state_sharding, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
    shapes = dict(jax.tree_util.tree_flatten_with_path(program.abstract_state)[0])
    return {jax.tree_util.keystr(p): (s.spec, shapes[p].shape) for p, s in flat if p in shapes}

  on, off = specs(**{"mesh.fsdp": True}), specs()
  split = {p: spec for p, (spec, shape) in on.items()
           if any(set(sharding.axes_tuple(e)) == {"data", "model"} for e in spec)}
  words = [p for p in split if "word_embeddings" in p]
  assert any(p.startswith(".params") for p in words) and any(p.startswith(".opt_state")
                                                             for p in words)
  for path, (spec, shape) in on.items():
    big = np.prod(shape) >= sharding.FSDP_MIN_SIZE
    if "values" in path and len(shape) == 2:
      assert (spec, off[path][0]) == (P(None, ("model", "data")), P(None, "model")), path
    elif path not in split:
      assert not big or "'scale'" in path or "'bias'" in path or "count" in path, path
    assert all(not sharding.axes_tuple(e) for e in off[path][0]) or "values" in path, path
