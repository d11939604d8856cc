"""Random Hugging Face BERT / DistilBERT folders for the conversion tests (torch + transformers).

Every parameter is redrawn (biases and LayerNorms included) so that a tensor mapped to the wrong
place, or left untransposed, changes the outputs visibly.
"""

from __future__ import annotations

import os

import numpy as np

WORDS = ("the", "cat", "cats", "sat", "on", "mat", "dog", "ran", "to", "a", "big", "red",
         "house", "and", "is", "it", "of", "in", "paris", "capital", "france", "city")
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def vocab_tokens(size: int) -> list[str]:
  """A BERT vocab.txt's tokens (size >= 90): specials, punctuation, words, letters, ## pieces."""
  letters = "abcdefghijklmnopqrstuvwxyz"
  tokens = list(SPECIALS) + [".", ",", "!"] + list(WORDS) + list(letters)
  tokens += ["##" + c for c in letters] + ["##s", "##ing", "##ed", "##er"]
  tokens += [f"[unused{i}]" for i in range(size - len(tokens))]
  assert len(tokens) == size, (len(tokens), size)
  return tokens


def write_vocab(folder: str, size: int) -> str:
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, "vocab.txt")
  with open(path, "w") as f:
    f.write("\n".join(vocab_tokens(size)) + "\n")
  return path


def randomize_(model, seed: int, std: float = 0.2) -> None:
  """Redraws every torch parameter in place: LayerNorm scales around 1, all else around 0."""
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * std
      is_scale = ("LayerNorm" in name or "layer_norm" in name) and name.endswith("weight")
      p.copy_(noise + 1.0 if is_scale else noise)


def bert_config(**overrides):
  from transformers import BertConfig  # pylint: disable=g-import-not-at-top
  kw = dict(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
            intermediate_size=37, max_position_embeddings=40, type_vocab_size=2)
  kw.update(overrides)
  return BertConfig(**kw)


def distilbert_config(**overrides):
  from transformers import DistilBertConfig  # pylint: disable=g-import-not-at-top
  kw = dict(vocab_size=101, dim=48, n_layers=2, n_heads=3, hidden_dim=37,
            max_position_embeddings=40)
  kw.update(overrides)
  return DistilBertConfig(**kw)


def save_hf(model, folder: str, *, seed: int = 0, vocab: bool = True) -> str:
  """Randomises `model`, saves it as safetensors (+ a vocab.txt) into folder; returns folder."""
  randomize_(model, seed)
  model.eval()
  model.save_pretrained(folder, safe_serialization=True)
  if vocab:
    write_vocab(folder, model.config.vocab_size)
  return folder


def batch(vocab_size: int, seed: int = 0, b: int = 3, t: int = 13):
  """input_ids / attention_mask / token_type_ids [B, T] with padded rows (numpy int64)."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(5, vocab_size, (b, t))
  ids[:, 0] = 2  # [CLS]
  mask = np.ones((b, t), np.int64)
  mask[1, t - 4:] = 0
  mask[2, 5:] = 0
  ids[mask == 0] = 0  # [PAD]
  types = np.zeros((b, t), np.int64)
  types[:, t // 2:] = 1
  types[mask == 0] = 0
  return ids, mask, types
