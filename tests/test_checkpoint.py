"""kd_jax.core.checkpoint: one Orbax step with state, data position and extras; restore onto another
mesh; a save killed half-way leaves the previous step intact; SIGTERM saves the current step, the
same step on every process.

The two subprocess tests run this file as a script (`python tests/test_checkpoint.py MODE DIR`),
so the child's code sits beside the test that reads its result.
"""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from kd_jax.base.schema import CheckpointConfig
from kd_jax.base.sharding import make_mesh, state_shardings
from kd_jax.core import distributed
from kd_jax.core.checkpoint import Checkpointer, Preemption
from kd_jax.models.decoder import DecoderConfig, init_decoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = DecoderConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                     num_kv_heads=4, head_dim=8)


def _abstract(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def _batches(n: int = 100):
    return iter(grain.MapDataset.range(n).shuffle(seed=0).to_iter_dataset().batch(4))


def _small(value: float, sharding=None):
    state = {"w": np.full((8,), value, np.float32), "step": np.int32(value)}
    return jax.device_put(state, sharding)


def _small_abstract():
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _small(0))


def test_restore_onto_another_mesh(tmp_path):
    model = init_decoder(TINY, seed=0, mesh=make_mesh(8, 1, 1))
    params = nnx.state(model, nnx.Param)  # an nnx.State goes to Orbax as is: it is a pytree
    state = {"params": params, "opt": optax.adamw(1e-3).init(params), "step": jnp.int32(7),
             "rng": jax.random.key_data(jax.random.key(3))}
    with Checkpointer(str(tmp_path), CheckpointConfig(async_save=False)) as ckpt:
        assert ckpt.save(7, state, extra={"tokens": 123}, force=True)

    target = state_shardings(state, make_mesh(2, 4, 1))
    abstract = _abstract(state, target)
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(target))  # really resharded
    with Checkpointer(str(tmp_path), CheckpointConfig()) as ckpt:
        restored, extra = ckpt.restore(None, abstract)
    assert extra == {"tokens": 123}
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for got, want, spec in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(abstract)):
        assert got.sharding == spec.sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_data_position_round_trips_with_async_save(tmp_path):
    it = _batches()
    for _ in range(5):
        next(it)
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(every_steps=5, async_save=True))
    state = _small(5)
    assert ckpt.save(5, state, it, extra={"seen": 20})
    # The arrays are off the devices once save returns: a donating train step may free them now.
    jax.tree.map(lambda x: x.delete(), state)
    expected = [next(it) for _ in range(3)]  # training goes on while the write finishes
    ckpt.wait()

    fresh = _batches()
    restored, extra = ckpt.restore(5, _small_abstract(), fresh)
    assert extra == {"seen": 20} and int(restored["step"]) == 5
    np.testing.assert_array_equal(restored["w"], np.full((8,), 5.0))
    for want in expected:
        np.testing.assert_array_equal(next(fresh), want)
    ckpt.restore(5, _small_abstract(), it)  # in place, on the iterator that has moved on
    np.testing.assert_array_equal(next(it), expected[0])
    assert sorted(os.listdir(tmp_path / "5")) == sorted(["_CHECKPOINT_METADATA", "commit_success.txt",
                                                         "state", "data", "extra"])
    ckpt.close()


def test_interval_and_max_to_keep(tmp_path):
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(every_steps=2, max_to_keep=2, async_save=True))
    saved = [step for step in range(1, 8) if ckpt.save(step, _small(step))]
    assert saved == [2, 4, 6]  # step 1 too is skipped: the interval alone decides
    assert ckpt.save(7, _small(7), force=True)
    assert not ckpt.save(7, _small(7), force=True)  # already there (periodic then preemption save)
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7] and ckpt.latest_step() == 7
    assert sorted(os.listdir(tmp_path)) == ["6", "7"]
    state, _ = ckpt.restore(None, _small_abstract())
    assert int(state["step"]) == 7
    ckpt.close()


def test_errors_name_the_fix(tmp_path):
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(async_save=False))
    with pytest.raises(FileNotFoundError, match=r"(?s)no finalized checkpoint in .*checkpoint\.resume=false"):
        ckpt.restore(None, _small_abstract())
    ckpt.save(3, _small(3), force=True)
    with pytest.raises(FileNotFoundError, match=r"step 4 .*available steps: \[3\]"):
        ckpt.restore(4, _small_abstract())
    with pytest.raises(ValueError, match="saved without data_iter"):
        ckpt.restore(3, _small_abstract(), _batches())
    ckpt.close()


def test_killed_save_keeps_the_previous_checkpoint(tmp_path):
    proc = _child("killed_mid_save", tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, out.decode()[-3000:]
    # Killed half-way: step 2 is only a temporary folder, and its state item is not complete either.
    assert not os.path.exists(tmp_path / "2"), os.listdir(tmp_path)
    assert glob.glob(str(tmp_path / "2.orbax-checkpoint-tmp*" / "state.orbax-checkpoint-tmp*")), os.listdir(tmp_path)

    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(async_save=False))
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    state, extra = ckpt.restore(None, _small_abstract())
    np.testing.assert_array_equal(state["w"], np.full((8,), 1.0))
    assert extra == {"step": 1}
    assert ckpt.save(2, _small(2), force=True)  # the resumed run can save that step again,
    assert not glob.glob(str(tmp_path / "*orbax-checkpoint-tmp*"))  # and the left-over is gone by then
    assert ckpt.all_steps() == [1, 2]
    ckpt.close()


def test_preemption_handler_restores_the_previous_one():
    def previous(signum, frame):
        pass

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with Preemption() as preemption:
            assert not preemption.requested(0)
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.time() + 5
            while not preemption.requested(1) and time.time() < deadline:
                time.sleep(0.01)  # the Python handler runs between bytecodes of the main thread
            assert preemption.requested(1)
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)


def test_sigterm_saves_the_current_step_and_exits_0(tmp_path):
    proc = _child("preempted", tmp_path)
    line = proc.stdout.readline().decode()
    assert line.startswith("running"), line + proc.communicate(timeout=60)[0].decode()[-3000:]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    out = out.decode()
    assert proc.returncode == 0, out[-3000:]
    step = int(out.split("saved at step ")[1].split()[0])
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig())
    assert ckpt.latest_step() == step > 1
    state, extra = ckpt.restore(None, _small_abstract(), it := _batches(10_000))
    assert int(state["step"]) == step and extra == {"step": step}
    np.testing.assert_array_equal(next(it), next(_skip(_batches(10_000), step)))  # data position saved too
    ckpt.close()


def test_two_processes_agree_on_the_preemption_step(tmp_path):
    """Only process 1 gets SIGTERM; JAX's preemption sync point makes both save the same step."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [_child("preempted", tmp_path, KD_JAX_COORDINATOR=f"localhost:{port}", KD_JAX_NUM_PROCESSES="2",
                    KD_JAX_PROCESS_ID=str(p)) for p in range(2)]
    head = b""
    while b"running" not in head and procs[1].poll() is None:
        head += procs[1].stdout.readline()
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=60)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], head.decode() + "\n".join(o[-2000:] for o in outs)
    steps = {int(out.split("saved at step ")[1].split()[0]) for out in outs}
    assert len(steps) == 1, outs
    (step,) = steps
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig())
    assert ckpt.latest_step() == step
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(tmp_path / str(step) / "data"))
    state, extra = ckpt.restore(None, _small_abstract())  # one process now: state and extra, not data
    assert int(state["step"]) == step and extra == {"step": step}
    ckpt.close()


def _skip(it, n):
    for _ in range(n):
        next(it)
    return it


# ------------------------------------------------------------------ subprocess children


def _child(mode: str, directory, **env_extra) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT, **env_extra)
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), mode, str(directory)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _child_killed_mid_save(directory: str) -> None:
    """Saves step 1, then dies by SIGKILL while step 2's 64 MB array is being written."""
    ckpt = Checkpointer(directory, CheckpointConfig(async_save=False))
    ckpt.save(1, _small(1), extra={"step": 1}, force=True)
    big = jax.device_put(np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32))

    def kill_once_writing():  # once 8 of the 64 MB are on disk: the array is half-way, not done
        while _bytes_under(glob.glob(os.path.join(directory, "2.orbax-checkpoint-tmp*"))) < 8 << 20:
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=kill_once_writing, daemon=True).start()
    ckpt.save(2, {"w": big}, extra={"step": 2}, force=True)
    time.sleep(30)  # the kill lands here at the latest; the parent then sees a finalized step 2 and fails


def _bytes_under(paths) -> int:
    sizes = 0
    for path in paths:
        for folder, _, files in os.walk(path):
            sizes += sum(os.path.getsize(os.path.join(folder, f)) for f in files
                         if os.path.exists(os.path.join(folder, f)))  # a file may be renamed meanwhile
    return sizes


def _child_preempted(directory: str) -> None:
    """A train loop in miniature: one step per 10 ms until SIGTERM, then save that step and exit 0.
    With KD_JAX_NUM_PROCESSES=2 in the environment, one of two processes."""
    distributed.maybe_initialize()
    replicated = NamedSharding(make_mesh(-1, 1, 1), PartitionSpec())  # global arrays across processes
    ckpt = Checkpointer(directory, CheckpointConfig(every_steps=1000, async_save=True))
    it = _batches(10_000)
    with Preemption() as preemption:
        step = 0
        while True:
            step += 1
            next(it)
            state = _small(step, replicated)
            if preemption.requested(step):
                ckpt.save(step, state, it, extra={"step": step}, force=True)
                ckpt.close()
                print(f"saved at step {step}", flush=True)
                sys.exit(0)
            ckpt.save(step, state, it)
            if step == 2:
                print("running", flush=True)
            time.sleep(0.01)


if __name__ == "__main__":
    {"killed_mid_save": _child_killed_mid_save, "preempted": _child_preempted}[sys.argv[1]](sys.argv[2])


def test_close_waits_for_the_clean_up_it_started(tmp_path, monkeypatch):
    """The manager clears killed saves' left-overs in a thread it starts when it opens; a run that fails
    at once closed it and exited under that thread (Python printed an orbax traceback at shutdown).
    A slow clean-up shows the race: close returns only once it is done."""
    from orbax.checkpoint._src.path import temporary_paths
    real, finished = temporary_paths.cleanup_temporary_paths, []

    async def slow(*args, **kwargs):
        import asyncio
        await asyncio.sleep(0.5)
        await real(*args, **kwargs)
        finished.append(True)
    monkeypatch.setattr(temporary_paths, "cleanup_temporary_paths", slow)
    Checkpointer(str(tmp_path / "ckpt"), CheckpointConfig()).close()
    assert finished == [True]
