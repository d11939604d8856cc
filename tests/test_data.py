"""pkm_jax.data: corpus, sources, MLM masking, packing, train/eval iterators (tokenizer: see
test_tokenizer.py). References are brute-force counts and the world's own fact table."""

import collections
import json
import re

import numpy as np
import pytest

from pkm_jax.config import base_config
from pkm_jax.data import corpus as corpus_lib
from pkm_jax.data import pipeline as pipe
from pkm_jax.data import sources
from pkm_jax.data.mlm import MLMMasker, mask_tokens, max_masked
from pkm_jax.data.tokenizer import build_tokenizer, special_token_ids


def small_data_cfg(**overrides):
  cfg = base_config().data
  cfg.update(vocab_size=600, max_len=32, batch_size=8, eval_fraction=0.1)
  cfg.generated.update(num_entities=50, num_docs=200, seed=0)
  cfg.update(**overrides)
  return cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  cfg = small_data_cfg()
  tok = build_tokenizer(cfg, str(tmp_path_factory.mktemp("run")))
  return cfg, tok


def originals(batch):
  """The unmasked ids: labels where a token is predicted, inputs elsewhere."""
  return np.where(batch["mlm_weights"] > 0, batch["mlm_labels"], batch["input_ids"])


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# Generated corpus


def test_corpus_is_deterministic_by_seed():
  a = corpus_lib.generate_corpus(40, 120, seed=1)
  b = corpus_lib.generate_corpus(40, 120, seed=1)
  c = corpus_lib.generate_corpus(40, 120, seed=2)
  assert a.train == b.train and a.eval == b.eval and a.world == b.world
  assert a.train != c.train and a.world.attributes != c.world.attributes
  assert len(a.train) == 120 and len(a.eval) == 6


# Unambiguous templates, parsed back into (subject, relation, object) to check the text against
# the world's fact table. Names are capitalised words; a pronoun subject is skipped.
_NAME = r"((?:[A-Z][a-z]+)(?: [A-Z][a-z]+)*)"
_PARSERS = [
    (re.compile(rf"{_NAME} was born in the city of {_NAME}\."), "born_in"),
    (re.compile(rf"{_NAME} is a native of {_NAME}\."), "born_in"),
    (re.compile(rf"{_NAME} is employed by {_NAME}\."), "employer"),
    (re.compile(rf"{_NAME} has a job at {_NAME}\."), "employer"),
    (re.compile(rf"the capital of {_NAME} is {_NAME}\.", re.I), "capital"),
    (re.compile(rf"{_NAME} is headquartered in {_NAME}\."), "headquarters"),
    (re.compile(rf"{_NAME} is based in {_NAME}\."), "headquarters"),
]


def parsed_facts(docs):
  found = []
  for doc in docs:
    for sentence in doc:
      for pattern, relation in _PARSERS:
        m = pattern.fullmatch(sentence)
        if m and m.group(1) not in ("He", "She", "It"):
          found.append((m.group(1), relation, m.group(2)))
  return found


def test_corpus_states_true_facts_and_held_out_docs_restate_them_differently():
  corpus = corpus_lib.generate_corpus(80, 800, seed=0, num_eval_docs=60)
  world = corpus.world
  facts = set(world.facts())
  train_facts, eval_facts = parsed_facts(corpus.train), parsed_facts(corpus.eval)
  assert len(train_facts) > 50 and len(eval_facts) > 10
  assert set(train_facts) <= facts and set(eval_facts) <= facts  # no false statements

  # Every fact of the world is stated in training text: its subject and object share a sentence
  # (sentences with a pronoun subject name the object only, so count those via the document).
  def stated_pairs(docs):
    pairs = set()
    for doc in docs:
      text = " ".join(doc)
      for s, _, o in facts:
        if s in text and o in text:
          pairs.add((s, o))
    return pairs

  train_pairs = stated_pairs(corpus.train)
  assert {(s, o) for s, _, o in facts} <= train_pairs
  train_docs, train_sentences = set(corpus.train), {s for d in corpus.train for s in d}
  for doc in corpus.eval:
    assert doc not in train_docs
    assert stated_pairs([doc]) & train_pairs  # restates known facts
  eval_sentences = [s for d in corpus.eval for s in d]
  novel = sum(s not in train_sentences for s in eval_sentences) / len(eval_sentences)
  assert novel > 0.4  # mostly held-out templates / connectives
  # Held-out-only templates never occur in training text.
  held_only = re.compile(r"is a native of|has a job at|is based in|earns a living as")
  assert not any(held_only.search(s) for s in train_sentences)
  assert any(held_only.search(s) for s in eval_sentences)


# ---------------------------------------------------------------------------------------------
# MLM masking


def test_masking_statistics():
  rng = np.random.default_rng(0)
  b, t, vocab = 3000, 48, 1000
  special = np.array([0, 1, 2, 3, 4])  # pad, unk, cls, sep, mask
  lengths = rng.integers(3, t + 1, size=b)
  ids = rng.integers(5, vocab, size=(b, t))
  ids[rng.random((b, t)) < 0.02] = 1  # a few [UNK]s inside the text: never chosen
  ids[:, 0] = 2
  ids[np.arange(b), lengths - 1] = 3
  ids[np.arange(t)[None, :] >= lengths[:, None]] = 0
  out = mask_tokens(ids, np.random.default_rng(1), mask_prob=0.15, mask_id=4,
                    special_ids=special, vocab_size=vocab)
  chosen = out["mlm_weights"] > 0
  maskable = ~np.isin(ids, special)

  assert not (chosen & ~maskable).any()  # specials and padding never chosen
  np.testing.assert_array_equal(out["mlm_labels"][chosen], ids[chosen])
  assert (out["mlm_labels"][~chosen] == 0).all()
  np.testing.assert_array_equal(out["input_ids"][~chosen], ids[~chosen])
  # Exact count per sequence: floor or ceil of 0.15 * maskable, at least one.
  m, n = maskable.sum(1), chosen.sum(1)
  assert ((n == np.floor(0.15 * m)) | (n == np.ceil(0.15 * m)) | ((n == 1) & (m > 0))).all()
  assert (n[m > 0] >= 1).all()
  assert abs(n.sum() / m.sum() - 0.15) < 0.01
  # Every maskable position is equally likely (first vs. last text position of each row).
  first, last = chosen[:, 1].mean(), chosen[np.arange(b), lengths - 2].mean()
  assert abs(first - last) < 0.03

  new = out["input_ids"][chosen]
  frac_mask = (new == 4).mean()
  frac_same = (new == ids[chosen]).mean()
  frac_random = 1 - frac_mask - frac_same
  assert abs(frac_mask - 0.8) < 0.02 and abs(frac_same - 0.1) < 0.015
  assert abs(frac_random - 0.1) < 0.015
  assert not np.isin(new[new != 4], special).any()  # random replacements are never special
  # Random replacements are spread over the vocabulary, not a few ids.
  assert len(np.unique(new[(new != 4) & (new != ids[chosen])])) > 0.5 * frac_random * len(new)
  assert out["input_ids"].dtype == np.int32 and out["mlm_weights"].dtype == np.float32


@pytest.mark.parametrize("mask_prob", [0.01, 0.15, 0.2, 0.5, 1.0])
def test_no_row_has_more_masked_tokens_than_max_masked(mask_prob):
  """The pretraining loss scores max_masked(mask_prob, T) positions per row: both masking
  paths (a numpy Generator and the keyed per-row draws) stay within it, rows of every length."""
  rng = np.random.default_rng(2)
  b, t, vocab = 4000, 20, 100
  lengths = rng.integers(1, t + 1, size=b)
  ids = rng.integers(5, vocab, size=(b, t))
  ids[np.arange(t)[None, :] >= lengths[:, None]] = 0
  bound = max_masked(mask_prob, t)
  out = mask_tokens(ids, rng, mask_prob=mask_prob, mask_id=4, special_ids=np.arange(5),
                    vocab_size=vocab)
  keyed = MLMMasker({"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}, vocab, mask_prob)(
      ids, np.arange(b), seed=3)
  for batch in (out, keyed):
    n = (batch["mlm_weights"] > 0).sum(axis=1)
    assert n.max() <= bound
  assert bound <= min(t, int(np.ceil(mask_prob * t)) + 1)


# ---------------------------------------------------------------------------------------------
# Packing


def test_packing_keeps_every_token_once_in_order():
  # Synthetic documents with unique token ids, so each id's row is known.
  rng = np.random.default_rng(0)
  next_id, docs = 10, []
  for _ in range(40):
    doc = []
    for _ in range(rng.integers(1, 6)):
      length = int(rng.choice([0, 1, 3, 7, 12, 25, 61]))  # some longer than a row
      doc.append(list(range(next_id, next_id + length)))
      next_id += length
    docs.append(doc)
  max_len, cap = 16, 14
  rows = pipe.pack_sequences(docs, max_len, cls_id=2, sep_id=3, pad_id=0)
  assert rows.shape[1] == max_len and rows.dtype == np.int32
  content = []
  row_of = {}
  for r, row in enumerate(rows):
    real = row[row != 0]
    assert real[0] == 2 and real[-1] == 3 and (row[len(real):] == 0).all()
    for tok in real[1:-1]:
      if tok != 3:
        content.append(tok)
        row_of[tok] = r
  assert content == list(range(10, next_id))  # every token exactly once, in order
  # A sentence that fits a row is never split; [SEP]s inside a row mark document boundaries.
  for doc in docs:
    for sent in doc:
      if 0 < len(sent) <= cap:
        assert len({row_of[t] for t in sent}) == 1
  doc_of = {tok: d for d, doc in enumerate(docs) for sent in doc for tok in sent}
  for row in rows:
    inner = [int(x) for x in row[1:np.count_nonzero(row) - 1]]
    for a, b in zip(inner, inner[1:]):
      if a != 3 and b != 3:
        assert doc_of[a] == doc_of[b]  # no document boundary without a [SEP]
      elif a == 3:
        assert doc_of[b] > doc_of[inner[inner.index(b) - 2]]
  # Rows are well filled: a row ends only because the next sentence did not fit.
  assert np.count_nonzero(rows) / rows.size > 0.6


def test_packing_real_corpus(setup):
  cfg, tok = setup
  train_docs, _ = sources.load_documents(cfg)
  ids = pipe.tokenize_documents(train_docs, tok)
  sp = special_token_ids(tok)
  rows = pipe.pack_sequences(ids, cfg.max_len, cls_id=sp["cls"], sep_id=sp["sep"],
                             pad_id=sp["pad"])
  stream = [t for doc in ids for s in doc for t in s]
  kept = rows[~np.isin(rows, [sp["cls"], sp["sep"], sp["pad"]])]
  np.testing.assert_array_equal(kept, stream)
  # Decoding a row gives back corpus text.
  text = tok.decode(rows[0].tolist())
  assert text.split(".")[0] in " ".join(train_docs[0]).lower()


# ---------------------------------------------------------------------------------------------
# Train iterator: determinism, resume, shards


def test_train_iterator_resume_and_epochs(setup):
  cfg, tok = setup
  train, _ = pipe.make_mlm_data(cfg, tok, seed=7)
  first = [next(train) for _ in range(3)]
  state = json.loads(json.dumps(train.get_state()))
  rest = [next(train) for _ in range(4)]
  resumed, _ = pipe.make_mlm_data(cfg, tok, seed=7)
  resumed.set_state(state)
  for a, b in zip(rest, [next(resumed) for _ in range(4)]):
    assert_batches_equal(a, b)
  # The batch at step n is a function of (seed, n) only.
  again, _ = pipe.make_mlm_data(cfg, tok, seed=7)
  assert_batches_equal(first[0], next(again))
  other, _ = pipe.make_mlm_data(cfg, tok, seed=8)
  assert not np.array_equal(next(other)["input_ids"], first[0]["input_ids"])

  batch = first[0]
  assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "mlm_labels",
                        "mlm_weights"}
  assert all(v.shape == (cfg.batch_size, cfg.max_len) for v in batch.values())
  assert (batch["token_type_ids"] == 0).all()
  np.testing.assert_array_equal(batch["attention_mask"], originals(batch) != 0)

  # Each epoch visits every packed sequence exactly once, in a new order per epoch.
  seqs = train.sequences_NxT
  n = len(seqs)
  epochs = 2
  rows = np.concatenate([originals(train.global_batch(s))
                         for s in range(-(-epochs * n // cfg.batch_size))])
  as_keys = lambda a: collections.Counter(r.tobytes() for r in a)
  assert as_keys(rows[:n]) == as_keys(seqs) == as_keys(rows[n:2 * n])
  assert not np.array_equal(rows[:n], rows[n:2 * n])


def test_train_iterator_shards_concatenate_to_global_batch(setup):
  cfg, tok = setup
  full, _ = pipe.make_mlm_data(cfg, tok, seed=3)
  shards = [pipe.make_mlm_data(cfg, tok, seed=3, shard_index=i, shard_count=4)[0]
            for i in range(4)]
  for step in range(3):
    whole = next(full)
    parts = [next(s) for s in shards]
    assert parts[0]["input_ids"].shape == (cfg.batch_size // 4, cfg.max_len)
    assert_batches_equal(whole, {k: np.concatenate([p[k] for p in parts]) for k in whole})
  # A checkpoint written by a 1-host run resumes on 4 hosts (the state is global).
  state = full.get_state()
  for s in shards:
    s.set_state(state)
  whole, parts = next(full), [next(s) for s in shards]
  assert_batches_equal(whole, {k: np.concatenate([p[k] for p in parts]) for k in whole})


def test_set_state_refuses_other_data(setup):
  cfg, tok = setup
  train, _ = pipe.make_mlm_data(cfg, tok, seed=0)
  state = train.get_state()
  other = small_data_cfg(max_len=24)
  train2, _ = pipe.make_mlm_data(other, tok, seed=0)
  with pytest.raises(ValueError, match="changed since the checkpoint"):
    train2.set_state(state)


# ---------------------------------------------------------------------------------------------
# Eval batches


def test_eval_batches_fixed_padded_and_sharded(setup):
  cfg, tok = setup
  n_eval = len(pipe.make_mlm_data(cfg, tok, seed=0)[1].sequences_NxT)
  batch_size = next(b for b in (6, 7, 5, 9, 11) if n_eval % b)  # force a partial last batch
  cfg = small_data_cfg(batch_size=batch_size)
  _, eval_a = pipe.make_mlm_data(cfg, tok, seed=0)
  _, eval_b = pipe.make_mlm_data(cfg, tok, seed=99)  # eval masks do not depend on the seed
  pass1, pass2, pass3 = list(eval_a()), list(eval_a()), list(eval_b())
  assert len(pass1) == -(-n_eval // batch_size) == eval_a.num_batches
  for x, y, z in zip(pass1, pass2, pass3):
    assert_batches_equal(x, y)
    assert_batches_equal(x, z)
    assert all(v.shape == (batch_size, cfg.max_len) for v in x.values())
  real_rows = np.concatenate([b["attention_mask"].any(1) for b in pass1])
  assert real_rows.sum() == n_eval and real_rows[:n_eval].all()
  last = pass1[-1]
  pad_rows = ~last["attention_mask"].any(1)
  assert pad_rows.any() and (last["mlm_weights"][pad_rows] == 0).all()
  assert (last["input_ids"][pad_rows] == special_token_ids(tok)["pad"]).all()
  # All held-out text is there, in order.
  np.testing.assert_array_equal(
      np.concatenate([originals(b) for b in pass1])[:n_eval], eval_a.sequences_NxT)
  assert len(list(eval_a(2))) == 2 and len(list(eval_a(10_000))) == len(pass1)

  cfg2 = small_data_cfg(batch_size=8)
  whole = list(pipe.make_mlm_data(cfg2, tok, seed=0)[1]())
  halves = [list(pipe.make_mlm_data(cfg2, tok, seed=0, shard_index=i, shard_count=2)[1]())
            for i in range(2)]
  for w, h0, h1 in zip(whole, *halves):
    assert_batches_equal(w, {k: np.concatenate([h0[k], h1[k]]) for k in w})


# ---------------------------------------------------------------------------------------------
# Other sources and errors


def test_files_source(tmp_path):
  (tmp_path / "a.txt").write_text("Alpha one. \nAlpha two.\n\n\nBeta one.\n", encoding="utf-8")
  (tmp_path / "b.txt").write_text("\n".join(f"Doc {i} line one.\nDoc {i} line two.\n"
                                            for i in range(18)), encoding="utf-8")
  (tmp_path / "c.md").write_text("Gamma only.\nsecond line\n", encoding="utf-8")
  cfg = small_data_cfg(source="files", files=f"{tmp_path}/*.txt, {tmp_path}/c.md",
                       vocab_size=200, eval_fraction=0.1)
  train, held = sources.load_documents(cfg)
  expected = ([("Alpha one.", "Alpha two."), ("Beta one.",)]
              + [(f"Doc {i} line one.", f"Doc {i} line two.") for i in range(18)]
              + [("Gamma only.", "second line")])
  assert len(held) == 2 and sorted(train + held) == sorted(expected)
  assert [d for d in expected if d in train] == list(train)  # order kept
  assert sources.load_documents(small_data_cfg(source="files", files=cfg.files,
                                               eval_fraction=0.1)) == (train, held)
  tok = build_tokenizer(cfg, str(tmp_path / "run"))
  train_iter, eval_data = pipe.make_mlm_data(cfg, tok, seed=0)
  assert next(train_iter)["input_ids"].shape == (8, 32)
  assert len(list(eval_data())) == 1


class _TinyText:
  """A real TFDS dataset (array_record), prepared into tmp_path without TensorFlow."""

  TRAIN = [f"Document {i} starts here. It has a second sentence!\nAnd a third line {i}."
           for i in range(20)]
  VALID = ["Held out text. Another one.", "Second held out document."]

  @classmethod
  def prepare(cls, data_dir: str) -> None:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    texts = {"train": cls.TRAIN, "validation": cls.VALID}
    with tfds.core.registered.skip_registration():  # read back by name from data_dir only

      class PkmTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
          return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
              {"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
          del dl_manager
          return {split: self._generate_examples(split) for split in texts}

        def _generate_examples(self, split):
          for i, t in enumerate(texts[split]):
            yield f"{split}{i}", {"text": t}

      PkmTinyText(data_dir=data_dir, file_format="array_record").download_and_prepare()


def test_tfds_source(tmp_path):
  _TinyText.prepare(str(tmp_path))
  cfg = small_data_cfg(source="tfds", tfds_name="pkm_tiny_text", tfds_split="train",
                       tfds_eval_split="validation", data_dir=str(tmp_path), vocab_size=200)
  train, held = sources.load_documents(cfg)
  expected = sorted(sources.split_sentences(t) for t in _TinyText.TRAIN)
  assert sorted(train) == expected
  assert train[0] == (train[0][0], "It has a second sentence!", train[0][2])
  assert sorted(held) == [("Held out text.", "Another one."), ("Second held out document.",)]
  cfg.tfds_eval_split = ""  # no eval split: hold out eval_fraction of train
  train2, held2 = sources.load_documents(cfg)
  assert len(held2) == 2 and sorted(train2 + held2) == expected
  tok = build_tokenizer(cfg, str(tmp_path / "run"))
  train_iter, _ = pipe.make_mlm_data(cfg, tok, seed=0)
  assert next(train_iter)["input_ids"].shape == (8, 32)
  with pytest.raises(ValueError, match="no feature data.text_key='body'"):
    sources.load_documents(small_data_cfg(source="tfds", tfds_name="pkm_tiny_text",
                                          data_dir=str(tmp_path), text_key="body"))
  with pytest.raises(ValueError, match="cannot be read: .*Unknown split"):
    sources.load_documents(small_data_cfg(source="tfds", tfds_name="pkm_tiny_text",
                                          tfds_split="test", data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match="'no_such_dataset_xyz'.*cannot be read"):
    sources.load_documents(small_data_cfg(source="tfds", tfds_name="no_such_dataset_xyz",
                                          data_dir=str(tmp_path)))


def test_split_sentences():
  assert sources.split_sentences("One two. Three? \"Four\" five!\n\nSix 7. 8 nine e.g. ten") == (
      "One two.", "Three?", "\"Four\" five!", "Six 7.", "8 nine e.g. ten")


def test_errors(tmp_path, setup):
  _, tok = setup
  with pytest.raises(ValueError, match="data.source='web' is not one of"):
    sources.load_documents(small_data_cfg(source="web"))
  with pytest.raises(FileNotFoundError, match="no file matches"):
    sources.load_documents(small_data_cfg(source="files", files=f"{tmp_path}/*.txt"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.load_documents(small_data_cfg(source="files", files=f"{tmp_path}/missing.txt"))
  with pytest.raises(ValueError, match="needs data.files"):
    sources.load_documents(small_data_cfg(source="files", files=" , "))
  (tmp_path / "empty.txt").write_text("\n\n  \n")
  with pytest.raises(ValueError, match="hold no text"):
    sources.load_documents(small_data_cfg(source="files", files=str(tmp_path / "empty.txt")))
  (tmp_path / "one.txt").write_text("a single document\nwithout blank lines\n")
  with pytest.raises(ValueError, match="only 1 document"):
    sources.load_documents(small_data_cfg(source="files", files=str(tmp_path / "one.txt")))
  with pytest.raises(ValueError, match="needs data.tfds_name"):
    sources.load_documents(small_data_cfg(source="tfds"))
  with pytest.raises(ValueError, match="not divisible by the 3 hosts"):
    pipe.make_mlm_data(small_data_cfg(), tok, seed=0, shard_count=3)
  with pytest.raises(ValueError, match="max_len=2"):
    pipe.make_mlm_data(small_data_cfg(max_len=2), tok, seed=0)
  with pytest.raises(ValueError, match="mask_prob"):
    next(pipe.make_mlm_data(small_data_cfg(mask_prob=0.0), tok, seed=0)[0])
  with pytest.raises(ValueError, match="num_entities=5"):
    corpus_lib.generate_corpus(5, 10, seed=0)
