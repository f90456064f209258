#!/usr/bin/env bash
# One SLURM task = one kd_jax process driving one GPU. launch/slurm.sbatch runs it under srun:
#   launch/slurm_task.sh train --config configs/recipes/X.yaml [key=value ...]
# It checks the task's SLURM variables, sets the XLA/NCCL environment, then execs
# `python -m kd_jax.<module> ...`. kd_jax.core.distributed sees SLURM_NTASKS > 1 and calls
# jax.distributed.initialize(), which reads SLURM_* and gives task SLURM_LOCALID the GPU of that index.
# On CPU, with fake SLURM variables, it runs as is (tests/test_launch.py does, with --dry-run).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 <kd_jax module: train | precompute | evaluate | ...> [args ...]" >&2
  exit 2
fi
module="$1"
shift

for var in SLURM_JOB_ID SLURM_NTASKS SLURM_PROCID SLURM_LOCALID SLURM_STEP_NODELIST; do
  if [[ -z "${!var:-}" ]]; then
    echo "slurm_task: $var is not set; run this under srun (launch/slurm.sbatch), not on its own" >&2
    exit 2
  fi
done

# jax picks GPU number SLURM_LOCALID among the visible ones, so every GPU of the node must stay
# visible: a per-task binding (--gpus-per-task, --gpu-bind=single) would leave task 3 without GPU 3.
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
  if (( SLURM_LOCALID >= ${#visible[@]} )); then
    echo "slurm_task: task $SLURM_PROCID (local $SLURM_LOCALID) sees CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES;" \
         "request GPUs per node (--gpus-per-node) and srun --gpu-bind=none, as launch/slurm.sbatch does" >&2
    exit 2
  fi
fi

# XLA: overlap collectives (the fsdp all-gathers and reduce-scatters) with compute.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
# JAX preallocates this fraction of GPU memory; the rest is for cuDNN/NCCL workspaces. The recipes'
# mesh.device_memory_gib (71 on H100 80GB) is this fraction of the device.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
# Compiled programs persist across requeues: a restarted job skips most of its compile time.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/runs/jax_cache}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TOKENIZERS_PARALLELISM=false

echo "slurm_task: job $SLURM_JOB_ID task $SLURM_PROCID/$SLURM_NTASKS local $SLURM_LOCALID on $(hostname):" \
     "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-<all>} XLA_FLAGS=$XLA_FLAGS" \
     "XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION" >&2
exec "${KD_JAX_PYTHON:-python}" -m "kd_jax.$module" "$@"
