"""benchmarks/memory_layer.py --tiny as a user runs it: every component timed, the table printed,
the JSON written."""

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPONENTS = ("query projection", "sub-key scores", "first-stage top-k", "candidate stage",
              "candidate stage, full k x k grid", "search", "lookup forward", "lookup backward",
              "value update dense", "value update sparse", "memory layer forward", "FFN forward",
              "FFN forward+backward")


def test_memory_layer_benchmark_tiny(tmp_path):
  out = tmp_path / "memory_layer.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "benchmarks/memory_layer.py", "--tiny", "--dtype",
                         "bfloat16", "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| component | ms | x FFN forward |" in proc.stdout
  result = json.loads(out.read_text())
  assert [r["component"] for r in result["results"]] == list(COMPONENTS)
  assert all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in result["results"])
  assert result["settings"]["dtype"] == "bfloat16" and result["settings"]["n_keys"] == 16
