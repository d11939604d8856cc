"""XLA:TPU without a TPU, for tests: run a script in a child process that loads the libtpu
installed beside the environment (`.tpu/`, requirements-tpu.txt; CI installs it) and compiles for
a TPU topology ahead of time (`jax.experimental.topologies.get_topology_desc`). The test process
itself never loads libtpu: jax would try to start a TPU backend in it."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def libtpu_path() -> pathlib.Path | None:
  """libtpu.so from `.tpu/` (requirements-tpu.txt), else from $TPU_LIBRARY_PATH, else None."""
  for path in (ROOT / ".tpu" / "libtpu" / "libtpu.so", os.environ.get("TPU_LIBRARY_PATH")):
    if path and pathlib.Path(path).is_file():
      return pathlib.Path(path)
  return None


requires_libtpu = pytest.mark.skipif(
    libtpu_path() is None,
    reason="libtpu not installed: .venv/bin/pip install --no-deps --target .tpu "
           "-r requirements-tpu.txt")


def env() -> dict[str, str]:
  """The child's environment: libtpu found, no metadata-server queries, no host devices."""
  e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  e.update(TPU_LIBRARY_PATH=str(libtpu_path()), TPU_SKIP_MDS_QUERY="1",
           ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_PLATFORMS="", PYTHONPATH=str(ROOT))
  return e


def run_json(script: str, timeout: float = 600) -> object:
  """Runs `script` (Python source) with XLA:TPU available; its last stdout line is JSON."""
  proc = subprocess.run([sys.executable, "-c", script], env=env(), cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])
