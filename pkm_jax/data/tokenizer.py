"""BERT WordPiece tokenizers (Hugging Face `tokenizers`): train on the corpus, or load one; and
the causal LMs' own tokenizer.json (byte-level BPE for GPT-2, BPE for Llama / Qwen2 / Mistral).

- `train_tokenizer(texts, vocab_size, lowercase)`: a WordPiece vocabulary learnt from the text,
  special tokens first ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4). The text is streamed
  (read twice, in chunks), so a corpus larger than memory can be passed as a function that
  returns a fresh iterator of its sentences.
- `load_tokenizer(path)`: a `tokenizer.json`, a BERT `vocab.txt` (one token per line, id = line
  number; casing from a `tokenizer_config.json` beside it), or a folder holding either (a
  Hugging Face model folder such as bert-base-uncased works; tokenizer.json is preferred).
- `build_tokenizer(data_cfg, workdir)`: what a run uses. The first run trains or loads one and
  saves WORKDIR/tokenizer.json; every later run (resume, eval) loads that file, so a workdir's
  token ids never change. With data.source='prepared' it is the prepared folder's tokenizer
  (or must equal it: `tokenizer_fingerprint`).
Every WordPiece tokenizer is made BERT-style: BERT normaliser and pre-tokeniser, "##"
continuation pieces, "[CLS] $A [SEP]" post-processing. Any other tokenizer.json (a causal LM's
BPE) loads unchanged; `causal_special_ids` finds its bos / eos / pad. Special tokens are found by their strings (`special_token_ids`),
so Hugging Face vocabularies ([PAD]=0, [UNK]=100, [CLS]=101, ...) work unchanged.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from typing import Callable, Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers

from pkm_jax import storage
from pkm_jax.data import bpe
from pkm_jax.data import prepared as prepared_lib
from pkm_jax.data.sources import expand_files, load_documents

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)  # trained vocabularies start with these, in order
TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.txt"
MAX_CHARS_PER_WORD = 100  # longer words become [UNK], as in BERT


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
  """{'pad', 'unk', 'cls', 'sep', 'mask'} -> id, looked up by token string."""
  ids = {name: tok.token_to_id(token)
         for name, token in zip(("pad", "unk", "cls", "sep", "mask"), SPECIAL_TOKENS)}
  missing = [t for t, i in zip(SPECIAL_TOKENS, ids.values()) if i is None]
  if missing:
    raise ValueError(f"tokenizer lacks the BERT special token(s) {', '.join(missing)}")
  return ids


def is_wordpiece(tok: Tokenizer) -> bool:
  """A WordPiece (BERT) tokenizer, which pkm-jax makes BERT-style; anything else is causal."""
  return json.loads(tok.to_str()).get("model", {}).get("type") == "WordPiece"


_CAUSAL_NAMES = {"bos": ("<|endoftext|>", "<s>", "<|begin_of_text|>"),
                 "eos": ("<|endoftext|>", "</s>", "<|end_of_text|>", "<|im_end|>"),
                 "pad": ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>")}


def _read_json(path: str) -> dict:
  if not storage.isfile(path):
    return {}
  try:
    with storage.open_file(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"cannot parse {path}: {e}") from e
  return data if isinstance(data, dict) else {}


def causal_special_ids(tok: Tokenizer, folder: str | None = None) -> dict[str, int | None]:
  """{'bos', 'eos', 'pad'} -> id of a causal LM's tokenizer (bos None when it has none).

  Looked up in order: tokenizer_config.json's bos_token / eos_token / pad_token strings,
  generation_config.json's then config.json's *_token_id (files in `folder`, the tokenizer's
  folder), then well-known token strings (<|endoftext|>, <s>, </s>, ...). eos is required;
  pad falls back to eos (the loss masks padding by target weights, so its id only fills).
  """
  tok_cfg = _read_json(os.path.join(folder, "tokenizer_config.json")) if folder else {}
  id_cfgs = ([_read_json(os.path.join(folder, n))
              for n in ("generation_config.json", "config.json")] if folder else [])
  vocab_size = tok.get_vocab_size(with_added_tokens=True)
  ids: dict[str, int | None] = {}
  for name in ("bos", "eos", "pad"):
    found = None
    token = tok_cfg.get(f"{name}_token")
    if isinstance(token, dict):  # AddedToken serialised as {"content": ..., ...}
      token = token.get("content")
    if isinstance(token, str):
      found = tok.token_to_id(token)
    for cfg in id_cfgs:
      value = cfg.get(f"{name}_token_id")
      if isinstance(value, list) and value:  # several eos ids: the first ends generation too
        value = value[0]
      if found is None and isinstance(value, int) and 0 <= value < vocab_size:
        found = value
    for token in _CAUSAL_NAMES[name]:
      if found is None:
        found = tok.token_to_id(token)
    ids[name] = found
  if ids["eos"] is None:
    raise ValueError("the tokenizer has no end-of-sequence token (no eos_token in "
                     "tokenizer_config.json, no eos_token_id in config.json, no </s> or "
                     "<|endoftext|>)")
  if ids["pad"] is None:
    ids["pad"] = ids["eos"]
  return ids


def _finish(tok: Tokenizer) -> Tokenizer:
  """BERT post-processing and decoding; no padding/truncation (the pipeline packs itself)."""
  ids = special_token_ids(tok)
  tok.add_special_tokens(list(SPECIAL_TOKENS))  # "[MASK]" in text stays one token
  tok.post_processor = processors.TemplateProcessing(
      single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
      special_tokens=[(CLS, ids["cls"]), (SEP, ids["sep"])])
  tok.decoder = decoders.WordPiece(prefix="##")
  tok.no_padding()
  tok.no_truncation()
  return tok


def _bert_tokenizer(model: models.WordPiece, lowercase: bool, strip_accents: bool | None = None,
                    chinese_chars: bool = True) -> Tokenizer:
  tok = Tokenizer(model)
  tok.normalizer = normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=chinese_chars, strip_accents=strip_accents,
      lowercase=lowercase)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  return tok


def _chunks(texts: Iterable[str], size: int = 4096) -> Iterator[list[str]]:
  it = iter(texts)
  while chunk := list(itertools.islice(it, size)):
    yield chunk


def _continuation_chars(tok: Tokenizer, texts: Iterable[str]) -> list[str]:
  """Sorted characters that occur inside a pre-tokenised word (after its first character)."""
  chars: set[str] = set()
  for chunk in _chunks(texts):  # few large Rust calls instead of one per sentence
    text = tok.normalizer.normalize_str("\n".join(chunk))
    for word, _ in tok.pre_tokenizer.pre_tokenize_str(text):
      chars.update(word[1:])
  return sorted(chars)


def train_tokenizer(texts: Iterable[str] | Callable[[], Iterable[str]], vocab_size: int,
                    lowercase: bool = True) -> Tokenizer:
  """A WordPiece tokenizer of at most `vocab_size` tokens learnt from `texts`; deterministic.

  `texts`: sentences, or a function returning a fresh iterator of them. The text is read
  twice, a chunk at a time, so only the trainer's word counts stay in memory; a one-shot
  iterator is first kept in a list (fine for small corpora; pass a function for large ones).

  The `tokenizers` trainer alone is not deterministic (huggingface/tokenizers#1794): it creates
  the "##c" continuation tokens in hash-map order, and their ids break ties between equally
  frequent merges. Reserving every "##c" up front, in sorted order, fixes all ids, so every host
  and every rerun learns the same vocabulary.
  """
  if vocab_size <= len(SPECIAL_TOKENS):
    raise ValueError(f"data.vocab_size={vocab_size} is too small for a WordPiece vocabulary")
  if callable(texts):
    fresh = texts
  else:
    kept = list(texts) if iter(texts) is texts else texts
    fresh = lambda: kept
  tok = _bert_tokenizer(models.WordPiece(unk_token=UNK, max_input_chars_per_word=
                                         MAX_CHARS_PER_WORD), lowercase)
  reserved = [f"##{c}" for c in _continuation_chars(tok, fresh())]
  trainer = trainers.WordPieceTrainer(vocab_size=vocab_size,
                                      special_tokens=list(SPECIAL_TOKENS) + reserved,
                                      continuing_subword_prefix="##", show_progress=False)
  tok.train_from_iterator(_chunks(fresh()), trainer=trainer)
  if tok.get_vocab_size() <= len(SPECIAL_TOKENS) + len(reserved):
    raise ValueError("cannot train a tokenizer: the training text is empty")
  # Rebuild from the learnt vocabulary so the reserved "##c" are ordinary tokens, not specials.
  model = models.WordPiece(tok.get_vocab(), unk_token=UNK,
                           max_input_chars_per_word=MAX_CHARS_PER_WORD)
  return _finish(_bert_tokenizer(model, lowercase))


def tokenizer_fingerprint(tok: Tokenizer) -> str:
  """A hash of what turns text into ids: vocabulary (by id), WordPiece settings, normaliser,
  pre-tokeniser and added tokens. Equal fingerprints mean equal ids for every text."""
  spec = json.loads(tok.to_str())
  model = dict(spec.get("model") or {})
  vocab = model.pop("vocab", {})
  what = {"vocab": sorted(vocab.items(), key=lambda kv: kv[1]) if isinstance(vocab, dict)
                   else vocab,
          "model": model, "normalizer": spec.get("normalizer"),
          "pre_tokenizer": spec.get("pre_tokenizer"),
          "added_tokens": sorted((t["id"], t["content"]) for t in spec.get("added_tokens", []))}
  return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def read_vocab(path: str) -> dict[str, int]:
  """A BERT vocab.txt: token -> line number (0-based).

  Ids are line numbers even for odd lines, so the vocabulary size always equals the line count
  (the size of a checkpoint's embedding table): as in Hugging Face's loader a repeated token maps
  to its last line, and an empty or superseded line keeps its id under a placeholder name.
  """
  with open(path, encoding="utf-8") as f:
    lines = [line.rstrip("\r\n") for line in f]
  if not any(lines):
    raise ValueError(f"vocabulary file {path} is empty")
  vocab = {}
  for i, token in enumerate(lines):
    if token:
      vocab[token] = i
  taken = set(vocab.values())
  for i in range(len(lines)):
    if i not in taken:
      vocab[f"[unused_line_{i}]"] = i
  return vocab


def _vocab_casing(vocab_path: str) -> tuple[bool | None, bool | None, bool]:
  """(do_lower_case, strip_accents, tokenize_chinese_chars) from tokenizer_config.json beside it."""
  config_path = os.path.join(os.path.dirname(os.path.abspath(vocab_path)), "tokenizer_config.json")
  if not os.path.isfile(config_path):
    return None, None, True
  try:
    with open(config_path, encoding="utf-8") as f:
      cfg = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot parse {config_path}: {e}") from e
  return (cfg.get("do_lower_case"), cfg.get("strip_accents"),
          cfg.get("tokenize_chinese_chars", True))


def load_vocab_tokenizer(path: str, lowercase: bool | None = None) -> Tokenizer:
  """A BERT tokenizer from vocab.txt; casing: tokenizer_config.json, else `lowercase`, else True."""
  do_lower, strip_accents, chinese = _vocab_casing(path)
  if do_lower is None:
    do_lower = True if lowercase is None else lowercase
  model = models.WordPiece(read_vocab(path), unk_token=UNK,
                           max_input_chars_per_word=MAX_CHARS_PER_WORD)
  return _finish(_bert_tokenizer(model, bool(do_lower), strip_accents, bool(chinese)))


def resolve_tokenizer_path(path: str) -> str:
  """A tokenizer file: `path` itself, or tokenizer.json / vocab.txt inside a folder."""
  path = os.path.expanduser(path)
  if storage.isdir(path):
    for name in (TOKENIZER_FILE, VOCAB_FILE):
      if storage.isfile(os.path.join(path, name)):
        return os.path.join(path, name)
    raise FileNotFoundError(f"no {TOKENIZER_FILE} or {VOCAB_FILE} in {path}")
  if not storage.isfile(path):
    raise FileNotFoundError(f"tokenizer {path} does not exist")
  return path


def load_tokenizer(path: str, lowercase: bool | None = None) -> Tokenizer:
  """tokenizer.json, vocab.txt or a folder holding either -> a BERT tokenizer, or a causal LM's
  (non-WordPiece) tokenizer.json unchanged.

  `lowercase` only matters for a vocab.txt without a tokenizer_config.json beside it.
  """
  file = resolve_tokenizer_path(path)
  if storage.is_remote(file):  # tokenizers reads local files: a copy (+ the casing config)
    with tempfile.TemporaryDirectory() as tmp:
      for name in (os.path.basename(file), "tokenizer_config.json"):
        if storage.isfile(os.path.join(os.path.dirname(file), name)):
          storage.download(os.path.join(os.path.dirname(file), name), os.path.join(tmp, name))
      return load_tokenizer(os.path.join(tmp, os.path.basename(file)), lowercase)
  if not file.endswith(".json"):
    return load_vocab_tokenizer(file, lowercase)
  try:
    tok = Tokenizer.from_file(file)
  except Exception as e:  # the Rust side raises a bare Exception for malformed files
    raise ValueError(f"cannot parse tokenizer file {file}: {str(e).splitlines()[0]}") from e
  return _finish(tok) if is_wordpiece(tok) else tok


def save_tokenizer(tok: Tokenizer, path: str) -> None:
  """Writes tokenizer.json atomically (several hosts may write the same file)."""
  if storage.is_remote(path):  # one upload: the object appears whole
    storage.write_atomic(path, tok.to_str(pretty=True))
    return
  tmp = f"{path}.tmp.{os.getpid()}"
  tok.save(tmp)
  os.replace(tmp, path)


def check_prepared(tok: Tokenizer, meta: dict, folder: str, max_len: int,
                   what: str = "data.path") -> None:
  """A prepared folder's rows must come from this tokenizer and this data.max_len."""
  if meta["max_len"] != max_len:
    raise ValueError(f"{what}={folder} was prepared with max_len={meta['max_len']}, but "
                     f"data.max_len={max_len}: prepare it again with --max_len {max_len}")
  fingerprint = tokenizer_fingerprint(tok)
  if meta["tokenizer"]["fingerprint"] != fingerprint:
    raise ValueError(
        f"{what}={folder} was prepared with another tokenizer (vocabulary of "
        f"{meta['vocab_size']}, fingerprint {meta['tokenizer']['fingerprint']}) than this run's "
        f"(vocabulary of {tok.get_vocab_size()}, fingerprint {fingerprint}): its token ids "
        "mean other words to this model; prepare it with this run's tokenizer")


def _check_data(tok: Tokenizer, data_cfg, meta: dict | None) -> None:
  """Prepared folders and evaluation files a run names, checked before it saves anything."""
  max_len = int(data_cfg.max_len)
  if meta is not None:
    check_prepared(tok, meta, data_cfg.path, max_len)
    if "eval" not in meta["splits"] and not (data_cfg.eval_files or data_cfg.eval_path):
      raise ValueError(f"data.path={data_cfg.path} has no 'eval' split: prepare it with "
                       "--eval_input or --eval_fraction, or set data.eval_files / "
                       "data.eval_path")
  if data_cfg.eval_path:
    check_prepared(tok, prepared_lib.read_metadata(data_cfg.eval_path, "data.eval_path"),
                   data_cfg.eval_path, max_len, "data.eval_path")
  if data_cfg.eval_files:
    expand_files(data_cfg.eval_files, what="data.eval_files")


def build_tokenizer(data_cfg, workdir: str | None, *, save: bool = True,
                    causal: bool = False) -> Tokenizer:
  """The run's tokenizer: WORKDIR/tokenizer.json if present, else loaded or trained, then saved
  there (unless `save` is False: the trainer writes run files only once every check passed).

  data.tokenizer = '' trains WordPiece (data.vocab_size, data.lowercase) on the training split of
  data.source (`causal`: a byte-level BPE of data.vocab_size, bpe.py), or with
  data.source='prepared' takes the prepared folder's tokenizer; otherwise it names a
  tokenizer.json / vocab.txt / folder. An existing WORKDIR/tokenizer.json always wins
  (resume and eval must see the ids training saw) and is never overwritten. Prepared data made
  with another tokenizer or max_len is refused here, before anything is saved.
  """
  saved = os.path.join(workdir, TOKENIZER_FILE) if workdir else ""
  prepared = data_cfg.source == "prepared"
  meta = prepared_lib.read_metadata(data_cfg.path) if prepared else None
  if saved and storage.isfile(saved):
    tok = load_tokenizer(saved)
  elif data_cfg.tokenizer:
    tok = load_tokenizer(data_cfg.tokenizer, lowercase=bool(data_cfg.lowercase))
  elif prepared:
    tok = load_tokenizer(os.path.join(data_cfg.path, prepared_lib.TOKENIZER_FILE))
  else:
    train_docs, _ = load_documents(data_cfg)
    sentences = [s for doc in train_docs for s in doc]
    tok = (bpe.train_bpe_tokenizer(sentences, int(data_cfg.vocab_size)) if causal else
           train_tokenizer(sentences, int(data_cfg.vocab_size), lowercase=bool(data_cfg.lowercase)))
  _check_data(tok, data_cfg, meta)
  if saved and save and not storage.isfile(saved):
    storage.makedirs(workdir)
    save_tokenizer(tok, saved)
  return tok
