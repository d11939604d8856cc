"""XLA:TPU without a TPU, for tests: run a script in a child process that loads the libtpu
installed beside the environment (`.tpu/`, requirements-tpu.txt; CI installs it) and compiles for
a TPU topology ahead of time (`jax.experimental.topologies.get_topology_desc`), in the
environment pkm_jax/deviceless.py defines. The test process itself never loads libtpu: jax would
try to start a TPU backend in it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pkm_jax.deviceless import LIBTPU_MISSING, ROOT, libtpu_env, libtpu_path

requires_libtpu = pytest.mark.skipif(libtpu_path() is None, reason=LIBTPU_MISSING)


def run_json(script: str, timeout: float = 600) -> object:
  """Runs `script` (Python source) with XLA:TPU available; its last stdout line is JSON."""
  proc = subprocess.run([sys.executable, "-c", script], env=libtpu_env(), cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])
