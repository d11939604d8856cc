"""`python -m pkm_jax.data.prepare` and the pieces it is made of: the prepared rows equal the
in-memory packer's (the reference: `pack_sequences` over `tokenize_documents` over
`read_text_documents`), the fast encoder equals Hugging Face's `encode_batch`, the streamed
vocabulary equals the in-memory one; bad input stops with one line and leaves nothing."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from pkm_jax import checksums
from pkm_jax.data import corpus as corpus_lib
from pkm_jax.data import keyed_random
from pkm_jax.data import prepare as prepare_lib
from pkm_jax.data import prepared as prepared_lib
from pkm_jax.data import sources, text_stream
from pkm_jax.data.encoder import SentenceEncoder, splits_at_spaces
from pkm_jax.data.packing import BOUNDARY, RowPacker, pack_sequences
from pkm_jax.data.pipeline import tokenize_documents
from pkm_jax.data.tokenizer import (load_tokenizer, save_tokenizer, special_token_ids,
                                    tokenizer_fingerprint, train_tokenizer)
from test_data import _TinyText, small_data_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LEN = 32

# Text the generated corpus never has: accents, Greek final sigma, CJK, combining marks, tabs,
# no-break and double spaces, control characters, literal special tokens, a word longer than
# WordPiece's 100-character limit, a sentence longer than a row, CRLF and CR line ends, a
# whitespace-only "blank" line, invalid UTF-8, and no newline at the end of the file.
ODD_TEXT = ("Café naïve ΟΔΟΣ σοφός 中文字 x\u0301y  two  spaces\r\n"
            "tab\there no\xa0break \x07bell\x1cgroup [MASK] x[MASK]y [SEP]\r\n"
            "   \n" + "w" * 150 + " " + " ".join(["long"] * 80) + "\rafter a CR\n\n"
            "Ünïcödé STRASSE ß \u2028 line sep \ufeffbom\n" + "bad \xff byte\n\nlast line")


def write_corpus(folder, num_docs: int = 240, seed: int = 0) -> str:
  """Generated documents in three files (blank lines between documents) plus the odd text;
  returns the glob."""
  os.makedirs(folder, exist_ok=True)
  docs = corpus_lib.generate_corpus(60, num_docs, seed).train
  for k in range(3):
    with open(os.path.join(folder, f"part{k}.txt"), "w", encoding="utf-8") as f:
      f.write("\n\n".join("\n".join(doc) for doc in docs[k::3]) + "\n")
  with open(os.path.join(folder, "part3.txt"), "wb") as f:
    f.write(ODD_TEXT.encode("utf-8").replace("\xff".encode("utf-8"), b"\xff"))
  return os.path.join(str(folder), "*.txt")


def reference_rows(pattern: str, tok, held: bool | None = None, fraction: float = 0.0,
                   max_len: int = MAX_LEN):
  """The in-memory packer's rows of the files' documents (held-out ones only, or the others)."""
  docs = sources.read_text_documents(sources.expand_files(pattern))
  if held is not None:
    keep = text_stream.held_out(np.arange(len(docs)), fraction) == held
    docs = [d for d, k in zip(docs, keep) if k]
  ids = special_token_ids(tok)
  return pack_sequences(tokenize_documents(docs, tok), max_len, cls_id=ids["cls"],
                        sep_id=ids["sep"], pad_id=ids["pad"])


def all_rows(folder, split):
  rows = prepared_lib.PreparedRows(str(folder), split)
  return rows.read(np.arange(len(rows)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  pattern = write_corpus(root / "text")
  docs = sources.read_text_documents(sources.expand_files(pattern))
  tok = train_tokenizer([s for d in docs for s in d], 400)
  save_tokenizer(tok, str(root / "tokenizer.json"))
  return root, pattern, tok


def test_prepare_command_writes_the_in_memory_packers_rows(corpus, tmp_path):
  root, pattern, tok = corpus
  out = tmp_path / "prepared"
  cmd = [sys.executable, "-m", "pkm_jax.data.prepare", f"--input={pattern}",
         f"--tokenizer={root / 'tokenizer.json'}", f"--max_len={MAX_LEN}", f"--out={out}",
         "--eval_fraction=0.1", "--workers=2", "--rows_per_shard=64"]
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip().splitlines()[-1].startswith(f"Prepared {out}: train: ")
  meta = json.loads((out / "metadata.json").read_text())
  np.testing.assert_array_equal(all_rows(out, "train"),
                                reference_rows(pattern, tok, held=False, fraction=0.1))
  np.testing.assert_array_equal(all_rows(out, "eval"),
                                reference_rows(pattern, tok, held=True, fraction=0.1))
  train, held = meta["splits"]["train"], meta["splits"]["eval"]
  num_docs = len(sources.read_text_documents(sources.expand_files(pattern)))
  assert train["documents"] + held["documents"] == num_docs and held["documents"] == num_docs // 10
  assert len(train["shards"]) == -(-train["rows"] // 64) > 1  # several shards, none empty
  assert meta["max_len"] == MAX_LEN and meta["vocab_size"] == tok.get_vocab_size()
  assert meta["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok)
  assert meta["dtype"] == "uint16" and meta["special_ids"] == special_token_ids(tok)
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary folder left
  # Every file hashed; the metadata checked on open, a shard when it is first read.
  assert sorted(checksums.read(str(out))) == sorted(n for n in os.listdir(out)
                                                    if n != checksums.MANIFEST)
  shard = out / train["shards"][-1]["file"]
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 1
  shard.write_bytes(bytes(data))
  rows = prepared_lib.PreparedRows(str(out), "train")
  rows.read(np.arange(3))  # the first shard is intact
  with pytest.raises(ValueError, match=f"prepared shard {shard} is corrupt: .* does not match "
                                       "its checksum"):
    rows.read(np.array([len(rows) - 1]))
  meta_file = out / "metadata.json"
  meta_file.write_text(meta_file.read_text().replace('"max_len": 32', '"max_len": 33'))
  with pytest.raises(ValueError, match="metadata.json does not match its checksum"):
    prepared_lib.read_metadata(str(out))


def test_one_worker_separate_eval_input_and_learnt_vocabulary(corpus, tmp_path):
  root, pattern, _ = corpus
  eval_file = root / "text" / "part3.txt"
  meta = prepare_lib.prepare(str(tmp_path / "p"), inputs=pattern, eval_inputs=str(eval_file),
                             vocab_size=300, max_len=MAX_LEN, workers=1, progress=False)
  # The vocabulary learnt from the stream is the one learnt from the sentences in memory.
  docs = sources.read_text_documents(sources.expand_files(pattern))
  want = train_tokenizer([s for d in docs for s in d], 300)
  tok = load_tokenizer(str(tmp_path / "p"))
  assert tok.get_vocab() == want.get_vocab()
  assert meta["tokenizer"]["fingerprint"] == tokenizer_fingerprint(want)
  np.testing.assert_array_equal(all_rows(tmp_path / "p", "train"), reference_rows(pattern, tok))
  np.testing.assert_array_equal(all_rows(tmp_path / "p", "eval"),
                                reference_rows(str(eval_file), tok))


def test_streaming_packer_equals_pack_sequences_however_the_stream_is_cut():
  rng = np.random.default_rng(0)
  next_id, docs = 10, []
  for _ in range(60):
    doc = []
    for _ in range(rng.integers(1, 6)):
      length = int(rng.choice([0, 1, 3, 7, 12, 14, 15, 28, 29, 61]))  # around the cap of 14
      doc.append(list(range(next_id, next_id + length)))
      next_id += length
    docs.append(doc)
  want = pack_sequences(docs, 16, cls_id=2, sep_id=3, pad_id=0)
  lens = np.array([x for doc in docs for x in [len(s) for s in doc] + [BOUNDARY]])
  ids = np.array([t for doc in docs for s in doc for t in s], np.int32)
  offsets = np.concatenate([[0], np.cumsum(np.maximum(lens, 0))])
  for cuts in ([], [1], sorted(rng.choice(len(lens), 20, replace=False).tolist())):
    packer = RowPacker(16, cls_id=2, sep_id=3, pad_id=0)
    bounds = [0, *cuts, len(lens)]
    got = [packer.add(lens[a:b], ids[offsets[a]:offsets[b]]) for a, b in zip(bounds, bounds[1:])]
    np.testing.assert_array_equal(np.concatenate(got + [packer.finish()]), want)


def test_encoder_equals_hugging_face_ids(corpus):
  _, pattern, tok = corpus
  sentences = [s for d in sources.read_text_documents(sources.expand_files(pattern)) for s in d]
  sentences += ["", "  lead and trail  ", "\u3000ideographic\u3000space", "a\u200bzero width",
                "a line\nbreak inside"]
  want = [e.ids for e in tok.encode_batch(sentences, add_special_tokens=False)]
  for encoder in (SentenceEncoder(tok), SentenceEncoder(tok, max_words=50)):  # 50: evictions
    assert encoder.by_word
    for _ in range(2):  # cold, then remembered words
      lens, ids = encoder.encode(sentences)
      assert [x.tolist() for x in np.split(ids, np.cumsum(lens)[:-1])] == want
  # A tokenizer whose pre-tokeniser keeps spaces inside tokens is encoded sentence by sentence.
  metaspace = Tokenizer(models.WordPiece(tok.get_vocab(), unk_token="[UNK]"))
  metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
  assert not splits_at_spaces(metaspace)
  lens, ids = SentenceEncoder(metaspace).encode(sentences[:50])
  assert ids.tolist() == [i for e in metaspace.encode_batch(sentences[:50],
                                                            add_special_tokens=False)
                          for i in e.ids]


def test_keyed_permutations_and_uniforms():
  for n in (1, 2, 3, 17, 1000):
    for epoch in (0, 1, 7):
      assert sorted(keyed_random.permute(np.arange(n), n, 5, epoch)) == list(range(n))
  a, b = keyed_random.permute(np.arange(500), 500, 5, 0), keyed_random.permute(np.arange(500),
                                                                               500, 5, 1)
  assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(500))
  # Evaluated piecewise, in any order: the same images.
  np.testing.assert_array_equal(keyed_random.permute(np.array([499, 3]), 500, 5, 0), a[[499, 3]])
  u = keyed_random.uniform(1, 2, np.arange(2000), 64)
  assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005 and u.min() >= 0
  np.testing.assert_array_equal(keyed_random.uniform(1, 2, np.array([7]), 64), u[7:8])
  assert not np.array_equal(keyed_random.uniform(1, 3, np.arange(4), 8), u[:4, :8])


def test_bad_input_one_line_nothing_written(corpus, tmp_path):
  root, pattern, _ = corpus
  tokenizer = str(root / "tokenizer.json")
  (tmp_path / "empty.txt").write_text("\n \n\n")
  keep = tmp_path / "existing"
  keep.mkdir()
  (keep / "mine.txt").write_text("do not touch")
  cases = [
      (dict(inputs=f"{tmp_path}/nothing*.txt", tokenizer=tokenizer), "--input: no file matches"),
      (dict(inputs=f"{tmp_path}/empty.txt", tokenizer=tokenizer), "holds no text"),
      (dict(inputs=pattern, tokenizer="/no/such/tokenizer.json"), "does not exist"),
      (dict(inputs=pattern), "exactly one of --tokenizer"),
      (dict(inputs=pattern, tokenizer=tokenizer, eval_fraction=0.001), "held out no document"),
      (dict(inputs=pattern, tokenizer=tokenizer, max_len=2), "--max_len=2"),
  ]
  for kwargs, message in cases:
    with pytest.raises((ValueError, FileNotFoundError), match=message):
      prepare_lib.prepare(str(tmp_path / "out"), workers=1, progress=False, **kwargs)
    assert sorted(os.listdir(tmp_path)) == ["empty.txt", "existing"], kwargs  # nothing left
  # As typed: one line, exit status 1, the existing folder untouched.
  done = subprocess.run([sys.executable, "-m", "pkm_jax.data.prepare", f"--input={pattern}",
                         f"--tokenizer={tokenizer}", f"--out={keep}"], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1] == (
      f"error: FileExistsError: --out {keep} exists and is not empty (pass --overwrite to "
      "replace it)")
  assert os.listdir(keep) == ["mine.txt"]


def test_interrupted_preparation_leaves_no_prepared_folder(corpus, tmp_path):
  root, _, _ = corpus
  big = tmp_path / "big.txt"
  with open(big, "w", encoding="utf-8") as f:
    for i in range(60_000):
      f.write(f"Sentence number {i} of a document that is long enough.\n" + "\n" * (i % 5 == 0))
  out = tmp_path / "out"
  proc = subprocess.Popen([sys.executable, "-m", "pkm_jax.data.prepare", f"--input={big}",
                           f"--tokenizer={root / 'tokenizer.json'}", f"--out={out}",
                           "--rows_per_shard=64", "--workers=1"], cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  tmp = []
  while time.time() < deadline and proc.poll() is None and not any(
      name.endswith(".array_record") for t in tmp for name in os.listdir(t)):
    tmp = [tmp_path / n for n in os.listdir(tmp_path) if n.startswith(".out.tmp-")]
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL, "the preparation ended before it was killed"
  assert not out.exists() and len(tmp) == 1
  with pytest.raises(FileNotFoundError, match="not a prepared folder: no metadata.json"):
    prepared_lib.read_metadata(str(tmp[0]))


def test_prepare_from_tfds_equals_the_in_memory_tfds_source(tmp_path):
  _TinyText.prepare(str(tmp_path / "tfds"))
  out = str(tmp_path / "prepared")
  prepare_lib.prepare(out, tfds_name="pkm_tiny_text", tfds_split="train",
                      tfds_eval_split="validation", data_dir=str(tmp_path / "tfds"),
                      vocab_size=200, max_len=MAX_LEN, workers=1, progress=False)
  cfg = small_data_cfg(source="tfds", tfds_name="pkm_tiny_text", tfds_split="train",
                       tfds_eval_split="validation", data_dir=str(tmp_path / "tfds"),
                       max_len=MAX_LEN)
  train_docs, eval_docs = sources.load_documents(cfg)
  tok = load_tokenizer(out)
  # The vocabulary is learnt from the training split only, as build_tokenizer learns it.
  assert tok.get_vocab() == train_tokenizer([s for d in train_docs for s in d], 200).get_vocab()
  ids = special_token_ids(tok)
  for split, docs in (("train", train_docs), ("eval", eval_docs)):
    want = pack_sequences(tokenize_documents(docs, tok), MAX_LEN, cls_id=ids["cls"],
                          sep_id=ids["sep"], pad_id=ids["pad"])
    np.testing.assert_array_equal(all_rows(out, split), want)
