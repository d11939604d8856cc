"""BERT's dynamic MLM masking (Devlin et al. 2019; SPEC.md §2), in numpy.

Per sequence, exactly n = floor(mask_prob * m + u) of its m maskable tokens are chosen
(u ~ U[0, 1): stochastic rounding, so E[n] = mask_prob * m exactly and short sequences are not
biased by rounding), and at least one when m > 0. Maskable = not padding and not a special
token. Each chosen token independently becomes [MASK] (80%), a uniformly random non-special
token (10%) or stays unchanged (10%); all chosen tokens are prediction targets.
"""

from __future__ import annotations

import numpy as np


def mask_tokens(input_ids_BxT: np.ndarray, rng: np.random.Generator, *, mask_prob: float,
                mask_id: int, special_ids: np.ndarray, vocab_size: int,
                mask_frac: float = 0.8, random_frac: float = 0.1) -> dict[str, np.ndarray]:
  """ids [B, T] -> {'input_ids', 'mlm_labels' (int32), 'mlm_weights' (float32)}, all [B, T].

  `special_ids` (padding included) are never chosen nor drawn as random replacements.
  """
  if not 0.0 < mask_prob <= 1.0:
    raise ValueError(f"data.mask_prob={mask_prob} must be in (0, 1]")
  ids_BxT = np.asarray(input_ids_BxT, np.int32)
  b, t = ids_BxT.shape
  special_ids = np.unique(np.asarray(special_ids, np.int64))
  maskable_BxT = ~np.isin(ids_BxT, special_ids)
  m_B = maskable_BxT.sum(axis=1)
  n_B = np.floor(mask_prob * m_B + rng.random(b)).astype(np.int64)
  n_B = np.where(m_B > 0, np.clip(n_B, 1, m_B), 0)

  # A uniformly random subset of size n per row: the n smallest of i.i.d. uniform keys, with
  # unmaskable positions pushed past every maskable one.
  keys_BxT = np.where(maskable_BxT, rng.random((b, t)), 2.0)
  rank_BxT = np.empty((b, t), np.int64)
  np.put_along_axis(rank_BxT, np.argsort(keys_BxT, axis=1),
                    np.broadcast_to(np.arange(t), (b, t)), axis=1)
  chosen_BxT = rank_BxT < n_B[:, None]

  action_BxT = rng.random((b, t))
  to_mask = chosen_BxT & (action_BxT < mask_frac)
  to_random = chosen_BxT & (action_BxT >= mask_frac) & (action_BxT < mask_frac + random_frac)
  # Random replacements: uniform over the ids that are not special.
  candidates = np.setdiff1d(np.arange(vocab_size), special_ids)
  random_BxT = candidates[rng.integers(0, len(candidates), size=(b, t))]

  out_BxT = np.where(to_mask, np.int32(mask_id), ids_BxT)
  out_BxT = np.where(to_random, random_BxT, out_BxT).astype(np.int32)
  return {
      "input_ids": out_BxT,
      "mlm_labels": np.where(chosen_BxT, ids_BxT, 0).astype(np.int32),
      "mlm_weights": chosen_BxT.astype(np.float32),
  }
