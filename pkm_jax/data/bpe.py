"""The byte-level BPE tokenizer a causal-LM run trains when it is given none (GPT-2's scheme).

`train_bpe_tokenizer(texts, vocab_size)`: every one of the 256 bytes is a token (no text is
ever unknown), then BPE merges learnt from the training text up to `vocab_size`; special tokens
first: EOS (`<|endoftext|>`, id 0, ends every document in the packed stream) and a padding
token of its own (`<|pad|>`, id 1; GPT-2 pads with its EOS). No BOS, as GPT-2. The result is
saved as WORKDIR/tokenizer.json as the BERT path saves its WordPiece.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOS, PAD = "<|endoftext|>", "<|pad|>"
SPECIAL_TOKENS = (EOS, PAD)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte, and the special tokens


def _chunks(texts: Iterable[str], size: int = 4096) -> Iterator[list[str]]:
  it = iter(texts)
  while chunk := list(itertools.islice(it, size)):
    yield chunk


def train_bpe_tokenizer(texts: Iterable[str] | Callable[[], Iterable[str]],
                        vocab_size: int) -> Tokenizer:
  """A byte-level BPE tokenizer of `vocab_size` tokens (fewer if the text has fewer merges)
  learnt from `texts` (sentences, or a function returning a fresh iterator of them)."""
  if vocab_size < MIN_VOCAB:
    raise ValueError(f"data.vocab_size={vocab_size} is too small for a byte-level BPE "
                     f"vocabulary: it needs at least {MIN_VOCAB} (256 bytes and "
                     f"{len(SPECIAL_TOKENS)} special tokens)")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(_chunks(texts() if callable(texts) else texts), trainer=trainer)
  if tok.get_vocab_size() <= MIN_VOCAB - 1:
    raise ValueError("cannot train a tokenizer: the training text is empty")
  tok.no_padding()
  tok.no_truncation()
  return tok
