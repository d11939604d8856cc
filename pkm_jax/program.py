"""A run's jitted program, from its config: mesh, memory placement, optimizers, state shardings,
the sharded init and the train step; and restore-or-init of its state.

Pretraining (`trainer.py`) and fine-tuning (`tasks/task_run.py`) both build theirs here, so mesh,
placement, optimizer, clipping and the finite check are decided once for every run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from pkm_jax import checkpoint as ckpt_lib
from pkm_jax import config as config_lib
from pkm_jax import host_tables
from pkm_jax import optim as optim_lib
from pkm_jax import sharding as sharding_lib
from pkm_jax.config import ConfigError
from pkm_jax.continual import freezing
from pkm_jax.continual import lora as lora_lib
from pkm_jax.continual import slot_selection
from pkm_jax.placement import MemoryPlacement
from pkm_jax.models.tables import map_row_tables, row_tables, state_at
from pkm_jax.steps import LossFn, TrainState, make_train_step


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  """What a run executes; tests and benchmarks lower or time this very step."""

  mesh: jax.sharding.Mesh
  model_cfg: Any  # the model's ModelConfig
  placement: MemoryPlacement  # how the memory layers search, look up and update rows on `mesh`
  graphdef: nnx.GraphDef
  # ([source]) -> TrainState, jitted with out_shardings: every array is created in its shards,
  # so no device ever holds a whole value table. `source` (pretrained weights) goes to `init_from`.
  init_state: Callable[..., TrainState]
  abstract_state: TrainState  # ShapeDtypeStructs
  state_sharding: TrainState  # NamedShardings: the step's in/out shardings
  batch_sharding: jax.sharding.NamedSharding  # every batch array: leading dim over the batch axes
  train_step: Callable  # jitted (state, batch) -> (state, metrics, aux), state donated
  init_reports: list  # what `init_from` returned, appended when init_state traces with a source
  # Row tables the sparse path updates (`tables.row_tables`; empty without sparse_adam).
  sparse_tables: dict = dataclasses.field(default_factory=dict)

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  def to_device(self, local_batch: dict) -> dict[str, jax.Array]:
    """This process's rows of a global batch -> global arrays placed as the step expects."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local_batch.items()}


def build_program(config: ml_collections.ConfigDict, *,
                  make_model: Callable[[MemoryPlacement], nnx.Module], loss_fn: LossFn,
                  total_steps: int, batch_size: int,
                  init_from: Callable[[nnx.Module, Any], Any] | None = None,
                  devices: Sequence[jax.Device] | None = None) -> TrainProgram:
  """The program for a validated config's `mesh`, `optim`, `train.grad_accum_steps` and `seed`.

  make_model(placement) builds the model with fresh parameters (from `config.seed`);
  init_from(model, source) replaces some of them with pretrained ones inside the jitted init.
  `devices` (default: jax.devices()) may be another platform's, e.g. a TPU topology's for an
  ahead-of-time compile (benchmarks/pod_plan.py): nothing is allocated until init_state runs.
  """
  mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.model, devices)
  rules = sharding_lib.rules_from_config(config)
  placement = MemoryPlacement.from_mesh(mesh, rules, lookup_kernel=config.mesh.lookup_kernel,
                                        table_memory=config.mesh.table_memory)
  if placement.table_memory != host_tables.DEVICE and placement.split:
    raise ConfigError(f"mesh.table_memory={placement.table_memory!r} needs whole tables: use "
                      f"mesh.model=1 and no rules splitting 'slots' or 'value_embed'")
  accum = config.train.grad_accum_steps
  ways = math.prod(mesh.shape[a] for a in placement.token_axes)
  if (batch_size // accum) % ways:
    raise ConfigError(f"data.batch_size={batch_size} / train.grad_accum_steps={accum} = "
                      f"{batch_size // accum} sequences per micro-batch do not split over the "
                      f"{ways} devices of the batch axes (mesh.data x mesh.model)")
  finetune = config.get("finetune") or config_lib.finetune_group()
  optim_cfg = config.optim
  if finetune.method == "lora":  # the tables are frozen: nothing for a sparse optimizer
    optim_cfg = ml_collections.ConfigDict({**optim_cfg.to_dict(), "values_optimizer": "adam"})
  optimizers = optim_lib.make_optimizers(optim_cfg, total_steps)
  freeze = freezing.frozen_filter(finetune.method, config.optim.freeze_memory)
  if finetune.method == "lora":  # the base model with adapters on its projections
    make_base = make_model

    def make_model(placement):  # noqa: F811
      return lora_lib.add_lora(make_base(placement), finetune.lora_rank, finetune.lora_alpha,
                               nnx.Rngs(params=config.seed + 1))
  init_reports: list = []

  def split(model):
    return nnx.split(model, freeze, nnx.Param, nnx.BatchStat)

  abstract_model = nnx.eval_shape(lambda: make_model(placement))
  cfg = abstract_model.cfg
  graphdef = split(abstract_model)[0]
  sparse_tables = row_tables(cfg) if optimizers.sparse is not None else {}
  select = finetune.method == "sparse_memory"

  def init_state(source=None) -> TrainState:
    model = make_model(placement)
    if source is not None:  # pretrained weights replace the random ones
      init_reports.append(init_from(model, source))
    _, frozen, params, model_state = split(model)
    sparse = {key: optimizers.sparse.init(state_at(params, path).get_value())
              for key, (path, _, _) in sparse_tables.items()}
    selection = ({key: slot_selection.init_selection(cfg.memory.n_slots, finetune.refresh)
                  for key in sparse_tables} if select else {})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                      opt_state=optimizers.tx.init(params), sparse_opt_state=sparse,
                      frozen=frozen, selection=selection)

  abstract_state = jax.eval_shape(init_state)
  state_sharding = sharding_lib.state_shardings(abstract_state, mesh, rules,
                                                sharding_lib.fsdp_axes_from_config(config))
  # Sparse Adam's moments are plain arrays: split their rows like the table's.
  state_sharding.sparse_opt_state = {
      key: sharding_lib.row_state_shardings(
          abstract_state.sparse_opt_state[key],
          state_at(state_sharding.params, path).get_value(), cfg.memory.n_slots)
      for key, (path, _, _) in sparse_tables.items()}
  # Host tables: the row tables' shardings name the host's memory (`host_tables`).
  # (Tables are params, or frozen ones under finetune.method='lora'.)
  to_host = (lambda s: s.with_memory_kind(placement.table_memory)  # noqa: E731
             if placement.table_memory != host_tables.DEVICE else s)
  state_sharding.params = map_row_tables(state_sharding.params, cfg, to_host)
  state_sharding.frozen = map_row_tables(state_sharding.frozen, cfg, to_host)
  batch_sharding = sharding_lib.batch_sharding(mesh, rules)
  step = make_train_step(graphdef, loss_fn, optimizers, seed=config.seed, placement=placement,
                         sparse_tables=sparse_tables, memory=cfg.memory, grad_accum_steps=accum,
                         model_state_filter=nnx.All(nnx.BatchStat, nnx.Not(freeze)),
                         row_selection=slot_selection.make_row_selection(
                             finetune.top_t, finetune.refresh, cfg.memory.n_slots)
                         if select else None)
  train_step = jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, None, None), donate_argnums=(0,))
  return TrainProgram(mesh=mesh, model_cfg=cfg, placement=placement, graphdef=graphdef,
                      init_state=jax.jit(init_state, out_shardings=state_sharding),
                      abstract_state=abstract_state, state_sharding=state_sharding,
                      batch_sharding=batch_sharding, train_step=train_step,
                      init_reports=init_reports, sparse_tables=sparse_tables)


def restore_or_init(program: TrainProgram, manager: ckpt_lib.Manager, source: Any = None
                    ) -> tuple[TrainState, int, dict | None]:
  """(state, its step, the data iterator's saved state): the latest checkpoint's if the run has
  one, else a fresh state (from `source`, e.g. pretrained weights, when given) and (0, None)."""
  steps = manager.all_steps()
  if steps:
    state, data_state = restore_state(program, manager, max(steps))
    return state, max(steps), data_state
  return init_state(program, source), 0, None


def restore_state(program: TrainProgram, manager: ckpt_lib.Manager, step: int
                  ) -> tuple[TrainState, dict]:
  """The state saved at `step`, restored straight into the program's shardings, and the data
  iterator's state saved with it."""
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          program.abstract_state, program.state_sharding)
  state, data_state = ckpt_lib.restore_state(manager, step, abstract)
  # The step counter carries its sharding too, or the first step would recompile.
  state.step = jax.device_put(jnp.asarray(step, jnp.int32), program.state_sharding.step)
  return state, data_state


def init_state(program: TrainProgram, source: Any = None) -> TrainState:
  """A fresh state; `source` (e.g. pretrained weights as host arrays) enters the jitted init
  as an argument, not a constant, and every array is created in its shards."""
  with jax.set_mesh(program.mesh):
    return program.init_state(*(() if source is None else (source,)))
