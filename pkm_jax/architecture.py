"""The frozen dataclasses a model is built from: BERT's sizes and its memory layers.

Model code (layers, BERT, conversion, checkpoints) receives these and nothing of the run's
config tree; `pkm_jax.config.model_config` builds one from a validated run config, and
`model_config.json` (beside checkpoints and converted models) holds `to_dict`'s data.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
  """Product-key memory hyper-parameters (Lample et al. 2019, §3; XLM's memory layer)."""

  n_keys: int = 512  # sub-keys per half: n_keys**2 slots
  heads: int = 4
  k: int = 32  # picks per head
  k_dim: int = 256  # query / product-key dimension (two halves of k_dim // 2)
  v_dim: int = 768  # value dimension (= hidden size in BERT)
  query_norm: str = "batchnorm"
  input_dropout: float = 0.0
  query_dropout: float = 0.0
  value_dropout: float = 0.0
  value_zero_init: bool = False  # ResM then starts as exactly the dense model (+Init)
  # Later members of the family (pkm_jax/memory_kinds.py); the defaults are Lample et al.'s layer.
  kind: str = "pkm"  # 'memory_plus' (Berges et al. 2024) | 'peer' (He 2024)
  gate: str = "none"  # memory_plus: out = W_o(sum w v * act(W_g x)), act silu | sigmoid
  share_values: bool = False  # one table (two for peer) read by every memory layer
  key_norm: bool = False  # sub-keys L2-normalised before scoring (Memory+'s qk-norm, keys side)
  peer_activation: str = "relu"  # peer: out = sum w act(u . x) v
  # 'bfloat16' stores the row tables (values; peer's down too) and so their Adam moments
  # (which take the table's dtype) in bf16 whatever model.param_dtype is: half the bytes read
  # per lookup; 'float32' leaves them at model.param_dtype, as files without this key were;
  # 'int8' | 'float8_e4m3fn': quantised by pkm_jax.quantize, each table with a float32 scale per
  # row ('<table>_scale' [N]), for inference (`memory_kinds.QUANTIZED`).
  value_dtype: str = "float32"

  @property
  def n_slots(self) -> int:
    return self.n_keys**2


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A model's sizes plus where and how memory enters it (Kim & Jung 2020, §3: PKM / ResM).

  `family` picks the backbone (`pkm_jax.models`): 'bert' (post-LN encoder, masked LM), or a
  causal LM: 'gpt2' (learned positions, pre-LN, tanh GELU, tied embeddings) or 'llama'
  (RMSNorm, RoPE, SwiGLU, grouped-query attention; Qwen2 and Mistral are Llama-family
  checkpoints with the switches below). BERT ignores the decoder-only fields.
  """

  family: str = "bert"
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  layer_norm_eps: float = 1e-12
  memory_mode: str = "none"  # 'replace' = PKM, 'residual' = ResM
  memory_layers: tuple[int, ...] = ()
  memory: MemoryConfig = MemoryConfig()
  use_pooler: bool = False
  remat: bool = False  # recompute each encoder layer in the backward pass (less activation memory)
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  # Causal LMs only.
  num_kv_heads: int = 0  # grouped-query attention: key/value heads (0: num_heads)
  head_dim: int = 0  # 0: hidden_size // num_heads
  attention_bias: bool = False  # llama: bias on q/k/v/o (Llama's attention_bias)
  qkv_bias: bool = False  # Qwen2: bias on q/k/v only
  mlp_bias: bool = False
  tie_embeddings: bool = True  # output projection = the word embeddings
  rope_theta: float = 10000.0
  # ('rope_type', 'llama3'), ('factor', 8.0), ... as (key, value) pairs ('default' when empty).
  rope_scaling: tuple[tuple[str, Any], ...] = ()
  sliding_window: int = 0  # Mistral: each token attends to the last N positions (0: all)

  @property
  def causal(self) -> bool:
    return self.family != "bert"

  def has_memory(self, layer: int) -> bool:
    return self.memory_mode != "none" and layer in self.memory_layers

  def has_ffn(self, layer: int) -> bool:
    return not (self.memory_mode == "replace" and layer in self.memory_layers)


def to_dict(cfg: Any) -> dict:
  """A ModelConfig as plain JSON-able data (saved beside checkpoints)."""
  return dataclasses.asdict(cfg)


# Mesh placement that model_config.json files written before placement left the model config
# (pkm_jax.placement) still carry; it says nothing about the model, so it is dropped on reading.
_PLACEMENT_KEYS = ("lookup", "slot_axes", "token_axes")


def from_dict(d: dict) -> ModelConfig:
  """A ModelConfig from `to_dict`'s data (also from files of earlier versions)."""
  d = dict(d)
  d["memory"] = {k: v for k, v in d["memory"].items() if k not in _PLACEMENT_KEYS}
  d["memory"] = MemoryConfig(**d["memory"])
  d["memory_layers"] = tuple(d["memory_layers"])
  d["rope_scaling"] = tuple((k, tuple(v) if isinstance(v, list) else v)
                            for k, v in d.get("rope_scaling", ()))
  return ModelConfig(**d)
