"""Input pipeline alone: packed KD batches per second from a store, and tokens/s (real and padded).

Iterates `kd_jax.data.pipeline.make_train_iter` over every usable sequence of the store with no
model attached: what the host can feed. Untimed warm-up batches first (worker start, TensorStore
open, read-ahead fill), then `--batches` timed ones. "Real" tokens are the non-padding ones
(segment_ids > 0); "total" counts every position of every batch, B x L.

`--synthetic N` writes a store of N random sequences first (lengths uniform in [L/8, L], random
tokens, roles and teacher top-K, fp16 log-probs, the precompute's compression) into a temporary
folder, so the pipeline can be measured on a machine with no teacher or tokenizer (a GPU lease).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from kd_jax.base.schema import DataConfig
from kd_jax.data import pipeline
from kd_jax.data.roles import Role
from kd_jax.data.store import KDStore, StoreMeta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=None, help="KD store written by kd_jax.precompute")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="instead of --store: a temporary store of N random sequences")
    parser.add_argument("--topk", type=int, default=64, help="teacher top-K of the --synthetic store")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary of the --synthetic store")
    parser.add_argument("--seq-len", type=int, default=2048, help="packed sequence length (tokens)")
    parser.add_argument("--batch", type=int, default=8, help="packed rows per batch (one process)")
    parser.add_argument("--workers", type=int, default=0, help="data worker processes (0 = this process)")
    parser.add_argument("--packing", default="first_fit", choices=("first_fit", "best_fit"))
    parser.add_argument("--batches", type=int, default=50, help="timed batches")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def synthetic_store(path: str, sequences: int, seq_len: int, k: int, vocab: int, seed: int = 0) -> None:
    """A complete KD store of random sequences (see the module doc)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(seq_len // 8, 2), seq_len + 1, sequences)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    pos = np.arange(n) - np.repeat(offsets[:-1], lengths)
    role = np.where(pos < np.repeat(lengths // 10, lengths), Role.PROMPT, Role.REASONING).astype(np.uint8)
    step = np.where(role == Role.REASONING, pos // 64, -1).astype(np.int32)
    meta = StoreMeta(k=k, vocab_size=vocab, teacher_vocab_size=vocab, tokenizer="synthetic", chat_template_hash="",
                     teacher="synthetic", teacher_revision=None, logprob_dtype="float16", num_sequences=sequences,
                     num_tokens=n, chunk_tokens=65536)
    store = KDStore.create(path, meta, rng.integers(0, vocab, n).astype(np.int32), role, step, offsets)
    for c in range(meta.num_chunks):
        a, b = c * meta.chunk_tokens, min((c + 1) * meta.chunk_tokens, n)
        ids = ((rng.integers(0, vocab, (b - a, 1)) + 7919 * np.arange(k)) % vocab).astype(np.int32)
        lps = -np.sort(rng.exponential(1.0, (b - a, k)), axis=-1).astype(np.float16)
        store.write_chunk(c, ids, lps)


def run(args) -> None:
    if bool(args.store) == bool(args.synthetic):
        raise SystemExit("give --store PATH or --synthetic N (one of them)")
    if args.synthetic:
        with tempfile.TemporaryDirectory() as tmp:
            synthetic_store(os.path.join(tmp, "store"), args.synthetic, args.seq_len, args.topk, args.vocab)
            measure(os.path.join(tmp, "store"), args)
    else:
        measure(args.store, args)


def measure(path: str, args) -> None:
    args.store = path
    store = KDStore.open(args.store)
    usable = store.check(allow_incomplete=True)
    cfg = DataConfig(store=args.store, seq_len=args.seq_len, packing=args.packing, num_workers=args.workers)
    it = pipeline.make_train_iter(store, usable, cfg, global_batch_size=args.batch, seed=0)
    for _ in range(args.warmup):
        next(it)
    real = 0
    start = time.perf_counter()
    for _ in range(args.batches):
        real += int(np.count_nonzero(next(it)["segment_ids"]))
    seconds = time.perf_counter() - start
    if hasattr(it, "close"):
        it.close()  # stop worker processes
    total = args.batches * args.batch * args.seq_len
    result = dict(benchmark="input", synthetic=args.synthetic, store=args.store, sequences=len(usable), k=store.meta.k, seq_len=args.seq_len, batch=args.batch,
                  workers=args.workers, packing=args.packing, batches=args.batches, seconds=seconds,
                  batches_per_s=args.batches / seconds, real_tokens_per_s=real / seconds,
                  total_tokens_per_s=total / seconds, fill=real / total, cpus=os.cpu_count())
    print(f"store={args.store} sequences={len(usable)} K={store.meta.k} L={args.seq_len} B={args.batch} "
          f"workers={args.workers} packing={args.packing} cpus={os.cpu_count()}")
    print(f"{result['batches_per_s']:.2f} batches/s  {result['real_tokens_per_s']:.0f} real tokens/s  "
          f"{result['total_tokens_per_s']:.0f} total tokens/s  fill {result['fill']:.1%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
