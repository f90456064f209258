"""Teacher forward + top-K alone (the compute of `kd_jax.precompute`, no store I/O): tokens/s and MFU.

Runs `kd_jax.core.precompute.topk_logprobs` (final hidden states, then logits one slice of `logits_chunk`
positions at a time, log-softmax over the full vocabulary, top-K) on random tokens, for each
`--logits-chunks` value, compiled once each, warmed up, then timed round robin with
`block_until_ready`; medians. The teacher is a `--preset` shape with random bf16 weights, or the
config's `teacher` section (an HF folder). MFU counts a forward pass: 2·P + A FLOPs per token,
P the matmul parameters (the output projection included), A causal attention (kd_jax/models/flops.py);
log-softmax and top-K are not matmuls and are not credited.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import numpy as np
from flax import nnx

from kd_jax.base import sharding
from kd_jax.base.loader import load_config
from kd_jax.bench.presets import architecture
from kd_jax.core.precompute import topk_logprobs
from kd_jax.fit.dryrun import compiled_memory
from kd_jax.models import Decoder, build_model, flops


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="config whose `teacher` section is used (default: defaults)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    parser.add_argument("--preset", default=None, help="teacher shape: qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b, tiny")
    parser.add_argument("--batch", type=int, default=8, help="rows per teacher call")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per row")
    parser.add_argument("--topk", type=int, default=64, help="teacher top-K kept per token")
    parser.add_argument("--logits-chunks", default="512", help="comma-separated positions per logits slice")
    parser.add_argument("--attention", default="xla", choices=("xla", "cudnn"), help="attention implementation")
    parser.add_argument("--steps", type=int, default=5, help="timed calls per variant (round robin)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per variant after compiling")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s per device, if unknown")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def run(args) -> None:
    overrides = list(args.overrides)
    if args.preset:
        overrides += ["teacher.init=random", f"teacher.architecture={json.dumps(architecture(args.preset))}"]
    cfg = load_config(args.config, overrides)
    mesh = sharding.mesh_from_config(cfg.mesh)
    teacher = build_model(cfg.teacher, mesh=mesh, seed=cfg.run.seed)
    model_cfg = dataclasses.replace(teacher.cfg, attention=args.attention)
    state = nnx.state(teacher)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0))))  # no mesh needed
    B, L, K, V = args.batch, args.seq_len, args.topk, model_cfg.vocab_size
    tokens = np.random.default_rng(cfg.run.seed).integers(0, V, (B, L)).astype(np.int32)
    tokens = jax.device_put(tokens, sharding.batch_sharding(mesh, 2))
    variants = []
    with jax.set_mesh(mesh):
        for chunk in (int(c) for c in args.logits_chunks.split(",")):
            fn = jax.jit(lambda s, t, c=chunk: topk_logprobs(nnx.merge(graphdef, s), t, k=K, vocab_size=V,
                                                             logits_chunk=min(c, L)))
            t0 = time.perf_counter()
            compiled = fn.lower(state, tokens).compile()
            v = dict(logits_chunk=chunk, compile_s=time.perf_counter() - t0, compiled=compiled, times=[])
            v.update(compiled_memory(compiled))
            for _ in range(args.warmup):
                jax.block_until_ready(compiled(state, tokens))
            v["peak_bytes_in_use"] = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
            variants.append(v)
        for _ in range(args.steps):
            for v in variants:
                t0 = time.perf_counter()
                ids, lps = jax.block_until_ready(v["compiled"](state, tokens))
                v["times"].append(time.perf_counter() - t0)
    assert int(ids.max()) < V and bool(np.all(np.diff(np.asarray(lps, np.float32), axis=-1) <= 0))
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    per_token = flops.forward_flops_per_token(model_cfg, L)
    rows = []
    for v in variants:
        v.pop("compiled")
        call_s = statistics.median(v["times"])
        tps = B * L / call_s
        rows.append(dict(v, times_ms=[t * 1e3 for t in v.pop("times")], call_ms=call_s * 1e3, tokens_per_s=tps,
                         forward_flops_per_token=per_token, model_tflops_per_s=per_token * tps / 1e12,
                         mfu=flops.mfu(model_cfg, L, tps, forward_only=True, peak=peak)))
    device = jax.devices()[0]
    result = dict(benchmark="precompute", device=device.device_kind, devices=jax.device_count(), jax=jax.__version__,
                  preset=args.preset, teacher=cfg.teacher.hf_path, dtype=model_cfg.dtype, attention=args.attention,
                  params=int(sum(x.size for x in jax.tree.leaves(state))), matmul_params=flops.matmul_params(model_cfg),
                  batch=B, seq_len=L, topk=K, vocab_size=V, variants=rows)
    print(f"device={result['device']} x{result['devices']} teacher={args.preset or cfg.teacher.hf_path} "
          f"params={result['params']:,} dtype={model_cfg.dtype} B x L={B}x{L} K={K}")
    print(f"{'logits_chunk':>12} {'call ms':>10} {'tokens/s':>12} {'TFLOP/s':>9} {'MFU':>6} {'compile s':>9}")
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(f"{r['logits_chunk']:>12} {r['call_ms']:>10,.1f} {r['tokens_per_s']:>12,.0f} "
              f"{r['model_tflops_per_s']:>9.3f} {mfu:>6} {r['compile_s']:>9.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
