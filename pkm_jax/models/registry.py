"""The language model a ModelConfig describes: one class per `family` (BERT's masked LM, or a
causal LM), so that the run library, checkpoints and loaders build any family the same way."""

from __future__ import annotations

from flax import nnx

from pkm_jax.architecture import ModelConfig
from pkm_jax.models.bert import BertForMaskedLM
from pkm_jax.models.gpt2 import GPT2LMHeadModel
from pkm_jax.models.llama import LlamaForCausalLM
from pkm_jax.placement import SINGLE_DEVICE, MemoryPlacement

LM_CLASSES: dict[str, type[nnx.Module]] = {
    "bert": BertForMaskedLM, "gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM}


def lm_class(cfg: ModelConfig) -> type[nnx.Module]:
  if cfg.family not in LM_CLASSES:
    raise ValueError(f"model family {cfg.family!r} is not one of {sorted(LM_CLASSES)}")
  return LM_CLASSES[cfg.family]


def build_lm(cfg: ModelConfig, *, rngs: nnx.Rngs,
             placement: MemoryPlacement = SINGLE_DEVICE) -> nnx.Module:
  """The family's language model (BertForMaskedLM, or a causal LM) for `cfg`."""
  return lm_class(cfg)(cfg, rngs=rngs, placement=placement)
