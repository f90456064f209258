"""The embedded demo task: multi-step arithmetic word problems with verifiable answers, and a
tokenizer trained on them (`make demo`, kd_jax/demo/recipe.py).

A problem is a starting count and 2 to `max_ops` changes to it (of 1 to `max_change`, the count
stays within 0..`max_value`: 5 and 20 by default); the reasoning writes one step per paragraph (the start, then one paragraph per
change with its arithmetic spelled out), each step in one of several equivalent phrasings drawn at
random, as real traces vary; the answer is the final count, so
`eval.matcher=numeric` checks it. Numbers are drawn at random, so held-out problems are new
problems, not repeats.

    python -m kd_jax.demo.arithmetic --out runs/demo/data --n 6000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

NAMES = ("Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "June", "Kai", "Lea", "Milo", "Nia")
ITEMS = ("apples", "coins", "stamps", "marbles", "books", "shells", "cards", "pens")
GAIN = ("finds", "buys", "wins")
LOSE = ("loses", "gives away", "sells")

# ChatML, as Qwen and SmolLM2 use it; kd_jax appends <think>…</think> and the answer itself.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TAGS = ["<think>", "</think>"]  # added tokens, not special ones (as Qwen's): decode() keeps them


# Equivalent phrasings of a step, picked at random per step, so the reference trace is one sample of
# several correct continuations (as in real reasoning traces, where a step may open with "So", "Then" or
# "Next") and a teacher's next-token distribution spreads over them. Every phrasing states the change
# before its arithmetic; {V}/{v} is the verb, {name}/{item} the prompt's.
START_FORMS = ("Start: {s}.", "{name} starts with {s} {item}.", "At first there are {s}.")
CHANGE_FORMS = ("{V} {n}: {a} {op} {n} = {b}.", "{name} {v} {n}, so {a} {op} {n} = {b}.",
                "Next, {name} {v} {n}: {a} {op} {n} = {b}.")


def problem(rng: random.Random, max_ops: int = 3, max_value: int = 20, max_change: int = 5) -> dict:
    """One trace: {"prompt", "reasoning", "answer"} (the r1 format of kd_jax.data.traces)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = total = rng.randint(1, max_value - max_change)
    clauses, steps = [], [rng.choice(START_FORMS).format(s=start, name=name, item=item)]
    for _ in range(rng.randint(2, max_ops)):
        if total >= 1 and (total > max_value - max_change or rng.random() < 0.45):
            n = rng.randint(1, min(max_change, total))
            verb, new, sign = rng.choice(LOSE), total - n, "-"
        else:
            n = rng.randint(1, max_change)
            verb, new, sign = rng.choice(GAIN), total + n, "+"
        clauses.append(f"{verb} {n}")
        steps.append(rng.choice(CHANGE_FORMS).format(V=verb.capitalize(), v=verb, n=n, a=total, op=sign, b=new,
                                                     name=name))
        total = new
    changes = ", ".join(clauses[:-1]) + " and then " + clauses[-1]
    return {"prompt": f"{name} has {start} {item}, {changes}. How many {item} does {name} have?",
            "reasoning": "\n\n".join(steps), "answer": str(total)}


def problems(n: int, seed: int = 0, max_ops: int = 3) -> list[dict]:
    rng = random.Random(seed)
    return [problem(rng, max_ops) for _ in range(n)]


_VERB = "(" + "|".join(GAIN + LOSE) + ")"
_PROMPT = re.compile(r"(\w+) has (\d+) (\w+), ")
_CLAUSE = re.compile(r"\b" + _VERB + r" (\d+)\b")


def form_regex(form: str) -> re.Pattern:
    """A phrasing as a regex with one named group per field ({n} twice becomes a back-reference)."""
    fields = {"s": r"\d+", "a": r"\d+", "b": r"-?\d+", "n": r"\d+", "op": "[+-]",
              "name": r"\w+", "item": r"\w+", "v": _VERB[1:-1],
              "V": "|".join(v.capitalize() for v in GAIN + LOSE)}
    out, seen = "", set()
    for literal, field, _, _ in __import__("string").Formatter().parse(form):
        out += re.escape(literal)
        if field is not None:
            out += f"(?P={field})" if field in seen else f"(?P<{field}>{fields[field]})"
            seen.add(field)
    return re.compile(out)


_START_RES = [form_regex(f) for f in START_FORMS]
_CHANGE_RES = [form_regex(f) for f in CHANGE_FORMS]


def _match(regexes, text: str) -> dict | None:
    for r in regexes:
        if m := r.fullmatch(text):
            return m.groupdict()
    return None


def check_steps(steps: list[str], prompt: str, reference: str) -> list[bool]:
    """An `eval.step_checker` for this task (kd_jax.demo.arithmetic:check_steps): one bool per
    reasoning step, in any of the task's phrasings (START_FORMS, CHANGE_FORMS). Step 0 must state the
    prompt's starting count (and its name and item where the phrasing has them); step i >= 1 must
    state the prompt's i-th change (its verb and n; the name where the phrasing has it) as
    "a op n = b" with `op` the verb's sign, `a` the previous step's result as written (so one wrong
    step does not fail the ones that follow it correctly) and a op n == b. A step past the prompt's
    changes, or one that does not parse, is wrong. `reference` is not needed: the prompt fixes every step."""
    head = _PROMPT.search(prompt)
    name, start, item = (head.group(1), int(head.group(2)), head.group(3)) if head else (None, None, None)
    clauses = [(verb, int(n)) for verb, n in _CLAUSE.findall(prompt)]
    out, previous = [], None
    for i, step in enumerate(steps):
        text = step.strip()
        m = _match(_START_RES if i == 0 else _CHANGE_RES, text)
        if i == 0:
            previous = int(m["s"]) if m else None
            out.append(bool(m and head and int(m["s"]) == start and m.get("name", name) == name
                            and m.get("item", item) == item))
            continue
        if m is None:
            out.append(False)
            previous = None
            continue
        verb, n, a, b = (m.get("v") or m["V"]).lower(), int(m["n"]), int(m["a"]), int(m["b"])
        out.append(i <= len(clauses) and clauses[i - 1] == (verb, n) and m.get("name", name) == name
                   and m["op"] == ("+" if verb in GAIN else "-") and a == previous
                   and (a + n if m["op"] == "+" else a - n) == b)
        previous = b
    return out


def train_tokenizer(corpus: list[str], vocab_size: int = 300,
                    individual_digits: bool = False) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus` with the `tokenizers` library, with a ChatML
    chat template and <think> tags as special tokens, as an HF fast tokenizer (save_pretrained
    writes the HF folder). individual_digits: numbers become one token per digit, as Llama 3 and
    Qwen split them, so arithmetic is learned digit by digit."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if individual_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size - len(THINK_TAGS), special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens(THINK_TAGS)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>", bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


def write(out: str, n: int, seed: int = 0, max_ops: int = 3, vocab_size: int = 448) -> dict[str, str]:
    """traces.jsonl and an HF tokenizer folder under `out`; returns their paths."""
    rows = problems(n, seed, max_ops)
    os.makedirs(out, exist_ok=True)
    traces = os.path.join(out, "traces.jsonl")
    with open(traces, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    corpus = [f"{r['prompt']}\n{r['reasoning']}\n{r['answer']}" for r in rows]
    tokenizer = os.path.join(out, "tokenizer")
    train_tokenizer(corpus, vocab_size).save_pretrained(tokenizer)  # counts 0..20 become one token each
    return {"traces": traces, "tokenizer": tokenizer}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for traces.jsonl and tokenizer/")
    parser.add_argument("--n", type=int, default=6000, help="number of problems (the demo uses 6000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-ops", type=int, default=3, help="most changes per problem (at least 2)")
    parser.add_argument("--vocab-size", type=int, default=448, help="BPE vocabulary size")
    args = parser.parse_args(argv)
    paths = write(args.out, args.n, args.seed, args.max_ops, args.vocab_size)
    print(f"wrote {args.n} problems to {paths['traces']} and a tokenizer to {paths['tokenizer']}")


if __name__ == "__main__":
    main()
