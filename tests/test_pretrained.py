"""+Init and the converted-checkpoint format: ResM from dense weights is the dense function."""

import dataclasses
import json
import os

import hf_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pkm_jax import architecture
from pkm_jax import checkpoint as ckpt_lib
from pkm_jax import config as config_lib
from pkm_jax import converted, plus_init, pretrained
from pkm_jax.architecture import MemoryConfig, ModelConfig
from pkm_jax.models.bert import BertForMaskedLM
from pkm_jax.config import ConfigError
from pkm_jax.data.tokenizer import load_tokenizer
from pkm_jax.steps import TrainState

DENSE = ModelConfig(vocab_size=101, hidden_size=32, num_layers=3, num_heads=4,
                    intermediate_size=48, max_position_embeddings=32, use_pooler=True)
MEMORY = MemoryConfig(n_keys=8, heads=2, k=4, k_dim=16, v_dim=32, query_norm="batchnorm")


def _dense_model(seed=0, cfg=DENSE):
  """A dense model whose every parameter (biases, LayerNorms) is random, not its init value."""
  model = BertForMaskedLM(cfg, rngs=nnx.Rngs(params=seed))
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(state))
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  noisy = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  nnx.replace_by_pure_dict(state, jax.tree.unflatten(treedef, noisy))
  nnx.update(model, state)
  return model


def _saved_dense(tmp_path, seed=0):
  model = _dense_model(seed)
  tok = load_tokenizer(hf_fixtures.write_vocab(str(tmp_path / "vocab"), DENSE.vocab_size))
  path = converted.save_pretrained(str(tmp_path / "dense"), model, tok)
  return model, path


def _flat(params):
  """'bert.layers.0.ffn.output.kernel' -> array."""
  return {".".join(str(getattr(k, "key", k)) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _batch():
  ids, mask, types = hf_fixtures.batch(DENSE.vocab_size, t=11)
  return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), jnp.asarray(types, jnp.int32)


@pytest.mark.parametrize("zero_values", [True, False])
def test_resm_init_reproduces_dense_logits(tmp_path, zero_values):
  dense, path = _saved_dense(tmp_path)
  src_cfg, src_params, _ = pretrained.load_pretrained(path)
  cfg = dataclasses.replace(DENSE, memory_mode="residual", memory_layers=(0, 2),
                            memory=dataclasses.replace(MEMORY, value_zero_init=zero_values))
  resm = BertForMaskedLM(cfg, rngs=nnx.Rngs(params=5))
  memory_before = {n: np.asarray(v) for n, v in _flat(
      nnx.to_pure_dict(nnx.state(resm, nnx.Param))).items() if ".memory." in n}
  report = plus_init.init_from_pretrained(resm, src_params, src_cfg)

  dense_names = set(_flat(nnx.to_pure_dict(nnx.state(dense, nnx.Param))))
  assert set(report.loaded) == dense_names and report.dropped == []
  assert set(report.new) == set(memory_before)
  after = _flat(nnx.to_pure_dict(nnx.state(resm, nnx.Param)))
  for name, before in memory_before.items():  # memory keeps its own initialisation
    np.testing.assert_array_equal(after[name], before)
  ref, _ = dense(*_batch())
  out, _ = resm(*_batch())
  if zero_values:  # ResM + zero values = exactly the pretrained function (eval mode)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  else:  # the memory is live: the same init with random values changes the function
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() > 1e-3


def test_pkm_init_drops_replaced_ffn(tmp_path):
  dense, path = _saved_dense(tmp_path, seed=1)
  src_cfg, src_params, _ = pretrained.load_pretrained(path)
  cfg = dataclasses.replace(DENSE, memory_mode="replace", memory_layers=(1,), memory=MEMORY,
                            use_pooler=False)
  pkm = BertForMaskedLM(cfg, rngs=nnx.Rngs(params=3))
  report = plus_init.init_from_pretrained(pkm, src_params, src_cfg)
  src = _flat(src_params)
  expected_dropped = {n for n in src if n.startswith("bert.layers.1.ffn.")
                      or n.startswith("bert.pooler.")}
  assert len([n for n in expected_dropped if ".ffn." in n]) == 4  # 2 Linears x kernel/bias
  assert set(report.dropped) == expected_dropped
  assert set(report.loaded) == set(src) - expected_dropped
  assert all(".memory." in n for n in report.new) and report.new
  assert report.dropped_params == sum(np.size(src[n]) for n in expected_dropped)
  assert "bert.layers.1.ffn" in report.summary() and "bert.layers.1.memory" in report.summary()
  after = _flat(nnx.to_pure_dict(nnx.state(pkm, nnx.Param)))
  for name in report.loaded:
    np.testing.assert_array_equal(after[name], src[name])


def test_init_shape_and_config_mismatch_errors(tmp_path):
  _, path = _saved_dense(tmp_path, seed=2)
  src_cfg, src_params, _ = pretrained.load_pretrained(path)
  bad = jax.tree.map(lambda x: x, src_params)
  bad["bert"]["layers"][2]["attention"]["query"]["kernel"] = jnp.zeros((32, 31))
  with pytest.raises(ValueError, match=r"'bert.layers.2.attention.query.kernel' has shape "
                     r"\(32, 31\) but the model's is \(32, 32\)"):
    plus_init.init_from_pretrained(BertForMaskedLM(DENSE, rngs=nnx.Rngs(0)), bad, src_cfg)
  other = dataclasses.replace(DENSE, num_heads=2)  # same shapes, different function
  with pytest.raises(ValueError, match="num_heads 2 vs pretrained 4"):
    plus_init.init_from_pretrained(BertForMaskedLM(other, rngs=nnx.Rngs(0)), src_params,
                                    src_cfg)


def test_resolve_model_config_takes_pretrained_sizes(tmp_path):
  config = config_lib.base_config()
  config.init.pretrained = "/some/pretrained"
  config.memory.update(mode="residual", layers=[0, 2], n_keys=8, heads=2, k=4, k_dim=16)
  config.data.max_len = 32
  resolved = plus_init.resolve_model_config(config, DENSE)
  for field in ("hidden_size", "num_layers", "num_heads", "intermediate_size",
                "max_position_embeddings", "vocab_size", "layer_norm_eps"):
    assert resolved.model[field] == getattr(DENSE, field)
  assert resolved.model.use_pooler and resolved.data.tokenizer == "/some/pretrained"
  assert config.model.hidden_size == 768  # the input config is not modified
  config_lib.validate(resolved, vocab_size=DENSE.vocab_size)
  model = BertForMaskedLM(config_lib.model_config(resolved), rngs=nnx.Rngs(0))
  report = plus_init.init_from_pretrained(
      model, nnx.to_pure_dict(nnx.state(_dense_model(), nnx.Param)), DENSE)
  assert report.dropped == [] and all(".memory." in n for n in report.new)

  config.model.hidden_size = 32  # explicit and equal: fine
  plus_init.resolve_model_config(config, DENSE)
  config.model.update(hidden_size=256, num_layers=4)
  with pytest.raises(ConfigError, match="model.hidden_size=256 .pretrained: 32.*"
                     "model.num_layers=4 .pretrained: 3"):
    plus_init.resolve_model_config(config, DENSE)


def test_save_load_build_round_trip(tmp_path):
  dense, path = _saved_dense(tmp_path, seed=3)
  assert pretrained.is_converted_dir(path) and not pretrained.is_hf_folder(path)
  cfg, params, tok = pretrained.load_pretrained(path)
  assert cfg == DENSE and tok.get_vocab_size() == DENSE.vocab_size
  rebuilt = pretrained.build_model(cfg, params, rngs=nnx.Rngs(9))
  np.testing.assert_array_equal(np.asarray(rebuilt(*_batch())[0]), np.asarray(dense(*_batch())[0]))
  del params["mlm_head"]["bias"]
  with pytest.raises(ValueError, match="missing 'mlm_head.bias'"):
    pretrained.build_model(cfg, params, rngs=nnx.Rngs(0))
  with pytest.raises(FileNotFoundError, match="neither a converted checkpoint"):
    pretrained.load_pretrained(str(tmp_path / "vocab"))


def test_save_pretrained_refuses_batchnorm_state(tmp_path):
  cfg = dataclasses.replace(DENSE, memory_mode="residual", memory_layers=(1,), memory=MEMORY)
  tok = load_tokenizer(hf_fixtures.write_vocab(str(tmp_path / "vocab"), DENSE.vocab_size))
  with pytest.raises(ValueError, match="BatchNorm statistics"):
    converted.save_pretrained(str(tmp_path / "out"), BertForMaskedLM(cfg, rngs=nnx.Rngs(0)), tok)
  assert not (tmp_path / "out").exists()


def test_load_pretrained_from_training_workdir(tmp_path):
  """+Init from one of our own runs: a workdir's latest checkpoint (pkm_jax.checkpoint layout)."""
  cfg = dataclasses.replace(DENSE, memory_mode="residual", memory_layers=(1,), memory=MEMORY)
  model = BertForMaskedLM(cfg, rngs=nnx.Rngs(params=4))
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "model_config.json"), "w") as f:
    json.dump(architecture.to_dict(cfg), f)
  load_tokenizer(hf_fixtures.write_vocab(str(tmp_path / "vocab"), DENSE.vocab_size)).save(
      os.path.join(workdir, "tokenizer.json"))
  _, params, model_state = nnx.split(model, nnx.Param, nnx.BatchStat)
  manager = ckpt_lib.make_manager(workdir)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                     opt_state={"count": jnp.zeros((), jnp.int32)}, sparse_opt_state={})
  ckpt_lib.save_state(manager, 7, state, data_state={})
  manager.wait_until_finished()
  assert pretrained.is_workdir(workdir)
  loaded_cfg, loaded, _ = pretrained.load_pretrained(workdir)
  assert loaded_cfg == cfg
  # Parameters and the memory's BatchNorm statistics: a run continued from it keeps both.
  jax.tree.map(np.testing.assert_array_equal, loaded,
               nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))))
