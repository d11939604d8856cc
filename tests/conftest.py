"""Test session setup: 8 virtual CPU devices (sharding tests), float32 matmuls, repo on sys.path."""

import os

# Must happen before jax is imported anywhere: XLA reads the flags once. The suite is bound by
# compiling many tiny programs, not by running them: LLVM's optimisation passes are skipped
# (about half the compile time), as they change speed, not what the programs compute.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from pkm_jax import host_memory  # noqa: E402

# Processes the tests start (the commands they run, xdist's workers) begin with huge pages for
# XLA's host buffers, as a user's commands do with PKM_JAX_HUGE_PAGES=1 (pkm_jax/host_memory.py:
# fewer page faults, the same results: a faster suite); this process cannot, glibc reads it at
# start-up. Only the tunable is passed on: the commands are not asked to re-execute.
_huge = host_memory.huge_pages_env({**os.environ, host_memory.OPT_IN: "1"})
if _huge is not None:
  os.environ[host_memory.ENV] = _huge[host_memory.ENV]
