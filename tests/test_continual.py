"""Continued training (pkm_jax.continual): memory / sparse_memory write exactly what they may,
TF-IDF selection against a brute-force numpy computation of Lin et al.'s formula, a mesh run
against the one-device run, and LoRA against its merged model.

References: the pretrained workdir's own parameters (bit-identical where nothing may change),
numpy loops over picks and batches for the selection, the 1x1-mesh run for the sharded one.
"""

import json
import math
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx, traverse_util  # noqa: E402

from configs import sparse_memory as sparse_memory_config  # noqa: E402
from pkm_jax import checkpoint as ckpt_lib  # noqa: E402
from pkm_jax import trainer  # noqa: E402
from pkm_jax.config import ConfigError  # noqa: E402
from pkm_jax.continual import lora, methods, slot_selection  # noqa: E402
from pkm_jax.models.tables import is_value_table  # noqa: E402
from test_trainer import tiny_config  # noqa: E402

STEPS, TOP_T = 3, 6
ONE_DEVICE = {"mesh.data": 1, "mesh.model": 1}


def set_keys(config, overrides):
  for key, value in overrides.items():
    *groups, last = key.split(".")
    node = config
    for g in groups:
      node = node[g]
    node[last] = value
  return config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A tiny memory model pretrained on the generated world, and new text for it."""
  root = tmp_path_factory.mktemp("continual")
  pre = str(root / "pre")
  # The memory below the top layer: every token's memory output reaches a masked token's
  # prediction through attention, so every row read gets a non-zero gradient (at the top layer
  # only masked tokens' rows would: a written row with a zero gradient does not move).
  trainer.train_and_evaluate(tiny_config(**ONE_DEVICE, **{
      "memory.layers": (0,), "train.steps": 4, "train.eval_every": 4, "train.checkpoint_every": 4,
      "train.memory_stats_every": 0}), pre)
  rng = np.random.default_rng(0)
  words = ["river", "castle", "north", "born", "city", "king", "lute", "smith", "year", "west"]
  docs = [" ".join(rng.choice(words, 10)) + f" zorblat{i % 5} quux." for i in range(24)]
  new = root / "new.txt"
  new.write_text("\n\n".join(docs) + "\n")
  return {"root": root, "pre": pre, "new": str(new)}


def finetune_config(world, **overrides):
  config = sparse_memory_config.get_config()
  return set_keys(config, {
      "init.pretrained": world["pre"], "data.source": "files", "data.files": world["new"],
      "data.batch_size": 8, "data.max_len": 32, "data.eval_fraction": 0.2,
      "finetune.top_t": TOP_T, "finetune.background_batches": 3,
      "train.steps": STEPS, "train.log_every": STEPS, "train.eval_every": STEPS,
      "train.checkpoint_every": STEPS, "train.eval_batches": 1,
      "train.memory_stats_every": 0, **ONE_DEVICE, **overrides})


@pytest.fixture(scope="module")
def runs(world):
  """Memoised fine-tuning runs: run(name, **overrides) -> workdir."""
  cache = {}

  def run(name, **overrides):
    if name not in cache:
      workdir = str(world["root"] / name)
      trainer.train_and_evaluate(finetune_config(world, **overrides), workdir)
      cache[name] = workdir
    return cache[name]

  return run


def flat_state(workdir):
  """{path: array} of every parameter and BatchNorm statistic of a workdir's model."""
  model, _, _ = ckpt_lib.restore_model(workdir)
  out = {}
  for kind in (nnx.Param, nnx.BatchStat):
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, kind)))
    out.update({(kind.__name__, *k): np.asarray(v) for k, v in flat.items()})
  return out


def changed_rows(before, after):
  return np.flatnonzero(np.any(before != after, axis=1))


@pytest.mark.parametrize("method", ["sparse_memory", "memory"])
def test_only_the_rows_it_may_write_change(world, runs, method):
  workdir = runs(method, **{"finetune.method": method})
  before, after = flat_state(world["pre"]), flat_state(workdir)
  assert before.keys() == after.keys()
  tables = [k for k in before if k[0] == "Param" and is_value_table(k[1:])]
  assert tables
  for key in before:
    if key not in tables:  # every other parameter and every query BatchNorm statistic
      np.testing.assert_array_equal(after[key], before[key], err_msg=str(key))
  assert any(k[0] == "BatchStat" for k in before)  # the statistics were compared too
  for key in tables:
    rows = changed_rows(before[key], after[key])
    assert rows.size > 0, key
    if method == "sparse_memory":
      with open(os.path.join(workdir, "selected_slots.json")) as f:
        report = json.load(f)["tables"]
      (entry,) = report.values()
      # The rows that changed are exactly the ones the run says it wrote: no unselected row
      # moved (bit for bit), and each step wrote at most top_t of them.
      assert rows.tolist() == entry["written_slots"]
      assert sum(entry["write_steps"]) <= STEPS * TOP_T
      assert max(entry["write_steps"]) <= STEPS


def brute_force_selection(picks, df, n_background, t, n_slots):
  """Lin et al.'s TF-IDF top-t, with Python loops: picks (ids >= n_slots are padding)."""
  c = np.zeros(n_slots)
  for p in picks.reshape(-1):
    if p < n_slots:
      c[p] += 1
  total = c.sum()
  score = np.array([c[i] / total * math.log((n_background + 1) / (df[i] + 1))
                    for i in range(n_slots)])
  order = sorted((i for i in range(n_slots) if c[i] > 0), key=lambda i: (-score[i], i))
  return set(order[:t])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tfidf_selection_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  n_slots, t, n_background = 64, 10, 7
  # Skewed picks (some slots far more often), padding ids mixed in.
  picks = rng.zipf(1.6, size=(4, 6, 2, 3)) % (n_slots + 8)
  picks = np.where(picks >= n_slots, n_slots, picks).astype(np.int32)
  df = rng.integers(0, n_background + 1, size=n_slots).astype(np.float32)
  want = brute_force_selection(picks, df, n_background, t, n_slots)
  select = slot_selection.make_row_selection(t, "batch", n_slots)
  state = slot_selection.init_selection(n_slots, "batch")
  state = {**state, "df": jnp.asarray(df), "n_background": jnp.float32(n_background)}
  kept, new_state = jax.jit(select)(jnp.asarray(picks), state)
  kept = np.asarray(kept)
  # Every selected slot's picks survive, every other pick becomes padding.
  np.testing.assert_array_equal(kept, np.where(np.isin(picks, list(want)), picks, n_slots))
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(new_state["written"])),
                                sorted(want))


def test_background_counts_count_batches_per_slot():
  n_slots = 16
  usage = [{0: (np.bincount([1, 1, 3], minlength=n_slots), 0, 0),
            2: (np.bincount([3, 5], minlength=n_slots), 0, 0)},
           {0: (np.bincount([5], minlength=n_slots), 0, 0),
            2: (np.zeros(n_slots), 0, 0)}]
  steps = iter(usage)
  out = slot_selection.background_counts(
      lambda batch: (None, next(steps)), (), [{}, {}], lambda b: b,
      {"shared": (None, "values", (0, 2)), "0": (None, "values", (0,))})
  assert out["shared"]["n_batches"] == 2
  np.testing.assert_array_equal(out["shared"]["df"][[1, 3, 5]], [1, 1, 2])
  np.testing.assert_array_equal(out["shared"]["counts"][[1, 3, 5]], [2, 2, 2])
  np.testing.assert_array_equal(out["0"]["df"][[1, 3, 5]], [1, 1, 1])


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (virtual) devices")
@pytest.mark.parametrize("method, split", [("sparse_memory", "rows"),
                                           ("sparse_memory", "columns"), ("lora", "rows")])
def test_a_mesh_run_equals_the_one_device_run(world, runs, method, split):
  extra = {"optim.lr": 1e-2} if method == "lora" else {}
  one = runs(method, **{"finetune.method": method, **extra})
  mesh = runs(f"{method}_mesh_{split}", **{
      "finetune.method": method, "mesh.data": 2, "mesh.model": 2, "mesh.table_split": split,
      **extra})
  want, got = flat_state(one), flat_state(mesh)
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=str(key))
  if method == "sparse_memory":  # the same slots chosen: selection is per global slot
    reports = []
    for workdir in (one, mesh):
      with open(os.path.join(workdir, "selected_slots.json")) as f:
        reports.append(json.load(f)["tables"])
    assert reports[0] == reports[1]


def test_background_needs_a_sample_it_can_read(world, tmp_path):
  config = finetune_config(world, **{"init.pretrained": str(tmp_path)})
  with pytest.raises(ConfigError, match="finetune.background_files"):
    methods.background_data_config(config)
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  config = finetune_config(world, **{"finetune.background_files": str(empty)})
  with pytest.raises(ValueError, match="background sample"):
    methods.background_batches(config, ckpt_lib.load_tokenizer(
        os.path.join(world["pre"], "tokenizer.json")), causal=False)


def test_lora_trains_adapters_only_and_merges_to_the_same_function(world, runs):
  workdir = runs("lora", **{"finetune.method": "lora", "optim.lr": 1e-2})
  before = flat_state(world["pre"])
  unmerged, _, _ = ckpt_lib.restore_model(workdir, merge_lora=False)
  adapters = nnx.state(unmerged, nnx.LoRAParam)
  # A and B on q, k, v, o and the FFN's two projections of both layers.
  assert len(jax.tree.leaves(adapters)) == 2 * 6 * unmerged.cfg.num_layers
  assert any(np.any(np.asarray(b) != 0) for b in jax.tree.leaves(adapters))  # they trained
  # The base -- every parameter but the adapters, and the BatchNorm statistics -- is unchanged.
  for kind in (nnx.Param, nnx.BatchStat):
    state = nnx.state(unmerged, nnx.All(kind, nnx.Not(nnx.LoRAParam)))
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    assert {(kind.__name__, *k) for k in flat} == {k for k in before if k[0] == kind.__name__}
    for k, v in flat.items():
      np.testing.assert_array_equal(np.asarray(v), before[(kind.__name__, *k)], err_msg=str(k))
  merged, _, _ = ckpt_lib.restore_model(workdir)
  assert all(type(m) is nnx.Linear for _, m in lora.projections(merged))
  assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(5, merged.cfg.vocab_size, (2, 16)), jnp.int32)
  mask = jnp.ones((2, 16), jnp.int32)
  want, _ = unmerged(ids, mask, jnp.zeros_like(ids))
  got, _ = merged(ids, mask, jnp.zeros_like(ids))
  pretrained, _, _ = ckpt_lib.restore_model(world["pre"])
  base, _ = pretrained(ids, mask, jnp.zeros_like(ids))
  assert float(jnp.max(jnp.abs(want - base))) > 1e-4  # the adapters changed the function
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_on_the_decoders_merges_to_the_same_logits(family):
  from test_decoders import MEM, build, ids, tiny
  cfg = tiny(family, memory_mode="residual", memory_layers=(1,), memory=MEM)
  model = build(cfg)
  x = ids(2, 8)
  base, _ = model(x, jnp.ones_like(x))
  lora.add_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(3))
  names = {tuple(str(p) for p in path[-2:]) for path, _ in lora.projections(model)}
  want_names = {("attention", n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
  assert want_names <= names and len(names) >= 6  # and the MLP's projections
  assert not any("memory" in str(p) for path, _ in lora.projections(model) for p in path)
  # B starts at zero: the model is the base model until it trains.
  got, _ = model(x, jnp.ones_like(x))
  np.testing.assert_allclose(got, base, rtol=1e-6, atol=1e-6)
  for _, m in lora.projections(model):
    m.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(1), m.lora_b.shape)
  adapted, _ = model(x, jnp.ones_like(x))
  assert float(jnp.max(jnp.abs(adapted - base))) > 1e-3
  lora.merge_lora(model)
  merged, _ = model(x, jnp.ones_like(x))
  np.testing.assert_allclose(merged, adapted, rtol=1e-4, atol=1e-4)


def test_a_shared_table_of_a_causal_lm_writes_only_its_top_t(tmp_path):
  """GPT-2 with one value table shared by two memory layers (one table: picks pooled), one
  step of the program train.py runs: the rows that change are exactly the brute-force top-t
  of the step's own picks; every other parameter is unchanged."""
  config = set_keys(sparse_memory_config.get_config(), {
      "model.family": "gpt2", "model.hidden_size": 32, "model.num_layers": 2,
      "model.num_heads": 2, "model.intermediate_size": 64, "model.max_position_embeddings": 32,
      "memory.mode": "residual", "memory.layers": (0, 1), "memory.n_keys": 8,
      "memory.heads": 2, "memory.k": 4, "memory.k_dim": 16, "memory.share_values": True,
      "data.vocab_size": 300, "data.batch_size": 4, "data.max_len": 16,
      "finetune.top_t": 5, "optim.lr": 1e-2, **ONE_DEVICE})
  program = trainer.build_train_program(config, 300)
  n_slots, (key,) = 64, program.sparse_tables
  assert key == "memory_values"
  with jax.set_mesh(program.mesh):
    state = program.init_state()
  df = np.random.default_rng(0).integers(0, 5, n_slots).astype(np.float32)
  state.selection[key] = {**state.selection[key], "df": jax.device_put(df, program.replicated),
                          "n_background": jax.device_put(np.float32(4), program.replicated)}
  before = jax.tree.map(np.asarray, (state.params, state.frozen))
  rng = np.random.default_rng(1)
  b, t = 4, 16
  x = rng.integers(3, 300, (b, t)).astype(np.int32)
  batch = program.to_device({
      "input_ids": x, "attention_mask": np.ones((b, t), np.int32),
      "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
      "segment_ids": np.ones((b, t), np.int32), "targets": np.roll(x, -1, axis=1),
      "target_weights": np.ones((b, t), np.float32)})
  with jax.set_mesh(program.mesh):
    state, _, aux = program.train_step(state, batch)
  picks = np.concatenate([np.asarray(aux[layer].indices) for layer in (0, 1)], axis=1)
  want = brute_force_selection(picks, df, 4, 5, n_slots)
  table = ("decoder", "memory_values")
  old = np.asarray(before[0][table[0]][table[1]].get_value())
  new = np.asarray(state.params[table[0]][table[1]].get_value())
  assert set(changed_rows(old, new).tolist()) == want
  for a, c in zip(jax.tree.leaves(before[1]), jax.tree.leaves(state.frozen)):
    np.testing.assert_array_equal(np.asarray(c), a)
