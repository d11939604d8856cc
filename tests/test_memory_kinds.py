"""The memory family (pkm_jax.memory_kinds): each kind's layer against numpy from the rows it
picked, the sparse probes against the dense table gradients, sharded == one device on 8 virtual
CPU devices, a shared table's gradient == the sum of its layers', +Init exactness per kind."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx, traverse_util  # noqa: E402

from pkm_jax import architecture  # noqa: E402
from pkm_jax import sharding  # noqa: E402
from pkm_jax.architecture import MemoryConfig, ModelConfig  # noqa: E402
from pkm_jax.models.bert import BertForMaskedLM
from pkm_jax.models.tables import is_value_table  # noqa: E402
from pkm_jax.memory import ProductKeyMemory  # noqa: E402
from pkm_jax.placement import MemoryPlacement  # noqa: E402
from pkm_jax.plus_init import init_from_pretrained  # noqa: E402

D = 16
KINDS = {
    "pkm": dict(kind="pkm"),
    "memory_plus_silu": dict(kind="memory_plus", gate="silu"),
    "memory_plus_sigmoid": dict(kind="memory_plus", gate="sigmoid"),
    "peer_relu": dict(kind="peer", peer_activation="relu"),
    "peer_gelu": dict(kind="peer", peer_activation="gelu"),
}
ACT = {"silu": lambda z: z / (1 + np.exp(-z)), "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
       "relu": lambda z: np.maximum(z, 0),
       "gelu": lambda z: 0.5 * z * (1 + np.vectorize(__import__("math").erf)(z / np.sqrt(2)))}


def mem_cfg(**kw):
  return MemoryConfig(**{**dict(n_keys=8, heads=2, k=3, k_dim=8, v_dim=D,
                                query_norm="none"), **kw})


def inputs(b=8, t=3, seed=1):
  x = jnp.asarray(np.random.default_rng(seed).normal(size=(b, t, D)), jnp.float32)
  return x, jnp.ones((b, t), jnp.int32)


def numpy_reference(mem, cfg, x, aux):
  """out from the picked rows: the kind's formula in float64 numpy."""
  x = np.asarray(x, np.float64)
  idx, w = np.asarray(aux.indices), np.asarray(aux.weights, np.float64)
  values = np.asarray(mem.values[...], np.float64)
  if cfg.kind == "peer":
    u = np.asarray(mem.down[...], np.float64)
    w = w * ACT[cfg.peer_activation](np.einsum("bthkd,btd->bthk", u[idx], x))
  out = np.einsum("bthk,bthkv->btv", w, values[idx])
  if cfg.kind == "memory_plus":
    g, o = mem.gate.gate, mem.gate.output
    gate = ACT[cfg.gate](x @ np.asarray(g.kernel[...]) + np.asarray(g.bias[...]))
    out = (out * gate) @ np.asarray(o.kernel[...]) + np.asarray(o.bias[...])
  return out


@pytest.mark.parametrize("name", KINDS)
def test_kind_matches_numpy_from_picked_rows(name):
  cfg = mem_cfg(**KINDS[name])
  mem = ProductKeyMemory(D, cfg, rngs=nnx.Rngs(0))
  x, mask = inputs()
  out, aux = mem(x, mask)
  np.testing.assert_allclose(np.asarray(out), numpy_reference(mem, cfg, x, aux),
                             rtol=1e-5, atol=1e-6)


def test_key_norm_searches_with_unit_sub_keys():
  cfg = mem_cfg(key_norm=True)
  mem = ProductKeyMemory(D, cfg, rngs=nnx.Rngs(0))
  x, mask = inputs()
  _, aux = mem(x, mask)
  q = (np.asarray(x) @ np.asarray(mem.query_proj.kernel[...])
       + np.asarray(mem.query_proj.bias[...])).reshape(8, 3, 2, 2, 4)
  keys = np.asarray(mem.keys[...])
  keys = keys / np.linalg.norm(keys, axis=-1, keepdims=True)  # [H, 2, n, 4]
  s1 = np.einsum("bthd,hnd->bthn", q[..., 0, :], keys[:, 0])
  s2 = np.einsum("bthd,hnd->bthn", q[..., 1, :], keys[:, 1])
  full = (s1[..., :, None] + s2[..., None, :]).reshape(8, 3, 2, 64)
  np.testing.assert_array_equal(np.sort(np.asarray(aux.indices), -1),
                                np.sort(np.argsort(-full, -1)[..., :3], -1))


def _loss(out):
  cot = np.random.default_rng(7).normal(size=out.shape).astype(np.float32)
  return jnp.sum(jnp.tanh(out) * cot)


@pytest.mark.parametrize("name", ["memory_plus_silu", "peer_relu"])
def test_probes_rebuild_the_dense_table_gradients(name):
  """What sparse updates scatter (steps.py) equals the dense gradient of every row table."""
  cfg = mem_cfg(**KINDS[name])
  mem = ProductKeyMemory(D, cfg, rngs=nnx.Rngs(0))
  x, mask = inputs()
  b, t = mask.shape
  peer = cfg.kind == "peer"
  probe = ((jnp.zeros((b, t, D)), jnp.zeros((b, t, cfg.heads, cfg.k))) if peer
           else jnp.zeros((b, t, D)))

  def loss_fn(mem, probe):
    out, aux = mem(x, mask, value_probe=probe)
    return _loss(out), aux

  (grads, g_probe), aux = nnx.grad(loss_fn, argnums=(0, 1), has_aux=True)(mem, probe)
  dense = nnx.grad(lambda m: _loss(m(x, mask)[0]))(mem)
  idx = np.asarray(aux.indices).reshape(-1)
  g_values = np.asarray(g_probe[0] if peer else g_probe)
  w = np.asarray(aux.weights if aux.row_weights is None else aux.row_weights)
  rebuilt = np.zeros((cfg.n_slots, D))
  np.add.at(rebuilt, idx, (w[..., None] * g_values[:, :, None, None, :]).reshape(-1, D))
  assert not np.any(np.asarray(grads["values"][...]))
  np.testing.assert_allclose(np.asarray(dense["values"][...]), rebuilt, rtol=1e-5, atol=1e-6)
  if peer:
    assert not np.any(np.asarray(grads["down"][...]))
    rebuilt = np.zeros((cfg.n_slots, D))
    g_s = np.asarray(g_probe[1])
    np.add.at(rebuilt, idx, (g_s[..., None] * np.asarray(x)[:, :, None, None, :]).reshape(-1, D))
    np.testing.assert_allclose(np.asarray(dense["down"][...]), rebuilt, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
@pytest.mark.parametrize("name", ["pkm", "memory_plus_silu", "peer_relu"])
@pytest.mark.parametrize("data, model, rules", [
    (2, 4, ()), (4, 2, (("slots", ("model", "data")),)), (2, 4, sharding.TABLE_SPLITS["columns"])])
def test_sharded_equals_one_device(name, data, model, rules):
  cfg = mem_cfg(**KINDS[name])
  one = ProductKeyMemory(D, cfg, rngs=nnx.Rngs(0))
  mesh = sharding.make_mesh(data, model)
  placement = MemoryPlacement.from_mesh(mesh, tuple(rules) + sharding.DEFAULT_RULES)
  split = ProductKeyMemory(D, cfg, placement=placement, rngs=nnx.Rngs(0))
  x, mask = inputs()

  def out_and_grads(mem):
    def loss(m, x):
      return _loss(m(x, mask)[0])
    return nnx.value_and_grad(loss, argnums=(0, 1))(mem, x)

  want_loss, (want_g, want_gx) = out_and_grads(one)
  with jax.set_mesh(mesh):
    got_loss, (got_g, got_gx) = nnx.jit(out_and_grads)(split)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(got_gx, want_gx, rtol=1e-4, atol=1e-6)
  for (path, g), (_, h) in zip(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(got_g))[0],
                               jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(want_g))[0]):
    np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def bert_cfg(mode="residual", **mem):
  return ModelConfig(vocab_size=40, hidden_size=D, num_layers=2, num_heads=2,
                     intermediate_size=32, max_position_embeddings=8, hidden_dropout=0.0,
                     attention_dropout=0.0, memory_mode=mode, memory_layers=(0, 1),
                     memory=mem_cfg(**mem))


def pure(model):
  return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", ["memory_plus_silu", "peer_relu"])
def test_shared_table_is_stored_once_and_its_gradient_is_the_sum(name):
  shared = BertForMaskedLM(bert_cfg(share_values=True, **KINDS[name]), rngs=nnx.Rngs(0))
  own = BertForMaskedLM(bert_cfg(**KINDS[name]), rngs=nnx.Rngs(1))
  tables = [p for p in pure(shared) if is_value_table(p)]
  n_tables = 2 if name.startswith("peer") else 1
  assert set(tables) == {("bert", f"memory_{t}") for t in ("values", "down")[:n_tables]}
  # The same function with one copy of the table per layer: copy every shared parameter over.
  src, dst = pure(shared), pure(own)
  for path in dst:
    if path[-2:-1] == ("memory",) and path[-1] in ("values", "down"):
      dst[path] = src[("bert", f"memory_{path[-1]}")]
    else:
      dst[path] = src[path]
  state = nnx.state(own, nnx.Param)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(dst))
  nnx.update(own, state)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 40, size=(2, 8)))
  loss_and_grad = nnx.jit(nnx.value_and_grad(lambda m: _loss(m(ids, jnp.ones_like(ids))[0])))
  (l_shared, g_shared), (l_own, g_own) = loss_and_grad(shared), loss_and_grad(own)
  np.testing.assert_allclose(l_shared, l_own, rtol=1e-6)
  g_shared, g_own = pure(g_shared), pure(g_own)
  for table in ("values", "down")[:n_tables]:
    per_layer = sum(g_own[("bert", "layers", i, "memory", table)] for i in (0, 1))
    np.testing.assert_allclose(g_shared[("bert", f"memory_{table}")], per_layer,
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name, share", [("pkm", False), ("memory_plus_silu", True),
                                         ("peer_relu", False), ("peer_relu", True)])
def test_plus_init_resm_starts_as_the_dense_model(name, share):
  """+Init +ResM with zero value init adds exactly 0 for every kind; PKM placement drops the
  memory layers' FFN and loads everything else."""
  dense = BertForMaskedLM(bert_cfg(mode="none"), rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(dense, nnx.Param))
  resm = BertForMaskedLM(bert_cfg(value_zero_init=True, share_values=share, **KINDS[name]),
                         rngs=nnx.Rngs(1))
  report = init_from_pretrained(resm, params, dense.cfg)
  assert not report.dropped
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 40, size=(2, 8)))
  logits = nnx.jit(lambda m: m(ids, jnp.ones_like(ids))[0])
  np.testing.assert_allclose(logits(resm), logits(dense), rtol=1e-5, atol=1e-6)
  pkm = BertForMaskedLM(bert_cfg(mode="replace", share_values=share, **KINDS[name]),
                        rngs=nnx.Rngs(1))
  report = init_from_pretrained(pkm, params, dense.cfg)
  assert {n.split(".")[3] for n in report.dropped} == {"ffn"}
  assert all(".memory" in n or "memory_" in n for n in report.new)


@pytest.mark.parametrize("name", ["memory_plus_silu", "peer_relu"])
def test_bfloat16_compute_stays_close_to_float32(name):
  cfg = mem_cfg(**KINDS[name])
  f32 = ProductKeyMemory(D, cfg, rngs=nnx.Rngs(0))
  bf16 = ProductKeyMemory(D, cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))  # same float32 params
  x, mask = inputs()
  want, want_aux = f32(x, mask)
  got, got_aux = bf16(x.astype(jnp.bfloat16), mask)
  assert got.dtype == jnp.bfloat16
  # The query path runs in float32 whatever the compute dtype: the same rows are picked.
  assert np.mean(np.asarray(got_aux.indices) == np.asarray(want_aux.indices)) > 0.95
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2)


@pytest.mark.parametrize("name", ["memory_plus_silu", "peer_relu"])
def test_bfloat16_row_tables_are_read_as_stored(name):
  """memory.value_dtype=bfloat16 stores every row table of the kind in bf16 (PEER's down table
  too, and the shared tables on the model); the layer's float32 output is the kind's formula
  on those stored rows."""
  cfg = mem_cfg(value_dtype="bfloat16", **KINDS[name])
  mem = ProductKeyMemory(D, cfg, rngs=nnx.Rngs(0))
  tables = ("values", "down") if cfg.kind == "peer" else ("values",)
  assert all(getattr(mem, t)[...].dtype == jnp.bfloat16 for t in tables)
  x, mask = inputs()
  out, aux = mem(x, mask)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), numpy_reference(mem, cfg, x, aux),
                             rtol=1e-4, atol=1e-5)
  bert = BertForMaskedLM(bert_cfg(share_values=True, value_dtype="bfloat16", **KINDS[name]),
                         rngs=nnx.Rngs(0))
  assert all(getattr(bert.bert, "memory_" + t)[...].dtype == jnp.bfloat16 for t in tables)


def test_model_configs_saved_before_the_kinds_load_as_pkm():
  saved = architecture.to_dict(bert_cfg())
  for key in ("kind", "gate", "share_values", "key_norm", "peer_activation"):
    del saved["memory"][key]
  cfg = architecture.from_dict(saved)
  assert cfg == bert_cfg() and cfg.memory.kind == "pkm" and cfg.memory.gate == "none"
