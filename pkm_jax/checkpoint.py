"""Orbax checkpoints of a run's state, and restoring a pretrained model from a workdir.

Layout of a pretraining workdir:
  DIR/config.json            the run's full ConfigDict (eval.py and resumes read it)
  DIR/model_config.json      the frozen ModelConfig (vocab size resolved)
  DIR/tokenizer.json         the tokenizer the run trained or loaded
  DIR/checkpoints/<step>/    items: params, model_state (BatchNorm statistics), opt_state,
                             sparse_opt_state, frozen (when present) and data (iterator state)
Orbax writes each step into a temporary folder and renames it when complete, so a run killed
during a save leaves the previous step as the latest restorable one.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from pkm_jax import architecture
from pkm_jax.bert import BertForMaskedLM
from pkm_jax.data.tokenizer import load_tokenizer
from pkm_jax.steps import TrainState

# TrainState fields saved as orbax items (empty ones are skipped), plus the data iterator's state.
STATE_ITEMS = ("params", "model_state", "opt_state", "sparse_opt_state", "frozen")
ITEMS = (*STATE_ITEMS, "data")
Manager = ocp.CheckpointManager


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, *, max_to_keep: int | None = None,
                 read_only: bool = False) -> Manager:
  if max_to_keep is not None and max_to_keep < 1:
    # orbax's max_to_keep=0 deletes every checkpoint, the latest included.
    raise ValueError(f"keep_checkpoints={max_to_keep} must be >= 1")
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                         read_only=read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def saved_steps(workdir: str) -> list[int]:
  """Steps with a complete checkpoint in `workdir` (none if it has no checkpoints folder)."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return []
  return sorted(make_manager(workdir, read_only=True).all_steps())


def _nonempty(tree) -> bool:
  return bool(jax.tree.leaves(tree))


def save_state(manager: Manager, step: int, state: TrainState, data_state: dict) -> None:
  """Saves the train state's pytrees and the data iterator's JSON state at `step`."""
  # Orbax refuses empty items (no BatchNorm -> no model_state; dense values -> no sparse state).
  args = {name: ocp.args.StandardSave(getattr(state, name)) for name in STATE_ITEMS
          if _nonempty(getattr(state, name))}
  manager.save(step, args=ocp.args.Composite(data=ocp.args.JsonSave(data_state), **args))


class _IgnoreClosedEventLoop:
  """An unraisable hook that drops RuntimeError('Event loop is closed') and passes the rest on."""

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable) -> None:
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
        unraisable.exc_value):
      return
    self.previous(unraisable)


class _DropUnretrievedTaskErrors(logging.Filter):
  """Drops asyncio's '<Task|Future|...> exception was never retrieved' records, only those."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "exception was never retrieved" not in str(record.msg).split("\n", 1)[0]


def ignore_closed_event_loop() -> None:
  """Orbax's reads can finish on an asyncio loop that is already closed -- after a failed
  restore (whose failure is reported), and after restoring some items of a checkpoint -- and
  their callbacks then raise in a background thread, printed as tracebacks up to exit. Drop
  those, and only those. A failed restore can also leave its sibling reads' errors unretrieved,
  which asyncio logs when it collects them, sometimes (a race with the failure we report):
  those records are dropped too."""
  if not isinstance(sys.unraisablehook, _IgnoreClosedEventLoop):
    sys.unraisablehook = _IgnoreClosedEventLoop(sys.unraisablehook)
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _DropUnretrievedTaskErrors) for f in asyncio_log.filters):
    asyncio_log.addFilter(_DropUnretrievedTaskErrors())


def restore_items(manager: Manager, step: int, targets: dict[str, Any], *,
                  data: bool = False) -> dict[str, Any]:
  """Restores items {name: abstract tree} onto the shardings their leaves carry (empty trees
  come back as given: nothing was saved); with `data`, also the iterator's state."""
  args = {name: ocp.args.StandardRestore(tree) for name, tree in targets.items()
          if _nonempty(tree)}
  if data:
    args["data"] = ocp.args.JsonRestore()
  ignore_closed_event_loop()
  try:
    restored = dict(manager.restore(step, args=ocp.args.Composite(**args)))
  except Exception as e:  # orbax raises many types; the user needs the path and the cause
    where = os.path.join(str(manager.directory), str(step))
    cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise ValueError(f"checkpoint {where} could not be restored (corrupt or from another "
                     f"model): {type(e).__name__}: {cause[:240]}") from e
  for name, tree in targets.items():
    restored.setdefault(name, tree)
  return restored


def restore_state(manager: Manager, step: int, abstract: TrainState) -> tuple[TrainState, dict]:
  """A TrainState (onto the shardings `abstract`'s leaves carry) and the data iterator state."""
  targets = {name: getattr(abstract, name) for name in STATE_ITEMS}
  restored = restore_items(manager, step, targets, data=True)
  state = TrainState(step=abstract.step, **{name: restored[name] for name in STATE_ITEMS})
  return state, restored["data"]


def write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def read_json(path: str, what: str) -> Any:
  """A JSON file, or one line naming it when it is missing or unreadable."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: {what}")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} could not be read ({type(e).__name__}: {e}); {what}") from e


def read_model_config(workdir: str) -> architecture.ModelConfig:
  path = os.path.join(workdir, "model_config.json")
  what = f"{workdir} is not a complete pkm-jax training workdir"
  try:
    return architecture.from_dict(read_json(path, what))
  except (TypeError, KeyError, AttributeError) as e:
    raise ValueError(f"{path} is not a pkm-jax model config: {type(e).__name__}: {e}") from e


def latest_step(workdir: str, step: int | None = None) -> int:
  """`step` if it exists, else the latest; a clear error when there is none."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    raise FileNotFoundError(f"no checkpoints in {workdir} ({checkpoint_dir(workdir)} missing)")
  steps = saved_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir(workdir)}")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoint_dir(workdir)} "
                            f"(have {steps})")
  return step


def restore_model(workdir: str, step: int | None = None) -> tuple[BertForMaskedLM, Any, int]:
  """A training workdir's model at `step` (default latest), its tokenizer and that step.

  The model is on one device (whatever mesh the run used), ready for eval mode.
  """
  model_cfg = read_model_config(workdir)
  step = latest_step(workdir, step)
  model = nnx.eval_shape(lambda: BertForMaskedLM(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, params, model_state = nnx.split(model, nnx.Param, nnx.BatchStat)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
  restored = restore_items(make_manager(workdir, read_only=True), step,
                           {"params": jax.tree.map(place, params),
                            "model_state": jax.tree.map(place, model_state)})
  model = nnx.merge(graphdef, restored["params"], restored["model_state"])
  tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer.json"))
  return model, tokenizer, step
