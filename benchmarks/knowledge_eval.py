"""Measurements of the knowledge benchmark on one model: fact accuracy, held-out perplexity on A's
text, per-slot memory usage, and which value rows a fine-tuning run wrote.

Fact accuracy under MLM: every word piece of the answer is replaced by [MASK] (the question is
otherwise intact, [CLS] ... [SEP]); a fact counts as known only when the argmax at EVERY masked
position is the answer's piece. No ranking against candidates is used.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pkm_jax import evaluate as eval_lib
from pkm_jax import metrics as metrics_lib
from pkm_jax.data import make_eval_data
from pkm_jax.data.tokenizer import special_token_ids
from pkm_jax.models import tables

BATCH = 128


def encode_questions(questions: Sequence[Any], tokenizer: Any
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """-> (masked ids [Q, T], attention mask [Q, T], answer ids [Q, T], answer mask [Q, T] bool).

  The answer's pieces are the tokens whose character offsets lie inside its span; each becomes
  [MASK] in the input, its id kept as the target.
  """
  mask_id = special_token_ids(tokenizer)["mask"]
  encs = [tokenizer.encode(q.text) for q in questions]
  t = max(len(e.ids) for e in encs)
  ids = np.zeros((len(encs), t), np.int32)
  attn = np.zeros((len(encs), t), np.int32)
  target = np.zeros((len(encs), t), np.int32)
  where = np.zeros((len(encs), t), bool)
  for row, (q, e) in enumerate(zip(questions, encs)):
    n = len(e.ids)
    ids[row, :n], attn[row, :n] = e.ids, 1
    for j, (a, b) in enumerate(e.offsets):
      if b > a and a >= q.start and b <= q.end and e.special_tokens_mask[j] == 0:
        where[row, j], target[row, j], ids[row, j] = True, e.ids[j], mask_id
    if not where[row].any():
      raise ValueError(f"question {q.text!r}: no piece of the answer {q.answer!r} found")
  return ids, attn, target, where


class Evaluator:
  """One jitted forward per model structure, applied to many checkpoints' (params, state)."""

  def __init__(self, graphdef: nnx.GraphDef, model_cfg: Any, tokenizer: Any, data_cfg: Any,
               questions: dict[str, Sequence[Any]]):
    self.model_cfg = model_cfg
    self.questions = {k: encode_questions(q, tokenizer) for k, q in questions.items()}
    self.relations = {k: [x.relation for x in q] for k, q in questions.items()}
    self.make_eval_iter = make_eval_data(data_cfg, tokenizer)

    def predict(params, state, ids_BxT, attn_BxT):
      model = nnx.merge(graphdef, params, state)
      logits_BxTxV, _ = model(ids_BxT, attn_BxT, jnp.zeros_like(ids_BxT))
      return jnp.argmax(logits_BxTxV, axis=-1).astype(jnp.int32)

    self.predict = jax.jit(predict)
    self.eval_step = jax.jit(eval_lib.make_eval_step(graphdef, model_cfg))

  def known(self, params, state, name: str) -> np.ndarray:
    """Per question of set `name`: True when every answer piece was predicted."""
    ids, attn, target, where = self.questions[name]
    out = []
    for i in range(0, len(ids), BATCH):
      chunk = slice(i, i + BATCH)
      n = len(ids[chunk])
      pad = lambda x: np.pad(x, ((0, BATCH - n), (0, 0)))  # noqa: E731  one compiled shape
      pred = np.asarray(self.predict(params, state, jnp.asarray(pad(ids[chunk])),
                                     jnp.asarray(pad(attn[chunk]))))[:n]
      out.append(np.all((pred == target[chunk]) | ~where[chunk], axis=1))
    return np.concatenate(out)

  def held_out(self, params, state) -> tuple[dict[str, Any], dict[int, metrics_lib.MemoryUsage]]:
    """MLM perplexity / accuracy on A's held-out documents and per-slot usage on them."""
    usage = {layer: metrics_lib.MemoryUsage(self.model_cfg.memory.n_slots)
             for layer in self.model_cfg.memory_layers}

    def step(p, s, f, batch):
      sums, batch_usage = self.eval_step(p, s, f, batch)
      for layer, (c, w, t) in batch_usage.items():
        usage[layer].add(c, w, t)
      return sums, batch_usage

    result = eval_lib.run_eval(step, (params, state, {}), self.make_eval_iter(None),
                               lambda b: jax.tree.map(jnp.asarray, b), self.model_cfg)
    return result, usage

  def measure(self, params, state) -> dict[str, Any]:
    """Everything one sweep point reports (usage: the held-out pass's per-slot counts)."""
    out: dict[str, Any] = {}
    for name in self.questions:
      known = self.known(params, state, name)
      out[f"acc_{name}"] = float(known.mean())
      by_rel: dict[str, list[bool]] = {}
      for r, k in zip(self.relations[name], known):
        by_rel.setdefault(r, []).append(bool(k))
      out[f"acc_{name}_by_relation"] = {r: float(np.mean(v)) for r, v in sorted(by_rel.items())}
    result, usage = self.held_out(params, state)
    out.update(ppl_a=result["mlm_perplexity"], mlm_acc_a=result["mlm_accuracy"],
               memory=result["memory"])
    out["_usage"] = {layer: u.counts for layer, u in usage.items()}
    return out


def split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  return nnx.split(model, nnx.Param, nnx.BatchStat)


def value_rows(params: nnx.State, model_cfg: Any) -> dict[int, np.ndarray]:
  """Each memory layer's value table [n_slots, v_dim] as numpy (a shared table repeats)."""
  return {layer: np.asarray(tables.value_table(params, layer, model_cfg).value)
          for layer in model_cfg.memory_layers}


def written_rows(before: dict[int, np.ndarray], after: dict[int, np.ndarray]
                 ) -> dict[int, np.ndarray]:
  """Per layer: indices of the value rows that are not bit-identical to before."""
  return {layer: np.flatnonzero(np.any(before[layer] != after[layer], axis=1))
          for layer in before}


def top_slots(counts: np.ndarray, t: int) -> np.ndarray:
  """The t most used slots (ties broken by index: a stable argsort)."""
  return np.argsort(-np.asarray(counts), kind="stable")[:t]
