"""The full train step on a config: tokens/s, step time, MFU, compile time and peak memory, beside
the Grain + TensorStore input pipeline's own tokens/s measured in the same run.

MFU = (6·N + 12·L·H·Q·T) · tokens/s / (peak FLOP/s × devices); see kd_jax/flops.py. Tokens are
real (non-padding) tokens of the packed batches; the step is timed with `block_until_ready`,
median over `--steps` after `--warmup` steps (the first of which compiles).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax

from kd_jax import flops
from kd_jax.config import load_config
from kd_jax.train import prepare, to_global


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a train config (data.store must exist)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def run(args) -> None:
    cfg = load_config(args.config, args.overrides)
    r = prepare(cfg)
    batches = [next(r.data_iter) for _ in range(args.warmup + args.steps)]
    # The input pipeline alone, over as many fresh batches.
    t0 = time.perf_counter()
    input_tokens = sum(int((next(r.data_iter)["segment_ids"] > 0).sum()) for _ in range(args.steps))
    input_tps = input_tokens / (time.perf_counter() - t0)
    params, opt_state, nonfinite = r.params, r.opt_state, r.nonfinite
    times, compile_s = [], None
    with jax.set_mesh(r.mesh):
        for i, batch in enumerate(batches):
            t0 = time.perf_counter()
            params, opt_state, nonfinite, metrics = r.steps.train(params, opt_state, nonfinite, to_global(batch, r.mesh))
            jax.block_until_ready(metrics)
            dt = time.perf_counter() - t0
            if i == 0:
                compile_s = dt
            elif i >= args.warmup:
                times.append(dt)
    step_s = statistics.median(times)
    timed = batches[args.warmup:]
    real = statistics.mean(int((b["segment_ids"] > 0).sum()) for b in timed)
    total = timed[0]["segment_ids"].size
    tps = real / step_s
    mem = jax.devices()[0].memory_stats() or {}
    result = dict(device=jax.devices()[0].device_kind, devices=jax.device_count(), jax=jax.__version__,
                  config=args.config, params=sum(x.size for x in jax.tree.leaves(params)),
                  seq_len=cfg.data.seq_len, global_batch=cfg.train.global_batch_size, step_ms=step_s * 1e3,
                  compile_s=compile_s, tokens_per_s=tps, padded_tokens_per_s=total / step_s,
                  mfu=flops.mfu(r.student.cfg, cfg.data.seq_len, tps),
                  model_tflops_per_s=flops.train_flops_per_token(r.student.cfg, cfg.data.seq_len) * tps / 1e12,
                  peak_bytes=mem.get("peak_bytes_in_use"), input_tokens_per_s=input_tps,
                  final_loss=float(metrics["loss"]))
    for k, v in result.items():
        print(f"{k:>22}: {v:,.4g}" if isinstance(v, float) else f"{k:>22}: {v}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
