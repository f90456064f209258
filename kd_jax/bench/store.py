"""KD store size and precompute speed: bytes per token on disk for several K, teacher tokens/s.

Runs `kd_jax.precompute` end to end (tokenize, teacher top-K, write) on the demo's arithmetic traces
(kd_jax.demo.arithmetic) with a real teacher folder, once per K, each into a fresh store; every K runs
twice and the second run is timed (the first pays for compilation). Bytes per token are for the
two teacher arrays, beside the uncompressed layout (int32 ids + 16-bit log-probs = 6·K bytes per
token). `--targets sampled` stores K draws per position instead (precompute.targets=sampled) and also
reports the unique ids a row holds on average (the slots K draws fill).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax

from kd_jax.base.loader import load_config
from kd_jax.core.precompute import precompute
from kd_jax.data.store import KDStore
from kd_jax.demo.arithmetic import problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="teacher HF folder (with its tokenizer)")
    parser.add_argument("--ks", default="16,64,128", help="comma-separated top-K values")
    parser.add_argument("--sequences", type=int, default=48, help="demo arithmetic traces to precompute")
    parser.add_argument("--dtype", default="bfloat16", help="teacher compute and parameter dtype")
    parser.add_argument("--targets", default="topk", choices=("topk", "sampled"), help="precompute.targets")
    parser.add_argument("--sample-temperature", type=float, default=1.0, help="precompute.sample_temperature")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def run(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        traces = os.path.join(tmp, "traces.jsonl")
        with open(traces, "w") as f:
            for r in problems(args.sequences):
                f.write(json.dumps(r) + "\n")
        for k in map(int, args.ks.split(",")):
            for attempt in range(2):
                store = os.path.join(tmp, f"store_k{k}_{attempt}")
                cfg = load_config(None, [
                    f"teacher.hf_path={args.teacher}", f"teacher.param_dtype={args.dtype}",
                    f"teacher.dtype={args.dtype}", f"data.traces={traces}", f"data.store={store}",
                    f"data.top_k={k}", "data.seq_len=4096", "mesh.data=-1", f"run.output_dir={tmp}",
                    "precompute.bucket=64", "precompute.batch_tokens=2048", "precompute.chunk_tokens=8192",
                    f"precompute.targets={args.targets}", f"precompute.sample_temperature={args.sample_temperature}"])
                summary = precompute(cfg, show_progress=False)
            kd = KDStore.open(store)
            ids = kd.read_range("topk_ids", 0, kd.meta.num_tokens)
            rows_with = (ids >= 0).any(axis=1)  # a sequence's first row has no prediction
            unique = float((ids[rows_with] >= 0).sum(axis=1).mean())
            rows.append(dict(k=k, tokens=summary["tokens"], teacher_bytes_per_token=summary["teacher_bytes_per_token"],
                             unique_ids_per_row=unique,
                             uncompressed_bytes_per_token=6 * k, all_bytes_per_token=summary["bytes_per_token"],
                             teacher_tokens_per_s=summary["teacher_tokens_per_s"]))
    device = jax.devices()[0]
    print(f"\ndevice={device.device_kind} x{jax.device_count()} jax={jax.__version__} teacher={args.teacher} "
          f"dtype={args.dtype} compression=blosc-zstd5 (bitshuffle ids, byteshuffle log-probs), fp16 log-probs "
          f"targets={args.targets}" + (f" T_s={args.sample_temperature:g}" if args.targets == "sampled" else ""))
    print(f"{'K':>5} {'tokens':>8} {'teacher B/tok':>14} {'6K uncompressed':>16} {'ratio':>7} "
          f"{'all arrays B/tok':>17} {'teacher tok/s':>14} {'ids/row':>8}")
    for r in rows:
        print(f"{r['k']:>5} {r['tokens']:>8} {r['teacher_bytes_per_token']:>14.1f} {r['uncompressed_bytes_per_token']:>16} "
              f"{r['teacher_bytes_per_token'] / r['uncompressed_bytes_per_token']:>7.2f} "
              f"{r['all_bytes_per_token']:>17.1f} {r['teacher_tokens_per_s']:>14.0f} {r['unique_ids_per_row']:>8.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device.device_kind, "jax": jax.__version__, "rows": rows}, f, indent=2)
