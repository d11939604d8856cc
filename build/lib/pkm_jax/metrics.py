"""MLM metrics and the paper's memory-usage metrics (Kim & Jung 2020; SPEC.md §3).

Per memory layer, over an evaluation set, counting every non-padding token and every head:
  u_i = times slot i is among the selected top-k,  w_i = sum of softmax weights slot i received,
  top1_i = times slot i is a head's highest-weight pick.
MU = 100 * #{u_i > 0} / N,  KL_u = KL(u / sum u || uniform) = log N + sum p log p  (0 log 0 = 0).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pkm_jax.product_keys import MemoryAux


def _kl_to_uniform(totals: np.ndarray) -> float:
  total = totals.sum()
  if total <= 0:
    return float("nan")
  p = totals[totals > 0] / total
  return float(np.log(totals.size) + np.sum(p * np.log(p)))


def memory_usage_stats(slot_counts: np.ndarray, slot_weights: np.ndarray,
                       top1_counts: np.ndarray) -> dict[str, float]:
  """Per-slot totals (1-D, length N = n_keys**2) -> usage, top1_usage (%), kl_uniform, kl_weighted."""
  slot_counts = np.asarray(slot_counts, np.float64)
  slot_weights = np.asarray(slot_weights, np.float64)
  top1_counts = np.asarray(top1_counts, np.float64)
  if not slot_counts.shape == slot_weights.shape == top1_counts.shape or slot_counts.ndim != 1:
    raise ValueError(f"memory_usage_stats: expected three 1-D arrays of one length, got shapes "
                     f"{slot_counts.shape}, {slot_weights.shape}, {top1_counts.shape}")
  n = slot_counts.size
  return {
      "usage": 100.0 * float(np.count_nonzero(slot_counts)) / n,
      "top1_usage": 100.0 * float(np.count_nonzero(top1_counts)) / n,
      "kl_uniform": _kl_to_uniform(slot_counts),
      "kl_weighted": _kl_to_uniform(slot_weights),
  }


def slot_totals(aux: MemoryAux, mask_BxT: jax.Array, n_slots: int
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One batch's per-slot (counts, weights, top1 counts), each [N] float32; padding excluded.

  Scatter-adds over B*T*H*K picks: cost grows with the batch, not the table (apart from the
  [N] zeros it adds into, which live on device and are summed across batches there).
  """
  m = mask_BxT.astype(jnp.float32)[..., None, None]  # [B, T, 1, 1]
  idx = aux.indices.reshape(-1)
  counts = jnp.zeros((n_slots,), jnp.float32).at[idx].add(
      jnp.broadcast_to(m, aux.indices.shape).reshape(-1))
  weights = jnp.zeros((n_slots,), jnp.float32).at[idx].add(
      (aux.weights.astype(jnp.float32) * m).reshape(-1))
  # Picks are sorted by score, so position 0 is each head's highest-weight pick.
  top1 = jnp.zeros((n_slots,), jnp.float32).at[aux.indices[..., 0].reshape(-1)].add(
      jnp.broadcast_to(m[..., 0], aux.indices.shape[:-1]).reshape(-1))
  return counts, weights, top1


@dataclasses.dataclass
class MemoryUsage:
  """Host-side running totals for one memory layer (float64, exact for integer counts)."""

  n_slots: int
  counts: np.ndarray = None
  weights: np.ndarray = None
  top1: np.ndarray = None

  def __post_init__(self):
    self.reset()

  def reset(self) -> None:
    self.counts = np.zeros(self.n_slots)
    self.weights = np.zeros(self.n_slots)
    self.top1 = np.zeros(self.n_slots)

  def add(self, counts, weights, top1) -> None:
    self.counts += np.asarray(counts, np.float64)
    self.weights += np.asarray(weights, np.float64)
    self.top1 += np.asarray(top1, np.float64)

  def stats(self) -> dict[str, float]:
    return memory_usage_stats(self.counts, self.weights, self.top1)


def mlm_loss_and_metrics(logits_BxTxV: jax.Array, labels_BxT: jax.Array, weights_BxT: jax.Array
                         ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy over predicted positions, plus sums for exact aggregation across batches."""
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  nll_BxT = -jnp.take_along_axis(logp, labels_BxT[..., None], axis=-1)[..., 0]
  w = weights_BxT.astype(jnp.float32)
  n = w.sum()
  loss = (nll_BxT * w).sum() / jnp.maximum(n, 1.0)
  correct = ((jnp.argmax(logits_BxTxV, axis=-1) == labels_BxT) * w).sum()
  return loss, {"nll_sum": (nll_BxT * w).sum(), "correct": correct, "count": n}
