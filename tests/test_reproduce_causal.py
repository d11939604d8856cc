"""benchmarks/reproduce.py --causal --quick end to end: six rows, sane JSON, and the fact
completion measure against greedy generation (pkm_jax.generate) on the trained models."""

import json
import math
import os
import subprocess
import sys

import pytest

from pkm_jax import checkpoint as ckpt_lib
from pkm_jax import generate as gen_lib
from pkm_jax.data import corpus
from pkm_jax.data.tokenizer import causal_special_ids

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import reproduce_causal  # noqa: E402

KEYS = [v[0] for v in reproduce_causal.VARIANTS]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("reproduce_causal"))
  env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}  # one device
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "reproduce.py"),
                         "--causal", "--quick", f"--out={out}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


def test_rows_and_json(out):
  with open(os.path.join(out, "results.json")) as f:
    report = json.load(f)
  rows = report["variants"]
  assert list(rows) == KEYS
  s, e = report["steps"], report["extra_steps"]
  for key, row in rows.items():
    assert math.isclose(row["lm_perplexity"], math.exp(row["lm_loss"]), rel_tol=1e-9)
    assert 0 <= row["facts_known"] <= 1 and row["facts"] > 50
    assert row["total_steps"] == (s + e if row["init"] else s)
    assert bool(row["memory"]) == (row["mode"] != "none"), key
  table = open(os.path.join(out, "results.md")).read()
  for key in KEYS:
    assert f"| ({key}) " in table


def test_fact_completion_is_greedy_generation(out):
  """The teacher-forced measure equals what greedy decoding emits, fact by fact."""
  with open(os.path.join(out, "results.json")) as f:
    report = json.load(f)
  g = report["config"]["data"]["generated"]
  for key in ("b", "f"):
    model, tokenizer, _ = ckpt_lib.restore_model(os.path.join(out, "runs", key))
    world = corpus.generate_world(g["num_entities"], g["seed"])
    facts = reproduce_causal.fact_prompts(world, tokenizer,
                                          causal_special_ids(tokenizer)["eos"])[:40]
    known = [gen_lib.generate(model, [p], max_new_tokens=len(o))[0].token_ids == o
             for p, o in facts]
    assert reproduce_causal.fact_accuracy(model, facts) == sum(known) / len(facts)
