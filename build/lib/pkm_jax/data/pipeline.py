"""Documents -> packed token sequences -> MLM batches (the brief's batch format, numpy).

Packing follows RoBERTa's FULL-SENTENCES: whole sentences fill `[CLS] ... [SEP]` sequences of at
most `max_len` tokens; a sequence may continue into the next document, with a [SEP] between the
two; a sentence longer than `max_len - 2` tokens is cut into pieces. Packing happens once; the
training iterator reshuffles the packed sequences every epoch.

Determinism (what makes resume and multi-host exact): global batch `n` holds the sequences at
positions n*B .. n*B+B-1 of the endless stream "epoch 0's permutation, epoch 1's, ...", epoch e's
permutation drawn from (seed, e), and is masked with a generator drawn from (seed, n). The whole
training state is therefore the step counter. Each host masks the same global batch and keeps
its own block of rows, so the hosts' rows concatenated are exactly the global batch.

Evaluation batches are the held-out sequences in order, masked from a fixed seed that does not
depend on the run's seed: every evaluation of every run sees identical batches. The last batch is
filled up with all-padding rows (attention_mask 0, mlm_weights 0), so no text is dropped and every
batch has the same shape.
"""

from __future__ import annotations

import zlib
from typing import Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer

from pkm_jax.data.corpus import Document
from pkm_jax.data.mlm import mask_tokens
from pkm_jax.data.sources import load_documents
from pkm_jax.data.tokenizer import special_token_ids

Batch = dict[str, np.ndarray]
_EVAL_SEED = 20200529  # eval masks: fixed across runs and seeds
_SHUFFLE, _MASK, _EVAL_MASK = 0, 1, 2  # independent random streams per purpose


def tokenize_documents(docs: Sequence[Document], tokenizer: Tokenizer) -> list[list[list[int]]]:
  """Token ids (no special tokens) of every sentence, grouped by document."""
  sentences = [s for doc in docs for s in doc]
  encodings = tokenizer.encode_batch(sentences, add_special_tokens=False)
  out, i = [], 0
  for doc in docs:
    out.append([e.ids for e in encodings[i:i + len(doc)]])
    i += len(doc)
  return out


def pack_sequences(docs_ids: Sequence[Sequence[Sequence[int]]], max_len: int, *, cls_id: int,
                   sep_id: int, pad_id: int) -> np.ndarray:
  """Sentences -> [N, max_len] int32 rows `[CLS] s1 s2 [SEP] s3 ... [SEP] [PAD] ...`.

  A [SEP] separates documents that share a row. Every sentence token appears exactly once,
  in corpus order.
  """
  if max_len < 3:
    raise ValueError(f"data.max_len={max_len} must be at least 3 ([CLS] token [SEP])")
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


class _Masker:
  """Turns [B, T] packed rows into a full MLM batch."""

  def __init__(self, tokenizer: Tokenizer, mask_prob: float):
    ids = special_token_ids(tokenizer)
    self.pad_id, self.mask_id = ids["pad"], ids["mask"]
    self.special_ids = np.array(sorted(set(ids.values())), np.int64)
    self.vocab_size = tokenizer.get_vocab_size()
    self.mask_prob = float(mask_prob)

  def __call__(self, ids_BxT: np.ndarray, rng: np.random.Generator) -> Batch:
    batch = mask_tokens(ids_BxT, rng, mask_prob=self.mask_prob, mask_id=self.mask_id,
                        special_ids=self.special_ids, vocab_size=self.vocab_size)
    batch["attention_mask"] = (ids_BxT != self.pad_id).astype(np.int32)
    batch["token_type_ids"] = np.zeros_like(batch["input_ids"])
    return batch


def _rng(seed: int, *key: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _local_rows(batch: Batch, shard_index: int, shard_count: int) -> Batch:
  per_host = next(iter(batch.values())).shape[0] // shard_count
  return {k: v[shard_index * per_host:(shard_index + 1) * per_host] for k, v in batch.items()}


def _check_shards(batch_size: int, shard_index: int, shard_count: int) -> None:
  if batch_size < 1:
    raise ValueError(f"data.batch_size={batch_size} must be positive")
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} is not in [0, shard_count={shard_count})")
  if batch_size % shard_count:
    raise ValueError(f"data.batch_size={batch_size} (global) is not divisible by the "
                     f"{shard_count} hosts")


class MLMTrainIterator:
  """Endless training batches (this host's rows of each global batch); checkpointable.

  `get_state()` / `set_state()` save and restore the position (a JSON-able dict): a restored
  iterator yields exactly the batches the uninterrupted one would have.
  """

  def __init__(self, sequences_NxT: np.ndarray, masker: _Masker, *, batch_size: int, seed: int,
               shard_index: int = 0, shard_count: int = 1):
    if len(sequences_NxT) == 0:
      raise ValueError("the training split holds no text after tokenisation")
    _check_shards(batch_size, shard_index, shard_count)
    self.sequences_NxT, self.masker = sequences_NxT, masker
    self.batch_size, self.seed = int(batch_size), int(seed)
    self.shard_index, self.shard_count = shard_index, shard_count
    self.step = 0
    # Identifies the packed data, so a state from another corpus/tokenizer is refused.
    self.fingerprint = zlib.crc32(np.ascontiguousarray(sequences_NxT).tobytes())
    self._perms: dict[int, np.ndarray] = {}

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) > 4:
        self._perms.pop(min(self._perms))
      self._perms[epoch] = _rng(self.seed, _SHUFFLE, epoch).permutation(len(self.sequences_NxT))
    return self._perms[epoch]

  def global_batch(self, step: int) -> Batch:
    """The whole global batch at `step` (all hosts' rows); a pure function of (seed, step)."""
    n = len(self.sequences_NxT)
    positions_B = step * self.batch_size + np.arange(self.batch_size)
    rows_B = np.empty(self.batch_size, np.int64)
    for epoch in np.unique(positions_B // n):
      here = positions_B // n == epoch
      rows_B[here] = self._permutation(int(epoch))[positions_B[here] % n]
    return self.masker(self.sequences_NxT[rows_B], _rng(self.seed, _MASK, step))

  def __iter__(self) -> "MLMTrainIterator":
    return self

  def __next__(self) -> Batch:
    batch = _local_rows(self.global_batch(self.step), self.shard_index, self.shard_count)
    self.step += 1
    return batch

  @property
  def steps_per_epoch(self) -> float:
    return len(self.sequences_NxT) / self.batch_size

  def get_state(self) -> dict:
    return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size,
            "num_sequences": len(self.sequences_NxT), "fingerprint": self.fingerprint}

  def set_state(self, state: dict) -> None:
    for key in ("seed", "batch_size", "num_sequences", "fingerprint"):
      if key in state and state[key] != self.get_state()[key]:
        raise ValueError(f"saved data state has {key}={state[key]} but this run's data has "
                         f"{self.get_state()[key]}: the corpus, tokenizer, seed or batch size "
                         "changed since the checkpoint")
    if "step" not in state:
      raise ValueError(f"saved data state has no 'step': {state}")
    self.step = int(state["step"])


class MLMEvalData:
  """Held-out batches with fixed masks; call it for an iterator (finite, reusable)."""

  def __init__(self, sequences_NxT: np.ndarray, masker: _Masker, *, batch_size: int,
               shard_index: int = 0, shard_count: int = 1):
    _check_shards(batch_size, shard_index, shard_count)
    self.sequences_NxT, self.masker = sequences_NxT, masker
    self.batch_size, self.shard_index, self.shard_count = batch_size, shard_index, shard_count

  @property
  def num_batches(self) -> int:
    """Batches in the whole held-out split (the last one padded)."""
    return -(-len(self.sequences_NxT) // self.batch_size)

  def global_batch(self, i: int) -> Batch:
    rows_BxT = self.sequences_NxT[i * self.batch_size:(i + 1) * self.batch_size]
    short = self.batch_size - len(rows_BxT)
    if short:
      rows_BxT = np.concatenate([rows_BxT, np.full((short, rows_BxT.shape[1]),
                                                   self.masker.pad_id, np.int32)])
    return self.masker(rows_BxT, _rng(_EVAL_SEED, _EVAL_MASK, i))

  def __call__(self, num_batches: int | None = None) -> Iterator[Batch]:
    """The first `num_batches` batches (None or more than there are: the whole split)."""
    total = self.num_batches if num_batches is None else min(int(num_batches), self.num_batches)
    for i in range(total):
      yield _local_rows(self.global_batch(i), self.shard_index, self.shard_count)


def make_mlm_data(data_cfg, tokenizer: Tokenizer, *, seed: int, shard_index: int = 0,
                  shard_count: int = 1) -> tuple[MLMTrainIterator, MLMEvalData]:
  """`config.data` -> (train iterator, eval batches factory) for this host.

  `seed` (config.seed) drives shuffling and masking; the corpus itself comes from data_cfg.
  """
  _check_shards(int(data_cfg.batch_size), shard_index, shard_count)
  train_docs, eval_docs = load_documents(data_cfg)
  ids = special_token_ids(tokenizer)
  max_len = int(data_cfg.max_len)

  def pack(docs):
    return pack_sequences(tokenize_documents(docs, tokenizer), max_len, cls_id=ids["cls"],
                          sep_id=ids["sep"], pad_id=ids["pad"])

  masker = _Masker(tokenizer, data_cfg.mask_prob)
  common = dict(batch_size=int(data_cfg.batch_size), shard_index=shard_index,
                shard_count=shard_count)
  return (MLMTrainIterator(pack(train_docs), masker, seed=seed, **common),
          MLMEvalData(pack(eval_docs) if eval_docs else np.zeros((0, max_len), np.int32),
                      masker, **common))
