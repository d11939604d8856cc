"""Streams of documents for preparation: input text in blocks, and the held-out documents rule.

A `Block` is a piece of the input a worker process can tokenise on its own:
- 'lines': raw bytes of whole lines of a text file, one sentence per line, blank lines
  separating documents; read exactly as `sources.read_text_documents` reads a file (UTF-8 with
  invalid bytes replaced, universal newlines, lines stripped).
- 'docs': document texts of a TFDS split, cut into sentences by `sources.split_sentences`.
`block_sentences(block)` gives its sentences in order, with None wherever a document ends; the
last block of each file or split ends a document (documents never span inputs).

`Holdout(fraction)` decides, document by document in stream order, which documents are held out
for evaluation: exactly floor(n * fraction) of the first n, spread evenly (document i is held
out when floor((i + 1) * fraction) > floor(i * fraction)). It needs no count of the documents in
advance, so a corpus of any size is split in one pass.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from pkm_jax.data.packing import BOUNDARY
from pkm_jax.data.sources import open_tfds, split_sentences


@dataclasses.dataclass(frozen=True)
class Block:
  kind: str  # 'lines' | 'docs'
  payload: Any  # bytes ('lines') or a list of str ('docs')
  nbytes: int  # input bytes it covers (for progress and MB/s)
  end_of_input: bool  # the last block of a file / split: its last document ends here


def file_blocks(paths: Sequence[str], block_bytes: int = 1 << 20) -> Iterator[Block]:
  """Blocks of about `block_bytes` of whole lines from each file in order."""
  for path in paths:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      done = 0
      while True:
        # Cut only after a b"\n": it never occurs inside a UTF-8 sequence nor between the two
        # bytes of "\r\n", so every block decodes exactly as the whole file would.
        raw = f.read(block_bytes)
        if raw and not raw.endswith(b"\n"):
          raw += f.readline()
        done += len(raw)
        last = done >= size or not raw
        yield Block("lines", raw, len(raw), end_of_input=last)
        if last:
          break


def tfds_blocks(name: str, split: str, data_dir: str, text_key: str,
                docs_per_block: int = 256) -> Iterator[Block]:
  """Blocks of `docs_per_block` document texts of a prepared TFDS split, in order."""
  source = open_tfds(name, split, data_dir)
  n = len(source)
  for start in range(0, n, docs_per_block):
    texts = []
    # One batched read per block (ArrayRecord reads a batch in one call, not one per example).
    for example in source.__getitems__(list(range(start, min(n, start + docs_per_block)))):
      if text_key not in example:
        raise ValueError(f"TFDS dataset {name!r} has no feature text_key={text_key!r} "
                         f"(features: {sorted(example)})")
      text = example[text_key]
      if isinstance(text, (bytes, np.bytes_)):
        text = bytes(text).decode("utf-8", errors="replace")
      texts.append(str(text))
    yield Block("docs", texts, sum(len(t.encode("utf-8")) for t in texts),
                end_of_input=start + docs_per_block >= n)


def block_sentences(block: Block) -> list[str | None]:
  """The block's sentences in order; None ends a document."""
  out: list[str | None] = []
  if block.kind == "lines":
    text = block.payload.decode("utf-8", errors="replace")
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # Python's universal newlines
    lines = text.split("\n")
    if text.endswith("\n"):
      lines.pop()  # the empty string after the last newline is not a blank line
    for line in lines:
      line = line.strip()
      out.append(line if line else None)
  elif block.kind == "docs":
    for text in block.payload:
      out.extend(split_sentences(text))
      out.append(None)
  else:
    raise ValueError(f"unknown block kind {block.kind!r}")
  if block.end_of_input:
    out.append(None)
  return out


def sentences_of(blocks: Iterable[Block], fraction: float = 0.0) -> Iterator[str]:
  """Every sentence of the documents that `Holdout(fraction)` does not hold out, in order."""
  doc, in_doc, held = -1, False, False
  for block in blocks:
    for sentence in block_sentences(block):
      if sentence is None:
        in_doc = False
        continue
      if not in_doc:
        doc, in_doc = doc + 1, True
        held = bool(fraction) and bool(held_out(np.array([doc]), fraction)[0])
      if not held:
        yield sentence


def held_out(doc_index: np.ndarray, fraction: float) -> np.ndarray:
  """Whether each (0-based, stream-order) document index is held out; see the docstring."""
  i = np.asarray(doc_index, np.float64)
  return np.floor((i + 1) * fraction) > np.floor(i * fraction)


class Holdout:
  """Splits (lengths, ids) chunks (BOUNDARY between documents) into train and held-out parts.

  Stateful across chunks: it counts documents as they start, so a document cut across two
  chunks stays on one side.
  """

  def __init__(self, fraction: float):
    if not 0.0 <= fraction < 1.0:
      raise ValueError(f"the held-out fraction {fraction} must be in [0, 1)")
    self.fraction = float(fraction)
    self.documents = 0  # documents started so far
    self.held_documents = 0
    self._in_doc = False

  def split(self, lens_S: np.ndarray, ids: np.ndarray
            ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train lengths, train ids), (held-out lengths, held-out ids)); boundaries go to both."""
    lens = np.asarray(lens_S, np.int64)
    boundary = lens == BOUNDARY
    prev_boundary = np.concatenate([[not self._in_doc], boundary[:-1]])
    starts = ~boundary & prev_boundary
    doc_S = self.documents - 1 + np.cumsum(starts)  # index of the document each entry is in
    held = held_out(doc_S, self.fraction) & ~boundary
    self.held_documents += int((starts & held).sum())
    self.documents += int(starts.sum())
    if len(lens):
      self._in_doc = not boundary[-1]
    held_ids = np.repeat(held, np.maximum(lens, 0))
    return ((lens[~held], ids[~held_ids]), (lens[held | boundary], ids[held_ids]))
