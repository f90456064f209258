"""Input pipeline alone: packed KD batches per second from a store, and tokens/s (real and padded).

Iterates `kd_jax.data.pipeline.make_train_iter` over every usable sequence of the store with no
model attached: what the host can feed. Untimed warm-up batches first (worker start, TensorStore
open, read-ahead fill), then `--batches` timed ones. "Real" tokens are the non-padding ones
(segment_ids > 0); "total" counts every position of every batch, B x L.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from kd_jax.config import DataConfig
from kd_jax.data import pipeline
from kd_jax.data.store import KDStore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="KD store written by kd_jax.precompute")
    parser.add_argument("--seq-len", type=int, default=2048, help="packed sequence length (tokens)")
    parser.add_argument("--batch", type=int, default=8, help="packed rows per batch (one process)")
    parser.add_argument("--workers", type=int, default=0, help="data worker processes (0 = this process)")
    parser.add_argument("--packing", default="first_fit", choices=("first_fit", "best_fit"))
    parser.add_argument("--batches", type=int, default=50, help="timed batches")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def run(args) -> None:
    store = KDStore.open(args.store)
    usable = store.check(allow_incomplete=True)
    cfg = DataConfig(store=args.store, seq_len=args.seq_len, packing=args.packing, num_workers=args.workers)
    it = pipeline.make_train_iter(args.store, usable, cfg, global_batch_size=args.batch, seed=0)
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
    result = dict(store=args.store, sequences=len(usable), k=store.meta.k, seq_len=args.seq_len, batch=args.batch,
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
