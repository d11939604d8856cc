"""MLM pretraining: `train_and_evaluate(config, workdir)`.

Sections: setup -> model and optimizer (created already sharded) -> restore or +Init -> loop.
`train_step` is pure and jitted once with explicit shardings and a donated state; data, logging
and checkpoints stay in the Python loop.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from pkm_jax import checkpoint as ckpt_lib
from pkm_jax import config as config_lib
from pkm_jax import evaluate as eval_lib
from pkm_jax import metrics as metrics_lib
from pkm_jax import optim as optim_lib
from pkm_jax import pretrained as pretrained_lib
from pkm_jax import sharding as sharding_lib
from pkm_jax import sparse_adam
from pkm_jax.steps import (BATCH_KEYS, TrainState, make_train_step, make_usage_accumulator,
                           values_of)
from pkm_jax.bert import BertForMaskedLM
from pkm_jax.placement import MemoryPlacement
from pkm_jax.writer import MetricWriter


# ---------------------------------------------------------------------------------------------
# Setup helpers
# ---------------------------------------------------------------------------------------------


def _save_run_files(workdir: str, config: ml_collections.ConfigDict,
                    model_cfg: config_lib.ModelConfig) -> None:
  if jax.process_index() != 0:
    return
  ckpt_lib.write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json()))
  ckpt_lib.write_json(os.path.join(workdir, "model_config.json"), config_lib.to_dict(model_cfg))


def _check_resumable(workdir: str, config: ml_collections.ConfigDict,
                     model_cfg: config_lib.ModelConfig) -> None:
  # How the model is computed (remat, compute dtype, table placement) may change on resume;
  # what it is, and the layout of its optimizer state, may not.
  config_path = os.path.join(workdir, "config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      saved_optimizer = json.load(f).get("optim", {}).get("values_optimizer")
    if saved_optimizer not in (None, config.optim.values_optimizer):
      raise ValueError(f"{workdir} was trained with optim.values_optimizer={saved_optimizer!r}, "
                       f"not {config.optim.values_optimizer!r} (its optimizer state has another "
                       "layout); use a new --workdir")

  def structure(cfg):
    return dataclasses.replace(cfg, remat=False, dtype="float32")
  saved, now = structure(ckpt_lib.read_model_config(workdir)), structure(model_cfg)
  if saved != now:
    diff = [f.name for f in dataclasses.fields(saved)
            if getattr(saved, f.name) != getattr(now, f.name)]
    raise ValueError(f"{workdir} holds checkpoints of a different model ({', '.join(diff)} "
                     "differ); use a new --workdir")


def _memory_images(writer: MetricWriter, step: int, usage: dict) -> None:
  for layer, (counts, _, _) in usage.items():
    grid = eval_lib.usage_histogram(np.asarray(counts))
    writer.image(step, f"memory/layer{layer}/usage_map", grid[..., None])


# ---------------------------------------------------------------------------------------------
# The jitted program: mesh, state shardings, init and train step, from the config alone
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  """What `train_and_evaluate` runs; tests and benchmarks lower or time this very step."""

  mesh: jax.sharding.Mesh
  model_cfg: config_lib.ModelConfig
  placement: MemoryPlacement  # how the memory layers search, look up and update rows on `mesh`
  graphdef: nnx.GraphDef
  # ([pretrained params]) -> TrainState, jitted with out_shardings: every array is created in
  # its shards, so no device ever holds a whole value table.
  init_state: Callable[..., TrainState]
  abstract_state: TrainState  # ShapeDtypeStructs
  state_sharding: TrainState  # NamedShardings: the step's in/out shardings
  batch_sharding: jax.sharding.NamedSharding
  train_step: Callable  # jitted (state, batch) -> (state, metrics, aux), state donated
  init_reports: list  # +Init reports, appended when init_state traces with pretrained params


def build_train_program(config: ml_collections.ConfigDict, vocab_size: int,
                        pretrained_cfg: config_lib.ModelConfig | None = None) -> TrainProgram:
  """Mesh (config.mesh), rules, optimizers and the jitted train step for a validated config."""
  mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.model)
  rules = sharding_lib.rules_from_config(config)
  placement = MemoryPlacement.from_mesh(mesh, rules)
  config_lib.check_batch_split(
      config, int(np.prod([mesh.shape[a] for a in placement.token_axes])))
  model_cfg = config_lib.model_config(config, vocab_size=vocab_size)
  tx, schedule = optim_lib.make_optimizer(config.optim, config.train.steps)
  sparse_tx = None
  if config.optim.values_optimizer == "sparse_adam" and model_cfg.memory_layers:
    sparse_tx = sparse_adam.sparse_adam(config.optim.values_lr, b1=config.optim.b1,
                                        b2=config.optim.b2, eps=config.optim.eps,
                                        weight_decay=config.optim.values_weight_decay)
  init_reports: list = []

  def init_state(src_params=None) -> TrainState:
    model = BertForMaskedLM(model_cfg, rngs=nnx.Rngs(params=config.seed), placement=placement)
    if src_params is not None:  # +Init: pretrained dense weights replace the random ones
      init_reports.append(pretrained_lib.init_from_pretrained(model, src_params, pretrained_cfg))
    _, params, model_state = nnx.split(model, nnx.Param, nnx.BatchStat)
    sparse = ({str(layer): sparse_tx.init(values_of(params, layer).value)
               for layer in model_cfg.memory_layers} if sparse_tx else {})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                      opt_state=tx.init(params), sparse_opt_state=sparse)

  graphdef = nnx.graphdef(nnx.eval_shape(
      lambda: BertForMaskedLM(model_cfg, rngs=nnx.Rngs(0), placement=placement)))
  abstract_state = jax.eval_shape(init_state)
  state_sharding = sharding_lib.state_shardings(abstract_state, mesh, rules)
  if sparse_tx:  # sparse Adam's moments are plain arrays: split their rows like the table's
    state_sharding.sparse_opt_state = {
        str(layer): sharding_lib.row_state_shardings(
            abstract_state.sparse_opt_state[str(layer)],
            values_of(state_sharding.params, layer).value, model_cfg.memory.n_slots)
        for layer in model_cfg.memory_layers}
  batch_sharding = sharding_lib.batch_sharding(mesh, rules)
  train_step = jax.jit(make_train_step(graphdef, model_cfg, tx, schedule, config.seed,
                                       sparse_tx=sparse_tx, placement=placement,
                                       grad_accum_steps=config.train.grad_accum_steps,
                                       grad_clip=config.optim.grad_clip or 0.0),
                       in_shardings=(state_sharding, {k: batch_sharding for k in BATCH_KEYS}),
                       out_shardings=(state_sharding, None, None), donate_argnums=(0,))
  return TrainProgram(mesh=mesh, model_cfg=model_cfg, placement=placement, graphdef=graphdef,
                      init_state=jax.jit(init_state, out_shardings=state_sharding),
                      abstract_state=abstract_state, state_sharding=state_sharding,
                      batch_sharding=batch_sharding, train_step=train_step,
                      init_reports=init_reports)


# ---------------------------------------------------------------------------------------------
# Main entry point
# ---------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Pretrains with MLM into `workdir` (resuming if it has checkpoints); returns final metrics."""
  from pkm_jax import data as data_lib  # pylint: disable=g-import-not-at-top

  # --- Setup: config, workdir, tokenizer, data --------------------------------------------
  config_lib.validate(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  resuming = os.path.isdir(ckpt_lib.checkpoint_dir(workdir)) and bool(
      ckpt_lib.make_manager(workdir, read_only=True).all_steps())
  pretrained_weights = None
  if config.init["from"]:
    # +Init: sizes (and the tokenizer) come from the pretrained model unless set explicitly.
    if resuming:  # the workdir's own model config; the weights come from its checkpoint
      config = pretrained_lib.resolve_model_config(config, ckpt_lib.read_model_config(workdir))
    else:
      src_cfg, src_params, _ = pretrained_lib.load_pretrained(config.init["from"])
      config = pretrained_lib.resolve_model_config(config, src_cfg)
      pretrained_weights = (src_cfg, src_params)
  tokenizer = data_lib.build_tokenizer(config.data, workdir)
  vocab_size = tokenizer.get_vocab_size()
  config_lib.validate(config, vocab_size=vocab_size)

  program = build_train_program(config, vocab_size,
                                pretrained_weights[0] if pretrained_weights else None)
  mesh, model_cfg, graphdef = program.mesh, program.model_cfg, program.graphdef
  abstract_state, state_sharding = program.abstract_state, program.state_sharding
  if resuming:
    _check_resumable(workdir, config, model_cfg)
  _save_run_files(workdir, config, model_cfg)

  train_iter, make_eval_iter = data_lib.make_mlm_data(
      config.data, tokenizer, seed=config.seed, shard_index=jax.process_index(),
      shard_count=jax.process_count())
  batch_sharding = program.batch_sharding

  def to_device(local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    # Each process holds its rows of the global batch; together they form one global array.
    return {k: jax.make_array_from_process_local_data(batch_sharding, v)
            for k, v in local_batch.items()}

  # --- Restore, or init (+Init: from pretrained weights) straight into the shardings ---------
  manager = ckpt_lib.make_manager(workdir, max_to_keep=config.train.keep_checkpoints)
  start_step = 0
  if resuming:
    start_step = manager.latest_step()
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
        state_sharding)
    restored = ckpt_lib.restore(manager, start_step, abstract_params=abstract.params,
                                abstract_model_state=abstract.model_state,
                                abstract_opt_state=abstract.opt_state,
                                abstract_sparse_opt_state=abstract.sparse_opt_state)
    step0 = jax.device_put(jnp.asarray(start_step, jnp.int32), state_sharding.step)
    state = TrainState(step=step0, params=restored["params"],
                       model_state=restored["model_state"], opt_state=restored["opt_state"],
                       sparse_opt_state=restored["sparse_opt_state"])
    train_iter.set_state(restored["data"])
    print(f"Resuming {workdir} from step {start_step}"
          + (" (init.from is ignored: the latest checkpoint wins)" if config.init["from"] else ""))
  else:
    # The pretrained tensors enter as arguments (not constants); memory tables are created
    # directly in their shards, so the full table never exists on one device.
    src = ((jax.tree.map(np.asarray, pretrained_weights[1]),)  # host copies: jit places them
           if pretrained_weights is not None else ())
    with jax.set_mesh(mesh):
      state = program.init_state(*src)
    if program.init_reports:
      print(f"+Init from {config.init['from']}: {program.init_reports[0].summary()}")

  # --- Jitted steps ---------------------------------------------------------------------------
  train_step = program.train_step
  # Sums and per-slot usage totals come back replicated: every host reads the same numbers.
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  eval_step = jax.jit(eval_lib.make_eval_step(graphdef, model_cfg),
                      in_shardings=(state_sharding.params, state_sharding.model_state,
                                    batch_sharding),
                      out_shardings=replicated)
  accumulate = jax.jit(make_usage_accumulator(model_cfg.memory.n_slots),
                       out_shardings=replicated, donate_argnums=(0,))

  def zero_usage():
    # Placed as accumulate returns them, so it compiles once and can reuse the donated buffers.
    z = lambda: jax.device_put(jnp.zeros((model_cfg.memory.n_slots,), jnp.float32), replicated)
    return {layer: (z(), z(), z()) for layer in model_cfg.memory_layers}

  def evaluate(step: int) -> dict:
    with jax.set_mesh(mesh):
      result = eval_lib.run_eval(eval_step, state.params, state.model_state,
                                 make_eval_iter(config.train.eval_batches or None), to_device,
                                 model_cfg)
    scalars = {k: result[k] for k in ("mlm_loss", "mlm_perplexity", "mlm_accuracy")}
    for layer, stats in result["memory"].items():
      scalars.update({f"memory/layer{layer}/{k}": v for k, v in stats.items()})
    writer.scalars(step, scalars, prefix="eval/")
    return result

  def save(step: int) -> None:
    ckpt_lib.save(manager, step, params=state.params, model_state=state.model_state,
                  opt_state=state.opt_state, sparse_opt_state=state.sparse_opt_state,
                  data_state=train_iter.get_state())

  # --- Loop ---------------------------------------------------------------------------------
  writer = MetricWriter(os.path.join(workdir, "tensorboard"))
  usage = zero_usage()
  stats_every = config.train.memory_stats_every if model_cfg.memory_layers else 0
  every = lambda n, done: done % n == 0 or done == config.train.steps
  # The first step whose loss, gradients or learning rate were not finite (-1: none), kept on
  # device so that watching every step costs no host sync.
  first_bad = jax.device_put(jnp.asarray(-1, jnp.int32), replicated)
  note_bad = jax.jit(lambda first, finite, step: jnp.where((first < 0) & ~finite, step, first))

  def stop_if_diverged(done: int, loss: float) -> None:
    bad = int(first_bad)
    if bad >= 0:
      raise FloatingPointError(
          f"training diverged at step {bad} (NaN/inf loss, gradients or learning rate; loss at "
          f"step {done} is {loss}); stopping without saving (the last checkpoint, step "
          f"{manager.latest_step()}, is kept)")

  result: dict[str, Any] = {}
  t0, steps_timed = time.perf_counter(), 0
  bar = tqdm(range(start_step, config.train.steps), initial=start_step, total=config.train.steps,
             desc="train", disable=jax.process_index() != 0, dynamic_ncols=True)
  try:
    for step in bar:
      batch = to_device(next(train_iter))
      with jax.set_mesh(mesh):
        state, metrics, aux = train_step(state, batch)
        first_bad = note_bad(first_bad, metrics["finite"], step + 1)
        if stats_every:
          usage = accumulate(usage, aux, batch["attention_mask"])
      done = step + 1
      steps_timed += 1
      if step == start_step:  # the first step compiles: throughput is timed from its end on
        jax.block_until_ready(state.step)
        t0, steps_timed = time.perf_counter(), 0
      if every(config.train.log_every, done):
        host = jax.device_get(metrics)
        stop_if_diverged(done, host["loss"])
        # Time since the last log, less evals, saves and usage stats (they restart the clock).
        if steps_timed:
          host["sequences_per_sec"] = steps_timed * config.data.batch_size / (
              time.perf_counter() - t0)
        host.pop("finite")
        writer.scalars(done, host, prefix="train/")
        bar.set_postfix(loss=f"{host['loss']:.3f}", acc=f"{host['mlm_accuracy']:.3f}")
        t0, steps_timed = time.perf_counter(), 0
      if stats_every and done % stats_every == 0:
        host_usage = jax.device_get(usage)
        stats = {f"memory/layer{layer}/{k}": v
                 for layer, (c, w, t) in host_usage.items()
                 for k, v in metrics_lib.memory_usage_stats(c, w, t).items()}
        writer.scalars(done, stats, prefix="train/")
        _memory_images(writer, done, host_usage)
        usage = zero_usage()
        t0, steps_timed = time.perf_counter(), 0
      if every(config.train.eval_every, done) or every(config.train.checkpoint_every, done):
        stop_if_diverged(done, float(jax.device_get(metrics["loss"])))
        if every(config.train.eval_every, done):
          result = evaluate(done)
        if every(config.train.checkpoint_every, done):
          save(done)
        t0, steps_timed = time.perf_counter(), 0
  finally:
    bar.close()
    manager.wait_until_finished()
    writer.close()
  if not result:  # resumed at the final step: nothing trained, still report
    result = evaluate(config.train.steps)
  result = {"step": config.train.steps, **result}
  return result
