"""The teacher's top-K pass over a KD store (`python -m kd_jax.precompute`): `precompute(cfg)`
tokenizes the traces into a new store (process 0) and fills the teacher rows (every process).

Work is split by chunks of the store's token axis: process p owns a contiguous range of chunks and
is the only writer of those chunks. It walks them in windows of `window_chunks`: every sequence
that overlaps the window's unfinished chunks runs through the teacher (length-bucketed batches),
the rows falling inside those chunks are assembled on the host, each chunk is written whole and
then marked complete. A sequence that crosses a window edge runs twice (once per window); that is
the price of bounded host memory and chunk-exact resumption. Killed at any moment, the same command
recomputes only chunks without a completion mark, and the result is identical.

With `precompute.import_logprobs` no teacher runs: `run_import` fills the same windows of chunks
from a served teacher's prompt log-probs (vLLM's, `kd_jax.data.served`), each process its own.
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

from kd_jax.base import sharding
from kd_jax.base.loader import save_config
from kd_jax.base.progress import bar as progress_bar
from kd_jax.base.schema import Config
from kd_jax.core import distributed, losses
from kd_jax.data import served
from kd_jax.data.served import ServedLogprobs, ServedLogprobsError
from kd_jax.data.store import (
    KDStore,
    StoreError,
    StoreMeta,
    identity_changes,
    template_hash,
    tokenizer_fingerprint,
)
from kd_jax.data.traces import (
    encode_traces,
    load_traces,
    stored_extras,
    tokenization_inputs,
)
from kd_jax.models import build_model
from kd_jax.models.hf import load_tokenizer, read_hf_config, resolve_path


def _hidden_slices(model, tokens_BxT: jax.Array, logits_chunk: int) -> tuple[jax.Array, jax.Array]:
    """The teacher's final hidden states in slices of min(logits_chunk, T) positions, [S, B, C, D],
    and its output embedding [D, V] in their dtype: the logits of one slice at a time."""
    h_BxTxD = model.hidden_states(tokens_BxT)
    w_DxV = model.output_embedding().astype(h_BxTxD.dtype)
    B, T, D = h_BxTxD.shape
    c = min(logits_chunk, T)
    assert T % c == 0, (T, c)
    return h_BxTxD.reshape(B, T // c, c, D).transpose(1, 0, 2, 3), w_DxV


def topk_logprobs(model, tokens_BxT: jax.Array, *, k: int, vocab_size: int, logits_chunk: int):
    """Teacher top-K of log_softmax (T = 1, over the teacher's full vocabulary) at every position:
    ids_BxTxK (int32, all < vocab_size) and logprobs_BxTxK (fp32). Logits exist only one slice of
    `logits_chunk` positions at a time."""
    h_SxBxCxD, w_DxV = _hidden_slices(model, tokens_BxT, logits_chunk)
    B, T = tokens_BxT.shape

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


# What run_teacher calls: `topk_logprobs` jitted (one compile per batch shape).
topk_logprobs_jit = nnx.jit(topk_logprobs, static_argnames=("k", "vocab_size", "logits_chunk"))


def sampled_logprobs(model, tokens_BxT: jax.Array, seqs_B: jax.Array, key: jax.Array, *, k: int, vocab_size: int,
                     logits_chunk: int, temperature: float):
    """precompute.targets=sampled: at every position, k draws with replacement from the teacher's
    softmax(logits / temperature) over ids < vocab_size, as unique ids (-1 after them) and
    log(count / k) (`losses.sample_targets`): ids_BxTxK (int32) and log-weights_BxTxK (fp32).
    The draws predicting token j of store sequence seqs_B[b] use fold_in(fold_in(key, s), j),
    whatever the batch, window or process count. Logits exist one slice of `logits_chunk`
    positions at a time."""
    h_SxBxCxD, w_DxV = _hidden_slices(model, tokens_BxT, logits_chunk)
    B, T = tokens_BxT.shape
    c = h_SxBxCxD.shape[2]
    # position t predicts token t + 1: that token's index in its sequence names the draws
    targets_SxC = (jnp.arange(T) + 1).reshape(T // c, c)

    def one(args):
        h_BxCxD, targets_C = args
        logits_BxCxV = jnp.einsum("bcd,dv->bcv", h_BxCxD, w_DxV, preferred_element_type=jnp.float32)
        keys_BxC = jax.vmap(lambda s: jax.vmap(lambda j: jax.random.fold_in(jax.random.fold_in(key, s), j))(
            targets_C))(seqs_B)
        ids, log_w = losses.sample_targets(logits_BxCxV.reshape(B * c, -1), keys_BxC.reshape(B * c), k,
                                           temperature=temperature, vocab_size=vocab_size)
        return ids.reshape(B, c, k), log_w.reshape(B, c, k)

    ids_SxBxCxK, vals_SxBxCxK = jax.lax.map(one, (h_SxBxCxD, targets_SxC))
    unchunk = lambda x: x.transpose(1, 0, 2, 3).reshape(B, T, k)  # noqa: E731
    return unchunk(ids_SxBxCxK), unchunk(vals_SxBxCxK)


_sampled_jit = nnx.jit(sampled_logprobs, static_argnames=("k", "vocab_size", "logits_chunk", "temperature"))


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


def _windows(store: KDStore, process: int, processes: int, window_chunks: int):
    """This process's unfinished chunks in windows of `window_chunks`: (chunks, lo, hi, in_window,
    seqs, first, last) with [lo, hi) the window's token range, in_window [hi - lo] its tokens in
    those chunks and seqs the sequences (first <= s < last) that have a token in one of them."""
    meta, offsets = store.meta, store.offsets
    C = meta.chunk_tokens
    done = store.done_chunks()
    todo = [c for c in process_chunks(meta.num_chunks, process, processes) if not done[c]]
    for w in range(0, len(todo), window_chunks):
        window = todo[w:w + window_chunks]
        lo, hi = window[0] * C, min((window[-1] + 1) * C, meta.num_tokens)
        in_window = np.zeros(hi - lo, bool)
        for c in window:
            in_window[c * C - lo:min((c + 1) * C, meta.num_tokens) - lo] = True
        # sequences overlapping [lo, hi), then those touching an unfinished chunk of the window
        first = int(np.searchsorted(offsets, lo, side="right")) - 1
        last = int(np.searchsorted(offsets, hi, side="left"))
        seqs = [s for s in range(first, last)
                if in_window[max(offsets[s], lo) - lo:min(offsets[s + 1], hi) - lo].any()]
        yield window, lo, hi, in_window, seqs, first, last


def _todo_tokens(store: KDStore, process: int, processes: int) -> int:
    C, done = store.meta.chunk_tokens, store.done_chunks()
    return sum(min((c + 1) * C, store.meta.num_tokens) - c * C
               for c in process_chunks(store.meta.num_chunks, process, processes) if not done[c])


def _place(buf: np.ndarray, rows: np.ndarray, start: int, lo: int, hi: int) -> None:
    """Copy a sequence's rows (it begins at token `start`) into the window buffer of tokens [lo, hi)."""
    a, b = max(start, lo), min(start + len(rows), hi)
    buf[a - lo:b - lo] = rows[a - start:b - start]


def _write_window(store: KDStore, window, lo: int, ids_buf, lp_buf, progress: "Progress") -> None:
    C, meta = store.meta.chunk_tokens, store.meta
    for c in window:
        a, b = c * C, min((c + 1) * C, meta.num_tokens)
        store.write_chunk(c, ids_buf[a - lo:b - lo], lp_buf[a - lo:b - lo].astype(_np_dtype(meta.logprob_dtype)))
        progress.chunks += 1


def _counted(in_window: np.ndarray, lo: int, hi: int):
    """start, end of a sequence -> its tokens in the window's unfinished chunks: what the bar counts
    (each such token belongs to one sequence, so a window's sequences add up to its share of the total)."""
    cum = np.concatenate([[0], np.cumsum(in_window, dtype=np.int64)])
    return lambda start, end: int(cum[min(max(end, lo), hi) - lo] - cum[min(max(start, lo), hi) - lo])


def _bar(store: KDStore, process: int, processes: int, show: bool, desc: str):
    """Tokens of this process's unfinished chunks, advanced as they are computed, with tokens/s."""
    return progress_bar(total=_todo_tokens(store, process, processes), unit="tok", unit_scale=True,
                        disable=not show, desc=desc)


def run_teacher(store: KDStore, model, mesh, pre_cfg, *, process: int = 0, processes: int = 1,
                show_progress: bool = True) -> Progress:
    """Fill this process's unfinished chunks of `store` with the teacher's rows: its top-K, or
    (a store of targets "sampled") K draws per position, seeded by the store's sample_seed."""
    meta, offsets = store.meta, store.offsets
    K = meta.k
    batch_sharding = sharding.batch_sharding(mesh, 2)
    multiple = sharding.logical_size(mesh, "batch")
    progress = Progress()
    sampled = meta.targets == "sampled"
    key = jax.random.key(meta.sample_seed)
    bar = _bar(store, process, processes, show_progress, f"teacher {K} draws" if sampled else f"teacher top-{K}")
    t0 = time.perf_counter()
    lengths = np.diff(offsets)
    try:  # the bar ends its line before an error is printed
        for window, lo, hi, in_window, seqs, first, last in _windows(store, process, processes, pre_cfg.window_chunks):
            counted = _counted(in_window, lo, hi)
            ids_buf = np.full((hi - lo, K), -1, np.int32)
            lp_buf = np.zeros((hi - lo, K), np.float32)
            order = np.array(sorted(seqs, key=lambda s: (lengths[s], s)), dtype=np.int64)
            base = int(offsets[first])  # one read of every token the window's sequences hold
            window_tokens = store.read_range("tokens", base, int(offsets[last]))
            for length, batch, rows in _batches(lengths, order, pre_cfg.bucket, pre_cfg.batch_tokens, multiple):
                tokens = np.zeros((rows, length), np.int32)
                for r, s in enumerate(batch):
                    tokens[r, :lengths[s]] = window_tokens[offsets[s] - base:offsets[s + 1] - base]
                with jax.set_mesh(mesh):
                    if sampled:  # a padding row's sequence number (0) only seeds rows that are dropped
                        seqs = np.zeros(rows, np.int32)
                        seqs[:len(batch)] = batch
                        ids, lps = _sampled_jit(model, jax.device_put(tokens, batch_sharding),
                                                jax.device_put(seqs, sharding.batch_sharding(mesh, 1)), key, k=K,
                                                vocab_size=meta.vocab_size,
                                                logits_chunk=min(pre_cfg.logits_chunk, length),
                                                temperature=float(meta.sample_temperature))
                    else:
                        ids, lps = topk_logprobs_jit(model, jax.device_put(tokens, batch_sharding), k=K,
                                                     vocab_size=meta.vocab_size,
                                                     logits_chunk=min(pre_cfg.logits_chunk, length))
                ids, lps = np.asarray(ids), np.asarray(lps)
                for r, s in enumerate(batch):
                    start, n = int(offsets[s]), int(lengths[s])
                    # target alignment: the prediction made at position t is token t+1's row
                    _place(ids_buf, np.concatenate([np.full((1, K), -1, np.int32), ids[r, :n - 1]]), start, lo, hi)
                    _place(lp_buf, np.concatenate([np.zeros((1, K), np.float32), lps[r, :n - 1]]), start, lo, hi)
                    progress.tokens += n
                bar.update(sum(counted(int(offsets[s]), int(offsets[s + 1])) for s in batch))  # per batch, not window
            _write_window(store, window, lo, ids_buf, lp_buf, progress)
    finally:
        bar.close()
    progress.seconds = time.perf_counter() - t0
    return progress


def run_import(store: KDStore, source: ServedLogprobs, tokenizer, pre_cfg, *, process: int = 0,
               processes: int = 1, show_progress: bool = True) -> Progress:
    """Fill this process's unfinished chunks of `store` from a served teacher's prompt log-probs
    (`kd_jax.data.served`): the same windows, rows and completion marks as `run_teacher`. Every
    sequence's served token ids are checked against the store's first."""
    meta, offsets = store.meta, store.offsets
    if source.num_rows != meta.num_sequences:
        raise ServedLogprobsError(
            f"precompute.import_logprobs={source.source!r} holds {source.num_rows} rows, the traces give "
            f"{meta.num_sequences} sequences (after the data.* filters): write it again from this config "
            f"(launch/vllm_prompt_logprobs.py --config ...), one row per sequence")
    K = meta.k
    progress = Progress()
    bar = _bar(store, process, processes, show_progress, f"import top-{K}")
    t0 = time.perf_counter()
    short = 0
    try:  # the bar ends its line before an error (a refused row) is printed
        for window, lo, hi, in_window, seqs, first, last in _windows(store, process, processes, pre_cfg.window_chunks):
            counted = _counted(in_window, lo, hi)
            ids_buf = np.full((hi - lo, K), -1, np.int32)
            lp_buf = np.zeros((hi - lo, K), np.float32)
            inexact_buf = np.zeros(hi - lo, bool)
            base = int(offsets[first])
            window_tokens = store.read_range("tokens", base, int(offsets[last]))
            for s in seqs:
                start, end = int(offsets[s]), int(offsets[s + 1])
                row, where = source.row(s)
                served.check_row(row, where, s, window_tokens[start - base:end - base], tokenizer)
                ids, lps, inexact = served.topk_rows(row["prompt_logprobs"], K, meta.vocab_size, where,
                                                     teacher_vocab=meta.teacher_vocab_size)
                _place(ids_buf, ids, start, lo, hi)
                _place(lp_buf, lps, start, lo, hi)
                _place(inexact_buf, inexact, start, lo, hi)
                progress.tokens += end - start
                bar.update(counted(start, end))
            short += int(inexact_buf[in_window].sum())  # each position once, in the chunk written
            _write_window(store, window, lo, ids_buf, lp_buf, progress)
    finally:
        bar.close()
    if short:
        log.warning("%d positions had fewer than %d ids below the store's vocab size %d among the server's top ones "
                    "(a padded teacher vocabulary's ids, %d to %d, ranked high and were dropped): those rows keep what "
                    "was served (the actual token, then id -1, which the loss ignores); ask the server for more per "
                    "position (launch/vllm_prompt_logprobs.py --extra N) for exact rows", short, K, meta.vocab_size,
                    meta.vocab_size, meta.teacher_vocab_size - 1)
    progress.seconds = time.perf_counter() - t0
    return progress


def _np_dtype(name: str):
    return np.dtype(jnp.dtype(name))


# ---------------------------------------------------------------- traces -> store -> teacher rows

log = logging.getLogger("kd_jax.core.precompute")
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
    dtype, the tokenization inputs (traces content hash, data.* settings) and what the teacher rows
    are (targets, and for sampled ones their temperature and seed). An imported teacher
    (precompute.import_logprobs) is `imported:<file>`, its revision the sha256 of the file's bytes."""
    teacher, revision = (cfg.teacher.hf_path or "random") if cfg.data.top_k else "none", cfg.teacher.revision
    if cfg.data.top_k and cfg.precompute.import_logprobs:
        source = cfg.precompute.import_logprobs
        teacher, revision = f"imported:{source}", f"sha256:{served.fingerprint(source)}"
    pre = cfg.precompute
    sampled = bool(cfg.data.top_k) and pre.targets == "sampled"  # top-K: T = 1, no seed, whatever the keys say
    return dict(tokenizer=tokenizer.name_or_path, chat_template_hash=template_hash(tokenizer),
                tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), teacher=teacher, teacher_revision=revision,
                k=cfg.data.top_k, logprob_dtype=pre.logprob_dtype, inputs=tokenization_inputs(cfg.data, dataset),
                targets="sampled" if sampled else "topk", sample_temperature=pre.sample_temperature if sampled else 1.0,
                sample_seed=pre.sample_seed if sampled else 0)


def imported_teacher_vocab(cfg: Config, tokenizer) -> int:
    """An imported teacher's output rows: teacher.hf_path's config.json vocab_size when the config
    names it (its config and tokenizer files only are fetched, never weights), else the tokenizer's length."""
    if cfg.teacher.hf_path:
        folder = resolve_path(cfg.teacher.hf_path, cfg.teacher.revision, weights=False)
        return int(read_hf_config(folder).get("vocab_size") or len(tokenizer))
    return len(tokenizer)


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


def precompute(cfg: Config, *, show_progress: bool = True, tokenizer=None) -> dict:
    """Tokenize (if needed) and fill the store; returns `describe()` (process 0) plus teacher tokens/s.
    `tokenizer`: cfg.tokenizer when the caller has read it already (None: read here)."""
    if not cfg.data.store:
        raise StoreError("data.store is not set: the folder or kvstore URL to write the KD store to")
    process, processes = jax.process_index(), jax.process_count()
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.tokenizer, cfg.tokenizer_revision)
    if cfg.data.top_k == 0 and cfg.precompute.import_logprobs:
        raise StoreError(f"precompute.import_logprobs={cfg.precompute.import_logprobs!r} with data.top_k=0: a "
                         f"tokens-only store has no teacher rows to import; set data.top_k to the K to keep")
    if cfg.data.top_k == 0:  # a tokens-only store: no teacher to run (hard-label training)
        distributed.on_process_0(lambda: _create_or_resume(cfg, tokenizer, len(tokenizer), show=True))
        return KDStore.open(cfg.data.store).describe() if process == 0 else {}
    if cfg.precompute.import_logprobs:  # a served teacher's log-probs: no teacher runs here
        if cfg.precompute.targets == "sampled":
            raise StoreError(f"precompute.import_logprobs={cfg.precompute.import_logprobs!r} with "
                             f"precompute.targets=sampled: a served teacher's prompt log-probs are its top ones, not "
                             f"draws from its distribution; set precompute.targets=topk, or run the teacher here")
        return _import(cfg, tokenizer, show_progress=show_progress)
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


def _import(cfg: Config, tokenizer, *, show_progress: bool) -> dict:
    """precompute with precompute.import_logprobs: the store's teacher rows from a served teacher's
    prompt log-probs (kd_jax.data.served), each process its own chunks, as with the teacher."""
    process, processes = jax.process_index(), jax.process_count()
    source = ServedLogprobs(cfg.precompute.import_logprobs)
    teacher_vocab = imported_teacher_vocab(cfg, tokenizer)
    distributed.on_process_0(lambda: _create_or_resume(cfg, tokenizer, teacher_vocab))
    store = KDStore.open(cfg.data.store)
    store.check(k=cfg.data.top_k, tokenizer=tokenizer, allow_incomplete=True)
    progress = run_import(store, source, tokenizer, cfg.precompute, process=process, processes=processes,
                          show_progress=show_progress and process == 0)
    distributed.barrier("kd_store_written")
    summary = {"imported_tokens_per_s": progress.tokens / max(progress.seconds, 1e-9)}
    if process == 0:
        summary = {**store.describe(), **summary}
        print(json.dumps(summary, indent=2), flush=True)
    return summary
