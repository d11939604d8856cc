"""LoRA (Hu et al. 2021) on a built model's transformer projections, and its merge for evaluation.

`add_lora(model, rank, alpha, rngs)` turns every nnx.Linear inside the backbone's layers --
attention q/k/v/o and the FFN / MLP projections of BERT and the decoders; not the memory's
query network or gate, not embeddings or heads -- into a `LoRALinear`: the same module (its
kernel and bias keep their paths, so +Init and checkpoints see the base model's names) plus
A [in, r] (nnx.LoRAParam, He-uniform) and B [r, out] (zeros), computing

    y = x W + b + (alpha / r) * (x A) B

so at step 0 the model is the base model. A and B carry logical axes (A: the kernel's input
axis, B: its output axis; the rank axis unsplit), so they shard like their kernel.
`merge_lora(model)` folds W <- W + (alpha / r) A B into each projection and turns it back into
a plain nnx.Linear: what evaluation, fill_mask, generate and the benchmarks load.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pkm_jax.models.tables import root


class LoRALinear(nnx.Linear):
  """nnx.Linear plus a rank-r update (alpha / r) * x A B; A, B are nnx.LoRAParam."""

  lora_a: nnx.LoRAParam  # [in, r]
  lora_b: nnx.LoRAParam  # [r, out]
  lora_scale: float

  def __call__(self, x: jax.Array) -> jax.Array:
    y = super().__call__(x)
    a, b = self.lora_a[...], self.lora_b[...]
    dx = jnp.dot(jnp.dot(x.astype(a.dtype), a, precision=self.precision), b,
                 precision=self.precision)
    return y + (self.lora_scale * dx).astype(y.dtype)


def _axes(var: nnx.Variable) -> tuple:
  meta = var.get_metadata()
  return tuple(meta.get("logical_axes") or (None, None))


def projections(model: nnx.Module) -> list[tuple[tuple, nnx.Linear]]:
  """(path, module) of every nnx.Linear in the backbone's layers, memory layers excluded."""
  top = root(model.cfg)
  out = []
  for path, module in nnx.iter_graph(model):
    names = [str(p) for p in path]
    if (isinstance(module, nnx.Linear) and names[:2] == [top, "layers"]
        and "memory" not in names):
      out.append((path, module))
  return out


def add_lora(model: nnx.Module, rank: int, alpha: float, rngs: nnx.Rngs) -> nnx.Module:
  """`model` with every backbone projection a LoRALinear (in place; also returned)."""
  for _, linear in projections(model):
    axes = _axes(linear.kernel)
    d_in, d_out = linear.in_features, linear.out_features
    dtype = linear.param_dtype
    linear.__class__ = LoRALinear  # same attributes, paths and numerics, plus the adapter
    linear.lora_a = nnx.LoRAParam(
        nnx.initializers.he_uniform()(rngs.params(), (d_in, rank), dtype),
        logical_axes=(axes[0], None))
    linear.lora_b = nnx.LoRAParam(jnp.zeros((rank, d_out), dtype),
                                  logical_axes=(None, axes[1]))
    linear.lora_scale = float(alpha) / rank
  return model


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds each LoRALinear's adapter into its kernel; plain nnx.Linear modules after (in place)."""
  for _, linear in projections(model):
    if not isinstance(linear, LoRALinear):
      continue
    a = linear.lora_a[...].astype(jnp.float32)
    b = linear.lora_b[...].astype(jnp.float32)
    kernel = linear.kernel[...]
    merged = kernel.astype(jnp.float32) + linear.lora_scale * jnp.dot(
        a, b, precision=jax.lax.Precision.HIGHEST)
    linear.kernel[...] = merged.astype(kernel.dtype)
    del linear.lora_a, linear.lora_b, linear.lora_scale
    linear.__class__ = nnx.Linear
  return model
