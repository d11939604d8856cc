"""Reading a local Hugging Face model folder: config.json and the weights (model.safetensors, a
sharded model.safetensors.index.json, or pytorch_model.bin when torch is installed), as numpy.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, load_file

from pkm_jax import cli
from pkm_jax import storage

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def is_hf_folder(path: str) -> bool:
  """A folder with config.json and HF weights (and no pkm-jax files of its own)."""
  return (storage.isfile(os.path.join(path, "config.json"))
          and any(storage.isfile(os.path.join(path, f)) for f in WEIGHT_FILES))


def read_hf_config(hf_dir: str) -> dict[str, Any]:
  path = os.path.join(hf_dir, "config.json")
  if not storage.isfile(path):
    raise FileNotFoundError(f"{path} not found: {hf_dir} is not a Hugging Face model folder")
  try:
    with storage.open_file(path) as f:
      cfg = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(cfg, dict):
    raise ValueError(f"{path} does not hold a JSON object")
  return cfg


def _widen(x: np.ndarray) -> np.ndarray:
  """float16 / bfloat16 (an ml_dtypes type numpy does not call floating) -> float32."""
  if np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16":
    return np.asarray(x, np.float32)
  return x


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  # numpy reads bfloat16 here because importing jax registers ml_dtypes' bfloat16.
  try:
    if storage.is_remote(path):  # safetensors maps local files; a bucket's is read whole
      return {k: _widen(v) for k, v in load(storage.read_bytes(path)).items()}
    return {k: _widen(v) for k, v in load_file(path).items()}
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise ValueError(f"{path} is not a readable safetensors file: {cli.one_line(e)}") from e


def _load_torch_bin(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f"{path} is a torch pickle and torch is not installed: install torch or "
                     f"save the model as model.safetensors") from e
  try:
    with storage.open_file(path, "rb") as f:
      state = torch.load(f, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for a corrupt pickle
    raise ValueError(f"{path} could not be loaded by torch: {cli.one_line(e)}") from e
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}


def load_hf_tensors(hf_dir: str) -> dict[str, np.ndarray]:
  """All tensors of the folder's weights (safetensors preferred), by their HF names."""
  single = os.path.join(hf_dir, "model.safetensors")
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if storage.isfile(single):
    return _load_safetensors(single)
  if storage.isfile(index):
    try:
      with storage.open_file(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"{index} has no valid 'weight_map': {cli.one_line(e)}") from e
    tensors = {}
    for shard in shards:
      tensors.update(_load_safetensors(os.path.join(hf_dir, shard)))
    return tensors
  binary = os.path.join(hf_dir, "pytorch_model.bin")
  if storage.isfile(binary):
    return _load_torch_bin(binary)
  raise FileNotFoundError(f"no weights in {hf_dir}: expected one of {', '.join(WEIGHT_FILES)}")


class TensorReader:
  """Takes HF tensors by name, checking shape and dtype; remembers which were used (a
  conversion then refuses a checkpoint with tensors it did not read)."""

  def __init__(self, tensors: dict[str, np.ndarray], arch: str):
    self.tensors, self.arch, self.used = tensors, arch, set()

  def take(self, names: str | tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
    """The first of `names` present (alternative spellings), as float32 of `shape`."""
    names = (names,) if isinstance(names, str) else names
    name = next((n for n in names if n in self.tensors), None)
    if name is None:
      raise ValueError(f"missing tensor '{names[0]}' ({self.arch})")
    x = self.tensors[name]
    if tuple(x.shape) != tuple(shape):
      raise ValueError(f"tensor '{name}' has shape {tuple(x.shape)} but config.json implies "
                       f"{tuple(shape)}")
    if not np.issubdtype(x.dtype, np.floating):
      raise ValueError(f"tensor '{name}' has dtype {x.dtype}, expected floating point")
    self.used.add(name)
    return np.asarray(x, np.float32)
