"""A downstream task ready to train: model inputs, the kind of head, a scorer, and the batches.

Batch s is a pure function of (seed, s), so a resumed run sees exactly the batches of an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import numpy as np

KINDS = ("classification", "regression", "span")
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass
class TaskData:
  """A task ready to train: model inputs [N, ...] and a scorer of dev outputs."""

  name: str
  kind: str  # one of KINDS
  num_labels: int  # classes; 1 for regression; 2 (start, end) for spans
  train: dict[str, np.ndarray]  # input_ids/attention_mask/token_type_ids + labels or positions
  evals: dict[str, dict[str, np.ndarray]]  # split -> model inputs
  # (split, outputs) -> (metrics, JSON-able predictions); outputs: logits [N, L] or (start, end)
  score: Callable[[str, Any], tuple[dict[str, float], Any]]

  @property
  def num_train(self) -> int:
    return len(self.train["input_ids"])


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
  """Rows of batch `step`: the stream of per-epoch permutations, cut into equal batches (the
  last batch of an epoch continues into the next), so every batch is full and reproducible."""
  out, pos = [], step * batch_size
  while len(out) < batch_size:
    epoch, offset = divmod(pos, n)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    take = perm[offset:offset + batch_size - len(out)]
    out.extend(take.tolist())
    pos += len(take)
  return np.asarray(out)


def train_batches(task: TaskData, start_step: int, batch_size: int, seed: int
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Training batches start_step, start_step + 1, ... ([batch_size, ...] numpy arrays)."""
  step = start_step
  while True:
    rows = batch_indices(step, task.num_train, batch_size, seed)
    yield {k: v[rows] for k, v in task.train.items()}
    step += 1


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int
                 ) -> Iterator[tuple[dict[str, np.ndarray], int]]:
  """(inputs of a full batch, number of real rows): the last batch repeats its last row."""
  n = len(arrays["input_ids"])
  for lo in range(0, n, batch_size):
    rows = np.minimum(np.arange(lo, lo + batch_size), n - 1)
    yield {k: arrays[k][rows] for k in INPUT_KEYS}, min(batch_size, n - lo)
