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
