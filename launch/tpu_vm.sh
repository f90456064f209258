#!/usr/bin/env bash
# kd_jax on a Cloud TPU VM slice: create (or reuse) the slice, copy this checkout to every worker,
# install, and run one command on all workers at once, re-creating the slice and running the same
# command again after a (spot) preemption; kd_jax.train resumes from its newest checkpoint.
#   launch/tpu_vm.sh run python -m kd_jax.train --config configs/recipes/X_v5e32.yaml   # all of it
#   launch/tpu_vm.sh create | setup | ssh <command> | status | delete                   # the steps
# Settings, from the environment:
TPU_NAME="${TPU_NAME:-kd-jax}"                           # slice name
ZONE="${ZONE:-us-west4-a}"                               # a zone with the accelerator type
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-32}"     # v5e-32: 8 workers x 4 chips
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}" # TPU VM image for v5e
SPOT="${SPOT:-1}"                                        # 1: spot capacity (cheap, preemptible)
MAX_RESTARTS="${MAX_RESTARTS:-50}"                       # re-creations after preemptions before giving up
REMOTE_DIR="${REMOTE_DIR:-kd_jax}"                       # checkout folder in each worker's home
LOG_DIR="${LOG_DIR:-runs/tpu_logs}"                      # local copy of every worker's output
# PROJECT: gcloud project (default: gcloud's configured one). Stores, runs and checkpoints must be
# on gs:// (see the recipes): a re-created slice has empty disks.
set -euo pipefail
cd "$(dirname "$0")/.."

tpu() {
  gcloud compute tpus tpu-vm "$@" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"}
}

state() {  # READY, CREATING, PREEMPTED, ... or MISSING
  tpu describe "$TPU_NAME" --format='value(state)' 2>/dev/null || echo MISSING
}

create() {
  local now
  now="$(state)"
  case "$now" in
    READY) echo "tpu_vm: reusing $TPU_NAME ($ACCELERATOR_TYPE)"; return ;;
    MISSING) ;;
    CREATING|STARTING|RESTARTING) echo "tpu_vm: $TPU_NAME is $now; waiting"; sleep 60; create; return ;;
    *) echo "tpu_vm: $TPU_NAME is $now (preempted?): deleting and re-creating"; tpu delete "$TPU_NAME" --quiet ;;
  esac
  local args=(--accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  if [[ "$SPOT" == 1 ]]; then
    args+=(--spot)
  fi
  tpu create "$TPU_NAME" "${args[@]}"
}

on_all() {  # one shell command on every worker at once; their output streams here and into LOG_DIR
  mkdir -p "$LOG_DIR"
  tpu ssh "$TPU_NAME" --worker=all --command="$1" 2>&1 | tee -a "$LOG_DIR/$TPU_NAME.log"
  return "${PIPESTATUS[0]}"
}

setup() {  # this checkout (tracked and untracked files, no .git/.venv/runs) -> every worker, installed
  local archive
  archive="$(mktemp -d)/kd_jax_src.tar.gz"
  tar --exclude=./.git --exclude=./.venv --exclude=./runs --exclude=./.cache -czf "$archive" .
  tpu scp "$archive" "$TPU_NAME":kd_jax_src.tar.gz --worker=all
  on_all "set -e; mkdir -p $REMOTE_DIR && tar -xzf kd_jax_src.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR \
    && python3 -m venv .venv && .venv/bin/pip install -q -U pip \
    && .venv/bin/pip install -q -e . 'jax[tpu]' && touch .venv/kd_jax_ready"
}

installed() {
  tpu ssh "$TPU_NAME" --worker=all --command="test -f $REMOTE_DIR/.venv/kd_jax_ready" >/dev/null 2>&1
}

run_all() {  # the command on every worker, from the checkout, with the venv's python first on PATH
  local cmd
  printf -v cmd '%q ' "$@"
  on_all "cd $REMOTE_DIR && export PATH=\$PWD/.venv/bin:\$PATH TOKENIZERS_PARALLELISM=false && $cmd"
}

run() {  # create/setup as needed, run; after a preemption re-create and run the same command again
  local attempt
  for ((attempt = 0; attempt <= MAX_RESTARTS; attempt++)); do
    create
    installed || setup
    if run_all "$@"; then
      echo "tpu_vm: finished: $*"
      return 0
    fi
    if [[ "$(state)" == READY ]]; then
      echo "tpu_vm: the command failed on a healthy slice (not a preemption); see $LOG_DIR/$TPU_NAME.log" >&2
      return 1
    fi
    echo "tpu_vm: $TPU_NAME is $(state): preempted; restart $((attempt + 1)) of $MAX_RESTARTS"
  done
  echo "tpu_vm: gave up after $MAX_RESTARTS restarts" >&2
  return 1
}

case "${1:-}" in
  create) create ;;
  setup) create; setup ;;
  run) shift; run "$@" ;;
  ssh) shift; on_all "cd $REMOTE_DIR && export PATH=\$PWD/.venv/bin:\$PATH && $*" ;;
  status) state ;;
  delete) tpu delete "$TPU_NAME" --quiet ;;
  *) echo "usage: $0 create | setup | run <command ...> | ssh '<shell command>' | status | delete" >&2; exit 2 ;;
esac
