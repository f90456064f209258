"""Multi-process runs: `jax.distributed` start-up and barriers.

`maybe_initialize()` starts `jax.distributed` when the environment says this is one of several
processes (every entry point that runs on all hosts calls it first):

  - explicitly: KD_JAX_NUM_PROCESSES > 1, KD_JAX_COORDINATOR = host:port of process 0 and
    KD_JAX_PROCESS_ID (e.g. two local processes in the tests, or a hand-written launcher);
  - under SLURM (srun with more than one task) and on multi-host Cloud TPU slices (single or
    multislice): `jax.distributed.initialize()` without arguments, where jax reads the cluster's
    own environment (SLURM_* variables, the TPU VM's metadata / TPU_WORKER_HOSTNAMES / MEGASCALE_*).

KD_JAX_NUM_PROCESSES=1 switches the detection off. These are environment variables, not config
keys, because a launcher sets them per process (the process id differs; the config file is shared).
On CPU, processes exchange collectives over gloo.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from kd_jax.base.errors import KDJaxError

_TPU_HOSTS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")  # comma-separated hosts of the slice (jax reads them)


def init_args(env: Mapping[str, str]) -> dict | None:
    """The `jax.distributed.initialize` keyword arguments this environment asks for ({} = let jax
    detect the cluster), or None for a single process."""
    if "KD_JAX_NUM_PROCESSES" in env:
        n = int(env["KD_JAX_NUM_PROCESSES"])
        if n <= 1:
            return None
        missing = [k for k in ("KD_JAX_COORDINATOR", "KD_JAX_PROCESS_ID") if not env.get(k)]
        if missing:
            raise RuntimeError(f"KD_JAX_NUM_PROCESSES={n} but {' and '.join(missing)} is not set; set "
                               "KD_JAX_COORDINATOR=<host:port of process 0> and KD_JAX_PROCESS_ID=<0..n-1>")
        return {"coordinator_address": env["KD_JAX_COORDINATOR"], "num_processes": n,
                "process_id": int(env["KD_JAX_PROCESS_ID"])}
    # SLURM: only inside a job step (srun sets SLURM_STEP_NODELIST and SLURM_PROCID), not in the
    # batch script itself, which is one process even when the job has several tasks.
    if "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env and "SLURM_PROCID" in env:
        if int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1:
            return {}
    platforms = env.get("JAX_PLATFORMS", "")
    if not platforms or "tpu" in platforms:
        if env.get("MEGASCALE_COORDINATOR_ADDRESS") or any("," in env.get(k, "") for k in _TPU_HOSTS):
            return {}  # multislice, or a multi-host slice (GKE; TPU VMs set these for their workers)
        on_tpu_vm = os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")  # v2-v4 / v5e and later
        if on_tpu_vm and importlib.util.find_spec("libtpu") is not None:
            return {}  # a Cloud TPU VM: jax asks its metadata server (one host: a one-process run)
    return None


def maybe_initialize() -> None:
    """Initialize jax.distributed once when the environment asks for several processes (module doc)."""
    args = init_args(os.environ)
    if args is None or jax.distributed.is_initialized():
        return
    if "cpu" in os.environ.get("JAX_PLATFORMS", ""):  # (asking jax for its backend here would start it too early)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    jax.distributed.initialize(**args)


def barrier(name: str) -> None:
    """All processes wait here (a no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def on_process_0(fn: Callable[[], Any]) -> Any:
    """`fn()` on process 0 only (checks and writes one process does for all), then every process
    learns whether it succeeded: a KDJaxError there is raised on process 0 as it is and on the
    others as a pointer to it, so no process is left waiting in a collective. Returns fn's result
    on process 0, None elsewhere."""
    error, result = None, None
    if jax.process_index() == 0:
        try:
            result = fn()
        except KDJaxError as e:
            error = e
    if jax.process_count() > 1:
        failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if failed and error is None:
            raise KDJaxError("process 0 stopped the run; its output says why")
    if error is not None:
        raise error
    return result
