"""FULL-SENTENCES packing (RoBERTa, Liu et al. 2019): sentences -> `[CLS] ... [SEP]` rows.

Whole sentences fill rows of at most `max_len` tokens; a row may continue into the next
document, with a [SEP] between the two; a sentence longer than `max_len - 2` tokens is cut into
full pieces, its rest starting a new row. Every sentence token appears exactly once, in order.

- `pack_sequences(docs_ids, max_len, ...)`: the whole corpus at once (nested lists), the
  reference that the in-memory sources use.
- `RowPacker`: the same rows from a stream of (sentence lengths, concatenated ids) chunks, in
  memory bounded by one chunk, for `python -m pkm_jax.data.prepare`. Length -1 in a chunk marks
  a document boundary.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

BOUNDARY = -1  # a "sentence length" that ends the current document


def _check_len(max_len: int) -> None:
  if max_len < 3:
    raise ValueError(f"data.max_len={max_len} must be at least 3 ([CLS] token [SEP])")


def pack_sequences(docs_ids: Sequence[Sequence[Sequence[int]]], max_len: int, *, cls_id: int,
                   sep_id: int, pad_id: int) -> np.ndarray:
  """Sentences -> [N, max_len] int32 rows `[CLS] s1 s2 [SEP] s3 ... [SEP] [PAD] ...`.

  A [SEP] separates documents that share a row. Every sentence token appears exactly once,
  in corpus order.
  """
  _check_len(max_len)
  cap = max_len - 2
  rows: list[list[int]] = []
  current: list[int] = []
  for doc in docs_ids:
    new_doc = True
    for sent in doc:
      if not sent:
        continue
      sep = [sep_id] if new_doc and current else []
      if len(current) + len(sep) + len(sent) <= cap:
        current += sep + list(sent)
      else:
        if current:
          rows.append(current)
        for start in range(0, len(sent) - cap, cap):  # over-long sentence: full pieces
          rows.append(list(sent[start:start + cap]))
        current = list(sent[(len(sent) - 1) // cap * cap:])  # the rest starts a new row
      new_doc = False
  if current:
    rows.append(current)
  out_NxT = np.full((len(rows), max_len), pad_id, np.int32)
  for i, row in enumerate(rows):
    out_NxT[i, :len(row) + 2] = [cls_id, *row, sep_id]
  return out_NxT


class RowPacker:
  """Streaming `pack_sequences`: feed chunks with `add`, then `finish`; rows come out in order.

  The state between chunks is the unfinished row and whether the next sentence starts a new
  document, so the rows do not depend on where the stream was cut into chunks.
  """

  def __init__(self, max_len: int, *, cls_id: int, sep_id: int, pad_id: int):
    _check_len(max_len)
    self.max_len, self.cap = max_len, max_len - 2
    self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id
    self._row = np.empty(self.cap, np.int32)
    self._fill = 0
    self._new_doc = True
    self.rows_out = 0

  def add(self, lens_S: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Sentence lengths [S] (BOUNDARY between documents) and their ids -> finished rows [n, T]."""
    lens = np.asarray(lens_S, np.int64)
    ids = np.asarray(ids, np.int32)
    starts = np.concatenate([[0], np.cumsum(np.maximum(lens, 0))]).tolist()
    if starts[-1] != len(ids):
      raise ValueError(f"sentence lengths sum to {starts[-1]} but {len(ids)} ids were given")
    # Upper bound on rows: one per sentence (the row it closes) plus the pieces of long ones.
    out_NxT = np.full((len(lens) + len(ids) // self.cap + 1, self.max_len), self.pad_id,
                      np.int32)
    n = 0
    cap, row, fill, new_doc = self.cap, self._row, self._fill, self._new_doc

    def emit(content: np.ndarray) -> None:
      nonlocal n
      out_NxT[n, 0] = self.cls_id
      out_NxT[n, 1:1 + len(content)] = content
      out_NxT[n, 1 + len(content)] = self.sep_id
      n += 1

    for i, length in enumerate(lens.tolist()):  # Python ints: a few operations per sentence
      if length == BOUNDARY:
        new_doc = True
        continue
      if length == 0:
        continue
      a = starts[i]
      sep = 1 if new_doc and fill else 0
      if fill + sep + length <= cap:
        if sep:
          row[fill] = self.sep_id
        row[fill + sep:fill + sep + length] = ids[a:a + length]
        fill += sep + length
      else:
        if fill:
          emit(row[:fill])
        for start in range(0, length - cap, cap):  # over-long sentence: full pieces
          emit(ids[a + start:a + start + cap])
        rest = (length - 1) // cap * cap
        fill = length - rest
        row[:fill] = ids[a + rest:a + length]
      new_doc = False
    self._fill, self._new_doc = fill, new_doc
    self.rows_out += n
    return out_NxT[:n]

  def finish(self) -> np.ndarray:
    """The last, unfinished row ([0 or 1, T]); the packer is empty afterwards."""
    out_NxT = np.full((1 if self._fill else 0, self.max_len), self.pad_id, np.int32)
    if self._fill:
      out_NxT[0, 0], out_NxT[0, self._fill + 1] = self.cls_id, self.sep_id
      out_NxT[0, 1:self._fill + 1] = self._row[:self._fill]
    self.rows_out += len(out_NxT)
    self._fill, self._new_doc = 0, True
    return out_NxT
