"""Checkpoints: one Orbax step holds everything needed to resume, and a SIGTERM saves one.

A step directory `<dir>/<step>/` holds three items, written together as one Orbax Composite:

    state/  the train-state pytree of jax.Arrays (kd_jax.core.state: params, optimizer state, the
            skipped-step count), sharded arrays written in parallel (StandardSave), restored
            onto any mesh, whole or only some of its subtrees (the parameters, for export)
    data/   the Grain iterator position, one JSON file per process (grain's CheckpointHandler)
    extra/  a small JSON dict of host-side values (the step)

Orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it only once every item is
complete (on gs:// it writes a commit_success.txt instead), and `latest_step()` lists finalized
steps only, so a save killed half-way never hides or corrupts the previous good checkpoint.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from grain import checkpoint as grain_checkpoint
from jax.experimental import multihost_utils

from kd_jax.base.errors import KDJaxError
from kd_jax.base.schema import CheckpointConfig

STATE, DATA, EXTRA = "state", "data", "extra"  # item names inside a step directory


class CheckpointError(KDJaxError, FileNotFoundError):
    """No checkpoint where one is needed, or one that cannot be written (disk full)."""


class Checkpointer:
    """Orbax CheckpointManager for the train loop: save every `cfg.every_steps`, keep the newest
    `cfg.max_to_keep`, write in the background when `cfg.async_save`."""

    def __init__(self, directory: str, cfg: CheckpointConfig):
        self.directory = str(directory)
        self._every_steps = cfg.every_steps
        # Which steps to save is decided in `save`, not by Orbax's interval policy, which also saves
        # the first step of a fresh run (InitialSavePolicy): an untrained step 1 is only disk churn.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.max_to_keep,
            enable_async_checkpointing=cfg.async_save,
            # Left-overs of a save that was killed: never listed as steps, but they hold disk space.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """Newest finalized step, or None when the directory holds none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def delete(self, step: int) -> None:
        """Removes step `step` from disk."""
        self._manager.delete(step)

    def save(self, step: int, state: Any, data_iter=None, *, extra: dict | None = None,
             force: bool = False) -> bool:
        """Saves `state` (a pytree of jax.Arrays), the position of `data_iter` (a Grain iterator)
        and the JSON-serializable `extra` as step `step`. Without `force` only steps that are a
        multiple of `every_steps` are saved. Returns whether a save started; with async saves the
        arrays are copied off the devices before this returns, so `state` may be donated next.

        A typed PRNG key must be stored as `jax.random.key_data(key)`: Orbax writes plain arrays.
        """
        if step in self._manager.all_steps():
            # A preemption save right after a periodic one at the same step: it is already there
            # (Orbax would raise StepAlreadyExistsError, and the loop only wants it on disk).
            return False
        if not force and step % self._every_steps:
            return False
        items = {STATE: ocp.args.StandardSave(state), EXTRA: ocp.args.JsonSave(dict(extra or {}))}
        if data_iter is not None:
            items[DATA] = grain_checkpoint.CheckpointSave(data_iter)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int | None, abstract_state: Any, data_iter=None, *,
                partial: bool = False) -> tuple[Any, dict]:
        """Restores step `step` (None: the latest) and returns `(state, extra)`.

        `abstract_state` is the state's pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`:
        each array lands directly on its target sharding, which may be a different mesh than the
        one it was saved from. `data_iter`, when given, is moved in place to the saved position.
        partial=True reads only the subtrees `abstract_state` names (e.g. {"params": ...}): the
        rest of the saved state is never read.
        """
        self._manager.wait_until_finished()  # a save of this process still in flight counts
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(
                    f"no finalized checkpoint in {self.directory!r} to resume from; point checkpoint.dir "
                    "at a run's checkpoints, or start fresh with checkpoint.resume=false")
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(
                f"no finalized checkpoint for step {step} in {self.directory!r}; "
                f"available steps: {steps or 'none'}")
        if partial:
            state_args = ocp.args.PyTreeRestore(
                abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
                partial_restore=True)
        else:
            state_args = ocp.args.StandardRestore(abstract_state)
        items = {STATE: state_args, EXTRA: ocp.args.JsonRestore()}
        if data_iter is not None:
            if not (self._manager.directory / str(step) / DATA).exists():
                raise ValueError(
                    f"checkpoint step {step} in {self.directory!r} holds no data-iterator position "
                    "(it was saved without data_iter); restore without data_iter to keep the data fresh")
            items[DATA] = grain_checkpoint.CheckpointRestore(data_iter)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE], dict(restored[EXTRA] or {})

    def wait(self) -> None:
        """Blocks until every started save is finalized on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for saves in flight and for the clean-up of killed saves' left-overs the manager
        starts when it opens (a run that fails at once would otherwise exit under that thread, and
        Python prints its traceback at shutdown), then releases the manager's threads."""
        self._manager.wait_until_finished()
        cleanup = getattr(self._manager, "_cleanup_tmp_directory_future", None)  # (orbax 0.12: not awaited by close)
        if cleanup is not None:
            cleanup.result()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Preemption:
    """SIGTERM (the scheduler's preemption notice) as a flag the train loop polls each step.

    The handler only sets a flag: saving from inside a signal handler could interleave with a
    jitted step or a save already in flight. The loop does, on `requested(step)`:
    `save(step, ..., force=True)`, `wait()`, exit 0.

    Several processes must all save the same step, or the checkpoint is torn. Under
    `jax.distributed` with its preemption service (on by default) JAX's own SIGTERM notifier
    tells every process, and `requested` is JAX's preemption sync point: True on every process at
    the same step. A Python handler is then not installed, since it would replace JAX's. Without
    the service, processes agree by an all-gather of their local flags on every call.
    Orbax's `CheckpointManager.reached_preemption` is that same JAX sync point only: it needs the
    preemption service, which a single process never starts, so it cannot see a SIGTERM there.
    """

    def __init__(self):
        self._flag = threading.Event()
        self._jax_sync = jax.process_count() > 1 and jax.config.jax_enable_preemption_service
        self._installed = not self._jax_sync
        if self._installed:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self._flag.set()

    def requested(self, step: int) -> bool:
        """True once a preemption notice arrived, at a step all processes agree on. Call it at
        every step, on every process (the multi-process protocol counts on it)."""
        if self._jax_sync:
            return multihost_utils.reached_preemption_sync_point(step)
        if jax.process_count() > 1:
            flags = multihost_utils.process_allgather(np.int32(self._flag.is_set()))
            return bool(np.any(flags))
        return self._flag.is_set()

    def close(self) -> None:
        """Puts back the SIGTERM handler that was there before."""
        if self._installed:
            # None: the old handler was not set from Python; the default (terminate) is the best guess.
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False

    def __enter__(self) -> "Preemption":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
