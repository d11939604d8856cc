"""Optimizers: AdamW with warmup + decay for the network, a separate Adam for memory values.

Lample et al. train the value table with its own Adam (lr 1e-3, constant, no weight decay): its
rows are touched sparsely, so the network's schedule and decay would starve or erase them.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

VALUES = "values"
DEFAULT = "default"


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to optim.lr, then linear / cosine decay to lr * end_lr_factor, or constant."""
  warmup = max(int(optim.warmup_steps), 0)
  end = optim.lr * optim.end_lr_factor
  decay_steps = max(total_steps - warmup, 1)
  if optim.decay == "linear":
    after = optax.linear_schedule(optim.lr, end, decay_steps)
  elif optim.decay == "cosine":
    after = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.end_lr_factor)
  elif optim.decay == "constant":
    after = optax.constant_schedule(optim.lr)
  else:
    raise ValueError(f"optim.decay={optim.decay!r} is not 'linear', 'cosine' or 'constant'")
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), after], [warmup])


def param_labels(params) -> object:
  """'values' for memory value tables, 'default' for everything else (same tree as params)."""
  def label(path, _):
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", "")))) for k in path]
    if names and names[-1] == "value":  # nnx.Variable leaves add a trailing '.value'
      names = names[:-1]
    return VALUES if names[-1:] == ["values"] and "memory" in names else DEFAULT
  return jax.tree_util.tree_map_with_path(label, params)


def _decay_mask(params):
  # BERT's AdamW exempts biases and LayerNorm parameters (the 1-D leaves) from weight decay.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The params' optimizer (network AdamW + values Adam) and the network's schedule."""
  schedule = learning_rate_schedule(optim, total_steps)
  network = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay, mask=_decay_mask)
  if optim.values_optimizer == "adam":
    values = optax.adamw(optim.values_lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                         weight_decay=optim.values_weight_decay)
  else:
    # 'sparse_adam' updates the table outside optax (pkm_jax.sparse_adam); here it is frozen.
    values = optax.set_to_zero()
  tx = optax.multi_transform({DEFAULT: network, VALUES: values}, param_labels)
  if optim.grad_clip and optim.grad_clip > 0:
    # Gradient clipping happens in the train step, whose global norm also covers the row
    # gradients of sparse value updates (they never pass through this optimizer). The identity
    # stands where clip_by_global_norm stood, so the optimizer state keeps the layout that
    # checkpoints of earlier versions hold.
    tx = optax.chain(optax.identity(), tx)
  return tx, schedule
