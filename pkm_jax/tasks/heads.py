"""Fine-tuning heads on `pkm_jax.models.bert.BertModel`: sequence classification / regression and SQuAD
span extraction. Memory layers live inside the encoder, so PKM / ResM models fine-tune unchanged.

Param tree: `bert.*` exactly as in `BertForMaskedLM` (so pretrained weights copy by path, the
pooler `bert.pooler.dense` included when the checkpoint has one) plus `classifier` or
`qa_outputs` (HF's names). Training mode iff `rngs` is given, as everywhere in pkm_jax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pkm_jax.architecture import ModelConfig
from pkm_jax.models.bert import BertModel
from pkm_jax.placement import SINGLE_DEVICE, MemoryPlacement
from pkm_jax.product_keys import MemoryAux

_INIT = nnx.initializers.truncated_normal(stddev=0.02)  # BERT's initializer_range


def _output_layer(cfg: ModelConfig, n_out: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(
      cfg.hidden_size, n_out, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
      kernel_init=nnx.with_metadata(_INIT, logical_axes=("embed", None)),
      bias_init=nnx.with_metadata(nnx.initializers.zeros, logical_axes=(None,)), rngs=rngs)


class BertForSequenceClassification(nnx.Module):
  """tanh-pooled [CLS] -> dropout -> linear to `num_labels` (1 = regression, e.g. STS-B)."""

  def __init__(self, cfg: ModelConfig, num_labels: int, *, classifier_dropout: float = 0.1,
               rngs: nnx.Rngs, placement: MemoryPlacement = SINGLE_DEVICE):
    if not cfg.use_pooler:
      raise ValueError("BertForSequenceClassification needs ModelConfig.use_pooler=True")
    if num_labels < 1:
      raise ValueError(f"num_labels={num_labels} must be >= 1")
    self.cfg = cfg
    self.num_labels = num_labels
    self.bert = BertModel(cfg, rngs=rngs, placement=placement)
    self.dropout = nnx.Dropout(classifier_dropout)
    self.classifier = _output_layer(cfg, num_labels, rngs)

  def __call__(self, input_ids_BxT, attention_mask_BxT, token_type_ids_BxT=None, *, rngs=None,
               value_probes=None) -> tuple[jax.Array, dict[int, MemoryAux]]:
    """ids/mask/types [B, T] -> logits [B, num_labels] (float32), {layer: MemoryAux}."""
    h_BxTxD, aux = self.bert(input_ids_BxT, attention_mask_BxT, token_type_ids_BxT, rngs=rngs,
                             value_probes=value_probes)
    pooled_BxD = self.dropout(self.bert.pooler(h_BxTxD), deterministic=rngs is None, rngs=rngs)
    return self.classifier(pooled_BxD).astype(jnp.float32), aux


class BertForQuestionAnswering(nnx.Module):
  """Every token's hidden state -> linear to 2: start and end logits of the answer span."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs,
               placement: MemoryPlacement = SINGLE_DEVICE):
    self.cfg = cfg
    self.bert = BertModel(cfg, rngs=rngs, placement=placement)
    self.qa_outputs = _output_layer(cfg, 2, rngs)

  def __call__(self, input_ids_BxT, attention_mask_BxT, token_type_ids_BxT=None, *, rngs=None,
               value_probes=None) -> tuple[tuple[jax.Array, jax.Array], dict[int, MemoryAux]]:
    """ids/mask/types [B, T] -> (start [B, T], end [B, T]) float32 logits, {layer: MemoryAux}."""
    h_BxTxD, aux = self.bert(input_ids_BxT, attention_mask_BxT, token_type_ids_BxT, rngs=rngs,
                             value_probes=value_probes)
    logits_BxTx2 = self.qa_outputs(h_BxTxD).astype(jnp.float32)
    return (logits_BxTx2[..., 0], logits_BxTx2[..., 1]), aux


# ------------------------------------------------------------------------------------- losses
# Per example [B]: the train step sums them and divides by the examples of the whole batch.
def classification_loss(logits_BxL: jax.Array, labels_B: jax.Array) -> jax.Array:
  """Softmax cross-entropy per example; labels [B] int class ids."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxL, labels_B)


def regression_loss(logits_Bx1: jax.Array, labels_B: jax.Array) -> jax.Array:
  """Squared error of the single output per example (STS-B)."""
  return jnp.square(logits_Bx1[:, 0] - labels_B.astype(jnp.float32))


def span_loss(start_BxT: jax.Array, end_BxT: jax.Array, start_positions_B: jax.Array,
              end_positions_B: jax.Array) -> jax.Array:
  """BERT's SQuAD loss per example: the mean of the start and the end cross-entropies."""
  ce = optax.softmax_cross_entropy_with_integer_labels
  return 0.5 * (ce(start_BxT, start_positions_B) + ce(end_BxT, end_positions_B))
