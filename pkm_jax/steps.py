"""The pure training step every run jits: a loss over a batch, its gradients (optionally
accumulated over micro-batches), the joint global-norm clip, the optax update, and -- with
`optim.values_optimizer='sparse_adam'` -- row-sparse updates of the memory value tables.

Sparse path: each memory layer adds a zero "probe" [B, T, V] to its weighted sum and reads its
table through stop_gradient, so the dense gradient never holds an [N, V] table; the probe's
gradient times the softmax weights gives the gradient of exactly the picked rows, which the
placement builds (inside each row block when the table is split) and the sparse optimizer
applies to those rows only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pkm_jax import cpu_random
from pkm_jax import metrics as metrics_lib
from pkm_jax.architecture import MemoryConfig
from pkm_jax.models.tables import state_at
from pkm_jax.memory_kinds import DOWN
from pkm_jax.optim import Optimizers
from pkm_jax.placement import SINGLE_DEVICE, MemoryPlacement
from pkm_jax.product_keys import MemoryAux

MLM_BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mlm_labels", "mlm_weights")

# (model, batch, rngs, value_probes) -> (loss summed over the batch, sums, {layer: MemoryAux}).
# `sums` holds "count" (what the loss is averaged over) and other totals that the step reports
# divided by the count (e.g. "loss", "mlm_accuracy").
LossFn = Callable[[nnx.Module, dict, nnx.Rngs, dict | None],
                  tuple[jax.Array, dict[str, jax.Array], dict[int, MemoryAux]]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State  # what the optimizer trains
  model_state: nnx.State  # BatchNorm running statistics of the memory queries
  opt_state: optax.OptState
  sparse_opt_state: dict  # str(layer) -> SparseAdamState; empty unless sparse value updates
  frozen: Any = dataclasses.field(default_factory=dict)  # params and statistics kept as they are
  # finetune.method='sparse_memory': per row table, the slot selection's state
  # (pkm_jax.continual.slot_selection: background df, writes so far); empty otherwise.
  selection: dict = dataclasses.field(default_factory=dict)


def mlm_loss(model: nnx.Module, batch: dict, rngs: nnx.Rngs | None, value_probes: dict | None,
             *, max_predictions: int | None = None):
  """The pretraining LossFn: masked-LM cross-entropy summed over the masked tokens.

  With max_predictions P (`data.max_masked`: the most tokens the masking rule masks in a row),
  the head's vocabulary projection runs at P positions per row, the masked ones first ([B, P, V]
  logits instead of [B, T, V], as BERT's pretraining does; the other slots weigh 0, so the sums
  are the same). The batch must then mask at most P tokens per row: every batch of the data
  pipeline does (`MLMMasker` checks it on the host as it masks). There is no device-side test of
  it: a `lax.cond` on the batch would cost a device-to-host round trip per step on GPUs.
  """
  h_BxTxD, aux = model.bert(batch["input_ids"], batch["attention_mask"],
                            batch["token_type_ids"], rngs=rngs, value_probes=value_probes)

  def head_loss(h, labels, weights):
    logits = model.mlm_head(h, model.bert.embeddings.word_embeddings)
    return metrics_lib.mlm_loss_and_metrics(logits, labels, weights)

  labels_BxT, weights_BxT = batch["mlm_labels"], batch["mlm_weights"]
  if max_predictions is None or max_predictions >= labels_BxT.shape[1]:
    loss, sums = head_loss(h_BxTxD, labels_BxT, weights_BxT)
  else:
    _, pos_BxP = jax.lax.top_k(weights_BxT, max_predictions)  # masked tokens weigh 1, others 0

    def take(x):  # [B, T, ...] -> [B, P, ...]
      return jnp.take_along_axis(x, pos_BxP.reshape(pos_BxP.shape + (1,) * (x.ndim - 2)), axis=1)

    loss, sums = head_loss(take(h_BxTxD), take(labels_BxT), take(weights_BxT))
  return loss * sums["count"], {"count": sums["count"], "loss": sums["nll_sum"],
                                "mlm_accuracy": sums["correct"]}, aux


def clm_loss(model: nnx.Module, batch: dict, rngs: nnx.Rngs | None, value_probes: dict | None):
  """The causal-LM LossFn: next-token cross-entropy summed over `target_weights` (the count is
  the tokens predicted); reports the loss and the next-token accuracy.

  The batch is pkm_jax.data.causal's: packed documents, attention within each (segment_ids),
  positions restarting per document piece. Logits [B, T, V] in float32 at every position.
  """
  logits_BxTxV, aux = model(batch["input_ids"], batch["attention_mask"],
                            positions_BxT=batch["positions"], segment_ids_BxT=batch["segment_ids"],
                            rngs=rngs, value_probes=value_probes)
  _, sums = metrics_lib.mlm_loss_and_metrics(logits_BxTxV, batch["targets"],
                                             batch["target_weights"])
  return sums["nll_sum"], {"count": sums["count"], "loss": sums["nll_sum"],
                           "accuracy": sums["correct"]}, aux


def loss_for(model_cfg, *, max_predictions: int | None = None) -> LossFn:
  """The pretraining loss of a model: clm_loss for a causal family, else mlm_loss."""
  if model_cfg.causal:
    return clm_loss
  return functools.partial(mlm_loss, max_predictions=max_predictions)


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, optimizers: Optimizers, *,
                    seed: int, placement: MemoryPlacement = SINGLE_DEVICE,
                    sparse_tables: dict | None = None, memory: MemoryConfig | None = None,
                    grad_accum_steps: int = 1,
                    model_state_filter: nnx.filterlib.Filter = nnx.BatchStat,
                    row_selection: Callable | None = None) -> Callable:
  """(TrainState, batch) -> (TrainState, metrics, {layer: MemoryAux}); pure, jit it once.

  `optimizers.tx` updates the params from their dense gradients, `optimizers.sparse` (with
  `sparse_tables`: `tables.row_tables(cfg)`, and `memory`: the memory config) the row tables from
  the gradients of their picked rows; with grad_clip > 0 both are first clipped by their joint
  global norm. `model_state_filter` selects the statistics the step updates (frozen ones stay).
  `row_selection` (finetune.method='sparse_memory': continual.slot_selection.make_row_selection)
  maps each table's picks and its TrainState.selection entry to (picks with the rows that may
  not be written turned into padding, the entry updated): those rows get no gradient and no
  update.
  """
  base_key = cpu_random.key(seed)  # jax's Threefry bits, drawn in one pass on CPUs
  tx, sparse_tx, schedule = optimizers.tx, optimizers.sparse, optimizers.schedule
  tables = sparse_tables if sparse_tx is not None else {}
  layers = sorted({layer for _, _, readers in tables.values() for layer in readers})
  peer = memory is not None and memory.kind == "peer"

  def micro_grads(params, model_state, frozen, batch, key):
    """One micro-batch: (grads, probe grads, sums, aux, new model_state)."""
    b, t = batch["input_ids"].shape
    probe = lambda *shape: jnp.zeros((b, t, *shape), jnp.float32)  # noqa: E731
    # PEER: a second probe on the expert scores u . x gives the down table's row gradients.
    probes = {layer: (probe(memory.v_dim), probe(memory.heads, memory.k)) if peer
              else probe(memory.v_dim) for layer in layers}

    def loss_sum(params, probes):
      model = nnx.merge(graphdef, params, frozen, model_state, copy=True)
      # Sum, not mean, over micro-batches: the caller divides by the total count.
      total, sums, aux = loss_fn(model, batch, nnx.Rngs(dropout=key), probes or None)
      return total, (sums, aux, nnx.state(model, model_state_filter))

    (_, (sums, aux, model_state)), (grads, probe_grads) = jax.value_and_grad(
        loss_sum, argnums=(0, 1), has_aux=True)(params, probes)
    return grads, probe_grads, sums, aux, model_state

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    # Dropout noise is a function of (seed, step) alone, so a resumed run repeats it exactly.
    key = jax.random.fold_in(base_key, state.step)
    if grad_accum_steps == 1:
      grads, probe_grads, sums, aux, model_state = micro_grads(
          state.params, state.model_state, state.frozen, batch, key)
    else:
      # Micro-batch i takes rows i, i + G, i + 2G, ...: every device keeps its own rows (a
      # contiguous split would put each micro-batch on a few devices and reshuffle the batch).
      # They run in sequence; BatchNorm statistics update after each, as in separate steps.
      n_micro = grad_accum_steps
      micro = jax.tree.map(lambda x: x.reshape(-1, n_micro, *x.shape[1:]).swapaxes(0, 1), batch)

      def body(carry, xs):
        grads_acc, model_state = carry
        mb, i = xs
        grads, probe_grads, sums, aux, model_state = micro_grads(
            state.params, model_state, state.frozen, mb, jax.random.fold_in(key, i))
        return (jax.tree.map(jnp.add, grads_acc, grads), model_state), (probe_grads, sums, aux)

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, model_state), (probe_grads, sums, aux) = jax.lax.scan(
          body, (zeros, state.model_state), (micro, jnp.arange(n_micro)))
      unmix = lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:])  # [G, B/G, ...] -> [B, ...]
      probe_grads, aux = jax.tree.map(unmix, probe_grads), jax.tree.map(unmix, aux)
      sums = jax.tree.map(lambda x: x.sum(0), sums)
    count = jnp.maximum(sums["count"], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)

    # Sparse path: the gradients of the picked rows of every table (built inside each row block
    # when the table is split). They join the global norm the dense gradients are clipped by.
    rows, rows_sq_norm = {}, jnp.zeros((), jnp.float32)
    selection = dict(state.selection)
    n_slots = memory.n_slots if memory is not None else 0
    for key, (_, name, readers) in tables.items():
      # Padding tokens' picks become padding rows: a row read only by padding is not touched.
      real = batch["attention_mask"][..., None, None] > 0
      # d table[r] = sum over the picks of r of weight * d out. Values: weight = what the row
      # was weighted by, d out = the value probe's gradient; PEER's down table: weight = d loss
      # / d (u . x) (the score probe's gradient), d out = the layer input x. A shared table's
      # picks from every layer are joined along the token axis: one coalesced gradient.
      parts = []
      for layer in readers:
        a = aux[layer]
        g = probe_grads[layer]
        if name == DOWN:
          parts.append((a.indices, g[1] / count, a.inputs))
        else:
          w = a.weights if a.row_weights is None else a.row_weights
          parts.append((a.indices, w, (g[0] if peer else g) / count))
      picks, weights, grad_out = (jnp.concatenate(x, axis=1) for x in zip(*parts))
      picks = jnp.where(jnp.concatenate([real] * len(readers), axis=1), picks, n_slots)
      if row_selection is not None:
        picks, selection[key] = row_selection(picks, state.selection[key])
      row_ids, row_grads, sq_norm = placement.row_gradients(
          picks, weights, grad_out.astype(jnp.float32), num_rows=n_slots)
      rows[key] = (row_ids, row_grads)
      rows_sq_norm = rows_sq_norm + sq_norm
    grad_norm = jnp.sqrt(jnp.square(optax.tree.norm(grads)) + rows_sq_norm)
    if optimizers.grad_clip > 0:
      # As optax.clip_by_global_norm, over dense and row-sparse gradients together.
      scale = jnp.where(grad_norm < optimizers.grad_clip, 1.0, optimizers.grad_clip / grad_norm)
      grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
    else:
      scale = None

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    sparse_opt_state = dict(state.sparse_opt_state)
    for key, (row_ids, row_grads) in rows.items():
      path = tables[key][0]
      table = state_at(params, path)
      # The clip's factor is applied inside the row update, as it reads each row gradient.
      new_table, sparse_opt_state[key] = placement.row_update(
          sparse_tx, row_ids, row_grads, state.sparse_opt_state[key], table.get_value(), scale)
      state_at(params, path[:-1])[path[-1]] = table.replace(new_table)  # in place

    loss, lr = sums["loss"] / count, schedule(state.step)
    metrics = {name: total / count for name, total in sums.items() if name != "count"}
    metrics.update(grad_norm=grad_norm, learning_rate=lr,
                   # False once anything that moves the params is NaN/inf: this step's update
                   # may already have spoilt them, although its loss (computed before) is finite.
                   finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(lr))
    new_state = TrainState(step=state.step + 1, params=params, model_state=model_state,
                           opt_state=opt_state, sparse_opt_state=sparse_opt_state,
                           frozen=state.frozen, selection=selection)
    return new_state, metrics, aux

  return train_step


def make_usage_accumulator(n_slots: int) -> Callable:
  """(totals, aux, mask) -> totals + this batch's per-slot counts/weights/top-1 counts."""
  def accumulate(totals, aux, mask_BxT):
    return {layer: tuple(t + s for t, s in zip(totals[layer],
                                                metrics_lib.slot_totals(a, mask_BxT, n_slots)))
            for layer, a in aux.items()}
  return accumulate
