"""Analytic model FLOPs per token of the preset shapes (no device work): the numbers MFU divides by.

Per preset at `--seq-len`: P (matmul parameters: layers + output projection; the input embedding
gather excluded), A (causal attention forward per token), training 6P + 3A, PaLM's 6P + 12·L·N·H·T
(full attention), forward 2P + A (a teacher pass), and the tokens/s that 50% MFU needs on one
device of `--peak-tflops` (default: an H100 SXM's 989 dense bf16 TFLOP/s). Formulas: kd_jax/models/flops.py.
"""

from __future__ import annotations

import argparse
import json

from kd_jax.bench.presets import PRESETS
from kd_jax.models import config_from_hf, flops


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default="qwen2.5-0.5b,qwen2.5-1.5b,qwen2.5-7b", help="comma-separated presets")
    parser.add_argument("--seq-len", type=int, default=4096, help="sequence length T (tokens)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s of one device")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def rows(presets, seq_len: int, peak_tflops: float) -> list[dict]:
    out = []
    for name in presets:
        cfg = config_from_hf(PRESETS[name])
        train = flops.train_flops_per_token(cfg, seq_len)
        out.append(dict(preset=name, seq_len=seq_len, matmul_params=flops.matmul_params(cfg),
                        attention_forward_flops=flops.attention_flops_per_token(cfg, seq_len),
                        train_flops_per_token=train,
                        train_flops_per_token_palm=flops.train_flops_per_token(cfg, seq_len, causal=False),
                        forward_flops_per_token=flops.forward_flops_per_token(cfg, seq_len),
                        tokens_per_s_at_50pct_mfu=0.5 * peak_tflops * 1e12 / train))
    return out


def run(args) -> None:
    table = rows(args.presets.split(","), args.seq_len, args.peak_tflops)
    print(f"T={args.seq_len}, GFLOP per token; 50% MFU on one device of {args.peak_tflops:g} TFLOP/s")
    print(f"{'preset':>14} {'P (M)':>9} {'A fwd':>7} {'train 6P+3A':>12} {'PaLM 6P+12LNHT':>15} "
          f"{'fwd 2P+A':>9} {'tok/s @50%':>11}")
    for r in table:
        g = lambda x: f"{x / 1e9:.3f}"  # noqa: E731
        print(f"{r['preset']:>14} {r['matmul_params'] / 1e6:>9.1f} {g(r['attention_forward_flops']):>7} "
              f"{g(r['train_flops_per_token']):>12} {g(r['train_flops_per_token_palm']):>15} "
              f"{g(r['forward_flops_per_token']):>9} {r['tokens_per_s_at_50pct_mfu']:>11,.0f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(benchmark="flops", peak_tflops=args.peak_tflops, rows=table), f, indent=2)
