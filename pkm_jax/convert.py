"""Hugging Face checkpoints -> pkm-jax parameters (torch only for .bin files): BERT / DistilBERT
here, the causal LMs (GPT-2, Llama, Qwen2, Mistral) in `pkm_jax.convert_causal`.

  python -m pkm_jax.convert --hf_dir DIR --out OUT [--overwrite]

DIR is a local Hugging Face folder: config.json plus model.safetensors (or a sharded
model.safetensors.index.json, or pytorch_model.bin when torch is installed) and a tokenizer
(tokenizer.json or vocab.txt). OUT receives the converted checkpoint described in
`pkm_jax.converted` (model_config.json, tokenizer files, params/, conversion.json); the folder is
read by `pkm_jax.hf_files`.

Supported layouts: GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM
(dispatched by config.json's architectures to convert_causal), BertForMaskedLM, BertForPreTraining (its NSP head is ignored), BertModel (keys
with or without 'bert.'), DistilBertForMaskedLM, DistilBertModel. A checkpoint without an MLM head
gets a freshly initialised one (reported). DistilBERT has no token types: its token-type table
becomes zeros [2, D], so any token_type_ids contribute nothing, as in DistilBERT. Anything the
converter does not understand (a missing or unexpected tensor, a shape config.json does not imply,
an unsupported architecture or activation) is a one-line ValueError naming it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from absl import flags
from flax import nnx

from pkm_jax import cli, convert_causal, converted
from pkm_jax import storage
from pkm_jax.architecture import ModelConfig
from pkm_jax.models.bert import BertForMaskedLM, MLMHead
from pkm_jax.data import tokenizer as tok_lib
from pkm_jax import hf_files
from pkm_jax.hf_files import load_hf_tensors, read_hf_config

ARCHITECTURES = {
    "BertForMaskedLM": "bert", "BertForPreTraining": "bert", "BertModel": "bert",
    "DistilBertForMaskedLM": "distilbert", "DistilBertModel": "distilbert",
}
_WITH_MLM_HEAD = ("BertForMaskedLM", "BertForPreTraining", "DistilBertForMaskedLM")

# Per-layer names, ours -> HF (relative to layers[i] / the HF layer prefix) and the kind of module.
_BERT_LAYER = (
    (("attention", "query"), "attention.self.query", "linear"),
    (("attention", "key"), "attention.self.key", "linear"),
    (("attention", "value"), "attention.self.value", "linear"),
    (("attention", "output"), "attention.output.dense", "linear"),
    (("attention_norm",), "attention.output.LayerNorm", "norm"),
    (("ffn", "intermediate"), "intermediate.dense", "linear"),
    (("ffn", "output"), "output.dense", "linear"),
    (("output_norm",), "output.LayerNorm", "norm"),
)
_DISTILBERT_LAYER = (
    (("attention", "query"), "attention.q_lin", "linear"),
    (("attention", "key"), "attention.k_lin", "linear"),
    (("attention", "value"), "attention.v_lin", "linear"),
    (("attention", "output"), "attention.out_lin", "linear"),
    (("attention_norm",), "sa_layer_norm", "norm"),
    (("ffn", "intermediate"), "ffn.lin1", "linear"),
    (("ffn", "output"), "ffn.lin2", "linear"),
    (("output_norm",), "output_layer_norm", "norm"),
)


@dataclasses.dataclass
class Converted:
  """A converted model: our config, params (the `nnx.to_pure_dict(nnx.state(model, nnx.Param))`
  layout of the family's model: BertForMaskedLM or a causal LM) and what the conversion did
  (JSON-able)."""

  cfg: ModelConfig
  params: dict
  report: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# config.json -> ModelConfig
# ---------------------------------------------------------------------------------------------


def architecture(hf_cfg: dict[str, Any]) -> str:
  """The checked architecture name ('BertModel' when config.json names none)."""
  if convert_causal.is_causal(hf_cfg):
    return convert_causal.architecture(hf_cfg)
  model_type = hf_cfg.get("model_type")
  if model_type not in ("bert", "distilbert"):
    causal = ", ".join(repr(t) for t in convert_causal.ARCHITECTURES.values())
    raise ValueError(f"config.json: unsupported model_type {model_type!r} "
                     f"(supported: 'bert', 'distilbert', {causal})")
  archs = hf_cfg.get("architectures") or [
      "BertModel" if model_type == "bert" else "DistilBertModel"]
  arch = archs[0]
  if arch not in ARCHITECTURES or len(archs) != 1:
    raise ValueError(f"config.json: unsupported architectures {archs} "
                     f"(supported: {', '.join(ARCHITECTURES)})")
  if ARCHITECTURES[arch] != model_type:
    raise ValueError(f"config.json: architecture {arch} does not match model_type "
                     f"{model_type!r}")
  return arch


def model_config_from_hf(hf_cfg: dict[str, Any], *, use_pooler: bool = False) -> ModelConfig:
  """Our ModelConfig for a config.json (HF's defaults for absent fields, as transformers does)."""
  def get(key, default):
    value = hf_cfg.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
      raise ValueError(f"config.json: '{key}' must be a number, got {value!r}")
    return value

  if hf_cfg.get("model_type") == "distilbert":
    act_key = "activation"
    sizes = dict(vocab_size=get("vocab_size", 30522), hidden_size=get("dim", 768),
                 num_layers=get("n_layers", 6), num_heads=get("n_heads", 12),
                 intermediate_size=get("hidden_dim", 3072),
                 max_position_embeddings=get("max_position_embeddings", 512),
                 type_vocab_size=2,  # zeros: DistilBERT has no token types
                 hidden_dropout=get("dropout", 0.1),
                 attention_dropout=get("attention_dropout", 0.1),
                 layer_norm_eps=1e-12)  # fixed in DistilBERT's code
  else:
    act_key = "hidden_act"
    sizes = dict(vocab_size=get("vocab_size", 30522), hidden_size=get("hidden_size", 768),
                 num_layers=get("num_hidden_layers", 12),
                 num_heads=get("num_attention_heads", 12),
                 intermediate_size=get("intermediate_size", 3072),
                 max_position_embeddings=get("max_position_embeddings", 512),
                 type_vocab_size=get("type_vocab_size", 2),
                 hidden_dropout=get("hidden_dropout_prob", 0.1),
                 attention_dropout=get("attention_probs_dropout_prob", 0.1),
                 layer_norm_eps=get("layer_norm_eps", 1e-12))
    position_type = hf_cfg.get("position_embedding_type", "absolute")
    if position_type != "absolute":
      raise ValueError(f"config.json: position_embedding_type={position_type!r} is not "
                       f"supported (only 'absolute')")
    for flag in ("is_decoder", "add_cross_attention"):
      if hf_cfg.get(flag):
        raise ValueError(f"config.json: {flag}=true is not supported (encoder-only BERT)")
  act = hf_cfg.get(act_key, "gelu")
  if act != "gelu":  # HF's 'gelu' is the exact erf GELU that pkm_jax.models.bert uses
    raise ValueError(f"config.json: {act_key}={act!r} is not supported (only 'gelu')")
  for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
              "max_position_embeddings", "type_vocab_size"):
    if not isinstance(sizes[key], int) or sizes[key] <= 0:
      raise ValueError(f"config.json: {key} must be a positive integer, got {sizes[key]!r}")
  if sizes["hidden_size"] % sizes["num_heads"]:
    raise ValueError(f"config.json: hidden size {sizes['hidden_size']} is not divisible by "
                     f"{sizes['num_heads']} attention heads")
  return ModelConfig(**sizes, use_pooler=use_pooler)


# ---------------------------------------------------------------------------------------------
# Tensors -> params
# ---------------------------------------------------------------------------------------------


def _is_ignorable(name: str) -> bool:
  # Buffers and the NSP head: present in many checkpoints, meaningless for an MLM encoder.
  return (name.endswith("embeddings.position_ids") or name.endswith("embeddings.token_type_ids")
          or name.startswith("cls.seq_relationship."))


def _prefix(tensors: dict[str, np.ndarray], base: str) -> str:
  found = [p for p in (f"{base}.", "") if f"{p}embeddings.word_embeddings.weight" in tensors]
  if not found:
    raise ValueError(f"missing tensor '{base}.embeddings.word_embeddings.weight' "
                     f"(nor without the '{base}.' prefix)")
  if len(found) > 1:
    raise ValueError(f"both '{base}.embeddings.word_embeddings.weight' and "
                     f"'embeddings.word_embeddings.weight' present: ambiguous layout")
  return found[0]


class _Reader(hf_files.TensorReader):
  """BERT's modules from HF tensors."""

  def module(self, abstract: dict, hf: str, kind: str) -> dict[str, np.ndarray]:
    """One Linear / LayerNorm / Embed: HF [out, in] weights transposed to our [in, out]."""
    if kind == "linear":
      kernel = abstract["kernel"].shape
      return {"kernel": self.take((f"{hf}.weight",), kernel[::-1]).T,
              "bias": self.take((f"{hf}.bias",), abstract["bias"].shape)}
    if kind == "norm":  # Google-converted checkpoints still say gamma/beta
      return {"scale": self.take((f"{hf}.weight", f"{hf}.gamma"), abstract["scale"].shape),
              "bias": self.take((f"{hf}.bias", f"{hf}.beta"), abstract["bias"].shape)}
    return {"embedding": self.take((f"{hf}.weight",), abstract["embedding"].shape)}


def convert_tensors(hf_cfg: dict[str, Any], tensors: dict[str, np.ndarray], *,
                    seed: int = 0) -> Converted:
  """HF config.json + state dict -> our params; a fresh MLM head (rngs seed) if it has none."""
  if convert_causal.is_causal(hf_cfg):
    return Converted(*convert_causal.convert_tensors(hf_cfg, tensors))
  arch = architecture(hf_cfg)
  distil = ARCHITECTURES[arch] == "distilbert"
  prefix = _prefix(tensors, "distilbert" if distil else "bert")
  has_pooler = not distil and any(k.startswith(f"{prefix}pooler.") for k in tensors)
  head_prefix = "vocab_" if distil else "cls.predictions."
  has_head = arch in _WITH_MLM_HEAD or any(k.startswith(head_prefix) for k in tensors)
  cfg = model_config_from_hf(hf_cfg, use_pooler=has_pooler)
  abstract = nnx.to_pure_dict(nnx.state(
      nnx.eval_shape(lambda: BertForMaskedLM(cfg, rngs=nnx.Rngs(0))), nnx.Param))
  a_bert, r = abstract["bert"], _Reader(tensors, arch)
  d = cfg.hidden_size

  emb = f"{prefix}embeddings"
  embeddings = {
      "word_embeddings": r.module(a_bert["embeddings"]["word_embeddings"],
                                  f"{emb}.word_embeddings", "embed"),
      "position_embeddings": r.module(a_bert["embeddings"]["position_embeddings"],
                                      f"{emb}.position_embeddings", "embed"),
      "layer_norm": r.module(a_bert["embeddings"]["layer_norm"], f"{emb}.LayerNorm", "norm"),
  }
  if distil:
    embeddings["token_type_embeddings"] = {"embedding": np.zeros((2, d), np.float32)}
  else:
    embeddings["token_type_embeddings"] = r.module(
        a_bert["embeddings"]["token_type_embeddings"], f"{emb}.token_type_embeddings", "embed")

  layer_names = _DISTILBERT_LAYER if distil else _BERT_LAYER
  layer_prefix = f"{prefix}transformer.layer" if distil else f"{prefix}encoder.layer"
  layers = {}
  for i in range(cfg.num_layers):
    layer: dict[str, Any] = {}
    for ours, hf, kind in layer_names:
      a = a_bert["layers"][i]
      for key in ours:
        a = a[key]
      node = layer
      for key in ours[:-1]:
        node = node.setdefault(key, {})
      node[ours[-1]] = r.module(a, f"{layer_prefix}.{i}.{hf}", kind)
    layers[i] = layer
  params: dict[str, Any] = {"bert": {"embeddings": embeddings, "layers": layers}}
  if has_pooler:
    params["bert"]["pooler"] = {"dense": r.module(a_bert["pooler"]["dense"],
                                                  f"{prefix}pooler.dense", "linear")}

  a_head = abstract["mlm_head"]
  if has_head:
    if distil:
      head = {"transform": r.module(a_head["transform"], "vocab_transform", "linear"),
              "transform_norm": r.module(a_head["transform_norm"], "vocab_layer_norm", "norm"),
              "bias": r.take(("vocab_projector.bias",), a_head["bias"].shape)}
      decoder_names, bias_names = ("vocab_projector.weight",), ()
    else:
      head = {"transform": r.module(a_head["transform"], "cls.predictions.transform.dense",
                                    "linear"),
              "transform_norm": r.module(a_head["transform_norm"],
                                         "cls.predictions.transform.LayerNorm", "norm"),
              "bias": r.take(("cls.predictions.bias", "cls.predictions.decoder.bias"),
                             a_head["bias"].shape)}
      decoder_names, bias_names = ("cls.predictions.decoder.weight",), (
          "cls.predictions.bias", "cls.predictions.decoder.bias")
    # Our decoder *is* the word-embedding table; an untied HF decoder cannot be represented.
    for name in decoder_names:
      if name in tensors:
        w = r.take((name,), (cfg.vocab_size, d))
        if not np.array_equal(w, embeddings["word_embeddings"]["embedding"]):
          raise ValueError(f"tensor '{name}' differs from the word embeddings (an untied "
                           f"decoder); pkm-jax ties the MLM decoder to the embeddings")
    present = [n for n in bias_names if n in tensors]
    if len(present) == 2:
      r.take((present[1],), a_head["bias"].shape)
      if not np.array_equal(tensors[present[0]], tensors[present[1]]):
        raise ValueError(f"tensors '{present[0]}' and '{present[1]}' differ; expected one "
                         f"shared MLM output bias")
    head_status = "converted"
  else:
    # Same initialisation as a model built from scratch (bert.py's MLMHead).
    fresh = nnx.to_pure_dict(nnx.state(MLMHead(cfg, rngs=nnx.Rngs(params=seed)), nnx.Param))
    head = jax.tree.map(np.asarray, fresh)
    head_status = "initialised"
  params["mlm_head"] = head

  ignored = sorted(k for k in tensors if k not in r.used and _is_ignorable(k))
  unexpected = sorted(k for k in tensors if k not in r.used and not _is_ignorable(k))
  if unexpected:
    more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
    raise ValueError(f"unexpected tensor '{unexpected[0]}'{more}: not part of a {arch} with "
                     f"config.json's sizes")
  notes = []
  if head_status == "initialised":
    notes.append(f"{arch} has no MLM head: the head is freshly initialised (seed {seed}); "
                 f"MLM logits are meaningless until it is trained")
  if distil:
    notes.append("DistilBERT has no token-type embeddings: a zero table [2, D] stands in")
  report = dict(architecture=arch, model_type=hf_cfg["model_type"], key_prefix=prefix,
                mlm_head=head_status, pooler=has_pooler, ignored_tensors=ignored,
                num_tensors=len(r.used),
                num_params=int(sum(np.size(x) for x in jax.tree.leaves(params))), notes=notes)
  return Converted(cfg=cfg, params=params, report=report)


def convert_hf(hf_dir: str, *, seed: int = 0) -> Converted:
  """Reads and converts an HF folder, local or gs:// (weights only; the tokenizer is read by
  pretrained.py)."""
  if not storage.isdir(hf_dir):
    raise FileNotFoundError(f"{hf_dir} is not a folder")
  hf_cfg = read_hf_config(hf_dir)
  architecture(hf_cfg)  # fail on an unsupported model before reading hundreds of MB
  converted = convert_tensors(hf_cfg, load_hf_tensors(hf_dir), seed=seed)
  converted.report["source"] = storage.absolute(hf_dir)
  return converted


def convert_to_dir(hf_dir: str, out_dir: str, *, overwrite: bool = False, seed: int = 0) -> str:
  """`python -m pkm_jax.convert`: HF folder -> converted checkpoint; prints a summary."""
  tok_lib.resolve_tokenizer_path(hf_dir)  # fails before any weights are read
  hf = convert_hf(hf_dir, seed=seed)
  info = {"source": hf.report["source"], "architecture": hf.report["architecture"],
          "report": hf.report}
  out = converted.write_checkpoint(out_dir, hf.cfg, hf.params, hf_dir, info=info,
                                   overwrite=overwrite)
  for note in hf.report["notes"]:
    print(f"note: {note}")
  r = hf.report
  head = (f"MLM head {r['mlm_head']}" if "mlm_head" in r else
          f"{'tied' if r['tied_embeddings'] else 'untied'} embeddings")
  print(f"Converted {r['architecture']} ({r['num_params']:,} parameters, "
        f"{r['num_tensors']} tensors, {head}) -> {out}")
  return out


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  if not f.hf_dir or not f.out:
    raise ValueError("both --hf_dir and --out are required")
  convert_to_dir(f.hf_dir, f.out, overwrite=f.overwrite, seed=f.seed)


if __name__ == "__main__":
  flags.DEFINE_string("hf_dir", None, "Hugging Face model folder (local or gs://).")
  flags.DEFINE_string("out", None, "Output folder for the converted checkpoint (local or gs://).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --out.")
  flags.DEFINE_integer("seed", 0, "Seed for an MLM head the checkpoint lacks.")
  cli.run(main)
