"""Memory-usage metrics (Kim & Jung 2020, §4.1) against hand-worked cases and a numpy loop."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from pkm_jax import metrics
from pkm_jax.product_keys import MemoryAux


def test_half_used_evenly():
  # Two of four slots, used equally: MU 50 %, p = (1/2, 1/2, 0, 0),
  # KL = log 4 + 2 * (1/2) log(1/2) = log 4 - log 2 = log 2.
  s = metrics.memory_usage_stats(np.array([3, 3, 0, 0]), np.array([1.5, 1.5, 0, 0]),
                                 np.array([3, 0, 0, 0]))
  assert s["usage"] == 50.0
  assert s["top1_usage"] == 25.0
  assert s["kl_uniform"] == pytest.approx(math.log(2))
  assert s["kl_weighted"] == pytest.approx(math.log(2))


def test_uniform_and_single_slot_extremes():
  n = 16
  uniform = metrics.memory_usage_stats(np.full(n, 7.0), np.full(n, 0.3), np.ones(n))
  assert uniform["usage"] == 100.0 and uniform["top1_usage"] == 100.0
  assert uniform["kl_uniform"] == pytest.approx(0.0, abs=1e-12)
  assert uniform["kl_weighted"] == pytest.approx(0.0, abs=1e-12)
  one = np.zeros(n)
  one[5] = 10
  single = metrics.memory_usage_stats(one, one * 0.25, one)
  assert single["usage"] == 100.0 / n
  assert single["kl_uniform"] == pytest.approx(math.log(n))  # all mass on one of N slots


def test_weights_differ_from_counts():
  # Counts (1, 1) but weights (0.9, 0.1): KL_u = 0 over the two used of two slots,
  # KL_w = log 2 + 0.9 log 0.9 + 0.1 log 0.1.
  s = metrics.memory_usage_stats(np.array([1, 1]), np.array([0.9, 0.1]), np.array([1, 0]))
  assert s["kl_uniform"] == pytest.approx(0.0, abs=1e-12)
  assert s["kl_weighted"] == pytest.approx(math.log(2) + 0.9 * math.log(0.9)
                                           + 0.1 * math.log(0.1))


def test_shape_errors():
  with pytest.raises(ValueError, match="1-D arrays"):
    metrics.memory_usage_stats(np.zeros(4), np.zeros(5), np.zeros(4))


def test_slot_totals_match_numpy_loop_and_skip_padding():
  rng = np.random.default_rng(0)
  b, t, h, k, n = 3, 5, 2, 4, 37
  indices = rng.integers(0, n, size=(b, t, h, k)).astype(np.int32)
  weights = rng.random((b, t, h, k)).astype(np.float32)
  mask = np.ones((b, t), np.int32)
  mask[1, 3:] = 0
  mask[2, 1:] = 0
  counts, wsum, top1 = metrics.slot_totals(
      MemoryAux(jnp.asarray(indices), jnp.asarray(weights)), jnp.asarray(mask), n)
  ref_c, ref_w, ref_t = np.zeros(n), np.zeros(n), np.zeros(n)
  for bi in range(b):
    for ti in range(t):
      if not mask[bi, ti]:
        continue
      for hi in range(h):
        ref_t[indices[bi, ti, hi, 0]] += 1
        for ki in range(k):
          ref_c[indices[bi, ti, hi, ki]] += 1
          ref_w[indices[bi, ti, hi, ki]] += weights[bi, ti, hi, ki]
  np.testing.assert_array_equal(np.asarray(counts), ref_c)
  np.testing.assert_allclose(np.asarray(wsum), ref_w, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(top1), ref_t)
  assert ref_c.sum() == mask.sum() * h * k


def test_mlm_loss_counts_only_weighted_positions():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
  labels = rng.integers(0, 7, size=(2, 3)).astype(np.int32)
  w = np.array([[1, 0, 1], [0, 0, 1]], np.float32)
  loss, sums = metrics.mlm_loss_and_metrics(jnp.asarray(logits), jnp.asarray(labels),
                                            jnp.asarray(w))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = [-logp[i, j, labels[i, j]] for i in range(2) for j in range(3) if w[i, j]]
  assert float(loss) == pytest.approx(np.mean(picked), rel=1e-5)
  assert float(sums["count"]) == 3
  correct = sum(int(logits[i, j].argmax() == labels[i, j]) for i in range(2) for j in range(3)
                if w[i, j])
  assert float(sums["correct"]) == correct
