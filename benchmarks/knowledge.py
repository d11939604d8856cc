"""Knowledge added without forgetting: each fine-tuning method learns world B's facts; what does
it forget of world A's?

  python benchmarks/knowledge.py --out /tmp/knowledge           # 3 seeds: ~50 min, 2 busy cores
  python benchmarks/knowledge.py --quick --out /tmp/knowledge_q  # tiny sizes, 1 seed: CI

1. World A: the generated corpus (pkm_jax/data/corpus.py). A BERT + ResM model (memory at
   layers 1 and 3, 128**2 slots; configs/default.py's sizes) is pretrained on A's text by the
   real trainer (MLM).
2. World B (benchmarks/knowledge_world.py): new people, named by corpus.py's own generator (so
   made of A's word pieces: the output states how A's tokenizer splits them), and changed
   attributes of some of A's people; as text (corpus.py's writer, training templates) and as
   questions (held-out templates, never trained on). The A-probe: facts of A that B never
   mentions, asked with the held-out templates too.
3. Fact accuracy under MLM (benchmarks/knowledge_eval.py): every word piece of the answer is
   masked; a fact counts only when all of them are predicted. No candidate ranking.
4. Each method (finetune.method: full, lora, memory, sparse_memory) fine-tunes the same
   pretrained model on B's text with the real trainer, for each seed (config.seed: data order,
   masking, dropout, LoRA init). The sweep is over steps at a constant learning rate: the
   checkpoints at the sweep's steps are exactly the runs of those lengths. At each point:
   accuracy on B, accuracy on the A-probe (before: the pretrained model), the absolute drop
   before - after (in [0, 1]; the relative drop beside it), MLM perplexity on A's held-out text,
   per-layer memory usage (MU, KL; pkm_jax/metrics.py) and the value rows the run wrote.
5. Equal accuracy on B: each seed's sweep (step 0 = the pretrained model) is interpolated
   linearly at a common target B accuracy, TARGET_SHARE of the lowest of the methods' best mean
   B accuracies; the A drop there is the method's forgetting at that accuracy.

Outputs under --out: results.json, results.md (table + ASCII plot), learning_forgetting.png,
pretrain/ (the world-A model), runs/<method>/seed<k>/ (fine-tuning workdirs; checkpoints are
deleted once measured), data/ (B's text, A's held-out text). Re-running with the same --out
reuses the pretrained model and every finished run.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import sys
import time
from typing import Any

import ml_collections

_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as a plain script from anywhere
  sys.path.insert(0, str(_REPO))
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

DEFAULT_OUT = os.path.join("benchmarks", "results", "knowledge")
METHODS = ("full", "lora", "memory", "sparse_memory")
TARGET_SHARE = 0.8
# The questions the headline numbers use: 'held_out' (phrasings no training text has) or
# 'train' (the text's own phrasings); results.json's "views" holds the other.
PRIMARY = "held_out"


def settings(quick: bool) -> dict[str, Any]:
  """World sizes, pretraining length and the fine-tuning sweep (steps; lr per method)."""
  if quick:
    return dict(world=dict(num_entities=40, num_docs=300, seed=0),
                b=dict(new_people=6, changed_people=4, changes_per_entity=2, probe_facts=40,
                       docs_per_entity=4),
                pretrain_steps=12, sweep_steps=(4, 8), top_t=32, batch_size=8,
                lr=dict(full=1e-3, lora=1e-3, memory=1e-3, sparse_memory=1e-3))
  # 300 entities for 2,000 steps: held-out MLM perplexity ~96 (80 entities for 1,200 steps
  # stayed at ~530 and knew none of A's facts).
  return dict(world=dict(num_entities=300, num_docs=6000, seed=0),
              b=dict(new_people=40, changed_people=40, changes_per_entity=2, probe_facts=400,
                     docs_per_entity=8),
              pretrain_steps=2000, sweep_steps=(20, 40, 60, 80), top_t=1000, batch_size=32,
              lr=dict(full=3e-4, lora=1e-2, memory=2e-2, sparse_memory=2e-2))


def pretrain_config(quick: bool) -> ml_collections.ConfigDict:
  """World A's model: configs/default.py (BERT + ResM at layers 1 and 3), MLM on A's text."""
  from configs import default  # pylint: disable=g-import-not-at-top
  s = settings(quick)
  config = default.get_config()
  config.data.generated.update(**s["world"])
  config.train.update(steps=s["pretrain_steps"], log_every=100, eval_every=s["pretrain_steps"],
                      checkpoint_every=s["pretrain_steps"], keep_checkpoints=1, eval_batches=0,
                      memory_stats_every=0)
  if quick:
    config.model.update(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                        max_position_embeddings=32)
    config.memory.update(layers=(0, 1), n_keys=16, heads=2, k=4, k_dim=16)
    config.data.update(vocab_size=400, max_len=32, batch_size=8, eval_fraction=0.1)
    config.optim.warmup_steps = 2
    config.train.log_every = 4
  return config


def has_methods() -> bool:
  """Whether this checkout has the finetune group (pkm_jax/continual): else only 'full' runs."""
  from pkm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  return "finetune" in config_lib.base_config()


def finetune_config(pre: ml_collections.ConfigDict, method: str, seed: int, *, quick: bool,
                    pretrained: str, b_text: str, a_text: str) -> ml_collections.ConfigDict:
  """The pretraining config continued on B's text from `pretrained` by `method`, a constant lr,
  a checkpoint at every sweep step (the trainer's own evaluation: one batch of A's text)."""
  s = settings(quick)
  steps = tuple(s["sweep_steps"])
  config = pre.copy_and_resolve_references()
  config.seed = seed
  config.init.pretrained = pretrained
  config.data.update(source="files", files=b_text, eval_fraction=0.0, eval_files=a_text,
                     batch_size=s["batch_size"])
  lr = s["lr"][method]
  # values_lr 0: the value rows share optim.lr, the one number each method's sweep is run at;
  # sparse Adam on the rows (as configs/sparse_memory.py: sparse_memory requires it), so a row
  # no step reads is never written, under every method.
  config.optim.update(lr=lr, values_lr=0.0, values_schedule="network", decay="constant",
                      warmup_steps=0, warmup_fraction=0.0, weight_decay=0.0,
                      values_optimizer="sparse_adam")
  every = math.gcd(*steps)
  config.train.update(steps=max(steps), log_every=every, eval_every=max(steps), eval_batches=1,
                      checkpoint_every=every, keep_checkpoints=max(steps) // every,
                      memory_stats_every=0)
  if "finetune" in config:
    config.finetune.update(method=method, top_t=s["top_t"])
  elif method != "full":
    raise ValueError(f"finetune.method={method!r} needs pkm_jax/continual (this checkout has "
                     "only full fine-tuning): run --methods=full")
  return config


# ---------------------------------------------------------------------------------------------
# Equal accuracy on B, the table, the ASCII plot
# ---------------------------------------------------------------------------------------------


def interpolate(xs: list[float], ys: list[float], target: float) -> float | None:
  """y where the polyline (xs[i], ys[i]) (in sweep order) first reaches x = target; None if it
  never does."""
  if xs[0] >= target:
    return ys[0]
  for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
    if x0 < target <= x1:
      return y0 + (target - x0) / (x1 - x0) * (y1 - y0)
  return None


def mean_sd(values: list[float | None]) -> tuple[float, float, int]:
  """(mean, sample standard deviation (0 for one value), count) of the values that exist."""
  v = [x for x in values if x is not None and not math.isnan(x)]
  if not v:
    return float("nan"), float("nan"), 0
  m = sum(v) / len(v)
  sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
  return m, sd, len(v)


def summarize(before: dict[str, Any], runs: dict[str, dict[int, dict]], steps: list[int],
              templates: str = "held_out") -> tuple[float, dict[str, dict[str, Any]]]:
  """(target B accuracy, per method: the sweep per seed, the operating point, the drop at the
  target), on the questions in `templates` phrasings ('held_out' | 'train'). Step 0 of every
  sweep is the pretrained model."""
  b, a = ("acc_b", "acc_a") if templates == "held_out" else ("acc_b_train", "acc_a_train")
  sweeps = {}
  for method, seeds in runs.items():
    sweep: dict[str, Any] = {"steps": [0] + steps, "seeds": sorted(seeds)}
    for key in ("new_fact_accuracy", "old_fact_accuracy", "old_fact_accuracy_drop",
                "old_fact_relative_drop", "ppl_a"):
      sweep[key] = []
    for seed in sorted(seeds):
      pts = [before] + seeds[seed]["points"]
      sweep["new_fact_accuracy"].append([p[b] for p in pts])
      sweep["old_fact_accuracy"].append([p[a] for p in pts])
      drops = [before[a] - p[a] for p in pts]
      sweep["old_fact_accuracy_drop"].append(drops)
      sweep["old_fact_relative_drop"].append(
          [d / before[a] if before[a] > 0 else float("nan") for d in drops])
      sweep["ppl_a"].append([p["ppl_a"] for p in pts])
    sweeps[method] = sweep
  mean_b = {m: [mean_sd([s[i] for s in sw["new_fact_accuracy"]])[0]
                for i in range(len(sw["steps"]))] for m, sw in sweeps.items()}
  target = TARGET_SHARE * min(max(v) for v in mean_b.values())
  out = {}
  for method, sw in sweeps.items():
    n = len(sw["steps"])
    op = next((i for i in range(1, n) if mean_b[method][i] >= target), n - 1)
    at = lambda key: [s[op] for s in sw[key]]  # noqa: E731
    out[method] = {
        "lr": None, "templates": templates, "operating_step": sw["steps"][op],
        "new_fact_accuracy": at("new_fact_accuracy"),
        "old_fact_accuracy": at("old_fact_accuracy"),
        "old_fact_accuracy_drop": at("old_fact_accuracy_drop"),
        "old_fact_relative_drop": at("old_fact_relative_drop"),
        "ppl_a": at("ppl_a"),
        "drop_at_target": [interpolate(b, d, target) for b, d in
                           zip(sw["new_fact_accuracy"], sw["old_fact_accuracy_drop"])],
        "sweep": sw}
  return target, out


def _pm(values: list[float | None], scale: float = 100.0, fmt: str = ".1f") -> str:
  m, sd, n = mean_sd(values)
  if not n:
    return "-"
  return f"{format(scale * m, fmt)} ± {format(scale * sd, fmt)}" + (
      f" ({n}/{len(values)})" if n < len(values) else "")


def markdown_table(before: dict[str, Any], target: float, methods: dict[str, dict[str, Any]],
                   layers: list[int]) -> str:
  b = "acc_b" if next(iter(methods.values()))["templates"] == "held_out" else "acc_b_train"
  names = "/".join(f"{layer + 1}L" for layer in layers)
  header = ["Method", "lr", "steps", "B acc (%)", "A-probe drop (pts)", "relative drop (%)",
            f"A drop at B = {100 * target:.1f}% (pts)", "A ppl",
            f"rows written ({names})", f"of them in A's top-t ({names})",
            f"MU ({names}) (%)", f"KL_u ({names})"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines.append("| pretrained (A) | - | 0 | " + f"{100 * before[b]:.1f} | - | - | - | "
               f"{before['ppl_a']:.2f} | - | - | "
               + "/".join(f"{before['memory'][str(l)]['usage']:.1f}" for l in layers) + " | "
               + "/".join(f"{before['memory'][str(l)]['kl_uniform']:.2f}" for l in layers)
               + " |")
  for method, r in methods.items():
    slots = r["slots"]
    per_layer = lambda key, fmt: "/".join(  # noqa: E731
        format(mean_sd(slots[str(l)][key])[0], fmt) for l in layers)
    lines.append(
        f"| {method} | {r['lr']:g} | {r['operating_step']} | {_pm(r['new_fact_accuracy'])} | "
        f"{_pm(r['old_fact_accuracy_drop'])} | {_pm(r['old_fact_relative_drop'])} | "
        f"{_pm(r['drop_at_target'])} | {_pm(r['ppl_a'], 1.0, '.2f')} | "
        f"{per_layer('written', '.0f')} | {per_layer('in_a_top', '.0f')} | "
        f"{per_layer('usage', '.1f')} | {per_layer('kl_uniform', '.2f')} |")
  return "\n".join(lines)


def ascii_plot(methods: dict[str, dict[str, Any]], target: float, width: int = 61,
               height: int = 17) -> str:
  """Learning (x: B accuracy) against forgetting (y: A-probe drop), seed means of each sweep
  point; a method's letter marks its points, '|' the target B accuracy."""
  pts = []
  for method, r in methods.items():
    sw = r["sweep"]
    for i in range(len(sw["steps"])):
      x = mean_sd([s[i] for s in sw["new_fact_accuracy"]])[0]
      y = mean_sd([s[i] for s in sw["old_fact_accuracy_drop"]])[0]
      pts.append((method, x, y))
  xmax = max(max(p[1] for p in pts), target, 1e-6)
  ymin, ymax = min(0.0, min(p[2] for p in pts)), max(max(p[2] for p in pts), 1e-6)
  grid = [[" "] * width for _ in range(height)]
  tx = round(target / xmax * (width - 1))
  for row in grid:
    row[tx] = "|"
  letters = {m: m[0].upper() if m != "sparse_memory" else "S" for m in methods}
  letters.update({"memory": "M", "lora": "L", "full": "F"})
  for method, x, y in pts:
    col = round(x / xmax * (width - 1))
    row = height - 1 - round((y - ymin) / (ymax - ymin) * (height - 1))
    grid[row][col] = letters[method] if grid[row][col] in " |" else "*"
  lines = [f"A drop {100 * ymax:5.1f} +" + "".join(grid[0])]
  lines += ["             |" + "".join(r) for r in grid[1:-1]]
  lines += [f"A drop {100 * ymin:5.1f} +" + "".join(grid[-1])]
  lines += ["             +" + "-" * width,
            f"             B acc 0{' ' * (width - 12)}{100 * xmax:.1f}%",
            "  " + ", ".join(f"{l} = {m}" for m, l in letters.items() if m in methods)
            + f", * = several; | = target {100 * target:.1f}%"]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _json(path: str, obj: Any) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def finetune_run(cfg: ml_collections.ConfigDict, workdir: str, ev: Any, rows0: dict,
                 top_a: dict, steps: list[int]) -> dict[str, Any]:
  """Trains one (method, seed), measures each sweep checkpoint, deletes the checkpoints."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pkm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from pkm_jax import trainer  # pylint: disable=g-import-not-at-top
  import knowledge_eval as ke  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "points.json")
  settings_now = json.loads(cfg.to_json())
  if os.path.exists(path):
    with open(path) as f:
      done = json.load(f)
    if done.get("config") == settings_now:
      return done
  if os.path.exists(workdir):  # another setting's run (or an interrupted one): start over
    shutil.rmtree(workdir)
  t0 = time.perf_counter()
  trainer.train_and_evaluate(cfg, workdir)
  seconds = time.perf_counter() - t0
  selected = read_selected(workdir)
  points = []
  for step in steps:
    model, _, _ = ckpt_lib.restore_model(workdir, step)
    _, params, state = ke.split(model)
    m = ev.measure(params, state)
    m.pop("_usage")
    written = ke.written_rows(rows0, ke.value_rows(params, model.cfg))
    m["step"] = step
    m["slots"] = {}
    for layer, w in written.items():
      info = {"written": int(w.size), "in_a_top": int(np.isin(w, top_a[layer]).sum())}
      if selected is not None:
        sel = np.asarray(selected.get(str(layer), []), np.int64)
        info["selected"] = int(np.unique(sel).size)
        info["written_outside_selected"] = int((~np.isin(w, sel)).sum())
      m["slots"][str(layer)] = info
    points.append(m)
  result = {"points": points, "train_seconds": seconds, "config": settings_now}
  _json(path, result)
  shutil.rmtree(ckpt_lib.checkpoint_dir(workdir), ignore_errors=True)
  return result


def read_selected(workdir: str) -> dict[str, list[int]] | None:
  """The slots sparse_memory selected and wrote, per table (str(layer)), as its run recorded
  them (selected_slots.json, pkm_jax/continual); None for the other methods."""
  path = os.path.join(workdir, "selected_slots.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    saved = json.load(f)
  return {key: t["written_slots"] for key, t in saved["tables"].items()}


def run(out: str, *, quick: bool, seeds: int, methods: tuple[str, ...]) -> dict[str, Any]:
  """Pretrains on A, fine-tunes each method and seed on B, measures; writes the report files."""
  from pkm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from pkm_jax import trainer  # pylint: disable=g-import-not-at-top
  from pkm_jax.data import sources  # pylint: disable=g-import-not-at-top
  import knowledge_eval as ke  # pylint: disable=g-import-not-at-top
  import knowledge_world as kw  # pylint: disable=g-import-not-at-top

  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    raise ValueError(f"--methods: {unknown or 'none given'} (use some of {', '.join(METHODS)})")
  if seeds < 1:
    raise ValueError(f"--seeds={seeds} must be >= 1")
  s = settings(quick)
  out = os.path.abspath(out)
  os.makedirs(os.path.join(out, "data"), exist_ok=True)
  timings: dict[str, float] = {}
  pre_cfg = pretrain_config(quick)
  pre_dir = os.path.join(out, "pretrain")
  t0 = time.perf_counter()
  print(f"=== pretraining on world A: {pre_cfg.train.steps} steps -> {pre_dir}", flush=True)
  trainer.train_and_evaluate(pre_cfg, pre_dir)
  timings["pretrain"] = time.perf_counter() - t0

  know = kw.make_knowledge(s["world"]["num_entities"], s["world"]["seed"], **s["b"])
  b_text, a_text = os.path.join(out, "data", "b.txt"), os.path.join(out, "data", "a_eval.txt")
  kw.write_documents(know.b_docs, b_text)
  kw.write_documents(sources.load_documents(pre_cfg.data)[1], a_text)
  model, tokenizer, _ = ckpt_lib.restore_model(pre_dir)
  graphdef, params0, state0 = ke.split(model)
  ev = ke.Evaluator(graphdef, model.cfg, tokenizer, pre_cfg.data,
                    {"b": know.questions_b, "a": know.questions_a,
                     "b_train": know.questions_b_train, "a_train": know.questions_a_train})
  before = ev.measure(params0, state0)
  usage_a = before.pop("_usage")
  rows0 = ke.value_rows(params0, model.cfg)
  top_a = {layer: ke.top_slots(c, s["top_t"]) for layer, c in usage_a.items()}
  layers = sorted(model.cfg.memory_layers)
  print(f"pretrained: B acc {before['acc_b']:.3f}, A-probe acc {before['acc_a']:.3f}, "
        f"A ppl {before['ppl_a']:.2f}", flush=True)

  steps = list(s["sweep_steps"])
  runs: dict[str, dict[int, dict]] = {}
  for seed in range(seeds):  # seed-major: an interrupted run has every method at some seeds
    for method in methods:
      workdir = os.path.join(out, "runs", method, f"seed{seed}")
      print(f"=== {method}, seed {seed}: lr {s['lr'][method]:g}, steps {steps}", flush=True)
      cfg = finetune_config(pre_cfg, method, seed, quick=quick, pretrained=pre_dir,
                            b_text=b_text, a_text=a_text)
      t0 = time.perf_counter()
      runs.setdefault(method, {})[seed] = finetune_run(cfg, workdir, ev, rows0, top_a, steps)
      timings[f"{method}/seed{seed}"] = time.perf_counter() - t0

  views = {t: view(before, runs, steps, layers, s["lr"], t) for t in ("held_out", "train")}
  vocab = kw.vocabulary_check(know, tokenizer)
  main_view = views[PRIMARY]
  report = {
      "quick": quick, "seeds": seeds, "settings": s, "primary_templates": PRIMARY,
      "target_b_accuracy": main_view["target"], "target_share": TARGET_SHARE, "before": before,
      "vocabulary": vocab,
      "world_b": {"new_people": len(know.new_people), "changed_facts": len(know.changed),
                  "b_documents": len(know.b_docs), "questions_b": len(know.questions_b),
                  "questions_a": len(know.questions_a), "probe_facts": len(know.probe_a)},
      "methods": main_view["methods"], "checks": main_view["checks"],
      "table": main_view["table"], "ascii_plot": main_view["ascii_plot"],
      "views": {t: v for t, v in views.items() if t != PRIMARY},
      "seconds": {k: round(v, 1) for k, v in timings.items()}}
  _json(os.path.join(out, "results.json"), report)
  import plots  # pylint: disable=g-import-not-at-top
  md = [f"# Knowledge benchmark: {len(know.probe_a)} A-probe facts, "
        f"{len(know.world_b.facts())} B facts, {seeds} seed(s) (mean ± sd)", ""]
  for t, v in views.items():
    name = "learning_forgetting.png" if t == PRIMARY else f"learning_forgetting_{t}.png"
    plots.plot_learning_forgetting(v["methods"], v["target"], os.path.join(out, name))
    md += [f"## Questions in the {t.replace('_', '-')} templates"
           + (" (primary)" if t == PRIMARY else ""), "", v["table"], "", "```", v["ascii_plot"],
           "```", ""]
    md += [f"- [{'x' if c['holds'] else ' '}] {c['claim']}" for c in v["checks"]]
    md += ["", f"Plot: {name}", ""]
  md += [f"B's new names under A's tokenizer: {vocab['new_name_words']} words, "
         f"{vocab['words_with_unk']} with [UNK], {vocab['whole_vocab_words']} whole vocabulary "
         f"entries, {vocab['mean_pieces_per_word']:.2f} pieces per word.", ""]
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(md))
  print("\n".join(md), flush=True)
  return report


def view(before: dict[str, Any], runs: dict[str, dict[int, dict]], steps: list[int],
         layers: list[int], lrs: dict[str, float], templates: str) -> dict[str, Any]:
  """The summary, table, ASCII plot and target checks on one set of questions."""
  target, summary = summarize(before, runs, steps, templates)
  for method, r in summary.items():
    r["lr"] = lrs[method]
    op = steps.index(r["operating_step"]) if r["operating_step"] in steps else len(steps) - 1
    pts = [runs[method][seed]["points"][op] for seed in sorted(runs[method])]
    r["slots"] = {str(l): {k: [p["slots"][str(l)].get(k) for p in pts]
                           for k in pts[0]["slots"][str(l)]} for l in layers}
    for l in layers:
      r["slots"][str(l)]["usage"] = [p["memory"][str(l)]["usage"] for p in pts]
      r["slots"][str(l)]["kl_uniform"] = [p["memory"][str(l)]["kl_uniform"] for p in pts]
    r["points"] = {str(seed): runs[method][seed]["points"] for seed in sorted(runs[method])}
  return {"templates": templates, "target": target, "methods": summary,
          "table": markdown_table(before, target, summary, layers),
          "ascii_plot": ascii_plot(summary, target),
          "checks": target_checks(summary, target,
                                  before["acc_b" if templates == "held_out" else "acc_b_train"])}


def target_checks(summary: dict[str, dict[str, Any]], target: float, before_b: float
                  ) -> list[dict[str, Any]]:
  """The issue's targets on the measured drops at equal B accuracy (seed means). A target at or
  below the pretrained model's B accuracy asks no method to learn anything: undecided (False)."""
  drop = {m: mean_sd(r["drop_at_target"])[0] for m, r in summary.items()}
  if target <= before_b:
    return [{"claim": f"undecided: the common B accuracy {100 * target:.1f}% is not above the "
                      f"pretrained model's {100 * before_b:.1f}% (some method did not learn B)",
             "holds": False}]
  out = []
  if "sparse_memory" in drop and "full" in drop:
    out.append(("sparse_memory's A drop at equal B accuracy <= 1/3 of full's "
                f"({100 * drop['sparse_memory']:.1f} vs {100 * drop['full']:.1f} pts)",
                drop["sparse_memory"] <= drop["full"] / 3))
  if "sparse_memory" in drop and "lora" in drop:
    out.append((f"sparse_memory's A drop < lora's ({100 * drop['sparse_memory']:.1f} vs "
                f"{100 * drop['lora']:.1f} pts)", drop["sparse_memory"] < drop["lora"]))
  return [{"claim": c, "holds": bool(h)} for c, h in out]


def main(argv: list[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_compilation_cache_dir:
    # Every (method, seed) compiles the same programs: XLA's persistent cache compiles each once.
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(os.path.abspath(f.out), "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  t0 = time.perf_counter()
  seeds = f.seeds if f.seeds else (1 if f.quick else 3)
  methods = tuple(m.strip() for m in f.methods.split(",") if m.strip())
  report = run(f.out, quick=f.quick, seeds=seeds, methods=methods)
  report["seconds"]["total_wall"] = round(time.perf_counter() - t0, 1)
  _json(os.path.join(os.path.abspath(f.out), "results.json"), report)
  print(f"Done in {report['seconds']['total_wall']:.0f} s: {os.path.abspath(f.out)}")


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from pkm_jax import cli  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("out", DEFAULT_OUT, "Output folder.")
  flags.DEFINE_bool("quick", False, "Tiny sizes, one seed, two sweep points: CI.")
  flags.DEFINE_integer("seeds", 0, "Fine-tuning seeds per method (0: 3, or 1 with --quick).")
  flags.DEFINE_string("methods", ",".join(METHODS), "Comma-separated finetune.method values.")
  cli.run(main)
