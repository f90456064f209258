"""The teacher's top-K pass over a KD store (`python -m kd_jax.precompute`): `precompute(cfg)`
tokenizes the traces into a new store (process 0) and fills the teacher rows (every process).

Work is split by chunks of the store's token axis: process p owns a contiguous range of chunks and
is the only writer of those chunks. It walks them in windows of `window_chunks`: every sequence
that overlaps the window's unfinished chunks runs through the teacher (length-bucketed batches),
the rows falling inside those chunks are assembled on the host, each chunk is written whole and
then marked complete. A sequence that crosses a window edge runs twice (once per window); that is
the price of bounded host memory and chunk-exact resumption. Killed at any moment, the same command
recomputes only chunks without a completion mark, and the result is identical.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kd_jax.core import distributed, sharding
from kd_jax.core.config import Config, save_config
from kd_jax.core.progress import bar as progress_bar
from kd_jax.data.store import (
    KDStore,
    StoreError,
    StoreMeta,
    identity_changes,
    template_hash,
    tokenizer_fingerprint,
)
from kd_jax.data.traces import encode_traces, load_traces, stored_extras, tokenization_inputs
from kd_jax.models import build_model
from kd_jax.models.hf import load_tokenizer, read_hf_config, resolve_path


def topk_logprobs(model, tokens_BxT: jax.Array, *, k: int, vocab_size: int, logits_chunk: int):
    """Teacher top-K of log_softmax (T = 1, over the teacher's full vocabulary) at every position:
    ids_BxTxK (int32, all < vocab_size) and logprobs_BxTxK (fp32). Logits exist only one slice of
    `logits_chunk` positions at a time."""
    h_BxTxD = model.hidden_states(tokens_BxT)
    w_DxV = model.output_embedding().astype(h_BxTxD.dtype)
    B, T, D = h_BxTxD.shape
    c = min(logits_chunk, T)
    assert T % c == 0, (T, c)
    h_SxBxCxD = h_BxTxD.reshape(B, T // c, c, D).transpose(1, 0, 2, 3)

    def one(h_BxCxD):
        logits = jnp.einsum("bcd,dv->bcv", h_BxCxD, w_DxV, preferred_element_type=jnp.float32)
        logp_BxCxV = jax.nn.log_softmax(logits, axis=-1)
        if logp_BxCxV.shape[-1] > vocab_size:  # padded teacher vocab: ids the student cannot emit
            keep = jnp.arange(logp_BxCxV.shape[-1]) < vocab_size
            logp_BxCxV = jnp.where(keep[None, None, :], logp_BxCxV, -jnp.inf)
        vals, ids = jax.lax.top_k(logp_BxCxV, k)
        return ids.astype(jnp.int32), vals

    ids_SxBxCxK, vals_SxBxCxK = jax.lax.map(one, h_SxBxCxD)
    unchunk = lambda x: x.transpose(1, 0, 2, 3).reshape(B, T, k)  # noqa: E731
    return unchunk(ids_SxBxCxK), unchunk(vals_SxBxCxK)


_topk_jit = nnx.jit(topk_logprobs, static_argnames=("k", "vocab_size", "logits_chunk"))


@dataclasses.dataclass
class Progress:
    tokens: int = 0  # sequence tokens run through the teacher (duplicates at window edges included)
    chunks: int = 0  # chunks written and marked
    seconds: float = 0.0


def process_chunks(num_chunks: int, process: int, processes: int) -> range:
    """Process `process`'s contiguous share of the chunks."""
    return range(num_chunks * process // processes, num_chunks * (process + 1) // processes)


def _batches(lengths: np.ndarray, order: np.ndarray, bucket: int, batch_tokens: int, multiple: int):
    """Length-bucketed batches: (padded length, sequence ids) with rows = batch_tokens // length,
    rounded to a multiple of the mesh's batch axes."""
    padded = -(-lengths // bucket) * bucket
    for length in np.unique(padded[order]):
        ids = order[padded[order] == length]
        rows = max(multiple, (batch_tokens // int(length)) // multiple * multiple)
        for i in range(0, len(ids), rows):
            yield int(length), ids[i:i + rows], rows


def run_teacher(store: KDStore, model, mesh, pre_cfg, *, process: int = 0, processes: int = 1,
                show_progress: bool = True) -> Progress:
    """Fill this process's unfinished chunks of `store` with the teacher's top-K rows."""
    meta, offsets = store.meta, store.offsets
    C, K = meta.chunk_tokens, meta.k
    batch_sharding = sharding.batch_sharding(mesh, 2)
    multiple = sharding.logical_size(mesh, "batch")
    mine = process_chunks(meta.num_chunks, process, processes)
    done = store.done_chunks()
    todo = [c for c in mine if not done[c]]
    progress = Progress()
    bar = progress_bar(total=sum(min((c + 1) * C, meta.num_tokens) - c * C for c in todo), unit="tok",
                       disable=not show_progress, desc=f"teacher top-{K}")
    t0 = time.perf_counter()
    lengths = np.diff(offsets)
    for w in range(0, len(todo), pre_cfg.window_chunks):
        window = todo[w:w + pre_cfg.window_chunks]
        lo, hi = window[0] * C, min((window[-1] + 1) * C, meta.num_tokens)
        in_window = np.zeros(hi - lo, bool)
        for c in window:
            in_window[c * C - lo:min((c + 1) * C, meta.num_tokens) - lo] = True
        ids_buf = np.full((hi - lo, K), -1, np.int32)
        lp_buf = np.zeros((hi - lo, K), np.float32)
        # sequences overlapping [lo, hi), then those touching an unfinished chunk of the window
        first = np.searchsorted(offsets, lo, side="right") - 1
        last = np.searchsorted(offsets, hi, side="left")
        seqs = [s for s in range(first, last)
                if in_window[max(offsets[s], lo) - lo:min(offsets[s + 1], hi) - lo].any()]
        order = np.array(sorted(seqs, key=lambda s: (lengths[s], s)), dtype=np.int64)
        base = int(offsets[first])  # one read of every token the window's sequences hold
        window_tokens = store.read_range("tokens", base, int(offsets[last]))
        for length, batch, rows in _batches(lengths, order, pre_cfg.bucket, pre_cfg.batch_tokens, multiple):
            tokens = np.zeros((rows, length), np.int32)
            for r, s in enumerate(batch):
                tokens[r, :lengths[s]] = window_tokens[offsets[s] - base:offsets[s + 1] - base]
            with jax.set_mesh(mesh):
                ids, lps = _topk_jit(model, jax.device_put(tokens, batch_sharding), k=K, vocab_size=meta.vocab_size,
                              logits_chunk=min(pre_cfg.logits_chunk, length))
            ids, lps = np.asarray(ids), np.asarray(lps)
            for r, s in enumerate(batch):
                start, n = int(offsets[s]), int(lengths[s])
                # target alignment: the prediction made at position t is token t+1's row
                seq_ids = np.concatenate([np.full((1, K), -1, np.int32), ids[r, :n - 1]])
                seq_lps = np.concatenate([np.zeros((1, K), np.float32), lps[r, :n - 1]])
                a, b = max(start, lo), min(start + n, hi)
                ids_buf[a - lo:b - lo] = seq_ids[a - start:b - start]
                lp_buf[a - lo:b - lo] = seq_lps[a - start:b - start]
                progress.tokens += n
        for c in window:
            a, b = c * C, min((c + 1) * C, meta.num_tokens)
            store.write_chunk(c, ids_buf[a - lo:b - lo], lp_buf[a - lo:b - lo].astype(_np_dtype(meta.logprob_dtype)))
            progress.chunks += 1
            bar.update(b - a)
        bar.set_postfix(tok_s=f"{progress.tokens / (time.perf_counter() - t0):.0f}")
    bar.close()
    progress.seconds = time.perf_counter() - t0
    return progress


def _np_dtype(name: str):
    return np.dtype(jnp.dtype(name))


# ---------------------------------------------------------------- traces -> store -> teacher rows

log = logging.getLogger("kd_jax.core.teacher")
# The config precompute ran with, in the run directory; apart from the trainer's config.yaml, which
# a precompute must never replace (a run's checkpoints are read with it).
PRECOMPUTE_CONFIG = "precompute.yaml"


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


def store_identity(cfg: Config, tokenizer, dataset) -> dict:
    """The StoreMeta fields that say what a store is built from: tokenizer, teacher, K, log-prob
    dtype and the tokenization inputs (traces content hash, data.* settings)."""
    return dict(tokenizer=tokenizer.name_or_path, chat_template_hash=template_hash(tokenizer),
                tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                teacher=(cfg.teacher.hf_path or "random") if cfg.data.top_k else "none",
                teacher_revision=cfg.teacher.revision, k=cfg.data.top_k, logprob_dtype=cfg.precompute.logprob_dtype,
                inputs=tokenization_inputs(cfg.data, dataset))


def tokenize_to_store(cfg: Config, tokenizer, teacher_vocab: int) -> KDStore:
    """Encode and filter the traces, then create the store's arrays (process 0 only)."""
    dataset = load_traces(cfg.data)
    encoded, report = encode_traces(dataset, tokenizer, cfg.data)
    print(report, flush=True)
    if not encoded:
        raise StoreError(f"no trace survived the filters ({report.read} read); see the counts above")
    lengths = np.array([len(e) for e in encoded], np.int64)
    meta = StoreMeta(
        vocab_size=stored_vocab_size(cfg, teacher_vocab, tokenizer), teacher_vocab_size=teacher_vocab,
        num_sequences=len(encoded), num_tokens=int(lengths.sum()), chunk_tokens=cfg.precompute.chunk_tokens,
        **store_identity(cfg, tokenizer, dataset))
    return KDStore.create(cfg.data.store, meta, np.concatenate([e.tokens for e in encoded]).astype(np.int32),
                          np.concatenate([e.role for e in encoded]).astype(np.uint8),
                          np.concatenate([e.step for e in encoded]).astype(np.int32),
                          np.concatenate([[0], np.cumsum(lengths)]), **stored_extras(encoded))


def open_or_tokenize(cfg: Config, tokenizer, teacher_vocab: int) -> KDStore:
    """The store at data.store when it was built from this config's inputs (resume), else a new
    one; a store built from other inputs is an error that names what changed (process 0 only)."""
    if not KDStore.exists(cfg.data.store):
        return tokenize_to_store(cfg, tokenizer, teacher_vocab)
    store = KDStore.open(cfg.data.store)
    changes = identity_changes(store.meta, store_identity(cfg, tokenizer, load_traces(cfg.data)))
    if changes:
        raise StoreError(f"store {cfg.data.store} was built from other inputs ({'; '.join(changes)}); set "
                         f"data.store to a new path, or delete the old store to rebuild it there")
    return store


def _create_or_resume(cfg: Config, tokenizer, teacher_vocab: int, show: bool = False) -> None:
    store = open_or_tokenize(cfg, tokenizer, teacher_vocab)
    save_config(cfg, filename=PRECOMPUTE_CONFIG)  # once the store is known to be this config's
    if show:
        print(json.dumps(store.describe(), indent=2), flush=True)


def precompute(cfg: Config, *, show_progress: bool = True) -> dict:
    """Tokenize (if needed) and fill the store; returns `describe()` (process 0) plus teacher tokens/s."""
    if not cfg.data.store:
        raise StoreError("data.store is not set: the folder or kvstore URL to write the KD store to")
    process, processes = jax.process_index(), jax.process_count()
    tokenizer = load_tokenizer(cfg.tokenizer)
    if cfg.data.top_k == 0:  # a tokens-only store: no teacher to run (hard-label training)
        distributed.on_process_0(lambda: _create_or_resume(cfg, tokenizer, len(tokenizer), show=True))
        return KDStore.open(cfg.data.store).describe() if process == 0 else {}
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=jax.local_devices())
    teacher = build_model(cfg.teacher, mesh=mesh, seed=cfg.run.seed)
    distributed.on_process_0(lambda: _create_or_resume(cfg, tokenizer, teacher.cfg.vocab_size))
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
        summary = {**store.describe(), **summary}
        print(json.dumps(summary, indent=2), flush=True)
    return summary
