"""The training loop behind `python -m kd_jax.train`: `prepare` builds the pieces (mesh, store
check, Grain pipeline, student, train state, jitted steps), `train` runs or resumes the loop: one
jitted step per global batch (kd_jax/core/step.py), logging, held-out evaluation, checkpoints.

Started again with the same config, it resumes from the newest complete checkpoint, data order
included. SIGTERM saves at the current step and returns. The run directory is locked for the
life of the loop and its config is checked against the one its checkpoints were trained with
(kd_jax/core/runs.py).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from kd_jax.core import distributed, flops, sharding
from kd_jax.core.checkpoint import Checkpointer, CheckpointError, Preemption
from kd_jax.core.config import Config, DataConfig, LossConfig, RunConfig
from kd_jax.core.errors import KDJaxError
from kd_jax.core.onpolicy import OnPolicy, Prompts, Sampled
from kd_jax.core.progress import bar
from kd_jax.core.runs import RunLock, check_and_save_config
from kd_jax.core.state import TrainSpec, abstract_train_state, init_train_state
from kd_jax.core.step import Steps, compile_steps, hyper_at, layer_pairs, loss_schedules, summarize, trainable
from kd_jax.core.teacher import precompute
from kd_jax.data.pipeline import make_eval_iter, make_train_iter, split_indices
from kd_jax.data.store import KDStore, StoreError, tokenizer_fingerprint
from kd_jax.data.tables import load_table, prompt_messages
from kd_jax.models import build_model, num_params
from kd_jax.models.hf import eos_token_ids, load_tokenizer

log = logging.getLogger("kd_jax.train")


class NonFiniteError(KDJaxError, RuntimeError):
    """Too many steps in a row with a non-finite loss or gradient."""


def to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This process's share of the batch -> global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v)
            for k, v in batch.items()}


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a blank or cut line (a run killed mid-write)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class Logger:
    """Console + TensorBoard + metrics.jsonl, on process 0 only. Resuming at `start`, lines of
    metrics.jsonl past `start` (logged after the checkpoint, by the run that was stopped) are
    dropped, so each step appears once."""

    def __init__(self, run_dir: str, run_cfg: RunConfig, start: int = 0):
        self.on = jax.process_index() == 0
        self.writer = None
        self.jsonl = None
        if not self.on:
            return
        if run_cfg.tensorboard:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(os.path.join(run_dir, "tb"))
        path = os.path.join(run_dir, "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if _logged_step(line) <= start]
            with open(path, "w") as f:
                f.writelines(kept)
        self.jsonl = open(path, "a")

    def write(self, step: int, prefix: str, values: dict[str, float]) -> None:
        if not self.on:
            return
        self.jsonl.write(json.dumps({"step": step, "split": prefix, **values}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in values.items():
                if v is not None:
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)
        text = " ".join(f"{k}={v:.4g}" for k, v in values.items() if v is not None)
        tqdm.write(f"[{prefix} step {step}] {text}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def evaluate_losses(eval_fn, train_vars, store_path: str, eval_idx: np.ndarray, data_cfg: DataConfig,
                    loss_cfg: LossConfig, *, batches: int, batch_size: int, mesh,
                    hyper: dict[str, float] | None = None) -> dict[str, float] | None:
    """Held-out losses over up to `batches` batches: soft, hard, step, perplexity, top-1.
    eval_fn(train_vars, batch) -> metric sums: the jitted `step.eval_step` with the hyper-values
    and the teacher bound."""
    if len(eval_idx) == 0:
        return None
    sums: dict[str, float] = {}
    done = 0
    for batch in make_eval_iter(store_path, eval_idx, data_cfg, batch_size=batch_size):
        if done == batches:
            break
        if jax.process_count() > 1:  # every process reads the same eval batch; keep its share
            share = len(batch["inputs"]) // jax.process_count()
            batch = {k: v[jax.process_index() * share:(jax.process_index() + 1) * share] for k, v in batch.items()}
        out = jax.device_get(eval_fn(train_vars, to_global(batch, mesh)))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        done += 1
    # loss, step loss and hidden are per-batch means: average them; the other sums are per token
    for k in ("loss", "step_loss", "hidden"):
        if k in sums:
            sums[k] /= done
    out = summarize(sums, loss_cfg, hyper)
    out["perplexity"] = float(np.exp(out["hard"]))
    return out


def usable_sequences(store: KDStore, cfg: Config, vocab_size: int | None = None) -> np.ndarray:
    """Store checks for this config (vocab, tokenizer, completeness; K comes from the store and
    must be > 0 when the soft loss is on and the teacher is offline); the usable sequence indices."""
    if store.meta.k == 0 and cfg.loss.alpha > 0 and cfg.teacher.mode == "offline":
        raise StoreError(f"store {store.path} holds tokens only (built with data.top_k=0, no teacher log-probs), so "
                         f"loss.alpha={cfg.loss.alpha} has no soft targets; set loss.alpha=0 (hard labels only), "
                         f"build a store with data.top_k >= 1, or set teacher.mode=online (the teacher runs in "
                         f"the train step)")
    return store.check(vocab_size=vocab_size, tokenizer=load_tokenizer(cfg.tokenizer),
                       allow_incomplete=cfg.data.allow_incomplete)


def tokens_store(cfg: Config) -> Config:
    """With an online teacher and no data.store: the config with a tokens-only store built from
    data.traces in the run directory (tokenized once; a rerun reuses it, as precompute does)."""
    if cfg.data.store or cfg.teacher.mode != "online":
        return cfg
    if not cfg.data.traces:
        raise StoreError("set data.store (a KD store; tokens only is enough with teacher.mode=online) or "
                         "data.traces (tokenized into <run_dir>/tokens)")
    path = os.path.join(cfg.run_dir, "tokens")
    store_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, store=path, top_k=0))
    precompute(store_cfg, show_progress=False)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, store=path))


class TeacherMismatchError(KDJaxError, ValueError):
    """An online teacher whose vocabulary or tokenizer does not fit the student's."""


def check_online_teacher(cfg: Config, student_cfg, teacher_cfg) -> None:
    """The online teacher must predict over the student's vocabulary: as many output rows or more
    (extra rows are padding, dropped in the loss) and, when both come from HF folders, the same
    tokenizer."""
    if teacher_cfg.vocab_size < student_cfg.vocab_size:
        raise TeacherMismatchError(
            f"online teacher {cfg.teacher.hf_path or 'random'} has {teacher_cfg.vocab_size} output rows, fewer than "
            f"the student {cfg.student.hf_path or 'random'}'s {student_cfg.vocab_size}: the two vocabularies "
            f"differ; pick a teacher and student of one tokenizer family")
    if cfg.student.init == "hf" and cfg.teacher.init == "hf":
        fingerprints = {role: tokenizer_fingerprint(load_tokenizer(src.hf_path))
                        for role, src in (("teacher", cfg.teacher), ("student", cfg.student))}
        if fingerprints["teacher"] != fingerprints["student"]:
            raise TeacherMismatchError(
                f"online teacher {cfg.teacher.hf_path} and student {cfg.student.hf_path} have different tokenizers "
                f"(fingerprints {fingerprints['teacher']} vs {fingerprints['student']}): the teacher's distribution "
                f"would be over other tokens; pick a pair of one tokenizer family")
    if teacher_cfg.vocab_size > student_cfg.vocab_size and jax.process_index() == 0:
        log.warning("teacher vocab %d is padded past the student's %d: ids >= %d are left out of the soft loss "
                    "(the student cannot emit them)", teacher_cfg.vocab_size, student_cfg.vocab_size,
                    student_cfg.vocab_size)


@dataclasses.dataclass
class Run:
    """Everything the loop (or a benchmark) needs, built from the config."""
    cfg: Config
    mesh: Any
    student: Any
    spec: TrainSpec
    state: dict[str, Any]  # {"params", "opt_state", "nonfinite"[, "align"]}: a fresh train state
    steps: Steps
    data_iter: Any
    train_idx: np.ndarray
    eval_idx: np.ndarray
    teacher: Any = None  # the online teacher (frozen, sharded on the mesh); None offline
    schedules: dict = dataclasses.field(default_factory=dict)  # loss value name -> step -> value
    on_policy: OnPolicy | None = None  # the sampling of on-policy steps (train.on_policy); None = off

    @property
    def teacher_params(self):
        return None if self.teacher is None else nnx.state(self.teacher)


def prepare(cfg: Config) -> Run:
    """Mesh, store checks, student (and online teacher), train state, jitted steps and the train
    iterator (fresh state)."""
    cfg = tokens_store(cfg)
    if not cfg.data.store:
        raise StoreError("data.store is not set: build a store with `python -m kd_jax.precompute` first")
    mesh = sharding.mesh_from_config(cfg.mesh)
    store = KDStore.open(cfg.data.store)
    online = cfg.teacher.mode == "online"
    needs_teacher = online or cfg.student.init == "teacher_layers"
    teacher = build_model(cfg.teacher, mesh=mesh, seed=cfg.run.seed) if needs_teacher else None
    student = build_model(cfg.student, mesh=mesh, seed=cfg.run.seed, teacher=teacher)
    if not online:
        teacher = None
    usable = usable_sequences(store, cfg, student.cfg.vocab_size)
    train_pos, eval_pos = split_indices(len(usable), cfg.data.eval_fraction, cfg.data.shuffle_seed)
    pairs, align_shape = (), None
    if online:
        check_online_teacher(cfg, student.cfg, teacher.cfg)
        pairs = layer_pairs(cfg.loss.hidden, student.cfg.num_layers, teacher.cfg.num_layers)
        if pairs and student.cfg.hidden_size != teacher.cfg.hidden_size:
            align_shape = (len(pairs), student.cfg.hidden_size, teacher.cfg.hidden_size)
    spec = abstract_train_state(student.cfg, cfg.optim, cfg.train.steps, mesh, align_shape)
    state = init_train_state(student, spec, seed=cfg.run.seed)
    steps = compile_steps(spec, cfg.loss, cfg.train.grad_accum, mesh,
                          teacher=nnx.graphdef(teacher) if online else None, pairs=pairs)
    data_iter = make_train_iter(cfg.data.store, usable[train_pos], cfg.data,
                                global_batch_size=cfg.train.global_batch_size, seed=cfg.data.shuffle_seed,
                                process_index=jax.process_index(), process_count=jax.process_count(),
                                steps=cfg.train.steps)
    on_policy = None
    if cfg.train.on_policy.on:
        on_policy = _on_policy(cfg, mesh, store, usable[train_pos], spec, steps, teacher, pairs)
    return Run(cfg, mesh, student, spec, state, steps, data_iter, usable[train_pos], usable[eval_pos], teacher,
               loss_schedules(cfg.loss, cfg.train.steps), on_policy)


def _on_policy(cfg: Config, mesh, store: KDStore, train_idx: np.ndarray, spec: TrainSpec, steps: Steps, teacher,
               pairs) -> OnPolicy:
    """The on-policy sampler: prompts from data.prompts or the training split's prompt part; the
    student's (or the teacher's) structure to sample with; the step compiled with the on-policy
    divergence (the same step when it is loss.divergence)."""
    op = cfg.train.on_policy
    tokenizer = load_tokenizer(cfg.tokenizer)
    if cfg.data.prompts:
        field = cfg.data.prompts_field
        rows = load_table(cfg.data.prompts, {"data.prompts_field": field}, "data.prompts")[field]
        messages = [prompt_messages(v, i, "data.prompts_field") for i, v in enumerate(rows)]
        prompts = Prompts.from_messages(messages, tokenizer, cfg.data.seq_len, op.seed)
    else:
        prompts = Prompts.from_store(cfg.data.store, train_idx, op.seed)
    loss_cfg = dataclasses.replace(cfg.loss, divergence=op.divergence)
    if loss_cfg != cfg.loss:
        steps = compile_steps(spec, loss_cfg, cfg.train.grad_accum, mesh, teacher=nnx.graphdef(teacher), pairs=pairs)
    graphdef = nnx.graphdef(teacher) if op.source == "teacher" else spec.graphdef
    eos = eos_token_ids(tokenizer, cfg.teacher.hf_path if cfg.teacher.init == "hf" else None, cfg.teacher.revision)
    return OnPolicy(cfg, mesh, tokenizer, prompts, graphdef, eos, steps, store.meta.k)


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
        """Mean sampled length, shares that closed `</think>` / ended with EOS, the teacher's mean
        log-probability of the sampled tokens, sampling tokens/s and its share of the wall time."""
        if not self.sampled:
            return {}
        n = sum(s.samples for s in self.sampled)
        sampled_tokens = sum(s.tokens for s in self.sampled)
        nll, count = (sum(float(x) for x in xs) for xs in zip(*jax.device_get(self.nll)))
        return {"sampled_len": sampled_tokens / n, "closed_think": sum(s.closed for s in self.sampled) / n,
                "ended_eos": sum(s.ended for s in self.sampled) / n,
                "sample_left_out": sum(s.samples - s.packed for s in self.sampled) / n,
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
    scheduled = [k for k, sched in (("alpha", cfg.loss.alpha_schedule), ("temperature", cfg.loss.temperature_schedule),
                                    ("hidden_weight", cfg.loss.hidden.weight_schedule)) if sched.kind != "constant"]
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
                    state, metrics = policy.steps.train(state, to_global(batch, mesh),
                                                        dict(hyper, alpha=policy.cfg.alpha), teacher_params)
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
                    last = summarize({k: float(v) for k, v in m.items()}, cfg.loss, hyper)
                    last.update(grad_norm=float(m["grad_norm"]), skipped=float(m["skipped"]),
                                lr=float(spec.schedule(step - 1)), tokens_per_s=tokens / train_s,
                                mfu=flops.mfu(student.cfg, cfg.data.seq_len, tokens / train_s),
                                **{k: hyper[k] for k in scheduled})
                    if policy is not None:
                        last.update(on_policy=float(policy.due(step - 1)), **window.summary(elapsed))
                    logger.write(step, "train", last)
                    progress.set_postfix(loss=f"{last['loss']:.4f}")
                    tokens, t0, window = 0, time.perf_counter(), _SampleWindow()
                if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                    eval_fn = lambda v, b: steps.eval(v, b, hyper, teacher_params)  # noqa: E731
                    result = evaluate_losses(eval_fn, trainable(state), cfg.data.store, run.eval_idx, cfg.data,
                                             cfg.loss, batches=cfg.eval.batches,
                                             batch_size=cfg.train.global_batch_size, mesh=mesh, hyper=hyper)
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
