"""A run directory (`run.output_dir/run.name`): its config, its owner, and the student it holds.

    config.yaml      the resolved config the run was trained with (written once checks pass)
    student.json     the HF config.json of the student the checkpoints hold, when it is cut or copied
                     from the teacher (init=pruned, teacher_layers): restore and export need no teacher
    run.lock         flock'ed by the trainer that owns the directory now (host and pid inside)
    checkpoints/     Orbax steps (kd_jax.core.checkpoint), metrics.jsonl, tb/, eval_*.json

Nothing here overwrites what a run already holds: a rerun with a config that changes what the
checkpoints contain is refused with the keys that differ, a second trainer on the same directory
is refused while the first lives, and export does not write over a folder unless told to.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import socket

from kd_jax.base import sharding
from kd_jax.base.errors import KDJaxError
from kd_jax.base.loader import load_config, save_config, to_dict
from kd_jax.base.schema import Config, ConfigError
from kd_jax.core.checkpoint import Checkpointer, CheckpointError
from kd_jax.core.optim import scheduled
from kd_jax.core.state import restore_params
from kd_jax.models.decoder import DecoderConfig
from kd_jax.models.hf import check_export_folder, config_from_hf, config_to_hf, load_tokenizer, save_hf
from kd_jax.models.source import source_config

log = logging.getLogger("kd_jax.core.runs")

# Sections and keys a resumed run may change: they do not alter what the checkpoints hold or how
# the next step is computed from them (train.steps moves the end, and with it the schedule's tail).
RESUMABLE_CHANGES = ("run.name", "run.output_dir", "run.log_every", "run.tensorboard", "mesh", "precompute",
                     "train.steps", "train.eval_every", "train.max_nonfinite", "checkpoint", "eval", "data.num_workers",
                     "data.traces")


# Keys that only decide how a fresh student is cut from the teacher, not its shapes: a resumed run
# restores its student from the checkpoint, so they are ignored there (config.yaml keeps the values the
# run was cut with).
CUT_ONLY_CHANGES = ("student.prune.calibration_tokens", "student.prune.calibration_batch_size",
                    "student.prune.depth_metric")
STUDENT_RECORD = "student.json"
# The DecoderConfig fields that decide the arrays a checkpoint holds.
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias", "qk_norm")


class RunDirError(KDJaxError):
    """A run directory that cannot be used as asked: owned by another trainer, or trained differently."""


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested config dict as {dotted key: value}; a mapping that is a value, not a section (an
    architecture, a layer map like loss.hidden.layers {0: 0, 1: 2}), stays one value."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v and k != "architecture" and all(isinstance(key, str) for key in v):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_changes(old: Config, new: Config) -> dict[str, tuple]:
    """{dotted key: (old value, new value)} for every key that differs."""
    a, b = flatten(to_dict(old)), flatten(to_dict(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def has_checkpoints(cfg: Config) -> bool:
    """Whether checkpoint_dir holds a step (a local folder is listed without creating it)."""
    d = cfg.checkpoint_dir
    if "://" in d:
        with Checkpointer(d, cfg.checkpoint) as ckpt:
            return ckpt.latest_step() is not None
    return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def check_and_save_config(cfg: Config) -> None:
    """Write config.yaml for a fresh run; on a run that has checkpoints, refuse a config whose
    changes would not fit them (the diff, and the saved config.yaml left as it was)."""
    path = os.path.join(cfg.run_dir, "config.yaml")
    trained = has_checkpoints(cfg)  # listed once (on gs:// it is a request)
    if trained and not cfg.checkpoint.resume:
        raise RunDirError(f"{cfg.checkpoint_dir} already holds checkpoints and checkpoint.resume=false would write "
                          f"a second run over them; pick a new run.name, or delete {cfg.checkpoint_dir}")
    if trained and os.path.exists(path):
        try:
            old = load_config(path)
        except ConfigError as e:
            raise RunDirError(f"{path} cannot be read ({e}); restore it, or pick a new run.name") from None
        changes = config_changes(old, cfg)
        changed = {k: v for k, v in changes.items()
                   if not any(k == p or k.startswith(p + ".") for p in RESUMABLE_CHANGES + CUT_ONLY_CHANGES)}
        if changed:
            raise RunDirError(f"{cfg.run_dir} was trained with another config and its checkpoints do not fit this "
                              f"one ({_diff(changed)}); resume with the saved config ({path}), or pick a new run.name")
        cut_only = {k: v for k, v in changes.items() if k in CUT_ONLY_CHANGES}
        if cut_only:
            log.warning("resuming %s: %s only choose how a fresh student is cut; the checkpoint's student is resumed "
                        "and config.yaml keeps the values it was cut with", cfg.run_dir, _diff(cut_only))
            cfg = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, prune=dataclasses.replace(
                cfg.student.prune, **{k.rsplit(".", 1)[1]: a for k, (a, _) in cut_only.items()})))
        # A loss schedule runs from its start value at step 0 to its end at train.steps: another
        # train.steps would re-stretch the part already trained (alpha 0.1 at the end of 2 steps would be
        # 0.5 again at step 3 of 4). The learning rate's decay may move its end (a resumable change).
        if old.train.steps != cfg.train.steps and scheduled(cfg.loss):
            keys = ", ".join(scheduled(cfg.loss).values())
            raise RunDirError(f"{cfg.run_dir} was trained for train.steps={old.train.steps} with {keys} running to "
                              f"its end over those steps; train.steps={cfg.train.steps} would re-stretch it over "
                              f"the steps already taken; keep train.steps={old.train.steps}, or start a new run "
                              f"(e.g. from an export of this one) with the schedule you want")
    save_config(cfg)
    record = os.path.join(cfg.run_dir, STUDENT_RECORD)
    if cfg.student.init in ("pruned", "teacher_layers") and not os.path.exists(record):
        with open(record, "w") as f:  # the teacher's config.json is read now, while it is there
            json.dump(config_to_hf(source_config(cfg.student, cfg.teacher), cfg.student.param_dtype), f, indent=2)


def _diff(changes: dict[str, tuple]) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())


class RunLock:
    """`run.lock` in the run directory, held for the life of a trainer (process 0 of a run) with an
    exclusive `flock`: the kernel releases it when the holder exits or is killed, so a lock left by
    a dead trainer (SIGKILL, preemption, a requeued job) is simply taken, and one held by a live
    trainer is refused. The file says who holds it, for the message; it is never deleted."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "run.lock")
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.read(fd, 4096))
                owner = f"host {holder['host']}, pid {holder['pid']}"
            except (ValueError, KeyError, TypeError):
                owner = "its owner did not say who it is"
            os.close(fd)
            raise RunDirError(f"{os.path.dirname(self.path)} is in use by another trainer ({owner}); wait for it to "
                              f"finish, or pick another run.name") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def load_run_config(run_dir: str) -> Config:
    """The config a run was trained with, its paths pointed at where `run_dir` is now."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise RunDirError(f"{run_dir} has no config.yaml: pass the run directory that kd_jax.train wrote")
    cfg = load_config(path)
    run_dir = os.path.abspath(run_dir)  # the run may have moved since it was trained
    run = dataclasses.replace(cfg.run, output_dir=os.path.dirname(run_dir), name=os.path.basename(run_dir))
    return dataclasses.replace(cfg, run=run)


def student_config(cfg: Config) -> DecoderConfig:
    """The DecoderConfig of the student the run's checkpoints hold: its student.json when the run
    recorded one (a student cut or copied from the teacher: no teacher folder needed), else as the
    run's config describes it; cfg.student's dtypes, attention and remat either way. A `cfg` that
    describes a student of other shapes than the recorded or saved one is refused in one line, as
    train refuses it on resume (restoring would fail on the first array of another shape)."""
    record = os.path.join(cfg.run_dir, STUDENT_RECORD)
    saved_path = os.path.join(cfg.run_dir, "config.yaml")
    saved = load_config(saved_path) if os.path.exists(saved_path) else cfg
    changed = {k: v for k, v in config_changes(saved, cfg).items() if k.startswith(("student.", "teacher."))}
    if os.path.exists(record):
        with open(record) as f:
            held = config_from_hf(json.load(f), **cfg.student.decoder_options())
    else:
        held = dataclasses.replace(source_config(saved.student, saved.teacher), **cfg.student.decoder_options())
    if changed:  # (an export, or evaluate with the run's own config, reads no teacher)
        wanted = source_config(cfg.student, cfg.teacher)
        differ = [f for f in _SHAPE_FIELDS if getattr(held, f) != getattr(wanted, f)]
        if differ:
            shapes = ", ".join(f"{f}={getattr(held, f)} (not {getattr(wanted, f)})" for f in differ)
            raise RunDirError(f"{cfg.run_dir} was trained with another config and its checkpoints do not fit this "
                              f"one ({_diff(changed)}; its student has {shapes}); use the saved config "
                              f"({saved_path}), or train a run of these sizes")
    return held


def restore_student(cfg: Config, step: int | None = None, mesh=None):
    """(student, its step) from the run's checkpoint `step` (None: the latest), parameters only,
    onto `mesh` (default: every local device, data parallel); its shapes from `student_config`."""
    if not has_checkpoints(cfg):
        raise CheckpointError(f"{cfg.run_dir} has no checkpoint ({cfg.checkpoint_dir} holds no step); train it "
                              f"first with `python -m kd_jax.train --config ...`")
    model_cfg = student_config(cfg)
    mesh = mesh if mesh is not None else sharding.make_mesh()
    with Checkpointer(cfg.checkpoint_dir, cfg.checkpoint) as ckpt:
        return restore_params(ckpt, step, model_cfg, mesh)


def export_run(run_dir: str, out: str | None = None, step: int | None = None, dtype: str | None = None, *,
               overwrite: bool = False) -> str:
    """Write the student of `run_dir` at `step` (default: latest) as an HF folder with the
    tokenizer to `out` (default: RUN_DIR/hf or RUN_DIR/hf-<step>). Returns the folder."""
    cfg = load_run_config(run_dir)
    out = out or os.path.join(run_dir, "hf" if step is None else f"hf-{step}")
    check_export_folder(out, overwrite)  # before reading the checkpoint
    model, restored_step = restore_student(cfg, step)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.tokenizer_revision)
    save_hf(model, out, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite)
    log.info("exported step %d of %s to %s", restored_step, run_dir, out)
    return out
