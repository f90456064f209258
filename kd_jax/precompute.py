"""`python -m kd_jax.precompute --config X.yaml [key=value ...]`: traces -> KD store.

Process 0 tokenizes the traces into the store (once: a store that exists is reused); then every
process runs the teacher over its own chunks of the store (kd_jax/teacher.py). With data.top_k=0
the store holds tokens only (no teacher is run): for hard-label training, e.g. of a teacher. Re-running the same
command resumes: only chunks without a completion mark are computed.
"""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
import transformers

from kd_jax import distributed, dryrun, sharding
from kd_jax.config import Config, parse_command, save_config
from kd_jax.data.store import KDStore, StoreError, StoreMeta, template_hash
from kd_jax.data.traces import encode_traces, load_traces
from kd_jax.models import build_model
from kd_jax.models.hf import read_hf_config, resolve_path
from kd_jax.teacher import run_teacher

log = logging.getLogger("kd_jax.precompute")


def stored_vocab_size(cfg: Config, teacher_vocab: int, tokenizer) -> int:
    """The store keeps only ids below this: the student's output rows when the config names a
    student, else the tokenizer's length (ids past it are padding no text ever produces)."""
    src = cfg.student
    if src.init == "hf" and src.hf_path:
        student = read_hf_config(resolve_path(src.hf_path, src.revision))["vocab_size"]
    elif src.init == "random" and src.architecture:
        student = src.architecture["vocab_size"]
    else:  # teacher_layers shares the teacher's rows; no student: what the tokenizer can produce
        student = teacher_vocab if src.init == "teacher_layers" else len(tokenizer)
    return min(student, teacher_vocab)


def tokenizer_path(cfg: Config) -> str:
    path = cfg.data.tokenizer or cfg.teacher.hf_path
    if not path:
        raise StoreError("precompute needs a tokenizer: set data.tokenizer or teacher.hf_path")
    return resolve_path(path)


def tokenize_to_store(cfg: Config, tokenizer, teacher_vocab: int) -> KDStore:
    """Encode and filter the traces, then create the store's arrays (process 0 only)."""
    if not cfg.data.traces:
        raise StoreError("data.traces is not set: point it at a JSONL/Parquet file, a folder or a hub dataset")
    encoded, report = encode_traces(load_traces(cfg.data), tokenizer, cfg.data)
    print(report, flush=True)
    if not encoded:
        raise StoreError(f"no trace survived the filters ({report.read} read); see the counts above")
    lengths = np.array([len(e) for e in encoded], np.int64)
    meta = StoreMeta(
        k=cfg.data.top_k, vocab_size=stored_vocab_size(cfg, teacher_vocab, tokenizer),
        teacher_vocab_size=teacher_vocab,
        tokenizer=tokenizer.name_or_path, chat_template_hash=template_hash(tokenizer),
        teacher=(cfg.teacher.hf_path or "random") if cfg.data.top_k else "none", teacher_revision=cfg.teacher.revision,
        logprob_dtype=cfg.precompute.logprob_dtype, num_sequences=len(encoded), num_tokens=int(lengths.sum()),
        chunk_tokens=cfg.precompute.chunk_tokens)
    return KDStore.create(cfg.data.store, meta, np.concatenate([e.tokens for e in encoded]).astype(np.int32),
                          np.concatenate([e.role for e in encoded]).astype(np.uint8),
                          np.concatenate([e.step for e in encoded]).astype(np.int32),
                          np.concatenate([[0], np.cumsum(lengths)]))


def _open_or_none(path: str) -> KDStore | None:
    try:
        return KDStore.open(path)
    except StoreError:
        return None


def run(cfg: Config, *, show_progress: bool = True) -> dict:
    """Tokenize (if needed) and fill the store; returns `describe()` (process 0) plus teacher tokens/s."""
    if not cfg.data.store:
        raise StoreError("data.store is not set: the folder or kvstore URL to write the KD store to")
    process, processes = jax.process_index(), jax.process_count()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path(cfg))
    if cfg.data.top_k == 0:  # a tokens-only store: no teacher to run (hard-label training)
        if process == 0:
            save_config(cfg)
            store = _open_or_none(cfg.data.store) or tokenize_to_store(cfg, tokenizer, len(tokenizer))
            store.finalize()
            print(json.dumps(store.describe(), indent=2), flush=True)
        distributed.barrier("kd_store_written")
        return KDStore.open(cfg.data.store).describe() if process == 0 else {}
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=jax.local_devices())
    teacher = build_model(cfg.teacher, mesh=mesh, seed=cfg.run.seed)
    if process == 0:
        save_config(cfg)
        if _open_or_none(cfg.data.store) is None:
            tokenize_to_store(cfg, tokenizer, teacher.cfg.vocab_size)
    distributed.barrier("kd_store_created")
    store = KDStore.open(cfg.data.store)
    store.check(k=cfg.data.top_k, tokenizer=tokenizer, allow_incomplete=True)
    if store.meta.teacher_vocab_size != teacher.cfg.vocab_size:
        raise StoreError(f"store {cfg.data.store} was built for a teacher with {store.meta.teacher_vocab_size} "
                         f"output rows, this teacher has {teacher.cfg.vocab_size}; use another data.store")
    if teacher.cfg.vocab_size > store.meta.vocab_size and process == 0:
        log.warning("teacher vocab %d is padded past the student's %d: ids >= %d are left out of the top-%d "
                    "(the student cannot emit them)", teacher.cfg.vocab_size, store.meta.vocab_size,
                    store.meta.vocab_size, store.meta.k)
    progress = run_teacher(store, teacher, mesh, cfg.precompute, process=process, processes=processes,
                           show_progress=show_progress and process == 0)
    distributed.barrier("kd_store_written")
    summary = {"teacher_tokens_per_s": progress.tokens / max(progress.seconds, 1e-9)}
    if process == 0:  # one process stats the files; the others' share is in the same store
        store.finalize()
        summary = {**store.describe(), **summary}
        print(json.dumps(summary, indent=2), flush=True)
    return summary


def main(argv=None) -> None:
    cfg, flags = parse_command(argv, description="Tokenize traces and store the teacher's top-K next-token log-probs",
                               dry_run=True)
    if flags.dry_run:  # size the run on abstract arrays, check it fits, exit (kd_jax/dryrun.py)
        return dryrun.main(cfg, "precompute", compile=not flags.no_compile)
    distributed.maybe_initialize()
    try:
        run(cfg)
    except StoreError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
