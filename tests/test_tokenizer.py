"""pkm_jax.data.tokenizer vs a hand-written BERT reference (basic split + greedy WordPiece)."""

import json
import os
import unicodedata

import pytest

from pkm_jax.config import base_config
from pkm_jax.data import corpus as corpus_lib
from pkm_jax.data import tokenizer as tok_lib

# ---------------------------------------------------------------------------------------------
# Independent reference: BERT's BasicTokenizer + WordpieceTokenizer, written from the paper's
# description (lowercase, strip accents, split on whitespace and punctuation, then greedy
# longest-match-first pieces with "##" continuations; no match -> [UNK] for the whole word).


def _is_punct(ch: str) -> bool:
  cp = ord(ch)
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(ch).startswith("P")


def ref_basic_split(text: str, lower: bool) -> list[str]:
  if lower:
    text = text.lower()
    text = "".join(c for c in unicodedata.normalize("NFD", text)
                   if unicodedata.category(c) != "Mn")
  words = []
  for chunk in text.split():
    current = ""
    for ch in chunk:
      if _is_punct(ch):
        if current:
          words.append(current)
        words.append(ch)
        current = ""
      else:
        current += ch
    if current:
      words.append(current)
  return words


def ref_wordpiece(word: str, vocab: dict[str, int]) -> list[str]:
  pieces, start = [], 0
  while start < len(word):
    end, match = len(word), None
    while end > start:
      piece = word[start:end] if start == 0 else "##" + word[start:end]
      if piece in vocab:
        match = piece
        break
      end -= 1
    if match is None:
      return ["[UNK]"]
    pieces.append(match)
    start = end
  return pieces


def ref_encode(text: str, vocab: dict[str, int], lower: bool) -> list[int]:
  return [vocab[p] for w in ref_basic_split(text, lower) for p in ref_wordpiece(w, vocab)]


# ---------------------------------------------------------------------------------------------
# A Hugging Face bert-base-uncased style vocab: [PAD]=0, [unused0..98], [UNK]=100, [CLS]=101,
# [SEP]=102, [MASK]=103, then whole words and "##" pieces.

WORDS = ["the", "un", "##aff", "##able", "play", "##ing", "##s", "##ed", "cafe", "café", "hello",
         "Hello", "The", "world", ".", ",", "!", "-", "'", "a", "##b", "b", "##c", "c",
         "##a", "stra", "##sse", "straße"]
TEXT = ("Hello the World, THE unaffable cafe café playing plays played! un-playable "
        "abc cab straße Strasse xyz")


def write_hf_vocab(folder, lower=None) -> dict[str, int]:
  os.makedirs(folder, exist_ok=True)
  lines = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]",
                                                              "[MASK]"] + WORDS
  with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  if lower is not None:
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
      json.dump({"do_lower_case": lower}, f)
  return {t: i for i, t in enumerate(lines)}


@pytest.mark.parametrize("lower", [True, False, None])
def test_vocab_txt_matches_reference_wordpiece(tmp_path, lower):
  vocab = write_hf_vocab(tmp_path, lower)
  tok = tok_lib.load_tokenizer(str(tmp_path / "vocab.txt"))
  expected = ref_encode(TEXT, vocab, lower=lower is not False)  # no config: uncased (default)
  assert tok.encode(TEXT, add_special_tokens=False).ids == expected
  # The reference really exercises casing, accents, pieces and unknown words.
  assert vocab["[UNK]"] in expected and vocab["##aff"] in expected
  assert (vocab["Hello"] in expected) == (lower is False)
  ids = tok_lib.special_token_ids(tok)
  assert ids == dict(pad=0, unk=100, cls=101, sep=102, mask=103)
  with_specials = tok.encode("the world").ids
  assert with_specials == [101, vocab["the"], vocab["world"], 102]
  assert tok.encode("the [MASK] world", add_special_tokens=False).ids == [
      vocab["the"], 103, vocab["world"]]
  assert tok.get_vocab_size() == len(vocab)


def test_vocab_ids_are_line_numbers_even_with_odd_lines(tmp_path):
  lines = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "", "world", "hello", "x"]
  (tmp_path / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
  tok = tok_lib.load_tokenizer(str(tmp_path))
  assert tok.get_vocab_size() == len(lines)
  # As in Hugging Face's load_vocab: a repeated token keeps its last line.
  assert tok.encode("world hello x", add_special_tokens=False).ids == [7, 8, 9]


def test_folder_prefers_tokenizer_json_and_casing_from_config(tmp_path):
  write_hf_vocab(tmp_path / "hf", lower=False)
  cased = tok_lib.load_tokenizer(str(tmp_path / "hf"))
  assert cased.encode("Hello", add_special_tokens=False).tokens == ["Hello"]
  # A different tokenizer saved as tokenizer.json in the same folder takes precedence.
  other = tok_lib.train_tokenizer(["zebra zebra quokka"] * 10, vocab_size=60)
  other.save(str(tmp_path / "hf" / "tokenizer.json"))
  loaded = tok_lib.load_tokenizer(str(tmp_path / "hf"))
  assert loaded.get_vocab() == other.get_vocab()


def test_train_save_load_round_trip(tmp_path):
  corpus = corpus_lib.generate_corpus(40, 150, seed=3)
  texts = [s for doc in corpus.train for s in doc]
  tok = tok_lib.train_tokenizer(texts, vocab_size=500)
  assert [tok.token_to_id(t) for t in tok_lib.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
  assert tok.get_vocab_size() <= 500
  # Deterministic (huggingface/tokenizers#1794 made the bare trainer's vocabulary vary).
  for _ in range(3):
    assert tok_lib.train_tokenizer(texts, vocab_size=500).get_vocab() == tok.get_vocab()
  tok.save(str(tmp_path / "tokenizer.json"))
  loaded = tok_lib.load_tokenizer(str(tmp_path / "tokenizer.json"))
  sample = texts[:50] + ["Some UNSEEN words, qwxz!"]
  assert [e.ids for e in loaded.encode_batch(sample)] == [e.ids for e in tok.encode_batch(sample)]
  # Every trained tokenizer obeys the reference algorithm over its own vocabulary.
  vocab = tok.get_vocab()
  for s in sample:
    assert tok.encode(s, add_special_tokens=False).ids == ref_encode(s, vocab, lower=True)
  assert tok.decode(tok.encode("He was born in the city.").ids) == "he was born in the city."


def test_build_tokenizer_trains_once_then_reuses_the_workdir_file(tmp_path):
  cfg = base_config().data
  cfg.update(vocab_size=400)
  cfg.generated.update(num_entities=40, num_docs=120, seed=1)
  tok = tok_lib.build_tokenizer(cfg, str(tmp_path))
  saved = tmp_path / "tokenizer.json"
  assert saved.is_file()
  before = saved.read_bytes()
  cfg.vocab_size = 300  # a changed config must not change an existing workdir's ids
  again = tok_lib.build_tokenizer(cfg, str(tmp_path))
  assert again.get_vocab() == tok.get_vocab() and saved.read_bytes() == before
  # A given tokenizer path is loaded and copied into a fresh workdir.
  vocab = write_hf_vocab(tmp_path / "hf", lower=True)
  cfg.tokenizer = str(tmp_path / "hf")
  hf = tok_lib.build_tokenizer(cfg, str(tmp_path / "run2"))
  assert hf.get_vocab() == vocab
  assert tok_lib.load_tokenizer(str(tmp_path / "run2")).get_vocab() == vocab


def test_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tok_lib.load_tokenizer(str(tmp_path / "nope.json"))
  with pytest.raises(FileNotFoundError, match="no tokenizer.json or vocab.txt"):
    tok_lib.load_tokenizer(str(tmp_path))
  (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
  with pytest.raises(ValueError, match=r"\[MASK\]"):
    tok_lib.load_tokenizer(str(tmp_path / "vocab.txt"))
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(ValueError, match="cannot parse tokenizer file"):
    tok_lib.load_tokenizer(str(tmp_path / "bad.json"))
  with pytest.raises(ValueError, match="empty"):
    tok_lib.train_tokenizer([], vocab_size=100)
