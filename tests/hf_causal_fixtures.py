"""Random Hugging Face causal-LM folders (GPT-2, Llama, Qwen2, Mistral) for conversion,
generation and training tests (torch + transformers, test-only).

Every parameter is redrawn (norm scales around 1, biases and all else around 0) so that a tensor
mapped to the wrong place, or left untransposed, changes the logits visibly. Each folder gets a
tiny byte-level BPE tokenizer.json trained here with `tokenizers`, a tokenizer_config.json naming
its special tokens, and config.json's bos / eos / pad ids.
"""

from __future__ import annotations

import json
import os

import numpy as np

TEXT = ("the cat sat on the mat . the dog ran to a big red house and it is in paris , the "
        "capital of france . cats and dogs sat in the city of paris on a mat .").split(" . ")
GPT2_SPECIALS = ("<|endoftext|>",)
LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")
VOCAB = 300  # >= the tokenizer's 256 bytes + specials + a few merges


def train_bpe(specials: tuple[str, ...], vocab_size: int = VOCAB):
  """A byte-level BPE tokenizers.Tokenizer (specials first) learnt from TEXT; deterministic."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(TEXT * 4, trainer=trainer)
  return tok


def gpt2_config(**overrides):
  from transformers import GPT2Config  # pylint: disable=g-import-not-at-top
  kw = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=40, n_positions=24,
            bos_token_id=0, eos_token_id=0)
  kw.update(overrides)
  return GPT2Config(**kw)


def llama_config(**overrides):
  """Llama with GQA and llama3 RoPE scaling; override rope_scaling / tie_word_embeddings."""
  from transformers import LlamaConfig  # pylint: disable=g-import-not-at-top
  kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=40, max_position_embeddings=64,
            rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=None,
            rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
  kw.update(overrides)
  return LlamaConfig(**kw)


def qwen2_config(**overrides):
  from transformers import Qwen2Config  # pylint: disable=g-import-not-at-top
  kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, intermediate_size=40, max_position_embeddings=64,
            rms_norm_eps=1e-6, rope_theta=1000.0, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2)
  kw.update(overrides)
  return Qwen2Config(**kw)


def mistral_config(**overrides):
  """Mistral with a sliding window of 4 (shorter than the test sequences) and head_dim 16."""
  from transformers import MistralConfig  # pylint: disable=g-import-not-at-top
  kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, intermediate_size=40,
            max_position_embeddings=64, rms_norm_eps=1e-5, sliding_window=4,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
  kw.update(overrides)
  return MistralConfig(**kw)


def randomize_(model, seed: int, std: float = 0.2) -> None:
  """Redraws every torch parameter in place: norm scales around 1, all else around 0."""
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * std
      is_scale = any(k in name for k in ("norm", "ln_")) and name.endswith("weight")
      p.copy_(noise + 1.0 if is_scale else noise)


def write_tokenizer(folder: str, family: str) -> None:
  """tokenizer.json (byte-level BPE) + tokenizer_config.json naming the special tokens."""
  specials = GPT2_SPECIALS if family == "gpt2" else LLAMA_SPECIALS
  train_bpe(specials).save(os.path.join(folder, "tokenizer.json"))
  if family == "gpt2":
    names = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
  else:
    names = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **names}, f)


def save_hf(model_cls, config, folder: str, *, seed: int = 0, tokenizer: bool = True) -> str:
  """A randomised `model_cls(config)` saved as safetensors (+ tokenizer files) into folder."""
  model = model_cls(config)
  randomize_(model, seed)
  model.eval()
  model.save_pretrained(folder, safe_serialization=True)
  if tokenizer:
    write_tokenizer(folder, "gpt2" if config.model_type == "gpt2" else "llama")
  return folder


def batch(vocab_size: int = VOCAB, seed: int = 0, b: int = 3, t: int = 11):
  """input_ids / attention_mask [B, T] (numpy int64): row 1 right-padded, row 2 shorter still."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, vocab_size, (b, t))
  mask = np.ones((b, t), np.int64)
  mask[1, t - 3:] = 0
  mask[2, 4:] = 0
  ids[mask == 0] = 0
  return ids, mask
