"""Metrics to stdout and TensorBoard (tensorboardX: no TensorFlow needed). Process 0 writes.

A gs:// logdir is written by tensorboardX itself (google-cloud-storage): each flush uploads the
event file whole, so the bucket holds everything up to the last flush (every 10 s and at close).
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from tensorboardX import SummaryWriter

from pkm_jax import storage


class MetricWriter:
  def __init__(self, logdir: str, *, stdout: bool = True):
    self.enabled = jax.process_index() == 0
    self.stdout = stdout
    self._tb = None
    if self.enabled:
      storage.makedirs(logdir)
      self._tb = SummaryWriter(logdir, flush_secs=10)

  def scalars(self, step: int, scalars: dict[str, float], *, prefix: str = "") -> None:
    if not self.enabled:
      return
    for name, value in scalars.items():
      self._tb.add_scalar(f"{prefix}{name}", float(value), step)
    if self.stdout:
      line = " ".join(f"{prefix}{k}={float(v):.5g}" for k, v in sorted(scalars.items()))
      # tqdm owns stderr; a plain line on stdout keeps logs greppable.
      print(f"[step {step}] {line}", file=sys.stdout, flush=True)

  def image(self, step: int, name: str, image_HxWxC: np.ndarray) -> None:
    if self.enabled:
      self._tb.add_image(name, np.asarray(image_HxWxC), step, dataformats="HWC")

  def histogram(self, step: int, name: str, values: np.ndarray) -> None:
    if self.enabled:
      self._tb.add_histogram(name, np.asarray(values), step)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
