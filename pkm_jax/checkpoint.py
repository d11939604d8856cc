"""Orbax checkpoints of a training workdir, and restoring a model from one.

Layout of a workdir:
  DIR/config.json            the run's full ConfigDict (eval.py and resumes read it)
  DIR/model_config.json      the frozen ModelConfig (vocab size resolved)
  DIR/tokenizer.json         the tokenizer the run trained or loaded
  DIR/checkpoints/<step>/    items: params, model_state (BatchNorm statistics), opt_state, data
Orbax writes each step into a temporary folder and renames it when complete, so a run killed
during a save leaves the previous step as the latest restorable one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from pkm_jax import config as config_lib
from pkm_jax.bert import BertForMaskedLM

ITEMS = ("params", "model_state", "opt_state", "sparse_opt_state", "data")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, *, max_to_keep: int | None = None,
                 read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                         read_only=read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def _nonempty(tree) -> bool:
  return bool(jax.tree.leaves(tree))


def save(manager: ocp.CheckpointManager, step: int, *, params, model_state, opt_state,
         data_state: dict, sparse_opt_state=None) -> None:
  """Saves the train state's pytrees and the data iterator's JSON state at `step`."""
  trees = dict(params=params, model_state=model_state, opt_state=opt_state,
               sparse_opt_state=sparse_opt_state)
  # Orbax refuses empty items (no BatchNorm -> no model_state; dense values -> no sparse state).
  args = {name: ocp.args.StandardSave(tree) for name, tree in trees.items() if _nonempty(tree)}
  manager.save(step, args=ocp.args.Composite(data=ocp.args.JsonSave(data_state), **args))


def restore(manager: ocp.CheckpointManager, step: int, *, abstract_params, abstract_model_state,
            abstract_opt_state=None, abstract_sparse_opt_state=None) -> dict[str, Any]:
  """Restores the given pytrees onto the shardings carried by their abstract targets.

  With `abstract_opt_state` (resuming training) the data iterator's state comes back too.
  """
  trees = dict(params=abstract_params, model_state=abstract_model_state,
               opt_state=abstract_opt_state, sparse_opt_state=abstract_sparse_opt_state)
  args = {name: ocp.args.StandardRestore(tree) for name, tree in trees.items()
          if _nonempty(tree)}
  if abstract_opt_state is not None:
    args["data"] = ocp.args.JsonRestore()
  try:
    restored = dict(manager.restore(step, args=ocp.args.Composite(**args)))
  except Exception as e:  # orbax raises many types; the user needs the path and the cause
    where = os.path.join(str(manager.directory), str(step))
    raise ValueError(f"checkpoint {where} could not be restored: "
                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
  for name, tree in trees.items():
    restored.setdefault(name, tree)  # empty trees: nothing was saved
  return restored


def write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def read_model_config(workdir: str) -> config_lib.ModelConfig:
  path = os.path.join(workdir, "model_config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not a pkm-jax training workdir")
  with open(path) as f:
    return config_lib.from_dict(json.load(f))


def latest_step(workdir: str, step: int | None = None) -> int:
  """`step` if it exists, else the latest; a clear error when there is none."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    raise FileNotFoundError(f"no checkpoints in {workdir} ({checkpoint_dir(workdir)} missing)")
  manager = make_manager(workdir, read_only=True)
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir(workdir)}")
  if step is None:
    return max(steps)
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoint_dir(workdir)} "
                            f"(have {sorted(steps)})")
  return step


def restore_model(workdir: str, step: int | None = None):
  """A training workdir's model at `step` (default latest) and its tokenizer, in eval mode.

  Returns (BertForMaskedLM, tokenizers.Tokenizer); `latest_step` tells which step is used.
  """
  from pkm_jax.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top

  model_cfg = read_model_config(workdir)
  step = latest_step(workdir, step)
  # Whatever mesh the run used, here the table is read whole onto one device.
  model = nnx.eval_shape(lambda: BertForMaskedLM(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, params, model_state = nnx.split(model, nnx.Param, nnx.BatchStat)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  restored = restore(make_manager(workdir, read_only=True), step,
                     abstract_params=jax.tree.map(place, params),
                     abstract_model_state=jax.tree.map(place, model_state))
  model = nnx.merge(graphdef, restored["params"], restored["model_state"])
  tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer.json"))
  return model, tokenizer
