"""pkm_jax.config: every shipped config validates; each mistake is a one-line error naming it."""

import importlib
import json
import pathlib

import pytest

from pkm_jax import config as config_lib
from pkm_jax.architecture import ModelConfig, from_dict, to_dict
from pkm_jax.config import ConfigError, model_config, validate

# Pretraining configs; fine-tuning configs (glue.py, squad.py) have their own schema and tests.
CONFIG_NAMES = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / "configs").glob("*.py")
                      if p.stem not in ("__init__", "glue", "squad"))


def load(name: str):
  return importlib.import_module(f"configs.{name}").get_config()


def test_configs_found():
  assert {"default", "bert_base", "bert_base_pkm", "bert_base_resm"} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_loads_and_validates(name):
  config = load(name)
  validate(config)
  cfg = model_config(config, vocab_size=30522)
  assert isinstance(cfg, ModelConfig)
  mem = config.memory
  assert cfg.memory_mode == mem.mode
  assert cfg.memory.v_dim == (mem.v_dim or config.model.hidden_size)
  assert cfg.memory_layers == (tuple(mem.layers) if mem.mode != "none" else ())
  for i in range(cfg.num_layers):
    assert cfg.has_ffn(i) == (mem.mode != "replace" or i not in mem.layers)


def _set(config, dotted: str, value):
  *groups, key = dotted.split(".")
  node = config
  for g in groups:
    node = node[g]
  node[key] = value


@pytest.mark.parametrize("key, value, names", [
    ("model.hiden_size", 768, "model.hiden_size"),  # typo of a real key: unknown
    ("memory.nkeys", 512, "memory.nkeys"),
    ("memory.layers", [3, 12], "memory.layers"),  # 12 layers: indices 0..11
    ("memory.layers", [-1, 3], "memory.layers"),
    ("memory.layers", [3, 3], "memory.layers"),
    ("memory.k", 600, "memory.k"),  # > n_keys = 512
    ("memory.k_dim", 255, "memory.k_dim"),
    ("memory.mode", "residul", "memory.mode"),
    ("memory.query_norm", "batch", "memory.query_norm"),
    ("optim.values_optimizer", "sgd", "optim.values_optimizer"),
])
def test_bad_config_is_rejected_with_one_line(key, value, names):
  config = load("bert_base_resm")
  _set(config, key, value)
  with pytest.raises(ConfigError) as err:
    validate(config)
  msg = str(err.value)
  assert names in msg and "\n" not in msg, msg
  assert isinstance(err.value, ValueError)


def test_unknown_top_level_group_is_rejected():
  config = load("default")
  config.trian = config_lib.base_config().train
  with pytest.raises(ConfigError, match="'trian'"):
    validate(config)


def test_sparse_adam_accepted():
  config = load("bert_base_pkm")
  config.optim.values_optimizer = "sparse_adam"
  validate(config)


def test_memory_checks_apply_only_with_memory():
  config = load("bert_base")  # mode none: the memory group's sizes are unused
  config.memory.k = 10_000
  validate(config)
  assert model_config(config, vocab_size=100).memory_layers == ()


def test_vocab_size_from_tokenizer():
  config = load("default")
  config.model.vocab_size = 0
  assert model_config(config, vocab_size=1234).vocab_size == 1234
  with pytest.raises(ConfigError, match="model.vocab_size"):
    model_config(config)


@pytest.mark.parametrize("name", ["default", "bert_base_pkm", "bert_large_resm"])
def test_model_config_round_trips_through_json(name):
  cfg = model_config(load(name), vocab_size=30522)
  restored = from_dict(json.loads(json.dumps(to_dict(cfg))))
  assert restored == cfg
  assert hash(restored) == hash(cfg)  # frozen, hashable: usable as a static jit argument


def test_model_config_written_before_value_dtype_restores():
  data = to_dict(model_config(load("bert_base_resm"), vocab_size=100))
  del data["memory"]["value_dtype"]
  assert from_dict(data).memory.value_dtype == "float32"


def test_query_norm_auto_follows_the_model_family():
  """'auto' (the default): BatchNorm for BERT, LayerNorm for causal LMs, whose batch statistics
  would carry later tokens into every position; an explicit choice is kept."""
  cfg = config_lib.base_config()
  cfg.memory.mode = "residual"
  assert config_lib.model_config(cfg, vocab_size=100).memory.query_norm == "batchnorm"
  cfg.model.family = "gpt2"
  assert config_lib.model_config(cfg, vocab_size=100).memory.query_norm == "layernorm"
  cfg.memory.query_norm = "batchnorm"
  config_lib.validate(cfg)  # allowed, with a warning
  assert config_lib.model_config(cfg, vocab_size=100).memory.query_norm == "batchnorm"
