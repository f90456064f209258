"""Multi-process runs: `jax.distributed` start-up from the environment, data streams that give the
same global batches on any process count, and two local processes (4 CPU devices each) that
train, die by SIGKILL together, resume, and log the losses of one process with 8 devices."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tiny_kd
from flax import nnx

from kd_jax.base.loader import load_config
from kd_jax.core.distributed import init_args
from kd_jax.core.runs import load_run_config, restore_student
from kd_jax.data.pipeline import make_train_iter
from kd_jax.data.store import KDStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 16  # checkpoints every 4 steps: the kill lands after step 4's, well before the end


def test_init_args_from_the_environment():
    assert init_args({}) is None
    assert init_args({"KD_JAX_NUM_PROCESSES": "2", "KD_JAX_COORDINATOR": "h0:1234", "KD_JAX_PROCESS_ID": "1"}) == {
        "coordinator_address": "h0:1234", "num_processes": 2, "process_id": 1}
    with pytest.raises(RuntimeError, match="KD_JAX_PROCESS_ID"):
        init_args({"KD_JAX_NUM_PROCESSES": "2", "KD_JAX_COORDINATOR": "h0:1234"})
    srun = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}
    assert init_args(srun) == {}  # jax reads SLURM's variables itself
    assert init_args({**srun, "SLURM_NTASKS": "1"}) is None
    assert init_args({k: v for k, v in srun.items() if k != "SLURM_STEP_NODELIST"}) is None  # the batch script
    assert init_args({**srun, "KD_JAX_NUM_PROCESSES": "1"}) is None  # switched off explicitly
    assert init_args({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == {}
    assert init_args({"TPU_WORKER_HOSTNAMES": "t0,t1", "JAX_PLATFORMS": "cpu"}) is None
    assert init_args({"MEGASCALE_COORDINATOR_ADDRESS": "t0:8080", "JAX_PLATFORMS": "tpu"}) == {}


def _train_args(root, name, **extra) -> list[str]:
    return tiny_kd.train_args(root, name, STEPS, **{"data.streams": 2, **extra})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("multiprocess"))
    tiny_kd.build_store(root)
    return root


def test_streams_give_the_same_batches_on_any_process_count(root):
    cfg = load_config(None, _train_args(root, "streams"))
    idx = np.arange(len(KDStore.open(cfg.data.store)))
    one = make_train_iter(KDStore.open(cfg.data.store), idx, cfg.data, global_batch_size=8, seed=0)
    two = [make_train_iter(KDStore.open(cfg.data.store), idx, cfg.data, global_batch_size=8, seed=0, process_index=p,
                           process_count=2) for p in range(2)]
    for _ in range(3):
        batch, halves = next(one), [next(it) for it in two]
        assert batch["inputs"].shape == (8, 128) and halves[0]["inputs"].shape == (4, 128)
        for k in batch:
            np.testing.assert_array_equal(batch[k], np.concatenate([h[k] for h in halves]), err_msg=k)
    # the two-stream iterator of one process resumes from its saved position
    again = make_train_iter(KDStore.open(cfg.data.store), idx, cfg.data, global_batch_size=8, seed=0)
    again.set_state(json.loads(json.dumps(one.get_state())))
    want, got = next(one), next(again)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _cli(args, devices: int, env_extra=None) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "kd_jax.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _two_processes(root) -> list[subprocess.Popen]:
    """Processes 0 and 1 of one run; their run directories differ (the checkpoints are shared) to
    show which one writes the logs and the config."""
    port = _free_port()
    return [_cli(_train_args(root, "two", **{"run.output_dir": f"{root}/runs" if p == 0 else f"{root}/runs_p1",
                                             "run.tensorboard": "true",
                                             "checkpoint.dir": f"{root}/runs/two/checkpoints"}),
                 devices=4, env_extra={"KD_JAX_COORDINATOR": f"localhost:{port}", "KD_JAX_NUM_PROCESSES": "2",
                                       "KD_JAX_PROCESS_ID": str(p)})
            for p in range(2)]


def _finish(procs) -> list[str]:
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(o[-3000:] for o in outs)
    return outs


def _rows(root, name) -> list[dict]:
    with open(f"{root}/runs/{name}/metrics.jsonl") as f:
        return [row for line in f if (row := json.loads(line))["split"] == "train"]


@pytest.mark.slow
def test_two_processes_killed_and_resumed_match_one_process(root):
    _finish([_cli(_train_args(root, "one"), devices=8)])  # one process, 8 devices, the same two streams
    procs = _two_processes(root)
    ckpts = f"{root}/runs/two/checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts)):
            break
        time.sleep(0.05)
    assert all(p.poll() is None for p in procs), "a process ended before the kill:\n" + "\n".join(
        p.communicate()[0].decode()[-3000:] for p in procs)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
    killed_at = len(_rows(root, "two"))
    resumed_at = max(int(d) for d in os.listdir(ckpts) if d.isdigit())  # the newest checkpoint when both died
    assert 4 <= resumed_at <= killed_at < STEPS and resumed_at % 4 == 0
    outs = _finish(_two_processes(root))
    assert f"resumed from step {resumed_at}" in outs[0]

    # rows the killed run logged after its checkpoint are dropped on resume: each step once, one writer
    steps = [row["step"] for row in _rows(root, "two")]
    assert steps == list(range(1, STEPS + 1))
    one = {row["step"]: row["loss"] for row in _rows(root, "one")}
    two = {row["step"]: row["loss"] for row in _rows(root, "two")}  # after the kill, the resumed run's
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    diff = max(abs(one[s] - two[s]) for s in one)
    print(f"max |loss(1 process) - loss(2 processes)| = {diff:.3g} over {STEPS} steps (resumed at {resumed_at})")
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-5)
    assert one[STEPS] < one[1] - 0.3  # it learned: the comparison is not between two idle runs
    # process 0 wrote the config, metrics and TensorBoard; process 1 none of them
    assert {"config.yaml", "metrics.jsonl", "tb"} <= set(os.listdir(f"{root}/runs/two"))
    p1_dir = f"{root}/runs_p1/two"
    assert not os.path.exists(p1_dir) or not {"config.yaml", "metrics.jsonl", "tb"} & set(os.listdir(p1_dir))
    # each process saved its own data position in every checkpoint
    last = f"{ckpts}/{STEPS}/data"
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(last))
    # export reads the two-process checkpoint in one process: the one-process run's weights
    (a, step_a), (b, step_b) = (restore_student(load_run_config(f"{root}/runs/{name}")) for name in ("one", "two"))
    assert step_a == step_b == STEPS
    leaves_a, leaves_b = jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param))
    print("max |param difference| =", max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
                                          for x, y in zip(leaves_a, leaves_b)))
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-5)
