"""On-policy sampling tokens/s: the train loop's sampler beside transformers' `generate`, same model, same
batch, and the share of an on-policy step spent sampling.

`--config` (+ overrides) is a train config with train.on_policy on (and its online teacher): the run's
student as initialized, its first on-policy prompts (train.on_policy.prompts_per_step of them). Both sides
sample at train.on_policy.temperature / top_p for exactly max_new_tokens tokens (EOS disabled) from the
same weights: kd_jax through `kd_jax.core.onpolicy.OnPolicy.sample` (jitted, sharded over the training
mesh, in student.dtype) and transformers (PyTorch, fp32, the student exported to an HF folder, left
padding + attention mask, `generate(do_sample=True)`). Then the on-policy train step on a batch sampled as
the loop samples it (EOS on; teacher forward + fused loss + update). Each is warmed up (compiles there), then timed
alternately, round robin; medians reported: tokens/s = prompts x max_new_tokens / seconds, prefill
included, and sampling's share = sample / (sample + train step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import jax
import numpy as np

from kd_jax.base.loader import load_config
from kd_jax.base.sharding import to_global
from kd_jax.core.optim import default_hyper
from kd_jax.core.prepare import prepare
from kd_jax.models import num_params
from kd_jax.models.hf import save_hf
from kd_jax.models.sampling import left_pad


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="a train config with train.on_policy.fraction > 0")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    parser.add_argument("--steps", type=int, default=3, help="timed calls per side (alternating)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per side first (compiles here)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def _timed(fn, times: list[float]) -> None:
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)


def run(args) -> dict:
    import torch
    import transformers

    cfg = load_config(args.config, args.overrides)
    if not cfg.train.on_policy.on:
        raise SystemExit("set train.on_policy.fraction > 0 (and teacher.mode=online): this measures its sampler")
    prepared = prepare(cfg)
    policy, op = prepared.on_policy, cfg.train.on_policy
    eos, policy.eos = policy.eos, []  # every row runs max_new_tokens on both sides (restored for the step's batch)
    prompts = policy.prompts.take(0, policy.n)
    B, N = len(prompts), op.max_new_tokens
    tokens, valid = left_pad(prompts, op.bucket)

    with tempfile.TemporaryDirectory() as folder:
        save_hf(prepared.student, folder, dtype="float32")
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ids, mask = torch.tensor(tokens, dtype=torch.long), torch.tensor(valid, dtype=torch.long)
    state = {"s": prepared.state}
    hyper = dict(default_hyper(cfg.loss), alpha=op.alpha)

    def ours():
        out, _ = policy.sample(state["s"]["params"], prompts)
        assert all(len(row) == N for row in out), [len(row) for row in out]

    def theirs():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N, do_sample=True,
                              temperature=op.temperature, top_p=op.top_p, top_k=0)
        assert out.shape[1] == tokens.shape[1] + N

    with jax.set_mesh(prepared.mesh):
        policy.eos = eos  # the step trains on a batch as the loop makes it: completions end at EOS
        batch, _ = policy.next_batch(state["s"]["params"])
        policy.eos = []
        batch = to_global(batch, prepared.mesh)

        def step():
            state["s"], metrics = policy.steps.train(state["s"], batch, hyper, prepared.teacher_params)
            jax.block_until_ready(metrics)

        sides = {"kd_jax": ours, "transformers": theirs, "train_step": step}
        times = {name: [] for name in sides}
        for fn in sides.values():
            for _ in range(args.warmup):
                fn()
        for _ in range(args.steps):
            for name, fn in sides.items():
                _timed(fn, times[name])
    med = {name: statistics.median(t) for name, t in times.items()}
    trained = int(np.asarray(jax.device_get(batch["segment_ids"]) > 0).sum())
    report = {"config": args.config, "parameters": num_params(prepared.student), "prompts": B,
              "prompt_tokens_padded": int(tokens.shape[1]), "max_new_tokens": N, "temperature": op.temperature,
              "student_dtype": cfg.student.dtype, "devices": len(jax.devices()), "torch_threads": torch.get_num_threads(),
              "kd_jax": {"median_s": med["kd_jax"], "times_s": times["kd_jax"], "tokens_per_s": B * N / med["kd_jax"]},
              "transformers": {"median_s": med["transformers"], "times_s": times["transformers"],
                               "tokens_per_s": B * N / med["transformers"]},
              "train_step": {"median_s": med["train_step"], "times_s": times["train_step"], "tokens": trained,
                             "tokens_per_s": trained / med["train_step"]}}
    report["ratio"] = report["kd_jax"]["tokens_per_s"] / report["transformers"]["tokens_per_s"]
    report["sample_share"] = med["kd_jax"] / (med["kd_jax"] + med["train_step"])
    print(f"{'':14}{'median s':>10}{'tokens/s':>12}   ({B} prompts padded to {tokens.shape[1]}, {N} new tokens, "
          f"T={op.temperature}, EOS off)")
    for name in ("kd_jax", "transformers"):
        print(f"{name:14}{report[name]['median_s']:>10.3f}{report[name]['tokens_per_s']:>12,.0f}")
    print(f"{'train step':14}{med['train_step']:>10.3f}{report['train_step']['tokens_per_s']:>12,.0f}   "
          f"({trained} trained tokens: teacher forward + fused loss + update)")
    print(f"kd_jax / transformers sampling: {report['ratio']:.2f}x; sampling is {report['sample_share']:.0%} of an "
          f"on-policy step (sample + train)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report
