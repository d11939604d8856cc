"""The Pallas lookup kernels, forward and backward, against the pure-JAX lookup
(`product_keys.weighted_lookup`, its gradients) and numpy sums of the picked rows: run in
Pallas' interpret mode on CPU, lowered for GPU and TPU without a device (jax.export), compiled
by XLA:TPU for a v5e (tests/xla_tpu.py), used by the memory layer and by train.py."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export
from jax.sharding import PartitionSpec as P

from pkm_jax import cpu_lookup, lookup_grad_kernels, lookup_kernels, product_keys, sharding
from pkm_jax.architecture import MemoryConfig
from pkm_jax.memory import ProductKeyMemory
from pkm_jax.placement import MemoryPlacement
from tests import test_trainer, xla_tpu


def picks(n, v, lead=(3, 7), heads=2, k=5, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  values = jnp.asarray(rng.normal(size=(n, v)), dtype)
  idx = jnp.asarray(rng.integers(0, n, size=(*lead, heads, k)), jnp.int32)
  w = jnp.asarray(rng.random(size=(*lead, heads, k)), jnp.float32)
  return values, idx, w


def numpy_lookup(values, idx, w):
  rows = np.asarray(values, np.float64)[np.asarray(idx)]  # [..., H, K, V]
  return np.einsum("...hk,...hkv->...v", np.asarray(w, np.float64), rows)


# (N, V): V = 48 -> Triton column blocks of 16; 384 -> 128; 768 -> 256 (three per row).
@pytest.mark.parametrize("n, v", [(50, 48), (300, 384), (40, 768)])
@pytest.mark.parametrize("kernel", ["triton", "tpu"])
def test_kernel_equals_numpy(kernel, n, v):
  values, idx, w = picks(n, v)  # 21 tokens: a partial block for both kernels
  fn = {"triton": lookup_kernels._triton_gather_sum, "tpu": lookup_kernels._tpu_gather_sum}[kernel]
  got = fn(values, idx.reshape(21, -1), w.reshape(21, -1), interpret=True)
  np.testing.assert_allclose(got, numpy_lookup(values, idx, w).reshape(21, v), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("kernel", ["triton", "tpu"])
def test_bf16_table_sums_in_float32(kernel):
  values, idx, w = picks(63, 128, dtype=jnp.bfloat16)  # odd: a zero row fills the last word
  fn = {"triton": lookup_kernels._triton_gather_sum, "tpu": lookup_kernels._tpu_gather_sum}[kernel]
  got = fn(values, idx.reshape(21, -1), w.reshape(21, -1), interpret=True)
  assert got.dtype == jnp.float32
  # The bf16 rows are exact in float64; only the float32 accumulation rounds.
  np.testing.assert_allclose(got, numpy_lookup(values.astype(jnp.float32), idx, w).reshape(21, -1),
                             rtol=1e-5, atol=1e-5)


def test_out_of_range_ids_add_nothing():
  values, idx, w = picks(30, 48)
  bad = idx.at[0, 0, 0, :2].set(jnp.asarray([30, -1]))  # padding ids, as chunks.to_chunks uses
  got = lookup_kernels.gather_sum(values, bad.reshape(21, -1), w.reshape(21, -1))
  keep = np.ones(w.shape, bool)
  keep[0, 0, 0, :2] = False
  want = numpy_lookup(values, idx, np.where(keep, w, 0)).reshape(21, -1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def tricky_picks(n, v, dtype, m=21, p=10, seed=0):
  """[M, P] picks with out-of-range ids (padding, rows held elsewhere), a row picked twice by
  one token and rows picked by several tokens. Ids are drawn from the first 3/5 of the rows,
  so that with N = 99 (no multiple of a row block; odd, so the TPU kernels' word view of a bf16
  table gets a zero row) the TPU kernel's third block of 32 rows has no picks at all and its
  last only row N - 1's; the second's picks span two chunks of 128 sorted picks, the first of
  which it shares with the first block."""
  rng = np.random.default_rng(seed)
  values = jnp.asarray(rng.normal(size=(n, v)), dtype)
  idx = rng.integers(0, n * 3 // 5, size=(m, p))
  idx[0, :3] = [n, -1, n + 7]
  idx[1, 1] = idx[1, 0]  # twice in one token
  idx[2:6, 4] = idx[1, 0]  # and in four more
  idx[6, :] = n - 1  # the last row, every pick of a token
  w = rng.random(size=(m, p))
  g = rng.normal(size=(m, v))
  return values, jnp.asarray(idx, jnp.int32), jnp.asarray(w, jnp.float32), jnp.asarray(
      g, jnp.float32)


def numpy_grads(values, idx, w, g):
  """Brute force: d values[r] = sum of w * g over the picks of row r; d w = <row, g>."""
  values, idx, w, g = (np.asarray(x, np.float64) for x in (values, idx, w, g))
  idx = idx.astype(int)
  valid = (idx >= 0) & (idx < values.shape[0])
  d_values = np.zeros_like(values)
  d_w = np.zeros_like(w)
  for m, p in zip(*np.nonzero(valid)):
    d_values[idx[m, p]] += w[m, p] * g[m]
    d_w[m, p] = values[idx[m, p]] @ g[m]
  return d_values, d_w


GRAD_KERNELS = {"triton": functools.partial(lookup_grad_kernels._triton_grads, interpret=True),
                "tpu": functools.partial(lookup_grad_kernels._tpu_grads, interpret=True)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kernel", ["triton", "tpu"])
def test_grad_kernels_equal_numpy_and_pure_jax(kernel, dtype):
  values, idx, w, g = tricky_picks(99, 48, dtype)
  d_values, d_w = lookup_grad_kernels._grads(values, idx, w, g, want_values=True,
                                             kernels=GRAD_KERNELS[kernel])
  assert d_values.dtype == dtype and d_values.shape == values.shape and d_w.dtype == w.dtype
  want_values, want_w = numpy_grads(values, idx, w, g)
  # Summed in float32, rounded once to the table's dtype (bf16 rows are exact in float64).
  rtol = 1e-5 if dtype == jnp.float32 else 2 ** -8
  np.testing.assert_allclose(d_values.astype(jnp.float32), want_values, rtol=rtol, atol=1e-5)
  np.testing.assert_allclose(d_w, want_w, rtol=1e-5, atol=1e-5)
  ref_values, ref_w = product_keys.weighted_lookup_grads(values, idx, w, g, want_values=True)
  # The pure-JAX backward rounds each pick's row gradient to a bf16 table's dtype before its
  # scatter-add: within a few bf16 ulps of the sum of the summands' magnitudes.
  magnitude = numpy_grads(values, idx, np.abs(w), np.abs(g))[0]  # sum of |w g| per row
  slack = 1e-5 * (1 + magnitude) if dtype == jnp.float32 else 2 ** -6 * magnitude + 1e-6
  gap = np.abs(np.asarray(d_values, np.float64) - np.asarray(ref_values, np.float64))
  assert np.all(gap <= slack), gap.max()
  np.testing.assert_allclose(d_w, ref_w, rtol=1e-5, atol=1e-5)
  none, d_w_only = lookup_grad_kernels._grads(values, idx, w, g, want_values=False,
                                              kernels=GRAD_KERNELS[kernel])
  assert none is None
  np.testing.assert_allclose(d_w_only, d_w, rtol=0, atol=0)


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (virtual) devices")
def test_grads_inside_shard_map():
  """A table split by rows over 4 devices: each device's gather_sum_grads on its block (ids of
  other blocks out of range) gives its rows of the one-device gradient, and the d w partials
  sum to the whole d w. check_vma=False as in sharded_memory: Pallas' interpret mode cannot type
  its loop carries under the varying-axes check (jax 0.10)."""
  values, idx, w, g = tricky_picks(128, 48, jnp.float32)
  mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))

  def local(values_nxV, idx, w, g):
    n = values_nxV.shape[0]
    local_idx = idx - jax.lax.axis_index("x") * n
    local_idx = jnp.where((idx >= 0) & (local_idx >= 0), local_idx, n)
    d_values, d_w = lookup_kernels.gather_sum_grads(values_nxV, local_idx, w, g)
    return d_values, jax.lax.psum(d_w, "x")

  grads = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("x"), P(), P(), P()),
                                out_specs=(P("x"), P()), check_vma=False))
  d_values, d_w = grads(jax.device_put(values, jax.NamedSharding(mesh, P("x"))), idx, w, g)
  want_values, want_w = numpy_grads(values, idx, w, g)
  np.testing.assert_allclose(d_values, want_values, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_w, want_w, rtol=1e-5, atol=1e-5)


def _loss(lookup, values, idx, w):
  return jnp.sum(jnp.sin(lookup(values, idx, w)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_and_gradients_equal_pure_jax(dtype):
  """jax.grad through the kernels' custom_vjp (forward and backward kernels) against jax.grad
  of product_keys.weighted_lookup, with padding ids and rows picked more than once."""
  values, idx, w, _ = tricky_picks(99, 48, dtype)
  idx, w = idx.reshape(21, 2, 5), w.reshape(21, 2, 5)
  grad = lambda lookup: jax.jit(jax.value_and_grad(  # noqa: E731
      lambda v, w: _loss(lookup, v, idx, w), argnums=(0, 1)))
  got_loss, (got_gv, got_gw) = grad(lookup_kernels.weighted_lookup)(values, w)
  want_loss, (want_gv, want_gw) = grad(product_keys.weighted_lookup)(values, w)
  assert got_gv.dtype == dtype and got_gw.dtype == w.dtype
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(got_gw, want_gw, rtol=1e-5, atol=1e-6)
  # bf16: the pure-JAX backward rounds every pick's row gradient (see the test above).
  tol = 1e-6 if dtype == jnp.float32 else 2 ** -6 * float(jnp.max(jnp.abs(want_gv)))
  np.testing.assert_allclose(got_gv.astype(jnp.float32), want_gv.astype(jnp.float32),
                             rtol=1e-5, atol=tol)


def test_stopped_table_gradient_is_never_built():
  """As in product_keys: with the table's gradient stopped (sparse value updates) the backward
  sorts no picks and runs no table-gradient kernel; with it, the kernel is there and no
  scatter-add at all."""
  values, idx, w = picks(4096, 48)
  frozen = jax.grad(lambda w: _loss(lookup_kernels.weighted_lookup,
                                    jax.lax.stop_gradient(values), idx, w))
  text = str(jax.make_jaxpr(frozen)(w))
  assert "pkm_lookup_weight_grads" in text
  assert "pkm_lookup_table_grads" not in text and "scatter" not in text
  assert not re.search(r"\bsort\[", text)  # the sort primitive, not gather's indices_are_sorted
  trained = jax.grad(lambda v: _loss(lookup_kernels.weighted_lookup, v, idx, w))
  text = str(jax.make_jaxpr(trained)(values))
  assert "pkm_lookup_table_grads" in text and "scatter" not in text
  assert re.search(r"\bsort\[", text)
  fn = jax.jit(frozen)
  want = jax.grad(lambda w: _loss(product_keys.weighted_lookup, values, idx, w))(w)
  np.testing.assert_allclose(fn(w), want, rtol=1e-5, atol=1e-6)  # sums over V in another order


KERNEL_NAMES = ("pkm_weighted_lookup", "pkm_lookup_weight_grads", "pkm_lookup_table_grads")


@pytest.mark.parametrize("platform, call", [("cuda", "__gpu$xla.gpu.triton"),
                                            ("tpu", "tpu_custom_call")])
@pytest.mark.parametrize("v, dtype, heads, k", [(768, jnp.bfloat16, 4, 32),  # BERT-base, bf16
                                                (1024, jnp.float32, 4, 32),  # BERT-large
                                                (48, jnp.float32, 2, 5)])  # P = 10, V = 3 x 16
def test_lowers_for_accelerators(platform, call, v, dtype, heads, k):
  """Each platform gets its kernels: the lookup and its two gradients lower (Triton IR, Mosaic)
  for a GPU and a TPU on this CPU-only machine, at the paper's table size. (XLA:TPU compiles
  them in test_compiles_for_tpu; a GPU compiles Triton only on the device.)"""
  values = jax.ShapeDtypeStruct((512 * 512, v), dtype)
  w = jax.ShapeDtypeStruct((8, 128, heads, k), jnp.float32)
  idx = jnp.zeros((8, 128, heads, k), jnp.int32)
  step = jax.jit(jax.value_and_grad(
      lambda v, w: _loss(lookup_kernels.weighted_lookup, v, idx, w), argnums=(0, 1)))
  exported = export.export(step, platforms=[platform], disabled_checks=[
      export.DisabledSafetyCheck.custom_call(call)])(values, w)
  text = exported.mlir_module()
  assert text.count(call) == 3 and all(name in text for name in KERNEL_NAMES)


TPU_COMPILE = """
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from pkm_jax import lookup_kernels

topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
one_chip = NamedSharding(Mesh(np.array(topo.devices[:1]), ("x",)), PartitionSpec())
picks = jax.ShapeDtypeStruct((2, 128, 4, 32), jnp.int32)  # 256 tokens, H = 4, K = 32
weights = jax.ShapeDtypeStruct((2, 128, 4, 32), jnp.float32)
loss = lambda v, i, w: jnp.sum(jnp.sin(lookup_kernels.weighted_lookup(v, i, w)))
step = jax.value_and_grad(loss, argnums=(0, 2))
out = {}
for dtype in ("float32", "bfloat16"):
  table = jax.ShapeDtypeStruct((512 * 512, 768), dtype)
  text = jax.jit(step, in_shardings=one_chip).lower(table, picks, weights).compile().as_text()
  out[dtype] = {"targets": re.findall(r'custom_call_target="([^"]+)"', text),
                "names": re.findall(r"pkm_[a-z_]+", text)}
print(json.dumps(out))
"""


@xla_tpu.requires_libtpu
def test_compiles_for_tpu():
  """XLA:TPU (libtpu, no TPU needed) compiles the lookup's forward and both gradient kernels
  for a v5e chip at the paper's table (512^2 x 768), for float32 and bfloat16 tables: the
  Mosaic kernels build (a bf16 table used to fail: a single bf16 row cannot be DMA'd to an
  unaligned VMEM row), and the step holds them and none of the project's CPU custom calls."""
  got = xla_tpu.run_json(TPU_COMPILE)
  for dtype in ("float32", "bfloat16"):
    targets, names = got[dtype]["targets"], set(got[dtype]["names"])
    assert targets.count("tpu_custom_call") == 3, (dtype, targets)
    assert set(KERNEL_NAMES) <= names, (dtype, names)
    assert not [t for t in targets if t.startswith("pkm_jax") or "triton" in t], targets


def test_memory_layer_with_pallas_placement(monkeypatch):
  cfg = MemoryConfig(n_keys=8, heads=2, k=4, k_dim=8, v_dim=16, query_norm="none")
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 9, 16)), jnp.float32)
  mask = jnp.ones((2, 9), bool)

  def out_and_grads(placement):
    layer = ProductKeyMemory(16, cfg, placement=placement, rngs=nnx.Rngs(0))
    loss = lambda m, x: jnp.sum(jnp.sin(m(x, mask)[0]))  # noqa: E731
    return nnx.value_and_grad(loss, argnums=(0, 1))(layer, x)

  with monkeypatch.context() as patch:  # the pure-JAX lookup, not cpu_lookup's custom calls
    patch.setattr(cpu_lookup, "usable", lambda values: False)
    want_loss, (want_g, want_gx) = out_and_grads(MemoryPlacement())
  got_loss, (got_g, got_gx) = out_and_grads(MemoryPlacement(lookup_kernel="pallas"))
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(got_gx, want_gx, rtol=1e-5, atol=1e-7)
  for g, h in zip(jax.tree.leaves(nnx.to_pure_dict(got_g)),
                  jax.tree.leaves(nnx.to_pure_dict(want_g))):
    np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-7)


def test_training_with_pallas_kernel(tmp_path):
  """mesh.lookup_kernel=pallas trains to the same held-out loss as the XLA lookup."""
  results = {}
  for kernel in ("xla", "pallas"):
    config = test_trainer.tiny_config(**{"train.steps": 4, "train.eval_every": 4,
                                         "train.checkpoint_every": 4,
                                         "mesh.lookup_kernel": kernel})
    results[kernel] = test_trainer.trainer.train_and_evaluate(config, str(tmp_path / kernel))
  assert results["pallas"]["step"] == 4
  np.testing.assert_allclose(results["pallas"]["mlm_loss"], results["xla"]["mlm_loss"], rtol=1e-5)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
@pytest.mark.parametrize("data, model, rules", [
    (2, 4, (("slots", "model"),)), (4, 2, (("slots", ("model", "data")),)),
    (2, 4, sharding.TABLE_SPLITS["columns"])])
def test_split_table_with_pallas_equals_one_device(data, model, rules):
  """A table split over devices by rows or columns: each block's sum and gradients are the
  kernels' (rows held elsewhere read as nothing, get nothing), and the result and gradients are
  the one-device XLA ones."""
  values, idx, w = picks(64, 48, lead=(8, 3))
  mesh = sharding.make_mesh(data, model)
  placement = MemoryPlacement.from_mesh(mesh, tuple(rules) + sharding.DEFAULT_RULES,
                                        lookup_kernel="pallas")
  assert placement.split
  grad = lambda lookup: jax.value_and_grad(  # noqa: E731
      lambda v, w: _loss(lookup, v, idx, w), argnums=(0, 1))
  want_loss, (want_gv, want_gw) = grad(product_keys.weighted_lookup)(values, w)
  with jax.set_mesh(mesh):
    got_loss, (got_gv, got_gw) = jax.jit(grad(placement.lookup))(values, w)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(got_gv, want_gv, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_gw, want_gw, rtol=1e-5, atol=1e-6)
