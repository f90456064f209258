"""Build a student or teacher from its config section: a pretrained HF model, a random model of a
given architecture, a subset of a teacher's layers (DistilBERT-style init), or the teacher pruned
by measured importance (Minitron, kd_jax.models.prune); and whether an online teacher fits its
student (`check_online_teacher`)."""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from kd_jax.base.errors import KDJaxError
from kd_jax.models.attention import check_runnable
from kd_jax.models.decoder import Decoder, DecoderConfig, init_decoder
from kd_jax.models.hf import config_from_hf, load_hf, read_hf_config, resolve_path
from kd_jax.models.prune import prune, pruned_config

log = logging.getLogger("kd_jax.train")


def keep_layers(model: Decoder, layers: list[int], **overrides) -> Decoder:
    """A copy of `model` with only the decoder layers `layers` (in that order), embeddings, final
    norm and output head copied too: the student owns its arrays (the train step donates them while
    an online teacher still reads its own). `overrides` change DecoderConfig fields (dtypes, remat)."""
    n = model.cfg.num_layers
    bad = [i for i in layers if not -n <= i < n]
    if not layers or bad:
        raise ValueError(f"teacher_layers={layers}: need a non-empty list of layer indices in [0, {n})")
    cfg = dataclasses.replace(model.cfg, num_layers=len(layers), **overrides)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    source = dict(nnx.to_flat_state(nnx.state(model)))
    index = jnp.asarray(layers)
    for path, var in nnx.to_flat_state(state):
        value = source[path][...]
        value = value[index] if path[0] == "layers" else value.copy()  # stacked: [L, ...]
        var.set_value(value.astype(var.dtype))
    return nnx.merge(graphdef, state)


def build_model(src, *, mesh=None, seed: int = 0, teacher: Decoder | None = None, calibration=None) -> Decoder:
    """The model a config section (`StudentSource` or `TeacherSource`) describes, sharded over `mesh`.

    init=hf loads `hf_path`; init=random builds `architecture` (an HF config.json-style dict);
    init=teacher_layers copies `teacher_layers` of `teacher`; init=pruned cuts `teacher` to the
    `prune` sizes by importance measured on `calibration` (batches of
    kd_jax.models.prune.calibration_batches). An attention this machine cannot run
    (cudnn off a GPU) is refused here, before any weight is read."""
    check_runnable(src.attention)
    opts = src.decoder_options()
    if src.init == "hf":
        if not src.hf_path:
            raise ValueError("init=hf needs hf_path: a local Hugging Face folder or a hub id")
        return load_hf(src.hf_path, mesh=mesh, revision=src.revision, **opts)
    if src.init == "random":
        if not src.architecture:
            raise ValueError("init=random needs architecture: an HF config.json-style dict with model_type, "
                             "vocab_size, hidden_size, ... (see configs/tiny_llama.yaml)")
        return init_decoder(config_from_hf(src.architecture, **opts), seed=seed, mesh=mesh)
    if src.init == "teacher_layers":
        if teacher is None or not src.teacher_layers:
            raise ValueError("init=teacher_layers needs a teacher model and the teacher_layers list to keep")
        return keep_layers(teacher, list(src.teacher_layers), **opts)
    if src.init == "pruned":
        if teacher is None or calibration is None:
            raise ValueError("init=pruned needs a teacher model and calibration batches (token rows the "
                             "importance is measured on)")
        return prune(teacher, calibration, depth_metric=src.prune.depth_metric, mesh=mesh, **src.prune.targets,
                     **opts)
    raise ValueError(f"init={src.init!r}; choose hf, random, teacher_layers or pruned")


def _read_config(src, role: str) -> dict:
    """The HF config.json dict of an init=hf (its folder or hub id) or init=random section."""
    if src.init == "random":
        return src.architecture
    return read_hf_config(resolve_path(src.hf_path, src.revision))


def source_config(src, teacher_src=None, *, read_config=_read_config, role: str = "student") -> DecoderConfig:
    """The DecoderConfig `build_model(src, teacher=...)` would build, without reading weights.
    `read_config(section, role)` gives a section's config.json dict (the dry run reads offline)."""
    if src.init == "teacher_layers":
        teacher = source_config(teacher_src, read_config=read_config, role="teacher")
        return dataclasses.replace(teacher, num_layers=len(src.teacher_layers), **src.decoder_options())
    if src.init == "pruned":
        teacher = source_config(teacher_src, read_config=read_config, role="teacher")
        return pruned_config(teacher, **src.prune.targets, **src.decoder_options())
    return config_from_hf(read_config(src, role), **src.decoder_options())


class TeacherMismatchError(KDJaxError, ValueError):
    """An online teacher whose vocabulary or tokenizer does not fit the student's."""


def check_online_teacher(cfg, student_cfg: DecoderConfig, teacher_cfg: DecoderConfig, *,
                         teacher_fingerprint: str | None = None, student_fingerprint: str | None = None) -> None:
    """The online teacher (`teacher_cfg`, built from cfg.teacher) must predict over the student's
    vocabulary (`student_cfg`): as many output rows or more (extra rows are padding, dropped in the
    loss), and loss.online_top_k no more than the student's. When both come from HF folders, the
    caller passes their tokenizers' fingerprints (kd_jax.data.store.tokenizer_fingerprint): they must
    be equal, one tokenizer family."""
    if teacher_cfg.vocab_size < student_cfg.vocab_size:
        raise TeacherMismatchError(
            f"online teacher {cfg.teacher.hf_path or 'random'} has {teacher_cfg.vocab_size} output rows, fewer than "
            f"the student {cfg.student.hf_path or 'random'}'s {student_cfg.vocab_size}: the two vocabularies "
            f"differ; pick a teacher and student of one tokenizer family")
    if cfg.loss.online_top_k > student_cfg.vocab_size:  # else lax.top_k fails while the step traces
        raise TeacherMismatchError(
            f"loss.online_top_k={cfg.loss.online_top_k} is more than the student's vocabulary of "
            f"{student_cfg.vocab_size} tokens; set it to at most {student_cfg.vocab_size} (0 = the full vocabulary)")
    if teacher_fingerprint is not None and student_fingerprint is not None \
            and teacher_fingerprint != student_fingerprint:
        raise TeacherMismatchError(
            f"online teacher {cfg.teacher.hf_path} and student {cfg.student.hf_path} have different tokenizers "
            f"(fingerprints {teacher_fingerprint} vs {student_fingerprint}): the teacher's distribution would be "
            f"over other tokens; pick a pair of one tokenizer family")
    if teacher_cfg.vocab_size > student_cfg.vocab_size and jax.process_index() == 0:
        log.warning("teacher vocab %d is padded past the student's %d: ids >= %d are left out of the soft loss "
                    "(the student cannot emit them)", teacher_cfg.vocab_size, student_cfg.vocab_size,
                    student_cfg.vocab_size)
