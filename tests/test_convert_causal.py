"""HF causal LMs (GPT-2, Llama, Qwen2, Mistral) -> pkm-jax, against transformers' torch models."""

import filecmp
import json
import os
import subprocess
import sys

import hf_causal_fixtures as fx
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pkm_jax import convert, convert_causal, pretrained
from pkm_jax.data import tokenizer as tok_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CASES = {
    "gpt2": ("GPT2LMHeadModel", fx.gpt2_config, {}),
    "gpt2_untied": ("GPT2LMHeadModel", fx.gpt2_config, dict(tie_word_embeddings=False)),
    "llama_llama3_gqa": ("LlamaForCausalLM", fx.llama_config, dict(attention_bias=True)),
    "llama_linear_tied": ("LlamaForCausalLM", fx.llama_config, dict(
        tie_word_embeddings=True, mlp_bias=True, num_key_value_heads=4,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen2": ("Qwen2ForCausalLM", fx.qwen2_config, {}),
    "qwen2_untied": ("Qwen2ForCausalLM", fx.qwen2_config, dict(tie_word_embeddings=False)),
    "mistral_window": ("MistralForCausalLM", fx.mistral_config, {}),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """name -> a saved random HF folder (built once for the module)."""
  out = {}
  for i, (name, (cls, make_cfg, kw)) in enumerate(sorted(CASES.items())):
    folder = str(tmp_path_factory.mktemp(name))
    out[name] = fx.save_hf(getattr(transformers, cls), make_cfg(**kw), folder, seed=i)
  return out


def _batch():
  ids, mask = fx.batch(t=11)
  mask[0, :2] = 0  # row 0 left-padded too
  ids[mask == 0] = 0
  return ids, mask


def _torch_logits(folder, cls, ids, mask):
  model = getattr(transformers, cls).from_pretrained(folder, attn_implementation="eager").eval()
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _ours(path, ids, mask):
  cfg, params, tok = pretrained.load_pretrained(path)
  model = pretrained.build_model(cfg, params, rngs=nnx.Rngs(0))
  logits, _ = model(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
  return cfg, np.asarray(logits), tok


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(folders, name):
  """Every real position of a teacher-forced, padded batch within 1e-4 of transformers."""
  cls = CASES[name][0]
  ids, mask = _batch()
  cfg, ours, _ = _ours(folders[name], ids, mask)
  ref = _torch_logits(folders[name], cls, ids, mask)
  real = mask.astype(bool)
  assert np.abs(ref[real]).max() > 1.0  # random weights large enough to matter
  np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=1e-4)
  assert cfg.tie_embeddings == (name in ("gpt2", "llama_linear_tied", "qwen2"))
  if name == "mistral_window":
    assert cfg.sliding_window == 4 < ids.shape[1]


@pytest.mark.parametrize("name", ["gpt2", "llama_llama3_gqa"])
def test_cli_converted_dir_matches(folders, tmp_path, name):
  """`python -m pkm_jax.convert` writes a checkpoint with the same logits and the tokenizer
  byte for byte."""
  out = str(tmp_path / "out")
  run = subprocess.run([sys.executable, "-m", "pkm_jax.convert", "--hf_dir", folders[name],
                        "--out", out], capture_output=True, text=True)
  assert run.returncode == 0, run.stderr
  assert CASES[name][0] in run.stdout
  assert filecmp.cmp(os.path.join(folders[name], "tokenizer.json"),
                     os.path.join(out, "tokenizer.json"), shallow=False)
  ids, mask = _batch()
  _, want, _ = _ours(folders[name], ids, mask)
  _, got, tok = _ours(out, ids, mask)
  np.testing.assert_array_equal(got, want)
  assert tok_lib.causal_special_ids(tok, out)["eos"] == (0 if name == "gpt2" else 2)


def test_causal_tokenizer_loads_unchanged(folders):
  folder = folders["llama_llama3_gqa"]
  tok = tok_lib.load_tokenizer(folder)
  raw = tok_lib.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
  assert tok.to_str() == raw.to_str()  # no BERT post-processor forced on it
  text = "the cat sat on the mat"
  assert tok.encode(text).ids == raw.encode(text).ids
  assert tok.decode(tok.encode(text).ids) == text
  assert not tok_lib.is_wordpiece(tok)
  ids = tok_lib.causal_special_ids(tok, folder)
  assert ids == {"bos": tok.token_to_id("<s>"), "eos": tok.token_to_id("</s>"),
                 "pad": tok.token_to_id("</s>")}  # no pad token: eos stands in


def test_causal_special_ids_from_config_ids(tmp_path):
  """Without tokenizer_config.json the ids come from config.json; pad falls back to eos."""
  tok = fx.train_bpe(("<a>", "<b>", "<c>"))
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"bos_token_id": 1, "eos_token_id": [2, 0], "pad_token_id": None}, f)
  assert tok_lib.causal_special_ids(tok, str(tmp_path)) == {"bos": 1, "eos": 2, "pad": 2}
  with pytest.raises(ValueError, match="end-of-sequence"):
    tok_lib.causal_special_ids(tok)


def _config(folder):
  with open(os.path.join(folder, "config.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("edit,message", [
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}),
     "rope_type 'yarn' is not supported"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
     "rope_type 'dynamic' is not supported"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(architectures=["LlamaForSequenceClassification"]), "unsupported architectures"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}), "needs a number 'factor'"),
])
def test_unsupported_llama_configs(folders, edit, message):
  with pytest.raises(ValueError, match=message):
    hf_cfg = {**_config(folders["llama_llama3_gqa"]), **edit}
    convert.architecture(hf_cfg)
    convert_causal.model_config_from_hf(hf_cfg)


@pytest.mark.parametrize("name,edit,message", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=4), "use_sliding_window"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    ("gpt2", dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn"),
    ("gpt2", dict(activation_function="relu"), "activation_function='relu'"),
    ("gpt2", dict(model_type="llama"), "does not match model_type"),
])
def test_unsupported_configs(folders, name, edit, message):
  with pytest.raises(ValueError, match=message):
    convert_causal.model_config_from_hf({**_config(folders[name]), **edit})


def test_cli_names_an_unsupported_rope_type(folders, tmp_path):
  """Bad input: one line naming the problem, non-zero exit."""
  import shutil  # pylint: disable=g-import-not-at-top
  folder = str(tmp_path / "yarn")
  shutil.copytree(folders["qwen2"], folder)
  hf_cfg = _config(folder)
  hf_cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_cfg, f)
  run = subprocess.run([sys.executable, "-m", "pkm_jax.convert", "--hf_dir", folder, "--out",
                        str(tmp_path / "out")], capture_output=True, text=True)
  assert run.returncode != 0
  assert "rope_type 'yarn' is not supported" in run.stderr.strip().splitlines()[-1]


def test_unexpected_tensor_is_named(folders):
  from pkm_jax.hf_files import load_hf_tensors  # pylint: disable=g-import-not-at-top
  folder = folders["mistral_window"]
  tensors = load_hf_tensors(folder)
  tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
  with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.self_attn.q_proj"):
    convert.convert_tensors(_config(folder), tensors)
  del tensors["model.layers.0.self_attn.q_proj.bias"], tensors["model.norm.weight"]
  with pytest.raises(ValueError, match="missing tensor 'model.norm.weight'"):
    convert.convert_tensors(_config(folder), tensors)
