"""Multi-process runs: `jax.distributed` start-up and barriers.

A run is multi-process when KD_JAX_NUM_PROCESSES > 1 (with KD_JAX_COORDINATOR = host:port and
KD_JAX_PROCESS_ID), e.g. two local processes in the tests. Auto-detection on TPU VMs and under
SLURM (`jax.distributed.initialize()` with no arguments) comes with the launch scripts.
"""

from __future__ import annotations

import os

import jax
from jax.experimental import multihost_utils


def maybe_initialize() -> None:
    """Initialize jax.distributed once when the environment asks for several processes."""
    n = int(os.environ.get("KD_JAX_NUM_PROCESSES", "1"))
    if n <= 1 or jax.distributed.is_initialized():
        return
    if "cpu" in os.environ.get("JAX_PLATFORMS", ""):  # (asking jax for its backend here would start it too early)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    jax.distributed.initialize(coordinator_address=os.environ["KD_JAX_COORDINATOR"], num_processes=n,
                               process_id=int(os.environ["KD_JAX_PROCESS_ID"]))


def barrier(name: str) -> None:
    """All processes wait here (a no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
