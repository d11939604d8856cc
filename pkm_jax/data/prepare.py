"""Prepare a corpus once, offline: text -> packed rows in sharded ArrayRecord files.

  python -m pkm_jax.data.prepare --input '/data/wiki/*.txt' --tokenizer /models/bert-base-uncased \
      --max_len 128 --out /data/wiki_prepared [--eval_input '/data/wikitext-103/wiki.valid.raw']
  python -m pkm_jax.data.prepare --tfds_name wikipedia/20230601.en --vocab_size 30522 --out DIR

Then train with `--config.data.source=prepared --config.data.path=DIR`. Text files have one
sentence per line and blank lines between documents; a TFDS dataset must already be prepared
(nothing is downloaded); its `--text_key` feature is a document. Documents are streamed in
blocks, tokenised by `--workers` processes (default: every core), packed in order exactly as
`pack_sequences` packs the in-memory sources, and written in shards (prepared.py), so memory
stays bounded whatever the corpus size. Evaluation rows come from `--eval_input` /
`--tfds_eval_split`, or from documents held out of the input (`--eval_fraction`, spread evenly).
With `--vocab_size` instead of `--tokenizer`, a WordPiece vocabulary is first learnt from the
training documents (read once more, streamed).

`--causal` writes a causal LM's rows instead (documents with EOS between them, no [CLS]/[SEP]:
pkm_jax/data/causal.py), with the model's tokenizer (`--tokenizer`, e.g. a GPT-2 or Llama
folder) or a byte-level BPE learnt from the input (`--vocab_size`, as a causal run without a
tokenizer trains one); train a causal config on it (model.family 'gpt2' / 'llama').

Everything is written into a temporary folder beside --out and renamed when complete, so an
interrupted run never leaves a folder that looks prepared; a non-empty --out is only replaced
with --overwrite. A gs:// --out is written locally and uploaded, metadata.json and the checksums
last (training copies it back to each host's disk: prepared.py). Bad input (no file matching a
glob, no text, a bad tokenizer) stops with one line before anything is written.
"""

from __future__ import annotations

import collections
import datetime
import json
import multiprocessing
import os
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from absl import flags
from tokenizers import Tokenizer
from tqdm import tqdm

from pkm_jax import checksums, cli
from pkm_jax import storage
from pkm_jax.data import bpe
from pkm_jax.data import pipeline
from pkm_jax.data import prepared as prepared_lib
from pkm_jax.data import text_stream
from pkm_jax.data import tokenizer as tok_lib
from pkm_jax.data.encoder import SentenceEncoder
from pkm_jax.data.sources import expand_files
from pkm_jax.staged_dir import staged_dir

_encoder: SentenceEncoder | None = None  # one per worker process (set by _init_worker)


def _init_worker(tokenizer_json: str) -> None:
  global _encoder
  os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
  _encoder = SentenceEncoder(Tokenizer.from_str(tokenizer_json))


def encode_block(block: text_stream.Block) -> tuple[np.ndarray, np.ndarray]:
  """A block -> (sentence lengths [S] with BOUNDARY between documents, concatenated ids)."""
  return _encoder.encode_items(text_stream.block_sentences(block))


def _encoded(blocks: Iterable[text_stream.Block], tokenizer: Tokenizer, workers: int
             ) -> Iterator[tuple[text_stream.Block, tuple[np.ndarray, np.ndarray]]]:
  """(block, encode_block(block)) in input order, `workers` processes encoding ahead.

  At most 2 blocks per worker are in flight (Pool.imap would read the whole input ahead).
  """
  if workers <= 1:
    _init_worker(tokenizer.to_str())
    for block in blocks:
      yield block, encode_block(block)
    return
  # fork: workers start at once, without re-importing anything (spawn elsewhere).
  ctx = multiprocessing.get_context(
      "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
  with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer.to_str(),)) as pool:
    pending: collections.deque = collections.deque()
    for block in blocks:
      pending.append((block, pool.apply_async(encode_block, (block,))))
      if len(pending) >= 2 * workers:
        done, result = pending.popleft()
        yield done, result.get()
    while pending:
      done, result = pending.popleft()
      yield done, result.get()


class _Split:
  """One split being written: its packer, shard writer and counts."""

  def __init__(self, folder: str, name: str, tokenizer: Tokenizer, max_len: int,
               rows_per_shard: int, causal: bool = False):
    self.name = name
    self.packer = pipeline.row_packer(tokenizer, max_len, causal)
    self.writer = prepared_lib.ShardWriter(
        folder, name, max_len=max_len, rows_per_shard=rows_per_shard,
        dtype=prepared_lib.token_dtype(tokenizer.get_vocab_size()))
    self.counter = text_stream.Holdout(0.0)  # counts documents as they start
    self.tokens = self.bytes = 0

  def add(self, lens: np.ndarray, ids: np.ndarray) -> None:
    self.counter.split(lens, ids)
    self.tokens += int(np.maximum(lens, 0).sum())
    self.writer.write(self.packer.add(lens, ids))

  def close(self) -> dict[str, Any]:
    self.writer.write(self.packer.finish())
    shards = self.writer.close()
    return {"rows": self.writer.rows, "documents": self.counter.documents,
            "tokens": self.tokens, "input_bytes": self.bytes, "shards": shards}


def _write_stream(blocks: Iterable[text_stream.Block], tokenizer: Tokenizer, workers: int,
                  splits: dict[str, _Split], holdout: float, progress: tqdm) -> None:
  """Encodes, packs and writes a stream into splits['train'] (and its held-out documents into
  splits['eval'] when `holdout` > 0), or into the only split given."""
  router = text_stream.Holdout(holdout) if holdout else None
  for block, (lens, ids) in _encoded(blocks, tokenizer, workers):
    if router is None:
      (only,) = splits.values()
      only.add(lens, ids)
      only.bytes += block.nbytes
    else:
      (train_lens, train_ids), (eval_lens, eval_ids) = router.split(lens, ids)
      splits["train"].add(train_lens, train_ids)
      splits["eval"].add(eval_lens, eval_ids)
      splits["train"].bytes += block.nbytes  # the input's bytes, held-out documents included
    progress.update(block.nbytes)


def _inputs(spec: str, tfds_name: str, tfds_split: str, data_dir: str, text_key: str, what: str
            ) -> tuple[Callable[[], Iterator[text_stream.Block]], int | None, dict[str, Any]]:
  """(fresh block stream, total bytes or None, description for metadata) of one input."""
  if spec:
    paths = [os.path.abspath(p) for p in expand_files(spec, what=what)]
    return (lambda: text_stream.file_blocks(paths), sum(os.path.getsize(p) for p in paths),
            {"files": paths})
  return (lambda: text_stream.tfds_blocks(tfds_name, tfds_split, data_dir, text_key), None,
          {"tfds_name": tfds_name, "tfds_split": tfds_split, "text_key": text_key,
           "data_dir": data_dir})


def _check_out(out: str, overwrite: bool) -> None:
  storage.check_bucket(out)
  if storage.exists(out):
    if not storage.isdir(out):
      raise FileExistsError(f"--out {out} exists and is not a folder")
    if storage.listdir(out) and not overwrite:
      raise FileExistsError(f"--out {out} exists and is not empty (pass --overwrite to "
                            "replace it)")


def prepare(out: str, *, inputs: str = "", tfds_name: str = "", tfds_split: str = "train",
            text_key: str = "text", data_dir: str = "", eval_inputs: str = "",
            tfds_eval_split: str = "", eval_fraction: float = 0.0, tokenizer: str = "",
            vocab_size: int = 0, lowercase: bool = True, max_len: int = 128,
            rows_per_shard: int = 1 << 17, workers: int = 0, overwrite: bool = False,
            progress: bool = True, causal: bool = False) -> dict[str, Any]:
  """Prepares the corpus into `out` (see the module docstring); returns its metadata."""
  out = storage.absolute(out)
  if bool(inputs) == bool(tfds_name):
    raise ValueError("give exactly one of --input (text files) and --tfds_name")
  if bool(tokenizer) == bool(vocab_size):
    raise ValueError("give exactly one of --tokenizer (a tokenizer.json, vocab.txt or folder) "
                     "and --vocab_size (learn a vocabulary from the input)")
  if (eval_inputs or tfds_eval_split) and eval_fraction:
    raise ValueError("give either a separate evaluation input (--eval_input / "
                     "--tfds_eval_split) or --eval_fraction, not both")
  if max_len < (2 if causal else 3):
    raise ValueError(f"--max_len={max_len} must be at least "
                     + ("2 (a token and the next)" if causal else "3 ([CLS] token [SEP])"))
  _check_out(out, overwrite)
  train_blocks, train_bytes, source = _inputs(inputs, tfds_name, tfds_split, data_dir,
                                              text_key, "--input")
  eval_blocks, eval_bytes, eval_source = None, None, None
  if eval_inputs or (tfds_name and tfds_eval_split):
    eval_blocks, eval_bytes, eval_source = _inputs(eval_inputs, tfds_name, tfds_eval_split,
                                                   data_dir, text_key, "--eval_input")
  workers = workers or os.cpu_count() or 1

  train_text = lambda: text_stream.sentences_of(train_blocks(), eval_fraction)  # noqa: E731
  if tokenizer:
    tok = tok_lib.load_tokenizer(tokenizer, lowercase=lowercase)
  elif causal:
    print(f"Learning a byte-level BPE vocabulary of {vocab_size} from the input ...", flush=True)
    tok = bpe.train_bpe_tokenizer(train_text, vocab_size)
  else:
    print(f"Learning a WordPiece vocabulary of {vocab_size} from the input ...", flush=True)
    tok = tok_lib.train_tokenizer(train_text, vocab_size, lowercase)
  if causal:
    special_ids = {k: v for k, v in pipeline.clm_token_ids(tok).items() if k != "newline"}
  else:
    special_ids = tok_lib.special_token_ids(tok)

  with staged_dir(out, last=(prepared_lib.METADATA_FILE, checksums.MANIFEST)) as tmp:
    tok_lib.save_tokenizer(tok, os.path.join(tmp, prepared_lib.TOKENIZER_FILE))
    new_split = lambda name: _Split(tmp, name, tok, max_len, rows_per_shard, causal)
    splits = {"train": new_split("train")}
    if eval_fraction:
      splits["eval"] = new_split("eval")
    with tqdm(total=train_bytes, unit="B", unit_scale=True, desc="train input",
              disable=not progress, dynamic_ncols=True) as bar:
      _write_stream(train_blocks(), tok, workers, splits, eval_fraction, bar)
    if eval_blocks is not None:
      splits["eval"] = new_split("eval")
      with tqdm(total=eval_bytes, unit="B", unit_scale=True, desc="eval input",
                disable=not progress, dynamic_ncols=True) as bar:
        _write_stream(eval_blocks(), tok, workers, {"eval": splits["eval"]}, 0.0, bar)
    info = {name: split.close() for name, split in splits.items()}
    if not info["train"]["rows"]:
      raise ValueError(f"the input ({inputs or tfds_name}) holds no text after tokenisation")
    if "eval" in info and not info["eval"]["rows"]:
      raise ValueError("the evaluation input holds no text after tokenisation"
                       if eval_blocks is not None else
                       f"--eval_fraction={eval_fraction} held out no document of "
                       f"{info['train']['documents'] + info['eval']['documents']}")
    meta = {
        "format": prepared_lib.FORMAT, "version": prepared_lib.VERSION, "max_len": max_len,
        "vocab_size": tok.get_vocab_size(), "dtype": prepared_lib.token_dtype(
            tok.get_vocab_size()),
        "rows_per_record": prepared_lib.ROWS_PER_RECORD, "rows_per_shard": rows_per_shard,
        "layout": prepared_lib.CAUSAL if causal else prepared_lib.MLM,
        "tokenizer": {"fingerprint": tok_lib.tokenizer_fingerprint(tok),
                      "source": tokenizer or f"learnt (vocab_size={vocab_size})"},
        "special_ids": special_ids,
        "source": {"input": source, "eval_input": eval_source, "eval_fraction": eval_fraction,
                   "lowercase": lowercase if not (tokenizer or causal) else None},
        "splits": info, "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    with open(os.path.join(tmp, prepared_lib.METADATA_FILE), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=2, sort_keys=True)
    checksums.write(tmp)
  return meta


def summary(meta: dict[str, Any], out: str) -> str:
  parts = [f"{name}: {s['rows']:,} rows of {meta['max_len']} ({s['documents']:,} documents, "
           f"{s['tokens']:,} tokens, {len(s['shards'])} shard(s))"
           for name, s in meta["splits"].items()]
  return f"Prepared {out}: " + "; ".join(parts)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  if not f.out:
    raise ValueError("--out is required")
  meta = prepare(f.out, inputs=f.input, tfds_name=f.tfds_name, tfds_split=f.tfds_split,
                 text_key=f.text_key, data_dir=f.data_dir, eval_inputs=f.eval_input,
                 tfds_eval_split=f.tfds_eval_split, eval_fraction=f.eval_fraction,
                 tokenizer=f.tokenizer, vocab_size=f.vocab_size, lowercase=f.lowercase,
                 max_len=f.max_len, rows_per_shard=f.rows_per_shard, workers=f.workers,
                 overwrite=f.overwrite, causal=f.causal)
  print(summary(meta, storage.absolute(f.out)))


def define_flags() -> None:
  """The command's flags (defined only when run as a command, not when imported)."""
  flags.DEFINE_string("out", None, "Output folder (written under a temporary name, then renamed).")
  flags.DEFINE_string("input", "", "Text files: comma-separated paths or globs.")
  flags.DEFINE_string("tfds_name", "", "Instead of --input: a prepared TFDS dataset.")
  flags.DEFINE_string("tfds_split", "train", "TFDS split to prepare.")
  flags.DEFINE_string("text_key", "text", "TFDS feature holding a document's text.")
  flags.DEFINE_string("data_dir", "", "TFDS data dir (default: $TFDS_DATA_DIR).")
  flags.DEFINE_string("eval_input", "", "Text files of the evaluation split (paths or globs).")
  flags.DEFINE_string("tfds_eval_split", "", "TFDS split for the evaluation split.")
  flags.DEFINE_float("eval_fraction", 0.0, "Hold out this fraction of the input's documents "
                     "(evenly spread) as the evaluation split.")
  flags.DEFINE_string("tokenizer", "", "tokenizer.json, BERT vocab.txt or a folder holding one.")
  flags.DEFINE_integer("vocab_size", 0, "Instead of --tokenizer: learn a vocabulary (WordPiece; "
                       "--causal: byte-level BPE) of this size from the input.")
  flags.DEFINE_bool("lowercase", True, "Lower-case (a learnt vocabulary, or a vocab.txt "
                    "without tokenizer_config.json).")
  flags.DEFINE_integer("max_len", 128, "Tokens per packed row ([CLS] ... [SEP]).")
  flags.DEFINE_integer("rows_per_shard", 1 << 17, "Rows per ArrayRecord file.")
  flags.DEFINE_integer("workers", 0, "Tokenising processes (0: one per core).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --out.")
  flags.DEFINE_bool("causal", False, "A causal LM's rows (EOS-separated documents); with "
                    "--vocab_size a byte-level BPE is learnt instead of WordPiece.")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
