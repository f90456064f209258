"""A tiny teacher folder for store/precompute tests: a byte-level BPE tokenizer trained in-process
with a ChatML template, a random llama teacher whose vocab is padded past the tokenizer's (as
Qwen's is), and a JSONL of R1-style traces (test support)."""

from __future__ import annotations

import json
import os

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import hf_tiny

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def traces(n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        steps = [f"Step {j}: add {i + j} and {j + 1} to get {i + 2 * j + 1}." for j in range(1 + i % 4)]
        rows.append({"prompt": f"What is {i} plus {i + 3}? Think step by step.",
                     "reasoning": "\n\n".join(steps) * (1 + i % 3),
                     "answer": f"The answer is {2 * i + 3}."})
    return rows


def tokenizer(corpus: list[str]) -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>", bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


def make(root: str, n_traces: int = 12, pad_vocab: int = 16) -> tuple[str, str]:
    """(teacher folder with tokenizer, traces.jsonl path) under `root`."""
    rows = traces(n_traces)
    tok = tokenizer([r["prompt"] + r["reasoning"] + r["answer"] for r in rows])
    model = hf_tiny.build("llama3", vocab_size=len(tok) + pad_vocab, num_hidden_layers=2)
    teacher = os.path.join(root, "teacher")
    model.save_pretrained(teacher)
    tok.save_pretrained(teacher)
    path = os.path.join(root, "traces.jsonl")
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return teacher, path
