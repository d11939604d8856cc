"""Which memory slots a sparse_memory fine-tuning step may write: TF-IDF of slot accesses.

Lin et al. 2025 ("Continual Learning via Sparse Memory Finetuning", arXiv 2510.15103, §3):
a slot is worth updating when the new data reads it much more than pretraining data does. The
formula below is the paper's TF-IDF as this module implements it (the paper's equation was not
in the reference text available when this was written: check it against §3 before relying on
the exact smoothing). For each memory row table (a shared table is one table, its readers'
picks pooled) and slot i:

    tf(i)    = c(i) / sum_j c(j)         c(i): accesses of slot i (picks of real tokens, every
                                         head and reader layer) in this step's batch
                                         (refresh='batch', the paper's), or over one pass of the
                                         new data's training split (refresh='epoch')
    idf(i)   = log((|B| + 1) / (df(i) + 1))   B: the background batches (a sample of the
                                         pretraining text, `finetune.background_batches` of them),
                                         df(i): how many of them access slot i at least once
    score(i) = tf(i) * idf(i)

and the step updates only the top-t slots by score (`finetune.top_t`, per table), among those
accessed (c(i) > 0); ties go to the lower slot id (lax.top_k's order). Every other pick is
dropped from the row gradients (it becomes a padding row, id n_slots), so an unselected row,
and its Adam moments, are never written. Selection is per global slot id: on a mesh whose
tables are split by rows, the counts are summed over every device's tokens first.

The background's accesses are counted with the pretrained model in evaluation mode (BatchNorm
running statistics), before fine-tuning starts (`background_counts`).
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

# Keys of one table's selection state (TrainState.selection[table key]).
DF, N_BACKGROUND, TF, WRITTEN = "df", "n_background", "tf", "written"


def pick_counts(picks: jax.Array, n_slots: int) -> jax.Array:
  """Accesses per slot: picks [...] (ids >= n_slots are padding, not counted) -> [N] float32."""
  return jnp.zeros((n_slots,), jnp.float32).at[picks.reshape(-1)].add(1.0, mode="drop")


def tfidf_scores(tf_counts_N: jax.Array, df_N: jax.Array, n_background: jax.Array | int
                 ) -> jax.Array:
  """score(i) = c(i) / sum_j c(j) * log((|B| + 1) / (df(i) + 1)): counts [N], df [N] -> [N]."""
  tf = tf_counts_N / jnp.maximum(jnp.sum(tf_counts_N), 1.0)
  idf = jnp.log((jnp.asarray(n_background, jnp.float32) + 1.0) / (df_N + 1.0))
  return tf * idf


def top_t_mask(scores_N: jax.Array, tf_counts_N: jax.Array, t: int) -> jax.Array:
  """The top-t slots by score among those accessed (tf > 0): bool [N]."""
  _, idx = jax.lax.top_k(jnp.where(tf_counts_N > 0, scores_N, -jnp.inf), t)
  chosen = jnp.zeros(scores_N.shape, bool).at[idx].set(True)
  return chosen & (tf_counts_N > 0)


def selected_slots(tf_counts_N: jax.Array, df_N: jax.Array, n_background: jax.Array | int,
                   t: int) -> jax.Array:
  """The slots a step may write: top-t TF-IDF among the accessed ones, bool [N]."""
  return top_t_mask(tfidf_scores(tf_counts_N, df_N, n_background), tf_counts_N, t)


def init_selection(n_slots: int, refresh: str) -> dict[str, jax.Array]:
  """One table's selection state before the background is counted (df 0, no writes)."""
  z = jnp.zeros((n_slots,), jnp.float32)
  state = {DF: z, N_BACKGROUND: jnp.zeros((), jnp.float32), WRITTEN: z}
  if refresh == "epoch":
    state[TF] = z
  return state


def make_row_selection(top_t: int, refresh: str, n_slots: int) -> Callable:
  """(picks [B, T', H, k] with padding = n_slots, table's selection state) -> (picks with every
  unselected one turned into padding, new state: `written` += 1 on each slot written)."""

  def select(picks: jax.Array, state: dict) -> tuple[jax.Array, dict]:
    tf = pick_counts(picks, n_slots) if refresh == "batch" else state[TF]
    chosen = selected_slots(tf, state[DF], state[N_BACKGROUND], top_t)
    keep = chosen[jnp.minimum(picks, n_slots - 1)] & (picks < n_slots)
    picks = jnp.where(keep, picks, n_slots)
    wrote = jnp.zeros((n_slots,), jnp.float32).at[picks.reshape(-1)].set(1.0, mode="drop")
    return picks, {**state, WRITTEN: state[WRITTEN] + wrote}

  return select


def table_counts(usage: dict, readers: tuple[int, ...]) -> np.ndarray:
  """A table's per-slot access counts from per-layer usage {layer: (counts, weights, top1)}:
  summed over the layers that read it (a shared table: all of them)."""
  return sum(np.asarray(usage[layer][0], np.float64) for layer in readers)


def background_counts(eval_step: Callable, states: tuple, batches: Iterable[dict],
                      to_device: Callable[[dict], dict], tables: dict
                      ) -> dict[str, dict[str, np.ndarray | int]]:
  """Per table key: {'df': batches accessing each slot [N], 'counts': accesses [N],
  'n_batches'} over `batches`, by `eval_step` (evaluate.make_eval_step's: (params,
  model_state, frozen, batch) -> (sums, {layer: (counts, weights, top1)}))."""
  out = {key: {"df": 0.0, "counts": 0.0, "n_batches": 0} for key in tables}
  for batch in batches:
    _, usage = eval_step(*states, to_device(batch))
    usage = jax.device_get(usage)
    for key, (_, _, readers) in tables.items():
      c = table_counts(usage, readers)
      out[key]["df"] = out[key]["df"] + (c > 0)
      out[key]["counts"] = out[key]["counts"] + c
      out[key]["n_batches"] += 1
  for entry in out.values():
    if not entry["n_batches"]:
      raise ValueError("the background sample is empty: no batches to count slot accesses in "
                       "(finetune.background_files / the pretrained run's data)")
    entry["df"] = np.asarray(entry["df"], np.float64)
  return out


def written_report(selection: dict, background: dict | None = None, top_used: int = 0
                   ) -> dict:
  """Host summary of a run's writes, per table: the slots written and how many steps wrote
  each; with `background` (background_counts' dict) and top_used > 0, how many of the written
  slots are among the background's `top_used` most accessed ones."""
  out = {}
  for key, state in selection.items():
    written = np.asarray(state[WRITTEN])
    ids = np.flatnonzero(written > 0)
    entry = {"n_slots": int(written.size), "slots_written": int(ids.size),
             "written_slots": ids.tolist(), "write_steps": written[ids].astype(int).tolist()}
    if background is not None and top_used:
      counts = np.asarray(background[key]["counts"])
      top = np.argsort(-counts, kind="stable")[:top_used]
      entry["top_used"] = int(top_used)
      entry["overlap_with_top_used"] = int(np.intersect1d(ids, top).size)
    out[key] = entry
  return out
