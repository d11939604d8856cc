"""Top-k predictions for each [MASK] in a text, as transformers' fill-mask pipeline gives them.

  python -m pkm_jax.fill_mask --model DIR [--top_k 5] "The capital of France is [MASK]."

DIR: a Hugging Face folder, a converted checkpoint (pkm_jax.pretrained) or a training workdir
(latest checkpoint). Prints one JSON object per prediction, best first within each mask:
  {"mask_index": 0, "token": "paris", "token_id": 3000, "score": 0.91}
`mask_index` numbers the [MASK]s of the text from 0, left to right; `token` is
`tokenizer.decode([token_id])` with special tokens kept (the pipeline's `token_str`: a
continuation piece prints as "##ing"); `score` is the softmax probability over the vocabulary.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from pkm_jax import cli, pretrained
from pkm_jax.models.bert import BertForMaskedLM
from pkm_jax.data.tokenizer import special_token_ids


def load_model(path: str, table_memory: str = "device") -> tuple[BertForMaskedLM, Any]:
  """(model, tokenizer) from a training workdir, a converted checkpoint or an HF folder; its
  row tables in `table_memory` ('device' | 'pinned_host', `pkm_jax.host_tables`)."""
  model, tokenizer = pretrained.load_model(path, table_memory)
  if model.cfg.causal:
    raise ValueError(f"{path} holds a causal LM ({model.cfg.family}), which has no [MASK]: use "
                     "python -m pkm_jax.generate")
  return model, tokenizer


def fill_mask(model: BertForMaskedLM, tokenizer: Any, text: str, top_k: int = 5
              ) -> list[list[dict[str, Any]]]:
  """For each [MASK] in `text` (left to right): the top_k {'token', 'token_id', 'score'}."""
  mask_id = special_token_ids(tokenizer)["mask"]
  vocab = model.cfg.vocab_size
  if not 1 <= top_k <= vocab:
    raise ValueError(f"top_k={top_k} must be in 1..{vocab} (the vocabulary size)")
  enc = tokenizer.encode(text)
  ids_1xT = np.asarray([enc.ids], np.int32)
  positions = np.flatnonzero(ids_1xT[0] == mask_id)
  if positions.size == 0:
    raise ValueError(f"no [MASK] in the text {text!r}: mark each word to predict with [MASK]")
  if ids_1xT.shape[1] > model.cfg.max_position_embeddings:
    raise ValueError(f"the text is {ids_1xT.shape[1]} tokens long; the model takes at most "
                     f"{model.cfg.max_position_embeddings}")
  types_1xT = np.asarray([enc.type_ids], np.int32)
  logits_1xTxV, _ = model(jnp.asarray(ids_1xT), jnp.ones_like(ids_1xT), jnp.asarray(types_1xT))
  probs_MxV = jax.nn.softmax(logits_1xTxV[0, positions].astype(jnp.float32), axis=-1)
  scores_MxK, tokens_MxK = jax.device_get(jax.lax.top_k(probs_MxV, top_k))
  return [[{"token": tokenizer.decode([int(t)], skip_special_tokens=False),
            "token_id": int(t), "score": float(s)} for s, t in zip(scores, tokens)]
          for scores, tokens in zip(scores_MxK, tokens_MxK)]


def main(argv: list[str]) -> None:
  f = flags.FLAGS
  if not f.model:
    raise ValueError("--model DIR is required")
  text = " ".join(argv[1:])
  if not text:
    raise ValueError('no text given: python -m pkm_jax.fill_mask --model DIR "a [MASK] text"')
  model, tokenizer = load_model(f.model, f.table_memory)
  for i, predictions in enumerate(fill_mask(model, tokenizer, text, f.top_k)):
    for p in predictions:
      print(json.dumps({"mask_index": i, **p}, ensure_ascii=False))
  sys.stdout.flush()


if __name__ == "__main__":
  flags.DEFINE_string("model", None, "HF folder, converted checkpoint or training workdir.")
  flags.DEFINE_integer("top_k", 5, "Predictions per [MASK].")
  flags.DEFINE_string("table_memory", "device", "Where the memory's row tables live: 'device' "
                      "or 'pinned_host' (host RAM; only the picked rows go to the device).")
  cli.run(main)
