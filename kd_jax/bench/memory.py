"""XLA's compiled memory of the train step against the sequence length, per attention implementation.

Compiles (never runs) the real train step (`kd_jax.fit.dryrun.compile_train`) on a one-device mesh
for each `--attention` implementation and `--seq-lens` length, one row per step, and prints XLA's
`memory_analysis()` temporaries and total beside the dry run's analytic estimate
(`kd_jax.fit.dryrun.train_estimate`). "growth" is the temporaries' increase from the previous
length per 1,024 extra tokens: constant when memory grows linearly in T (blockwise, splash, cudnn),
doubling with every doubling of T when it grows quadratically (xla's [heads, T, T] scores). The
student is a `--preset` shape (bench/presets.py) or the config's `student` section; compiling takes
no memory beyond the compiler's, so lengths far beyond what the machine could run are fine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax

from kd_jax.base import sharding
from kd_jax.base.loader import load_config
from kd_jax.bench.presets import architecture
from kd_jax.fit import dryrun

MiB = 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="a train config (default: all defaults)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    parser.add_argument("--preset", default="small", help="student shape (bench/presets.py); '' = the config's")
    parser.add_argument("--seq-lens", default="2048,4096,8192", help="comma-separated sequence lengths T")
    parser.add_argument("--attention", default="xla,blockwise",
                        help="comma-separated implementations (xla, blockwise; splash and cudnn need their device)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def run(args) -> None:
    overrides = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "train.global_batch_size=1", "train.grad_accum=1",
                 *args.overrides]
    if args.preset:
        overrides += ["student.init=random", f"student.architecture={json.dumps(architecture(args.preset))}"]
    cfg = load_config(args.config, overrides)
    mesh = sharding.mesh_from_config(cfg.mesh, devices=jax.devices()[:1])
    base, _ = dryrun.model_config(cfg.student, "student", cfg.teacher)
    lengths = [int(x) for x in args.seq_lens.split(",")]
    rows = []
    print(f"train step compiled on {jax.devices()[0].platform}, one device, 1 row of T tokens; student "
          f"{args.preset or 'from the config'}: D {base.hidden_size}, {base.num_layers} layers, {base.num_heads} heads "
          f"({base.num_kv_heads} kv), vocab {base.vocab_size}; remat {base.remat}, dtype {base.dtype}, "
          f"loss chunk {cfg.loss.chunk_size}, attention_block {base.attention_block}")
    print(f"{'attention':>10} {'T':>6} {'XLA temp MiB':>13} {'XLA total MiB':>14} {'analytic MiB':>13} "
          f"{'growth MiB/1k tok':>18} {'compile s':>10}")
    for impl in args.attention.split(","):
        model_cfg = dataclasses.replace(base, attention=impl)
        previous = None
        for T in lengths:
            cfg_T = dryrun.with_seq_len(cfg, T)
            t0 = time.perf_counter()
            compiled = dryrun.compile_train(cfg_T, model_cfg, mesh)
            seconds = time.perf_counter() - t0
            analytic = dryrun.analytic_total(dryrun.train_estimate(cfg_T, model_cfg, mesh))
            growth = None
            if previous is not None:
                growth = (compiled["temp_bytes"] - previous[1]) / (T - previous[0]) * 1024
            previous = (T, compiled["temp_bytes"])
            rows.append(dict(attention=impl, seq_len=T, analytic_bytes=analytic, compile_s=round(seconds, 1),
                             temp_growth_bytes_per_1k_tokens=growth, **compiled))
            g = "-" if growth is None else f"{growth / MiB:,.1f}"
            print(f"{impl:>10} {T:>6} {compiled['temp_bytes'] / MiB:>13,.1f} {compiled['total_bytes'] / MiB:>14,.1f} "
                  f"{analytic / MiB:>13,.1f} {g:>18} {seconds:>10.1f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(benchmark="memory", platform=jax.devices()[0].platform, preset=args.preset,
                           model=dataclasses.asdict(base), rows=rows), f, indent=2, default=str)
