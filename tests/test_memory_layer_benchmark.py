"""benchmarks/memory_layer.py --tiny and benchmarks/accelerator.py --tiny as a user runs them:
every component timed, the tables printed, the JSON written."""

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPONENTS = ("query projection", "sub-key scores", "first-stage top-k",
              "first-stage top-k, jax.lax.top_k", "candidate stage",
              "candidate stage, full k x k grid", "search", "lookup forward", "lookup backward",
              "lookup forward, pure JAX", "lookup backward, pure JAX", "value update dense", "value update sparse", "value update sparse, pure JAX",
              "memory layer forward", "FFN forward", "FFN forward+backward")


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


def run_accelerator(tmp_path, *flags):
  out = tmp_path / "accelerator.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "benchmarks/accelerator.py", "--tiny", *flags, "--out",
                         str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  return proc.stdout, json.loads(out.read_text())


def test_accelerator_script_tiny(tmp_path):
  """Every run of the set, both lookups (Pallas in interpret mode here), one JSON."""
  stdout, report = run_accelerator(tmp_path)
  assert report["platform"] == "cpu" and report["skipped"] == report["failed"] == []
  names = [r["name"] for r in report["runs"]]
  assert names == ["memory_layer tiny xla", "throughput tiny xla", "memory_layer tiny pallas",
                   "throughput tiny pallas"]
  for run in report["runs"][::2]:
    assert [r["component"] for r in run["results"]] == list(COMPONENTS)
  xla, pallas = report["runs"][1]["results"], report["runs"][3]["results"]
  assert [r["model"] for r in xla] == ["BERT", "+PKM", "+ResM"]
  assert [r["model"] for r in pallas] == ["BERT", "+ResM"]
  for r in xla + pallas:
    assert r["params"] > 0 and all(math.isfinite(r[key]) and r[key] > 0 for key in (
        "inference_seq_per_s", "train_seq_per_s", "program_train_seq_per_s",
        "program_bert_step_s", "program_train_ratio"))
    # The train.py step's ratio is to the BERT timed beside it, in the same process.
    assert r["program_train_ratio"] == r["program_bert_step_s"] / r["program_train_step_s"]
  assert xla[0]["program_train_ratio"] == 1.0
  # Same models, other lookup kernel: the same parameter counts.
  assert pallas[1]["params"] == xla[2]["params"]
  assert "lookup pallas" in stdout and "| +ResM |" in stdout


def test_accelerator_script_keeps_to_its_budget(tmp_path):
  """Past --budget_s no new run starts, and the JSON lists what was skipped."""
  stdout, report = run_accelerator(tmp_path, "--budget_s", "0")
  assert report["runs"] == []
  assert [r["name"] for r in report["skipped"]] == [
      "memory_layer tiny xla", "throughput tiny xla", "memory_layer tiny pallas",
      "throughput tiny pallas"]
  assert "0 runs" in stdout and "4 skipped" in stdout


def test_accelerator_failed_run_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
  """A run that raises (a kernel the device cannot compile) is listed with its error; the runs
  after it still run, and the JSON on disk holds both."""
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  try:
    import accelerator
  finally:
    sys.path.pop(0)

  class Script:
    def __init__(self, fail):
      self.fail = fail

    def main(self, argv):
      if self.fail:
        raise RuntimeError("Mosaic: unsupported DMA")
      return [{"argv": argv}]

  monkeypatch.setattr(accelerator, "plan", lambda args: [
      ("first", Script(True), ["--a"]), ("second", Script(False), ["--b"])])
  out = tmp_path / "acc.json"
  report = accelerator.main(["--out", str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  assert report["failed"] == [{"name": "first", "argv": ["--a"],
                               "error": "RuntimeError: Mosaic: unsupported DMA"}]
  assert [r["name"] for r in report["runs"]] == ["second"]
  assert report["runs"][0]["results"][0]["argv"][0] == "--b"


def test_default_run_benchmark_one_tiny_pair(tmp_path):
  """benchmarks/default_run.py against this same checkout: a pair timed, the table and JSON."""
  out = tmp_path / "default_run.json"
  tiny = ("--config.train.log_every=1 --config.train.eval_every=2 --config.train.eval_batches=1 "
          "--config.data.batch_size=8 --config.data.max_len=32 --config.data.vocab_size=300 "
          "--config.data.generated.num_entities=40 --config.data.generated.num_docs=200 "
          "--config.memory.n_keys=8 --config.memory.k=4 --config.memory.k_dim=16")
  proc = subprocess.run([sys.executable, "benchmarks/default_run.py", f"--baseline={REPO}",
                         "--pairs=1", "--steps=2", f"--train_args={tiny}", "--env=A_ONLY=1",
                         f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| pair | A s | B s | B/A |" in proc.stdout and "over 1 pairs" in proc.stdout
  result = json.loads(out.read_text())
  (pair,) = result["pairs"]
  assert pair["a_s"] > 0 and pair["b_s"] > 0
  assert math.isclose(pair["speedup"], pair["b_s"] / pair["a_s"])
  assert result["a_env"] == ["A_ONLY=1"] and result["steps"] == 2
