"""Generation tokens/s: kd_jax's KV-cache `generate` beside transformers' `generate`, same model, same batch.

Both decode greedily from the same random prompts (`--batch` rows of `--prompt-len` ids) for exactly
`--max-new-tokens` tokens (EOS disabled), from the same Hugging Face folder: kd_jax
(`kd_jax.models.sampling.generate`, jitted, in `--dtype`) and transformers (PyTorch, fp32, its
`generate` with the model's default cache). Each is warmed up (kd_jax's compile happens there), then
they are timed alternately, round robin, and medians reported: tokens/s = batch x max_new_tokens /
seconds, prefill included in both. The greedy tokens of the two are compared too (fp32 on both sides:
the same tokens but for near-ties).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from kd_jax.models import load_hf, num_params
from kd_jax.models.sampling import generate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-path", required=True, help="Hugging Face model folder (both sides load it)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt (random ids)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt (EOS disabled)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="kd_jax's compute dtype")
    parser.add_argument("--steps", type=int, default=3, help="timed calls per side (alternating)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per side first (kd_jax compiles here)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def run(args) -> dict:
    import torch
    import transformers

    model = load_hf(args.hf_path, param_dtype=args.dtype, dtype=args.dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.hf_path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # every row runs max_new_tokens, on both sides
    hf.generation_config.pad_token_id = 0
    B, L, N = args.batch, args.prompt_len, args.max_new_tokens
    prompts = np.random.default_rng(args.seed).integers(1, min(model.cfg.vocab_size, hf.config.vocab_size), (B, L))
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def ours():
        return generate(model, prompts.tolist(), max_new_tokens=N, bucket=L)

    def theirs():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N, do_sample=False)
        return out[:, L:].tolist()

    sides = {"kd_jax": ours, "transformers": theirs}
    results = {name: {"times": []} for name in sides}
    for name, fn in sides.items():
        for _ in range(args.warmup):
            results[name]["tokens"] = fn()
    for _ in range(args.steps):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            results[name]["tokens"] = fn()
            results[name]["times"].append(time.perf_counter() - t0)
    report = {"model": args.hf_path, "parameters": num_params(model), "batch": B, "prompt_len": L,
              "max_new_tokens": N, "dtype": args.dtype, "torch_threads": torch.get_num_threads()}
    for name, r in results.items():
        assert all(len(row) == N for row in r["tokens"]), (name, [len(row) for row in r["tokens"]])
        median = statistics.median(r["times"])
        report[name] = {"median_s": median, "times_s": r["times"], "tokens_per_s": B * N / median}
    a, b = np.asarray(results["kd_jax"]["tokens"]), np.asarray(results["transformers"]["tokens"])
    report["same_tokens"] = float((a == b).mean())
    # Where the first difference appears (greedy decoding diverges after a near-tie), per row.
    report["rows_identical"] = int((a == b).all(axis=1).sum())
    report["ratio"] = report["kd_jax"]["tokens_per_s"] / report["transformers"]["tokens_per_s"]
    print(f"{'':14}{'median s':>10}{'tokens/s':>12}   ({B} x {L} prompt tokens, {N} new, greedy, EOS off)")
    for name in sides:
        print(f"{name:14}{report[name]['median_s']:>10.3f}{report[name]['tokens_per_s']:>12,.0f}")
    print(f"kd_jax / transformers: {report['ratio']:.2f}x; identical greedy rows {report['rows_identical']}/{B}, "
          f"same tokens {report['same_tokens']:.1%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report
