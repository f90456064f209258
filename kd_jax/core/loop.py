"""The training loop behind `python -m kd_jax.train`: `train` runs or resumes the loop over the
`Run` that kd_jax/core/prepare.py builds: one jitted step per global batch (kd_jax/core/step.py),
logging (kd_jax/core/metrics.py), held-out evaluation, checkpoints, disk-full and SIGTERM handling.

Started again with the same config, it resumes from the newest complete checkpoint, data order
included. SIGTERM saves at the current step and returns. The run directory is locked for the
life of the loop and its config is checked against the one its checkpoints were trained with
(kd_jax/core/runs.py).
"""

from __future__ import annotations

import errno
import logging
import time

import jax

from kd_jax.base.errors import KDJaxError
from kd_jax.base.progress import bar
from kd_jax.base.schema import Config
from kd_jax.base.sharding import to_global
from kd_jax.core import distributed
from kd_jax.core.checkpoint import Checkpointer, CheckpointError, Preemption
from kd_jax.core.evaluation import evaluate_losses
from kd_jax.core.metrics import Logger
from kd_jax.core.onpolicy import Sampled
from kd_jax.core.optim import hyper_at, scheduled
from kd_jax.core.prepare import check_cut_teacher, check_store_given, prepare
from kd_jax.core.runs import RunLock, check_and_save_config
from kd_jax.core.step import loss_metrics, trainable
from kd_jax.models import flops, num_params

log = logging.getLogger("kd_jax.train")


class NonFiniteError(KDJaxError, RuntimeError):
    """Too many steps in a row with a non-finite loss or gradient."""


def _disk_full(e: BaseException | None) -> bool:
    """An OSError ENOSPC anywhere in the chain, or TensorStore's RESOURCE_EXHAUSTED for it (Orbax
    writes through TensorStore, which raises ValueError with the OS error code in the text)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e) or f"os_error_code='{errno.ENOSPC}'" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class _QuietDiskFull(logging.Filter):
    """Drops Orbax's logged tracebacks of a failed save when the disk is full: `train` reports that
    in one line (folder, last good step) instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _disk_full(record.exc_info[1]))


def train(cfg: Config) -> dict[str, float]:
    """Run (or resume) training; returns the last logged train metrics."""
    # before the run directory is claimed: a run with nothing to read, or cut from an untrained
    # teacher, writes nothing
    check_store_given(cfg)
    check_cut_teacher(cfg)
    lock = RunLock(cfg.run_dir)

    def claim() -> None:  # process 0 owns the run directory for all processes
        lock.acquire()
        check_and_save_config(cfg)

    ckpt = None
    quiet = _QuietDiskFull()
    logging.getLogger("absl").addFilter(quiet)  # Orbax logs through absl
    try:
        distributed.on_process_0(claim)
        ckpt = Checkpointer(cfg.checkpoint_dir, cfg.checkpoint)
        return _loop(cfg, ckpt)
    except BaseException as e:
        if _disk_full(e):
            last = None
            if ckpt is not None:
                try:
                    ckpt.wait()  # an earlier save still in flight may finish: it is the last good step
                except Exception as again:  # noqa: BLE001 - the same full disk, raised again
                    if not _disk_full(again):
                        raise
                last = ckpt.latest_step()
            raise CheckpointError(f"disk full writing to {cfg.run_dir} (checkpoints in {cfg.checkpoint_dir}); the "
                                  f"last good checkpoint is step {last}; free space there and run the same "
                                  f"command again to resume from it") from None
        raise
    finally:
        if ckpt is not None:
            try:
                ckpt.close()
            except Exception as again:  # noqa: BLE001 - a failed save in flight: reported above
                if not _disk_full(again):
                    raise
        lock.release()
        logging.getLogger("absl").removeFilter(quiet)


class _SampleWindow:
    """Sums over the on-policy steps between two log lines; the teacher's log-likelihood stays on
    the device until the line is written (no extra sync per step)."""

    def __init__(self):
        self.sampled: list[Sampled] = []
        self.nll: list[tuple[jax.Array, jax.Array]] = []

    def add(self, sampled: Sampled, metrics: dict) -> None:
        self.sampled.append(sampled)
        self.nll.append((metrics["teacher_nll_sum"], metrics["num_tokens"]))

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.sampled)

    def summary(self, elapsed: float) -> dict[str, float]:
        """Mean sampled length, shares that closed `</think>` / ended with EOS (the rest hit max_new_tokens) /
        were cut to data.seq_len / were left out of the batch, the teacher's mean
        log-probability of the sampled tokens, sampling tokens/s and its share of the wall time."""
        if not self.sampled:
            return {}
        n = sum(s.samples for s in self.sampled)
        sampled_tokens = sum(s.tokens for s in self.sampled)
        nll, count = (sum(float(x) for x in xs) for xs in zip(*jax.device_get(self.nll)))
        return {"sampled_len": sampled_tokens / n, "closed_think": sum(s.closed for s in self.sampled) / n,
                "ended_eos": sum(s.ended for s in self.sampled) / n,
                "sample_left_out": sum(s.samples - s.packed for s in self.sampled) / n,
                "sample_truncated": sum(s.truncated for s in self.sampled) / n,
                "teacher_logprob_sampled": -nll / max(count, 1.0),
                "sample_tokens_per_s": sampled_tokens / max(self.seconds, 1e-9),
                "sample_share": self.seconds / max(elapsed, 1e-9)}


def _loop(cfg: Config, ckpt: Checkpointer) -> dict[str, float]:
    run = prepare(cfg)
    cfg = run.cfg  # data.store set when the online teacher reads the traces directly
    mesh, student, steps, data_iter, spec = run.mesh, run.student, run.steps, run.data_iter, run.spec
    teacher_params = run.teacher_params
    state = run.state
    policy = run.on_policy
    start = 0
    if cfg.checkpoint.resume and ckpt.latest_step() is not None:
        state, extra = ckpt.restore(None, spec.abstract, data_iter)
        start = int(extra["step"])
        if policy is not None:
            policy.restore(extra.get("on_policy"), start)
        log.info("resumed from step %d in %s", start, ckpt.directory)

    def extras(at: int) -> dict:  # JSON beside the arrays: the step, and the on-policy sampling position
        return {"step": at} if policy is None else {"step": at, "on_policy": policy.state()}

    logger = Logger(cfg.run_dir, cfg.run, start)
    if logger.on:
        log.info("student: %s, %.2fM parameters; %d train / %d eval sequences; mesh %s",
                 student.cfg.model_type, num_params(student) / 1e6, len(run.train_idx), len(run.eval_idx),
                 dict(mesh.shape))
        if run.teacher is not None:
            log.info("online teacher: %s, %.2fM parameters in %s; hidden alignment pairs %s",
                     run.teacher.cfg.model_type, num_params(run.teacher) / 1e6, run.teacher.cfg.param_dtype,
                     list(steps.objective.pairs) or "none")
    moving = list(scheduled(cfg.loss))  # logged beside the losses
    preemption = Preemption()
    progress = bar(total=cfg.train.steps, initial=start, disable=not logger.on, desc="train", unit="step")
    tokens, t0, last = 0, time.perf_counter(), {}
    window = _SampleWindow()  # on-policy steps since the last log line
    step = start
    previous = None  # the skipped-in-a-row count of the step before: read one step late, so no stall

    def check_nonfinite(count: jax.Array, at: int) -> None:
        if int(count) >= cfg.train.max_nonfinite:
            raise NonFiniteError(
                f"{int(count)} steps in a row had a non-finite loss or gradient (updates skipped) up to step {at}; "
                f"lower optim.lr, check the store for NaN log-probs, or use student.dtype=float32 to rule out "
                f"overflow")

    try:
        with jax.set_mesh(mesh):
            while step < cfg.train.steps:
                hyper = hyper_at(run.schedules, step)
                if policy is not None and policy.due(step):
                    sampler_params = teacher_params if policy.cfg.source == "teacher" else state["params"]
                    batch, sampled = policy.next_batch(sampler_params)
                    step_hyper = dict(hyper, alpha=policy.cfg.alpha)  # the soft weight of on-policy steps
                    state, metrics = policy.steps.train(state, to_global(batch, mesh), step_hyper, teacher_params)
                    window.add(sampled, metrics)
                else:
                    batch = next(data_iter)
                    state, metrics = steps.train(state, to_global(batch, mesh), hyper, teacher_params)
                tokens += int((batch["segment_ids"] > 0).sum()) * jax.process_count()
                nonfinite = metrics["nonfinite"]
                step += 1
                progress.update(1)
                if previous is not None:
                    check_nonfinite(*previous)
                previous = (nonfinite, step)
                if step % cfg.run.log_every == 0 or step == cfg.train.steps:
                    m = jax.device_get(metrics)
                    elapsed = time.perf_counter() - t0
                    train_s = max(elapsed - window.seconds, 1e-9)  # sampling is not training time
                    last = loss_metrics({k: float(v) for k, v in m.items()})
                    last.update(grad_norm=float(m["grad_norm"]), skipped=float(m["skipped"]),
                                lr=float(spec.schedule(step - 1)), tokens_per_s=tokens / train_s,
                                mfu=flops.mfu(student.cfg, cfg.data.seq_len, tokens / train_s),
                                **{k: hyper[k] for k in moving})
                    if policy is not None:
                        last.update(on_policy=float(policy.due(step - 1)), **window.summary(elapsed))
                    logger.write(step, "train", last)
                    progress.set_postfix(loss=f"{last['loss']:.4f}")
                    tokens, t0, window = 0, time.perf_counter(), _SampleWindow()
                if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                    eval_fn = lambda v, b: steps.eval(v, b, hyper, teacher_params)  # noqa: E731
                    result = evaluate_losses(eval_fn, trainable(state), run.store, run.eval_idx, cfg.data,
                                             batches=cfg.eval.batches, batch_size=cfg.train.global_batch_size,
                                             mesh=mesh)
                    if result:
                        logger.write(step, "eval", result)
                if preemption.requested(step):
                    ckpt.save(step, state, data_iter, extra=extras(step), force=True)
                    ckpt.wait()
                    log.info("SIGTERM: saved step %d in %s; exiting", step, ckpt.directory)
                    return last
                ckpt.save(step, state, data_iter, extra=extras(step), force=step == cfg.train.steps)
            if previous is not None:
                check_nonfinite(*previous)
    finally:
        progress.close()
        preemption.close()
        logger.close()
    return last
