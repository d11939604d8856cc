"""Orbax checkpoints of a run's state, and restoring a pretrained model from a workdir.

Layout of a pretraining workdir:
  DIR/config.json            the run's full ConfigDict (eval.py and resumes read it)
  DIR/model_config.json      the frozen ModelConfig (vocab size resolved)
  DIR/tokenizer.json         the tokenizer the run trained or loaded
  DIR/checkpoints/<step>/    items: params, model_state (BatchNorm statistics), opt_state,
                             sparse_opt_state, frozen, selection (when present) and data
                             (iterator state);
                             checksums.sha256, every file's SHA-256 (`checksums`)
Orbax writes each step into a temporary folder and renames it when complete, so a run killed
during a save leaves the previous step as the latest restorable one. The checksums are written
into that temporary folder before the rename: a step appears with its manifest or not at all.
In a bucket (gs://) orbax writes the step in place and marks it complete with
commit_success.txt instead of a rename; the checksums are written before that marker, so the
same holds. Before a restore, the files of the items restored are hashed and compared, so a
damaged file is refused in one line before orbax reads any array (orbax keeps no checksums,
and a read that fails inside it leaves its sibling reads running past the failure; it does read
each step's small `_CHECKPOINT_METADATA` when a manager is made).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from flax import nnx

from pkm_jax import architecture
from pkm_jax import checksums
from pkm_jax import storage
from pkm_jax.continual import freezing
from pkm_jax.continual import lora as lora_lib
from pkm_jax.models.registry import build_lm
from pkm_jax.data.tokenizer import load_tokenizer
from pkm_jax.steps import TrainState

# TrainState fields saved as orbax items (empty ones are skipped), plus the data iterator's state.
STATE_ITEMS = ("params", "model_state", "opt_state", "sparse_opt_state", "frozen", "selection")
ITEMS = (*STATE_ITEMS, "data")
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's temporary step folder: <step><suffix>


@contextlib.contextmanager
def sigint_deferred():
  """Holds a first Ctrl-C until the block is done; a second one interrupts at once.

  orbax runs a save's or restore's reads and writes on tensorstore's threads under an asyncio
  loop: a KeyboardInterrupt inside it closes the loop with that work still in flight, and each
  piece then fails on the closed loop at exit, printing a traceback. Only in the main thread,
  and only where Python's own handler (or another callable) is installed; restored after.
  """
  previous = signal.getsignal(signal.SIGINT)
  if (threading.current_thread() is not threading.main_thread() or not callable(previous)
      or getattr(previous, "holds_sigint", False)):  # not a main thread, or nested
    yield
    return
  held = []

  def hold(signum, frame):
    if held:  # the second Ctrl-C
      previous(signum, frame)
    held.append(signum)

  hold.holds_sigint = True
  signal.signal(signal.SIGINT, hold)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
  if held:  # delivered now, to the handler that was there (Python's raises KeyboardInterrupt)
    previous(signal.SIGINT, None)


# orbax rewrites its step metadata (a commit time) and adds a marker when it renames the step:
# hashed once the save has finished, when the manifest is completed.
_COMMIT_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")


class _StepChecksums:
  """orbax's post-finalization callback, run on the primary host once every host's files are
  written and before the step's temporary folder is renamed: writes its manifest there."""

  def __init__(self, directory: str):
    self.directory = directory
    self.step: int | None = None

  def __call__(self) -> None:
    if self.step is not None and self.directory.startswith("gs://"):
      # orbax's CommitFileTemporaryPath: written in place, committed by commit_success.txt.
      checksums.write(storage.join(self.directory, str(self.step)), exclude=_COMMIT_FILES)
      return
    tmps = glob.glob(os.path.join(glob.escape(self.directory), f"{self.step}{_TMP_SUFFIX}*"))
    if self.step is None or len(tmps) != 1:
      raise RuntimeError(f"cannot find the temporary folder of checkpoint step {self.step} in "
                         f"{self.directory} to write its checksums (found {tmps})")
    checksums.write(tmps[0], exclude=_COMMIT_FILES)


class Manager(ocp.CheckpointManager):
  """orbax's CheckpointManager; each step it saves carries checksums.sha256.

  The step's arrays are hashed before orbax's rename; orbax's own commit files once the save
  has finished (`wait_until_finished`, which the next save and every run's end call).
  """

  def __init__(self, directory: str, *, max_to_keep: int | None, read_only: bool):
    self._checksums = _StepChecksums(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._checksums))
    super().__init__(directory, options=options, item_names=ITEMS)
    self._incomplete: int | None = None  # the step whose manifest lacks _COMMIT_FILES
    if not read_only and jax.process_index() == 0:
      self._complete_cut_off_manifests()

  def _complete_cut_off_manifests(self) -> None:
    """A run stopped between a save and its end (preemption, SIGKILL) left its last step's
    manifest without orbax's commit files: add them (a manifest's text, then those files)."""
    for step in self.all_steps():
      folder = os.path.join(str(self.directory), str(step))
      listed = checksums.read(folder) if storage.isfile(
          os.path.join(folder, checksums.MANIFEST)) else None
      if listed is not None and any(storage.isfile(os.path.join(folder, f)) and f not in listed
                                    for f in _COMMIT_FILES):
        checksums.complete(folder)

  def save(self, step: int, *args, **kwargs) -> bool:
    # One save in flight at a time, so that the callback knows which step it finalises.
    with sigint_deferred():
      self.wait_until_finished()
      self._checksums.step = self._incomplete = step
      return super().save(step, *args, **kwargs)

  def wait_until_finished(self) -> None:
    with sigint_deferred():
      self._wait_and_complete()

  def _wait_and_complete(self) -> None:
    super().wait_until_finished()  # orbax calls it within save() too, before the step exists
    folder = os.path.join(str(self.directory), str(self._incomplete))
    if self._incomplete is not None and storage.isfile(os.path.join(folder, checksums.MANIFEST)):
      if jax.process_index() == 0:
        checksums.complete(folder)
      self._incomplete = None


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(storage.absolute(workdir), "checkpoints")


def make_manager(workdir: str, *, max_to_keep: int | None = None,
                 read_only: bool = False) -> Manager:
  if max_to_keep is not None and max_to_keep < 1:
    # orbax's max_to_keep=0 deletes every checkpoint, the latest included.
    raise ValueError(f"keep_checkpoints={max_to_keep} must be >= 1")
  return Manager(checkpoint_dir(workdir), max_to_keep=max_to_keep, read_only=read_only)


def saved_steps(workdir: str) -> list[int]:
  """Steps with a complete checkpoint in `workdir` (none if it has no checkpoints folder)."""
  if not storage.isdir(checkpoint_dir(workdir)):
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
  those records are dropped too. Since checkpoints carry checksums a damaged file is refused
  before orbax reads any array, so a failed read (and that race) is left to checkpoints written
  without them."""
  if not isinstance(sys.unraisablehook, _IgnoreClosedEventLoop):
    sys.unraisablehook = _IgnoreClosedEventLoop(sys.unraisablehook)
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _DropUnretrievedTaskErrors) for f in asyncio_log.filters):
    asyncio_log.addFilter(_DropUnretrievedTaskErrors())


def verify_files(folder: str, what: str, advice: str,
                 include: Callable[[str], bool] | None = None) -> bool:
  """Checks `folder`'s files (those `include` accepts) against its checksums.sha256: True
  when they match, False when it has none. A mismatch is a ValueError: `what` failed, the file,
  then `advice`."""
  try:
    return checksums.verify(folder, include)
  except checksums.ChecksumError as e:
    raise ValueError(f"{what} is corrupt: {e}; {advice}") from e


def orbax_cause(e: BaseException) -> str:
  """The innermost cause's first line (tensorstore names the file there), without the
  TensorStore spec dumps orbax appends."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
  return f"{type(e).__name__}: {text[:300]}"


def restore_items(manager: Manager, step: int, targets: dict[str, Any], *,
                  data: bool = False) -> dict[str, Any]:
  """Restores items {name: abstract tree} onto the shardings their leaves carry (empty trees
  come back as given: nothing was saved); with `data`, also the iterator's state.

  The files of the items restored (not the others: an evaluation reads no optimizer state)
  are checked against the step's checksums first.
  """
  args = {name: ocp.args.StandardRestore(tree) for name, tree in targets.items()
          if _nonempty(tree)}
  if data:
    args["data"] = ocp.args.JsonRestore()
  step_dir = os.path.join(str(manager.directory), str(step))
  others = [s for s in manager.all_steps() if s != step]
  have = f"--step N, have {sorted(others)}" if others else "there is none"
  advice = (f"restore another step ({have}) or delete {step_dir} (a resume then starts from "
            "the step before)")
  what = f"checkpoint step {step} ({step_dir})"
  # Top-level files (orbax's step metadata) and the folders of the items read.
  include = lambda rel: "/" not in rel or rel.split("/", 1)[0] in args  # noqa: E731
  verified = verify_files(step_dir, what, advice, include)
  ignore_closed_event_loop()
  try:
    with sigint_deferred():
      restored = dict(manager.restore(step, args=ocp.args.Composite(**args)))
  except Exception as e:  # orbax raises many types; the user needs the path and the cause
    unchecked = "" if verified else "; it has no checksums: written before pkm-jax kept them"
    raise ValueError(f"{what} could not be restored (corrupt or from another model{unchecked})"
                     f": {orbax_cause(e)}; {advice}") from e
  if not verified:
    checksums.warn_unverified(step_dir)
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
  """`path` (local or gs://) holds the JSON whole, or what it had before."""
  storage.write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def read_json(path: str, what: str) -> Any:
  """A JSON file, or one line naming it when it is missing or unreadable."""
  if not storage.isfile(path):
    raise FileNotFoundError(f"{path} not found: {what}")
  try:
    with storage.open_file(path) as f:
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
  if not storage.isdir(checkpoint_dir(workdir)):
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


def restore_model(workdir: str, step: int | None = None, *, merge_lora: bool = True
                  ) -> tuple[nnx.Module, Any, int]:
  """A training workdir's model at `step` (default latest), its tokenizer and that step.

  The model is on one device (whatever mesh the run used), ready for eval mode; a LoRA run's
  adapters (finetune.method='lora') are merged into its weights: a plain model (merge_lora=False:
  the model with its adapters, as trained).
  """
  model_cfg = read_model_config(workdir)
  step = latest_step(workdir, step)
  config_path = os.path.join(workdir, "config.json")
  run_config = read_json(config_path, "the run's settings") if storage.isfile(config_path) else {}
  # The run split its frozen parameters off (finetune.method, optim.freeze_memory): its
  # checkpoint holds them as the 'frozen' item.
  freeze = freezing.run_frozen_filter(run_config)
  finetune = run_config.get("finetune", {})
  lora = finetune.get("method") == "lora"

  def make():
    model = build_lm(model_cfg, rngs=nnx.Rngs(0))
    if lora:  # the adapters as trained, merged into the base weights below
      lora_lib.add_lora(model, int(finetune["lora_rank"]), float(finetune["lora_alpha"]),
                        nnx.Rngs(0))
    return model

  model = nnx.eval_shape(make)
  graphdef, frozen, params, model_state = nnx.split(model, freeze, nnx.Param, nnx.BatchStat)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
  restored = restore_items(make_manager(workdir, read_only=True), step,
                           {"params": jax.tree.map(place, params),
                            "model_state": jax.tree.map(place, model_state),
                            "frozen": jax.tree.map(place, frozen)})
  model = nnx.merge(graphdef, restored["frozen"], restored["params"], restored["model_state"])
  if lora and merge_lora:
    lora_lib.merge_lora(model)
  tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer.json"))
  return model, tokenizer, step
