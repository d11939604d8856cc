"""BERT's dynamic MLM masking (Devlin et al. 2019, §3.1: 15% of tokens, 80% [MASK], 10% random,
10% kept), in numpy.

Per sequence, exactly n = floor(mask_prob * m + u) of its m maskable tokens are chosen
(u ~ U[0, 1): stochastic rounding, so E[n] = mask_prob * m exactly and short sequences are not
biased by rounding), and at least one when m > 0. Maskable = not padding and not a special
token. Each chosen token independently becomes [MASK] (80%), a uniformly random non-special
token (10%) or stays unchanged (10%); all chosen tokens are prediction targets.

Two ways to draw the randomness, same masking rule:
- `mask_tokens(ids, rng)`: from a numpy Generator (one stream for the whole batch).
- `MLMMasker(...)(ids, keys_B, seed)`: row b from (seed, keys_B[b]) alone (keyed_random), so
  a row is masked the same whichever batch, host or worker process it is computed in. The
  loader keys a training row by its position in the stream (step * batch_size + row).
"""

from __future__ import annotations

import math

import numpy as np

from pkm_jax.data import keyed_random

Batch = dict[str, np.ndarray]
# keyed_random streams of the four draws; other users of keyed_random use other streams.
_COUNT, _ORDER, _ACTION, _REPLACE = 11, 12, 13, 14


def _check_prob(mask_prob: float) -> None:
  if not 0.0 < mask_prob <= 1.0:
    raise ValueError(f"data.mask_prob={mask_prob} must be in (0, 1]")


def max_masked(mask_prob: float, max_len: int) -> int:
  """An upper bound on the tokens the rule below masks in one row of max_len tokens:
  floor(p * m + u) <= ceil(p * T) for m <= T, u < 1, plus one for float rounding."""
  return min(max_len, max(1, math.ceil(mask_prob * max_len) + 1))


def _apply(ids_BxT: np.ndarray, count_B: np.ndarray, order_BxT: np.ndarray,
           action_BxT: np.ndarray, replace_BxT: np.ndarray, *, mask_prob: float, mask_id: int,
           special_ids: np.ndarray, candidates: np.ndarray, mask_frac: float,
           random_frac: float) -> Batch:
  """The masking rule, given four arrays of U[0, 1) draws ([B] and three [B, T])."""
  t = ids_BxT.shape[1]
  maskable_BxT = ~np.isin(ids_BxT, special_ids)
  m_B = maskable_BxT.sum(axis=1)
  n_B = np.floor(mask_prob * m_B + count_B).astype(np.int64)
  n_B = np.where(m_B > 0, np.clip(n_B, 1, m_B), 0)

  # A uniformly random subset of size n per row: the n smallest of i.i.d. uniform keys, with
  # unmaskable positions pushed past every maskable one.
  keys_BxT = np.where(maskable_BxT, order_BxT, 2.0)
  rank_BxT = np.empty(ids_BxT.shape, np.int64)
  np.put_along_axis(rank_BxT, np.argsort(keys_BxT, axis=1),
                    np.broadcast_to(np.arange(t), ids_BxT.shape), axis=1)
  chosen_BxT = rank_BxT < n_B[:, None]

  # The train step computes logits at max_masked positions per row only (steps.mlm_loss), with
  # no device-side check: the bound must hold for every row this rule makes.
  if n_B.size and n_B.max() > max_masked(mask_prob, t):
    raise AssertionError(f"the masking rule masked {n_B.max()} tokens of a {t}-token row, more "
                         f"than its bound max_masked={max_masked(mask_prob, t)}")
  to_mask = chosen_BxT & (action_BxT < mask_frac)
  to_random = chosen_BxT & (action_BxT >= mask_frac) & (action_BxT < mask_frac + random_frac)
  # Random replacements: uniform over the ids that are not special.
  pick_BxT = np.minimum((replace_BxT * len(candidates)).astype(np.int64), len(candidates) - 1)
  out_BxT = np.where(to_mask, np.int32(mask_id), ids_BxT)
  out_BxT = np.where(to_random, candidates[pick_BxT], out_BxT).astype(np.int32)
  return {
      "input_ids": out_BxT,
      "mlm_labels": np.where(chosen_BxT, ids_BxT, 0).astype(np.int32),
      "mlm_weights": chosen_BxT.astype(np.float32),
  }


def _candidates(vocab_size: int, special_ids: np.ndarray) -> np.ndarray:
  candidates = np.setdiff1d(np.arange(vocab_size), special_ids)
  if not len(candidates):
    raise ValueError(f"a vocabulary of {vocab_size} holds no non-special token to mask with")
  return candidates


def mask_tokens(input_ids_BxT: np.ndarray, rng: np.random.Generator, *, mask_prob: float,
                mask_id: int, special_ids: np.ndarray, vocab_size: int,
                mask_frac: float = 0.8, random_frac: float = 0.1) -> Batch:
  """ids [B, T] -> {'input_ids', 'mlm_labels' (int32), 'mlm_weights' (float32)}, all [B, T].

  `special_ids` (padding included) are never chosen nor drawn as random replacements.
  """
  _check_prob(mask_prob)
  ids_BxT = np.asarray(input_ids_BxT, np.int32)
  b, t = ids_BxT.shape
  special_ids = np.unique(np.asarray(special_ids, np.int64))
  return _apply(ids_BxT, rng.random(b), rng.random((b, t)), rng.random((b, t)),
                rng.random((b, t)), mask_prob=mask_prob, mask_id=mask_id,
                special_ids=special_ids, candidates=_candidates(vocab_size, special_ids),
                mask_frac=mask_frac, random_frac=random_frac)


class MLMMasker:
  """Packed rows [B, T] -> a full MLM batch, row b masked from (seed, keys_B[b]) alone.

  The batch: input_ids, mlm_labels, attention_mask, token_type_ids (int32) and mlm_weights
  (float32), all [B, T]. Picklable (grain worker processes receive a copy).
  """

  def __init__(self, special: dict[str, int], vocab_size: int, mask_prob: float):
    _check_prob(float(mask_prob))
    self.pad_id, self.mask_id = int(special["pad"]), int(special["mask"])
    self.special_ids = np.unique(np.asarray(list(special.values()), np.int64))
    self.candidates = _candidates(int(vocab_size), self.special_ids)  # computed once, not per batch
    self.vocab_size, self.mask_prob = int(vocab_size), float(mask_prob)

  def __call__(self, ids_BxT: np.ndarray, keys_B: np.ndarray, seed: int) -> Batch:
    """Packed rows [B, T] and one key per row [B] (e.g. stream positions) -> the batch."""
    ids_BxT = np.asarray(ids_BxT, np.int32)
    t = ids_BxT.shape[1]
    draw = lambda stream, width: keyed_random.uniform(seed, stream, keys_B, width)
    batch = _apply(ids_BxT, draw(_COUNT, 1)[:, 0], draw(_ORDER, t), draw(_ACTION, t),
                   draw(_REPLACE, t), mask_prob=self.mask_prob, mask_id=self.mask_id,
                   special_ids=self.special_ids, candidates=self.candidates, mask_frac=0.8,
                   random_frac=0.1)
    batch["attention_mask"] = (ids_BxT != self.pad_id).astype(np.int32)
    batch["token_type_ids"] = np.zeros_like(ids_BxT)
    return batch
