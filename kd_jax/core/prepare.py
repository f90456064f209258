"""Run assembly for training: from a config to a `Run` (mesh, the store opened once and checked
against the student, the Grain train iterator, student and online teacher, train state, jitted steps
and the on-policy sampler). `loop.train` runs it; benchmarks and tests build one to reach its parts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from kd_jax.base import sharding
from kd_jax.base.errors import KDJaxError
from kd_jax.base.schema import Config
from kd_jax.core.onpolicy import OnPolicy, Prompts
from kd_jax.core.precompute import precompute
from kd_jax.core.state import TrainSpec, abstract_train_state, init_train_state
from kd_jax.core.step import Steps, compile_steps, layer_pairs, loss_schedules
from kd_jax.data.pipeline import make_train_iter, split_indices
from kd_jax.data.store import KDStore, StoreError, tokenizer_fingerprint
from kd_jax.data.tables import load_table, prompt_messages
from kd_jax.models import build_model
from kd_jax.models.hf import load_tokenizer, source_eos_ids
from kd_jax.models.prune import calibration_batches
from kd_jax.models.source import source_config

log = logging.getLogger("kd_jax.train")


def check_sampled_store(store: KDStore, cfg: Config) -> None:
    """A store of sampled teacher rows (precompute.targets=sampled) is the teacher's distribution at
    its sample temperature, as empirical weights count/K: the offline soft loss takes it as the
    target of the forward KL at that temperature, never tempered again, with no tail bucket."""
    m = store.meta
    if m.targets != "sampled" or m.k == 0 or not cfg.loss.soft or cfg.teacher.mode != "offline":
        return
    loss = cfg.loss
    where = (f"store {store.path} holds {m.k} draws per token from the teacher at temperature "
             f"{m.sample_temperature:g} (precompute.targets=sampled, precompute.sample_temperature="
             f"{m.sample_temperature:g})")
    if loss.temperature != m.sample_temperature or loss.temperature_schedule.kind != "constant":
        scheduled = (f" with a {loss.temperature_schedule.kind} loss.temperature_schedule"
                     if loss.temperature_schedule.kind != "constant" else "")
        raise StoreError(f"{where}, but loss.temperature={loss.temperature:g}{scheduled}: the draws are the teacher's "
                         f"target at {m.sample_temperature:g} and cannot be re-tempered; set "
                         f"loss.temperature={m.sample_temperature:g} and a constant temperature_schedule, or rebuild "
                         f"the store with precompute.sample_temperature={loss.temperature:g}")
    if loss.tail:
        raise StoreError(f"{where}, but loss.tail=true: sampled rows have no mass outside them to bucket (their "
                         f"weights sum to 1); set loss.tail=false")
    if loss.divergence != "forward_kl":
        raise StoreError(f"{where}, but loss.divergence={loss.divergence!r}: only the forward KL (the cross-entropy to "
                         f"the draws) is unbiased with sampled targets; set loss.divergence=forward_kl, or build a "
                         f"top-K store (precompute.targets=topk)")


def usable_sequences(store: KDStore, cfg: Config, vocab_size: int | None = None) -> np.ndarray:
    """Store checks for this config (vocab, tokenizer, completeness; K comes from the store and
    must be > 0 when the soft loss is on and the teacher is offline; a sampled store's loss
    settings, `check_sampled_store`); the usable sequence indices."""
    if store.meta.k == 0 and cfg.loss.soft and cfg.teacher.mode == "offline":
        scheduled = f" scheduled to {cfg.loss.alpha_schedule.end}" if cfg.loss.alpha_schedule.end else ""
        raise StoreError(f"store {store.path} holds tokens only (built with data.top_k=0, no teacher log-probs), so "
                         f"loss.alpha={cfg.loss.alpha}{scheduled} has no soft targets; set loss.alpha=0 and no "
                         f"alpha_schedule (hard labels only), "
                         f"build a store with data.top_k >= 1, or set teacher.mode=online (the teacher runs in "
                         f"the train step)")
    check_sampled_store(store, cfg)
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
    if cfg.loss.online_top_k > student_cfg.vocab_size:  # else lax.top_k fails while the step traces
        raise TeacherMismatchError(
            f"loss.online_top_k={cfg.loss.online_top_k} is more than the student's vocabulary of "
            f"{student_cfg.vocab_size} tokens; set it to at most {student_cfg.vocab_size} (0 = the full vocabulary)")
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


def check_teacher_reads_the_store(store: KDStore, cfg: Config) -> None:
    """An online teacher grades the store's token ids: its tokenizer must be the one the store was
    tokenized with, whatever the student is (random, cut from the teacher or pretrained). A random
    teacher has no tokenizer: its vocabulary size is all there is to check (check_online_teacher)."""
    built = store.meta.tokenizer_fingerprint
    if cfg.teacher.init != "hf" or not built:  # a version-1 store records no fingerprint
        return
    teacher = tokenizer_fingerprint(load_tokenizer(cfg.teacher.hf_path, cfg.teacher.revision))
    if teacher != built:
        raise TeacherMismatchError(
            f"online teacher {cfg.teacher.hf_path} has another tokenizer (fingerprint {teacher[:12]}) than the one "
            f"store {store.path} was tokenized with ({store.meta.tokenizer!r}, {built[:12]}): it would grade "
            f"other tokens; set data.tokenizer to the teacher's (and rebuild the store), or pick a teacher of "
            f"that tokenizer")


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
    iterator (fresh state)."""
    cfg = tokens_store(cfg)
    if not cfg.data.store:
        raise StoreError("data.store is not set: build a store with `python -m kd_jax.precompute` first")
    mesh = sharding.mesh_from_config(cfg.mesh)
    store = KDStore.open(cfg.data.store)
    online = cfg.teacher.mode == "online"
    if online:
        check_teacher_reads_the_store(store, cfg)  # before any model is built
    # The store is checked against the student's config before any weights are read; a pruned student
    # is then measured on the training split itself.
    usable = usable_sequences(store, cfg, source_config(cfg.student, cfg.teacher).vocab_size)
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
        check_online_teacher(cfg, student.cfg, teacher.cfg)
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
        on_policy = _on_policy(cfg, mesh, store, usable[train_pos], spec, steps, teacher, pairs)
    return Run(cfg, mesh, student, spec, state, steps, data_iter, store, usable[train_pos], usable[eval_pos], teacher,
               loss_schedules(cfg.loss, cfg.train.steps), on_policy)


def calibration(store: KDStore, train_idx: np.ndarray, cfg: Config) -> list[dict[str, np.ndarray]]:
    """init=pruned: the first student.prune.calibration_tokens tokens of the training split
    (`train_idx`, the sequences training reads), packed into rows of data.seq_len."""
    offsets, p = store.offsets, cfg.student.prune
    sequences = (store.read_range("tokens", int(offsets[i]), int(offsets[i + 1])) for i in train_idx)
    return calibration_batches(sequences, seq_len=cfg.data.seq_len, batch_size=p.calibration_batch_size,
                               max_tokens=p.calibration_tokens)


def _on_policy(cfg: Config, mesh, store: KDStore, train_idx: np.ndarray, spec: TrainSpec, steps: Steps, teacher,
               pairs) -> OnPolicy:
    """The on-policy sampler: prompts from train.on_policy.prompts or the training split's prompt part; the
    student's (or the teacher's) structure to sample with; the step compiled with the on-policy
    divergence (the same step when it is loss.divergence)."""
    op = cfg.train.on_policy
    tokenizer = load_tokenizer(cfg.tokenizer)
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
