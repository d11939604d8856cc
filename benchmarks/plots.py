"""TensorBoard event files -> numbers (read with TensorBoard's own reader), and the
reproduction's figures (matplotlib, Agg backend).
"""

from __future__ import annotations

import glob
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402

Series = list[tuple[int, float]]  # (step, value), in step order

# Keep every event (TensorBoard's default keeps a sample of 10,000 scalars and 4 images per tag).
_KEEP_ALL = {event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}


def read_events(logdir: str) -> tuple[dict[str, Series], dict[str, list[tuple[int, bytes]]]]:
  """(scalars, images) of the event files in `logdir`: tag -> [(step, value | PNG bytes)].

  A resumed run appends a second event file; as in TensorBoard, steps a killed run logged after
  the checkpoint it resumed from are dropped, and a step logged twice keeps its last value.
  """
  if not glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
    raise FileNotFoundError(f"no TensorBoard event files in {logdir}")
  events = event_accumulator.EventAccumulator(logdir, size_guidance=_KEEP_ALL)
  events.Reload()
  tags = events.Tags()
  scalars = {t: sorted({e.step: e.value for e in events.Scalars(t)}.items())
             for t in tags[event_accumulator.SCALARS]}
  images = {t: sorted({e.step: e.encoded_image_string for e in events.Images(t)}.items())
            for t in tags[event_accumulator.IMAGES]}
  return scalars, images


# ---------------------------------------------------------------------------------------------
# Figures. `runs`: one dict per variant with 'label', 'scalars' (read_events' first result) and
# 'offset' (the global step its step 0 is: +Init runs continue where their source stopped).
# ---------------------------------------------------------------------------------------------

_COLORS = {"a": "#000000", "b": "#7f7f7f", "c": "#1f77b4", "d": "#2ca02c", "e": "#ff7f0e",
           "f": "#d62728", "g": "#9467bd", "h": "#8c564b"}


def _style(run: dict) -> dict:
  return dict(color=_COLORS.get(run["key"]), linestyle="--" if run["key"] in "efgh" else "-")


def plot_loss_curves(runs: Sequence[dict], path: str) -> None:
  """Training MLM loss (left) and held-out MLM loss (right) against the global step."""
  fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))
  for run in runs:
    train = run["scalars"].get("train/loss", [])
    if train:
      steps, values = np.asarray(train).T
      ax_train.plot(steps + run["offset"], values, label=run["label"], lw=1.2, **_style(run))
    held = run["scalars"].get("eval/mlm_loss", [])
    if held:
      steps, values = np.asarray(held).T
      ax_eval.plot(steps + run["offset"], values, marker="o", ms=4, label=run["label"],
                   **_style(run))
  for ax, title in ((ax_train, "training MLM loss (per-step batches)"),
                    (ax_eval, "held-out MLM loss")):
    ax.set_xlabel("global step (+Init runs start at the end of (a))")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  ax_eval.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_memory_usage(runs: Sequence[dict], layers: Sequence[int], path: str) -> None:
  """Per memory layer (columns): top-1 MU, KL_u and KL_w over training (rows) per variant.

  From the train/memory/* scalars: each point covers the training batches since the previous
  one (train.memory_stats_every steps), so it shows how the memory is used as it is learnt.
  """
  rows = (("top1_usage", "top-1 MU (%)"), ("kl_uniform", "KL_u"), ("kl_weighted", "KL_w"))
  fig, axes = plt.subplots(len(rows), len(layers), figsize=(5.5 * len(layers), 8.5),
                           squeeze=False)
  for col, layer in enumerate(layers):
    for row, (stat, name) in enumerate(rows):
      ax = axes[row][col]
      for run in runs:
        series = run["scalars"].get(f"train/memory/layer{layer}/{stat}", [])
        if series:
          steps, values = np.asarray(series).T
          ax.plot(steps + run["offset"], values, marker=".", label=run["label"], **_style(run))
      ax.set_title(f"layer {layer + 1} (index {layer}): {name}", fontsize=10)
      ax.grid(alpha=0.3)
      if row == len(rows) - 1:
        ax.set_xlabel("global step")
  axes[0][0].legend(fontsize=8)
  fig.suptitle("memory usage during training (lower KL = more even use of the slots)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_usage_maps(maps: dict[str, dict[int, np.ndarray]], path: str) -> None:
  """One heat map per (variant row, memory layer column): `evaluate.usage_histogram` grids.

  `maps[label][layer]` is [sqrt(N), sqrt(N)] in [0, 1] (log-scaled selection counts over the
  held-out split; row = first sub-key index, column = second). Black = never selected.
  """
  labels = list(maps)
  layers = sorted({layer for m in maps.values() for layer in m})
  fig, axes = plt.subplots(len(labels), len(layers), squeeze=False, layout="constrained",
                           figsize=(3.3 * len(layers) + 1.2, 3.1 * len(labels)))
  image = None
  for r, label in enumerate(labels):
    for c, layer in enumerate(layers):
      ax = axes[r][c]
      ax.set_xticks([])
      ax.set_yticks([])
      if layer in maps[label]:
        image = ax.imshow(maps[label][layer], cmap="magma", vmin=0, vmax=1,
                          interpolation="nearest")
      if c == 0:
        ax.set_ylabel(label, fontsize=10)
      if r == 0:
        ax.set_title(f"layer {layer + 1} (index {layer})", fontsize=10)
  if image is not None:
    fig.colorbar(image, ax=axes, shrink=0.6, label="log(1 + count) / max")
  fig.suptitle("slot usage on the held-out split (sub-key 1 = row, sub-key 2 = column)")
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_learning_forgetting(methods: dict[str, dict], target: float, path: str) -> None:
  """The knowledge benchmark: learning (B accuracy, x) against forgetting (A-probe drop, y), one
  curve per method through its sweep (step 0 = the pretrained model), seed means with sd bars;
  the dotted line is the B accuracy at which the drops are compared."""
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  colors = {"full": "#d62728", "lora": "#ff7f0e", "memory": "#1f77b4",
            "sparse_memory": "#2ca02c"}
  for method, r in methods.items():
    sweep = r["sweep"]
    x = 100 * np.asarray(sweep["new_fact_accuracy"], np.float64)  # [seeds, points]
    y = 100 * np.asarray(sweep["old_fact_accuracy_drop"], np.float64)
    ax.errorbar(x.mean(0), y.mean(0), xerr=x.std(0), yerr=y.std(0), marker="o", ms=4,
                capsize=2, color=colors.get(method), label=method)
    for step, xi, yi in zip(sweep["steps"], x.mean(0), y.mean(0)):
      ax.annotate(str(step), (xi, yi), fontsize=6, xytext=(2, 2), textcoords="offset points")
  ax.axvline(100 * target, color="#7f7f7f", linestyle=":", linewidth=1)
  ax.axhline(0, color="#7f7f7f", linewidth=0.5)
  ax.set_xlabel("accuracy on B's facts (%)")
  ax.set_ylabel("drop in accuracy on A's facts (points)")
  ax.set_title("learning vs forgetting (labels: fine-tuning steps)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
