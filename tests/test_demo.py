"""The embedded demo: its task is verifiable, its tokenizer fits it, a tokens-only store trains a
model on hard labels, and a reduced `python -m kd_jax.demo` runs every stage and prints the table."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys

import demo_cli
import numpy as np
import pytest
import yaml

from kd_jax.base.loader import load_config
from kd_jax.base.schema import ConfigError
from kd_jax.core import losses
from kd_jax.core.grading import extract_answer
from kd_jax.data.store import KDStore
from kd_jax.demo import arithmetic as demo
from kd_jax.demo.arithmetic import check_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OPS = {"finds": 1, "buys": 1, "wins": 1, "loses": -1, "gives away": -1, "sells": -1}


def test_problems_are_verifiable_step_by_step():
    forms = collections.Counter()
    for p in demo.problems(400, seed=3):
        start, changes = re.match(r"\w+ has (\d+) \w+, (.*)\. How many", p["prompt"]).groups()
        changes = [re.match(r"(.+) (\d+)$", c).groups() for c in re.split(r", | and then ", changes)]
        total = int(start)
        for verb, n in changes:
            total += _OPS[verb] * int(n)
            assert 0 <= total <= 20
        assert p["answer"] == str(total) and 2 <= len(changes) <= 3
        steps = p["reasoning"].split("\n\n")
        assert check_steps(steps, p["prompt"], p["answer"]) == [True] * len(steps)  # every step right
        assert steps[-1].endswith(f"= {total}.") and len(steps) == len(changes) + 1  # one step per change
        forms.update(_form(s) for s in steps)
    # several phrasings of each kind of step, each drawn often: a reference step is one of many right ones
    assert all(forms[f] > 40 for f in demo.START_FORMS + demo.CHANGE_FORMS), forms
    assert demo.problems(5, seed=1) == demo.problems(5, seed=1) != demo.problems(5, seed=2)


def _form(step: str) -> str:
    """Which phrasing of arithmetic.START_FORMS / CHANGE_FORMS a step is written in."""
    for form in demo.START_FORMS + demo.CHANGE_FORMS:
        if demo.form_regex(form).fullmatch(step):
            return form
    raise AssertionError(f"step {step!r} has no known phrasing")


def test_tokenizer_keeps_think_tags_and_small_numbers_whole(tmp_path):
    paths = demo.write(str(tmp_path), n=2000)
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(paths["tokenizer"])
    assert len(tok) <= 448  # every merge the corpus has (the models keep 448 output rows)
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


@pytest.mark.slow
def test_reduced_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    # The teacher trains twice the students' reduced share: trained only 5% of its steps, it may answer no
    # prompt right on some machines, and the teacher-traces row would have nothing to train on.
    stdout = demo_cli.run_demo(out, "--scale", "0.05", "--teacher-scale", "0.1", "--max-examples", "8", "--fresh")
    for stage in range(1, 7):
        assert f"=== [{stage}/6]" in stdout
    report = json.load(open(out / "demo_report.json"))
    rows = {r["row"]: r for r in report["rows"]}
    runs = {r["row"]: r for r in report["runs"]}
    # every row, the teacher's verified traces included: a row skipped is a failure here
    assert "no row 'teacher traces'" not in stdout
    assert list(rows) == ["teacher", "hard", "soft+hard", "teacher traces", "on-policy"]
    for r in rows.values():
        assert 0.0 <= r["task_low"] <= r["task"] <= r["task_high"] <= 1.0 and r["task_n"] == 8
        assert 0.0 <= r["step_task"] <= 1.0 and np.isfinite(r["ce"]) and r["train_s"] > 0
        assert r["row"] in stdout  # the table
    hard = runs["hard"]
    for name, r in runs.items():  # points at the saved quarters of training, in compute, the final one last
        assert r["eval_set"].endswith("heldout.jsonl")
        assert r["gflop"] == pytest.approx(hard["gflop"], rel=0.1)  # the same training compute
        x = [p["gflop"] for p in r["curve"]]
        assert x == sorted(x) and x[-1] == pytest.approx(r["gflop"]) and len(x) >= 4, x
        assert r["curve"][-1]["task"] == r["task"]
    # on-policy continues the hard row from its half-way checkpoint, with fewer steps for the teacher and sampling
    half, own = map(int, runs["on-policy"]["steps"].split("+"))
    assert 2 * half == hard["steps"] and own < half
    assert runs["on-policy"]["curve"][:2] == [p for p in hard["curve"] if p["step"] <= half]
    # one seed: the numbers, the teacher's check, and no verdict
    assert report["verdicts"] == [v for v in report["verdicts"] if v.startswith("no verdict")] and report["verdicts"]
    assert all(line in stdout for line in report["checks"] + report["verdicts"])
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train_prompts = {json.loads(line)["prompt"] for line in open(out / "data" / "traces.jsonl")}
    held_out = [json.loads(line)["question"] for line in open(out / "data" / "heldout.jsonl")]
    assert len(held_out) == 8 and not train_prompts & set(held_out)
    teacher = report["references"][0]
    assert hard["parameters"] < teacher["parameters"]
    assert teacher["top1_agree"] > 0.99  # scored against its own stored top-K
    assert runs["hard"]["steps"] == runs["soft+hard"]["steps"]  # the same budget
    # the tokens-only store behind the teacher, and the teacher's top-16 behind the students
    assert KDStore.open(str(out / "tokens_store")).meta.k == 0
    assert KDStore.open(str(out / "kd_store")).meta.k == 16
    # the exported best student, loaded by transformers, answered a held-out problem
    assert report["best"] in rows and os.path.isfile(out / "export" / "config.json")
    assert report["generated"] and report["generated"] in stdout
    # the commands each stage prints are exact for this --out: the students' config they name resolves
    # to this run's store, teacher and runs folder
    command = re.search(r"\(python -m kd_jax\.train (--config \S+student\.yaml .*?)\)\n", stdout).group(1)
    resolved = subprocess.run([sys.executable, "-m", "kd_jax.config", *command.split()], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert resolved.returncode == 0, resolved.stderr
    cfg = yaml.safe_load(resolved.stdout)
    assert (cfg["data"]["store"], cfg["teacher"]["hf_path"], cfg["run"]["output_dir"]) == (
        f"{out}/kd_store", f"{out}/teacher/hf", str(out))
    # a second run reuses every finished stage and prints the same table
    again_out = demo_cli.run_demo(out, "--scale", "0.05", "--teacher-scale", "0.1", "--max-examples", "8")
    again = json.load(open(out / "demo_report.json"))
    assert [r["task"] for r in again["rows"]] == [r["task"] for r in report["rows"]]
    assert "built again" not in again_out and "=== [5/6] student" in again_out
    # a changed setting redoes what it changes: the held-out problems, and every stage made from them
    changed = demo_cli.run_demo(out, "--scale", "0.05", "--teacher-scale", "0.1", "--max-examples", "16",
                                "--rows", "soft+hard")
    assert "data: made from other inputs (held_out: 8 -> 16)" in changed
    assert json.load(open(out / "demo_report.json"))["rows"][0]["task_n"] == 16


def test_demo_refuses_bad_arguments_before_touching_the_folder(tmp_path, capsys):
    from kd_jax.demo.__main__ import main
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    for argv, said in ((["--rows", "nonsense"], "unknown demo rows"),
                       (["--steps", "8"], "--steps is for --recipe prune"),
                       (["--seeds", "0,x"], "comma-separated integers"), (["--max-examples", "9"], "does not split"),
                       (["--recipe", "prune", "--seed", "5"], "--seed is for --recipe r1"),
                       (["--recipe", "prune", "--held-out-docs", "-3"], "--held-out-docs -3: must be at least 1"),
                       (["--recipe", "prune", "--seeds", "-1"], "distinct non-negative"),
                       (["--recipe", "prune", "student.prune.layer=8"], "student.prune.layer"),
                       (["--recipe", "prune", "--rows", "nonsense"], "unknown rows ['nonsense']"),
                       (["--recipe", "prune", "--seeds", "a,b"], "comma-separated integers"),
                       (["--recipe", "prune", "--held-out-docs", "0"], "--held-out-docs 0: must be at least 1")):
        with pytest.raises(SystemExit):
            main(["--out", str(out), "--fresh", *argv])
        assert said in capsys.readouterr().err, argv
    assert os.listdir(out) == ["notes.txt"]
    for recipe in ("r1", "prune"):  # --out a file: one line, before the teacher's conversion or any stage
        with pytest.raises(SystemExit):
            main(["--recipe", recipe, "--out", str(out / "notes.txt")])
        assert "notes.txt is a file, not a folder" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep"
    # the user's own data/ (the prune demo's text stage) is refused, with or without --fresh, byte for byte kept
    (out / "data").mkdir()
    (out / "data" / "train.jsonl").write_bytes(b'{"text": "mine"}\n')
    for fresh in ([], ["--fresh"]):
        with pytest.raises(SystemExit):
            main(["--recipe", "prune", "--out", str(out), *fresh])
        assert "data exists and was not written by this comparison" in capsys.readouterr().err
        assert (out / "data" / "train.jsonl").read_bytes() == b'{"text": "mine"}\n'
        assert sorted(os.listdir(out)) == ["data", "notes.txt"]


def test_the_demo_runs_on_two_devices_whatever_the_core_count():
    """The device count changes the demo's numbers (docs/demo.md), the core count must not: 2 CPU
    devices on an 8-core machine as on this one; a device count the user put in XLA_FLAGS wins."""
    code = ("import os; os.cpu_count = lambda: 8; import kd_jax.demo.__main__; print(os.environ['XLA_FLAGS'])")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["--xla_force_host_platform_device_count=2"]
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["--xla_force_host_platform_device_count=4"]
