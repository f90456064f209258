"""`kd_jax.evaluate`: answer extraction, matchers, and a held-out report on a tiny store."""

from __future__ import annotations

import json
import os

import pytest
import tiny_kd

from kd_jax.core.config import load_config
from kd_jax.core.evaluation import evaluate as run
from kd_jax.core.evaluation import extract_answer, matcher
from kd_jax.core.teacher import precompute


def always_true(pred, ref):  # a user matcher, named in the config as tests.test_evaluate:always_true
    return True


def test_extract_answer():
    assert extract_answer("<think>\nstep one\n\nstep two\n</think>\n\nThe answer is 42.") == "The answer is 42."
    assert extract_answer("a</think>b</think> c ") == "c"
    assert extract_answer("<think>\nno end in sight") == ""


def test_matchers():
    numeric, exact = matcher("numeric"), matcher("exact")
    assert numeric("so it is 38.5", "38.5") and numeric("12", "The answer is 12.0")
    assert not numeric("12.5", "12") and not numeric("no number", "3")
    assert exact(" The  answer\nis 5 ", "The answer is 5") and not exact("5", "five")
    assert matcher("test_evaluate:always_true")("x", "y")
    with pytest.raises(ValueError, match="eval.matcher"):
        matcher("nowhere.module:fn")


def test_report_on_a_tiny_store(tmp_path):
    root = str(tmp_path)
    tiny_kd.make(root, n_traces=16)
    overrides = [f"teacher.hf_path={root}/teacher", "teacher.param_dtype=float32", "teacher.dtype=float32",
                 f"data.traces={root}/traces.jsonl", f"data.store={root}/store", "data.top_k=8",
                 "data.seq_len=256", f"run.output_dir={root}/runs", "data.eval_fraction=0.25",
                 "eval.max_new_tokens=8", "eval.matcher=exact", "train.global_batch_size=8",
                 "precompute.chunk_tokens=256", "precompute.bucket=32"]
    cfg = load_config(None, overrides)
    precompute(cfg, show_progress=False)
    report = run(cfg, "teacher")
    assert report["examples"] == 4 and 0.0 <= report["accuracy"] <= 1.0
    assert report["generated_tokens"] > 0 and report["generation_tokens_per_s"] > 0
    assert report["parameter_bytes"] == 4 * report["parameters"]
    assert report["hard"] > 0 and 0 <= report["top1_agree"] <= 1
    with open(os.path.join(cfg.run_dir, "eval_teacher.json")) as f:
        assert json.load(f)["accuracy"] == report["accuracy"]
    # the configured matcher decides: a user function that accepts everything gives accuracy 1
    assert run(load_config(None, overrides + ["eval.matcher=test_evaluate:always_true"]), "teacher")["accuracy"] == 1.0
