"""Run assembly for training: from a config to a `Run` (mesh, the store opened once and checked
against the config and the student, the Grain train iterator, student and online teacher, train
state, jitted steps and the on-policy sampler). `loop.train` runs it; benchmarks and tests build one
to reach its parts. The checks live with what they check: the store's in kd_jax.data.store
(`KDStore.usable_sequences`), the online teacher's in kd_jax.models.source (`check_online_teacher`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from kd_jax.base import sharding
from kd_jax.base.schema import Config
from kd_jax.core.onpolicy import OnPolicy, Prompts
from kd_jax.core.optim import loss_schedules
from kd_jax.core.precompute import precompute
from kd_jax.core.state import TrainSpec, abstract_train_state, init_train_state
from kd_jax.core.step import Steps, compile_steps, layer_pairs
from kd_jax.data.pipeline import make_train_iter, split_indices
from kd_jax.data.store import KDStore, StoreError, tokenizer_fingerprint
from kd_jax.data.tables import load_table, prompt_messages
from kd_jax.models import build_model
from kd_jax.models.hf import load_tokenizer, source_eos_ids
from kd_jax.models.prune import PruneError, calibration_batches
from kd_jax.models.source import check_online_teacher, source_config

log = logging.getLogger("kd_jax.train")


def tokens_store(cfg: Config, load=load_tokenizer) -> Config:
    """With an online teacher and no data.store: the config with a tokens-only store built from
    data.traces in the run directory (tokenized once; a rerun reuses it, as precompute does).
    `load(path, revision)` reads the run's tokenizer (prepare passes the run's reader)."""
    check_store_given(cfg)
    if cfg.data.store or cfg.teacher.mode != "online":
        return cfg
    path = os.path.join(cfg.run_dir, "tokens")
    store_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, store=path, top_k=0))
    precompute(store_cfg, show_progress=False, tokenizer=load(cfg.tokenizer, cfg.tokenizer_revision))
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, store=path))


def check_store_given(cfg: Config) -> None:
    """Raises StoreError when the run has nothing to read: no data.store (and, with an online
    teacher, no data.traces to tokenize either). Cheap: train calls it before writing anything."""
    if cfg.data.store:
        return
    if cfg.teacher.mode != "online":
        raise StoreError("data.store is not set: build a store with `python -m kd_jax.precompute` first")
    if not cfg.data.traces:
        raise StoreError("set data.store (a KD store; tokens only is enough with teacher.mode=online) or "
                         "data.traces (tokenized into <run_dir>/tokens)")


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
    store: KDStore  # data.store, opened once: the train iterator, evaluation and on-policy prompts read it
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
    iterator (fresh state). Each tokenizer is read once: the run's (cfg.tokenizer), and with an
    online teacher from an HF folder its own and an HF student's when they are other folders."""
    load = functools.cache(load_tokenizer)  # (folder or hub id, revision) -> tokenizer, for this run
    check_cut_teacher(cfg)
    cfg = tokens_store(cfg, load)
    mesh = sharding.mesh_from_config(cfg.mesh)
    store = KDStore.open(cfg.data.store)
    online = cfg.teacher.mode == "online"
    tokenizer = load(cfg.tokenizer, cfg.tokenizer_revision)
    if online and cfg.teacher.init == "hf":  # it grades the store's ids: before any model is built
        store.check_teacher_tokenizer(load(cfg.teacher.hf_path, cfg.teacher.revision), cfg.teacher.hf_path)
    elif cfg.student.init == "pruned":  # the student keeps the teacher's embedding rows: before the cut
        check_cut_teacher(cfg, store, load)
    # The store is checked against the student's config before any weights are read; a pruned student
    # is then measured on the training split itself.
    usable = store.usable_sequences(cfg, tokenizer=tokenizer,
                                    vocab_size=source_config(cfg.student, cfg.teacher).vocab_size)
    train_pos, eval_pos = split_indices(len(usable), cfg.data.eval_fraction, cfg.data.shuffle_seed)
    needs_teacher = online or cfg.student.init in ("teacher_layers", "pruned")
    teacher = build_model(cfg.teacher, mesh=mesh, seed=cfg.run.seed) if needs_teacher else None
    student = build_model(cfg.student, mesh=mesh, seed=cfg.run.seed, teacher=teacher,
                          calibration=(calibration(store, usable[train_pos], cfg) if cfg.student.init == "pruned"
                                       else None))
    if not online:
        teacher = None
    pairs, align_shape = (), None
    if online:
        fingerprints = {}
        if cfg.student.init == "hf" and cfg.teacher.init == "hf":  # one tokenizer family
            fingerprints = {f"{role}_fingerprint": tokenizer_fingerprint(load(src.hf_path, src.revision))
                            for role, src in (("teacher", cfg.teacher), ("student", cfg.student))}
        check_online_teacher(cfg, student.cfg, teacher.cfg, **fingerprints)
        pairs = layer_pairs(cfg.loss.hidden, student.cfg.num_layers, teacher.cfg.num_layers)
        if pairs and student.cfg.hidden_size != teacher.cfg.hidden_size:
            align_shape = (len(pairs), student.cfg.hidden_size, teacher.cfg.hidden_size)
    spec = abstract_train_state(student.cfg, cfg.optim, cfg.train.steps, mesh, align_shape)
    state = init_train_state(student, spec, seed=cfg.run.seed)
    steps = compile_steps(spec, cfg.loss, cfg.train.grad_accum, mesh,
                          teacher=nnx.graphdef(teacher) if online else None, pairs=pairs, targets=store.meta.targets)
    data_iter = make_train_iter(store, usable[train_pos], cfg.data,
                                global_batch_size=cfg.train.global_batch_size, seed=cfg.data.shuffle_seed,
                                process_index=jax.process_index(), process_count=jax.process_count(),
                                steps=cfg.train.steps)
    on_policy = None
    if cfg.train.on_policy.on:
        on_policy = _on_policy(cfg, mesh, store, usable[train_pos], spec, steps, teacher, pairs, tokenizer)
    return Run(cfg, mesh, student, spec, state, steps, data_iter, store, usable[train_pos], usable[eval_pos], teacher,
               loss_schedules(cfg.loss, cfg.train.steps), on_policy)


def check_cut_teacher(cfg: Config, store: KDStore | None = None, load=load_tokenizer) -> None:
    """student.init=pruned: the teacher the student is cut from must be trained (teacher.init=hf:
    importance measured on random weights ranks nothing, and the cut would be a random student of
    the smaller shape, which student.init=random gives without the teacher) and, with `store`, read
    the store's tokens: the cut keeps the teacher's embedding, so its tokenizer must be the one the
    store was tokenized with (a version-1 store records none). `load(path, revision)` reads a tokenizer."""
    if cfg.student.init != "pruned":
        return
    if cfg.teacher.init != "hf":
        raise PruneError(f"student.init=pruned cuts the student from teacher.init={cfg.teacher.init} weights: "
                         f"importance measured on untrained weights ranks nothing; set teacher.init=hf (a trained "
                         f"teacher's folder), or student.init=random for a random student")
    if store is not None:
        store.check_teacher_tokenizer(load(cfg.teacher.hf_path, cfg.teacher.revision), cfg.teacher.hf_path,
                                      use="teacher", harm="a student cut from it would read the store's ids as "
                                                          "other tokens")


def pruned_student(cfg: Config, mesh, load=load_tokenizer):
    """init=pruned outside training (`evaluate --untrained`): the student as `prepare` cuts it, the
    teacher measured on the first tokens of the store's training split, with the same checks."""
    check_cut_teacher(cfg)
    if not cfg.data.store:
        raise StoreError("student.init=pruned measures the teacher on the store's training split: set data.store")
    store = KDStore.open(cfg.data.store)
    check_cut_teacher(cfg, store, load)
    usable = store.usable_sequences(cfg, tokenizer=load(cfg.tokenizer, cfg.tokenizer_revision),
                                    vocab_size=source_config(cfg.student, cfg.teacher).vocab_size)
    train_pos, _ = split_indices(len(usable), cfg.data.eval_fraction, cfg.data.shuffle_seed)
    teacher = build_model(cfg.teacher, mesh=mesh, seed=cfg.run.seed)
    return build_model(cfg.student, mesh=mesh, seed=cfg.run.seed, teacher=teacher,
                       calibration=calibration(store, usable[train_pos], cfg))


def calibration(store: KDStore, train_idx: np.ndarray, cfg: Config) -> list[dict[str, np.ndarray]]:
    """init=pruned: the first student.prune.calibration_tokens tokens of the training split
    (`train_idx`, the sequences training reads), packed into rows of data.seq_len. When the split
    holds fewer, one line says how many the importance is measured on."""
    offsets, p = store.offsets, cfg.student.prune
    sequences = (store.read_range("tokens", int(offsets[i]), int(offsets[i + 1])) for i in train_idx)
    batches = calibration_batches(sequences, seq_len=cfg.data.seq_len, batch_size=p.calibration_batch_size,
                                  max_tokens=p.calibration_tokens)
    taken = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    if taken < p.calibration_tokens and jax.process_index() == 0:
        log.warning("student.prune.calibration_tokens=%d, but the store's training split holds %d tokens (each "
                    "sequence cut to data.seq_len=%d): the importance is measured on those %d, the whole split",
                    p.calibration_tokens, taken, cfg.data.seq_len, taken)
    return batches


def _on_policy(cfg: Config, mesh, store: KDStore, train_idx: np.ndarray, spec: TrainSpec, steps: Steps, teacher,
               pairs, tokenizer) -> OnPolicy:
    """The on-policy sampler: prompts from train.on_policy.prompts or the training split's prompt part; the
    student's (or the teacher's) structure to sample with; the step compiled with the on-policy
    divergence (the same step when it is loss.divergence). `tokenizer`: the run's."""
    op = cfg.train.on_policy
    if op.prompts:
        field = op.prompts_field
        rows = load_table(op.prompts, {"train.on_policy.prompts_field": field}, "train.on_policy.prompts")[field]
        messages = [prompt_messages(v, i, "train.on_policy.prompts_field") for i, v in enumerate(rows)]
        prompts = Prompts.from_messages(messages, tokenizer, cfg.data.seq_len, op.seed)
    else:
        prompts = Prompts.from_store(store, train_idx, op.seed)
    loss_cfg = dataclasses.replace(cfg.loss, divergence=op.divergence)
    if loss_cfg != cfg.loss:
        steps = compile_steps(spec, loss_cfg, cfg.train.grad_accum, mesh, teacher=nnx.graphdef(teacher), pairs=pairs)
    graphdef = nnx.graphdef(teacher) if op.source == "teacher" else spec.graphdef
    eos = source_eos_ids(cfg.teacher, tokenizer)
    return OnPolicy(cfg, mesh, tokenizer, prompts, graphdef, eos, steps, store.meta.k)
