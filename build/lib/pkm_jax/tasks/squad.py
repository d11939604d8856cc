"""SQuAD v1.1: reading, windowed features for a BERT span head, and span decoding.

- `load_squad(split, source='files'|'tfds', data_dir=...)`: DATA_DIR/train-v1.1.json or
  dev-v1.1.json (the official layout), or a prepared TFDS `squad/v1.1` via tfds.data_source.
- `prepare_features(examples, tokenizer, ...)`: each example becomes one or more windows
  `[CLS] question [SEP] context-window [SEP] [PAD]...` (token types 0 / 1). Contexts longer than
  the room left by the question are cut into windows that start every `doc_stride` context
  tokens (as BERT's run_squad.py). Each window labels the first gold answer's start/end token,
  or [CLS] (index 0) when the answer is not wholly inside it. Character offsets of the context
  tokens are kept so that a predicted span maps back to the exact original context text.
- `postprocess(examples, features, start_logits, end_logits)`: per example, over all of its
  windows, the best span (start <= end, at most max_answer_len tokens, both in the context)
  by start_logit + end_logit -> {qid: answer text}. `nbest_answers` gives the n best.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np
from tokenizers import Tokenizer

from pkm_jax.data.sources import open_tfds
from pkm_jax.tasks.glue import bare_tokenizer

SQUAD_FILES = {"train": "train-v1.1.json", "dev": "dev-v1.1.json"}
_TFDS_SPLITS = {"train": "train", "dev": "validation"}
_FILE_SPLITS = {v: k for k, v in _TFDS_SPLITS.items()}


@dataclasses.dataclass(frozen=True)
class SquadExample:
  qid: str
  question: str
  context: str
  answers: tuple[str, ...]  # gold answer texts (dev: usually three)
  answer_starts: tuple[int, ...]  # character offset of each answer in `context`
  title: str = ""


def _check_example(ex: SquadExample, where: str) -> None:
  if not ex.answers:
    raise ValueError(f"{where}: question {ex.qid!r} has no answer (SQuAD v1.1 needs one; "
                     f"unanswerable v2.0 questions are not supported)")
  for text, start in zip(ex.answers, ex.answer_starts):
    if not 0 <= start <= start + len(text) <= len(ex.context):
      raise ValueError(f"{where}: question {ex.qid!r}: answer {text!r} at character {start} lies "
                       f"outside its context ({len(ex.context)} characters)")


def _field(obj: Any, key: str, kind: type, where: str) -> Any:
  if not isinstance(obj, dict) or key not in obj:
    raise ValueError(f"{where} has no {key!r}")
  if not isinstance(obj[key], kind) or (kind is int and isinstance(obj[key], bool)):
    raise ValueError(f"{where}.{key} is {type(obj[key]).__name__}, expected {kind.__name__}")
  return obj[key]


def read_squad_json(path: str) -> list[SquadExample]:
  """Examples of an official SQuAD v1.1 JSON file ({"data": [{"title", "paragraphs": ...}]})."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"SQuAD: {path} not found")
  try:
    with open(path, encoding="utf-8") as f:
      dataset = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"SQuAD: {path} is not valid JSON: {e}") from e
  examples, seen = [], set()
  for i, article in enumerate(_field(dataset, "data", list, f"SQuAD: {path}: the top level")):
    title = article.get("title", "") if isinstance(article, dict) else ""
    for j, para in enumerate(_field(article, "paragraphs", list, f"SQuAD: {path}: data[{i}]")):
      where = f"SQuAD: {path}: data[{i}].paragraphs[{j}]"
      context = _field(para, "context", str, where)
      for k, qa in enumerate(_field(para, "qas", list, where)):
        q_where = f"{where}.qas[{k}]"
        qid = _field(qa, "id", str, q_where)
        if qid in seen:
          raise ValueError(f"{q_where}: question id {qid!r} appears twice")
        seen.add(qid)
        answers = _field(qa, "answers", list, q_where)
        texts = tuple(_field(a, "text", str, f"{q_where}.answers[{n}]")
                      for n, a in enumerate(answers))
        starts = tuple(_field(a, "answer_start", int, f"{q_where}.answers[{n}]")
                       for n, a in enumerate(answers))
        ex = SquadExample(qid, _field(qa, "question", str, q_where), context, texts, starts,
                          str(title))
        _check_example(ex, q_where)
        examples.append(ex)
  if not examples:
    raise ValueError(f"SQuAD: {path} holds no questions")
  return examples


def _text(value: Any) -> str:
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  return str(value)


def read_squad_tfds(split: str, data_dir: str | None = None) -> list[SquadExample]:
  """Examples of a prepared TFDS `squad/v1.1` split ('train' | 'validation')."""
  tfds_split = _TFDS_SPLITS.get(split, split)
  if tfds_split not in _FILE_SPLITS:
    raise ValueError(f"SQuAD has no split {split!r}; choose from "
                     f"{[*_TFDS_SPLITS, *_FILE_SPLITS]}")
  # Without TensorFlow tfds does not register this builder by itself.
  import tensorflow_datasets.question_answering.squad  # noqa: F401  pylint: disable=g-import-not-at-top
  name = "squad/v1.1"
  source = open_tfds(name, tfds_split, data_dir)
  examples = []
  for i in range(len(source)):
    row: dict[str, Any] = source[i]
    missing = [k for k in ("id", "question", "context", "answers") if k not in row]
    if missing:
      raise ValueError(f"TFDS {name!r} lacks feature(s) {missing} (has {sorted(row)})")
    texts = tuple(_text(t) for t in np.asarray(row["answers"]["text"]).reshape(-1))
    starts = tuple(int(s) for s in np.asarray(row["answers"]["answer_start"]).reshape(-1))
    if len(texts) != len(starts):
      raise ValueError(f"TFDS {name!r} example {i}: {len(texts)} answer texts but "
                       f"{len(starts)} answer starts")
    ex = SquadExample(_text(row["id"]), _text(row["question"]), _text(row["context"]), texts,
                      starts, _text(row.get("title", "")))
    _check_example(ex, f"TFDS {name!r} split {tfds_split!r} example {i}")
    examples.append(ex)
  if not examples:
    raise ValueError(f"TFDS {name!r} split {tfds_split!r} holds no examples")
  return examples


def load_squad(split: str, *, source: str = "files", data_dir: str = "") -> list[SquadExample]:
  """'train' | 'dev' (or 'validation') examples from 'files' (DATA_DIR/*-v1.1.json) or 'tfds'."""
  if source == "files":
    name = _FILE_SPLITS.get(split, split)
    if name not in SQUAD_FILES:
      raise ValueError(f"SQuAD has no split {split!r}; choose from {list(SQUAD_FILES)}")
    if not data_dir:
      raise ValueError("SQuAD source='files' needs data_dir (the folder holding "
                       f"{SQUAD_FILES[name]})")
    return read_squad_json(os.path.join(os.path.expanduser(data_dir), SQUAD_FILES[name]))
  if source == "tfds":
    return read_squad_tfds(split, data_dir or None)
  raise ValueError(f"SQuAD source={source!r} is not one of ('files', 'tfds')")


def gold_answers(examples: Sequence[SquadExample]) -> dict[str, list[str]]:
  """{qid: gold answer texts}, the input of metrics.squad_metrics."""
  return {ex.qid: list(ex.answers) for ex in examples}


# -------------------------------------------------------------------------------------- features
@dataclasses.dataclass(frozen=True, eq=False)
class SquadFeatures:
  """F windows of T tokens; offsets are (-1, -1) outside the context."""
  input_ids: np.ndarray  # [F, T] int32
  attention_mask: np.ndarray  # [F, T] int32
  token_type_ids: np.ndarray  # [F, T] int32
  start_positions: np.ndarray  # [F] int32, 0 ([CLS]) when the answer is not in the window
  end_positions: np.ndarray  # [F] int32
  example_index: np.ndarray  # [F] int32, index of the window's example
  offsets: np.ndarray  # [F, T, 2] int32, character span [start, end) of a context token

  def __len__(self) -> int:
    return self.input_ids.shape[0]

  def arrays(self) -> dict[str, np.ndarray]:
    """The model's inputs and span labels."""
    return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
            "token_type_ids": self.token_type_ids, "start_positions": self.start_positions,
            "end_positions": self.end_positions}


def window_starts(n_tokens: int, window: int, stride: int) -> list[int]:
  """First context token of each window: every `stride` tokens until one reaches the end."""
  starts = [0]
  while starts[-1] + window < n_tokens:
    starts.append(starts[-1] + min(stride, window))
  return starts


def _answer_tokens(offsets_Nx2: np.ndarray, start_char: int, end_char: int) -> tuple[int, int]:
  """Context-token span [first, last] of a character span; first > last if it holds no token.

  first = the first token ending after start_char, last = the last token starting before
  end_char, so white space at either end of the answer is dropped, not widened into a word.
  """
  first = int(np.searchsorted(offsets_Nx2[:, 1], start_char, side="right"))
  last = int(np.searchsorted(offsets_Nx2[:, 0], end_char, side="left")) - 1
  return first, last


def prepare_features(examples: Sequence[SquadExample], tokenizer: Tokenizer, *,
                     max_seq_len: int = 384, max_query_len: int = 64, doc_stride: int = 128
                     ) -> SquadFeatures:
  """Examples -> windows of `max_seq_len` tokens (see the module docstring)."""
  if max_seq_len - max_query_len - 3 < 1:
    raise ValueError(f"max_seq_len={max_seq_len} leaves no room for context after a question of "
                     f"max_query_len={max_query_len} tokens and 3 special tokens")
  if max_query_len < 1 or doc_stride < 1:
    raise ValueError(f"max_query_len={max_query_len} and doc_stride={doc_stride} must be >= 1")
  if not examples:
    raise ValueError("SQuAD: no examples to prepare")
  tok, special = bare_tokenizer(tokenizer)
  cls_id, sep_id, pad_id = special["cls"], special["sep"], special["pad"]
  questions = tok.encode_batch([ex.question for ex in examples], add_special_tokens=False)
  # Questions share paragraphs (about 5 per context in SQuAD): tokenise each context once.
  contexts = list(dict.fromkeys(ex.context for ex in examples))
  encoded = dict(zip(contexts, tok.encode_batch(contexts, add_special_tokens=False)))

  rows: list[tuple[list[int], int, np.ndarray, int, int, int]] = []
  for e, (ex, q) in enumerate(zip(examples, questions)):
    q_ids = q.ids[:max_query_len]
    c = encoded[ex.context]
    c_ids = np.asarray(c.ids, np.int32)
    c_offsets = np.asarray(c.offsets, np.int32).reshape(-1, 2)
    start_char = ex.answer_starts[0] if ex.answers else 0
    end_char = start_char + len(ex.answers[0]) if ex.answers else 0
    first, last = _answer_tokens(c_offsets, start_char, end_char)
    room = max_seq_len - len(q_ids) - 3
    ctx_at = len(q_ids) + 2  # position of the first context token
    for s in window_starts(len(c_ids), room, doc_stride):
      n = min(room, len(c_ids) - s)
      ids = [cls_id, *q_ids, sep_id, *c_ids[s:s + n].tolist(), sep_id]
      if ex.answers and first <= last and s <= first and last < s + n:
        start_pos, end_pos = first - s + ctx_at, last - s + ctx_at
      else:
        start_pos = end_pos = 0
      rows.append((ids, ctx_at, c_offsets[s:s + n], start_pos, end_pos, e))

  num = len(rows)
  input_ids = np.full((num, max_seq_len), pad_id, np.int32)
  token_type_ids = np.zeros((num, max_seq_len), np.int32)
  attention_mask = np.zeros((num, max_seq_len), np.int32)
  offsets = np.full((num, max_seq_len, 2), -1, np.int32)
  for f, (ids, ctx_at, offs, _, _, _) in enumerate(rows):
    input_ids[f, :len(ids)] = ids
    attention_mask[f, :len(ids)] = 1
    token_type_ids[f, ctx_at:len(ids)] = 1
    offsets[f, ctx_at:ctx_at + len(offs)] = offs
  column = lambda i: np.asarray([r[i] for r in rows], np.int32)  # noqa: E731
  return SquadFeatures(input_ids, attention_mask, token_type_ids, column(3), column(4),
                       column(5), offsets)


# ------------------------------------------------------------------------------- post-processing
def _window_spans(start_T: np.ndarray, end_T: np.ndarray, context: np.ndarray,
                  max_answer_len: int, n_best: int) -> list[tuple[float, int, int]]:
  """The n best (score, start, end) token spans of one window, inside its context tokens."""
  positions = np.flatnonzero(context)
  if positions.size == 0:
    return []
  lo, hi = positions[0], positions[-1] + 1  # context tokens are contiguous
  s, e = start_T[lo:hi].astype(np.float64), end_T[lo:hi].astype(np.float64)
  width = min(max_answer_len, hi - lo)
  # score_LxW[i, d] = start[i] + end[i + d]: every span of at most `width` tokens, exactly.
  e_padded = np.concatenate([e, np.full(width - 1, -np.inf)])
  score_LxW = s[:, None] + np.lib.stride_tricks.sliding_window_view(e_padded, width)
  flat = score_LxW.reshape(-1)
  k = min(n_best, flat.size)
  best = np.argpartition(-flat, k - 1)[:k]
  return [(float(flat[b]), lo + b // width, lo + b // width + b % width)
          for b in best if np.isfinite(flat[b])]


def nbest_answers(examples: Sequence[SquadExample], features: SquadFeatures, start_logits,
                  end_logits, *, n_best_size: int = 20, max_answer_len: int = 30
                  ) -> dict[str, list[tuple[str, float]]]:
  """{qid: up to n_best_size (text, start_logit + end_logit), best first, distinct texts}.

  Each window contributes its n best valid spans, searched exhaustively (BERT's run_squad.py
  pairs only the top-n starts with the top-n ends), so the first answer is exactly the best
  valid span over all windows. Ties go to the earlier window, then start, then end.
  """
  start_FxT, end_FxT = np.asarray(start_logits), np.asarray(end_logits)
  if start_FxT.shape != features.input_ids.shape or end_FxT.shape != start_FxT.shape:
    raise ValueError(f"SQuAD logits of shapes {start_FxT.shape} and {end_FxT.shape} do not match "
                     f"the features' {features.input_ids.shape}")
  if max_answer_len < 1 or n_best_size < 1:
    raise ValueError(f"max_answer_len={max_answer_len} and n_best_size={n_best_size} must be >= 1")
  candidates: list[list[tuple[float, int, int, int]]] = [[] for _ in examples]
  for f in range(len(features)):
    ex = int(features.example_index[f])
    if not 0 <= ex < len(examples):
      raise ValueError(f"SQuAD feature {f} refers to example {ex} of {len(examples)}")
    context_T = features.offsets[f, :, 0] >= 0
    for score, s, e in _window_spans(start_FxT[f], end_FxT[f], context_T, max_answer_len,
                                     n_best_size):
      candidates[ex].append((score, f, s, e))
  out = {}
  for ex, cands in zip(examples, candidates):
    cands.sort(key=lambda c: (-c[0], c[1], c[2], c[3]))
    texts: dict[str, float] = {}
    for score, f, s, e in cands:
      text = ex.context[features.offsets[f, s, 0]:features.offsets[f, e, 1]]
      if text not in texts:
        texts[text] = score
        if len(texts) == n_best_size:
          break
    out[ex.qid] = list(texts.items())
  return out


def postprocess(examples: Sequence[SquadExample], features: SquadFeatures, start_logits,
                end_logits, *, n_best_size: int = 20, max_answer_len: int = 30
                ) -> dict[str, str]:
  """{qid: best answer text}; logits [F, T] over the features' windows ('' if no span fits)."""
  nbest = nbest_answers(examples, features, start_logits, end_logits, n_best_size=n_best_size,
                        max_answer_len=max_answer_len)
  return {qid: (spans[0][0] if spans else "") for qid, spans in nbest.items()}
