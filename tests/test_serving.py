"""benchmarks/serving.py --quick, as a user runs it: a tiny model trained, its tables served as
fp32, bf16 (and int8 / fp8 where pkm_jax.quantize exists), each row measured in its own process;
the JSON holds every figure, and the relations that follow from the dtypes hold."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"model", "dtype", "table_bytes", "table_bytes_ratio", "peak_rss_mb", "tokens_per_s",
        "tokens_per_s_range", "speed_ratio", "perplexity", "perplexity_change", "agreement",
        "zeroed_perplexity", "ratio_to_memory", "memory_helps", "masked", "table_rows"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("serving")
  env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}  # one CPU device
  proc = subprocess.run([sys.executable, "benchmarks/serving.py", "--quick", "--out", str(out)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "| model | dtype | table MB |" in proc.stdout
  return json.loads((out / "results.json").read_text())


def rows(report):
  return {r["dtype"]: r for r in report["rows"]}


def test_every_row_has_every_figure(report):
  got = rows(report)
  assert {"fp32", "bf16"} <= set(got)
  for r in got.values():
    assert KEYS <= set(r), KEYS - set(r)
    assert r["masked"] > 0 and r["peak_rss_mb"] > 0 and r["table_bytes"] > 0
    low, high = r["tokens_per_s_range"]
    assert 0 < low <= r["tokens_per_s"] <= high
    assert 1 < r["perplexity"] < math.inf and 1 < r["zeroed_perplexity"] < math.inf
    assert 0 <= r["agreement"] <= 1


def test_fp32_is_its_own_reference(report):
  fp32 = rows(report)["fp32"]
  assert fp32["table_bytes_ratio"] == 1 and fp32["agreement"] == 1
  assert fp32["perplexity_change"] == 0 and fp32["speed_ratio"] == 1


def test_table_bytes_follow_the_dtype(report):
  """bf16: 2 bytes a value, nothing else; int8 / fp8: 1 byte a value and a float32 scale per
  row (the issue's <= 0.26x fp32 needs rows of >= 100 values; the quick model's have 32)."""
  got = rows(report)
  fp32 = got["fp32"]["table_bytes"]
  assert got["bf16"]["table_bytes"] == fp32 // 2
  for dtype in ("int8", "fp8"):
    if dtype in got:
      assert got[dtype]["table_bytes"] == fp32 // 4 + 4 * got[dtype]["table_rows"]
