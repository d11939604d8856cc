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

import knowledge_report  # noqa: E402  (benchmarks/knowledge_report.py, found through _HERE)

DEFAULT_OUT = os.path.join("benchmarks", "results", "knowledge")
METHODS = ("full", "lora", "memory", "sparse_memory")
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

  views = {t: knowledge_report.view(before, runs, steps, layers, s["lr"], t)
           for t in ("held_out", "train")}
  vocab = kw.vocabulary_check(know, tokenizer)
  main_view = views[PRIMARY]
  report = {
      "quick": quick, "seeds": seeds, "settings": s, "primary_templates": PRIMARY,
      "target_b_accuracy": main_view["target"], "target_share": knowledge_report.TARGET_SHARE, "before": before,
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
