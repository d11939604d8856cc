"""Compiling train.py's program for devices this machine does not have: a config's train step
and eval forward, compiled ahead of time from abstract shapes (nothing allocated), and what each
device of the target would do (`compiled_stats`). benchmarks/pod_plan.py builds its tables on
this; tests/xla_tpu.py takes its XLA:TPU environment from here.

Targets (a name, and the devices it lists):
  - TPU topologies ('v5e:2x4', 'v4:2x2x2', 'v5p:4x4x4', ...) by XLA:TPU itself: libtpu from
    `.tpu/` (requirements-tpu.txt) or $TPU_LIBRARY_PATH, deviceless ahead-of-time compilation
    (`jax.experimental.topologies`). libtpu's v4 topologies list TensorCores (2 per chip, no
    megacore): there a 'device' is half a chip.
  - 'h100:N': N H100s by XLA:GPU, without a GPU: jax's CUDA plugin (`.venv/bin/pip install
    --no-deps --target .cuda jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2`, no CUDA
    libraries) given an H100 target description (H100_TARGET_CONFIG) compiles, and cannot run.
    XLA:GPU gives no cost analysis then: FLOPs and bytes accessed are None; collectives, peak
    memory, loops, sorts and conditionals are XLA:GPU's.
  - 'cpu': host CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`), XLA:CPU's
    partitioning of the same program (no plugin needed).

A process loads one such backend for good, so each target compiles in a child process started
with `child_env(target, n)`: `run_children` runs a script's `--child SPEC` mode per target.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import topologies

from pkm_jax import compiled_stats, trainer
from pkm_jax.models.tables import row_tables, state_at
from pkm_jax.data.causal import CLM_BATCH_KEYS
from pkm_jax.steps import MLM_BATCH_KEYS

ROOT = pathlib.Path(__file__).resolve().parents[1]  # the checkout: .tpu/ and .cuda/ sit here

LIBTPU_MISSING = ("libtpu not installed: .venv/bin/pip install --no-deps --target .tpu "
                  "-r requirements-tpu.txt")
CUDA_MISSING = ("jax's CUDA plugin not installed: .venv/bin/pip install --no-deps --target "
                ".cuda jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2")

# XLA:GPU's description of an H100 SXM (NVIDIA's figures: 132 SMs at 1.98 GHz, 80 GB HBM3 at
# 3.35 TB/s, 50 MB L2, 228 KiB shared memory per SM), the fields jaxlib 0.10.2 reads: with it,
# jax's CUDA plugin compiles for N H100s on a machine without a GPU or CUDA libraries.
H100_TARGET_CONFIG = """gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84942979072 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA" dnn_version_info { major: 9 minor: 1 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def family(target: str) -> str:
  """'v5e:2x4' -> 'v5e'; 'h100:8' -> 'h100'; 'cpu' -> 'cpu'."""
  return target.split(":")[0]


# ---------------------------------------------------------------------------------------------
# The environments a target's child process runs in
# ---------------------------------------------------------------------------------------------


def libtpu_path() -> pathlib.Path | None:
  """libtpu.so from `.tpu/` (requirements-tpu.txt), else from $TPU_LIBRARY_PATH, else None."""
  for path in (ROOT / ".tpu" / "libtpu" / "libtpu.so", os.environ.get("TPU_LIBRARY_PATH")):
    if path and pathlib.Path(path).is_file():
      return pathlib.Path(path)
  return None


def libtpu_env() -> dict[str, str] | None:
  """An environment with XLA:TPU and no TPU (libtpu_path; no metadata-server queries, no host
  devices), or None without libtpu."""
  path = libtpu_path()
  if path is None:
    return None
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(TPU_LIBRARY_PATH=str(path), TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
             JAX_PLATFORMS="", PYTHONPATH=str(ROOT))
  return env


def cuda_env() -> dict[str, str] | None:
  """An environment with jax's CUDA plugin (installed into `.cuda/`, or in
  $PKM_JAX_CUDA_PLUGINS) and no CUDA libraries: it compiles, it cannot run; or None."""
  for path in (ROOT / ".cuda", os.environ.get("PKM_JAX_CUDA_PLUGINS")):
    if path and (pathlib.Path(path) / "jax_plugins" / "xla_cuda12").is_dir():
      env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
      env.update(JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1", JAX_PLATFORMS="",
                 PYTHONPATH=f"{ROOT}{os.pathsep}{path}")
      return env
  return None


def host_env(devices: int) -> dict[str, str]:
  """An environment with `devices` host CPU devices; other XLA flags (e.g. a test suite's)
  pass on."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
          "XLA_FLAGS": " ".join(flags)}


def parse_target(text: str) -> tuple[str, int]:
  """'cpu:8' -> ('cpu', 8); 'h100:8' -> ('h100:8', 8); 'v5e:2x4' -> ('v5e:2x4', 8): a target
  and how many devices it lists (a topology: all of them). ValueError if malformed."""
  name, _, shape = text.partition(":")
  if name in ("cpu", "h100"):
    return (name if name == "cpu" else text, int(shape or 8))
  dims = [int(d) for d in shape.split("x")]
  # libtpu lists v4 TensorCores, two per chip; v5e and v5p one device per chip.
  return text, math.prod(dims) * (2 if name == "v4" else 1)


def child_env(target: str, devices: int) -> dict[str, str] | None:
  """The environment in which `target_devices(target)` lists the target's devices (`devices`:
  how many host devices a 'cpu' target needs); None where its plugin is not installed."""
  if target == "cpu":
    return host_env(devices)
  return cuda_env() if family(target) == "h100" else libtpu_env()


def missing(target: str) -> str:
  """What to install for `target` when child_env gives None."""
  return CUDA_MISSING if family(target) == "h100" else LIBTPU_MISSING


def target_devices(target: str) -> list:
  """The devices of `target`, in a process started with `child_env(target, ...)`."""
  if target == "cpu":
    return jax.devices("cpu")
  if family(target) == "h100":
    return topologies.get_topology_desc(
        platform="cuda", topology_name="", topology=f"1x1x{target.split(':')[1]}",
        target_config=H100_TARGET_CONFIG).devices
  return topologies.get_topology_desc(platform="tpu", topology_name=target).devices


# ---------------------------------------------------------------------------------------------
# Compiling a config's programs from abstract shapes
# ---------------------------------------------------------------------------------------------


def abstract_inputs(program: trainer.TrainProgram, config: ml_collections.ConfigDict
                    ) -> tuple[Any, dict[str, jax.ShapeDtypeStruct]]:
  """The train state and a batch [data.batch_size, data.max_len] (MLM, or next-token for a
  causal model) as sharded ShapeDtypeStructs (the step's own in-shardings): what `lower`
  takes, nothing allocated."""
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       program.abstract_state, program.state_sharding)
  b, t = config.data.batch_size, config.data.max_len
  keys = CLM_BATCH_KEYS if program.model_cfg.causal else MLM_BATCH_KEYS
  floats = ("mlm_weights", "target_weights")
  batch = {k: jax.ShapeDtypeStruct((b, t), jnp.float32 if k in floats else jnp.int32,
                                   sharding=program.batch_sharding)
           for k in keys}
  return state, batch


def table_bytes(program: trainer.TrainProgram) -> tuple[int, int]:
  """(bytes of every value table, the bytes of them one device holds) by the state's shardings."""
  paths = [path for path, _, _ in row_tables(program.model_cfg).values()]
  tables = [state_at(program.abstract_state.params, p).get_value() for p in paths]
  shards = [state_at(program.state_sharding.params, p).get_value() for p in paths]
  total = sum(a.size * a.dtype.itemsize for a in tables)
  per_device = sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
                   for a, s in zip(tables, shards))
  return total, per_device


def compile_programs(config: ml_collections.ConfigDict, devices: list,
                     programs: tuple[str, ...] = ("train", "infer")) -> dict[str, Any]:
  """Compiles a validated config's train step ('train') and eval forward ('infer':
  `trainer.jit_eval_step`, the encoder + MLM head that eval runs) on `devices`.

  Returns {'mesh', 'rules', 'table_bytes', 'table_bytes_per_device', 'tokens' (per step),
  'programs': {name: compiled_stats.program_stats + 'compile_s', or {'error'} where XLA
  refused it, e.g. a one-device program larger than a TPU chip's memory}}.
  """
  program = trainer.build_train_program(config, config.data.vocab_size, devices=devices)
  state, batch = abstract_inputs(program, config)
  total, per_device = table_bytes(program)
  out = dict(mesh=dict(program.mesh.shape), rules=[list(r) for r in config.mesh.rules],
             table_bytes=total, table_bytes_per_device=per_device,
             tokens=config.data.batch_size * config.data.max_len, programs={})
  for name in programs:
    start = time.perf_counter()
    with jax.set_mesh(program.mesh):
      if name == "train":
        lowered = program.train_step.lower(state, batch)
      else:
        lowered = trainer.jit_eval_step(program).lower(state.params, state.model_state,
                                                       state.frozen, batch)
      try:
        compiled = lowered.compile()
      except Exception as e:  # pylint: disable=broad-except
        out["programs"][name] = dict(error=f"{type(e).__name__}: {str(e)[:500]}")
        continue
    stats = compiled_stats.program_stats(compiled)
    stats["compile_s"] = time.perf_counter() - start
    out["programs"][name] = stats
  return out


# ---------------------------------------------------------------------------------------------
# One child process per target
# ---------------------------------------------------------------------------------------------


def run_children(script: str, rows: dict[tuple[str, int], list[dict]], jobs: int,
                 timeout_s: float) -> list[dict]:
  """Compiles each (target, devices) group of `rows` (JSON-able dicts) in child processes
  `python script --child SPEC`, `jobs` at a time, a target's rows split over up to `jobs`
  children. SPEC is a JSON file {'target', 'rows', 'out'}; the child writes to 'out' a JSON list
  of results, one per row in order, each holding its row under 'row', after every row.

  Returns every result; a row no child finished gets {'row': row, 'error': why} (no plugin,
  the child died, or it ran past `timeout_s`).
  """
  groups: dict[tuple[str, int, int], list[dict]] = {}
  for (target, n), some in rows.items():
    for i, r in enumerate(some):
      groups.setdefault((target, n, i % jobs), []).append(r)
  # TPU / GPU children first: their compilers are the slowest, the CPU children run beside them.
  keys = sorted(groups, key=lambda k: k[0] == "cpu")
  results, running = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for index, key in enumerate(keys):
      while len(running) >= jobs:
        running = _reap(running, results, timeout_s)
      (target, n, _), some = key, groups[key]
      env = child_env(target, n)
      if env is None:
        results += [dict(row=r, error=missing(target)) for r in some]
        continue
      out, spec = f"{tmp}/{index}.json", f"{tmp}/{index}.spec.json"
      pathlib.Path(spec).write_text(json.dumps(dict(target=target, rows=some, out=out)))
      # libtpu's start-up complaints (no metadata server, no worker names) go to a log.
      with open(f"{tmp}/{index}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, script, "--child", spec], env=env, cwd=ROOT,
                                stderr=log)
      running.append((proc, out, some, time.perf_counter()))
    while running:
      running = _reap(running, results, timeout_s)
  return results


def _reap(running: list, results: list, timeout_s: float) -> list:
  """Collects the children that ended (or kills those past `timeout_s`); the rest."""
  time.sleep(0.5)
  still = []
  for proc, out, rows, start in running:
    late = time.perf_counter() - start > timeout_s
    if proc.poll() is None and not late:
      still.append((proc, out, rows, start))
      continue
    if late:
      proc.kill()
      proc.wait()
    done = json.loads(pathlib.Path(out).read_text()) if os.path.exists(out) else []
    results += done
    log = pathlib.Path(out[:-len(".json")] + ".log")
    tail = log.read_text()[-1500:] if log.exists() else ""
    why = (f"child exited {proc.returncode}" + (f" (past {timeout_s:.0f} s)" if late else "")
           + (f": {tail}" if proc.returncode else ""))
    results += [dict(row=r, error=why) for r in rows[len(done):]]
  return still
