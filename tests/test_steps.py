"""pkm_jax.steps: the train step's clipping treats dense and row-sparse value gradients alike.

Reference: the same step with dense Adam on the value table, whose gradient goes through the
same global-norm clipping as every other parameter. After one step from the same init, lazy Adam
and dense Adam agree on every row (untouched rows: dense Adam's first update is 0 too), so the
tables agree iff the row gradients were clipped by the same joint norm. eps = 1 keeps Adam's
first step proportional to the (clipped) gradient instead of its sign, so clipping shows.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from pkm_jax import trainer
from pkm_jax.architecture import ModelConfig
from pkm_jax.models.bert import BertForMaskedLM
from pkm_jax.models.tables import value_table
from pkm_jax.data import mask_tokens, max_masked
from pkm_jax.steps import mlm_loss
from test_trainer import tiny_config

VOCAB = 400
NO_DROPOUT = {"model.hidden_dropout": 0.0, "model.attention_dropout": 0.0,
              "memory.input_dropout": 0.0, "memory.query_dropout": 0.0,
              "memory.value_dropout": 0.0}


def one_step(values_optimizer: str, grad_clip: float, **overrides):
  config = tiny_config(**NO_DROPOUT, **{
      "optim.values_optimizer": values_optimizer, "optim.grad_clip": grad_clip,
      "optim.eps": 1.0, "optim.values_lr": 0.5, "optim.lr": 0.5, "optim.warmup_steps": 0,
      "mesh.data": 1, "mesh.model": 1, **overrides})
  program = trainer.build_train_program(config, VOCAB)
  rng = np.random.default_rng(0)
  b, t = config.data.batch_size, config.data.max_len
  weights = (rng.random((b, t)) < 0.3).astype(np.float32)
  batch = {"input_ids": rng.integers(5, VOCAB, (b, t)).astype(np.int32),
           "attention_mask": np.ones((b, t), np.int32),
           "token_type_ids": np.zeros((b, t), np.int32),
           "mlm_labels": (rng.integers(5, VOCAB, (b, t)) * weights).astype(np.int32),
           "mlm_weights": weights}
  with jax.set_mesh(program.mesh):
    state, metrics, _ = program.train_step(program.init_state(), batch)
  layer = program.model_cfg.memory_layers[0]
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(state.params))
  return float(metrics["grad_norm"]), np.asarray(value_table(state.params, layer)[...]), params


@pytest.mark.parametrize("grad_clip", [0.0, 1e-3])
def test_sparse_rows_are_clipped_like_dense_gradients(grad_clip):
  dense_norm, dense_table, dense_params = one_step("adam", grad_clip)
  sparse_norm, sparse_table, sparse_params = one_step("sparse_adam", grad_clip)
  # The reported norm covers the table's gradient either way (dense, or as picked rows).
  assert sparse_norm == pytest.approx(dense_norm, rel=1e-5)
  assert grad_clip == 0 or dense_norm > 10 * grad_clip  # the clip is active
  np.testing.assert_allclose(sparse_table, dense_table, rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(sparse_params), jax.tree.leaves(dense_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_value_table_dense_and_sparse_steps_agree():
  """memory.value_dtype=bfloat16: the table (and so its Adam moments) stays bf16 through a step,
  and dense and lazy Adam still agree on it after one step (to bf16 rounding)."""
  bf16 = {"memory.value_dtype": "bfloat16"}
  dense_norm, dense_table, _ = one_step("adam", 0.0, **bf16)
  sparse_norm, sparse_table, _ = one_step("sparse_adam", 0.0, **bf16)
  assert dense_table.dtype == sparse_table.dtype == jax.numpy.bfloat16
  assert sparse_norm == pytest.approx(dense_norm, rel=1e-3)
  scale = np.abs(dense_table.astype(np.float32)).max()
  np.testing.assert_allclose(sparse_table.astype(np.float32), dense_table.astype(np.float32),
                             rtol=0, atol=scale / 64)


def test_masking_rule_stays_within_max_masked():
  """mlm_loss trusts the batch to mask at most max_masked tokens per row (no device-side check):
  the masking rule keeps to it at every rate and length, special tokens and padding included."""
  rng = np.random.default_rng(0)
  for mask_prob in (0.01, 0.15, 0.5, 0.99, 1.0):
    for t in (1, 2, 7, 32, 129):
      ids = rng.integers(0, 50, (64, t))
      batch = mask_tokens(ids, rng, mask_prob=mask_prob, mask_id=1, special_ids=[0, 1, 2],
                          vocab_size=50)
      assert (batch["mlm_weights"] > 0).sum(1).max() <= max_masked(mask_prob, t)


def test_mlm_loss_at_masked_positions_equals_every_position(masked_fraction=0.15):
  """mlm_loss with max_predictions gives the all-position head's loss, sums and gradients
  through the gathered [B, P, V] head when every row fits in P (as every batch of the pipeline
  does: the test above)."""
  cfg = ModelConfig(vocab_size=300, hidden_size=16, num_layers=1, num_heads=2,
                    intermediate_size=32, max_position_embeddings=32)
  graphdef, params, rest = nnx.split(BertForMaskedLM(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  rng = np.random.default_rng(0)
  b, t = 6, 32
  bound = max_masked(0.15, t)
  weights = np.zeros((b, t), np.float32)
  for row in weights:
    row[rng.choice(t, round(masked_fraction * t), replace=False)] = 1
  assert (weights.sum(1).max() <= bound) == (masked_fraction == 0.15)
  batch = {"input_ids": rng.integers(5, 300, (b, t)).astype(np.int32),
           "attention_mask": np.ones((b, t), np.int32),
           "token_type_ids": np.zeros((b, t), np.int32),
           "mlm_labels": (rng.integers(5, 300, (b, t)) * weights).astype(np.int32),
           "mlm_weights": weights}

  def loss(params, max_predictions):
    model = nnx.merge(graphdef, params, rest, copy=True)
    total, sums, _ = mlm_loss(model, batch, None, None, max_predictions=max_predictions)
    return total, sums

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (want, want_sums), want_g = grad(params, None)
  (got, got_sums), got_g = grad(params, bound)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for k in want_sums:
    np.testing.assert_allclose(got_sums[k], want_sums[k], rtol=1e-6)
  for a, b_ in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-7)
