"""A tiny teacher folder for store/precompute tests: the demo's byte-level BPE tokenizer with a
ChatML template (kd_jax.data.demo) trained in-process, a random llama teacher whose vocab is
padded past the tokenizer's (as Qwen's is), and a JSONL of R1-style traces (test support)."""

from __future__ import annotations

import json
import os

import hf_tiny
from kd_jax.data.demo import train_tokenizer


def traces(n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        steps = [f"Step {j}: add {i + j} and {j + 1} to get {i + 2 * j + 1}." for j in range(1 + i % 4)]
        rows.append({"prompt": f"What is {i} plus {i + 3}? Think step by step.",
                     "reasoning": "\n\n".join(steps) * (1 + i % 3),
                     "answer": f"The answer is {2 * i + 3}."})
    return rows


def make(root: str, n_traces: int = 12, pad_vocab: int = 16) -> tuple[str, str]:
    """(teacher folder with tokenizer, traces.jsonl path) under `root`."""
    rows = traces(n_traces)
    tok = train_tokenizer([r["prompt"] + r["reasoning"] + r["answer"] for r in rows], vocab_size=300)
    model = hf_tiny.build("llama3", vocab_size=len(tok) + pad_vocab, num_hidden_layers=2)
    teacher = os.path.join(root, "teacher")
    model.save_pretrained(teacher)
    tok.save_pretrained(teacher)
    path = os.path.join(root, "traces.jsonl")
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return teacher, path
