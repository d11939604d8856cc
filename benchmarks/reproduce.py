"""The paper's six variants at laptop scale: trained, evaluated, fine-tuned, tabled and plotted.

  python benchmarks/reproduce.py                          # ~35 min on 2 busy CPU cores
  python benchmarks/reproduce.py --quick --out /tmp/repro # tiny sizes: a couple of minutes
  python benchmarks/reproduce.py --steps 3000 --config.data.source=files \
      --config.data.files='/data/text/*.txt' --glue_data_dir=/data/glue --glue_task=sst2
  python benchmarks/reproduce.py --causal                 # a causal LM instead: see
                                                          # benchmarks/reproduce_causal.py

Protocol (Kim & Jung 2020, Tables 2-3), with S = --steps, E = --extra_steps (S/2,
the paper's 1M : 500k):
  (a) BERT         memory none      from scratch                 S steps
  (b) +E steps     memory none      from (a)'s final weights     E steps  (the "+500k" control)
  (c) +PKM         memory replace   from scratch                 S steps
  (d) +ResM        memory residual  from scratch                 S steps
  (e) +Init +PKM   memory replace   from (a)'s final weights     E steps
  (f) +Init +ResM  memory residual  from (a)'s final weights     E steps
Everything else is `get_config()` below, identical for all six (seed, data order, optimiser).
(b), (e) and (f) start the same way (the weights of (a), a fresh optimiser with warmup and decay
over E steps, the data stream from its beginning), so (b) differs from (e)/(f) only by memory.

Each variant is evaluated on the whole held-out split (MLM perplexity / accuracy; MU, top-1 MU,
KL_u, KL_w per memory layer, Kim & Jung §4.1) and fine-tuned (pkm_jax.tasks.finetune) on a downstream
task. With the generated corpus that task is *fact verification* about its world, written in the
GLUE SST-2 layout (sentence, label): "<entity> <relation> <object>." is true (1), or false (0)
with its object swapped for another value of the same relation ("fact" errors) or for a value of
another type ("type" errors: a company where a city belongs). Train and dev sentences are about
disjoint entities and use the corpus's held-out phrasings, so only what pretraining stored about
the generated names helps; the JSON splits dev accuracy by true / fact / type.
With --glue_data_dir a local GLUE task is used instead; with other corpora and no GLUE folder the
column is left out.

Outputs under --out (default benchmarks/results/reproduce/): results.md (the paper's table
layout), results.json (everything), loss_curves.png, memory_usage.png, usage_maps.png,
usage/<variant>.npz (per-slot counts of the held-out pass), runs/<variant>/ (training workdirs,
TensorBoard under runs/<variant>/tensorboard), finetune/<variant>/, downstream/ (the task files).
Re-running with the same --out and settings reuses what is finished (interrupted runs resume);
other settings in an existing --out stop with an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
import sys
import time
from typing import Any

import ml_collections

_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as a plain script from anywhere
  sys.path.insert(0, str(_REPO))

DEFAULT_OUT = os.path.join("benchmarks", "results", "reproduce")
DEFAULT_CAUSAL_OUT = os.path.join("benchmarks", "results", "reproduce_causal")


# ---------------------------------------------------------------------------------------------
# The experiment's settings
# ---------------------------------------------------------------------------------------------


def get_config(size: str = "") -> ml_collections.ConfigDict:
  """configs/default.py (hidden 128, 4 layers, memory at layers 1 and 3 with 128**2 slots) with
  the schedule and evaluation of this experiment; size 'quick': tiny shapes for tests."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.memory.layers = (1, 3)
  # The generated corpus writes its held-out documents from a separate stream, so a larger
  # held-out split (1,200 documents, ~12k predicted tokens) costs no training text.
  config.data.eval_fraction = 0.2
  config.optim.warmup_steps = 50
  config.train.update(steps=1000, log_every=20, eval_every=250, checkpoint_every=500,
                      keep_checkpoints=1, eval_batches=0, memory_stats_every=50)
  if size == "quick":
    config.model.update(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                        max_position_embeddings=32)
    config.memory.update(layers=(0, 1), n_keys=16, heads=2, k=4, k_dim=16)
    config.data.update(vocab_size=400, max_len=32, batch_size=8, eval_fraction=0.1)
    config.data.generated.update(num_entities=40, num_docs=300)
    config.optim.warmup_steps = 2
    config.train.update(steps=12, log_every=4, eval_every=12, checkpoint_every=12,
                        memory_stats_every=4)
  elif size:
    raise ValueError(f"unknown size {size!r} (use '' or 'quick')")
  return config


@dataclasses.dataclass(frozen=True)
class Variant:
  key: str
  label: str
  mode: str  # memory.mode
  init: bool  # start from (a)'s final weights, train the extra steps
  memory: tuple = ()  # (memory key, value) pairs of another memory kind, n_keys matched to (f)


VARIANTS = (
    Variant("a", "(a) BERT", "none", False),
    Variant("b", "(b) +{E} steps", "none", True),
    Variant("c", "(c) +PKM", "replace", False),
    Variant("d", "(d) +ResM", "residual", False),
    Variant("e", "(e) +Init +PKM", "replace", True),
    Variant("f", "(f) +Init +ResM", "residual", True),
    Variant("g", "(g) +Init Memory+ shared", "residual", True,
            (("kind", "memory_plus"), ("gate", "silu"), ("share_values", True))),
    Variant("h", "(h) +Init PEER", "residual", True, (("kind", "peer"),)),
)


def count_params(config: ml_collections.ConfigDict) -> int:
  """Parameters of the model `config` builds, any family (shapes only, nothing allocated)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from pkm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from pkm_jax.models.registry import build_lm  # pylint: disable=g-import-not-at-top
  cfg = config_lib.model_config(config, vocab_size=config.data.vocab_size)
  model = nnx.eval_shape(lambda: build_lm(cfg, rngs=nnx.Rngs(0)))
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def matched_n_keys(config: ml_collections.ConfigDict, memory: dict, target: int) -> int:
  """n_keys (>= memory.k) whose model with `memory`'s fields has the parameter count nearest to
  `target`: PEER holds two tables per layer (n_keys / sqrt 2), a shared table one for all."""
  rows_per_table = config.memory.n_keys**2 * len(config.memory.layers)
  tables = (2 if memory.get("kind") == "peer" else 1) * (
      1 if memory.get("share_values") else len(config.memory.layers))
  guess = round((rows_per_table / tables) ** 0.5)

  def gap(n):
    cfg = config.copy_and_resolve_references()
    cfg.memory.update(n_keys=n, **memory)
    return abs(count_params(cfg) - target)

  return min(range(max(config.memory.k, guess - 3), guess + 4), key=gap)


def finetune_settings(quick: bool) -> dict[str, Any]:
  """One fine-tuning recipe for every variant (a small model: a higher lr than BERT's 2e-5)."""
  if quick:
    return dict(data=dict(max_len=24, batch_size=16, max_train_examples=96),
                optim=dict(lr=1e-3), train=dict(epochs=1.0), eval=dict(batch_size=64))
  return dict(data=dict(max_len=32, batch_size=32), optim=dict(lr=3e-4),
              train=dict(epochs=1.0), eval=dict(batch_size=128))


# ---------------------------------------------------------------------------------------------
# The downstream task: fact verification about the generated world (GLUE SST-2 layout)
# ---------------------------------------------------------------------------------------------


def fact_sentence(subject: str, relation: str, obj: str, kind: str, rng: random.Random) -> str:
  """One statement in a held-out phrasing of the corpus (never used in training documents)."""
  from pkm_jax.data.corpus import TEMPLATES  # pylint: disable=g-import-not-at-top
  template = rng.choice(TEMPLATES[(kind, relation)][1])
  article = "an" if obj[0] in "aeiou" else "a"
  text = template.format(s=subject, poss=subject + "'s", o=obj, a_o=f"{article} {obj}")
  return text[0].upper() + text[1:]


# The type of value each relation takes: a "type" error puts a value of another type there.
VALUE_TYPES = {"born_in": "city", "lives_in": "city", "headquarters": "city", "capital": "city",
               "birth_year": "year", "founded_year": "year", "population": "number",
               "profession": "profession", "employer": "company", "food": "food",
               "instrument": "instrument", "country": "country", "river": "river",
               "founder": "person", "industry": "industry", "language": "language",
               "currency": "currency"}


def write_fact_task(data_dir: str, num_entities: int, world_seed: int, *, seed: int = 0,
                    dev_fraction: float = 0.2) -> dict[str, Any]:
  """DATA_DIR/SST-2/{train,dev}.tsv and DATA_DIR/dev_kinds.json; returns the example counts.

  Each fact of an entity gives a true sentence (label 1) and a false one (label 0) whose object
  is, with equal odds, another value of the same relation ("fact": only knowing the fact tells)
  or a value of another type ("type": knowing what the generated names denote tells). Train:
  both sentences of every fact of 80% of the entities (so surface forms carry no label); dev: one
  of the two, at random, for each fact of the other entities. dev_kinds.json lists, per dev
  row, 'true', 'fact' or 'type'.
  """
  from pkm_jax.data.corpus import generate_world  # pylint: disable=g-import-not-at-top
  world = generate_world(num_entities, world_seed)
  rng = random.Random(f"facts/{seed}")
  by_type: dict[str, set[str]] = {}
  for attrs in world.attributes.values():
    for relation, obj in attrs.items():
      by_type.setdefault(VALUE_TYPES[relation], set()).add(obj)
  pools = {t: sorted(v) for t, v in by_type.items()}
  entities = sorted(world.attributes)
  rng.shuffle(entities)
  n_dev = max(1, round(dev_fraction * len(entities)))
  splits = {"dev": entities[:n_dev], "train": entities[n_dev:]}

  def false_object(relation: str, obj: str) -> tuple[str, str]:
    own = VALUE_TYPES[relation]
    same = [v for v in pools[own] if v != obj]
    if same and rng.random() < 0.5:
      return rng.choice(same), "fact"
    return rng.choice(pools[rng.choice([t for t in pools if t != own])]), "type"

  counts: dict[str, Any] = {}
  for split, names in splits.items():
    rows = []  # (sentence, label, kind)
    for name in names:
      kind = world.kinds[name]
      for relation, obj in world.attributes[name].items():
        wrong, how = false_object(relation, obj)
        options = [(obj, 1, "true"), (wrong, 0, how)]
        if split == "dev":
          options = [rng.choice(options)]
        rows += [(fact_sentence(name, relation, o, kind, rng), y, k) for o, y, k in options]
    rng.shuffle(rows)
    path = os.path.join(data_dir, "SST-2", f"{split}.tsv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.write("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y, _ in rows))
    os.replace(path + ".tmp", path)
    counts[split] = len(rows)
    if split == "dev":
      with open(os.path.join(data_dir, "dev_kinds.json"), "w") as f:
        json.dump([k for _, _, k in rows], f)
      counts["dev_by_kind"] = {k: sum(r[2] == k for r in rows) for k in ("true", "fact", "type")}
  return counts


def accuracy_by_kind(data_dir: str, predictions_path: str) -> dict[str, float]:
  """Dev accuracy on true sentences and on each kind of false one (from the runner's
  predictions_dev.json, keyed 'sst2-dev-<row>')."""
  with open(os.path.join(data_dir, "dev_kinds.json")) as f:
    kinds = json.load(f)
  with open(predictions_path) as f:
    preds = json.load(f)
  hits: dict[str, list[bool]] = {}
  for row, kind in enumerate(kinds):
    hits.setdefault(kind, []).append(int(preds[f"sst2-dev-{row}"]) == (kind == "true"))
  return {kind: sum(h) / len(h) for kind, h in sorted(hits.items())}


# ---------------------------------------------------------------------------------------------
# Evaluation with per-slot counts (for the heat maps)
# ---------------------------------------------------------------------------------------------


def evaluate_with_counts(config: ml_collections.ConfigDict, workdir: str
                         ) -> tuple[dict[str, Any], dict[int, Any]]:
  """evaluate.run_eval over the whole held-out split of the latest checkpoint, plus each memory
  layer's per-slot totals (metrics.MemoryUsage: counts, weights, top1) and the parameter count."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from pkm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from pkm_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from pkm_jax import evaluate as eval_lib  # pylint: disable=g-import-not-at-top
  from pkm_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top

  model, tokenizer, step = ckpt_lib.restore_model(workdir)
  graphdef, params, model_state = nnx.split(model, nnx.Param, nnx.BatchStat)
  n_params = int(sum(x.size for x in jax.tree.leaves(params)))
  _, eval_data = data_lib.make_mlm_data(config.data, tokenizer, seed=config.seed)
  eval_step = jax.jit(eval_lib.make_eval_step(graphdef, model.cfg))
  usage = {layer: metrics_lib.MemoryUsage(model.cfg.memory.n_slots)
           for layer in model.cfg.memory_layers}

  def recording_step(p, s, f, batch):  # run_eval's own sums, with the slot totals kept here
    sums, batch_usage = eval_step(p, s, f, batch)
    for layer, (c, w, t) in batch_usage.items():
      usage[layer].add(c, w, t)
    return sums, batch_usage

  result = eval_lib.run_eval(recording_step, (params, model_state, {}),
                             eval_data(None), lambda b: jax.tree.map(jnp.asarray, b), model.cfg)
  return {"params": n_params, "step": step, **result}, usage


# ---------------------------------------------------------------------------------------------
# The table and the paper's claims
# ---------------------------------------------------------------------------------------------


def _layers_label(layers: list[int]) -> str:
  return "/".join(f"{layer + 1}L" for layer in layers)  # 1-based, as the paper's "4L/8L"


def markdown_table(rows: list[dict[str, Any]], layers: list[int], downstream: str | None) -> str:
  names = _layers_label(layers)
  header = ["Model", "Params", f"MU ({names}) (%)", f"top-1 MU ({names}) (%)",
            f"KL_u ({names})", f"KL_w ({names})", "MLM ppl", "MLM acc (%)"]
  if downstream:
    header.append(f"{downstream} acc (%)")

  def per_layer(row, stat, fmt):
    if not row["memory"]:
      return "-"
    return "/".join(format(row["memory"][str(layer)][stat], fmt) for layer in layers)

  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    cells = [row["label"], f"{row['params'] / 1e6:.2f}M",
             per_layer(row, "usage", ".1f"), per_layer(row, "top1_usage", ".1f"),
             per_layer(row, "kl_uniform", ".2f"), per_layer(row, "kl_weighted", ".2f"),
             f"{row['mlm_perplexity']:.2f}", f"{100 * row['mlm_accuracy']:.1f}"]
    if downstream:
      acc = row.get("downstream", {}).get("accuracy")
      cells.append("-" if acc is None else f"{100 * acc:.1f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def paper_claims(rows: dict[str, dict[str, Any]], layers: list[int]) -> list[dict[str, Any]]:
  """The paper's orderings (Kim & Jung 2020, Tables 2-4), each checked on these numbers: [{claim, holds}]."""
  def kl(key, stat):  # mean over the memory layers
    return sum(rows[key]["memory"][str(layer)][stat] for layer in layers) / len(layers)

  ppl = {k: r["mlm_perplexity"] for k, r in rows.items()}
  claims = []
  for stat, name in (("kl_uniform", "KL_u"), ("kl_weighted", "KL_w")):
    v = {k: kl(k, stat) for k in "cdef"}
    claims += [
        (f"Init evens out memory use: {name} (e) +Init +PKM < (c) +PKM", v["e"] < v["c"]),
        (f"ResM evens out memory use: {name} (d) +ResM < (c) +PKM", v["d"] < v["c"]),
        (f"Init and ResM together are best: {name} (f) lowest of (c)-(f)",
         all(v["f"] < v[k] for k in "cde")),
    ]
  top1 = {k: sum(rows[k]["memory"][str(layer)]["top1_usage"] for layer in layers) / len(layers)
          for k in "cdef"}
  claims += [
      ("top-1 MU: (f) highest of (c)-(f)", all(top1["f"] > top1[k] for k in "cde")),
      ("memory beats the dense baseline: ppl (c) +PKM < (a) BERT", ppl["c"] < ppl["a"]),
      ("memory beats the dense baseline: ppl (d) +ResM < (a) BERT", ppl["d"] < ppl["a"]),
      ("memory beats the extra-steps control: ppl (e) +Init +PKM < (b)", ppl["e"] < ppl["b"]),
      ("memory beats the extra-steps control: ppl (f) +Init +ResM < (b)", ppl["f"] < ppl["b"]),
      ("Init improves perplexity: ppl (e) < (c) and (f) < (d)",
       ppl["e"] < ppl["c"] and ppl["f"] < ppl["d"]),
      ("ResM at least as good as PKM: ppl (d) <= (c)", ppl["d"] <= ppl["c"]),
      ("+Init +ResM has the lowest ppl of all six", all(ppl["f"] < ppl[k] for k in "abcde")),
  ]
  acc = {k: r.get("downstream", {}).get("accuracy") for k, r in rows.items()}
  if all(a is not None for a in acc.values()):
    claims += [
        ("downstream: (f) +Init +ResM best of all six",
         all(acc["f"] > acc[k] for k in "abcde")),
        ("downstream: +Init (e), (f) beat plain (c), (d)",
         min(acc["e"], acc["f"]) > max(acc["c"], acc["d"])),
    ]
  return [{"claim": c, "holds": bool(h)} for c, h in claims]


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _check_settings(out: str, settings: dict[str, Any]) -> None:
  path = os.path.join(out, "settings.json")
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved != settings:
      diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
      raise ValueError(f"{out} holds a reproduction with other settings ({', '.join(diff)} "
                       "differ); use another --out or delete it")
  os.makedirs(out, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(settings, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def run(config: ml_collections.ConfigDict, out: str, *, steps: int, extra_steps: int,
        quick: bool = False, glue_data_dir: str = "", glue_task: str = "sst2"
        ) -> dict[str, Any]:
  """Trains, evaluates and fine-tunes the six variants into `out`; writes the report files."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from pkm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from pkm_jax import evaluate as eval_lib  # pylint: disable=g-import-not-at-top
  from pkm_jax import trainer  # pylint: disable=g-import-not-at-top
  from pkm_jax.tasks import finetune  # pylint: disable=g-import-not-at-top
  from pkm_jax.tasks import task_config  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import plots  # pylint: disable=g-import-not-at-top

  if steps < 1 or extra_steps < 1:
    raise ValueError(f"--steps={steps} and --extra_steps={extra_steps} must be >= 1")
  config = config.copy_and_resolve_references()
  config.memory.mode, config.train.steps = "residual", steps
  config_lib.validate(config)  # a bad override fails before the first (long) run
  out = os.path.abspath(out)
  layers = sorted(int(x) for x in config.memory.layers)
  ft = finetune_settings(quick)
  if glue_data_dir:
    downstream = {"task": glue_task, "data_dir": os.path.abspath(glue_data_dir)}
  elif config.data.source == "generated":
    downstream = {"task": "sst2", "data_dir": os.path.join(out, "downstream"), "facts": True}
  else:
    downstream = None
    print("No downstream task: the corpus is not generated and --glue_data_dir is not set.")
  _check_settings(out, {"config": json.loads(config.to_json()), "steps": steps,
                        "extra_steps": extra_steps, "finetune": ft, "downstream": downstream})
  timings: dict[str, float] = {}
  if downstream and downstream.get("facts"):
    g = config.data.generated
    downstream["examples"] = write_fact_task(downstream["data_dir"], g.num_entities, g.seed,
                                             seed=config.seed)

  rows: dict[str, dict[str, Any]] = {}
  usage_maps: dict[str, dict[int, np.ndarray]] = {}
  curves = []
  os.makedirs(os.path.join(out, "usage"), exist_ok=True)
  for v in VARIANTS:
    label = v.label.format(E=extra_steps)
    workdir = os.path.join(out, "runs", v.key)
    cfg = config.copy_and_resolve_references()
    cfg.memory.mode = v.mode
    if v.memory:
      memory = dict(v.memory)
      cfg.memory.update(n_keys=matched_n_keys(cfg, memory, count_params(cfg)), **memory)
    cfg.train.steps = extra_steps if v.init else steps
    if v.init:
      cfg.init.pretrained = os.path.join(out, "runs", "a")
    print(f"=== {label}: memory {v.mode}, {cfg.train.steps} steps"
          + (f" from {cfg.init.pretrained}" if v.init else " from scratch"), flush=True)
    t0 = time.perf_counter()
    trainer.train_and_evaluate(cfg, workdir)
    timings[f"train_{v.key}"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result, usage = evaluate_with_counts(cfg, workdir)
    timings[f"eval_{v.key}"] = time.perf_counter() - t0
    row = {"key": v.key, "label": label, "mode": v.mode, "init": v.init,
           "kind": cfg.memory.kind, "n_keys": cfg.memory.n_keys,
           "steps": cfg.train.steps, "total_steps": cfg.train.steps + (steps if v.init else 0),
           "workdir": os.path.relpath(workdir, out), **result}
    if usage:
      np.savez_compressed(os.path.join(out, "usage", f"{v.key}.npz"),
                          **{f"layer{l}_{name}": getattr(u, name) for l, u in usage.items()
                             for name in ("counts", "weights", "top1")})
      usage_maps[label] = {l: eval_lib.usage_histogram(u.counts) for l, u in usage.items()}
    if downstream:
      t0 = time.perf_counter()
      ft_cfg = task_config.base_config()
      ft_cfg.update(task=downstream["task"], seed=config.seed)
      ft_cfg.init.pretrained = workdir
      ft_cfg.data.data_dir = downstream["data_dir"]
      ft_cfg.train.update(log_every=10**6, checkpoint_every=10**6)
      for group, values in ft.items():
        ft_cfg[group].update(values)
      ft_cfg.mesh.update(data=1, model=1)
      ft_result = finetune.finetune_and_evaluate(ft_cfg, os.path.join(out, "finetune", v.key))
      timings[f"finetune_{v.key}"] = time.perf_counter() - t0
      dev = next(ft_result[s] for s in ("dev", "dev_matched") if s in ft_result)
      row["downstream"] = {"task": downstream["task"], **dev}
      if downstream.get("facts"):
        row["downstream"]["accuracy_by_kind"] = accuracy_by_kind(
            downstream["data_dir"],
            os.path.join(out, "finetune", v.key, "sst2", "predictions_dev.json"))
    rows[v.key] = row
    scalars, _ = plots.read_events(os.path.join(workdir, "tensorboard"))
    curves.append({"key": v.key, "label": label, "scalars": scalars,
                   "offset": steps if v.init else 0})

  t0 = time.perf_counter()
  plots.plot_loss_curves(curves, os.path.join(out, "loss_curves.png"))
  plots.plot_memory_usage([c for c in curves if c["key"] in "cdefgh"], layers,
                          os.path.join(out, "memory_usage.png"))
  plots.plot_usage_maps(usage_maps, os.path.join(out, "usage_maps.png"))
  timings["plots"] = time.perf_counter() - t0

  task_name = None
  if downstream:
    task_name = "facts" if downstream.get("facts") else downstream["task"]
  table = markdown_table(list(rows.values()), layers, task_name)
  claims = paper_claims(rows, layers)
  report = {"steps": steps, "extra_steps": extra_steps, "quick": quick,
            "memory_layers": layers, "config": json.loads(config.to_json()),
            "finetune": ft, "downstream": downstream, "variants": rows, "claims": claims,
            "table": table, "seconds": {k: round(t, 1) for k, t in timings.items()}}
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(report, f, indent=2, sort_keys=True)
  md = [f"# Kim & Jung (2020) at laptop scale: S = {steps}, E = {extra_steps} steps", "",
        table, "", "Paper's orderings on these numbers (KL: mean over memory layers):", ""]
  md += [f"- [{'x' if c['holds'] else ' '}] {c['claim']}" for c in claims]
  md += ["", "(g) Memory+ (gated, one shared value table) and (h) PEER (single-neuron experts) "
         "continue (a) as (f) does, with n_keys chosen for (f)'s parameter count. One seed at "
         "this scale: a difference in the table is a measurement of this run, not evidence "
         "that one kind is better; what it does show is that each kind trains, converts (+Init) "
         "and fine-tunes through the same commands."]
  md += ["", "Plots: loss_curves.png, memory_usage.png, usage_maps.png", ""]
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(md))
  print("\n".join(md), flush=True)
  return report


def main(argv: list[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  steps = f.steps or int(_CONFIG.value.train.steps)
  extra = f.extra_steps or max(1, steps // 2)
  t0, cpu0 = time.perf_counter(), time.process_time()
  if f.causal:
    import reproduce_causal  # pylint: disable=g-import-not-at-top
    out = DEFAULT_CAUSAL_OUT if f.out == DEFAULT_OUT else f.out
    report = reproduce_causal.run(_CONFIG.value, out, steps=steps, extra_steps=extra,
                                  quick=f.quick)
  else:
    out = f.out
    report = run(_CONFIG.value, f.out, steps=steps, extra_steps=extra, quick=f.quick,
                 glue_data_dir=f.glue_data_dir, glue_task=f.glue_task)
  wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
  report["seconds"].update(total_wall=round(wall, 1), total_cpu=round(cpu, 1))
  with open(os.path.join(out, "results.json"), "w") as fp:
    json.dump(report, fp, indent=2, sort_keys=True)
  print(f"Done in {wall:.0f} s ({cpu:.0f} CPU-seconds): {os.path.abspath(out)}")


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from pkm_jax import cli  # pylint: disable=g-import-not-at-top
  # --quick picks the tiny get_config('quick') as the base; --config.x.y overrides still apply.
  _quick = any(a in ("--quick", "--quick=true", "--quick=True") for a in sys.argv[1:])
  _causal = any(a in ("--causal", "--causal=true", "--causal=True") for a in sys.argv[1:])
  _base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reproduce_causal.py")
  _CONFIG = cli.define_config((_base if _causal else os.path.abspath(__file__))
                              + (":quick" if _quick else ""))
  flags.DEFINE_string("out", DEFAULT_OUT, "Output folder.")
  flags.DEFINE_integer("steps", 0, "S: pretraining steps of (a), (c), (d) (0: config.train.steps).")
  flags.DEFINE_integer("extra_steps", 0, "E: steps of (b), (e), (f) (0: S // 2).")
  flags.DEFINE_bool("quick", False, "Tiny sizes (get_config('quick')): a couple of minutes.")
  flags.DEFINE_bool("causal", False, "The +Init protocol on a causal LM (GPT-2 family) instead: "
                    "benchmarks/reproduce_causal.py.")
  flags.DEFINE_string("glue_data_dir", "", "Fine-tune on a local GLUE task instead of the "
                      "generated fact-verification task.")
  flags.DEFINE_string("glue_task", "sst2", "The GLUE task with --glue_data_dir.")
  cli.run(main)
