"""GLUE fine-tuning: one task (`run`) or a suite with the paper's table (`run_suite`).

Table layout (Kim & Jung 2020, Table 3 without SQuAD): one row per model (the init folder's
name), columns MNLI-(m/mm), QQP, QNLI, SST-2, CoLA, then MRPC, STS-B, RTE, WNLI when run, and
Avg. Cells are percentages: accuracy (QQP and MRPC too, as the paper's QQP column; their F1 is in
the JSON), Matthews correlation for CoLA, Spearman for STS-B. Avg is the mean of the row's
numbers with MNLI-m and MNLI-mm counted separately, which is how the paper's Avg is computed
(BERT-base: mean(84.3, 84.5, 91.0, 89.3, 92.8, 60.8) = 83.8).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import ml_collections
import numpy as np

from pkm_jax import checkpoint as ckpt_lib
from pkm_jax import storage
from pkm_jax.tasks import glue
from pkm_jax.tasks.task_data import TaskData
from pkm_jax.tasks.task_model import Pretrained
from pkm_jax.tasks.task_run import prepare_task_dir, run_task
from pkm_jax.tasks.task_metrics import glue_metrics

# Paper order first, then the rest of GLUE; (task, column title, metric of the cell).
COLUMNS = (("mnli", "MNLI-(m/mm)", "accuracy"), ("qqp", "QQP", "accuracy"),
           ("qnli", "QNLI", "accuracy"), ("sst2", "SST-2", "accuracy"),
           ("cola", "CoLA", "matthews"), ("mrpc", "MRPC", "accuracy"),
           ("stsb", "STS-B", "spearmanr"), ("rte", "RTE", "accuracy"),
           ("wnli", "WNLI", "accuracy"))


def read(config: ml_collections.ConfigDict, name: str) -> dict[str, list[glue.GlueExample]]:
  """{'train': examples, <dev split>: examples, ...} (a missing file fails here, before any
  model is loaded)."""
  spec = glue.get_task(name)
  out = {}
  for split, limit in ((spec.train_split, config.data.max_train_examples),
                       *((s, config.data.max_eval_examples) for s in spec.dev_splits)):
    examples = glue.load_glue(spec, split, source=config.data.source, data_dir=config.data.data_dir)
    out[split] = examples[:limit] if limit > 0 else examples
  return out


def encode(config: ml_collections.ConfigDict, name: str,
           examples: dict[str, list[glue.GlueExample]], tokenizer) -> TaskData:
  spec = glue.get_task(name)
  arrays = {split: glue.encode_glue(spec, ex, tokenizer, config.data.max_len)
            for split, ex in examples.items()}

  def score(split: str, logits_NxL: np.ndarray) -> tuple[dict[str, float], dict[str, Any]]:
    preds = logits_NxL[:, 0] if spec.is_regression else np.argmax(logits_NxL, -1)
    metrics = glue_metrics(spec.name, preds, arrays[split]["labels"])
    return metrics, {e.guid: p for e, p in zip(examples[split], preds.tolist())}

  return TaskData(
      name=spec.name, kind="regression" if spec.is_regression else "classification",
      num_labels=spec.num_labels, train=arrays[spec.train_split],
      evals={s: arrays[s] for s in spec.dev_splits}, score=score)


def run(config: ml_collections.ConfigDict, task_dir: str,
        load: Callable[[], Pretrained], name: str | None = None) -> dict[str, Any]:
  """Fine-tunes GLUE task `name` (default config.task) into task_dir; dev metrics."""
  spec = glue.get_task(name or config.task)
  examples = read(config, spec.name)
  kind = "regression" if spec.is_regression else "classification"
  model_cfg, tokenizer, pre = prepare_task_dir(config, task_dir, spec.name, kind,
                                                        spec.num_labels, load)
  data = encode(config, spec.name, examples, tokenizer)
  return run_task(config, task_dir, data, model_cfg, pre)


def suite_tasks(config: ml_collections.ConfigDict) -> list[str]:
  """config.tasks as task names in table order; 'all_glue' = every task present."""
  order = [c[0] for c in COLUMNS]
  if config.tasks != "all_glue":
    names = {n.strip() for n in config.tasks.split(",") if n.strip()}
    return [n for n in order if n in names]
  if config.data.source == "files":
    root = os.path.expanduser(config.data.data_dir)
    found = [n for n in order
             if os.path.isfile(os.path.join(root, glue.TASKS[n].dir_name, "train.tsv"))]
    where = f"{root} (expected e.g. {os.path.join(root, 'SST-2', 'train.tsv')})"
  else:
    root = os.path.expanduser(config.data.data_dir or os.environ.get(
        "TFDS_DATA_DIR", os.path.join("~", "tensorflow_datasets")))
    found = [n for n in order if os.path.isdir(os.path.join(root, "glue", n))]
    where = f"TFDS data_dir {root} (expected e.g. {os.path.join(root, 'glue', 'sst2')})"
  if not found:
    raise FileNotFoundError(f"no GLUE task found in {where}")
  return found


def _cells(name: str, result: dict[str, Any]) -> tuple[str, list[float]]:
  metric = {c[0]: c[2] for c in COLUMNS}[name]
  values = [100.0 * result[s][metric] for s in glue.TASKS[name].dev_splits]
  return "/".join(f"{v:.1f}" for v in values), values


def markdown_table(model: str, results: dict[str, dict[str, Any]]) -> tuple[str, float]:
  """The paper's layout for the tasks in `results`; returns (table, Avg)."""
  titles, cells, numbers = [], [], []
  for name, title, _ in COLUMNS:
    if name in results:
      text, values = _cells(name, results[name])
      titles.append(title)
      cells.append(text)
      numbers.extend(values)
  avg = float(np.mean(numbers))
  header = ["Model", *titles, "Avg"]
  rows = [header, ["---"] * len(header), [model, *cells, f"{avg:.1f}"]]
  return "\n".join("| " + " | ".join(r) + " |" for r in rows), avg


def run_suite(config: ml_collections.ConfigDict, workdir: str,
              load: Callable[[], Pretrained]) -> dict[str, Any]:
  """Every task of config.tasks in turn (each resumable in WORKDIR/<task>); prints the table."""
  names = suite_tasks(config)
  for name in names:  # every data file is checked before the first (long) fine-tune starts
    read(config, name)
  results = {name: run(config, os.path.join(workdir, name), load, name) for name in names}
  model = os.path.basename(os.path.normpath(config.init.pretrained))
  table, avg = markdown_table(model, results)
  print(table, flush=True)
  summary = {"model": model, "init": storage.absolute(config.init.pretrained), "tasks": results,
             "avg": avg}
  ckpt_lib.write_json(os.path.join(workdir, "glue_metrics.json"), summary)
  with storage.open_file(os.path.join(workdir, "glue_table.md"), "w") as f:
    f.write(table + "\n")
  return summary
