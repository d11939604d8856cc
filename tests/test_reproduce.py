"""benchmarks/reproduce.py --quick end to end: the six-row table, the JSON, the plots; its memory
metrics against scipy on the saved per-slot counts; live memory monitoring in the TensorBoard
event files (scalars and usage-map images that agree with each other); the generated task."""

import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy.stats import entropy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "reproduce.py")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import plots  # noqa: E402
import reproduce  # noqa: E402

QUICK = reproduce.get_config("quick")
S, E = QUICK.train.steps, QUICK.train.steps // 2
KEYS = "abcdefgh"
MEMORY_KEYS = "cdefgh"


def _env():
  env = dict(os.environ)
  # One CPU device, as a user runs it (not conftest's eight); LLVM's passes skipped as there.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  return env


@pytest.fixture(scope="module")
def out(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("reproduce"))
  proc = subprocess.run([sys.executable, SCRIPT, "--quick", f"--out={out}"], cwd=REPO,
                        env=_env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


@pytest.fixture(scope="module")
def report(out):
  with open(os.path.join(out, "results.json")) as f:
    return json.load(f)


def test_table_has_the_six_rows_in_the_papers_layout(out):
  with open(os.path.join(out, "results.md")) as f:
    lines = [line for line in f.read().splitlines() if line.startswith("|")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  assert header[0] == "Model" and header[-1] == "facts acc (%)"
  for name in ("MU (1L/2L) (%)", "KL_u (1L/2L)", "KL_w (1L/2L)", "MLM ppl", "MLM acc (%)"):
    assert name in header
  rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
  assert [r[0][:3] for r in rows] == [f"({k})" for k in KEYS]
  assert [r[0] for r in rows][1] == f"(b) +{E} steps" and rows[5][0] == "(f) +Init +ResM"
  mu = header.index("MU (1L/2L) (%)")
  for row in rows:
    assert len(row) == len(header)
    dense = row[0][:3] in ("(a)", "(b)")
    assert (row[mu] == "-") == dense
    if not dense:
      assert all(0 < float(x) <= 100 for x in row[mu].split("/"))


def test_json_values_are_sane(report):
  variants = report["variants"]
  assert sorted(variants) == list(KEYS) and (report["steps"], report["extra_steps"]) == (S, E)
  for key, v in variants.items():
    assert v["steps"] == (E if key in "befgh" else S)
    assert v["total_steps"] == (S + E if key in "befgh" else S)
    assert math.isfinite(v["mlm_perplexity"]) and v["mlm_perplexity"] > 1
    assert math.isclose(v["mlm_perplexity"], math.exp(v["mlm_loss"]), rel_tol=1e-9)
    assert 0 <= v["mlm_accuracy"] <= 1 and 0 <= v["downstream"]["accuracy"] <= 1
    assert sorted(v["memory"]) == ([] if key in "ab" else ["0", "1"])
    for stats in v["memory"].values():
      assert 0 < stats["usage"] <= 100 and 0 < stats["top1_usage"] <= stats["usage"]
      assert stats["kl_uniform"] >= 0 and stats["kl_weighted"] >= 0
  # Parameter counts follow from the architecture alone: (b) is (a), (e)/(f) are (c)/(d), and
  # ResM differs from PKM by exactly the two memory layers' FFNs.
  p = {k: v["params"] for k, v in variants.items()}
  h, i = QUICK.model.hidden_size, QUICK.model.intermediate_size
  ffn = h * i + i + i * h + h
  assert p["a"] == p["b"] and p["c"] == p["e"] and p["d"] == p["f"]
  assert p["d"] - p["c"] == 2 * ffn
  n_keys, heads, k_dim = QUICK.memory.n_keys, QUICK.memory.heads, QUICK.memory.k_dim
  memory = (n_keys**2 * h + heads * 2 * n_keys * (k_dim // 2)  # values, sub-keys
            + h * heads * k_dim + heads * k_dim + 2 * heads * k_dim)  # query net + BatchNorm
  assert p["d"] - p["a"] == 2 * memory
  # (g) Memory+ and (h) PEER: n_keys chosen for (f)'s count, within a few percent at tiny sizes.
  assert [variants[k]["kind"] for k in "fgh"] == ["pkm", "memory_plus", "peer"]
  for key in "gh":
    assert variants[key]["n_keys"] != n_keys and abs(p[key] / p["f"] - 1) < 0.05
  assert [c["claim"] for c in report["claims"]] and all(
      isinstance(c["holds"], bool) for c in report["claims"])


def test_memory_metrics_match_scipy_on_the_saved_counts(out, report):
  for key in MEMORY_KEYS:
    n = report["variants"][key]["n_keys"]**2
    saved = np.load(os.path.join(out, "usage", f"{key}.npz"))
    for layer, stats in report["variants"][key]["memory"].items():
      counts, weights, top1 = (saved[f"layer{layer}_{x}"] for x in ("counts", "weights", "top1"))
      assert counts.shape == (n,)
      uniform = np.full(n, 1.0 / n)
      np.testing.assert_allclose(stats["usage"], 100 * np.mean(counts > 0))
      np.testing.assert_allclose(stats["top1_usage"], 100 * np.mean(top1 > 0))
      np.testing.assert_allclose(stats["kl_uniform"], entropy(counts, uniform), rtol=1e-9)
      np.testing.assert_allclose(stats["kl_weighted"], entropy(weights, uniform), rtol=1e-9)
      # Every non-padding token makes heads * k picks; each head's weights sum to 1.
      heads, k = QUICK.memory.heads, QUICK.memory.k
      np.testing.assert_allclose(counts.sum() / (heads * k), top1.sum() / heads)
      np.testing.assert_allclose(weights.sum(), top1.sum(), rtol=1e-5)


def test_final_eval_in_tensorboard_matches_the_restored_checkpoint(out, report):
  # The trainer's last evaluation (in the event file) and the table's evaluation of the restored
  # checkpoint cover the same whole held-out split: they must agree.
  for key, v in report["variants"].items():
    scalars, _ = plots.read_events(os.path.join(out, "runs", key, "tensorboard"))
    step, loss = scalars["eval/mlm_loss"][-1]
    assert step == v["steps"]
    np.testing.assert_allclose(loss, v["mlm_loss"], rtol=1e-5)
    for layer, stats in v["memory"].items():
      logged = scalars[f"eval/memory/layer{layer}/kl_uniform"][-1][1]
      np.testing.assert_allclose(logged, stats["kl_uniform"], rtol=1e-4, atol=1e-6)


def test_live_memory_monitoring_in_event_files(out, report):
  every = QUICK.train.memory_stats_every
  for key, v in report["variants"].items():
    n_keys = v.get("n_keys")
    scalars, images = plots.read_events(os.path.join(out, "runs", key, "tensorboard"))
    assert "train/loss" in scalars
    if key in "ab":
      assert not images and not any("memory" in tag for tag in scalars)
      continue
    expected = list(range(every, v["steps"] + 1, every))
    for layer in (0, 1):
      for stat in ("usage", "top1_usage", "kl_uniform", "kl_weighted"):
        assert [s for s, _ in scalars[f"train/memory/layer{layer}/{stat}"]] == expected
      maps = images[f"memory/layer{layer}/usage_map"]
      assert [s for s, _ in maps] == expected
      usage = dict(scalars[f"train/memory/layer{layer}/usage"])
      for step, png in maps:
        pixels = np.asarray(Image.open(io.BytesIO(png)))
        pixels = pixels if pixels.ndim == 2 else pixels[..., 0]
        assert pixels.shape == (n_keys, n_keys) and pixels.max() == 255
        # A pixel is lit iff its slot was picked in those steps: the image agrees with MU.
        np.testing.assert_allclose(100 * np.mean(pixels > 0), usage[step], rtol=1e-6)


def test_plots_are_readable_pngs(out):
  for name in ("loss_curves.png", "memory_usage.png", "usage_maps.png"):
    with Image.open(os.path.join(out, name)) as image:
      assert image.format == "PNG" and min(image.size) >= 400
      assert np.asarray(image.convert("L")).std() > 10  # not a blank canvas


def test_rerun_with_other_settings_is_refused(out):
  with open(os.path.join(out, "results.json")) as f:
    before = f.read()
  proc = subprocess.run([sys.executable, SCRIPT, "--quick", f"--out={out}", f"--steps={S + 1}"],
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ValueError:")
  assert "other settings" in proc.stderr and "steps" in proc.stderr
  with open(os.path.join(out, "results.json")) as f:
    assert f.read() == before


def test_fact_task_is_balanced_and_labelled_by_kind(tmp_path):
  counts = reproduce.write_fact_task(str(tmp_path), 60, world_seed=3, seed=1)
  read = lambda split: [line.split("\t") for line in  # noqa: E731
                        (tmp_path / "SST-2" / f"{split}.tsv").read_text().splitlines()[1:]]
  train, dev = read("train"), read("dev")
  assert len(train) == counts["train"] and len(dev) == counts["dev"]
  assert sum(int(y) for _, y in train) * 2 == len(train)  # one true, one false per fact
  kinds = json.loads((tmp_path / "dev_kinds.json").read_text())
  assert len(kinds) == len(dev)
  assert all((int(y) == 1) == (k == "true") for (_, y), k in zip(dev, kinds))
  assert {"true", "fact", "type"} == set(kinds)
  # Every sentence is a held-out phrasing: none occurs in the corpus's training templates.
  from pkm_jax.data.corpus import TEMPLATES  # pylint: disable=g-import-not-at-top
  train_stems = {t.split("{")[0].strip() for pools in TEMPLATES.values() for t in pools[0]
                 if not t.startswith("{")}
  for sentence, _ in train + dev:
    assert not any(stem and sentence.lower().startswith(stem) for stem in train_stems)
