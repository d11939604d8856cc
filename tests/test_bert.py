"""pkm_jax.models.bert: memory wiring (PKM / ResM) against a numpy encoder layer, padding, tied decoder,
dropout modes, bf16, and the paper's parameter counts (abstract shapes only)."""

import dataclasses
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from pkm_jax.architecture import MemoryConfig, ModelConfig
from pkm_jax.models.bert import BertForMaskedLM, BertModel, EncoderLayer
from pkm_jax.config import model_config

TINY = ModelConfig(
    vocab_size=50, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=32,
    max_position_embeddings=16, memory_mode="residual", memory_layers=(0, 2),
    memory=MemoryConfig(n_keys=8, heads=2, k=4, k_dim=8, v_dim=16))


def tiny(**kw) -> ModelConfig:
  return dataclasses.replace(TINY, **kw)


def perturb_params(module: nnx.Module, seed: int = 0, scale: float = 0.3) -> None:
  """Adds noise to every param (LN scales, biases, ...) so that no init value hides a wiring bug."""
  params = nnx.state(module, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
  nnx.update(module, jax.tree.unflatten(treedef, leaves))


def np_(p) -> np.ndarray:
  return np.asarray(p[...], np.float64)


def np_layer_norm(x, norm, eps):
  x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
  return x * np_(norm.scale) + np_(norm.bias)


def np_gelu(x):
  return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def np_dense(x, lin):
  return x @ np_(lin.kernel) + np_(lin.bias)


def np_attention(x, mask, attn, num_heads):
  b, t, d = x.shape
  dh = d // num_heads
  q, k, v = (np_dense(x, lin).reshape(b, t, num_heads, dh)
             for lin in (attn.query, attn.key, attn.value))
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(dh)
  logits = np.where(mask[:, None, None, :] > 0, logits, -1e30)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ctx = np.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, d)
  return np_dense(ctx, attn.output)


# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["none", "replace", "residual"])
def test_layer_wiring(mode):
  cfg = tiny(memory_mode=mode, memory_layers=() if mode == "none" else (0, 2))
  model = BertModel(cfg, rngs=nnx.Rngs(0))
  for i, layer in enumerate(model.layers):
    is_mem = mode != "none" and i in (0, 2)
    assert (layer.memory is not None) == is_mem, (mode, i)
    assert (layer.ffn is not None) == (not (is_mem and mode == "replace")), (mode, i)


@pytest.mark.parametrize("mode, index", [("residual", 2), ("replace", 2), ("replace", 1)])
def test_encoder_layer_equals_numpy(mode, index):
  """h = LN(a + FFN(a) + PKM(a)) (ResM), LN(a + PKM(a)) (PKM), LN(a + FFN(a)) elsewhere."""
  cfg = tiny(memory_mode=mode)
  layer = EncoderLayer(cfg, index, rngs=nnx.Rngs(1))
  perturb_params(layer)
  r = np.random.default_rng(0)
  x = r.normal(size=(2, 5, 16)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)

  h, aux = layer(jnp.asarray(x), jnp.asarray(mask))

  eps = cfg.layer_norm_eps
  x64 = x.astype(np.float64)
  a = np_layer_norm(x64 + np_attention(x64, mask, layer.attention, cfg.num_heads),
                    layer.attention_norm, eps)
  update = np.zeros_like(a)
  if layer.ffn is not None:
    update += np_dense(np_gelu(np_dense(a, layer.ffn.intermediate)), layer.ffn.output)
  if layer.memory is not None:
    mem, mem_aux = layer.memory(jnp.asarray(a, jnp.float32), jnp.asarray(mask))
    update += np.asarray(mem, np.float64)
    np.testing.assert_array_equal(np.asarray(aux.indices), np.asarray(mem_aux.indices))
  else:
    assert aux is None
  expected = np_layer_norm(a + update, layer.output_norm, eps)
  np.testing.assert_allclose(np.asarray(h), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("train", [False, True])
def test_padding_does_not_leak(train):
  cfg = tiny(memory_mode="residual")
  r = np.random.default_rng(0)
  ids = r.integers(1, cfg.vocab_size, size=(3, 7)).astype(np.int32)
  mask = np.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], np.int32)
  ids_other = np.where(mask > 0, ids, r.integers(1, cfg.vocab_size, size=ids.shape))
  real = mask > 0
  outs = []
  for batch_ids in (ids, ids_other):
    model = BertForMaskedLM(cfg, rngs=nnx.Rngs(0))
    rngs = nnx.Rngs(dropout=3) if train else None  # the same dropout masks in both runs
    logits, aux = model(jnp.asarray(batch_ids), jnp.asarray(mask), rngs=rngs)
    outs.append((np.asarray(logits), aux))
  (logits, aux), (logits_other, aux_other) = outs
  assert np.abs(logits[~real] - logits_other[~real]).max() > 1e-3  # the ids did change
  np.testing.assert_allclose(logits_other[real], logits[real], rtol=1e-5, atol=1e-5)
  for i in cfg.memory_layers:
    np.testing.assert_array_equal(np.asarray(aux_other[i].indices)[real],
                                  np.asarray(aux[i].indices)[real])


def test_mlm_decoder_is_tied():
  cfg = tiny()
  model = BertForMaskedLM(cfg, rngs=nnx.Rngs(0))
  perturb_params(model.mlm_head, seed=2)
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 50, size=(2, 6)), jnp.int32)
  mask = jnp.ones((2, 6), jnp.int32)
  logits, _ = model(ids, mask)
  h, _ = model.bert(ids, mask)
  head = model.mlm_head
  x = np_layer_norm(np_gelu(np_dense(np.asarray(h, np.float64), head.transform)),
                    head.transform_norm, cfg.layer_norm_eps)
  expected = x @ np_(model.bert.embeddings.word_embeddings.embedding).T + np_(head.bias)
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)
  # No second [vocab, hidden] matrix anywhere: the decoder is the embedding table itself.
  shapes = [p.shape for p in jax.tree.leaves(nnx.state(model, nnx.Param))]
  assert shapes.count((cfg.vocab_size, cfg.hidden_size)) == 1


def test_dropout_only_in_training_mode():
  cfg = tiny(memory=dataclasses.replace(TINY.memory, input_dropout=0.1, value_dropout=0.1))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=(2, 6)), jnp.int32)
  mask = jnp.ones((2, 6), jnp.int32)
  model = BertForMaskedLM(cfg, rngs=nnx.Rngs(0))
  eval1, _ = model(ids, mask)
  eval2, _ = model(ids, mask)
  np.testing.assert_array_equal(np.asarray(eval1), np.asarray(eval2))
  train_a, _ = model(ids, mask, rngs=nnx.Rngs(dropout=1))
  train_a2, _ = model(ids, mask, rngs=nnx.Rngs(dropout=1))
  train_b, _ = model(ids, mask, rngs=nnx.Rngs(dropout=2))
  np.testing.assert_array_equal(np.asarray(train_a), np.asarray(train_a2))
  assert np.abs(np.asarray(train_a) - np.asarray(train_b)).max() > 1e-3
  assert np.abs(np.asarray(train_a) - np.asarray(eval1)).max() > 1e-3

  # With every rate at 0 (and no batch statistics), training mode is exactly eval mode.
  no_drop = tiny(hidden_dropout=0.0, attention_dropout=0.0,
                 memory=dataclasses.replace(TINY.memory, query_norm="layernorm"))
  model = BertForMaskedLM(no_drop, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(model(ids, mask, rngs=nnx.Rngs(dropout=1))[0]),
                             np.asarray(model(ids, mask)[0]), rtol=1e-6, atol=1e-6)


def test_bfloat16_close_to_float32():
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=(2, 8)), jnp.int32)
  mask = jnp.asarray([[1] * 8, [1] * 5 + [0] * 3], jnp.int32)
  logits32, _ = BertForMaskedLM(tiny(), rngs=nnx.Rngs(0))(ids, mask)
  logits16, aux16 = BertForMaskedLM(tiny(dtype="bfloat16"), rngs=nnx.Rngs(0))(ids, mask)
  assert logits16.dtype == jnp.float32 and aux16[0].weights.dtype == jnp.float32
  logits32, logits16 = np.asarray(logits32), np.asarray(logits16)
  assert np.all(np.isfinite(logits16))
  rel = np.abs(logits16 - logits32).mean() / np.abs(logits32).mean()
  assert rel < 0.05, rel
  assert np.corrcoef(logits16.ravel(), logits32.ravel())[0, 1] > 0.99


# ---------------------------------------------------------------------------------------------
# Parameter counts: abstract shapes only (the memory models are 0.5-0.9 B parameters).

def count_params(cfg: ModelConfig) -> int:
  model = nnx.eval_shape(lambda: BertForMaskedLM(cfg, rngs=nnx.Rngs(0)))
  return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def expected_params(cfg: ModelConfig) -> int:
  """BERT's parameter arithmetic, written out independently of the module code."""
  d, f, m = cfg.hidden_size, cfg.intermediate_size, cfg.memory
  embeddings = (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * d + 2 * d
  attention = 4 * (d * d + d) + 2 * d  # q, k, v, out + LN
  ffn = (d * f + f) + (f * d + d)
  q = m.heads * m.k_dim
  memory = (d * q + q) + 2 * q + m.heads * 2 * m.n_keys * (m.k_dim // 2) + m.n_slots * m.v_dim
  total = embeddings + (d * d + d) + 2 * d + cfg.vocab_size  # + MLM head (tied decoder)
  for i in range(cfg.num_layers):
    total += attention + 2 * d  # + output LN
    total += ffn if cfg.has_ffn(i) else 0
    total += memory if cfg.has_memory(i) else 0
  return total


@pytest.mark.parametrize("name, paper_millions", [
    ("bert_base", 110), ("bert_base_pkm", 506), ("bert_base_resm", 515),
    ("bert_large_pkm", 860), ("bert_large_resm", 876)])
def test_paper_parameter_counts(name, paper_millions):
  cfg = model_config(importlib.import_module(f"configs.{name}").get_config(), vocab_size=30522)
  n = count_params(cfg)
  assert n == expected_params(cfg)
  assert abs(n / 1e6 - paper_millions) / paper_millions < 0.01, f"{name}: {n:,}"


def test_remat_gives_the_same_loss_and_gradients():
  cfg = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=2,
                    intermediate_size=48, max_position_embeddings=16, memory_mode="residual",
                    memory_layers=(1,), memory=MemoryConfig(n_keys=8, heads=2, k=3, k_dim=8,
                                                            v_dim=32))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 9)), jnp.int32)
  mask = jnp.ones((2, 9), jnp.int32).at[1, 6:].set(0)

  def loss_and_grads(cfg):
    model = BertForMaskedLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
      logits, _ = nnx.merge(graphdef, params, rest, copy=True)(ids, mask,
                                                               rngs=nnx.Rngs(dropout=3))
      return jnp.mean(logits**2)
    return jax.jit(jax.value_and_grad(loss))(params)

  plain_loss, plain_grads = loss_and_grads(cfg)
  remat_loss, remat_grads = loss_and_grads(dataclasses.replace(cfg, remat=True))
  np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
