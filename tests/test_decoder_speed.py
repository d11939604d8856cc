"""benchmarks/decoder_speed.py at tiny sizes, as a user runs it: every row measured, the table
printed, the JSON written with positive finite figures (no timing is asserted)."""

import json
import math
import os
import statistics
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ("--hidden 32 --layers 2 --heads 2 --intermediate 64 --vocab 200 --positions 64 "
        "--n_keys 8 --mem_heads 2 --k 4 --k_dim 16 --batch 2 --seq 16 --prompt 4 "
        "--new_tokens 3 --gen_batch 2 --rounds 2 --steps 1 --warmup 1").split()


def run(*flags, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_backend_optimization_level=0"}  # as conftest: speed only
  return subprocess.run([sys.executable, "benchmarks/decoder_speed.py", *flags], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  out = tmp_path_factory.mktemp("decoder_speed") / "speed.json"
  proc = run(*TINY, "--out", str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, json.loads(out.read_text())


def test_rows_and_ratios(tiny):
  stdout, report = tiny
  rows = report["results"]
  assert [r["measure"] for r in rows] == [
      "inference", "generation, batch 1", "generation, batch 2", "training"]
  for r in rows:
    dense, resm = (r["models"][m] for m in ("GPT-2", "+ResM"))
    assert len(dense["seconds_rounds"]) == len(resm["seconds_rounds"]) == 2
    # The ratio is per round (the two models timed in the same round), then the median.
    assert r["ratio_rounds"] == [d / m for d, m in zip(dense["seconds_rounds"],
                                                       resm["seconds_rounds"])]
    assert r["ratio"] == statistics.median(r["ratio_rounds"])
    assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
    for x in (*r["ratio_rounds"], dense["tokens_per_s"], resm["tokens_per_s"]):
      assert math.isfinite(x) and x > 0
  assert [r["tokens_per_step"] for r in rows] == [2 * 16, 1 * 3, 2 * 3, 2 * 16]
  assert "| generation, batch 2 | 2 x (4 + 3) |" in stdout


def test_models_differ_by_the_memory(tiny):
  _, report = tiny
  dense, resm = report["models"]
  assert report["settings"]["memory_layers"] == [0, 1]  # 5 and 9 of 12, scaled to 2 layers
  assert dense["memory_params"] == 0
  # Two memory layers, each with at least its value table (8² slots x hidden 32).
  assert resm["memory_params"] >= 2 * 8**2 * 32
  assert resm["params"] - dense["params"] == resm["memory_params"]
  assert report["model_config"]["memory"]["query_norm"] == "layernorm"


def test_bad_flags_fail_with_one_line():
  proc = run("--k", "64", "--n_keys", "8")
  assert proc.returncode != 0
  assert "--k 64 exceeds --n_keys 8" in proc.stderr.splitlines()[-1]
