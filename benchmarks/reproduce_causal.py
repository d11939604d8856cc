"""The paper's +Init protocol on a causal LM at laptop scale: `python benchmarks/reproduce.py
--causal` (this module), on the generated world.

  python benchmarks/reproduce.py --causal                  # ~25 min on 2 busy CPU cores
  python benchmarks/reproduce.py --causal --quick --out /tmp/repro_causal   # a few minutes

Protocol (Kim & Jung 2020's +Init, on configs/gpt2_resm.py's decoder), S = --steps,
E = --extra_steps (S/2):
  (a) dense        memory none       from scratch                S steps
  (b) +E steps     memory none       from (a)'s final weights    E steps  (the control)
  (e) +Init +PKM   memory replace    from (a)                    E steps
  (f) +Init +ResM  memory residual   from (a), values zero       E steps  (= (a) at step 0)
  (g) +Init Memory+ shared           from (a)                    E steps
  (h) +Init PEER                     from (a)                    E steps
(g) and (h) take n_keys matched to (f)'s parameter count, as in the BERT reproduction.

Each variant: held-out token perplexity (the whole held-out split), memory usage per memory
layer (MU, top-1 MU, KL_u, KL_w), and *fact completion*: for every fact of the world whose
training templates end with the object ("<subject> was born in <object>."), the prompt is a
document start (EOS) and the sentence up to the object; a fact counts as known when the
model's greedy continuation is exactly the object's tokens (computed by teacher forcing: the
arg-max at each object position, which is what greedy decoding would emit). Facts are stated in
the training text, so this measures what the model stored, not generalisation.
Outputs under --out: results.md, results.json, runs/<variant>/ (workdirs with TensorBoard).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections

from pkm_jax import config as config_lib
from reproduce import matched_n_keys, count_params  # the BERT protocol's, any family

DEFAULT_OUT = os.path.join("benchmarks", "results", "reproduce_causal")

# (key, label, memory mode, from (a), memory fields of another kind)
VARIANTS = (
    ("a", "(a) dense", "none", False, {}),
    ("b", "(b) +{E} steps", "none", True, {}),
    ("e", "(e) +Init +PKM", "replace", True, {}),
    ("f", "(f) +Init +ResM", "residual", True, {}),
    ("g", "(g) +Init Memory+ shared", "residual", True,
     dict(kind="memory_plus", gate="silu", share_values=True)),
    ("h", "(h) +Init PEER", "residual", True, dict(kind="peer")),
)


def get_config(size: str = "") -> ml_collections.ConfigDict:
  """configs/gpt2_resm.py (hidden 128, 4 layers, memory at layers 1 and 3) with this
  experiment's schedule; size 'quick': tiny shapes for tests."""
  if size not in ("", "quick"):
    raise ValueError(f"unknown size {size!r} (use '' or 'quick')")
  quick = size == "quick"
  from configs import gpt2_resm  # pylint: disable=g-import-not-at-top
  config = gpt2_resm.get_config()
  config.data.eval_fraction = 0.2
  config.optim.warmup_steps = 50
  config.train.update(steps=1000, log_every=20, eval_every=250, checkpoint_every=500,
                      keep_checkpoints=1, eval_batches=0, memory_stats_every=50)
  if quick:
    config.model.update(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                        max_position_embeddings=32)
    config.memory.update(layers=(0, 1), n_keys=16, heads=2, k=4, k_dim=16)
    config.data.update(vocab_size=400, max_len=32, batch_size=8, eval_fraction=0.1)
    config.data.generated.update(num_entities=40, num_docs=300)
    config.optim.warmup_steps = 2
    config.train.update(steps=12, log_every=4, eval_every=12, checkpoint_every=12,
                        memory_stats_every=4)
  return config


def fact_prompts(world, tokenizer, eos_id: int) -> list[tuple[list[int], list[int]]]:
  """(prompt ids, object ids) for every fact with a training template '{s} ... {o}.'."""
  from pkm_jax.data import corpus  # pylint: disable=g-import-not-at-top
  out = []
  for subject, relation, obj in world.facts():
    train_templates, _ = corpus.TEMPLATES[(world.kinds[subject], relation)]
    template = next((t for t in train_templates
                     if t.startswith("{s}") and t.endswith("{o}.")), None)
    if template is None:
      continue
    prefix = template[:-len("{o}.")].rstrip().format(s=subject)
    prefix = prefix[0].upper() + prefix[1:]
    prefix_ids = tokenizer.encode(prefix).ids
    full_ids = tokenizer.encode(f"{prefix} {obj}").ids
    if full_ids[:len(prefix_ids)] != prefix_ids:  # a merge across the boundary: skipped
      continue
    out.append(([eos_id] + prefix_ids, full_ids[len(prefix_ids):]))
  return out


def fact_accuracy(model, facts: list[tuple[list[int], list[int]]], batch: int = 64) -> float:
  """The fraction of facts whose object is the greedy continuation of their prompt."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  t = max(len(p) + len(o) for p, o in facts)
  forward = jax.jit(lambda ids, mask: model(ids, mask)[0])
  known = 0
  for i in range(0, len(facts), batch):
    chunk = facts[i:i + batch]
    ids = np.zeros((batch, t), np.int32)
    mask = np.zeros((batch, t), np.int32)
    for row, (p, o) in enumerate(chunk):
      ids[row, :len(p) + len(o)], mask[row, :len(p) + len(o)] = p + o, 1
    pred = np.asarray(jnp.argmax(forward(jnp.asarray(ids), jnp.asarray(mask)), axis=-1))
    for row, (p, o) in enumerate(chunk):
      known += int(all(pred[row, len(p) - 1 + j] == tok for j, tok in enumerate(o)))
  return known / len(facts)


def markdown_table(rows: list[dict[str, Any]], layers: list[int]) -> str:
  names = "/".join(f"{layer + 1}L" for layer in layers)
  lines = [f"| Model | Params | steps | held-out ppl | token acc (%) | facts known (%) | "
           f"MU ({names}) (%) | KL_u ({names}) |", "|---" * 8 + "|"]
  for r in rows:
    mem = r["memory"]
    mu = "/".join(f"{mem[str(l)]['usage']:.1f}" for l in layers) if mem else "-"
    kl = "/".join(f"{mem[str(l)]['kl_uniform']:.2f}" for l in layers) if mem else "-"
    lines.append(f"| {r['label']} | {r['params'] / 1e6:.2f}M | {r['total_steps']} | "
                 f"{r['lm_perplexity']:.3f} | {100 * r['lm_accuracy']:.2f} | "
                 f"{100 * r['facts_known']:.1f} | {mu} | {kl} |")
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, out: str, *, steps: int, extra_steps: int,
        quick: bool = False) -> dict[str, Any]:
  """Trains and evaluates the six variants into `out`; writes results.md / results.json."""
  from pkm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from pkm_jax import evaluate as eval_lib  # pylint: disable=g-import-not-at-top
  from pkm_jax import trainer  # pylint: disable=g-import-not-at-top
  from pkm_jax.data import corpus  # pylint: disable=g-import-not-at-top
  from pkm_jax.data.tokenizer import causal_special_ids  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  config.memory.mode, config.train.steps = "residual", steps
  config_lib.validate(config)
  out = os.path.abspath(out)
  layers = sorted(int(x) for x in config.memory.layers)
  rows, seconds, facts = {}, {}, None
  for key, label, mode, init, memory in VARIANTS:
    label = label.format(E=extra_steps)
    workdir = os.path.join(out, "runs", key)
    cfg = config.copy_and_resolve_references()
    cfg.memory.mode = mode
    cfg.memory.value_zero_init = mode == "residual" and not memory
    if memory:
      cfg.memory.update(n_keys=matched_n_keys(cfg, memory, count_params(cfg)), **memory)
    cfg.train.steps = extra_steps if init else steps
    if init:
      cfg.init.pretrained = os.path.join(out, "runs", "a")
    print(f"=== {label}: memory {mode}, {cfg.train.steps} steps"
          + (" from (a)" if init else " from scratch"), flush=True)
    t0 = time.perf_counter()
    trainer.train_and_evaluate(cfg, workdir)
    seconds[f"train_{key}"] = round(time.perf_counter() - t0, 1)
    run_cfg = eval_lib.run_config(workdir, {"eval.batches": 0}, cfg)
    result = eval_lib.evaluate_workdir(run_cfg, workdir)
    model, tokenizer, _ = ckpt_lib.restore_model(workdir)
    if facts is None:
      g = config.data.generated
      world = corpus.generate_world(g.num_entities, g.seed)
      facts = fact_prompts(world, tokenizer, causal_special_ids(tokenizer)["eos"])
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    rows[key] = {"key": key, "label": label, "mode": mode, "init": init,
                 "kind": cfg.memory.kind, "n_keys": cfg.memory.n_keys, "params": int(params),
                 "total_steps": cfg.train.steps + (steps if init else 0),
                 "facts_known": fact_accuracy(model, facts), "facts": len(facts), **result}
  table = markdown_table(list(rows.values()), layers)
  report = {"steps": steps, "extra_steps": extra_steps, "quick": quick, "memory_layers": layers,
            "config": json.loads(config.to_json()), "variants": rows, "table": table,
            "seconds": seconds}
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(report, f, indent=2, sort_keys=True)
  md = [f"# +Init on a causal LM (GPT-2 family) at laptop scale: S = {steps}, E = "
        f"{extra_steps} steps", "", table, "",
        f"facts known: greedy completion of {len(facts)} facts' training phrasing (see the "
        "module docstring). One seed: differences are this run's measurements."]
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(md) + "\n")
  print("\n".join(md), flush=True)
  return report
