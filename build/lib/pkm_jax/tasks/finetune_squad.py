"""SQuAD v1.1 fine-tuning: windowed features, span head, n-best decoding, official EM / F1.

Hyper-parameters from the config: max_len (384), doc_stride (128), max_query_len (64), n_best
(20), max_answer_len (30). Dev predictions {qid: answer} are written to
WORKDIR/squad/predictions_dev.json in the official evaluate-v1.1.py input format.
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections

from pkm_jax.tasks import squad
from pkm_jax.tasks.task_data import INPUT_KEYS, TaskData
from pkm_jax.tasks.task_model import Pretrained
from pkm_jax.tasks.task_run import prepare_task_dir, run_task
from pkm_jax.tasks.task_metrics import squad_metrics

NAME = "squad"


def read(config: ml_collections.ConfigDict) -> dict[str, list[squad.SquadExample]]:
  """{'train': examples, 'dev': examples}; a missing or malformed file fails here."""
  out = {}
  for split, limit in (("train", config.data.max_train_examples), ("dev", config.data.max_eval_examples)):
    examples = squad.load_squad(split, source=config.data.source, data_dir=config.data.data_dir)
    out[split] = examples[:limit] if limit > 0 else examples
  return out


def encode(config: ml_collections.ConfigDict, examples: dict[str, list[squad.SquadExample]],
           tokenizer) -> TaskData:
  features = {split: squad.prepare_features(ex, tokenizer, max_seq_len=config.data.max_len,
                                            max_query_len=config.data.max_query_len,
                                            doc_stride=config.data.doc_stride)
              for split, ex in examples.items()}

  def score(split: str, outputs) -> tuple[dict[str, float], dict[str, str]]:
    start_FxT, end_FxT = outputs
    predictions = squad.postprocess(examples[split], features[split], start_FxT, end_FxT,
                                    n_best_size=config.eval.n_best,
                                    max_answer_len=config.eval.max_answer_len)
    return squad_metrics(squad.gold_answers(examples[split]), predictions), predictions

  dev = features["dev"].arrays()
  return TaskData(
      name=NAME, kind="span", num_labels=2, train=features["train"].arrays(),
      evals={"dev": {k: dev[k] for k in INPUT_KEYS}},
      score=score)


def run(config: ml_collections.ConfigDict, task_dir: str,
        load: Callable[[], Pretrained]) -> dict[str, Any]:
  """Fine-tunes on SQuAD v1.1 train into task_dir; {'dev': {'exact_match', 'f1'}, ...}."""
  examples = read(config)
  model_cfg, tokenizer, pre = prepare_task_dir(config, task_dir, NAME, "span", 2, load)
  data = encode(config, examples, tokenizer)
  return run_task(config, task_dir, data, model_cfg, pre)
