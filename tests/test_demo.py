"""The embedded demo: its task is verifiable, its tokenizer fits it, a tokens-only store trains a
model on hard labels, and a reduced `python -m kd_jax.demo` runs every stage and prints the table."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from kd_jax.core import losses
from kd_jax.core.config import ConfigError, load_config
from kd_jax.core.evaluation import extract_answer
from kd_jax.data import arithmetic as demo
from kd_jax.data.store import KDStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OPS = {"finds": 1, "buys": 1, "wins": 1, "loses": -1, "gives away": -1, "sells": -1}


def test_problems_are_verifiable_step_by_step():
    for p in demo.problems(300, seed=3):
        start, changes = re.match(r"\w+ has (\d+) \w+, (.*)\. How many", p["prompt"]).groups()
        changes = [re.match(r"(.+) (\d+)$", c).groups() for c in re.split(r", | and then ", changes)]
        total = int(start)
        steps = p["reasoning"].split("\n\n")
        assert steps[0] == f"Start: {start}." and len(steps) == len(changes) + 1 and 2 <= len(changes) <= 3
        for (verb, n), step in zip(changes, steps[1:]):  # one paragraph per change, arithmetic right
            new = total + _OPS[verb] * int(n)
            assert step == f"{verb.capitalize()} {n}: {total} {'+' if _OPS[verb] > 0 else '-'} {n} = {new}."
            assert 0 <= new <= 40
            total = new
        assert p["answer"] == str(total)
    assert demo.problems(5, seed=1) == demo.problems(5, seed=1) != demo.problems(5, seed=2)


def test_tokenizer_keeps_think_tags_and_small_numbers_whole(tmp_path):
    paths = demo.write(str(tmp_path), n=500)
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(paths["tokenizer"])
    assert len(tok) == 384
    ids = tok("x</think>\n\n17")["input_ids"]
    assert tok.decode(ids) == "x</think>\n\n17"  # not a special token: decode keeps it
    vocab = tok.get_vocab()
    assert all(f"Ġ{n}" in vocab for n in range(21))  # the frequent counts are one token each
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert extract_answer("Start: 3.\n</think>\n\n12") == "12"


def test_no_teacher_needs_alpha_zero():
    with pytest.raises(ConfigError, match="loss.alpha=0"):
        load_config(None, ["data.top_k=0"])
    load_config(None, ["data.top_k=0", "loss.alpha=0"])


def test_loss_without_teacher_rows_is_the_hard_loss():
    rng = np.random.default_rng(0)
    h, w = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(8, 32)).astype(np.float32)
    labels, a, b = rng.integers(0, 32, 16), np.zeros(16, np.float32), np.full(16, 1 / 16, np.float32)
    ids = rng.integers(0, 32, (16, 4)).astype(np.int32)
    lp = np.log(np.full((16, 4), 0.2, np.float32))
    none, m0 = losses.kd_loss(h, w, labels, ids[:, :0], lp[:, :0], a, b, chunk_size=8)
    with_k, m4 = losses.kd_loss(h, w, labels, ids, lp, a, b, chunk_size=8)
    np.testing.assert_allclose(none, with_k, rtol=1e-6)
    assert float(m0["soft_sum"]) == 0.0 and float(m0["top1_agree"]) == 0.0
    np.testing.assert_allclose(float(m0["hard_sum"]), float(m4["hard_sum"]), rtol=1e-6)


def _demo(out, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the demo picks its own CPU device count
    p = subprocess.run([sys.executable, "-m", "kd_jax.demo", "--out", str(out), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout


@pytest.mark.slow
def test_reduced_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    stdout = _demo(out, "--scale", "0.05", "--max-examples", "8", "--fresh")
    for stage in range(1, 7):
        assert f"=== [{stage}/6]" in stdout
    report = json.load(open(out / "demo_report.json"))
    rows = {r["model"]: r for r in report["rows"]}
    assert list(rows) == ["teacher", "student: hard", "student: soft+hard", "student: soft+hard+step"]
    for r in rows.values():
        assert 0.0 <= r["accuracy_low"] <= r["accuracy"] <= r["accuracy_high"] <= 1.0 and r["examples"] == 8
        assert 0.0 <= r["step_accuracy"] <= 1.0 and r["eval_set"].endswith("heldout.jsonl")
        assert np.isfinite(r["hard"]) and r["generation_tokens_per_s"] > 0 and r["train_s"] > 0
        assert r["model"] in stdout  # the table
    for name, r in rows.items():  # a point at each saved quarter of training, the final one last
        if name != "teacher":
            steps = [p["step"] for p in r["curve"]]
            assert steps == sorted(steps) and steps[-1] == r["steps"] and len(steps) >= 3, steps
            assert r["curve"][-1]["accuracy"] == r["accuracy"]
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train_prompts = {json.loads(line)["prompt"] for line in open(out / "data" / "traces.jsonl")}
    held_out = [json.loads(line)["question"] for line in open(out / "data" / "heldout.jsonl")]
    assert len(held_out) == 8 and not train_prompts & set(held_out)
    assert rows["student: hard"]["parameters"] < rows["teacher"]["parameters"]
    assert rows["teacher"]["top1_agree"] > 0.99  # scored against its own stored top-K
    assert rows["student: hard"]["steps"] == rows["student: soft+hard+step"]["steps"]  # the same budget
    # the tokens-only store behind the teacher, and the teacher's top-16 behind the students
    assert KDStore.open(str(out / "tokens_store")).meta.k == 0
    assert KDStore.open(str(out / "kd_store")).meta.k == 16
    # the exported best student, loaded by transformers, answered a held-out problem
    assert report["best"] in rows and os.path.isfile(out / "export" / "config.json")
    assert report["generated"] and report["generated"] in stdout
    # a second run reuses every finished stage and prints the same table
    _demo(out, "--scale", "0.05", "--max-examples", "8")
    again = json.load(open(out / "demo_report.json"))
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in report["rows"]]
