"""Documents for MLM from `config.data.source`: 'generated' | 'files' | 'tfds' (in memory).

`load_documents(data_cfg) -> (train_docs, eval_docs)`; a document is a tuple of sentences.
- generated: the embedded world corpus (corpus.py) with its own held-out documents.
- files: plain text; documents are separated by blank lines, one sentence per line.
- tfds: `tfds.data_source(tfds_name, split=...)` over a dataset the user has already prepared
  (never downloads); each example's `text_key` is a document, split into sentences at line
  breaks and sentence-final punctuation.
Sources without a held-out split hold out `eval_fraction` of their documents, chosen by a fixed
seed that does not depend on the run's seed, so runs with different seeds evaluate the same text.
The fourth source, 'prepared' (rows made by `python -m pkm_jax.data.prepare`), has no documents
to load: pipeline.py reads its rows.
"""

from __future__ import annotations

import functools
import glob
import os
import re
from typing import Any, Sequence

import numpy as np

from pkm_jax.data.corpus import Document, generate_corpus

SOURCES = ("generated", "files", "tfds", "prepared")
_HOLDOUT_SEED = 20200101
# A sentence ends at . ! ? followed by whitespace and something that can start a sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> Document:
  """Sentences of a free-text document: line breaks, then sentence-final punctuation."""
  out = []
  for line in text.splitlines():
    out.extend(s for s in (p.strip() for p in _SENTENCE_END.split(line)) if s)
  return tuple(out)


def read_text_documents(paths: Sequence[str]) -> list[Document]:
  """Blank-line separated documents, one sentence per line, from each file in order."""
  docs: list[Document] = []
  for path in paths:
    with open(path, encoding="utf-8", errors="replace") as f:
      current: list[str] = []
      for line in f:
        line = line.strip()
        if line:
          current.append(line)
        elif current:
          docs.append(tuple(current))
          current = []
      if current:  # a document never spans two files
        docs.append(tuple(current))
  return docs


def expand_files(spec: str, what: str = "data.files") -> list[str]:
  """Comma-separated paths or globs -> existing files, globs sorted, in the order given.

  `what` names the setting in error messages.
  """
  patterns = [p.strip() for p in spec.split(",") if p.strip()]
  if not patterns:
    raise ValueError(f"{what} is empty: give comma-separated paths or globs"
                     if what != "data.files" else
                     "data.source='files' needs data.files (comma-separated paths or globs)")
  paths: list[str] = []
  for pattern in patterns:
    pattern = os.path.expanduser(pattern)
    if glob.has_magic(pattern):
      matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
      if not matches:
        raise FileNotFoundError(f"{what}: no file matches {pattern!r}")
      paths.extend(matches)
    elif os.path.isfile(pattern):
      paths.append(pattern)
    else:
      raise FileNotFoundError(f"{what}: {pattern!r} does not exist or is not a file")
  return paths


def holdout_split(docs: Sequence[Document], fraction: float
                  ) -> tuple[list[Document], list[Document]]:
  """(train, held-out): round(fraction * n) documents (at least 1 if fraction > 0) held out."""
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"data.eval_fraction={fraction} must be in [0, 1)")
  n_eval = max(1, round(fraction * len(docs))) if fraction > 0 else 0
  if n_eval and len(docs) - n_eval < 1:
    raise ValueError(f"only {len(docs)} document(s): cannot hold out data.eval_fraction="
                     f"{fraction} for evaluation (separate documents with blank lines)")
  held = np.zeros(len(docs), bool)
  held[np.random.default_rng(_HOLDOUT_SEED).permutation(len(docs))[:n_eval]] = True
  return ([d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h])


def open_tfds(name: str, split: str, data_dir: str = ""):
  """`tfds.data_source` of a prepared dataset (random access, no TensorFlow, never downloads)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # slow import
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # tfds raises many types (DatasetNotFoundError, AssertionError, ...)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"TFDS dataset {name!r} split {split!r} (data_dir={data_dir or 'default'}) "
                     f"cannot be read: {first}") from e


def _tfds_documents(name: str, split: str, data_dir: str, text_key: str) -> list[Document]:
  source = open_tfds(name, split, data_dir)
  docs = []
  for i in range(len(source)):
    example: dict[str, Any] = source[i]
    if text_key not in example:
      raise ValueError(f"TFDS dataset {name!r} has no feature data.text_key={text_key!r} "
                       f"(features: {sorted(example)})")
    text = example[text_key]
    if isinstance(text, (bytes, np.bytes_)):
      text = bytes(text).decode("utf-8", errors="replace")
    doc = split_sentences(str(text))
    if doc:
      docs.append(doc)
  return docs


@functools.lru_cache(maxsize=1)  # the tokenizer and the pipeline both ask for the same corpus
def _load(source: str, files: str, tfds_name: str, tfds_split: str, tfds_eval_split: str,
          text_key: str, data_dir: str, eval_fraction: float, num_entities: int, num_docs: int,
          gen_seed: int) -> tuple[tuple[Document, ...], tuple[Document, ...]]:
  if source == "generated":
    n_eval = max(1, round(eval_fraction * num_docs)) if eval_fraction > 0 else 0
    corpus = generate_corpus(num_entities, num_docs, gen_seed, num_eval_docs=n_eval)
    return tuple(corpus.train), tuple(corpus.eval)
  if source == "files":
    paths = expand_files(files)
    docs = read_text_documents(paths)
    if not docs:
      raise ValueError(f"data.files={files!r}: the {len(paths)} file(s) hold no text")
    train, held = holdout_split(docs, eval_fraction)
    return tuple(train), tuple(held)
  if source == "tfds":
    if not tfds_name:
      raise ValueError("data.source='tfds' needs data.tfds_name")
    train = _tfds_documents(tfds_name, tfds_split, data_dir, text_key)
    if not train:
      raise ValueError(f"TFDS dataset {tfds_name!r} split {tfds_split!r} holds no text under "
                       f"data.text_key={text_key!r}")
    if tfds_eval_split:
      return tuple(train), tuple(_tfds_documents(tfds_name, tfds_eval_split, data_dir, text_key))
    train, held = holdout_split(train, eval_fraction)
    return tuple(train), tuple(held)
  if source == "prepared":
    raise ValueError("data.source='prepared' has packed rows, not documents (pipeline.py)")
  raise ValueError(f"data.source={source!r} is not one of {SOURCES}")


def load_documents(data_cfg) -> tuple[tuple[Document, ...], tuple[Document, ...]]:
  """(train documents, held-out documents) for a `config.data` ConfigDict."""
  g = data_cfg.generated
  return _load(str(data_cfg.source), str(data_cfg.files), str(data_cfg.tfds_name),
               str(data_cfg.tfds_split), str(data_cfg.tfds_eval_split), str(data_cfg.text_key),
               str(data_cfg.data_dir), float(data_cfg.eval_fraction), int(g.num_entities),
               int(g.num_docs), int(g.seed))
