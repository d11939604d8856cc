"""Text generation from a causal LM with a KV cache: greedy, or sampled with temperature / top-p.

  python -m pkm_jax.generate --model DIR [--max_new_tokens 32] [--temperature 0]
      [--top_p 1.0] [--seed 0] [--json] "The capital of France is"

DIR: a Hugging Face folder (GPT-2, Llama, Qwen2, Mistral), a converted checkpoint or a training
workdir of a causal model. Prints the continuation on stdout; `--json` prints
{"prompt_ids", "token_ids", "scores", "text"} instead, `scores` being each generated token's
log-probability under the model (before temperature and top-p).

One jitted program per (prompt length, max_new_tokens, sampling mode): the prompt fills the
cache in one pass, then a `lax.scan` emits one token per step, attending to the cache. Memory
layers need no cache: a token's picks depend on its own hidden state only. Greedy
(temperature 0, the default) picks the arg-max; it equals transformers' `generate` with
`do_sample=False` (tests/test_generate.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from pkm_jax import cli, pretrained
from pkm_jax.data.tokenizer import causal_special_ids


@dataclasses.dataclass(frozen=True)
class Generated:
  """One prompt's continuation: its ids (up to and including EOS, if one was emitted) and
  their log-probabilities."""

  token_ids: list[int]
  scores: list[float]


def load_model(path: str) -> tuple[nnx.Module, Any]:
  """(causal LM, tokenizer) from a training workdir, a converted checkpoint or an HF folder."""
  model, tokenizer = pretrained.load_model(path)
  if not model.cfg.causal:
    raise ValueError(f"{path} holds a {model.cfg.family} model, not a causal LM: use "
                     "python -m pkm_jax.fill_mask for masked LMs")
  return model, tokenizer


def _pick(logits_BxV: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
          greedy: bool) -> jax.Array:
  """The next token [B]: arg-max, or a sample of softmax(logits / T) cut to its top-p mass."""
  if greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / temperature
  probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)
  sorted_BxV = jnp.sort(probs_BxV, axis=-1)[:, ::-1]
  # The smallest prefix of the sorted tokens holding >= top_p of the mass; the top one stays.
  before_BxV = jnp.cumsum(sorted_BxV, axis=-1) - sorted_BxV
  kept = jnp.sum(before_BxV < top_p, axis=-1, keepdims=True)
  threshold_Bx1 = jnp.take_along_axis(sorted_BxV, kept - 1, axis=-1)
  logits_BxV = jnp.where(probs_BxV >= threshold_Bx1, logits_BxV, -jnp.inf)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "eos_id"))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, ids_BxP: jax.Array, mask_BxP: jax.Array,
              key: jax.Array, temperature: jax.Array, top_p: jax.Array, *, max_new_tokens: int,
              greedy: bool, eos_id: int) -> tuple[jax.Array, jax.Array]:
  """Left-padded prompts [B, P] -> (new tokens [B, N], their log-probabilities [B, N]).

  After a row's EOS its later tokens are EOS again (the caller cuts them)."""
  model = nnx.merge(graphdef, state)
  b, p = ids_BxP.shape
  cache = model.init_cache(b, p + max_new_tokens)
  positions_BxP = jnp.maximum(jnp.cumsum(mask_BxP, axis=1) - 1, 0)
  logits_BxPxV, cache = model.decode(ids_BxP, positions_BxP, cache, cache_index=0,
                                     attention_mask_BxT=mask_BxP)

  def step(carry, i):
    cache, logits_BxV, key, done_B = carry
    key, sub = jax.random.split(key)
    token_B = _pick(logits_BxV, sub, temperature, top_p, greedy)
    token_B = jnp.where(done_B, eos_id, token_B)
    score_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV, axis=-1), token_B[:, None],
                                  axis=-1)[:, 0]
    done_B = done_B | (token_B == eos_id)
    position_Bx1 = positions_BxP[:, -1:] + 1 + i
    logits_Bx1xV, cache = model.decode(token_B[:, None], position_Bx1, cache,
                                       cache_index=p + i)
    return (cache, logits_Bx1xV[:, 0], key, done_B), (token_B, score_B)

  init = (cache, logits_BxPxV[:, -1], key, jnp.zeros((b,), bool))
  _, (tokens_NxB, scores_NxB) = jax.lax.scan(step, init, jnp.arange(max_new_tokens))
  return tokens_NxB.T, scores_NxB.T


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None) -> list[Generated]:
  """Prompts (token ids, any lengths) -> each one's continuation, stopped after EOS.

  temperature 0: greedy; else sampling from softmax(logits / temperature) within the top_p
  mass, with jax.random.key(seed). Prompts are left-padded into one batch.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
  p = max(len(x) for x in prompts)
  limit = model.cfg.max_position_embeddings
  if model.cfg.family == "gpt2" and p + max_new_tokens > limit:
    raise ValueError(f"{p} prompt tokens + max_new_tokens={max_new_tokens} exceed the model's "
                     f"{limit} positions")
  ids_BxP = np.zeros((len(prompts), p), np.int32)
  mask_BxP = np.zeros((len(prompts), p), np.int32)
  for row, x in enumerate(prompts):
    ids_BxP[row, p - len(x):], mask_BxP[row, p - len(x):] = x, 1
  graphdef, state = nnx.split(model)
  eos = -1 if eos_id is None else int(eos_id)
  tokens_BxN, scores_BxN = jax.device_get(_generate(
      graphdef, state, jnp.asarray(ids_BxP), jnp.asarray(mask_BxP), jax.random.key(seed),
      jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), max_new_tokens=max_new_tokens,
      greedy=temperature == 0, eos_id=eos))
  out = []
  for tokens, scores in zip(tokens_BxN.tolist(), scores_BxN.tolist()):
    n = tokens.index(eos) + 1 if eos in tokens else len(tokens)
    out.append(Generated(tokens[:n], scores[:n]))
  return out


def main(argv: list[str]) -> None:
  f = flags.FLAGS
  if not f.model:
    raise ValueError("--model DIR is required")
  text = " ".join(argv[1:])
  if not text:
    raise ValueError('no prompt given: python -m pkm_jax.generate --model DIR "a prompt"')
  model, tokenizer = load_model(f.model)
  prompt_ids = tokenizer.encode(text).ids
  eos = causal_special_ids(tokenizer, f.model).get("eos")
  (result,) = generate(model, [prompt_ids], max_new_tokens=f.max_new_tokens,
                       temperature=f.temperature, top_p=f.top_p, seed=f.seed, eos_id=eos)
  continuation = tokenizer.decode(result.token_ids, skip_special_tokens=True)
  if f.json:
    print(json.dumps({"prompt_ids": prompt_ids, "token_ids": result.token_ids,
                      "scores": result.scores, "text": continuation}, ensure_ascii=False))
  else:
    print(continuation)
  sys.stdout.flush()


if __name__ == "__main__":
  flags.DEFINE_string("model", None, "HF folder, converted checkpoint or training workdir.")
  flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate (fewer if EOS comes first).")
  flags.DEFINE_float("temperature", 0.0, "0: greedy; else the sampling temperature.")
  flags.DEFINE_float("top_p", 1.0, "Sample within the smallest set of tokens holding this mass.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_bool("json", False, "Print token ids and scores as JSON.")
  cli.run(main)
