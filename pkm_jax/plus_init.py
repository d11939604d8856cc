"""+Init (Kim & Jung 2020): a memory model starts from a dense pretrained model (BERT, or a
causal LM: GPT-2, Llama, Qwen2, Mistral).

`init_from_pretrained` copies every pretrained tensor whose path exists in the target model;
memory parameters stay as initialised; with memory mode 'replace' (PKM) the FFN weights of
memory layers have no place and are dropped, with 'residual' (ResM) everything is kept.
`resolve_model_config` takes the model sizes (and the tokenizer) from the pretrained model.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, traverse_util

from pkm_jax import config as config_lib
from pkm_jax.architecture import ModelConfig
from pkm_jax.config import ConfigError

# Fields that fix parameter shapes or the function computed: source and target must agree.
SIZE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
               "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "family",
               "num_kv_heads", "head_dim", "attention_bias", "qkv_bias", "mlp_bias",
               "tie_embeddings", "rope_theta", "rope_scaling", "sliding_window")


def _same(a, b) -> bool:
  """Numbers within float rounding (a JSON round trip), anything else equal."""
  if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
    return bool(np.isclose(a, b, rtol=1e-6, atol=0))
  return config_lib.as_tuples(a) == config_lib.as_tuples(b)


def _name(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def _group(name: str) -> str:
  """'bert.layers.3.ffn.output.kernel' -> 'bert.layers.3.ffn'; 'bert.pooler.dense.bias' ->
  'bert.pooler'."""
  parts = name.split(".")
  return ".".join(parts[:4] if parts[1:2] == ["layers"] else parts[:2])


@dataclasses.dataclass
class InitReport:
  """What +Init did: names of loaded / new (left as initialised) / dropped pretrained tensors."""

  loaded: list[str]
  new: list[str]
  dropped: list[str]
  loaded_params: int
  new_params: int
  dropped_params: int

  def summary(self) -> str:
    def groups(names):
      return ", ".join(dict.fromkeys(_group(n) for n in names)) or "-"
    return (f"loaded {len(self.loaded)} pretrained tensors ({self.loaded_params / 1e6:.2f}M "
            f"values); new {len(self.new)} ({self.new_params / 1e6:.2f}M: {groups(self.new)}); "
            f"dropped {len(self.dropped)} ({self.dropped_params / 1e6:.2f}M: "
            f"{groups(self.dropped)})")


def init_from_pretrained(model: nnx.Module, pretrained_params: dict,
                         pretrained_cfg: ModelConfig) -> InitReport:
  """Copies every pretrained tensor whose path exists in `model` into it, in place.

  Tensors the model has no place for (the FFN of a 'replace' memory layer, a pooler the model
  lacks) are dropped; the model's other parameters (memory) keep their initial values.
  """
  target_cfg = model.cfg
  diffs = [f"{f} {getattr(target_cfg, f)} vs pretrained {getattr(pretrained_cfg, f)}"
           for f in SIZE_FIELDS if not _same(getattr(target_cfg, f), getattr(pretrained_cfg, f))]
  if diffs:
    raise ValueError(f"the model to initialise disagrees with the pretrained config: "
                     f"{'; '.join(diffs)}")
  state = nnx.state(model, nnx.Param)
  target = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  # A pkm-jax workdir's weights carry its BatchNorm statistics (memory query norms): a model
  # continued from it normalises its queries as it was trained to.
  stats_state = nnx.state(model, nnx.BatchStat)
  stats = traverse_util.flatten_dict(nnx.to_pure_dict(stats_state))
  source = traverse_util.flatten_dict(pretrained_params)
  merged, merged_stats, loaded, dropped = dict(target), dict(stats), [], []
  for path, x in source.items():
    into = merged if path in target else merged_stats if path in stats else None
    if into is None:
      dropped.append(path)
      continue
    want = (target if into is merged else stats)[path]
    if tuple(np.shape(x)) != tuple(want.shape):
      raise ValueError(f"pretrained tensor '{_name(path)}' has shape {tuple(np.shape(x))} but "
                       f"the model's is {tuple(want.shape)}")
    into[path] = jnp.asarray(x, dtype=want.dtype)
    loaded.append(path)
  new = [p for p in target if p not in source]
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(merged))
  nnx.update(model, state)
  if merged_stats:
    nnx.replace_by_pure_dict(stats_state, traverse_util.unflatten_dict(merged_stats))
    nnx.update(model, stats_state)
  size = lambda paths, tree: int(sum(np.size(tree[p]) for p in paths))
  return InitReport(loaded=[_name(p) for p in loaded], new=[_name(p) for p in new],
                    dropped=[_name(p) for p in dropped], loaded_params=size(loaded, source),
                    new_params=size(new, target), dropped_params=size(dropped, source))


def resolve_model_config(config: ml_collections.ConfigDict,
                         pretrained_cfg: ModelConfig) -> ml_collections.ConfigDict:
  """A copy of `config` whose model sizes are the pretrained model's.

  "Explicitly set" means different from `base_config()`'s default (vocab_size: non-zero): such
  a value must equal the pretrained one, else ConfigError naming every conflicting key. So
  leave config.model sizes at their defaults (or set them to the pretrained values) when using
  init.pretrained. use_pooler is on if either side has a pooler. data.tokenizer, when empty, becomes
  config.init.pretrained: the pretrained token ids are only meaningful with its own tokenizer.
  """
  defaults = config_lib.base_config().model
  out = config.copy_and_resolve_references()
  conflicts = []
  for field in SIZE_FIELDS:
    user, pre = config.model[field], getattr(pretrained_cfg, field)
    if not _same(user, defaults[field]) and not _same(user, pre):
      conflicts.append(f"model.{field}={user} (pretrained: {pre})")
    out.model[field] = type(defaults[field])(config_lib.as_tuples(pre))
  if conflicts:
    raise ConfigError(f"config conflicts with the pretrained model {config.init.pretrained!r}: "
                      f"{', '.join(conflicts)}; leave these at base_config() defaults to take "
                      f"the pretrained values")
  out.model.use_pooler = bool(config.model.use_pooler or pretrained_cfg.use_pooler)
  if not out.data.tokenizer and config.init.pretrained:
    out.data.tokenizer = config.init.pretrained
  return out
