"""Pretraining: `train_and_evaluate(config, workdir)` -- masked LM for BERT, next-token LM for
the causal families (model.family 'gpt2' / 'llama': steps.clm_loss on data.causal's batches).

Sections: checks (config, resume, +Init, tokenizer, data) -> program (mesh, placement, sharded
init and step) -> restore or init -> run files -> loop. Nothing is written to the workdir until
every check has passed and the state is in memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from pkm_jax import architecture
from pkm_jax import checkpoint as ckpt_lib
from pkm_jax import config as config_lib
from pkm_jax import data as data_lib
from pkm_jax import evaluate as eval_lib
from pkm_jax import metrics as metrics_lib
from pkm_jax import plus_init
from pkm_jax import pretrained as pretrained_lib
from pkm_jax import program as program_lib
from pkm_jax import storage
from pkm_jax.continual import methods as methods_lib
from pkm_jax.continual import slot_selection
from pkm_jax.models.registry import build_lm
from pkm_jax.loop import Periodic, train_loop
from pkm_jax.program import TrainProgram
from pkm_jax.steps import loss_for, make_usage_accumulator
from pkm_jax.writer import MetricWriter


# ---------------------------------------------------------------------------------------------
# Checks and run files
# ---------------------------------------------------------------------------------------------


def check_resumable(workdir: str, config: ml_collections.ConfigDict,
                    model_cfg: architecture.ModelConfig) -> None:
  """How the model is computed (remat, compute dtype, mesh) may change on resume; what it is,
  and the layout of its optimizer state, may not."""
  config_path = os.path.join(workdir, "config.json")
  if storage.exists(config_path):
    saved = config_lib.upgrade(ckpt_lib.read_json(config_path, "the run's settings"))
    for key in ("values_optimizer", "freeze_memory"):
      was = saved.get("optim", {}).get(key, config_lib.optim_group()[key])
      if was != config.optim[key]:
        raise ValueError(f"{workdir} was trained with optim.{key}={was!r}, not "
                         f"{config.optim[key]!r} (its optimizer state has another layout); use "
                         "a new --workdir")
    was = saved.get("finetune", {}).get("method", "full")
    if was != config.finetune.method:
      raise ValueError(f"{workdir} was trained with finetune.method={was!r}, not "
                       f"{config.finetune.method!r} (another set of trained parameters); use a "
                       "new --workdir")

  def structure(cfg):
    return dataclasses.replace(cfg, remat=False, dtype="float32")
  saved, now = structure(ckpt_lib.read_model_config(workdir)), structure(model_cfg)
  if saved != now:
    diff = [f.name for f in dataclasses.fields(saved)
            if getattr(saved, f.name) != getattr(now, f.name)]
    raise ValueError(f"{workdir} holds checkpoints of a different model ({', '.join(diff)} "
                     "differ); use a new --workdir")


def save_run_files(workdir: str, config: ml_collections.ConfigDict,
                   model_cfg: architecture.ModelConfig, tokenizer: Any) -> None:
  """config.json, model_config.json and tokenizer.json (an existing tokenizer is never
  replaced: resumes and evaluations must see the ids training saw)."""
  if jax.process_index() != 0:
    return
  storage.makedirs(workdir)
  ckpt_lib.write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json()))
  ckpt_lib.write_json(os.path.join(workdir, "model_config.json"), architecture.to_dict(model_cfg))
  tokenizer_path = os.path.join(workdir, data_lib.TOKENIZER_FILE)
  if not storage.isfile(tokenizer_path):
    data_lib.save_tokenizer(tokenizer, tokenizer_path)


def _memory_images(writer: MetricWriter, step: int, usage: dict) -> None:
  for layer, (counts, _, _) in usage.items():
    grid = eval_lib.usage_histogram(np.asarray(counts))
    writer.image(step, f"memory/layer{layer}/usage_map", grid[..., None])


# ---------------------------------------------------------------------------------------------
# The jitted program
# ---------------------------------------------------------------------------------------------


def build_train_program(config: ml_collections.ConfigDict, vocab_size: int,
                        pretrained_cfg: architecture.ModelConfig | None = None,
                        devices: Sequence[jax.Device] | None = None) -> TrainProgram:
  """The pretraining program (MLM loss, or next-token loss for a causal family) for a validated
  config and tokenizer vocabulary, on `devices` (default: all of jax's;
  `program.build_program`)."""
  model_cfg = config_lib.model_config(config, vocab_size=vocab_size)

  def make_model(placement):
    return build_lm(model_cfg, rngs=nnx.Rngs(params=config.seed), placement=placement)

  def init_from(model, src_params):
    return plus_init.init_from_pretrained(model, src_params, pretrained_cfg)

  # MLM: logits only where tokens can be masked, at most max_masked positions per row.
  loss_fn = loss_for(model_cfg, max_predictions=data_lib.max_masked(config.data.mask_prob,
                                                                    config.data.max_len))
  return program_lib.build_program(config, make_model=make_model, loss_fn=loss_fn,
                                   total_steps=config.train.steps,
                                   batch_size=config.data.batch_size, init_from=init_from,
                                   devices=devices)


def jit_eval_step(program: TrainProgram):
  """The evaluation forward, jitted on the program's shardings:
  (params, model_state, frozen, batch) -> (sums, per-layer slot usage)."""
  # Sums and per-slot usage totals come back replicated: every host reads the same numbers.
  return jax.jit(eval_lib.make_eval_step(program.graphdef, program.model_cfg),
                 in_shardings=(program.state_sharding.params, program.state_sharding.model_state,
                               program.state_sharding.frozen, program.batch_sharding),
                 out_shardings=program.replicated)


# ---------------------------------------------------------------------------------------------
# Main entry point
# ---------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Pretrains (MLM, or next-token for a causal family) into `workdir`, resuming if it has
  checkpoints; returns the final evaluation's metrics."""
  # --- Checks: nothing is written before they have all passed ------------------------------
  config_lib.validate(config)
  workdir = storage.absolute(workdir)
  storage.check_bucket(workdir)
  steps = ckpt_lib.saved_steps(workdir)
  pretrained_weights = None
  if config.init.pretrained:
    # +Init: sizes (and the tokenizer) come from the pretrained model unless set explicitly.
    if steps:  # the workdir's own model config; the weights come from its checkpoint
      own_cfg = ckpt_lib.read_model_config(workdir)
      config = methods_lib.resolve(plus_init.resolve_model_config(config, own_cfg), own_cfg)
    else:
      src_cfg, src_params, _ = pretrained_lib.load_pretrained(config.init.pretrained)
      # Continued training keeps the pretrained memory unless the config sets its own.
      config = methods_lib.resolve(plus_init.resolve_model_config(config, src_cfg), src_cfg)
      pretrained_weights = (src_cfg, src_params)
  causal = config.model.family != "bert"
  tokenizer = data_lib.build_tokenizer(config.data, workdir, save=False, causal=causal)
  vocab_size = tokenizer.get_vocab_size()
  config_lib.validate(config, vocab_size=vocab_size)
  methods_lib.check_model(config, config_lib.model_config(config, vocab_size=vocab_size))
  sparse_memory = config.finetune.method == "sparse_memory"
  # sparse_memory's background sample (the idf), read before any work: a fresh run only.
  bg_batches = (methods_lib.background_batches(config, tokenizer, causal)
                if sparse_memory and not steps else None)
  program = build_train_program(config, vocab_size,
                                pretrained_weights[0] if pretrained_weights else None)
  model_cfg = program.model_cfg
  if steps:
    check_resumable(workdir, config, model_cfg)
  train_iter, make_eval_iter = data_lib.make_mlm_data(
      config.data, tokenizer, seed=config.seed, shard_index=jax.process_index(),
      shard_count=jax.process_count(), causal=causal)
  if not make_eval_iter.num_batches:
    raise ValueError("the held-out split is empty: nothing to evaluate (raise "
                     "data.eval_fraction or give more documents)")

  # --- Restore, or init (+Init: from pretrained weights) straight into the shardings ---------
  manager = ckpt_lib.make_manager(workdir, max_to_keep=config.train.keep_checkpoints)
  # Host copies: the pretrained tensors enter the jitted init as arguments, not constants.
  source = jax.tree.map(np.asarray, pretrained_weights[1]) if pretrained_weights else None
  state, start_step, data_state = program_lib.restore_or_init(program, manager, source)
  if data_state is not None:
    train_iter.set_state(data_state)
    print(f"Resuming {workdir} from step {start_step}"
          + (" (init.pretrained is ignored: the latest checkpoint wins)"
             if config.init.pretrained else ""))
  elif program.init_reports:
    print(f"+Init from {config.init.pretrained}: {program.init_reports[0].summary()}")

  # --- Evaluation and memory statistics -----------------------------------------------------
  mesh, replicated = program.mesh, program.replicated
  eval_step = jit_eval_step(program)

  def count_slots(state, batches) -> dict:
    with jax.set_mesh(mesh):
      return slot_selection.background_counts(
          eval_step, (state.params, state.model_state, state.frozen), batches,
          program.to_device, program.sparse_tables)

  background = None
  if bg_batches is not None:
    # The idf: accesses of the pretrained model's slots on the background sample.
    background = count_slots(state, bg_batches)
    for key, b in background.items():
      state.selection[key][slot_selection.DF] = jax.device_put(
          np.asarray(b["df"], np.float32), replicated)
      state.selection[key][slot_selection.N_BACKGROUND] = jax.device_put(
          np.float32(b["n_batches"]), replicated)
  save_run_files(workdir, config, model_cfg, tokenizer)
  epoch_refresh = sparse_memory and config.finetune.refresh == "epoch"

  def recount_tf(step: int, state) -> None:
    """refresh='epoch': the new data's accesses over one pass, with the model as it is now.
    The step's state is replaced in place (the loop hands this very object to the next step)."""
    counts = count_slots(state, methods_lib.epoch_batches(train_iter))
    for key, c in counts.items():
      state.selection[key] = {**state.selection[key], slot_selection.TF: jax.device_put(
          np.asarray(c["counts"], np.float32), replicated)}

  if epoch_refresh and data_state is None:
    recount_tf(0, state)

  def evaluate(step: int, state, writer: MetricWriter | None = None) -> dict:
    with jax.set_mesh(mesh):
      result = eval_lib.run_eval(
          eval_step, (state.params, state.model_state, state.frozen),
          make_eval_iter(config.train.eval_batches or None), program.to_device, model_cfg)
    if writer is not None:
      name = "lm" if causal else "mlm"
      scalars = {k: result[f"{name}_{k}"] for k in ("loss", "perplexity", "accuracy")}
      scalars = {f"{name}_{k}": v for k, v in scalars.items()}
      for layer, stats in result["memory"].items():
        scalars.update({f"memory/layer{layer}/{k}": v for k, v in stats.items()})
      writer.scalars(step, scalars, prefix="eval/")
    return {"step": step, **result}

  if start_step >= config.train.steps:
    print(f"{workdir} is finished: its latest checkpoint is step {start_step} (train.steps="
          f"{config.train.steps}); evaluating it")
    return evaluate(start_step, state)

  accumulate = jax.jit(make_usage_accumulator(model_cfg.memory.n_slots),
                       out_shardings=replicated, donate_argnums=(0,))

  def zero_usage():
    # Placed as accumulate returns them, so it compiles once and can reuse the donated buffers.
    z = lambda: jax.device_put(jnp.zeros((model_cfg.memory.n_slots,), jnp.float32),  # noqa: E731
                               replicated)
    return {layer: (z(), z(), z()) for layer in model_cfg.memory_layers}

  usage = zero_usage()
  stats_every = config.train.memory_stats_every if model_cfg.memory_layers else 0

  def add_usage(state, metrics, aux, batch) -> None:
    nonlocal usage
    usage = accumulate(usage, aux, batch["attention_mask"])

  def write_usage(step: int, state) -> None:
    nonlocal usage
    host_usage = jax.device_get(usage)
    stats = {f"memory/layer{layer}/{k}": v
             for layer, (c, w, t) in host_usage.items()
             for k, v in metrics_lib.memory_usage_stats(c, w, t).items()}
    writer.scalars(step, stats, prefix="train/")
    _memory_images(writer, step, host_usage)
    usage = zero_usage()

  def save(step: int, state) -> None:
    ckpt_lib.save_state(manager, step, state, train_iter.get_state())

  # --- Loop ---------------------------------------------------------------------------------
  t = config.train
  with MetricWriter(os.path.join(workdir, "tensorboard")) as writer:
    try:
      state, result = train_loop(
          program, state, train_iter, start_step=start_step, total_steps=t.steps,
          writer=writer, log_every=t.log_every, save=Periodic(t.checkpoint_every, save),
          latest_saved=manager.latest_step,
          evaluate=Periodic(t.eval_every, lambda step, s: evaluate(step, s, writer)),
          # Usage statistics cover exactly `stats_every` steps each: none for a last, partial span.
          periodic=((Periodic(stats_every, write_usage, at_end=False),) if stats_every else ())
          + ((Periodic(methods_lib.epoch_steps(train_iter), recount_tf, at_end=False),)
             if epoch_refresh else ()),
          after_step=add_usage if stats_every else None,
          sequences_per_step=config.data.batch_size)
    finally:
      manager.wait_until_finished()
  if sparse_memory and jax.process_index() == 0:
    save_selection_report(workdir, config, jax.device_get(state.selection), background)
  return result


def save_selection_report(workdir: str, config: ml_collections.ConfigDict, selection: dict,
                          background: dict | None) -> None:
  """WORKDIR/selected_slots.json: per table, the slots sparse_memory wrote and in how many
  steps (continual.slot_selection.written_report), with the run's selection settings."""
  f = config.finetune
  report = {"method": f.method, "top_t": f.top_t, "refresh": f.refresh,
            "background_batches": f.background_batches,
            "tables": slot_selection.written_report(selection)}
  if background is not None:
    for key, b in background.items():
      used = np.flatnonzero(np.asarray(b["counts"]) > 0)
      report["tables"][key]["background_slots_used"] = int(used.size)
  ckpt_lib.write_json(os.path.join(workdir, "selected_slots.json"), report)
