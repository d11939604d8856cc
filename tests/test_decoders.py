"""The causal LMs (GPT-2, Llama): KV-cache decoding, document masks, memory placement.

References are the models' own full forwards run another way (each document alone, the dense
model with the same weights); transformers' logits are compared in test_convert_causal.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pkm_jax.architecture import MemoryConfig, ModelConfig
from pkm_jax.models import registry, tables
from pkm_jax.models.gpt2 import GPT2LMHeadModel
from pkm_jax.models.llama import LlamaForCausalLM

V, D = 53, 16
MEM = MemoryConfig(n_keys=6, heads=2, k=3, k_dim=8, v_dim=D, query_norm="none")


def tiny(family: str, **kw) -> ModelConfig:
  base = dict(family=family, vocab_size=V, hidden_size=D, num_layers=2, num_heads=4,
              intermediate_size=24, max_position_embeddings=32, hidden_dropout=0.1,
              attention_dropout=0.1, layer_norm_eps=1e-5, memory=MEM)
  if family == "llama":
    base.update(num_kv_heads=2, tie_embeddings=False, rope_scaling=(
        ("rope_type", "llama3"), ("factor", 4.0), ("low_freq_factor", 1.0),
        ("high_freq_factor", 4.0), ("original_max_position_embeddings", 8)))
  base.update(kw)
  return ModelConfig(**base)


def build(cfg: ModelConfig, seed: int = 0) -> nnx.Module:
  model = registry.build_lm(cfg, rngs=nnx.Rngs(seed))
  # Random (not zero / one) norms and biases, so a wrongly wired one shows.
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [p + 0.2 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def ids(b: int, t: int, seed: int = 0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, t)), jnp.int32)


CASES = {
    "gpt2": tiny("gpt2"),
    "gpt2_resm": tiny("gpt2", memory_mode="residual", memory_layers=(1,)),
    "llama_gqa": tiny("llama"),
    "llama_window_pkm": tiny("llama", sliding_window=3, qkv_bias=True, memory_mode="replace",
                             memory_layers=(0,), rope_scaling=()),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
  cfg = CASES[request.param]
  return cfg, build(cfg)


def test_registry_builds_the_families():
  assert registry.lm_class(tiny("gpt2")) is GPT2LMHeadModel
  assert registry.lm_class(tiny("llama")) is LlamaForCausalLM


def test_kv_cache_decode_equals_the_full_forward(case):
  """Prefill 4 tokens, then 1 token at a time: every step's logits = the full forward's."""
  cfg, model = case
  b, t, prompt = 2, 9, 4
  x = ids(b, t)
  full, _ = model(x)
  cache = model.init_cache(b, 12)
  pos = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
  step = jax.jit(lambda m, x, p, c, i: m.decode(x, p, c, cache_index=i), static_argnums=())
  out, cache = model.decode(x[:, :prompt], pos[:, :prompt], cache, cache_index=0)
  got = [out]
  for i in range(prompt, t):
    out, cache = step(model, x[:, i:i + 1], pos[:, i:i + 1], cache, jnp.int32(i))
    got.append(out)
  np.testing.assert_allclose(np.concatenate(got, axis=1), full, rtol=1e-5, atol=1e-5)


def test_decode_skips_padded_prompt_slots(case):
  """A left-padded prompt (attention_mask 0) decodes as the unpadded one at the same positions."""
  cfg, model = case
  x = ids(1, 6, seed=3)
  pad = 2
  padded = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), x], axis=1)
  mask = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), jnp.ones((1, 6), jnp.int32)], axis=1)
  pos = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), jnp.arange(6)[None]], axis=1)
  want, _ = model(x)
  if cfg.sliding_window:  # the window counts slots: padding shifts it, so compare without
    model = build(dataclasses.replace(cfg, sliding_window=0))
    want, _ = model(x)
  got, _ = model.decode(padded, pos, model.init_cache(1, 8), cache_index=0,
                        attention_mask_BxT=mask)
  np.testing.assert_allclose(got[:, pad:], want, rtol=1e-5, atol=1e-5)


def test_segments_run_documents_separately(case):
  """Two packed documents (segment ids, per-document positions) = each document alone."""
  cfg, model = case
  a, b = ids(1, 5, seed=1), ids(1, 3, seed=2)
  packed = jnp.concatenate([a, b, jnp.zeros((1, 2), jnp.int32)], axis=1)
  seg = jnp.asarray([[1] * 5 + [2] * 3 + [0] * 2], jnp.int32)
  pos = jnp.asarray([list(range(5)) + list(range(3)) + [0, 0]], jnp.int32)
  got, _ = model(packed, seg > 0, positions_BxT=pos, segment_ids_BxT=seg)
  np.testing.assert_allclose(got[:, :5], model(a)[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[:, 5:8], model(b)[0], rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_real_tokens(case):
  cfg, model = case
  x = ids(2, 7, seed=4)
  mask = jnp.ones((2, 7), jnp.int32).at[1, 4:].set(0)
  got, _ = model(x, mask)
  np.testing.assert_allclose(got[1, :4], model(x[1:, :4])[0][0], rtol=1e-5, atol=1e-5)


def test_hidden_then_logits_is_the_forward(case):
  cfg, model = case
  x = ids(2, 5)
  h, _ = model.hidden(x)
  assert h.shape == (2, 5, D)
  logits = model.logits(h)
  assert logits.dtype == jnp.float32
  np.testing.assert_array_equal(logits, model(x)[0])
  assert (model.lm_head is None) == cfg.tie_embeddings


KINDS = {"pkm": {}, "memory_plus": dict(kind="memory_plus", gate="silu"),
         "peer": dict(kind="peer")}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", ["replace", "residual"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_memory_placed_and_trainable(family, mode, kind):
  """replace drops the MLP at the memory layer, residual keeps it; every kind trains (training
  mode, dropout on) with finite gradients reaching its tables; the row tables' paths exist."""
  shared = kind == "pkm" and mode == "residual"  # also cover share_values once per family
  mem = dataclasses.replace(MEM, query_norm="batchnorm", share_values=shared, **KINDS[kind])
  cfg = tiny(family, memory_mode=mode, memory_layers=(0,), memory=mem)
  model = registry.build_lm(cfg, rngs=nnx.Rngs(0))
  assert model.decoder.layers[0].memory is not None and model.decoder.layers[1].memory is None
  assert (model.decoder.layers[0].mlp is None) == (mode == "replace")
  assert model.decoder.layers[1].mlp is not None
  x, mask = ids(2, 6), jnp.ones((2, 6), jnp.int32).at[0, 4:].set(0)

  def loss(model):
    logits, aux = model(x, mask, rngs=nnx.Rngs(dropout=1, memory=2))
    assert set(aux) == {0}
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * mask)

  grads = nnx.grad(loss)(model)
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  params = nnx.state(model, nnx.Param)
  for path, _, _ in tables.row_tables(cfg).values():
    assert tables.state_at(params, path)[...].shape[0] == mem.n_slots
    assert np.any(np.asarray(tables.state_at(grads, path)[...]))
  assert np.asarray(tables.value_table(params, 0, cfg)[...]).shape == (mem.n_slots, D)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_value_probes_carry_the_table_gradient(family):
  """Sparse updates: with probes the table gets no gradient, the probe gets d loss / d out."""
  cfg = tiny(family, memory_mode="residual", memory_layers=(1,))
  model = build(cfg)
  x = ids(2, 5)
  probe = jnp.zeros((2, 5, D))

  def loss(model, probe):
    return jnp.sum(jnp.tanh(model(x, value_probes={1: probe})[0]))

  g_model, g_probe = nnx.grad(loss, argnums=(0, 1))(model, probe)
  path = tables.row_tables(cfg)["1"][0]
  assert not np.any(np.asarray(tables.state_at(g_model, path)[...]))
  assert np.any(np.asarray(g_probe))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_zero_value_table_is_the_dense_model(family):
  """ResM with memory.value_zero_init = the dense model with the same weights, exactly."""
  mem = dataclasses.replace(MEM, value_zero_init=True, query_norm="batchnorm")
  cfg = tiny(family, memory_mode="residual", memory_layers=(0, 1), memory=mem)
  resm = registry.build_lm(cfg, rngs=nnx.Rngs(0))
  dense = registry.build_lm(dataclasses.replace(cfg, memory_mode="none", memory_layers=()),
                            rngs=nnx.Rngs(5))
  flat = [(path, v) for path, v in nnx.to_flat_state(nnx.state(resm, nnx.Param))
          if "memory" not in [str(p) for p in path]]
  nnx.update(dense, nnx.from_flat_state(flat))
  x, mask = ids(2, 7), jnp.ones((2, 7), jnp.int32).at[1, 5:].set(0)
  np.testing.assert_array_equal(resm(x, mask)[0], dense(x, mask)[0])


def test_remat_gives_the_same_gradients():
  cfg = tiny("llama", memory_mode="residual", memory_layers=(1,))
  x = ids(2, 5)

  def grads(cfg):
    model = build(cfg)
    return nnx.grad(lambda m: jnp.sum(jnp.tanh(m(x)[0])))(model)

  want, got = grads(cfg), grads(dataclasses.replace(cfg, remat=True))
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_close_to_float32():
  cfg = tiny("llama", hidden_dropout=0.0, attention_dropout=0.0)
  x = ids(2, 6)
  want = build(cfg)(x)[0]
  got = build(dataclasses.replace(cfg, dtype="bfloat16"))(x)[0]
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=0.1 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_chunked_clm_loss_equals_whole_logits(family):
  """clm_loss over position chunks (a rematerialised scan, T padded to a multiple of the chunk)
  gives the whole-logits loss, accuracy, count and gradients."""
  from pkm_jax import steps
  cfg = tiny(family, memory_mode="residual", memory_layers=(1,), hidden_dropout=0.0,
             attention_dropout=0.0)
  model = build(cfg)
  rng = np.random.default_rng(0)
  b, t = 2, 10
  batch = {"input_ids": rng.integers(0, V, (b, t)), "attention_mask": np.ones((b, t)),
           "segment_ids": np.repeat([[1] * 6 + [2] * 4], b, 0),
           "positions": np.repeat([list(range(6)) + list(range(4))], b, 0),
           "targets": rng.integers(0, V, (b, t)),
           "target_weights": (rng.random((b, t)) < 0.7).astype(np.float32)}
  batch = {k: jnp.asarray(v, jnp.float32 if k == "target_weights" else jnp.int32)
           for k, v in batch.items()}
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, chunk_bytes):
    m = nnx.merge(graphdef, params, rest)
    total, sums, _ = steps.clm_loss(m, batch, None, None, logit_chunk_bytes=chunk_bytes)
    return total, sums

  (whole, whole_sums), whole_grads = jax.value_and_grad(loss, has_aux=True)(params, 1 << 40)
  chunk_bytes = b * V * 4 * 3  # 3 positions a chunk: 4 chunks, the last one padded
  (chunked, chunked_sums), chunked_grads = jax.jit(
      jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, chunk_bytes)
  np.testing.assert_allclose(chunked, whole, rtol=1e-5)
  for key in ("count", "accuracy"):
    assert float(chunked_sums[key]) == float(whole_sums[key])
  assert float(whole_sums["count"]) == float(batch["target_weights"].sum())
  for a, w in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(whole_grads)):
    np.testing.assert_allclose(a, w, rtol=2e-4, atol=1e-6)
