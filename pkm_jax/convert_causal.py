"""Hugging Face causal LMs (GPT-2, Llama, Qwen2, Mistral) -> pkm-jax parameters.

`pkm_jax.convert` dispatches here by config.json's `architectures`; the folder is read by
`pkm_jax.hf_files` (safetensors, sharded index, bf16 / fp16 widened to float32). GPT-2's fused
c_attn is split into q / k / v (its Conv1D weights are already [in, out]); Llama-family Linear
weights are transposed to our [in, out] kernels. Qwen2 is Llama with q/k/v biases (`qkv_bias`),
Mistral is Llama with a sliding window. Anything the models do not implement (another rope_type
such as yarn or dynamic, partial rotary, another activation, Qwen2's sliding-window layers,
GPT-2's scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn / unscaled attention) is one
ValueError line naming it, as is a missing, unexpected or misshapen tensor.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from pkm_jax import hf_files
from pkm_jax.architecture import ModelConfig
from pkm_jax.models.causal_attention import ROPE_TYPES
from pkm_jax.models.registry import build_lm

ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama",
                 "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
_ACTIVATIONS = {"gpt2": ("gelu_new", "gelu_pytorch_tanh"), "llama": ("silu",)}
_ROPE_KEYS = {"linear": ("factor",), "llama3": (
    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def is_causal(hf_cfg: dict[str, Any]) -> bool:
  """Whether config.json describes one of the causal LMs (by architectures or model_type)."""
  archs = hf_cfg.get("architectures") or [None]
  return archs[0] in ARCHITECTURES or hf_cfg.get("model_type") in ARCHITECTURES.values()


def architecture(hf_cfg: dict[str, Any]) -> str:
  """The checked architecture name (from model_type when config.json names none)."""
  model_type = hf_cfg.get("model_type")
  archs = hf_cfg.get("architectures") or [
      {v: k for k, v in ARCHITECTURES.items()}.get(model_type, str(model_type))]
  if len(archs) != 1 or archs[0] not in ARCHITECTURES:
    raise ValueError(f"config.json: unsupported architectures {archs} "
                     f"(supported causal LMs: {', '.join(ARCHITECTURES)})")
  if ARCHITECTURES[archs[0]] != model_type:
    raise ValueError(f"config.json: architecture {archs[0]} does not match model_type "
                     f"{model_type!r}")
  return archs[0]


def _number(hf_cfg: dict[str, Any], key: str, default: Any, *, integer: bool = False) -> Any:
  value = hf_cfg.get(key, default)
  if value is None:
    value = default
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not ok or (integer and (not isinstance(value, int) or value <= 0)):
    kind = "a positive integer" if integer else "a number"
    raise ValueError(f"config.json: '{key}' must be {kind}, got {value!r}")
  return value


def _rope(hf_cfg: dict[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...]]:
  """(rope_theta, rope_scaling pairs) from rope_parameters (transformers >= 5) or the older
  rope_theta + rope_scaling keys."""
  params = hf_cfg.get("rope_parameters")
  if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
    raise ValueError("config.json: per-layer-type rope_parameters are not supported")
  if not isinstance(params, dict):
    params = dict(hf_cfg.get("rope_scaling") or {})
  else:
    params = dict(params)
  theta = params.pop("rope_theta", hf_cfg.get("rope_theta", 10000.0))
  if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
    raise ValueError(f"config.json: rope_theta must be a positive number, got {theta!r}")
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"config.json: rope_type {rope_type!r} is not supported (supported: "
                     f"{', '.join(ROPE_TYPES)})")
  partial = params.get("partial_rotary_factor", hf_cfg.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise ValueError(f"config.json: partial_rotary_factor={partial} is not supported (only 1.0)")
  if rope_type == "default":
    return float(theta), ()
  scaling = [("rope_type", rope_type)]
  for key in _ROPE_KEYS[rope_type]:
    if not isinstance(params.get(key), (int, float)) or isinstance(params.get(key), bool):
      raise ValueError(f"config.json: rope_type {rope_type!r} needs a number '{key}', got "
                       f"{params.get(key)!r}")
    scaling.append((key, params[key]))
  return float(theta), tuple(scaling)


def model_config_from_hf(hf_cfg: dict[str, Any]) -> ModelConfig:
  """Our ModelConfig for a causal LM's config.json (HF's defaults for absent fields)."""
  arch = architecture(hf_cfg)
  model_type = ARCHITECTURES[arch]
  family = "gpt2" if model_type == "gpt2" else "llama"
  act_key = "activation_function" if family == "gpt2" else "hidden_act"
  act = hf_cfg.get(act_key, _ACTIVATIONS[family][0])
  if act not in _ACTIVATIONS[family]:
    raise ValueError(f"config.json: {act_key}={act!r} is not supported for {arch} "
                     f"(only {' / '.join(_ACTIVATIONS[family])})")
  tie = hf_cfg.get("tie_word_embeddings", family == "gpt2" or model_type == "qwen2")
  if family == "gpt2":
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                 "add_cross_attention"):
      if hf_cfg.get(flag):
        raise ValueError(f"config.json: {flag}=true is not supported for GPT2LMHeadModel")
    if not hf_cfg.get("scale_attn_weights", True):
      raise ValueError("config.json: scale_attn_weights=false is not supported for "
                       "GPT2LMHeadModel")
    d = _number(hf_cfg, "n_embd", 768, integer=True)
    heads = _number(hf_cfg, "n_head", 12, integer=True)
    if d % heads:
      raise ValueError(f"config.json: n_embd {d} is not divisible by n_head {heads}")
    return ModelConfig(
        family="gpt2", vocab_size=_number(hf_cfg, "vocab_size", 50257, integer=True),
        hidden_size=d, num_layers=_number(hf_cfg, "n_layer", 12, integer=True), num_heads=heads,
        intermediate_size=_number(hf_cfg, "n_inner", 4 * d, integer=True),
        max_position_embeddings=_number(hf_cfg, "n_positions", 1024, integer=True),
        hidden_dropout=_number(hf_cfg, "resid_pdrop", 0.1),
        attention_dropout=_number(hf_cfg, "attn_pdrop", 0.1),
        layer_norm_eps=_number(hf_cfg, "layer_norm_epsilon", 1e-5), tie_embeddings=bool(tie))
  sliding = 0
  if model_type == "mistral":
    sliding = hf_cfg.get("sliding_window") or 0
    if not isinstance(sliding, int) or isinstance(sliding, bool) or sliding < 0:
      raise ValueError(f"config.json: sliding_window must be a positive integer or null, got "
                       f"{sliding!r}")
  if model_type == "qwen2" and (hf_cfg.get("use_sliding_window") or "sliding_attention" in (
      hf_cfg.get("layer_types") or [])):
    raise ValueError("config.json: Qwen2 use_sliding_window=true (sliding-window layers) is "
                     "not supported")
  d = _number(hf_cfg, "hidden_size", 4096, integer=True)
  heads = _number(hf_cfg, "num_attention_heads", 32, integer=True)
  kv = _number(hf_cfg, "num_key_value_heads", heads, integer=True)
  head_dim = _number(hf_cfg, "head_dim", 0) or 0
  if heads % kv:
    raise ValueError(f"config.json: num_attention_heads {heads} is not a multiple of "
                     f"num_key_value_heads {kv}")
  if not head_dim and d % heads:
    raise ValueError(f"config.json: hidden_size {d} is not divisible by num_attention_heads "
                     f"{heads}")
  theta, scaling = _rope(hf_cfg)
  attention_bias = bool(hf_cfg.get("attention_bias", False)) and model_type == "llama"
  return ModelConfig(
      family="llama", vocab_size=_number(hf_cfg, "vocab_size", 32000, integer=True),
      hidden_size=d, num_layers=_number(hf_cfg, "num_hidden_layers", 32, integer=True),
      num_heads=heads, num_kv_heads=kv,
      head_dim=0 if head_dim == d // heads else int(head_dim),
      intermediate_size=_number(hf_cfg, "intermediate_size", 11008, integer=True),
      max_position_embeddings=_number(hf_cfg, "max_position_embeddings", 2048, integer=True),
      hidden_dropout=0.0, attention_dropout=_number(hf_cfg, "attention_dropout", 0.0),
      layer_norm_eps=_number(hf_cfg, "rms_norm_eps", 1e-6), tie_embeddings=bool(tie),
      attention_bias=attention_bias, qkv_bias=model_type == "qwen2",
      mlp_bias=bool(hf_cfg.get("mlp_bias", False)) and model_type == "llama",
      rope_theta=theta, rope_scaling=scaling, sliding_window=sliding)


class _Reader(hf_files.TensorReader):
  """The decoders' modules from HF tensors."""

  def linear(self, abstract: dict, hf: str) -> dict[str, np.ndarray]:
    """torch Linear [out, in] -> kernel [in, out] (+ bias when our module has one)."""
    out = {"kernel": self.take(f"{hf}.weight", abstract["kernel"].shape[::-1]).T}
    if "bias" in abstract:
      out["bias"] = self.take(f"{hf}.bias", abstract["bias"].shape)
    return out


def _gpt2_layer(r: _Reader, a: dict, hf: str, d: int) -> dict:
  qkv_w = r.take(f"{hf}.attn.c_attn.weight", (d, 3 * d))  # Conv1D: already [in, out]
  qkv_b = r.take(f"{hf}.attn.c_attn.bias", (3 * d,))
  attention = {name: {"kernel": qkv_w[:, j * d:(j + 1) * d], "bias": qkv_b[j * d:(j + 1) * d]}
               for j, name in enumerate(("q_proj", "k_proj", "v_proj"))}
  attention["o_proj"] = {"kernel": r.take(f"{hf}.attn.c_proj.weight", (d, d)),
                         "bias": r.take(f"{hf}.attn.c_proj.bias", (d,))}
  layer = {"attention": attention,
           "attention_norm": {"scale": r.take(f"{hf}.ln_1.weight", (d,)),
                              "bias": r.take(f"{hf}.ln_1.bias", (d,))},
           "mlp_norm": {"scale": r.take(f"{hf}.ln_2.weight", (d,)),
                        "bias": r.take(f"{hf}.ln_2.bias", (d,))}}
  if "mlp" in a:
    i = a["mlp"]["c_fc"]["kernel"].shape[1]
    layer["mlp"] = {"c_fc": {"kernel": r.take(f"{hf}.mlp.c_fc.weight", (d, i)),
                             "bias": r.take(f"{hf}.mlp.c_fc.bias", (i,))},
                    "c_proj": {"kernel": r.take(f"{hf}.mlp.c_proj.weight", (i, d)),
                               "bias": r.take(f"{hf}.mlp.c_proj.bias", (d,))}}
  return layer


def _llama_layer(r: _Reader, a: dict, hf: str, d: int) -> dict:
  layer = {"attention": {name: r.linear(a["attention"][name], f"{hf}.self_attn.{name}")
                         for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
           "attention_norm": {"scale": r.take(f"{hf}.input_layernorm.weight", (d,))},
           "mlp_norm": {"scale": r.take(f"{hf}.post_attention_layernorm.weight", (d,))}}
  if "mlp" in a:
    layer["mlp"] = {name: r.linear(a["mlp"][name], f"{hf}.mlp.{name}")
                    for name in ("gate_proj", "up_proj", "down_proj")}
  return layer


def _is_ignorable(name: str) -> bool:
  # Buffers older checkpoints carry: GPT-2's causal masks, Llama's RoPE inverse frequencies.
  return (name.endswith(".attn.bias") or name.endswith(".attn.masked_bias")
          or name.endswith("rotary_emb.inv_freq"))


def convert_tensors(hf_cfg: dict[str, Any], tensors: dict[str, np.ndarray]
                    ) -> tuple[ModelConfig, dict, dict[str, Any]]:
  """HF config.json + state dict -> (our ModelConfig, params pure dict, report)."""
  arch = architecture(hf_cfg)
  cfg = model_config_from_hf(hf_cfg)
  abstract = nnx.to_pure_dict(nnx.state(
      nnx.eval_shape(lambda: build_lm(cfg, rngs=nnx.Rngs(0))), nnx.Param))
  a_dec, r, d = abstract["decoder"], _Reader(tensors, arch), cfg.hidden_size
  gpt2 = cfg.family == "gpt2"
  base = "transformer" if gpt2 else "model"
  emb_name = f"{base}.wte.weight" if gpt2 else f"{base}.embed_tokens.weight"
  decoder: dict[str, Any] = {
      "embed_tokens": {"embedding": r.take(emb_name, (cfg.vocab_size, d))}, "layers": {}}
  if gpt2:
    decoder["position_embeddings"] = {"embedding": r.take(
        f"{base}.wpe.weight", (cfg.max_position_embeddings, d))}
    decoder["norm"] = {"scale": r.take(f"{base}.ln_f.weight", (d,)),
                       "bias": r.take(f"{base}.ln_f.bias", (d,))}
  else:
    decoder["norm"] = {"scale": r.take(f"{base}.norm.weight", (d,))}
  for i in range(cfg.num_layers):
    if gpt2:
      decoder["layers"][i] = _gpt2_layer(r, a_dec["layers"][i], f"{base}.h.{i}", d)
    else:
      decoder["layers"][i] = _llama_layer(r, a_dec["layers"][i], f"{base}.layers.{i}", d)
  params: dict[str, Any] = {"decoder": decoder}
  if cfg.tie_embeddings:
    if "lm_head.weight" in tensors:  # some checkpoints store the tied copy
      w = r.take("lm_head.weight", (cfg.vocab_size, d))
      if not np.array_equal(w, decoder["embed_tokens"]["embedding"]):
        raise ValueError("tensor 'lm_head.weight' differs from the token embeddings but "
                         "config.json says tie_word_embeddings=true")
  else:
    params["lm_head"] = r.linear(abstract["lm_head"], "lm_head")

  ignored = sorted(k for k in tensors if k not in r.used and _is_ignorable(k))
  unexpected = sorted(k for k in tensors if k not in r.used and not _is_ignorable(k))
  if unexpected:
    more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
    raise ValueError(f"unexpected tensor '{unexpected[0]}'{more}: not part of a {arch} with "
                     f"config.json's sizes")
  notes = []
  if gpt2 and hf_cfg.get("embd_pdrop", 0.1) != hf_cfg.get("resid_pdrop", 0.1):
    notes.append(f"embd_pdrop {hf_cfg.get('embd_pdrop')} differs from resid_pdrop "
                 f"{hf_cfg.get('resid_pdrop')}: the embeddings use resid_pdrop (training only)")
  report = dict(architecture=arch, model_type=hf_cfg.get("model_type"), family=cfg.family,
                tied_embeddings=cfg.tie_embeddings, ignored_tensors=ignored,
                num_tensors=len(r.used),
                num_params=int(sum(np.size(x) for x in jax.tree.leaves(params))),
                special_token_ids={k: hf_cfg.get(k) for k in (
                    "bos_token_id", "eos_token_id", "pad_token_id")},
                notes=notes)
  return cfg, params, report
