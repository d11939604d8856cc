"""Multi-process start-up: jax.distributed with explicit flags or the cluster's environment."""

from __future__ import annotations

import jax


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, *, auto: bool = False) -> None:
  """No-op for one process; otherwise joins the job before any device is touched."""
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError("multi-host needs all of --coordinator_address, --num_processes and "
                       "--process_id (or --multihost to read them from the cluster)")
    # CPU collectives across processes need gloo; GPU/TPU ignore this setting. (Asking for the
    # backend here would initialise it too early: distributed.initialize must come first.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif auto:
    jax.distributed.initialize()
