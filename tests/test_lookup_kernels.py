"""The Pallas lookup kernels against the pure-JAX lookup (`product_keys.weighted_lookup`) and a
numpy sum of the picked rows: run in Pallas' interpret mode on CPU, lowered for GPU and TPU
without a device (jax.export), used by the memory layer and by train.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

from pkm_jax import cpu_lookup, lookup_kernels, product_keys, sharding
from pkm_jax.architecture import MemoryConfig
from pkm_jax.memory import ProductKeyMemory
from pkm_jax.placement import MemoryPlacement
from tests import test_trainer


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
  values, idx, w = picks(64, 128, dtype=jnp.bfloat16)
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


def _loss(lookup, values, idx, w):
  return jnp.sum(jnp.sin(lookup(values, idx, w)))


def test_values_and_gradients_equal_pure_jax():
  values, idx, w = picks(200, 48)
  grad = lambda lookup: jax.jit(jax.value_and_grad(  # noqa: E731
      lambda v, w: _loss(lookup, v, idx, w), argnums=(0, 1)))
  got_loss, (got_gv, got_gw) = grad(lookup_kernels.weighted_lookup)(values, w)
  want_loss, (want_gv, want_gw) = grad(product_keys.weighted_lookup)(values, w)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(got_gv, want_gv, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got_gw, want_gw, rtol=1e-6, atol=1e-7)


def test_stopped_table_gradient_is_never_built():
  """As in product_keys: with the table's gradient stopped (sparse value updates) the backward
  traces no scatter at all; with it, the scatter-add into an [N, V] buffer is there."""
  values, idx, w = picks(4096, 48)
  frozen = jax.grad(lambda w: _loss(lookup_kernels.weighted_lookup,
                                    jax.lax.stop_gradient(values), idx, w))
  assert "scatter" not in str(jax.make_jaxpr(frozen)(w))
  trained = jax.grad(lambda v: _loss(lookup_kernels.weighted_lookup, v, idx, w))
  assert "scatter-add" in str(jax.make_jaxpr(trained)(values))
  fn = jax.jit(frozen)
  want = jax.grad(lambda w: _loss(product_keys.weighted_lookup, values, idx, w))(w)
  np.testing.assert_allclose(fn(w), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("platform, call", [("cuda", "__gpu$xla.gpu.triton"),
                                            ("tpu", "tpu_custom_call")])
@pytest.mark.parametrize("v, dtype, heads, k", [(768, jnp.bfloat16, 4, 32),  # BERT-base, bf16
                                                (1024, jnp.float32, 4, 32),  # BERT-large
                                                (48, jnp.float32, 2, 5)])  # P = 10, V = 3 x 16
def test_lowers_for_accelerators(platform, call, v, dtype, heads, k):
  """Each platform gets its kernel: the lookup and its gradient lower (Triton IR, Mosaic) for a
  GPU and a TPU on this CPU-only machine, at the paper's table size. (Compiling them for the
  device happens only on the device.)"""
  values = jax.ShapeDtypeStruct((512 * 512, v), dtype)
  w = jax.ShapeDtypeStruct((8, 128, heads, k), jnp.float32)
  idx = jnp.zeros((8, 128, heads, k), jnp.int32)
  step = jax.jit(jax.value_and_grad(
      lambda v, w: _loss(lookup_kernels.weighted_lookup, v, idx, w), argnums=(0, 1)))
  exported = export.export(step, platforms=[platform], disabled_checks=[
      export.DisabledSafetyCheck.custom_call(call)])(values, w)
  text = exported.mlir_module()
  assert text.count(call) == 1 and "pkm_weighted_lookup" in text


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
@pytest.mark.parametrize("data, model, rules", [(2, 4, ()), (4, 2, (("slots", ("model", "data")),))])
def test_split_table_with_pallas_equals_one_device(data, model, rules):
  """A table split over devices: each block's forward sum is the kernel (rows held elsewhere
  read as nothing), and the result and gradients are the one-device XLA ones."""
  values, idx, w = picks(64, 48, lead=(8, 3))
  mesh = sharding.make_mesh(data, model)
  placement = MemoryPlacement.from_mesh(mesh, tuple(rules) + sharding.DEFAULT_RULES,
                                        lookup_kernel="pallas")
  assert placement.slot_axes
  grad = lambda lookup: jax.value_and_grad(  # noqa: E731
      lambda v, w: _loss(lookup, v, idx, w), argnums=(0, 1))
  want_loss, (want_gv, want_gw) = grad(product_keys.weighted_lookup)(values, w)
  with jax.set_mesh(mesh):
    got_loss, (got_gv, got_gw) = jax.jit(grad(placement.lookup))(values, w)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(got_gv, want_gv, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_gw, want_gw, rtol=1e-5, atol=1e-6)
