"""Downstream-task metrics, each equal to its official definition (numpy only).

GLUE (values are fractions in [0, 1], as scikit-learn / scipy return them):
  accuracy; binary F1 of the positive class (MRPC, QQP); Matthews correlation (CoLA; 0 when
  undefined, as scikit-learn); Pearson and Spearman correlation (STS-B; Spearman ranks ties by
  their average rank, as scipy). `glue_metrics(task, preds, labels)` gives a task's standard set.
SQuAD v1.1 (percentages, as the official evaluate-v1.1.py): exact match and token F1 of the
  normalised answer, the max over the gold answers, averaged over every question (a question
  without a prediction scores 0).
"""

from __future__ import annotations

import collections
import re
import string
from typing import Mapping, Sequence

import numpy as np

# The metrics GLUE reports for each task (the first is the task's headline number).
GLUE_TASK_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews",),
    "sst2": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "stsb": ("pearson", "spearmanr"),
    "qqp": ("f1", "accuracy"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}


def _pair(preds, labels, name: str) -> tuple[np.ndarray, np.ndarray]:
  preds, labels = np.asarray(preds), np.asarray(labels)
  if preds.ndim != 1 or preds.shape != labels.shape:
    raise ValueError(f"{name}: predictions and labels must be 1-D of one length, got shapes "
                     f"{preds.shape} and {labels.shape}")
  if preds.size == 0:
    raise ValueError(f"{name}: no predictions to score")
  return preds, labels


def accuracy(preds, labels) -> float:
  """Fraction of predictions equal to the label; preds, labels [N]."""
  preds, labels = _pair(preds, labels, "accuracy")
  return float(np.mean(preds == labels))


def f1_binary(preds, labels, pos_label: int = 1) -> float:
  """F1 of the positive class = 2 TP / (2 TP + FP + FN); 0 when there is no positive at all."""
  preds, labels = _pair(preds, labels, "f1")
  pred_pos, true_pos = preds == pos_label, labels == pos_label
  tp = np.sum(pred_pos & true_pos)
  denom = 2 * tp + np.sum(pred_pos & ~true_pos) + np.sum(~pred_pos & true_pos)
  return float(2 * tp / denom) if denom > 0 else 0.0


def matthews_corrcoef(preds, labels) -> float:
  """Matthews correlation (multi-class form of Gorodkin 2004); 0 when a marginal is constant."""
  preds, labels = _pair(preds, labels, "matthews")
  classes, codes = np.unique(np.concatenate([labels, preds]), return_inverse=True)
  true_K = np.bincount(codes[:labels.size], minlength=classes.size).astype(np.float64)
  pred_K = np.bincount(codes[labels.size:], minlength=classes.size).astype(np.float64)
  n, correct = float(labels.size), float(np.sum(preds == labels))
  cov_pt = correct * n - pred_K @ true_K
  cov_pp = n * n - pred_K @ pred_K
  cov_tt = n * n - true_K @ true_K
  if cov_pp * cov_tt == 0:
    return 0.0
  return float(cov_pt / np.sqrt(cov_pp * cov_tt))


def pearson(preds, labels) -> float:
  """Pearson correlation; NaN when either input is constant (as scipy)."""
  x, y = _pair(preds, labels, "pearson")
  x = x.astype(np.float64) - np.mean(x, dtype=np.float64)
  y = y.astype(np.float64) - np.mean(y, dtype=np.float64)
  # Normalise first: the raw sums of squares can overflow or lose precision for large values.
  nx, ny = np.linalg.norm(x), np.linalg.norm(y)
  if nx == 0 or ny == 0:
    return float("nan")
  r = float(np.dot(x / nx, y / ny))
  return max(-1.0, min(1.0, r))


def average_ranks(x) -> np.ndarray:
  """1-based ranks of x [N]; tied values share the mean of the ranks they span."""
  _, inverse, counts = np.unique(np.asarray(x), return_inverse=True, return_counts=True)
  first = np.cumsum(counts) - counts  # 0-based rank of each distinct value's first copy
  return (first + (counts + 1) / 2.0)[inverse.reshape(-1)]


def spearman(preds, labels) -> float:
  """Spearman correlation = Pearson correlation of the average ranks; NaN for constant input."""
  x, y = _pair(preds, labels, "spearman")
  return pearson(average_ranks(x), average_ranks(y))


_METRIC_FNS = {"accuracy": accuracy, "f1": f1_binary, "matthews": matthews_corrcoef,
               "pearson": pearson, "spearmanr": spearman}


def glue_metrics(task: str, preds, labels) -> dict[str, float]:
  """The task's standard GLUE metrics {name: value}; preds are class ids (STS-B: scores) [N]."""
  if task not in GLUE_TASK_METRICS:
    raise ValueError(f"unknown GLUE task {task!r}; known: {', '.join(GLUE_TASK_METRICS)}")
  return {name: _METRIC_FNS[name](preds, labels) for name in GLUE_TASK_METRICS[task]}


# ------------------------------------------------------------------------------------ SQuAD v1.1
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
  """Lower-case, drop punctuation, drop the articles a/an/the, collapse white space."""
  s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, truth: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(truth))


def token_f1(prediction: str, truth: str) -> float:
  """F1 of the normalised tokens' multiset overlap (0 when nothing overlaps, empty included)."""
  pred_tokens, true_tokens = normalize_answer(prediction).split(), normalize_answer(truth).split()
  overlap = sum((collections.Counter(pred_tokens) & collections.Counter(true_tokens)).values())
  if overlap == 0:
    return 0.0
  precision, recall = overlap / len(pred_tokens), overlap / len(true_tokens)
  return 2 * precision * recall / (precision + recall)


def squad_metrics(gold: Mapping[str, Sequence[str]], predictions: Mapping[str, str]
                  ) -> dict[str, float]:
  """{'exact_match', 'f1'} in percent over every question of `gold` (qid -> gold answers)."""
  if not gold:
    raise ValueError("squad_metrics: no gold questions to score")
  em = f1 = 0.0
  for qid, truths in gold.items():
    if not truths:
      raise ValueError(f"squad_metrics: question {qid!r} has no gold answer")
    if qid not in predictions:
      continue  # counts as 0, as in the official script
    em += max(exact_match(predictions[qid], t) for t in truths)
    f1 += max(token_f1(predictions[qid], t) for t in truths)
  return {"exact_match": 100.0 * em / len(gold), "f1": 100.0 * f1 / len(gold)}
