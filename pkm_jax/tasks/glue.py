"""GLUE: the nine tasks, their data (official TSV files or TFDS `glue/<task>`) and encoding.

- `TASKS[name]` (`GlueTask`): text columns, labels (None = regression), metrics, splits.
- `load_glue(task, split, source='files'|'tfds', data_dir=...)` -> list of `GlueExample`.
  Files: DATA_DIR/<TaskDir>/<split>.tsv as the GLUE download script writes them (CoLA, SST-2,
  MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI; train.tsv, dev.tsv, MNLI's dev_matched.tsv and
  dev_mismatched.tsv). TFDS: a prepared `glue/<task>` read with `tfds.data_source` (no
  TensorFlow needed; never downloads). Split names of either kind work: 'dev' == 'validation',
  'dev_matched' == 'validation_matched', ...
- `encode_glue(task, examples, tokenizer, max_len)` -> numpy arrays for the model:
  [CLS] a [SEP] (b [SEP]), token types 0/1, longest-first truncation, [PAD] padding.
Labels are class indices in TFDS's class order, so both sources give the same examples.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np
from tokenizers import Tokenizer

from pkm_jax.data.sources import open_tfds
from pkm_jax.data.tokenizer import special_token_ids
from pkm_jax.tasks.task_metrics import GLUE_TASK_METRICS


@dataclasses.dataclass(frozen=True)
class GlueExample:
  text_a: str
  text_b: str | None
  label: int | float  # class index, or the similarity score for STS-B
  guid: str  # "<task>-<split>-<row>": row counts data rows from 0 (TFDS's `idx`)


@dataclasses.dataclass(frozen=True)
class GlueTask:
  """One GLUE task: where its text and label live in the TSV files and in TFDS."""
  name: str
  dir_name: str  # folder under the GLUE data dir
  text_columns: tuple[str, ...]  # TSV header names of text_a (, text_b)
  tfds_features: tuple[str, ...]  # TFDS feature names of text_a (, text_b)
  label_column: str
  labels: tuple[str, ...] | None  # class names in TFDS order; None = regression
  file_labels: tuple[str, ...] | None  # how class i is written in the TSV files
  header: tuple[str, ...] | None = None  # column names of header-less files (CoLA)
  dev_splits: tuple[str, ...] = ("dev",)
  train_split: str = "train"
  skip_malformed: bool = False  # QQP's files hold rows with missing fields

  @property
  def is_regression(self) -> bool:
    return self.labels is None

  @property
  def num_labels(self) -> int:
    return 1 if self.labels is None else len(self.labels)

  @property
  def is_pair(self) -> bool:
    return len(self.text_columns) == 2

  @property
  def metrics(self) -> tuple[str, ...]:
    return GLUE_TASK_METRICS[self.name]


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
TASKS: dict[str, GlueTask] = {t.name: t for t in (
    GlueTask("cola", "CoLA", ("sentence",), ("sentence",), "label",
             ("unacceptable", "acceptable"), _BINARY,
             header=("source", "label", "original_label", "sentence")),
    GlueTask("sst2", "SST-2", ("sentence",), ("sentence",), "label",
             ("negative", "positive"), _BINARY),
    GlueTask("mrpc", "MRPC", ("#1 String", "#2 String"), ("sentence1", "sentence2"), "Quality",
             ("not_equivalent", "equivalent"), _BINARY),
    GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score",
             None, None),
    GlueTask("qqp", "QQP", ("question1", "question2"), ("question1", "question2"),
             "is_duplicate", ("not_duplicate", "duplicate"), _BINARY, skip_malformed=True),
    GlueTask("mnli", "MNLI", ("sentence1", "sentence2"), ("premise", "hypothesis"), "gold_label",
             ("entailment", "neutral", "contradiction"),
             ("entailment", "neutral", "contradiction"),
             dev_splits=("dev_matched", "dev_mismatched")),
    GlueTask("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label",
             _NLI2, _NLI2),
    GlueTask("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
             _NLI2, _NLI2),
    GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
             ("not_entailment", "entailment"), _BINARY),
)}

# File split name <-> TFDS split name.
_TFDS_SPLITS = {"train": "train", "dev": "validation", "dev_matched": "validation_matched",
                "dev_mismatched": "validation_mismatched"}
_FILE_SPLITS = {v: k for k, v in _TFDS_SPLITS.items()}


def get_task(task: str | GlueTask) -> GlueTask:
  if isinstance(task, GlueTask):
    return task
  if task not in TASKS:
    raise ValueError(f"unknown GLUE task {task!r}; known: {', '.join(TASKS)}")
  return TASKS[task]


def _file_split(spec: GlueTask, split: str) -> str:
  """'validation_matched' -> 'dev_matched'; checks the split exists for the task."""
  name = _FILE_SPLITS.get(split, split)
  if name not in (spec.train_split, *spec.dev_splits):
    choices = [s for k in (spec.train_split, *spec.dev_splits) for s in (k, _TFDS_SPLITS[k])]
    raise ValueError(f"GLUE {spec.name} has no split {split!r}; choose from {choices}")
  return name


def _parse_label(spec: GlueTask, text: str) -> int | float | None:
  """The label as written in a TSV field -> class index / score; None if it is not valid."""
  if spec.file_labels is None:
    try:
      value = float(text)
    except ValueError:
      return None
    return value if np.isfinite(value) else None
  try:
    return spec.file_labels.index(text.strip())
  except ValueError:
    return None


def read_glue_tsv(task: str | GlueTask, path: str, split: str = "train") -> list[GlueExample]:
  """A GLUE train/dev TSV (tab-separated, no quoting) -> examples.

  Every row must have as many fields as the header and a valid label; QQP skips rows that do
  not (its official files hold some), every other task raises naming the line.
  """
  spec = get_task(task)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GLUE {spec.name}: {path} not found")
  with open(path, encoding="utf-8-sig", newline="") as f:
    # Rows end at "\n" (or "\r\n") only: a stray "\r" inside a sentence is text, not a row end.
    lines = [line.removesuffix("\r") for line in f.read().split("\n")]
  if spec.header is None:
    if not lines or not lines[0].strip():
      raise ValueError(f"GLUE {spec.name}: {path} is empty (expected a header line)")
    header, first = tuple(lines[0].split("\t")), 1
  else:
    header, first = spec.header, 0
  columns = []
  for name in (*spec.text_columns, spec.label_column):
    if name not in header:
      raise ValueError(f"GLUE {spec.name}: {path} has no column {name!r} (header: "
                       f"{list(header)})")
    columns.append(header.index(name))
  examples, row = [], -1
  for line_no, line in enumerate(lines[first:], start=first + 1):
    if not line:
      continue  # a blank line is no row (csv readers skip them too)
    row += 1  # counts skipped rows too, as TFDS's idx does
    fields = line.split("\t")
    label = _parse_label(spec, fields[columns[-1]]) if len(fields) == len(header) else None
    if label is None:
      if spec.skip_malformed:
        continue
      problem = (f"expected {len(header)} columns, got {len(fields)}" if len(fields) != len(header)
                 else f"invalid label {fields[columns[-1]]!r} (expected "
                      f"{'a number' if spec.file_labels is None else list(spec.file_labels)})")
      raise ValueError(f"GLUE {spec.name}: {path} line {line_no}: {problem}")
    texts = [fields[c] for c in columns[:-1]]
    examples.append(GlueExample(texts[0], texts[1] if spec.is_pair else None, label,
                                f"{spec.name}-{split}-{row}"))
  if not examples:
    raise ValueError(f"GLUE {spec.name}: {path} holds no examples")
  return examples


def read_glue_files(task: str | GlueTask, split: str, data_dir: str) -> list[GlueExample]:
  """Examples of DATA_DIR/<TaskDir>/<split>.tsv (GLUE download-script layout)."""
  spec = get_task(task)
  split = _file_split(spec, split)
  path = os.path.join(os.path.expanduser(data_dir), spec.dir_name, f"{split}.tsv")
  return read_glue_tsv(spec, path, split)


def _text(value: Any) -> str:
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  return str(value)


def read_glue_tfds(task: str | GlueTask, split: str, data_dir: str | None = None
                   ) -> list[GlueExample]:
  """Examples of a prepared TFDS `glue/<task>` split (read with tfds.data_source)."""
  spec = get_task(task)
  split = _file_split(spec, split)
  tfds_split = _TFDS_SPLITS[split]
  # Without TensorFlow tfds does not register this builder by itself.
  import tensorflow_datasets.text.glue  # noqa: F401  pylint: disable=g-import-not-at-top
  name = f"glue/{spec.name}"
  source = open_tfds(name, tfds_split, data_dir)
  examples = []
  for i in range(len(source)):
    row: dict[str, Any] = source[i]
    missing = [k for k in (*spec.tfds_features, "label") if k not in row]
    if missing:
      raise ValueError(f"TFDS {name!r} lacks feature(s) {missing} (has {sorted(row)})")
    texts = [_text(row[k]) for k in spec.tfds_features]
    label = float(row["label"]) if spec.is_regression else int(row["label"])
    if not spec.is_regression and not 0 <= label < spec.num_labels:
      raise ValueError(f"TFDS {name!r} split {tfds_split!r} example {i}: label {label} is not "
                       f"a class of {spec.labels} (test splits have no labels)")
    idx = int(row["idx"]) if "idx" in row else i
    examples.append(GlueExample(texts[0], texts[1] if spec.is_pair else None, label,
                                f"{spec.name}-{split}-{idx}"))
  if not examples:
    raise ValueError(f"TFDS {name!r} split {tfds_split!r} holds no examples")
  return examples


def load_glue(task: str | GlueTask, split: str, *, source: str = "files", data_dir: str = ""
              ) -> list[GlueExample]:
  """Examples of one split from 'files' (DATA_DIR/<TaskDir>/*.tsv) or 'tfds' (glue/<task>)."""
  if source == "files":
    if not data_dir:
      raise ValueError("GLUE source='files' needs data_dir (the folder holding CoLA/, SST-2/, ...)")
    return read_glue_files(task, split, data_dir)
  if source == "tfds":
    return read_glue_tfds(task, split, data_dir or None)
  raise ValueError(f"GLUE source={source!r} is not one of ('files', 'tfds')")


# -------------------------------------------------------------------------------------- encoding
def bare_tokenizer(tokenizer: Tokenizer) -> tuple[Tokenizer, dict[str, int]]:
  """A copy that encodes text alone (no padding/truncation), and its special token ids.

  Callers encode with add_special_tokens=False and place [CLS]/[SEP] themselves, so whatever
  post-processor, padding or truncation the given tokenizer carries cannot change the layout.
  """
  tok = Tokenizer.from_str(tokenizer.to_str())
  tok.no_padding()
  tok.no_truncation()
  return tok, special_token_ids(tok)


def truncate_pair(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
  """(kept a, kept b) under longest-first truncation to `budget` tokens.

  As BERT's _truncate_seq_pair: pop a token from the longer sequence until the pair fits, from b
  on ties.
  """
  if len_a + len_b <= budget:
    return len_a, len_b
  short = min(len_a, len_b)
  if 2 * short <= budget:  # only the longer one is cut
    return (budget - short, short) if len_a > len_b else (short, budget - short)
  return (budget + 1) // 2, budget // 2  # both cut to halves; ties pop b, so a keeps the odd one


def encode_glue(task: str | GlueTask, examples: Sequence[GlueExample], tokenizer: Tokenizer,
                max_len: int) -> dict[str, np.ndarray]:
  """Examples -> {input_ids, attention_mask, token_type_ids [N, max_len] int32, labels [N]}.

  labels: int32 class indices, float32 scores for regression (STS-B).
  """
  spec = get_task(task)
  n_special = 3 if spec.is_pair else 2
  if max_len <= n_special:
    raise ValueError(f"max_len={max_len} leaves no room for text (needs > {n_special})")
  if not examples:
    raise ValueError(f"GLUE {spec.name}: no examples to encode")
  tok, ids = bare_tokenizer(tokenizer)
  enc_a = tok.encode_batch([e.text_a for e in examples], add_special_tokens=False)
  enc_b = (tok.encode_batch([e.text_b or "" for e in examples], add_special_tokens=False)
           if spec.is_pair else [None] * len(examples))
  input_ids = np.full((len(examples), max_len), ids["pad"], np.int32)
  token_type_ids = np.zeros((len(examples), max_len), np.int32)
  attention_mask = np.zeros((len(examples), max_len), np.int32)
  for i, (a, b) in enumerate(zip(enc_a, enc_b)):
    a_ids, b_ids = a.ids, (b.ids if b is not None else [])
    keep_a, keep_b = truncate_pair(len(a_ids), len(b_ids), max_len - n_special)
    row = [ids["cls"], *a_ids[:keep_a], ids["sep"]]
    n_first = len(row)
    if spec.is_pair:
      row += [*b_ids[:keep_b], ids["sep"]]
    input_ids[i, :len(row)] = row
    token_type_ids[i, n_first:len(row)] = 1
    attention_mask[i, :len(row)] = 1
  label_dtype = np.float32 if spec.is_regression else np.int32
  return {"input_ids": input_ids, "attention_mask": attention_mask,
          "token_type_ids": token_type_ids,
          "labels": np.asarray([e.label for e in examples], label_dtype)}
