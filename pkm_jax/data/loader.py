"""MLM batches through a grain pipeline, for every data source (in memory or prepared).

Packed rows come from a `RowSource` (`ArrayRows` in memory, `prepared.PreparedRows` from
ArrayRecord shards). The training stream is "epoch 0's permutation of the rows, then epoch
1's, ...", and global batch n is its positions n*B .. n*B+B-1. Each element of the grain
pipeline is one host-local batch, built by four map stages:

  batch index n -> this host's positions -> rows (global shuffle) -> ids (read) -> MLM batch

- positions: host h of H takes positions n*B + h*B/H .. n*B + (h+1)*B/H - 1, so the hosts' rows
  concatenated are exactly the global batch, and a host reads only its own rows;
- shuffle: epoch e = p // N is a permutation of the N rows drawn from (seed, e) and evaluated
  only at the positions asked for (keyed_random.permute): no O(N) state at start or ever;
- mask: row p is masked from (seed, p) alone (MLMMasker), p = step * B + row.
Each batch is therefore a pure function of (seed, step): the same for any number of hosts,
worker processes or threads, and resuming needs nothing but the step. grain computes elements
ahead in `prefetch` threads, or in `workers` processes (each with its own prefetch threads),
and returns them in order.

Evaluation batches are rows 0 .. N-1 in order, padded at the end with all-padding rows
(attention_mask 0, mlm_weights 0) to whole global batches, masked from a fixed seed that does
not depend on the run's: every evaluation of every run sees identical batches.
"""

from __future__ import annotations

import atexit
import dataclasses
import zlib
from typing import Any, Iterator, Protocol

import grain
import numpy as np
from absl import flags

from pkm_jax.data import keyed_random
from pkm_jax.data.mlm import MLMMasker

Batch = dict[str, np.ndarray]
EVAL_SEED = 20200529  # eval masks: fixed across runs and seeds
_ENDLESS = 1 << 48  # batch indices a training pipeline covers (grain wants a length)


class RowSource(Protocol):
  """Packed rows: `len()`, `read(rows [n] int) -> [n, max_len] int32`, a `fingerprint` str."""

  max_len: int
  fingerprint: str

  def __len__(self) -> int: ...

  def read(self, rows_N: np.ndarray) -> np.ndarray: ...


class ArrayRows:
  """A RowSource over an in-memory [N, max_len] array (the generated / files / tfds sources)."""

  def __init__(self, rows_NxT: np.ndarray):
    self.rows_NxT = np.asarray(rows_NxT, np.int32)
    self.max_len = self.rows_NxT.shape[1]
    # Identifies the packed data, so a checkpoint's state from other data is refused.
    self.fingerprint = f"{zlib.crc32(np.ascontiguousarray(self.rows_NxT).tobytes()):08x}"

  def __len__(self) -> int:
    return len(self.rows_NxT)

  def read(self, rows_N: np.ndarray) -> np.ndarray:
    return self.rows_NxT[np.asarray(rows_N, np.int64)]


def check_shards(batch_size: int, shard_index: int, shard_count: int) -> None:
  if batch_size < 1:
    raise ValueError(f"data.batch_size={batch_size} must be positive")
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} is not in [0, shard_count={shard_count})")
  if batch_size % shard_count:
    raise ValueError(f"data.batch_size={batch_size} (global) is not divisible by the "
                     f"{shard_count} hosts")


# --- The pipeline's stages: picklable callables (grain worker processes receive copies) -----


@dataclasses.dataclass(frozen=True)
class _HostPositions:
  """Batch index n -> {'positions': [B/H]} of this host's rows in the stream."""

  batch_size: int
  shard_index: int
  shard_count: int

  def __call__(self, n: int) -> dict[str, np.ndarray]:
    per_host = self.batch_size // self.shard_count
    first = int(n) * self.batch_size + self.shard_index * per_host
    return {"positions": first + np.arange(per_host, dtype=np.int64)}


@dataclasses.dataclass(frozen=True)
class _Shuffle:
  """Adds 'rows': position p -> row permute(p % N; seed, epoch p // N)."""

  num_rows: int
  seed: int

  def __call__(self, element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    positions = element["positions"]
    epoch_P, index_P = np.divmod(positions, self.num_rows)
    rows = np.empty_like(positions)
    for epoch in np.unique(epoch_P).tolist():  # a batch spans at most a few epochs
      here = epoch_P == epoch
      rows[here] = keyed_random.permute(index_P[here], self.num_rows, self.seed, epoch)
    return {**element, "rows": rows}


@dataclasses.dataclass(frozen=True)
class _InOrder:
  """Adds 'rows' for evaluation: position p is row p; past the end, -1 (a padding row)."""

  num_rows: int

  def __call__(self, element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    positions = element["positions"]
    return {**element, "rows": np.where(positions < self.num_rows, positions, -1)}


@dataclasses.dataclass(frozen=True)
class _Read:
  """Adds 'ids' [b, T]: the rows' tokens (row -1: all padding)."""

  source: Any  # RowSource
  pad_id: int

  def __call__(self, element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rows = element["rows"]
    ids_BxT = np.full((len(rows), self.source.max_len), self.pad_id, np.int32)
    real = rows >= 0
    if real.any():
      ids_BxT[real] = self.source.read(rows[real])
    return {**element, "ids": ids_BxT}


@dataclasses.dataclass(frozen=True)
class _Mask:
  """{'positions', 'ids'} -> the MLM batch, row p masked from (seed, p)."""

  masker: MLMMasker
  seed: int

  def __call__(self, element: dict[str, np.ndarray]) -> Batch:
    return self.masker(element["ids"], element["positions"], self.seed)


def _iterate(stages: list, start: int, stop: int, workers: int, prefetch: int
             ) -> Iterator[Batch]:
  """Elements start .. stop-1 of grain.MapDataset.range through `stages`, in order."""
  ds = grain.MapDataset.range(start, stop)
  for stage in stages:
    ds = ds.map(stage)
  if not workers and not prefetch:  # synchronous: computed when asked for
    return (ds[i] for i in range(len(ds)))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, prefetch),
                                            prefetch_buffer_size=max(1, prefetch)))
  if workers:
    if not flags.FLAGS.is_parsed():  # grain's worker start reads its absl flags; a program that
      flags.FLAGS.mark_as_parsed()  # parsed none (a test, a notebook) gets their defaults
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=max(1, prefetch)))
  return iter(it)


class MLMTrainIterator:
  """Endless training batches (this host's rows of each global batch); checkpointable.

  `get_state()` / `set_state()` save and restore the position (a JSON-able dict): a restored
  iterator yields exactly the batches the uninterrupted one would have.
  """

  def __init__(self, source: RowSource, masker: MLMMasker, *, batch_size: int, seed: int,
               shard_index: int = 0, shard_count: int = 1, workers: int = 0,
               prefetch: int = 0):
    if len(source) == 0:
      raise ValueError("the training split holds no text after tokenisation")
    check_shards(batch_size, shard_index, shard_count)
    if not 0 <= seed < 2**32:
      raise ValueError(f"seed={seed} must be in [0, 2**32) (it seeds the data order and masks)")
    self.source, self.masker = source, masker
    self.batch_size, self.seed = int(batch_size), int(seed)
    self.shard_index, self.shard_count = shard_index, shard_count
    self.workers, self.prefetch = int(workers), int(prefetch)
    self.step = 0
    self._it: Iterator[Batch] | None = None
    self._close_at_exit = False

  def _stages(self, shard_index: int, shard_count: int) -> list:
    return [_HostPositions(self.batch_size, shard_index, shard_count),
            _Shuffle(len(self.source), self.seed), _Read(self.source, self.masker.pad_id),
            _Mask(self.masker, self.seed)]

  def global_batch(self, step: int) -> Batch:
    """The whole global batch at `step` (all hosts' rows); a pure function of (seed, step)."""
    element: Any = step
    for stage in self._stages(0, 1):
      element = stage(element)
    return element

  def __iter__(self) -> "MLMTrainIterator":
    return self

  def __next__(self) -> Batch:
    if self._it is None:  # built lazily, so set_state right after construction costs nothing
      self._it = _iterate(self._stages(self.shard_index, self.shard_count), self.step,
                          self.step + _ENDLESS, self.workers, self.prefetch)
      if self.workers and not self._close_at_exit:
        # Batches made ahead by worker processes sit in shared memory until the iterator is
        # closed; the training loop never closes it, so the interpreter's exit does.
        atexit.register(self.close)
        self._close_at_exit = True
    batch = next(self._it)
    if self.workers:  # out of grain's shared memory, which is then freed at once
      batch = {k: np.array(v) for k, v in batch.items()}
    self.step += 1
    return batch

  def close(self) -> None:
    """Stops prefetching (threads, worker processes); the next batch starts a new pipeline."""
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
    self._it = None

  @property
  def steps_per_epoch(self) -> float:
    return len(self.source) / self.batch_size

  @property
  def sequences_NxT(self) -> np.ndarray:
    """All packed rows (in-memory sources only)."""
    return self.source.rows_NxT

  def get_state(self) -> dict:
    return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size,
            "num_sequences": len(self.source), "fingerprint": self.source.fingerprint}

  def set_state(self, state: dict) -> None:
    mine = self.get_state()
    for key in ("seed", "batch_size", "num_sequences", "fingerprint"):
      # Checkpoints of earlier versions hold an int crc32 where this one has its hex string.
      saved = f"{state[key]:08x}" if key == "fingerprint" and isinstance(
          state.get(key), int) else state.get(key)
      if key in state and saved != mine[key]:
        raise ValueError(f"saved data state has {key}={state[key]} but this run's data has "
                         f"{mine[key]}: the corpus, tokenizer, seed or batch size "
                         "changed since the checkpoint")
    if "step" not in state:
      raise ValueError(f"saved data state has no 'step': {state}")
    self.close()
    self.step = int(state["step"])


class MLMEvalData:
  """Evaluation batches with fixed masks; call it for an iterator (finite, reusable).

  `num_sequences`: packed rows in the whole split; `num_batches`: global batches covering it.
  """

  def __init__(self, source: RowSource, masker: MLMMasker, *, batch_size: int,
               shard_index: int = 0, shard_count: int = 1, prefetch: int = 0):
    check_shards(batch_size, shard_index, shard_count)
    self.source, self.masker = source, masker
    self.batch_size, self.shard_index, self.shard_count = batch_size, shard_index, shard_count
    self.prefetch = int(prefetch)

  @property
  def num_sequences(self) -> int:
    return len(self.source)

  @property
  def num_batches(self) -> int:
    """Batches in the whole split (the last one padded)."""
    return -(-len(self.source) // self.batch_size)

  @property
  def sequences_NxT(self) -> np.ndarray:
    """All packed rows (in-memory sources only)."""
    return self.source.rows_NxT

  def _stages(self, shard_index: int, shard_count: int) -> list:
    return [_HostPositions(self.batch_size, shard_index, shard_count), _InOrder(len(self.source)),
            _Read(self.source, self.masker.pad_id), _Mask(self.masker, EVAL_SEED)]

  def global_batch(self, i: int) -> Batch:
    element: Any = i
    for stage in self._stages(0, 1):
      element = stage(element)
    return element

  def __call__(self, num_batches: int | None = None) -> Iterator[Batch]:
    """The first `num_batches` batches (None or more than there are: the whole split)."""
    total = self.num_batches if num_batches is None else min(int(num_batches), self.num_batches)
    return _iterate(self._stages(self.shard_index, self.shard_count), 0, total, 0,
                    self.prefetch)
