#!/usr/bin/env python
"""A served teacher's top-K log-probs for kd_jax, from vLLM (for teachers kd_jax does not run: R1-class MoE/MLA).

    python launch/vllm_prompt_logprobs.py --config X.yaml --out runs/x/teacher_logprobs.jsonl \\
        [--model deepseek-ai/DeepSeek-R1] [--tensor-parallel-size 8] [--top-k K] [--extra N] [key=value ...]
    python -m kd_jax.precompute --config X.yaml precompute.import_logprobs=runs/x/teacher_logprobs.jsonl

It tokenizes the config's traces exactly as `python -m kd_jax.precompute` does (kd_jax's chat
template layout, data.* filters), sends vLLM those token ids (never text, so the server's own chat
template and tokenizer cannot change them) and asks for `prompt_logprobs` = data.top_k (+ --extra):
per position t, the most likely ids at t given tokens 0..t-1 and their raw log-probs (log_softmax
of the logits, T = 1). It writes one JSON line per sequence, in the store's order, in the format
`kd_jax.data.served` reads:

    {"index": i, "prompt_token_ids": [...], "prompt_logprobs": [null, {"id": logprob, ...}, ...]}

Killed, the same command appends from the first sequence not yet written. --extra: a teacher whose
vocabulary is padded past its tokenizer's may rank padding ids among the top ones, which the import
drops; N more per position keep K real ones. Needs vLLM (with the model's GPUs) and kd_jax installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def served_row(index: int, token_ids, prompt_logprobs) -> str:
    """One output line: vLLM's prompt_logprobs (None, then {id: Logprob} per position) as plain numbers."""
    entries = [None if not entry else {str(int(i)): float(getattr(lp, "logprob", lp)) for i, lp in entry.items()}
               for entry in prompt_logprobs]
    entries[0] = None  # the first token has no prediction
    return json.dumps({"index": index, "prompt_token_ids": [int(t) for t in token_ids],
                       "prompt_logprobs": entries}, separators=(",", ":")) + "\n"


def sequences(cfg):
    """kd_jax's token ids of the config's traces, as precompute stores them (sequence i = store row i)."""
    from kd_jax.data.traces import encode_traces, load_traces
    from kd_jax.models.hf import load_tokenizer
    encoded, report = encode_traces(load_traces(cfg.data), load_tokenizer(cfg.tokenizer), cfg.data)
    print(report, file=sys.stderr, flush=True)
    return [e.tokens.tolist() for e in encoded]


def rows_written(path: str) -> int:
    """Complete lines already in `path` (streamed); a last line cut off by a kill is removed."""
    if not os.path.exists(path):
        return 0
    lines, size, last = 0, os.path.getsize(path), 0
    with open(path, "rb+") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            lines += block.count(b"\n")
            if b"\n" in block:
                last = f.tell() - len(block) + block.rindex(b"\n") + 1
        if last < size:
            f.truncate(last)
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the kd_jax config precompute will run with")
    parser.add_argument("--out", required=True, help="JSONL to write (precompute.import_logprobs)")
    parser.add_argument("--model", help="the model vLLM serves (default: teacher.hf_path)")
    parser.add_argument("--top-k", type=int, help="log-probs per position (default: data.top_k)")
    parser.add_argument("--extra", type=int, default=0, help="more per position, for a padded vocabulary")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64, help="sequences per vLLM call (and per write)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, as for kd_jax's commands")
    args = parser.parse_args(argv)

    from kd_jax.base.loader import load_config
    cfg = load_config(args.config, args.overrides)
    k = (args.top_k or cfg.data.top_k) + args.extra
    model = args.model or cfg.teacher.hf_path
    if not model or k < 1:
        parser.error("needs a model (--model or teacher.hf_path) and a K >= 1 (--top-k or data.top_k)")
    seqs = sequences(cfg)
    done = rows_written(args.out)
    print(f"{len(seqs)} sequences, {done} already in {args.out}; top-{k} from {model}", file=sys.stderr, flush=True)
    if done >= len(seqs):
        return

    from vllm import LLM, SamplingParams  # only here: the rest of the script runs without vLLM
    from vllm.inputs import TokensPrompt
    llm = LLM(model=model, tensor_parallel_size=args.tensor_parallel_size, max_logprobs=k,
              max_model_len=max(len(s) for s in seqs) + 1, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=1, prompt_logprobs=k)  # raw log-probs: no temperature applies
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as out:
        for start in range(done, len(seqs), args.batch):
            batch = seqs[start:start + args.batch]
            results = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in batch], params)
            for i, result in enumerate(results):  # vLLM returns them in the input order
                out.write(served_row(start + i, result.prompt_token_ids, result.prompt_logprobs))
            out.flush()
            print(f"{start + len(batch)}/{len(seqs)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
