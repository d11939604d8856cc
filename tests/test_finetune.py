"""Fine-tuning end to end from a tiny pretrained workdir: a generated SST-2-layout task is
learnt, SQuAD runs through windows and n-best decoding to official-style EM/F1, resuming is
exact, freeze_memory keeps the memory bit-identical, eval.py dispatches, bad input -> one line."""

import csv
import dataclasses
import json
import os
import random
import re
import shutil
import string
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer

from configs import glue as glue_config
from configs import squad as squad_config
from pkm_jax import checkpoint as ckpt_lib
from pkm_jax import optim, trainer
from pkm_jax.tasks import finetune, finetune_glue, task_model
from test_trainer import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A 4-step ResM pretraining workdir (hidden 32, 2 layers, memory at layer 1: 16**2 slots,
  k 4, BatchNorm queries) and the whole words of its WordPiece vocabulary."""
  workdir = str(tmp_path_factory.mktemp("pre"))
  trainer.train_and_evaluate(tiny_config(**{
      "train.steps": 4, "train.checkpoint_every": 4, "train.eval_every": 4,
      "train.log_every": 4, "train.memory_stats_every": 4, "train.eval_batches": 1}), workdir)
  tok = Tokenizer.from_file(os.path.join(workdir, "tokenizer.json"))
  words = sorted(w for w in tok.get_vocab() if w.isalpha() and w.islower() and len(w) >= 3)
  assert len(words) >= 40
  return workdir, words


def sst2_rows(words, n, rng):
  """Label 1 iff one of two 'good' words occurs (else one of two 'bad' ones), among fillers."""
  good, bad, fillers = words[:2], words[2:4], words[4:40]
  rows = []
  for _ in range(n):
    label = rng.randint(0, 1)
    sentence = rng.sample(fillers, 5)
    sentence.insert(rng.randint(0, 5), rng.choice(good if label else bad))
    rows.append((" ".join(sentence), label))
  return rows


def write_tsv(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))


@pytest.fixture(scope="module")
def glue_dir(pretrained, tmp_path_factory):
  _, words = pretrained
  root = str(tmp_path_factory.mktemp("glue"))
  rng = random.Random(0)
  write_tsv(os.path.join(root, "SST-2", "train.tsv"), sst2_rows(words, 256, rng))
  write_tsv(os.path.join(root, "SST-2", "dev.tsv"), sst2_rows(words, 64, rng))
  os.makedirs(os.path.join(root, "STS-B"))
  for split, n in (("train", 32), ("dev", 16)):  # a regression task, official column layout
    with open(os.path.join(root, "STS-B", f"{split}.tsv"), "w") as f:
      f.write("index\tgenre\tsentence1\tsentence2\tscore\n")
      for i in range(n):
        a, b = " ".join(rng.sample(words, 4)), " ".join(rng.sample(words, 4))
        f.write(f"{i}\tmain\t{a}\t{b}\t{rng.uniform(0, 5):.3f}\n")
  return root


def ft_config(init, data_dir, **overrides):
  """configs/glue.py at tiny sizes; overrides are 'group.key' (or top-level) names."""
  config = glue_config.get_config()
  config.task = "sst2"
  config.init.pretrained = init
  config.data.update(data_dir=data_dir, max_len=16, batch_size=16)
  config.optim.lr = 5e-3
  config.eval.batch_size = 64
  config.train.update(epochs=4.0, log_every=1000, checkpoint_every=1000)
  config.mesh.update(data=1, model=1)
  for key, value in overrides.items():
    *groups, last = key.split(".")
    target = config
    for g in groups:
      target = target[g]
    target[last] = value
  return config


def pure(tree):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree)


def read_tsv_labels(path):
  with open(path, newline="") as f:
    return [int(r["label"]) for r in csv.DictReader(f, delimiter="\t")]


# ------------------------------------------------------------------------------------ GLUE
@pytest.fixture(scope="module")
def sst2_run(pretrained, glue_dir, tmp_path_factory):
  """64 steps (4 epochs x 256 / 16) on the word rule, checkpoints at steps 32 and 64."""
  workdir, _ = pretrained
  config = ft_config(workdir, glue_dir, **{"train.checkpoint_every": 32,
                                           "train.keep_checkpoints": 3})
  ft = tmp_path_factory.mktemp("ft_sst2")
  return config, ft, finetune.finetune_and_evaluate(config, str(ft))


def test_glue_finetune_learns_the_word_rule(sst2_run, glue_dir):
  _, ft, result = sst2_run
  task_dir = ft / "sst2"
  assert result["step"] == 64
  assert result["dev"]["accuracy"] > 0.8  # chance is 0.5
  # Independent re-scoring: the written predictions against the dev file's labels.
  preds = json.loads((task_dir / "predictions_dev.json").read_text())
  labels = read_tsv_labels(os.path.join(glue_dir, "SST-2", "dev.tsv"))
  ordered = [preds[f"sst2-dev-{i}"] for i in range(len(labels))]
  from sklearn.metrics import accuracy_score
  assert result["dev"]["accuracy"] == pytest.approx(accuracy_score(labels, ordered))
  assert json.loads((task_dir / "metrics.json").read_text()) == result


def test_encoder_starts_as_the_pretrained_model(pretrained, glue_dir):
  workdir, _ = pretrained
  pre = task_model.load_init(workdir)
  cfg = task_model.task_model_config(pre.cfg, ft_config(workdir, glue_dir), "classification")
  model = task_model.build_task_model("classification", cfg, 2, classifier_dropout=0.1, seed=1)
  summary = task_model.init_task_model(model, pre.cfg, pre.params, pre.batch_stats)
  assert "pooler new" in summary and "BatchNorm statistics restored" in summary
  reference, _, _ = ckpt_lib.restore_model(workdir)
  stats = pure(nnx.state(reference, nnx.BatchStat))
  assert any(np.abs(x).max() > 0 for x in jax.tree.leaves(stats))  # trained, not initial
  ids = jax.random.randint(jax.random.key(0), (3, 12), 5, cfg.vocab_size)
  mask = jnp.ones((3, 12), jnp.int32).at[0, 8:].set(0)
  h_ft, aux_ft = model.bert(ids, mask)
  h_ref, aux_ref = reference.bert(ids, mask)
  np.testing.assert_allclose(h_ft, h_ref, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(aux_ft[1].indices, aux_ref[1].indices)


def test_converted_checkpoint_pooler_is_loaded(pretrained, tmp_path):
  from pkm_jax import converted
  from pkm_jax.models.bert import BertForMaskedLM
  workdir, _ = pretrained
  src_cfg = ckpt_lib.read_model_config(workdir)
  src_cfg = dataclasses.replace(src_cfg, use_pooler=True, memory_mode="none", memory_layers=())
  source = BertForMaskedLM(src_cfg, rngs=nnx.Rngs(3))
  out = converted.save_pretrained(str(tmp_path / "conv"), source,
                                       os.path.join(workdir, "tokenizer.json"))
  pre = task_model.load_init(out)
  config = ft_config(out, "unused")
  cfg = task_model.task_model_config(pre.cfg, config, "classification")
  model = task_model.build_task_model("classification", cfg, 3, classifier_dropout=0.1, seed=0)
  assert "pooler converted" in task_model.init_task_model(model, pre.cfg, pre.params,
                                                          pre.batch_stats)
  np.testing.assert_array_equal(model.bert.pooler.dense.kernel[...],
                                source.bert.pooler.dense.kernel[...])


def test_values_lr_scales_only_the_value_tables():
  # Adam's first step is -lr * g / (|g| + eps): each group must move by its own peak lr.
  config = ft_config("x", "y", **{"optim.lr": 1e-3, "optim.values_lr": 5e-2,
                                  "optim.warmup_fraction": 0.0, "optim.decay": "constant",
                                  "optim.weight_decay": 0.0, "optim.grad_clip": 0.0})
  tx = optim.make_optimizers(config.optim, total_steps=10).tx
  params = {"bert": {"layers": {1: {"memory": {"values": jnp.ones((8, 4)),
                                               "keys": jnp.ones((2, 3))}}},
                     "pooler": {"kernel": jnp.ones((4, 4))}}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  mem = updates["bert"]["layers"][1]["memory"]
  np.testing.assert_allclose(mem["values"], -5e-2, rtol=1e-4)
  np.testing.assert_allclose(mem["keys"], -1e-3, rtol=1e-4)
  np.testing.assert_allclose(updates["bert"]["pooler"]["kernel"], -1e-3, rtol=1e-4)


def test_table_reproduces_the_papers_average():
  # Kim & Jung 2020, BERT-base row: MNLI 84.3/84.5, QQP 91.0, QNLI 89.3, SST-2 92.8, CoLA 60.8,
  # Avg 83.8 (Kim & Jung 2020, Table 3).
  acc = lambda x: {"accuracy": x / 100}  # noqa: E731
  results = {"mnli": {"dev_matched": acc(84.3), "dev_mismatched": acc(84.5)},
             "qqp": {"dev": acc(91.0)}, "qnli": {"dev": acc(89.3)}, "sst2": {"dev": acc(92.8)},
             "cola": {"dev": {"matthews": 0.608}}}
  table, avg = finetune_glue.markdown_table("bert-base", results)
  assert round(avg, 1) == 83.8
  header, _, row = table.splitlines()
  assert header == "| Model | MNLI-(m/mm) | QQP | QNLI | SST-2 | CoLA | Avg |"
  assert row == "| bert-base | 84.3/84.5 | 91.0 | 89.3 | 92.8 | 60.8 | 83.8 |"


# ------------------------------------------------------------------------------------ SQuAD
def squad_json(words, n_questions, rng, prefix):
  names, cities = words[:12], words[12:24]
  data, made = [], 0
  while made < n_questions:
    people = rng.sample(names, 5)
    homes = [rng.choice(cities) for _ in people]
    context = " ".join(f"{p} born {c} ." for p, c in zip(people, homes))
    qas = []
    for i in rng.sample(range(5), 2):
      start = context.index(f"{people[i]} born {homes[i]} .") + len(f"{people[i]} born ")
      qas.append({"id": f"{prefix}{made}", "question": f"where born {people[i]} ?",
                  "answers": [{"text": homes[i], "answer_start": start}]})
      made += 1
    data.append({"title": "t", "paragraphs": [{"context": context, "qas": qas}]})
  return {"version": "1.1", "data": data}


def official_em(gold, predictions):
  """evaluate-v1.1.py's normalisation, written out independently."""
  def norm(s):
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())
  return 100.0 * np.mean([max(norm(predictions.get(q, "")) == norm(g) for g in golds)
                          for q, golds in gold.items()])


def test_squad_pipeline_reports_em_f1(pretrained, tmp_path):
  workdir, words = pretrained
  rng = random.Random(1)
  data_dir = tmp_path / "squad"
  data_dir.mkdir()
  (data_dir / "train-v1.1.json").write_text(json.dumps(squad_json(words, 48, rng, "t")))
  dev = squad_json(words, 16, rng, "d")
  (data_dir / "dev-v1.1.json").write_text(json.dumps(dev))
  config = squad_config.get_config()
  config.init.pretrained = workdir
  config.data.update(data_dir=str(data_dir), max_len=24, max_query_len=6, doc_stride=8,
                     batch_size=8)
  config.train.update(steps=6, log_every=3)
  config.eval.batch_size = 32
  config.optim.lr = 5e-3
  # Default mesh: data-parallel over all 8 (virtual) devices, one row each.
  result = finetune.finetune_and_evaluate(config, str(tmp_path / "ft"))
  assert result["task"] == "squad" and result["step"] == 6
  assert result["train_examples"] > 48  # 20-token contexts do not fit 18 slots: 2 windows
  assert set(result["dev"]) == {"exact_match", "f1"}
  assert all(0.0 <= v <= 100.0 for v in result["dev"].values())
  preds = json.loads((tmp_path / "ft" / "squad" / "predictions_dev.json").read_text())
  contexts = {qa["id"]: p["context"] for a in dev["data"] for p in a["paragraphs"]
              for qa in p["qas"]}
  assert set(preds) == set(contexts)
  assert all(preds[q] and preds[q] in contexts[q] for q in preds)  # spans of the context
  gold = {qa["id"]: [a["text"] for a in qa["answers"]] for a in dev["data"]
          for p in a["paragraphs"] for qa in p["qas"]}
  assert result["dev"]["exact_match"] == pytest.approx(official_em(gold, preds))


# ------------------------------------------------------------------------------------ resume
def test_resume_reproduces_the_uninterrupted_run(sst2_run, pretrained, glue_dir, tmp_path,
                                                capsys):
  config, ft, full = sst2_run
  # An interruption after the step-32 checkpoint: the same run folder without step 64.
  shutil.copytree(ft, tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "sst2" / "checkpoints" / "64")
  os.remove(tmp_path / "b" / "sst2" / "metrics.json")
  capsys.readouterr()
  resumed = finetune.finetune_and_evaluate(config, str(tmp_path / "b"))
  assert "from step 32" in capsys.readouterr().out
  assert resumed["dev"] == full["dev"]
  final_a = pure(nnx.state(finetune.restore_task_model(str(ft / "sst2"))))
  final_b = pure(nnx.state(finetune.restore_task_model(str(tmp_path / "b" / "sst2"))))
  at_32 = pure(nnx.state(finetune.restore_task_model(str(ft / "sst2"), step=32)))
  for x, y in zip(jax.tree.leaves(final_a), jax.tree.leaves(final_b)):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, z) for x, z in zip(jax.tree.leaves(final_a),
                                                        jax.tree.leaves(at_32)))
  # Same folder, different settings: refused before anything is overwritten.
  workdir, _ = pretrained
  changed = ft_config(workdir, glue_dir, **{"train.checkpoint_every": 32,
                                            "train.keep_checkpoints": 3, "optim.lr": 1e-3})
  with pytest.raises(ValueError, match=r"different settings \(optim.lr\)"):
    finetune.finetune_and_evaluate(changed, str(ft))


# ------------------------------------------------------------------------------------ CLI
def run_eval(*args):
  return subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_cli_suite_with_frozen_memory(pretrained, glue_dir, tmp_path):
  workdir, _ = pretrained
  ft = tmp_path / "ft"
  proc = run_eval("--config", "configs/glue.py", "--config.tasks=all_glue",
                  f"--config.init.pretrained={workdir}", f"--config.data.data_dir={glue_dir}",
                  "--config.optim.freeze_memory=True", "--config.train.steps=4",
                  "--config.optim.lr=1e-3", "--config.data.max_len=16",
                  "--config.data.batch_size=8", "--config.eval.batch_size=64",
                  "--config.mesh.data=1", "--config.mesh.model=1", f"--workdir={ft}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  summary = json.loads(lines[-1])
  sst2, stsb = summary["tasks"]["sst2"], summary["tasks"]["stsb"]
  assert sst2["step"] == stsb["step"] == 4 and set(stsb["dev"]) == {"pearson", "spearmanr"}
  cells = [100 * sst2["dev"]["accuracy"], 100 * stsb["dev"]["spearmanr"]]
  assert summary["avg"] == pytest.approx(np.mean(cells))
  name = os.path.basename(workdir)
  assert lines[-4:-1] == ["| Model | SST-2 | STS-B | Avg |", "| --- | --- | --- | --- |",
                          f"| {name} | {cells[0]:.1f} | {cells[1]:.1f} | {np.mean(cells):.1f} |"]
  # freeze_memory: keys, values, query net and BatchNorm statistics unchanged; the rest moved.
  tuned = finetune.restore_task_model(str(ft / "sst2"))
  reference, _, _ = ckpt_lib.restore_model(workdir)
  mem_t, mem_r = tuned.bert.layers[1].memory, reference.bert.layers[1].memory
  for kind in (nnx.Param, nnx.BatchStat):
    a, b = pure(nnx.state(mem_t, kind)), pure(nnx.state(mem_r, kind))
    assert jax.tree.structure(a) == jax.tree.structure(b) and jax.tree.leaves(a)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)
  t_state = pure(nnx.state(tuned.bert, nnx.Param))
  r_state = pure(nnx.state(reference.bert, nnx.Param))
  assert not np.array_equal(t_state["layers"][0]["attention"]["query"]["kernel"],
                            r_state["layers"][0]["attention"]["query"]["kernel"])
  assert not np.array_equal(t_state["layers"][1]["ffn"]["output"]["kernel"],
                            r_state["layers"][1]["ffn"]["output"]["kernel"])


def test_bad_input_fails_with_one_line(pretrained, glue_dir, tmp_path):
  workdir, _ = pretrained
  proc = run_eval("--config", "configs/glue.py", "--config.task=sst3",
                  f"--config.init.pretrained={workdir}", f"--config.data.data_dir={glue_dir}")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ConfigError: unknown task 'sst3'")
  assert "Traceback" not in proc.stderr
  with pytest.raises(ValueError, match="unknown GLUE task 'sst22'"):
    finetune.finetune_and_evaluate(ft_config(workdir, glue_dir, tasks="sst2,sst22"))
  with pytest.raises(FileNotFoundError, match="no such folder"):
    finetune.finetune_and_evaluate(ft_config(str(tmp_path / "nope"), glue_dir))
  with pytest.raises(FileNotFoundError, match="no GLUE task found"):
    finetune.finetune_and_evaluate(ft_config(workdir, str(tmp_path), tasks="all_glue"))
  # A missing dev file is named before any model is loaded or any folder written.
  partial = tmp_path / "partial"
  (partial / "SST-2").mkdir(parents=True)
  shutil.copy(os.path.join(glue_dir, "SST-2", "train.tsv"), partial / "SST-2" / "train.tsv")
  with pytest.raises(FileNotFoundError, match=re.escape(str(partial / "SST-2" / "dev.tsv"))):
    finetune.finetune_and_evaluate(ft_config(workdir, str(partial)), str(tmp_path / "ft"))
  assert not (tmp_path / "ft").exists()
  (partial / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nfine words\tmaybe\n")
  with pytest.raises(ValueError, match=r"dev.tsv line 2: invalid label 'maybe'"):
    finetune.finetune_and_evaluate(ft_config(workdir, str(partial)), str(tmp_path / "ft"))


def test_corrupt_pretrained_checkpoint_is_one_line(pretrained, glue_dir, tmp_path):
  """Fine-tuning's init from a damaged checkpoint: one line naming the step and the file."""
  workdir, _ = pretrained
  copy = str(tmp_path / "pre")
  shutil.copytree(workdir, copy)
  step_dir = os.path.join(copy, "checkpoints", str(ckpt_lib.latest_step(copy)))
  files = [os.path.join(r, n) for r, _, names in os.walk(os.path.join(step_dir, "params"))
           for n in names]
  bad = max(files, key=os.path.getsize)
  with open(bad, "r+b") as f:
    f.seek(os.path.getsize(bad) // 2)
    f.write(os.urandom(os.path.getsize(bad) - os.path.getsize(bad) // 2))
  proc = run_eval("--config", "configs/glue.py", "--config.task=sst2",
                  f"--config.init.pretrained={copy}", f"--config.data.data_dir={glue_dir}",
                  f"--workdir={tmp_path / 'ft'}")
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and proc.stdout == "" and len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith("error: ValueError: checkpoint step") and bad in lines[0]
  assert not (tmp_path / "ft").exists()
