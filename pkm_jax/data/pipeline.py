"""`config.data` -> this host's training batches and the evaluation batches.

Every source ends as a `RowSource` of packed rows feeding the same grain loader (loader.py):
- 'generated' / 'files' / 'tfds': documents are read, tokenised and packed in memory at start
  (`pack_sequences`; fine for small corpora, the default);
- 'prepared': rows read from a folder made by `python -m pkm_jax.data.prepare` (prepared.py),
  nothing read at start but its metadata.

Causal models (`causal=True`: model.family != 'bert') take the same sources and the same
loader; their rows are packed by `causal.CausalPacker` (documents with EOS between them, no
[CLS]/[SEP]) and made into next-token batches by `causal.CLMBatcher` instead of masked ones.

Evaluation rows, in order of precedence: every document of `data.eval_files` (text, packed at
start as a stream, no hold-out), every row of `data.eval_path` (a prepared folder: its 'eval'
split, or its only split), the prepared folder's 'eval' split, the whole `data.tfds_eval_split`,
or the documents a source held out (`data.eval_fraction`).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer

from pkm_jax.data import prepared as prepared_lib
from pkm_jax.data import text_stream
from pkm_jax.data import causal as causal_lib
from pkm_jax.data.corpus import Document
from pkm_jax.data.encoder import SentenceEncoder
from pkm_jax.data.loader import ArrayRows, MLMEvalData, MLMTrainIterator, RowSource, check_shards
from pkm_jax.data.mlm import MLMMasker
from pkm_jax.data.packing import RowPacker, pack_sequences
from pkm_jax.data.sources import expand_files, load_documents
from pkm_jax.data.tokenizer import causal_special_ids, check_prepared, special_token_ids


def tokenize_documents(docs: Sequence[Document], tokenizer: Tokenizer) -> list[list[list[int]]]:
  """Token ids (no special tokens) of every sentence, grouped by document."""
  sentences = [s for doc in docs for s in doc]
  encodings = tokenizer.encode_batch(sentences, add_special_tokens=False)
  out, i = [], 0
  for doc in docs:
    out.append([e.ids for e in encodings[i:i + len(doc)]])
    i += len(doc)
  return out


def clm_token_ids(tokenizer: Tokenizer) -> dict:
  """{'eos', 'pad', 'bos' (None without one)} and 'newline' (the ids of "\n", put between a
  document's lines) of a causal model's tokenizer.

  From the tokenizer alone (its well-known token strings, not a model folder's configs), so
  `prepare`, training and evaluation, which all see the same tokenizer.json, pack alike.
  """
  ids = dict(causal_special_ids(tokenizer))
  ids["newline"] = tokenizer.encode("\n", add_special_tokens=False).ids
  return ids


def row_packer(tokenizer: Tokenizer, max_len: int, causal: bool):
  """The streaming packer of a run's rows: RowPacker (MLM) or CausalPacker."""
  if causal:
    ids = clm_token_ids(tokenizer)
    return causal_lib.CausalPacker(max_len, eos_id=ids["eos"], pad_id=ids["pad"],
                                   bos_id=ids.get("bos"), newline_ids=ids["newline"])
  ids = special_token_ids(tokenizer)
  return RowPacker(max_len, cls_id=ids["cls"], sep_id=ids["sep"], pad_id=ids["pad"])


def _pack_documents(docs: Sequence[Document], tokenizer: Tokenizer, max_len: int,
                    causal: bool = False) -> np.ndarray:
  if causal:  # the streaming packer over the documents, so prepared rows are the same rows
    items = [s for doc in docs for s in (*doc, None)]
    packer = row_packer(tokenizer, max_len, causal)
    rows = packer.add(*SentenceEncoder(tokenizer).encode_items(items))
    return np.concatenate([rows, packer.finish()])
  ids = special_token_ids(tokenizer)
  return pack_sequences(tokenize_documents(docs, tokenizer), max_len, cls_id=ids["cls"],
                        sep_id=ids["sep"], pad_id=ids["pad"])


def pack_stream(blocks: Iterable[text_stream.Block], tokenizer: Tokenizer,
                max_len: int, causal: bool = False) -> np.ndarray:
  """[N, max_len] rows of a block stream, packed as pack_sequences (or, causal, pack_causal)
  would, in this process.

  Memory: the rows (int32) and one block, never per-token Python objects.
  """
  encoder = SentenceEncoder(tokenizer)
  packer = row_packer(tokenizer, max_len, causal)
  rows = [packer.add(*encoder.encode_items(text_stream.block_sentences(block)))
          for block in blocks]
  return np.concatenate(rows + [packer.finish()])


def check_layout(meta: dict, folder: str, causal: bool, what: str,
                 tokenizer: Tokenizer | None = None) -> None:
  """Prepared rows must be of the run's kind: causal rows for a causal model, MLM rows else
  (and causal rows ended by the EOS this run's `tokenizer` uses)."""
  layout = meta.get("layout", prepared_lib.MLM)  # folders from before causal rows are MLM's
  want = prepared_lib.CAUSAL if causal else prepared_lib.MLM
  if layout != want:
    raise ValueError(f"{what}={folder} holds {layout} rows but this run's model needs {want} "
                     "rows: prepare it again" + (" with --causal" if causal else
                                                 " without --causal"))
  if causal and tokenizer is not None:
    ids = {k: v for k, v in clm_token_ids(tokenizer).items() if k != "newline"}
    if meta.get("special_ids") != ids:
      raise ValueError(f"{what}={folder} was packed with special tokens {meta.get('special_ids')}"
                       f" but this run's tokenizer has {ids}: prepare it again")


def _prepared_rows(folder: str, split: str | None, tokenizer: Tokenizer, max_len: int,
                   what: str, causal: bool = False) -> prepared_lib.PreparedRows:
  """A prepared split whose tokenizer, max_len and kind of rows match this run's (else a
  one-line error)."""
  meta = prepared_lib.read_metadata(folder, what)
  check_prepared(tokenizer, meta, folder, max_len, what)
  check_layout(meta, folder, causal, what, tokenizer)
  if split is None:  # an evaluation folder: its eval split, or the only one it has
    split = "eval" if "eval" in meta["splits"] else next(iter(meta["splits"]))
  elif split not in meta["splits"]:
    raise ValueError(f"{what}={folder} has no {split!r} split: prepare it with --eval_input or "
                     "--eval_fraction, or set data.eval_files / data.eval_path")
  return prepared_lib.PreparedRows(folder, split, meta)


def _masker(data_cfg, tokenizer: Tokenizer, causal: bool = False):
  """The batch stage: MLM masking, or (causal) next-token targets; data.mask_prob is ignored
  then."""
  if causal:
    ids = clm_token_ids(tokenizer)
    return causal_lib.CLMBatcher(eos_id=ids["eos"], pad_id=ids["pad"])
  return MLMMasker(special_token_ids(tokenizer), tokenizer.get_vocab_size(),
                   float(data_cfg.mask_prob))


def eval_rows(data_cfg, tokenizer: Tokenizer, causal: bool = False) -> RowSource:
  """The evaluation rows `config.data` names (see the module docstring for the precedence)."""
  max_len = int(data_cfg.max_len)
  if data_cfg.eval_files:
    paths = expand_files(data_cfg.eval_files, what="data.eval_files")
    rows = pack_stream(text_stream.file_blocks(paths), tokenizer, max_len, causal)
    if not len(rows):
      raise ValueError(f"data.eval_files={data_cfg.eval_files!r} holds no text")
    return ArrayRows(rows)
  if data_cfg.eval_path:
    return _prepared_rows(data_cfg.eval_path, None, tokenizer, max_len, "data.eval_path",
                          causal)
  if data_cfg.source == "prepared":
    return _prepared_rows(data_cfg.path, "eval", tokenizer, max_len, "data.path", causal)
  if data_cfg.source == "tfds" and data_cfg.tfds_eval_split:  # only that split is read
    return ArrayRows(pack_stream(text_stream.tfds_blocks(
        data_cfg.tfds_name, data_cfg.tfds_eval_split, data_cfg.data_dir, data_cfg.text_key),
        tokenizer, max_len, causal))
  _, eval_docs = load_documents(data_cfg)
  return ArrayRows(_pack_documents(eval_docs, tokenizer, max_len, causal) if eval_docs
                   else np.zeros((0, max_len), np.int32))


def make_eval_data(data_cfg, tokenizer: Tokenizer, *, shard_index: int = 0,
                   shard_count: int = 1, causal: bool = False) -> MLMEvalData:
  """`config.data` -> the evaluation batches of this host: `(num_batches=None) -> iterator`,
  with `num_sequences` (packed rows in the whole split) and `num_batches`."""
  check_shards(int(data_cfg.batch_size), shard_index, shard_count)
  return MLMEvalData(eval_rows(data_cfg, tokenizer, causal),
                     _masker(data_cfg, tokenizer, causal),
                     batch_size=int(data_cfg.batch_size), shard_index=shard_index,
                     shard_count=shard_count, prefetch=int(data_cfg.prefetch))


def make_mlm_data(data_cfg, tokenizer: Tokenizer, *, seed: int, shard_index: int = 0,
                  shard_count: int = 1, causal: bool = False
                  ) -> tuple[MLMTrainIterator, MLMEvalData]:
  """`config.data` -> (train iterator, eval batches factory) for this host.

  `seed` (config.seed) drives shuffling and masking; the corpus itself comes from data_cfg.
  `causal`: next-token batches of EOS-separated documents (a causal model's data).
  """
  check_shards(int(data_cfg.batch_size), shard_index, shard_count)
  max_len = int(data_cfg.max_len)
  if data_cfg.source == "prepared":
    train: RowSource = _prepared_rows(data_cfg.path, "train", tokenizer, max_len, "data.path",
                                      causal)
  else:
    train_docs, _ = load_documents(data_cfg)
    train = ArrayRows(_pack_documents(train_docs, tokenizer, max_len, causal))
  train_iter = MLMTrainIterator(
      train, _masker(data_cfg, tokenizer, causal), batch_size=int(data_cfg.batch_size),
      seed=seed,
      shard_index=shard_index, shard_count=shard_count, workers=int(data_cfg.workers),
      prefetch=int(data_cfg.prefetch))
  return train_iter, make_eval_data(data_cfg, tokenizer, shard_index=shard_index,
                                    shard_count=shard_count, causal=causal)
