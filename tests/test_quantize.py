"""Quantised value tables (pkm_jax/quantize.py): the lookups with int8 / float8_e4m3fn rows and
per-row scales against numpy sums over the dequantised table (pure JAX, Pallas interpreted,
the CPU kernel), the model with quantised tables against the float model holding the same
dequantised tables, the CLI on tiny trained workdirs of every kind (PEER's two tables, shared
tables, a causal LM), and the commands that read its output."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pkm_jax import checkpoint as ckpt_lib
from jax.sharding import PartitionSpec as P

from pkm_jax import lookup_kernels, memory_kinds, product_keys, quantize, sharding, trainer
from pkm_jax.architecture import MemoryConfig
from pkm_jax.memory import ProductKeyMemory
from pkm_jax.models.tables import row_tables, state_at
from pkm_jax.placement import MemoryPlacement
from configs import default as default_config, gpt2_resm
from tests import xla_tpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"int8": "int8", "fp8": "float8_e4m3fn"}


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}  # one device
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def numpy_scale(table, value_dtype):
  """The per-row scales of a symmetric quantisation, computed here: max |row| / qmax."""
  qmax = {"int8": 127.0, "float8_e4m3fn": 448.0}[value_dtype]
  return np.abs(np.asarray(table, np.float64)).max(axis=1) / qmax


# ------------------------------------------------------------------------------ the lookups


PATHS = ("pure_jax", "pallas", "cpu_kernel")


def _layer(kind, value_dtype, path, monkeypatch, seed=0):
  if path == "pure_jax":
    monkeypatch.setenv("PKM_JAX_CPU_KERNELS", "0")
  cfg = MemoryConfig(n_keys=8, heads=2, k=4, k_dim=8, v_dim=24, query_norm="none", kind=kind,
                     value_dtype=value_dtype)
  placement = MemoryPlacement(lookup_kernel="pallas" if path == "pallas" else "xla")
  layer = ProductKeyMemory(16, cfg, placement=placement, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  floats = {}
  for name in memory_kinds.table_names(cfg):
    table = getattr(layer, name)
    dense = rng.normal(size=table.shape) * rng.uniform(0.01, 3.0, size=(table.shape[0], 1))
    dense[3] = 0.0  # an all-zero row: scale 0
    stored, scale = quantize.quantize_rows(dense, value_dtype)
    table.set_value(jnp.asarray(stored))
    getattr(layer, name + memory_kinds.SCALE_SUFFIX).set_value(jnp.asarray(scale))
    floats[name] = dense
  return layer, cfg, floats


def _forward(layer, x, mask):
  graphdef, state = nnx.split(layer)
  fn = jax.jit(lambda st, x, m: nnx.merge(graphdef, st)(x, m))
  return fn(state, x, mask), fn.lower(state, x, mask).as_text()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("value_dtype", DTYPES.values())
@pytest.mark.parametrize("kind", ["pkm", "peer"])
def test_lookup_equals_numpy_over_the_dequantised_table(kind, value_dtype, path, monkeypatch):
  """out = sum_i w_i (s_i q_i) (peer: w_i act(s_i (u_i . x))), computed by every lookup path
  from the stored rows, equals numpy's sum over the dequantised rows at the same picks."""
  layer, cfg, floats = _layer(kind, value_dtype, path, monkeypatch)
  pallas_calls = []
  pallas = lookup_kernels.weighted_lookup
  monkeypatch.setattr(lookup_kernels, "weighted_lookup",
                      lambda *a: pallas_calls.append(a[0].dtype) or pallas(*a))
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
  (out, aux), text = _forward(layer, x, jnp.ones((2, 5), jnp.int32))
  deq = {name: np.asarray(getattr(layer, name)[...].astype(jnp.float32), np.float64)
         * np.asarray(getattr(layer, name + memory_kinds.SCALE_SUFFIX)[...], np.float64)[:, None]
         for name in floats}
  # The stored rows are the float rows to within the dtype's rounding (an independent check of
  # quantize_rows): half a step of the scale for int8, 2^-4 relative (+ subnormals) for fp8.
  for name, dense in floats.items():
    scale = numpy_scale(dense, value_dtype)[:, None]
    tol = 0.5 * scale if value_dtype == "int8" else np.abs(dense) / 16 + scale * 2.0**-9
    assert np.all(np.abs(deq[name] - dense) <= tol + 1e-7)
    assert not deq[name][3].any()
  idx = np.asarray(aux.indices)
  w = np.asarray(aux.weights, np.float64)
  if kind == "peer":
    scores = np.einsum("bthkd,btd->bthk", deq["down"][idx], np.asarray(x, np.float64))
    w = w * np.maximum(scores, 0.0)
  want = np.einsum("bthk,bthkv->btv", w, deq["values"][idx])
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-5)
  # Which lookup ran: the CPU kernel's custom call, the Pallas kernel, or neither.
  kernel = f"pkm_jax_gather_sum_{'s8' if value_dtype == 'int8' else 'f8e4m3fn'}"
  assert (kernel in text) == (path == "cpu_kernel")
  assert bool(pallas_calls) == (path == "pallas")
  assert set(pallas_calls) <= {jnp.dtype(value_dtype)}  # the stored rows, not a float copy


def _f32_arrays_of_shape(jaxpr, shape) -> list:
  """Every float32 value of `shape` any equation (at any depth) of `jaxpr` makes."""
  found = []
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      aval = var.aval
      if getattr(aval, "shape", None) == shape and aval.dtype == jnp.float32:
        found.append(eqn.primitive.name)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += _f32_arrays_of_shape(sub.jaxpr, shape)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += _f32_arrays_of_shape(sub, shape)
  return found


@pytest.mark.parametrize("path", PATHS)
def test_no_dequantised_copy_of_the_table(path, monkeypatch):
  """The quantised forward (each lookup path, PEER's two tables) never makes a float32 array
  of a table's shape; a dequantise-then-lookup does (the check can fail)."""
  layer, cfg, _ = _layer("peer", "int8", path, monkeypatch)
  graphdef, state = nnx.split(layer)
  x, mask = jnp.ones((2, 5, 16), jnp.float32), jnp.ones((2, 5), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda st: nnx.merge(graphdef, st)(x, mask)[0])(state).jaxpr
  assert not _f32_arrays_of_shape(jaxpr, (cfg.n_slots, cfg.v_dim))
  assert not _f32_arrays_of_shape(jaxpr, (cfg.n_slots, 16))  # the down table
  q, s = layer.values[...], layer.values_scale[...]
  idx, w = jnp.zeros((2, 5, 2, 4), jnp.int32), jnp.ones((2, 5, 2, 4))
  dequantise = jax.make_jaxpr(lambda q, s: product_keys.weighted_lookup(
      q.astype(jnp.float32) * s[:, None], idx, w))(q, s).jaxpr
  assert _f32_arrays_of_shape(dequantise, (cfg.n_slots, cfg.v_dim))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
@pytest.mark.parametrize("split", ["rows", "columns"])
@pytest.mark.parametrize("kernel", ["xla", "pallas"])
def test_split_quantised_tables_equal_one_device(split, kernel, monkeypatch):
  """Tables split over 4 devices (rows: the scales split with them; columns: the scales
  replicated), tokens over all 8: the layer (PEER: both tables) equals its one-device run."""
  layer, cfg, _ = _layer("peer", "int8", "cpu_kernel", monkeypatch)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 3, 16)), jnp.float32)
  mask = jnp.ones((8, 3), jnp.int32)
  (want, _), _ = _forward(layer, x, mask)
  mesh = sharding.make_mesh(2, 4)
  rules = tuple(sharding.TABLE_SPLITS[split]) + sharding.DEFAULT_RULES
  placement = MemoryPlacement.from_mesh(mesh, rules, lookup_kernel=kernel)
  assert placement.split
  layer.placement = placement
  graphdef, state = nnx.split(layer)
  shardings = sharding.state_shardings(state, mesh, rules)
  assert shardings["values_scale"].get_value().spec == (P("model") if split == "rows" else P(None))
  with jax.set_mesh(mesh):
    state = jax.device_put(state, shardings)
    got, _ = jax.jit(lambda st, x, m: nnx.merge(graphdef, st)(x, m))(state, x, mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the CLI on trained runs


TINY = {
    "model.hidden_size": 128, "model.num_layers": 2, "model.num_heads": 2,
    "model.intermediate_size": 128, "model.max_position_embeddings": 32,
    "memory.layers": (1,), "memory.n_keys": 8, "memory.heads": 2, "memory.k": 4,
    "memory.k_dim": 16,
    "data.vocab_size": 300, "data.max_len": 32, "data.batch_size": 8,
    "data.generated.num_entities": 40, "data.generated.num_docs": 200,
    "optim.warmup_steps": 1, "train.steps": 2, "train.log_every": 2, "train.eval_every": 2,
    "train.checkpoint_every": 2, "train.eval_batches": 2, "train.memory_stats_every": 2,
}
KINDS = {
    "pkm": {},
    "memory_plus": {"memory.kind": "memory_plus", "memory.gate": "silu"},
    "peer_shared": {"memory.kind": "peer", "memory.share_values": True,
                    "memory.layers": (0, 1)},
    "gpt2": {"memory.layers": (0, 1)},
}


def _config(name):
  config = (gpt2_resm if name == "gpt2" else default_config).get_config()
  for key, value in {**TINY, **KINDS[name]}.items():
    *groups, last = key.split(".")
    node = config
    for part in groups:
      node = node[part]
    node[last] = value
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{kind: a trained 2-step workdir}, made on first use."""
  made = {}

  def get(name):
    if name not in made:
      workdir = str(tmp_path_factory.mktemp(name) / "w")
      trainer.train_and_evaluate(_config(name), workdir)
      made[name] = workdir
    return made[name]
  return get


def _quantize(workdir, dtype, tmp_path):
  out = str(tmp_path / f"q_{dtype}")
  proc = run("-m", "pkm_jax.quantize", f"--model={workdir}", f"--out={out}", f"--dtype={dtype}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


def _logits(model, ids):
  return model(ids, jnp.ones_like(ids))[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", KINDS)
def test_cli_round_trip(runs, name, dtype, tmp_path):
  """OUT holds DIR's model with every row table stored quantised (scales beside): every other
  parameter and BatchNorm statistic unchanged, and its logits equal those of DIR's float model
  holding the dequantised tables (the scales folded into the picks = a dequantised table)."""
  workdir = runs(name)
  out = _quantize(workdir, dtype, tmp_path)
  src, _, src_step = ckpt_lib.restore_model(workdir)
  got, _, step = ckpt_lib.restore_model(out)
  assert step == src_step and got.cfg.memory.value_dtype == DTYPES[dtype]
  src_params = nnx.to_pure_dict(nnx.state(src, nnx.Param))
  got_params = nnx.to_pure_dict(nnx.state(got, nnx.Param))
  tables = row_tables(src.cfg)
  assert len(tables) == {"peer_shared": 2}.get(name, len(src.cfg.memory_layers))
  deq_params = jax.tree.map(np.asarray, src_params)
  for path, _, _ in tables.values():
    stored = np.asarray(state_at(got_params, path))
    scale = np.asarray(state_at(got_params, path[:-1] + (path[-1] + "_scale",)))
    assert stored.dtype == jnp.dtype(DTYPES[dtype]) and scale.dtype == np.float32
    np.testing.assert_allclose(scale, numpy_scale(state_at(src_params, path), DTYPES[dtype]),
                               rtol=1e-6)
    parent = deq_params
    for p in path[:-1]:
      parent = parent[p]
    parent[path[-1]] = stored.astype(np.float32) * scale[:, None]
  # Every other parameter as it was.
  flat_src = dict(jax.tree_util.tree_leaves_with_path(src_params))
  flat_got = dict(jax.tree_util.tree_leaves_with_path(got_params))
  table_keys = {jax.tree_util.keystr(tuple(jax.tree_util.DictKey(p) for p in path))
                for path, _, _ in tables.values()}
  for key, value in flat_src.items():
    if jax.tree_util.keystr(key) not in table_keys:
      np.testing.assert_array_equal(np.asarray(flat_got[key]), np.asarray(value))
  assert len(flat_got) == len(flat_src) + len(tables)
  state = nnx.state(src, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, deq_params))
  nnx.update(src, state)
  ids = jnp.asarray(np.random.default_rng(0).integers(5, 200, size=(2, 12)), jnp.int32)
  np.testing.assert_allclose(np.asarray(_logits(got, ids)), np.asarray(_logits(src, ids)),
                             rtol=1e-4, atol=1e-4)


def test_int8_tables_are_at_most_026x_of_float32(runs, tmp_path):
  """From the saved checkpoint: an int8 table and its scales take <= 0.26x the float32 bytes
  (V = 128: 1/4 + 1/V)."""
  workdir = runs("pkm")
  out = _quantize(workdir, "int8", tmp_path)
  src, _, _ = ckpt_lib.restore_model(workdir)
  got, _, _ = ckpt_lib.restore_model(out)
  src_p, got_p = nnx.state(src, nnx.Param), nnx.state(got, nnx.Param)
  for path, _, _ in row_tables(src.cfg).values():
    before = state_at(src_p, path)[...].nbytes
    after = (state_at(got_p, path)[...].nbytes
             + state_at(got_p, path[:-1] + (path[-1] + "_scale",))[...].nbytes)
    assert state_at(src_p, path)[...].dtype == jnp.float32
    assert after <= 0.26 * before, (after, before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_and_fill_mask_read_the_output(runs, dtype, tmp_path):
  """eval.py --workdir OUT and fill_mask --model OUT run; held-out perplexity within 1% of
  DIR's (a 2-step model: the tables' rounding barely moves it)."""
  import json
  workdir = runs("pkm")
  out = _quantize(workdir, dtype, tmp_path)
  results = {}
  for folder in (workdir, out):
    proc = run("eval.py", f"--workdir={folder}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results[folder] = json.loads(proc.stdout.strip().splitlines()[-1])
  assert results[out]["mlm_perplexity"] == pytest.approx(results[workdir]["mlm_perplexity"],
                                                          rel=0.01)
  proc = run("-m", "pkm_jax.fill_mask", f"--model={out}", "--top_k=3", "the [MASK] of it")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert len([json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]) == 3


def test_generate_reads_a_quantised_causal_workdir(runs, tmp_path):
  out = _quantize(runs("gpt2"), "int8", tmp_path)
  proc = run("-m", "pkm_jax.generate", f"--model={out}", "--max_new_tokens=4", "--json",
             "the city")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip()


# ------------------------------------------------------------------ accelerators, no device


@pytest.mark.parametrize("platform, call", [("cuda", "__gpu$xla.gpu.triton"),
                                            ("tpu", "tpu_custom_call")])
@pytest.mark.parametrize("value_dtype", DTYPES.values())
def test_quantised_lookup_lowers_for_accelerators(platform, call, value_dtype):
  """The Pallas lookup and its weights' gradient lower for a GPU (Triton) and a TPU (Mosaic)
  with an 8-bit table of the paper's size, read as stored."""
  from jax import export  # pylint: disable=g-import-not-at-top
  values = jax.ShapeDtypeStruct((512 * 512, 768), jnp.dtype(value_dtype))
  w = jax.ShapeDtypeStruct((8, 128, 4, 32), jnp.float32)
  idx = jnp.zeros((8, 128, 4, 32), jnp.int32)
  step = jax.jit(jax.value_and_grad(
      lambda v, w: jnp.sum(jnp.sin(lookup_kernels.weighted_lookup(v, idx, w))), argnums=1))
  text = export.export(step, platforms=[platform], disabled_checks=[
      export.DisabledSafetyCheck.custom_call(call)])(values, w).mlir_module()
  assert text.count(call) == 2
  assert "pkm_weighted_lookup" in text and "pkm_lookup_weight_grads" in text
  assert f"tensor<262144x768x{'i8' if value_dtype == 'int8' else 'f8E4M3FN'}>" in text


TPU_COMPILE_8BIT = """
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from pkm_jax import lookup_kernels

topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
one_chip = NamedSharding(Mesh(np.array(topo.devices[:1]), ("x",)), PartitionSpec())
picks = jax.ShapeDtypeStruct((2, 128, 4, 32), jnp.int32)
weights = jax.ShapeDtypeStruct((2, 128, 4, 32), jnp.float32)
loss = lambda v, i, w: jnp.sum(jnp.sin(lookup_kernels.weighted_lookup(v, i, w)))
step = jax.value_and_grad(loss, argnums=2)
out = {}
for dtype in ("int8", "float8_e4m3fn"):
  table = jax.ShapeDtypeStruct((512 * 512, 768), dtype)
  text = jax.jit(step, in_shardings=one_chip).lower(table, picks, weights).compile().as_text()
  out[dtype] = re.findall(r'custom_call_target="([^"]+)"', text)
print(json.dumps(out))
"""


@xla_tpu.requires_libtpu
def test_quantised_lookup_compiles_for_tpu():
  """XLA:TPU compiles the Mosaic lookup and weights' gradient for a v5e with int8 and fp8
  tables of the paper's size (bytes unpacked from 32-bit words, `lookup_tiles`)."""
  got = xla_tpu.run_json(TPU_COMPILE_8BIT)
  for dtype in DTYPES.values():
    assert got[dtype].count("tpu_custom_call") == 2, (dtype, got[dtype])
    assert not [t for t in got[dtype] if t.startswith("pkm_jax")], got[dtype]


def test_a_converted_checkpoint_quantises_like_its_workdir(runs, tmp_path):
  """DIR may be a converted checkpoint: OUT then holds the same quantised model as from the
  workdir it was saved from (same rows, same logits), at step 0."""
  from pkm_jax import converted  # pylint: disable=g-import-not-at-top
  workdir = runs("gpt2")
  model, tokenizer, _ = ckpt_lib.restore_model(workdir)
  conv = converted.save_pretrained(str(tmp_path / "conv"), model, tokenizer)
  from_conv = _quantize(conv, "fp8", tmp_path / "c")
  from_workdir = _quantize(workdir, "fp8", tmp_path / "w")
  a, _, step = ckpt_lib.restore_model(from_conv)
  b, _, _ = ckpt_lib.restore_model(from_workdir)
  assert step == 0 and a.cfg == b.cfg
  ids = jnp.asarray(np.random.default_rng(0).integers(5, 200, size=(2, 12)), jnp.int32)
  np.testing.assert_array_equal(np.asarray(_logits(a, ids)), np.asarray(_logits(b, ids)))
