"""`python -m kd_jax.train --config X.yaml [key=value ...]`: distill the student on a KD store.

Builds the pieces (mesh, store check, Grain pipeline, student, optimizer, checkpointer) and runs
the loop: one jitted step per global batch (kd_jax/step.py), logging, evaluation, checkpoints.
Started again with the same command, it resumes from the newest complete checkpoint, data order
included. SIGTERM saves at the current step and exits 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from kd_jax import distributed, dryrun, flops, progress, sharding
from kd_jax.checkpoint import Checkpointer, Preemption
from kd_jax.config import Config, parse_command, save_config
from kd_jax.data.pipeline import make_eval_iter, make_train_iter, split_indices
from kd_jax.data.store import KDStore, StoreError
from kd_jax.errors import KDJaxError
from kd_jax.models import build_model, num_params
from kd_jax.models.hf import load_tokenizer
from kd_jax.step import compile_steps, make_optimizer, summarize

log = logging.getLogger("kd_jax.train")


class NonFiniteError(KDJaxError, RuntimeError):
    pass


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def init_opt_state(tx, params, mesh):
    """Optimizer state on the mesh: moments inherit their parameter's sharding; scalars such as the
    step count (which jit would leave on one device) are replicated."""
    opt_state = tx.init(params)  # eager: zeros_like keeps each parameter's sharding (jit replicated them)
    replicated = sharding.named_sharding(mesh, None)
    return jax.tree.map(lambda x: x if len(x.sharding.device_set) == mesh.size else jax.device_put(x, replicated),
                        opt_state)


def to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This process's share of the batch -> global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v)
            for k, v in batch.items()}


class Logger:
    """Console + TensorBoard + metrics.jsonl, on process 0 only."""

    def __init__(self, cfg: Config):
        self.on = jax.process_index() == 0
        self.writer = None
        if self.on and cfg.run.tensorboard:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(os.path.join(cfg.run_dir, "tb"))
        self.jsonl = open(os.path.join(cfg.run_dir, "metrics.jsonl"), "a") if self.on else None

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


def evaluate(eval_fn, params, store_path, eval_idx, cfg: Config, mesh) -> dict[str, float] | None:
    """Held-out losses over up to `eval.batches` batches: soft, hard, step, perplexity, top-1.
    eval_fn(params, batch) -> metric sums: the jitted `step.eval_step`."""
    if len(eval_idx) == 0:
        return None
    it = make_eval_iter(store_path, eval_idx, cfg.data, batch_size=cfg.train.global_batch_size)
    sums: dict[str, float] = {}
    batches = 0
    for batch in it:
        if batches == cfg.eval.batches:
            break
        if jax.process_count() > 1:  # every process reads the same eval batch; keep its share
            share = len(batch["inputs"]) // jax.process_count()
            batch = {k: v[jax.process_index() * share:(jax.process_index() + 1) * share] for k, v in batch.items()}
        out = jax.device_get(eval_fn(params, to_global(batch, mesh)))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        batches += 1
    # loss and step loss are per-batch means: average them; the other sums are per token
    sums["loss"] /= batches
    sums["step_loss"] /= batches
    out = summarize(sums, cfg.loss)
    out["perplexity"] = float(np.exp(out["hard"]))
    return out


@dataclasses.dataclass
class Run:
    """Everything the loop (or a benchmark) needs, built from the config."""
    cfg: Config
    mesh: Any
    student: Any
    graphdef: Any
    params: Any
    opt_state: Any
    nonfinite: jax.Array
    schedule: Any
    steps: Any
    data_iter: Any
    train_idx: np.ndarray
    eval_idx: np.ndarray


def prepare(cfg: Config) -> Run:
    """Mesh, store checks, student, optimizer, jitted steps and the train iterator (fresh state)."""
    if not cfg.data.store:
        raise StoreError("data.store is not set: build a store with `python -m kd_jax.precompute` first")
    mesh = sharding.mesh_from_config(cfg.mesh)
    store = KDStore.open(cfg.data.store)
    tokenizer = load_tokenizer(cfg.tokenizer)
    teacher = build_model(cfg.teacher, mesh=mesh) if cfg.student.init == "teacher_layers" else None
    student = build_model(cfg.student, mesh=mesh, seed=cfg.run.seed, teacher=teacher)
    del teacher
    usable = store.check(vocab_size=student.cfg.vocab_size, k=cfg.data.top_k, tokenizer=tokenizer,
                         allow_incomplete=cfg.data.allow_incomplete)
    train_pos, eval_pos = split_indices(len(usable), cfg.data.eval_fraction, cfg.data.shuffle_seed)
    train_idx, eval_idx = usable[train_pos], usable[eval_pos]
    graphdef, params = nnx.split(student)
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    opt_state = init_opt_state(tx, params, mesh)
    steps = compile_steps(graphdef, tx, cfg.loss, cfg.train.grad_accum, mesh,
                          jax.tree.map(lambda x: x.sharding, params), jax.tree.map(lambda x: x.sharding, opt_state))
    nonfinite = jax.device_put(jnp.zeros((), jnp.int32), sharding.named_sharding(mesh, None))  # skipped-in-a-row
    data_iter = make_train_iter(cfg.data.store, train_idx, cfg.data, global_batch_size=cfg.train.global_batch_size,
                                seed=cfg.data.shuffle_seed, process_index=jax.process_index(),
                                process_count=jax.process_count(), steps=cfg.train.steps)
    return Run(cfg, mesh, student, graphdef, params, opt_state, nonfinite, schedule, steps, data_iter,
               train_idx, eval_idx)


def train(cfg: Config) -> dict[str, float]:
    """Run (or resume) training; returns the last logged train metrics."""
    if jax.process_index() == 0:
        save_config(cfg)
    run = prepare(cfg)
    mesh, student, steps, data_iter, schedule = run.mesh, run.student, run.steps, run.data_iter, run.schedule
    params, opt_state, nonfinite, eval_idx = run.params, run.opt_state, run.nonfinite, run.eval_idx
    ckpt = Checkpointer(cfg.checkpoint_dir, cfg.checkpoint)
    start = 0
    if cfg.checkpoint.resume and ckpt.latest_step() is not None:
        state, extra = ckpt.restore(None, _abstract({"params": params, "opt_state": opt_state,
                                                     "nonfinite": nonfinite}), data_iter)
        params, opt_state, nonfinite = state["params"], state["opt_state"], state["nonfinite"]
        start = int(extra["step"])
        log.info("resumed from step %d in %s", start, ckpt.directory)

    logger = Logger(cfg)
    n_params = num_params(student)
    if logger.on:
        log.info("student: %s, %.2fM parameters; %d train / %d eval sequences; mesh %s",
                 student.cfg.model_type, n_params / 1e6, len(run.train_idx), len(eval_idx), dict(mesh.shape))
    preemption = Preemption()
    bar = progress.bar(total=cfg.train.steps, initial=start, disable=not logger.on, desc="train", unit="step")
    tokens, t0, last = 0, time.perf_counter(), {}
    step = start
    try:
        with jax.set_mesh(mesh):
            while step < cfg.train.steps:
                batch = next(data_iter)
                tokens += int((batch["segment_ids"] > 0).sum()) * jax.process_count()
                params, opt_state, nonfinite, metrics = steps.train(params, opt_state, nonfinite, to_global(batch, mesh))
                step += 1
                bar.update(1)
                if step % cfg.run.log_every == 0 or step == cfg.train.steps:
                    m = jax.device_get(metrics)
                    elapsed = time.perf_counter() - t0
                    last = summarize({k: float(v) for k, v in m.items()}, cfg.loss)
                    last.update(grad_norm=float(m["grad_norm"]), skipped=float(m["skipped"]),
                                lr=float(schedule(step - 1)), tokens_per_s=tokens / elapsed,
                                mfu=flops.mfu(student.cfg, cfg.data.seq_len, tokens / elapsed))
                    logger.write(step, "train", last)
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                    tokens, t0 = 0, time.perf_counter()
                    if int(nonfinite) >= cfg.train.max_nonfinite:
                        raise NonFiniteError(
                            f"{int(nonfinite)} steps in a row had a non-finite loss or gradient (updates skipped) "
                            f"at step {step}; lower optim.lr, check the store for NaN log-probs, or use "
                            f"student.dtype=float32 to rule out overflow")
                if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                    result = evaluate(steps.eval, params, cfg.data.store, eval_idx, cfg, mesh)
                    if result:
                        logger.write(step, "eval", result)
                state = {"params": params, "opt_state": opt_state, "nonfinite": nonfinite}
                if preemption.requested(step):
                    ckpt.save(step, state, data_iter, extra={"step": step}, force=True)
                    ckpt.wait()
                    log.info("SIGTERM: saved step %d in %s; exiting", step, ckpt.directory)
                    return last
                ckpt.save(step, state, data_iter, extra={"step": step}, force=step == cfg.train.steps)
    finally:
        bar.close()
        preemption.close()
        ckpt.close()
        logger.close()
    return last


def main(argv=None) -> None:
    cfg, flags = parse_command(argv, description="Distill a student from a KD store", dry_run=True)
    if flags.dry_run:  # size the run on abstract arrays, check it fits, exit (kd_jax/dryrun.py)
        return dryrun.main(cfg, "train", compile=not flags.no_compile)
    distributed.maybe_initialize()
    try:
        train(cfg)
    except (StoreError, NonFiniteError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
