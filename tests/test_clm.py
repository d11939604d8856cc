"""Causal-LM data, training and evaluation: packing against a brute-force reference, the BPE
tokenizer, next-token batches, train.py / eval.py on configs/gpt2_resm.py and llama_resm.py
(falling loss, exact resume, multi-device, prepared data) and the perplexity against numpy."""

import json
import os
import random
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from pkm_jax.data import bpe, causal, pipeline, text_stream
from pkm_jax.data.corpus import generate_corpus
from pkm_jax.data.packing import BOUNDARY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- packing, batches
def reference_rows(docs, max_len, *, eos, pad, bos=None, newline=()):
  """Brute force: one flat list of every document's tokens, cut every max_len tokens."""
  stream = []
  for doc in docs:
    sents = [s for s in doc if s]
    if not sents:
      continue
    stream += [] if bos is None else [bos]
    for i, sent in enumerate(sents):
      stream += (list(newline) if i else []) + list(sent)
    stream.append(eos)
  rows = [stream[i:i + max_len] for i in range(0, len(stream), max_len)]
  if rows and len(rows[-1]) < 2:
    rows.pop()
  return np.array([r + [pad] * (max_len - len(r)) for r in rows], np.int32).reshape(-1, max_len)


def random_docs(rng, n, vocab=(5, 50)):
  return [[[rng.randrange(*vocab) for _ in range(rng.randrange(0, 9))]
           for _ in range(rng.randrange(0, 5))] for _ in range(n)]


@pytest.mark.parametrize("bos, newline", [(None, ()), (3, (4,)), (2, (4, 4))])
def test_packing_matches_brute_force_and_any_chunking(bos, newline):
  rng = random.Random(0)
  docs = random_docs(rng, 60)
  want = reference_rows(docs, 7, eos=2, pad=1, bos=None if bos == 2 else bos, newline=newline)
  got = causal.pack_causal(docs, 7, eos_id=2, pad_id=1, bos_id=bos, newline_ids=newline)
  np.testing.assert_array_equal(got, want)
  # The stream cut into chunks anywhere (even inside a document) gives the same rows.
  lens, flat = [], []
  for doc in docs:
    for sent in doc:
      lens.append(len(sent))
      flat.extend(sent)
    lens.append(BOUNDARY)
  starts = np.concatenate([[0], np.cumsum(np.maximum(lens, 0))])
  packer = causal.CausalPacker(7, eos_id=2, pad_id=1, bos_id=bos, newline_ids=newline)
  cuts = sorted(rng.sample(range(1, len(lens)), 15))
  rows = [packer.add(np.array(lens[a:b]), np.array(flat[starts[a]:starts[b]], np.int32))
          for a, b in zip([0] + cuts, cuts + [len(lens)])]
  np.testing.assert_array_equal(np.concatenate(rows + [packer.finish()]), want)


def reference_batch(row, eos, pad):
  """One row, token by token: its documents, positions and next-token targets."""
  t = len(row)
  real = t
  if pad != eos:
    while real and row[real - 1] == pad:
      real -= 1
  else:
    run = 0
    while run < t and row[t - 1 - run] == eos:
      run += 1
    real = 0 if run == t else t - max(run - 1, 0)
  seg, pos, s, p = [], [], 1, 0
  for i in range(t):
    if i >= real:
      seg.append(0)
      pos.append(0)
      continue
    seg.append(s)
    pos.append(p)
    p += 1
    if row[i] == eos:
      s, p = s + 1, 0
  weights = [float(i + 1 < real and row[i] != eos) for i in range(t)]
  targets = [row[i + 1] if weights[i] else pad for i in range(t)]
  return {"input_ids": [row[i] if i < real else pad for i in range(t)],
          "attention_mask": [int(i < real) for i in range(t)], "segment_ids": seg,
          "positions": pos, "targets": targets, "target_weights": weights}


@pytest.mark.parametrize("pad", [1, 2])  # its own padding token, or padding with the EOS
def test_clm_batch_matches_reference(pad):
  rng = random.Random(1)
  rows = causal.pack_causal(random_docs(rng, 40), 9, eos_id=2, pad_id=pad, bos_id=3)
  rows = np.concatenate([rows, np.full((2, 9), pad, np.int32)])  # eval's all-padding rows
  got = causal.CLMBatcher(eos_id=2, pad_id=pad)(rows, np.arange(len(rows)), 0)
  assert set(got) == set(causal.CLM_BATCH_KEYS)
  for key in causal.CLM_BATCH_KEYS:
    want = np.array([reference_batch(r.tolist(), 2, pad)[key] for r in rows])
    np.testing.assert_array_equal(got[key], want, err_msg=key)
  assert got["target_weights"].dtype == np.float32 and got["targets"].dtype == np.int32
  # Every token but each document's first is a target exactly once, except where a row ends.
  assert got["target_weights"][-2:].sum() == 0 and got["attention_mask"][-2:].sum() == 0


def test_bpe_tokenizer_is_deterministic_and_encodes_documents_whole():
  corpus = generate_corpus(30, 40, 0, num_eval_docs=2)
  sentences = [s for doc in corpus.train for s in doc]
  tok = bpe.train_bpe_tokenizer(sentences, 300)
  assert tok.get_vocab_size() == 300
  assert (tok.token_to_id(bpe.EOS), tok.token_to_id(bpe.PAD)) == (0, 1)
  # A second training in a fresh process (other hash seeds) learns the same vocabulary.
  code = ("from pkm_jax.data import bpe; from pkm_jax.data.corpus import generate_corpus; "
          "c = generate_corpus(30, 40, 0, num_eval_docs=2); "
          "print(bpe.train_bpe_tokenizer([s for d in c.train for s in d], 300).to_str())")
  other = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONHASHSEED": "7"})
  assert other.returncode == 0, other.stderr[-2000:]
  assert json.loads(other.stdout) == json.loads(tok.to_str())
  # The packed ids of a document are the ids of its whole text (lines joined by newlines).
  ids = pipeline.clm_token_ids(tok)
  rows = pipeline._pack_documents(corpus.eval[:1], tok, 512, causal=True)
  whole = tok.encode("\n".join(corpus.eval[0])).ids + [ids["eos"]]
  assert rows[0, :len(whole)].tolist() == whole
  assert tok.decode(whole[:-1]) == "\n".join(corpus.eval[0])
  with pytest.raises(ValueError, match="at least 258"):
    bpe.train_bpe_tokenizer(sentences, 100)


def test_stream_packing_equals_in_memory_packing(tmp_path):
  corpus = generate_corpus(30, 40, 0, num_eval_docs=2)
  tok = bpe.train_bpe_tokenizer([s for doc in corpus.train for s in doc], 300)
  path = tmp_path / "docs.txt"
  path.write_text("\n\n".join("\n".join(doc) for doc in corpus.train) + "\n")
  streamed = pipeline.pack_stream(text_stream.file_blocks([str(path)], block_bytes=200), tok,
                                  24, causal=True)
  np.testing.assert_array_equal(
      streamed, pipeline._pack_documents(corpus.train, tok, 24, causal=True))
