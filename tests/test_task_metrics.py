"""Task metrics vs scikit-learn / scipy and the official SQuAD v1.1 evaluation logic."""

import collections
import re
import string

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from pkm_jax.tasks import task_metrics as metrics


def _class_cases():
  rng = np.random.default_rng(0)
  for n in (1, 2, 7, 100, 1000):
    for k in (2, 3):
      labels = rng.integers(0, k, n)
      yield rng.integers(0, k, n), labels  # random
      yield np.where(rng.random(n) < 0.8, labels, rng.integers(0, k, n)), labels  # correlated
  yield np.zeros(5, int), np.zeros(5, int)  # one class only
  yield np.ones(5, int), np.zeros(5, int)  # all wrong, each side constant
  yield np.zeros(5, int), np.array([0, 1, 0, 1, 1])  # constant predictions
  yield np.array([0, 1, 0, 1, 1]), np.array([0, 1, 0, 1, 1])  # perfect
  yield np.array([1, 0, 1, 0, 0]), np.array([0, 1, 0, 1, 1])  # perfectly inverted


@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")
@pytest.mark.parametrize("case", list(_class_cases()))
def test_classification_metrics_match_sklearn(case):
  preds, labels = case
  assert metrics.accuracy(preds, labels) == pytest.approx(skm.accuracy_score(labels, preds))
  assert metrics.matthews_corrcoef(preds, labels) == pytest.approx(
      skm.matthews_corrcoef(labels, preds), abs=1e-12)
  if set(np.unique(np.concatenate([preds, labels]))) <= {0, 1}:
    expected = skm.f1_score(labels, preds, pos_label=1, zero_division=0.0)
    assert metrics.f1_binary(preds, labels) == pytest.approx(expected)


def _regression_cases():
  rng = np.random.default_rng(1)
  for n in (2, 3, 10, 500):
    x = rng.normal(size=n)
    yield x, 0.5 * x + rng.normal(size=n)
    # tie-heavy: STS-B scores are multiples of 0.2 in [0, 5]; integer predictions
    yield rng.integers(0, 3, n).astype(float), np.round(rng.uniform(0, 5, n) * 5) / 5
  yield np.array([1.0, 1.0, 2.0, 2.0, 2.0, 3.0]), np.array([3.0, 1.0, 1.0, 2.0, 2.0, 0.5])
  yield np.array([1e8 + 1, 1e8 + 2, 1e8 + 4]), np.array([1.0, 2.0, 3.0])  # large offset


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")  # tiny n: may be constant
@pytest.mark.parametrize("case", list(_regression_cases()))
def test_correlations_match_scipy(case):
  x, y = case
  assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-9, nan_ok=True)
  assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-9,
                                                 nan_ok=True)
  np.testing.assert_allclose(metrics.average_ranks(x), stats.rankdata(x, method="average"))


def test_correlation_of_constant_input_is_nan_like_scipy():
  x, y = np.ones(4), np.arange(4.0)
  with pytest.warns(stats.ConstantInputWarning):
    assert np.isnan(stats.pearsonr(x, y)[0])
  assert np.isnan(metrics.pearson(x, y)) and np.isnan(metrics.spearman(y, x))


def test_bad_metric_inputs_raise():
  with pytest.raises(ValueError, match="1-D of one length"):
    metrics.accuracy([0, 1], [0, 1, 1])
  with pytest.raises(ValueError, match="no predictions"):
    metrics.f1_binary([], [])
  with pytest.raises(ValueError, match="unknown GLUE task"):
    metrics.glue_metrics("squad", [0], [0])


def test_glue_metrics_per_task():
  rng = np.random.default_rng(2)
  labels, preds = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
  assert metrics.glue_metrics("cola", preds, labels) == pytest.approx(
      {"matthews": skm.matthews_corrcoef(labels, preds)})
  for task in ("sst2", "mnli", "qnli", "rte", "wnli"):
    assert metrics.glue_metrics(task, preds, labels) == pytest.approx(
        {"accuracy": skm.accuracy_score(labels, preds)})
  for task in ("mrpc", "qqp"):
    assert metrics.glue_metrics(task, preds, labels) == pytest.approx(
        {"f1": skm.f1_score(labels, preds), "accuracy": skm.accuracy_score(labels, preds)})
  x, y = rng.uniform(0, 5, 50), rng.uniform(0, 5, 50)
  assert metrics.glue_metrics("stsb", x, y) == pytest.approx(
      {"pearson": stats.pearsonr(x, y)[0], "spearmanr": stats.spearmanr(x, y)[0]})


# ------------------------------------------------------------------------------------- SQuAD
@pytest.mark.parametrize("pred,truth,em,f1", [
    # Case, the final period and surrounding white space vanish in normalisation.
    ("the cat sat", "The cat sat.", 1.0, 1.0),
    # Articles are dropped: both sides normalise to "dog".
    ("A dog", "the dog", 1.0, 1.0),
    # pred tokens {big, dog} ("a" dropped), gold {dog}: overlap 1, P = 1/2, R = 1/1,
    # F1 = 2 * 1 * (1/2) / (1 + 1/2) = 2/3.
    ("a big dog", "dog", 0.0, 2 / 3),
    # "an" inside a word is not an article; "banana split" vs "banana": P = 1/2, R = 1 -> 2/3.
    ("banana split", "banana", 0.0, 2 / 3),
    # Counter overlap counts repeats at most min(count) times: pred {x:3}, gold {x:1, y:1}:
    # overlap 1, P = 1/3, R = 1/2, F1 = 2 * (1/3)(1/2) / (1/3 + 1/2) = 0.4.
    ("x x x", "x y", 0.0, 0.4),
    # Punctuation is removed, not replaced by a space: "1,000" -> "1000" != "1 000".
    ("1,000", "1 000", 0.0, 0.0),
    # Hyphen removal joins words: "well-known" -> "wellknown" == "wellknown".
    ("well-known", "wellknown", 1.0, 1.0),
    # Only articles: both normalise to "", EM 1 but F1 0 (no common token; v1.1 script).
    ("the", "a", 1.0, 0.0),
    # Tabs and newlines collapse like spaces.
    ("new\t york\n", "New York", 1.0, 1.0),
])
def test_squad_hand_worked(pred, truth, em, f1):
  assert metrics.exact_match(pred, truth) == em
  assert metrics.token_f1(pred, truth) == pytest.approx(f1)


def test_squad_max_over_golds_and_missing_predictions():
  gold = {"q1": ["Denver Broncos", "the Broncos"], "q2": ["1990"], "q3": ["Paris"]}
  preds = {"q1": "Broncos", "q2": "in 1990"}  # q3 missing: scores 0
  # q1: EM max(0, 1) = 1 ("the Broncos" -> "broncos"); F1 max(2/3, 1) = 1.
  # q2: EM 0; F1: P = 1/2, R = 1 -> 2/3.  q3: 0.  Averages: EM 1/3, F1 (1 + 2/3) / 3 = 5/9.
  out = metrics.squad_metrics(gold, preds)
  assert out["exact_match"] == pytest.approx(100 / 3)
  assert out["f1"] == pytest.approx(500 / 9)


def _official_evaluate(dataset, predictions):
  """A direct transcription of evaluate-v1.1.py's logic, written out independently."""
  def normalize(s):
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())

  def f1_score(prediction, ground_truth):
    p, g = normalize(prediction).split(), normalize(ground_truth).split()
    common = collections.Counter(p) & collections.Counter(g)
    num_same = sum(common.values())
    if num_same == 0:
      return 0
    precision, recall = 1.0 * num_same / len(p), 1.0 * num_same / len(g)
    return (2 * precision * recall) / (precision + recall)

  f1 = exact = total = 0
  for article in dataset:
    for paragraph in article["paragraphs"]:
      for qa in paragraph["qas"]:
        total += 1
        if qa["id"] not in predictions:
          continue
        truths = [a["text"] for a in qa["answers"]]
        exact += max(normalize(predictions[qa["id"]]) == normalize(t) for t in truths)
        f1 += max(f1_score(predictions[qa["id"]], t) for t in truths)
  return {"exact_match": 100.0 * exact / total, "f1": 100.0 * f1 / total}


def test_squad_metrics_match_official_logic_on_random_strings():
  rng = np.random.default_rng(3)
  words = ["a", "an", "the", "The", "cat", "Cat.", "dog", "dog,", "x", "an-t", "the's", "(1)",
           "1", "\t", "e", "ther", "A.", "  "]
  def phrase():
    return " ".join(rng.choice(words, rng.integers(0, 5)))
  qas = [{"id": f"q{i}", "answers": [{"text": phrase()} for _ in range(rng.integers(1, 4))]}
         for i in range(400)]
  dataset = [{"paragraphs": [{"qas": qas[:150]}, {"qas": qas[150:]}]}]
  predictions = {qa["id"]: phrase() for qa in qas if rng.random() < 0.9}
  # Half the predictions copy a gold answer with noise in case/punctuation/articles.
  for qa in qas[::2]:
    if qa["id"] in predictions:
      predictions[qa["id"]] = "The " + qa["answers"][0]["text"].upper() + "!"
  gold = {qa["id"]: [a["text"] for a in qa["answers"]] for qa in qas}
  ours = metrics.squad_metrics(gold, predictions)
  ref = _official_evaluate(dataset, predictions)
  assert ours == pytest.approx(ref)
  assert 0 < ref["exact_match"] < 100 and 0 < ref["f1"] < 100  # the cases are not trivial
