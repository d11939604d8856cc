"""The optimizers of every run: AdamW with warmup + decay for the network, a separate Adam (dense,
or row-sparse with `sparse_adam`) for the memory value tables.

Lample et al. train the value table with its own Adam (lr 1e-3, constant, no weight decay): its
rows are touched sparsely, so the network's schedule and decay would starve or erase them.
Gradient clipping is not here: the train step clips every gradient -- dense and row-sparse --
by their joint global norm (`steps.make_train_step`), which no optax transform can see.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import optax

from pkm_jax import sparse_adam
from pkm_jax.models.tables import is_value_table

VALUES = "values"
DEFAULT = "default"


def warmup_steps(optim: ml_collections.ConfigDict, total_steps: int) -> int:
  """optim.warmup_fraction of the run when > 0, else optim.warmup_steps."""
  if optim.warmup_fraction > 0:
    return round(optim.warmup_fraction * total_steps)
  return max(int(optim.warmup_steps), 0)


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int, *,
                           peak: float | None = None) -> optax.Schedule:
  """Linear warmup to `peak` (default optim.lr), then linear / cosine decay to
  peak * end_lr_factor, or constant."""
  peak = optim.lr if peak is None else peak
  warmup = warmup_steps(optim, total_steps)
  end = peak * optim.end_lr_factor
  decay_steps = max(total_steps - warmup, 1)
  if optim.decay == "linear":
    after = optax.linear_schedule(peak, end, decay_steps)
  elif optim.decay == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim.end_lr_factor)
  elif optim.decay == "constant":
    after = optax.constant_schedule(peak)
  else:
    raise ValueError(f"optim.decay={optim.decay!r} is not 'linear', 'cosine' or 'constant'")
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def param_labels(params) -> object:
  """'values' for memory value tables, 'default' for everything else (same tree as params)."""
  def label(path, _):
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", "")))) for k in path]
    if names and names[-1] == "value":  # nnx.Variable leaves add a trailing '.value'
      names = names[:-1]
    return VALUES if is_value_table(names) else DEFAULT
  return jax.tree_util.tree_map_with_path(label, params)


def _decay_mask(params):
  # BERT's AdamW exempts biases and LayerNorm parameters (the 1-D leaves) from weight decay.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


@dataclasses.dataclass(frozen=True)
class Optimizers:
  """What a train step applies: `tx` to the params' dense gradients, `sparse` (None unless
  optim.values_optimizer='sparse_adam') to the picked rows of each value table."""

  tx: optax.GradientTransformation
  schedule: optax.Schedule  # the network's learning rate, reported by the step
  sparse: sparse_adam.SparseGradientTransformation | None
  grad_clip: float  # joint global-norm clip applied by the step (0: off)


def make_optimizers(optim: ml_collections.ConfigDict, total_steps: int) -> Optimizers:
  """The `optim` group -> network AdamW + value-table Adam (dense or sparse) + the clip."""
  schedule = learning_rate_schedule(optim, total_steps)
  network = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay, mask=_decay_mask)
  values_lr = optim.values_lr or optim.lr
  values_schedule = (learning_rate_schedule(optim, total_steps, peak=values_lr)
                     if optim.values_schedule == "network" else values_lr)
  sparse = None
  if optim.values_optimizer == "adam":
    values = optax.adamw(values_schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                         weight_decay=optim.values_weight_decay)
  else:
    # 'sparse_adam' updates the tables outside optax (pkm_jax.sparse_adam); here they are frozen.
    values = optax.set_to_zero()
    sparse = sparse_adam.sparse_adam(values_schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                                     weight_decay=optim.values_weight_decay)
  tx = optax.multi_transform({DEFAULT: network, VALUES: values}, param_labels)
  grad_clip = float(optim.grad_clip or 0.0)
  if grad_clip > 0:
    # The identity stands where optax.clip_by_global_norm stood (the step clips now), so the
    # optimizer state keeps the layout that checkpoints of earlier versions hold.
    tx = optax.chain(optax.identity(), tx)
  return Optimizers(tx=tx, schedule=schedule, sparse=sparse, grad_clip=grad_clip)
