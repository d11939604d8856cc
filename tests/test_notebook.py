"""notebooks/quickstart.ipynb runs end to end in a fresh python3 kernel (as Colab would run it on a
CPU runtime), leaves a restorable workdir and draws the heat map; it is stored without outputs."""

import json
import os

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


def test_notebook_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  assert "google.colab" in code[0].source  # the Colab install cell comes first


def test_notebook_executes(tmp_path, monkeypatch):
  workdir = tmp_path / "quickstart"
  monkeypatch.setenv("PKM_QUICKSTART_WORKDIR", str(workdir))
  # A plain kernel, as in Colab: one CPU device, default matmul precision (not the test
  # session's 8 virtual devices from conftest).
  # (LLVM's optimisation passes skipped, as in conftest: they change speed, not results.)
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": REPO}})
  client.execute()  # raises CellExecutionError (with the cell and traceback) on any error

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "brute force:" in text and "true answer:" in text
  assert any("image/png" in o.get("data", {}) for o in outputs), "no heat map was drawn"
  # The run the notebook trained is a complete workdir; its evaluation JSON is sane.
  assert sorted(os.listdir(workdir / "checkpoints")) == ["150"]
  with open(workdir / "eval" / "metrics.json") as f:
    metrics = json.load(f)
  with open(workdir / "model_config.json") as f:
    vocab = json.load(f)["vocab_size"]
  # 150 steps must beat guessing uniformly over the vocabulary.
  assert metrics["step"] == 150 and 1 < metrics["mlm_perplexity"] < vocab
  stats = metrics["memory"]["1"]
  assert 0 < stats["top1_usage"] <= stats["usage"] <= 100 and stats["kl_uniform"] >= 0
