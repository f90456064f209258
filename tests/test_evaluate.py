"""`kd_jax.evaluate`: answer extraction, matchers, the Wilson interval and pass@k by hand, the demo
task's step checker on hand-made traces, a held-out report on a tiny store, an external GSM8K-style
eval set end to end, and the command with --samples and --latency."""

from __future__ import annotations

import json
import math
import os
import re

import jax
import pytest
import tiny_kd

from kd_jax.base.loader import load_config
from kd_jax.base.schema import ConfigError
from kd_jax.core.evaluation import evaluate as run
from kd_jax.core.grading import (
    extract_answer,
    matcher,
    pass_at_k,
    reasoning_steps,
    reference_answer,
    wilson_interval,
)
from kd_jax.core.precompute import precompute
from kd_jax.demo.arithmetic import check_steps
from kd_jax.evaluate import main as evaluate_main


def always_true(pred, ref):  # a user matcher, named in the config as tests.test_evaluate:always_true
    return True


def test_extract_answer():
    assert extract_answer("<think>\nstep one\n\nstep two\n</think>\n\nThe answer is 42.") == "The answer is 42."
    assert extract_answer("a</think>b</think> c ") == "c"
    assert extract_answer("<think>\nno end in sight") == ""
    # eval.reasoning=false, a plain instruct model: the whole generation, if it ended (EOS)
    assert extract_answer(" Paris is where she lives. ", reasoning=False) == "Paris is where she lives."
    assert extract_answer("Paris and then on and on", reasoning=False, ended=False) == ""


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
    assert report["accuracy_low"] <= report["accuracy"] <= report["accuracy_high"]
    assert report["pass@1"] == report["accuracy"] and report["eval_set"].endswith("(held-out split)")
    assert report["generated_tokens"] > 0 and report["generation_tokens_per_s"] > 0
    assert report["parameter_bytes"] == 4 * report["parameters"]
    assert report["hard"] > 0 and 0 <= report["top1_agree"] <= 1
    with open(os.path.join(cfg.run_dir, "eval_teacher.json")) as f:
        assert json.load(f)["accuracy"] == report["accuracy"]
    # the configured matcher decides: a user function that accepts everything gives accuracy 1
    assert run(load_config(None, overrides + ["eval.matcher=test_evaluate:always_true"]), "teacher")["accuracy"] == 1.0


def test_wilson_interval_by_hand():
    z2 = 1.96 ** 2
    # 0/10: p = 0, so the interval is [0, 2 * (z²/2n) / (1 + z²/n)] = [0, z²/n / (1 + z²/n)]
    assert wilson_interval(0, 10) == pytest.approx((0.0, (z2 / 10) / (1 + z2 / 10)), abs=1e-9)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27754), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((1 - 0.27754, 1.0), abs=1e-5)
    # 5/10: centre 1/2; half width 1.96 * sqrt(0.025 + z²/400) / (1 + z²/10) = 0.26341
    half = 1.96 * math.sqrt(0.5 * 0.5 / 10 + z2 / 400) / (1 + z2 / 10)
    assert wilson_interval(5, 10) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-9)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    # 81/100: centre (0.81 + 0.019208) / 1.038416 = 0.798532, half 1.96 * sqrt(0.001539 + 0.00009604) / 1.038416
    centre, half = 0.829208 / 1.038416, 1.96 * math.sqrt(0.81 * 0.19 / 100 + z2 / 40000) / 1.038416
    assert wilson_interval(81, 100) == pytest.approx((centre - half, centre + half), abs=1e-9)
    assert wilson_interval(81, 100) == pytest.approx((0.72221, 0.87485), abs=1e-5)
    assert wilson_interval(111, 128) == pytest.approx((0.798, 0.915), abs=1e-3)  # the README's demo numbers


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0  # n - c < k: every draw of 2 holds a correct one


def test_reference_and_steps():
    assert reference_answer("She sold 48/2 = 24 clips.\n#### 72") == "72"
    assert reference_answer("a #### 1 #### 2 ") == "2" and reference_answer(18) == "18"
    assert reasoning_steps("<think>\nStart: 3.\n\n\n\nWins 2: 3 + 2 = 5.\n</think>\n\n5", "\n\n") == [
        "Start: 3.", "Wins 2: 3 + 2 = 5."]
    assert reasoning_steps("Start: 3.\n\nWins", "\n\n") == ["Start: 3.", "Wins"]  # never closed: all of it


PROBLEM = "Dev has 12 stamps, wins 2, gives away 8 and then wins 4. How many stamps does Dev have?"


def test_arithmetic_step_checker():
    right = ["Start: 12.", "Wins 2: 12 + 2 = 14.", "Gives away 8: 14 - 8 = 6.", "Wins 4: 6 + 4 = 10."]
    assert check_steps(right, PROBLEM, "10") == [True] * 4
    assert check_steps(right, "user\n" + PROBLEM + "\nassistant\n", "10") == [True] * 4  # a rendered prompt
    # wrong arithmetic: 12 + 2 = 15; the next step, from 14, does not chain from the 15 written
    wrong_sum = ["Start: 12.", "Wins 2: 12 + 2 = 15.", "Gives away 8: 14 - 8 = 6.", "Wins 4: 6 + 4 = 10."]
    assert check_steps(wrong_sum, PROBLEM, "10") == [True, False, False, True]
    # wrong chaining: right arithmetic from a count that is not the previous result (14)
    wrong_chain = ["Start: 12.", "Wins 2: 12 + 2 = 14.", "Gives away 8: 13 - 8 = 5.", "Wins 4: 5 + 4 = 9."]
    assert check_steps(wrong_chain, PROBLEM, "10") == [True, True, False, True]
    # wrong start: the rest chains correctly from it
    wrong_start = ["Start: 11.", "Wins 2: 11 + 2 = 13.", "Gives away 8: 13 - 8 = 5.", "Wins 4: 5 + 4 = 9."]
    assert check_steps(wrong_start, PROBLEM, "10") == [False, True, True, True]
    # a missing step: the later changes no longer line up with the prompt's clauses
    missing = ["Start: 12.", "Gives away 8: 12 - 8 = 4.", "Wins 4: 4 + 4 = 8."]
    assert check_steps(missing, PROBLEM, "10") == [True, False, False]
    # wrong sign, a step past the prompt's changes, and text that is not a step
    assert check_steps(["Start: 12.", "Wins 2: 12 - 2 = 10."], PROBLEM, "10") == [True, False]
    assert check_steps(right + ["Wins 1: 10 + 1 = 11."], PROBLEM, "10") == [True] * 4 + [False]
    assert check_steps(["so the count is", "Start: 12."], PROBLEM, "10") == [False, False]
    assert check_steps([], PROBLEM, "10") == []
    # the other phrasings of the same steps are right too
    other = ["Dev starts with 12 stamps.", "Dev wins 2, so 12 + 2 = 14.", "Next, Dev gives away 8: 14 - 8 = 6.",
             "Wins 4: 6 + 4 = 10."]
    assert check_steps(other, PROBLEM, "10") == [True] * 4
    assert check_steps(["At first there are 12.", "Wins 2: 12 + 2 = 14."], PROBLEM, "10") == [True, True]
    # ... but not with another name or item, or a phrasing's fields mixed up
    assert check_steps(["Ana starts with 12 stamps.", "Ana wins 2, so 12 + 2 = 14."], PROBLEM, "10") == [False, False]
    assert check_steps(["Dev starts with 12 coins."], PROBLEM, "10") == [False]
    assert check_steps(["Start: 12.", "Next, Dev wins 2: 12 + 3 = 15."], PROBLEM, "10") == [True, False]


def teacher_args(root: str) -> list[str]:
    return [f"teacher.hf_path={root}/teacher", "teacher.param_dtype=float32", "teacher.dtype=float32",
            f"run.output_dir={root}/runs", "eval.max_new_tokens=6", "train.global_batch_size=2"]


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory) -> tuple[str, str]:
    """(root with tiny_kd's teacher, a GSM8K-style JSONL eval set: question, answer '... #### n')."""
    root = str(tmp_path_factory.mktemp("eval_set"))
    tiny_kd.make(root, n_traces=8)
    path = os.path.join(root, "gsm.jsonl")
    with open(path, "w") as f:
        for a, b in ((2, 3), (4, 5), (6, 1)):
            f.write(json.dumps({"question": f"What is {a} plus {b}?",
                                "answer": f"{a} + {b} = {a + b}.\n#### {a + b}"}) + "\n")
    return root, path


def test_external_eval_set(eval_set):
    root, path = eval_set
    args = teacher_args(root) + [f"eval.data={path}"]
    report = run(load_config(None, args + ["eval.matcher=test_evaluate:always_true"]), "teacher")
    assert report["examples"] == 3 and report["eval_set"] == path
    assert report["accuracy"] == 1.0 and report["accuracy_high"] == 1.0
    assert report["accuracy_low"] == pytest.approx(wilson_interval(3, 3)[0])
    assert [s["reference"] for s in report["samples"]] == ["5", "9", "7"]  # the text after '####'
    assert "hard" not in report  # no store: no KD losses
    report = run(load_config(None, args + ["eval.step_checker=kd_jax.demo.arithmetic:check_steps"]), "teacher", 2)
    assert report["examples"] == 2 and 0.0 <= report["accuracy"] <= 1.0
    assert 0.0 <= report["step_accuracy"] <= 1.0 and 0.0 <= report["all_steps_correct"] <= 1.0
    with pytest.raises(ConfigError, match="eval.question_field"):
        run(load_config(None, args + ["eval.question_field=problem"]), "teacher")
    with pytest.raises(ConfigError, match="eval.step_checker"):
        run(load_config(None, args + ["eval.step_checker=nowhere.module:fn"]), "teacher")


def test_samples_and_latency_through_the_command(eval_set, capsys):
    root, path = eval_set
    args = teacher_args(root) + [f"eval.data={path}", "eval.matcher=test_evaluate:always_true"]
    with pytest.raises(ConfigError, match="sampling_temperature > 0"):
        load_config(None, args + ["eval.samples=3"])
    # The flags are config keys applied before the config is checked: pass_k=[3] needs the 3 samples.
    evaluate_main(["--model", "teacher", "--samples", "3", "--latency", "eval.sampling_temperature=0.7",
                   *args, "eval.max_new_tokens=16", "eval.pass_k=[1,3]"])  # 15 decode steps: above the noise
    out = capsys.readouterr().out
    assert re.search(r"accuracy  100\.0% \[\d+\.\d, 100\.0\] \(n=3, 3 samples each\)", out), out
    with open(os.path.join(root, "runs", "kd", "eval_teacher.json")) as f:
        report = json.load(f)
    assert report["samples_per_problem"] == 3 and report["correct_samples"] == 9
    assert report["pass@1"] == 1.0 and report["pass@3"] == 1.0
    assert report["platform"] == jax.devices()[0].platform and report["device_kind"]
    for b in (1, 2):  # batch 1 and train.global_batch_size
        assert report[f"ttft_ms_b{b}"] > 0 and report[f"decode_ms_per_token_b{b}"] > 0
    assert report["generation_peak_bytes"] > 0
    assert report["generation_peak_source"] in ("memory_stats", "compiled memory analysis")
    assert "ttft_ms_b1" in out and "generation_peak_bytes" in out


def test_eval_rows_without_a_reference_are_refused_not_scored(eval_set, tmp_path):
    """A null or empty reference is not a problem to score ('None' would count as a wrong answer): the
    rows are named, before any model is loaded."""
    root, _ = eval_set
    path = tmp_path / "holes.jsonl"
    rows = [{"question": "What is 1 plus 1?", "answer": "2"}, {"question": "What is 2 plus 2?", "answer": None},
            {"question": "What is 3 plus 3?", "answer": "  "}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"row\(s\) 1, 2 have no reference answer in 'answer'"):
        run(load_config(None, teacher_args(root) + [f"eval.data={path}"]), "teacher")


def test_a_plain_instruct_model_is_scored_on_its_whole_answer(monkeypatch, capsys):
    """eval.reasoning=false: a model that does not think is scored on its whole generation when it
    ended (EOS); a generation cut at max_new_tokens scores wrong, as an unclosed think block does.
    With the default (reasoning) the same generations, having no think close, all score wrong."""
    import dataclasses

    from kd_jax.base.schema import EvalConfig
    from kd_jax.core import evaluation
    EOS = 0
    outputs = {(1,): "Paris", (2,): "It is Lima and", (3,): "Oslo"}  # prompt ids -> generated text

    class Tok:
        eos_token_id = EOS

        def decode(self, ids, **_):
            return "".join(chr(i) for i in ids)
    problems = [evaluation.Problem([1], "q1", "Paris"), evaluation.Problem([2], "q2", "Lima"),
                evaluation.Problem([3], "q3", "Oslo")]

    def fake(model, prompts, **_):  # the second one runs out of tokens: no EOS
        return [[ord(c) for c in outputs[tuple(p)]] + ([] if tuple(p) == (2,) else [EOS]) for p in prompts]
    monkeypatch.setattr(evaluation, "generate", fake)
    plain = EvalConfig(matcher="tests.test_evaluate:contains", reasoning=False)
    report = evaluation.task_accuracy(None, Tok(), problems, plain, batch_size=3, show_progress=True)
    assert report["correct_samples"] == 2 and report["samples"][0]["prediction"] == "Paris"
    err = capsys.readouterr().err  # the progress of a long evaluation (it was silent until the table)
    assert "generate: 100%" in err and "3/3" in err
    assert evaluation.task_accuracy(None, Tok(), problems, dataclasses.replace(plain, reasoning=True),
                                    batch_size=3)["correct_samples"] == 0


def contains(pred, ref):  # a user matcher: the reference named in the answer
    return ref in pred
