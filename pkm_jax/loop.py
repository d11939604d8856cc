"""The training loop of every run: steps, then periodic actions -- log, save, evaluate, and any
the caller adds -- and a stop at the first step whose update was not finite.

Order after a step: log; the caller's periodic actions; then, if a save or an evaluation is due,
the finite check, the save, and only then the evaluation (a failing evaluation never costs the
checkpoint of its step). The last step always logs, saves and evaluates.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from tqdm import tqdm

from pkm_jax.program import TrainProgram
from pkm_jax.steps import TrainState
from pkm_jax.writer import MetricWriter


@dataclasses.dataclass(frozen=True)
class Periodic:
  """`action(step, state)` after every `every`-th step (0: never) and after the last one."""

  every: int
  action: Callable[[int, TrainState], Any]

  def due(self, step: int, total: int) -> bool:
    return self.every > 0 and (step % self.every == 0 or step == total)


def train_loop(program: TrainProgram, state: TrainState, batches: Iterator[dict], *,
               start_step: int, total_steps: int, writer: MetricWriter, log_every: int,
               save: Periodic, latest_saved: Callable[[], int | None],
               evaluate: Periodic | None = None, periodic: tuple[Periodic, ...] = (),
               after_step: Callable[[TrainState, dict, Any, dict], None] | None = None,
               sequences_per_step: int = 0, desc: str = "train") -> tuple[TrainState, dict]:
  """Runs steps start_step+1 .. total_steps; returns (state, the last evaluation's result).

  `batches` yields this process's rows of each global batch (numpy); `after_step(state,
  metrics, aux, batch)` sees every step on device (e.g. to accumulate statistics without a
  host sync). Raises FloatingPointError, before saving or evaluating anything, once a step's
  loss, gradient norm or learning rate was NaN/inf.
  """
  mesh = program.mesh
  # The first step whose update was not finite (-1: none), kept on device so that watching
  # every step costs no host sync.
  first_bad = jax.device_put(jnp.asarray(-1, jnp.int32), program.replicated)
  note_bad = jax.jit(lambda first, finite, step: jnp.where((first < 0) & ~finite, step, first))

  def stop_if_diverged(done: int, metrics: dict) -> None:
    bad = int(first_bad)
    if bad >= 0:
      loss = float(jax.device_get(metrics["loss"]))
      raise FloatingPointError(
          f"training diverged at step {bad} (NaN/inf loss, gradients or learning rate; loss at "
          f"step {done} is {loss}); stopping without saving (the last checkpoint, step "
          f"{latest_saved()}, is kept)")

  result: dict = {}
  t0, steps_timed = time.perf_counter(), 0
  bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc=desc,
             disable=jax.process_index() != 0, dynamic_ncols=True)
  try:
    for step in bar:
      batch = program.to_device(next(batches))
      with jax.set_mesh(mesh):
        state, metrics, aux = program.train_step(state, batch)
        first_bad = note_bad(first_bad, metrics["finite"], step + 1)
        if after_step is not None:
          after_step(state, metrics, aux, batch)
      done, steps_timed = step + 1, steps_timed + 1
      if step == start_step:  # the first step compiles: throughput is timed from its end on
        jax.block_until_ready(state.step)
        t0, steps_timed = time.perf_counter(), 0
      if done % log_every == 0 or done == total_steps:
        stop_if_diverged(done, metrics)
        host = jax.device_get(metrics)
        host.pop("finite")
        # Time since the last log, less saves, evaluations and other actions.
        if steps_timed and sequences_per_step:
          host["sequences_per_sec"] = steps_timed * sequences_per_step / (time.perf_counter() - t0)
        writer.scalars(done, host, prefix="train/")
        bar.set_postfix({k: f"{host[k]:.3f}" for k in ("loss", "mlm_accuracy", "accuracy")
                         if k in host})
        t0, steps_timed = time.perf_counter(), 0
      due = [p for p in periodic if p.due(done, total_steps)]
      saving = save.due(done, total_steps)
      evaluating = evaluate is not None and evaluate.due(done, total_steps)
      if due or saving or evaluating:
        stop_if_diverged(done, metrics)
        for p in due:
          p.action(done, state)
        if saving:
          save.action(done, state)
        if evaluating:
          result = evaluate.action(done, state)
        t0, steps_timed = time.perf_counter(), 0
  finally:
    bar.close()
  return state, result
