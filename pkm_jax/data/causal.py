"""Causal-LM data: documents -> one token stream with EOS after each document -> rows of
max_len -> next-token batches.

Packing (`CausalPacker`, the same code for the in-memory sources, `data.eval_files` and
`python -m pkm_jax.data.prepare`): a document's ids are its sentences' ids with the ids of "\n"
between them (exactly the ids of the document's text, lines joined by newlines, for byte-level
BPE tokenizers -- GPT-2, Llama 3, Qwen2 and the one trained here -- whose pre-tokeniser always
splits at a newline; an approximation for SentencePiece-style ones), preceded by BOS when the
tokenizer has a BOS distinct from its EOS (Llama 2, Mistral: their models saw `<s>` at every
start; GPT-2 and Qwen2 have none) and followed by EOS. No [CLS]/[SEP]. The documents' streams
are concatenated and cut into rows of exactly max_len tokens; only the very last row is padded.
A last row of one token is dropped: a lone token has no next token to predict.

A row is stored as its ids alone (one int32 row in ArrayRows, the prepared ArrayRecord rows
unchanged); everything else is recomputed from the EOS tokens when the batch is made
(`clm_batch`): per-row `segment_ids` (1, 2, ... per document piece, 0 padding), `positions`
(restarting at 0 at each piece: a document continued from the previous row restarts too),
`targets` (the next token) and `target_weights` (1 where that next token is a real token of
the same piece: the EOS is a target, the token after an EOS is not, nor is the next row's first
token -- each row predicts at most max_len - 1 tokens, as Hugging Face's run_clm blocks do).
The attention never crosses a document (the models' segment_ids).

Padding when the tokenizer has no pad token of its own (GPT-2 pads with its EOS): padding is
only ever a run at the end of the last row, real rows never hold two EOS in a row (empty
documents are skipped), so the first EOS of a row's trailing EOS run is real and the rest is
padding; an all-EOS row is all padding (the rows the evaluation batches are filled up with).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pkm_jax.data.packing import BOUNDARY

Batch = dict[str, np.ndarray]
CLM_BATCH_KEYS = ("input_ids", "attention_mask", "segment_ids", "positions", "targets",
                  "target_weights")


class CausalPacker:
  """(sentence lengths with BOUNDARY between documents, ids) chunks -> rows [n, max_len].

  The state between chunks is the unfinished row and whether a document is open, so the rows
  do not depend on where the stream was cut into chunks.
  """

  def __init__(self, max_len: int, *, eos_id: int, pad_id: int, bos_id: int | None = None,
               newline_ids: Sequence[int] = ()):
    if max_len < 2:
      raise ValueError(f"data.max_len={max_len} must be at least 2 (a token and the next)")
    self.max_len, self.eos_id, self.pad_id = int(max_len), int(eos_id), int(pad_id)
    self.bos = np.asarray([] if bos_id is None or bos_id == eos_id else [bos_id], np.int32)
    self.newline = np.asarray(list(newline_ids), np.int32)
    self._rest = np.zeros(0, np.int32)  # < max_len tokens not yet in a row
    self._open = False  # a document has tokens and no EOS yet
    self.rows_out = 0

  def _stream(self, lens_S: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """This chunk's part of the token stream (BOS, newlines and EOS inserted)."""
    lens = np.asarray(lens_S, np.int64)
    ids = np.asarray(ids, np.int32)
    starts = np.concatenate([[0], np.cumsum(np.maximum(lens, 0))]).tolist()
    if starts[-1] != len(ids):
      raise ValueError(f"sentence lengths sum to {starts[-1]} but {len(ids)} ids were given")
    eos = np.asarray([self.eos_id], np.int32)
    pieces, is_open = [], self._open
    for i, length in enumerate(lens.tolist()):  # Python ints: a few operations per sentence
      if length == BOUNDARY:
        if is_open:
          pieces.append(eos)
        is_open = False
        continue
      if length == 0:  # nothing to add: an empty document stays absent
        continue
      pieces.append(self.newline if is_open else self.bos)
      pieces.append(ids[starts[i]:starts[i] + length])
      is_open = True
    self._open = is_open
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)

  def add(self, lens_S: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Sentence lengths [S] (BOUNDARY between documents) and their ids -> finished rows [n, T]."""
    stream = np.concatenate([self._rest, self._stream(lens_S, ids)])
    n = len(stream) // self.max_len
    self._rest = stream[n * self.max_len:]
    self.rows_out += n
    return stream[:n * self.max_len].reshape(n, self.max_len)

  def finish(self) -> np.ndarray:
    """The last row ([0 or 1, T], padded): an open document is ended first. Empty afterwards."""
    rest = np.concatenate([self._rest, [self.eos_id] if self._open else []]).astype(np.int32)
    self._rest, self._open = np.zeros(0, np.int32), False
    out_NxT = np.full((1 if len(rest) >= 2 else 0, self.max_len), self.pad_id, np.int32)
    if len(out_NxT):
      out_NxT[0, :len(rest)] = rest
    self.rows_out += len(out_NxT)
    return out_NxT


def pack_causal(docs_ids: Sequence[Sequence[Sequence[int]]], max_len: int, *, eos_id: int,
                pad_id: int, bos_id: int | None = None, newline_ids: Sequence[int] = ()
                ) -> np.ndarray:
  """Documents of sentences' ids (nested lists) -> [N, max_len] int32 rows (`CausalPacker`)."""
  lens, flat = [], []
  for doc in docs_ids:
    for sent in doc:
      lens.append(len(sent))
      flat.extend(sent)
    lens.append(BOUNDARY)
  packer = CausalPacker(max_len, eos_id=eos_id, pad_id=pad_id, bos_id=bos_id,
                        newline_ids=newline_ids)
  rows = packer.add(np.asarray(lens, np.int64), np.asarray(flat, np.int32))
  return np.concatenate([rows, packer.finish()])


def real_tokens(ids_BxT: np.ndarray, *, eos_id: int, pad_id: int) -> np.ndarray:
  """[B, T] bool: the rows' real tokens (not padding); see the module docstring for pad = EOS."""
  ids_BxT = np.asarray(ids_BxT)
  if pad_id != eos_id:
    return ids_BxT != pad_id
  b, t = ids_BxT.shape
  trailing_B = np.argmin((ids_BxT == eos_id)[:, ::-1], axis=1)  # EOS run at the row's end
  all_eos = (ids_BxT == eos_id).all(axis=1)
  trailing_B = np.where(all_eos, t, trailing_B)
  n_real_B = np.where(all_eos, 0, np.minimum(t - trailing_B + 1, t))
  return np.arange(t)[None, :] < n_real_B[:, None]


def clm_batch(ids_BxT: np.ndarray, *, eos_id: int, pad_id: int) -> Batch:
  """Packed rows [B, T] -> the CLM batch: input_ids, attention_mask, segment_ids, positions,
  targets (int32) and target_weights (float32), all [B, T] (module docstring)."""
  ids_BxT = np.asarray(ids_BxT, np.int32)
  b, t = ids_BxT.shape
  real = real_tokens(ids_BxT, eos_id=eos_id, pad_id=pad_id)
  is_eos = (ids_BxT == eos_id) & real
  # A document's EOS belongs to it: the segment counts the EOS strictly before each token.
  seg_BxT = np.where(real, 1 + np.cumsum(is_eos, axis=1) - is_eos, 0).astype(np.int32)
  arange = np.arange(t, dtype=np.int32)
  first = real & np.concatenate([np.ones((b, 1), bool), seg_BxT[:, 1:] != seg_BxT[:, :-1]], 1)
  piece_start = np.maximum.accumulate(np.where(first, arange, 0), axis=1)
  targets = np.full_like(ids_BxT, pad_id)
  targets[:, :-1] = ids_BxT[:, 1:]
  weights = np.zeros((b, t), np.float32)
  weights[:, :-1] = real[:, 1:] & (seg_BxT[:, 1:] == seg_BxT[:, :-1])
  return {
      "input_ids": np.where(real, ids_BxT, pad_id).astype(np.int32),
      "attention_mask": real.astype(np.int32),
      "segment_ids": seg_BxT,
      "positions": np.where(real, arange - piece_start, 0).astype(np.int32),
      "targets": np.where(weights > 0, targets, pad_id).astype(np.int32),
      "target_weights": weights,
  }


class CLMBatcher:
  """The loader's batch stage for causal models (in place of `MLMMasker`): rows [B, T] and one
  key per row -> `clm_batch` (no randomness: keys and seed are not used). Picklable."""

  def __init__(self, *, eos_id: int, pad_id: int):
    self.eos_id, self.pad_id = int(eos_id), int(pad_id)

  def __call__(self, ids_BxT: np.ndarray, keys_B: np.ndarray, seed: int) -> Batch:
    del keys_B, seed
    return clm_batch(ids_BxT, eos_id=self.eos_id, pad_id=self.pad_id)
