"""fill_mask against transformers' pipeline('fill-mask') on the same random BERT and vocabulary."""

import json
import os
import subprocess
import sys

import hf_fixtures
import pytest

from pkm_jax import fill_mask as fill_mask_lib
from pkm_jax import convert, pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = ("the cat sat on the [MASK].", "[MASK] is the capital of france, a big [MASK] city!")


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("fill") / "hf")
  hf_fixtures.save_hf(transformers.BertForMaskedLM(hf_fixtures.bert_config(vocab_size=93)),
                      folder, seed=11)
  return folder


def _pipeline_predictions(folder, text, top_k):
  pipe = transformers.pipeline(
      "fill-mask", model=transformers.BertForMaskedLM.from_pretrained(folder),
      tokenizer=transformers.BertTokenizerFast.from_pretrained(folder), top_k=top_k,
      device="cpu")
  out = pipe(text)
  return [out] if isinstance(out[0], dict) else out  # one mask: a flat list


def _assert_same(ours, ref):
  assert len(ours) == len(ref)
  for ours_mask, ref_mask in zip(ours, ref):
    assert [p["token_id"] for p in ours_mask] == [p["token"] for p in ref_mask]
    assert [p["token"] for p in ours_mask] == [p["token_str"] for p in ref_mask]
    for p, r in zip(ours_mask, ref_mask):
      assert abs(p["score"] - r["score"]) < 1e-4


@pytest.mark.parametrize("text", TEXTS)
def test_fill_mask_matches_pipeline(hf_model, text, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  top_k = 12  # deep enough to include '##' pieces and special tokens
  model, tokenizer = fill_mask_lib.load_model(hf_model)
  ours = fill_mask_lib.fill_mask(model, tokenizer, text, top_k)
  ref = _pipeline_predictions(hf_model, text, top_k)
  _assert_same(ours, ref)
  assert max(p["score"] for p in ours[0]) > 2.0 / model.cfg.vocab_size  # not a flat softmax
  assert any(p["token"].startswith("##") for mask in ours for p in mask)


def test_fill_mask_cli_on_converted_dir(hf_model, tmp_path):
  out = convert.convert_to_dir(hf_model, str(tmp_path / "converted"))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "-m", "pkm_jax.fill_mask", f"--model={out}", "--top_k=3", TEXTS[1]],
      cwd=root, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
  assert [r["mask_index"] for r in rows] == [0, 0, 0, 1, 1, 1]
  ref = _pipeline_predictions(hf_model, TEXTS[1], 3)
  _assert_same([[r for r in rows if r["mask_index"] == i] for i in (0, 1)], ref)


def test_fill_mask_without_mask_is_an_error(hf_model):
  model, tokenizer = fill_mask_lib.load_model(hf_model)
  with pytest.raises(ValueError, match="no \\[MASK\\] in the text"):
    fill_mask_lib.fill_mask(model, tokenizer, "no mask here", 5)
