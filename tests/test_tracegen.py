"""`python -m kd_jax.generate`: the teacher writes r1 traces. The R1 filters and keep policies on
scripted samples, the pass@k estimator by hand, a tiny random teacher's traces read by precompute,
a rerun that resumes, SIGKILL + rerun and two processes byte for byte equal to one uninterrupted
process, the one-line errors, and `python -m kd_jax.bench generate` in a tiny mode."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tiny_kd
import torch
import transformers

from kd_jax.base.loader import load_config
from kd_jax.base.schema import ConfigError
from kd_jax.bench.__main__ import main as bench_main
from kd_jax.core import tracegen
from kd_jax.core.precompute import precompute
from kd_jax.data.store import KDStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def even_length(prediction: str, reference: str) -> bool:
    """A matcher that makes verification deterministic: correct iff the answer's length is even."""
    return len(prediction) % 2 == 0


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> tuple[str, str]:
    """(teacher folder, prompts.jsonl): tiny_kd's random teacher with its think-close and EOS rows
    scaled up, so that about half its samples close the reasoning and most of those end."""
    root = str(tmp_path_factory.mktemp("tracegen"))
    folder, traces = tiny_kd.make(root, n_traces=12)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight[tok.convert_tokens_to_ids("</think>")] *= 5.0
        model.lm_head.weight[tok.eos_token_id] *= 4.0
    model.save_pretrained(folder)
    return folder, traces  # traces.jsonl: prompt, reasoning, answer (the reference) per row


def overrides(teacher_dir: str, prompts: str, out: str, **extra) -> list[str]:
    kw = {"teacher.hf_path": teacher_dir, "teacher.param_dtype": "float32", "teacher.dtype": "float32",
          "generate.prompts": prompts, "generate.out": out, "generate.samples_per_prompt": 4,
          "generate.max_new_tokens": 48, "generate.temperature": 1.0, "generate.batch_size": 6,
          "generate.prompts_per_shard": 4, "generate.bucket": 32, "generate.keep": "all",
          "eval.matcher": "test_tracegen:even_length", **extra}
    return [f"{k}={v}" for k, v in kw.items()]


TIMING = ("generation_seconds", "tokens_per_s")


def _untimed(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in TIMING}


# ---------------------------------------------------------------- pieces


def test_pass_at_k_by_hand():
    assert tracegen.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert tracegen.pass_at_k(4, 1, 4) == 1.0 and tracegen.pass_at_k(4, 0, 4) == 0.0
    assert tracegen.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert tracegen.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    marks = [{"correct": [0, 2], "samples": 8, "kept": 2, "generated_tokens": 100, "seconds": 2.0,
              "dropped": dict.fromkeys(tracegen.DROP_REASONS, 0)},
             {"correct": [4], "samples": 4, "kept": 4, "generated_tokens": 50, "seconds": 1.0,
              "dropped": {**dict.fromkeys(tracegen.DROP_REASONS, 0), "wrong": 6}}]
    report = tracegen.pass_summary(marks, 4, verified=True)
    assert report["pass_at_k"] == {"pass@1": pytest.approx((0 + 0.5 + 1) / 3),
                                   "pass@4": pytest.approx((0 + 1 + 1) / 3)}
    assert report["pass_rate_histogram"] == {"0/4": 1, "1/4": 0, "2/4": 1, "3/4": 0, "4/4": 1}
    assert report["prompts"] == 3 and report["samples"] == 12 and report["kept"] == 6
    assert report["dropped"]["wrong"] == 6 and report["tokens_per_s"] == pytest.approx(50.0)


def test_split_sample_and_scripts():
    split = tracegen.split_sample
    assert split("<think>\nsteps\n</think>\n\n42", "<think>", "</think>", inside=False) == ("steps", "42")
    assert split("steps</think>42", "<think>", "</think>", inside=False) == ("steps", "42")  # opening tag lost
    assert split("steps\n</think>\n\n42", "<think>", "</think>", inside=True) == ("steps", "42")
    assert split("a</think>b</think> 7", "<think>", "</think>", inside=True) == ("a</think>b", "7")  # as evaluate
    assert split("<think>no end", "<think>", "</think>", inside=False) is None
    share = tracegen.mixed_script_share
    assert share("Let x = 3, so 2x = 6.") == 0.0
    assert share("Let θ = π/2 and α be the angle; done.") == 0.0  # Greek letters are math notation
    assert share("Café, naïve, façade") == 0.0  # accented Latin is Latin
    assert share("ひらがなとカタカナと漢字") == 0.0  # Japanese: one script
    assert share("First add them 所以答案是") == pytest.approx(5 / 17)  # 12 Latin letters, 5 CJK
    assert share("Сначала add") == pytest.approx(3 / 10)  # 7 Cyrillic letters, 3 Latin


def test_config_checks():
    with pytest.raises(ConfigError, match="reference_field"):
        load_config(None, ["generate.reference_field=null"])  # keep=correct needs a reference
    load_config(None, ["generate.reference_field=null", "generate.keep=all"])
    with pytest.raises(ConfigError, match="keep"):
        load_config(None, ["generate.keep=best"])


def test_a_template_that_opens_the_reasoning(teacher, tmp_path):
    """DeepSeek-R1-Distill's template ends with `<think>\\n`: the samples then start inside it."""
    tok = transformers.AutoTokenizer.from_pretrained(teacher[0])
    cfg = load_config(None, overrides(teacher[0], teacher[1], str(tmp_path / "o")))
    dataset = tracegen.load_prompts(cfg.generate)
    assert not tracegen.render_prompts(cfg, dataset, tok, range(2))[0].inside
    tok.chat_template = tok.chat_template.replace("assistant\n", "assistant\n<think>\n")
    prompts = tracegen.render_prompts(cfg, dataset, tok, range(2))
    assert prompts[0].inside and tok.decode(prompts[0].tokens).endswith("<think>\n")


# ---------------------------------------------------------------- the filters and keep, scripted

# Samples per prompt, as the teacher would have written them (EOS appended), and what happens to
# them: the filters run first, then the even_length matcher decides correct / wrong.
SCRIPTS = [
    ["a b\n</think>\n\n42",  # correct
     "c</think>\n\n7",  # wrong
     "a b\n</think>\n\n42",  # duplicate of sample 0 (still counts as correct for the pass rate)
     "never closed"],  # unfinished
    ["</think>",  # empty answer
     " ".join(["many words of reasoning"] * 8) + "</think>xy",  # too long (correct, dropped)
     "short</think>ab",  # correct, the shortest
     "a longer middle reasoning</think>cd"],  # correct
    ["English words 中文中文中文中文 more</think>ok",  # mixed scripts (correct, dropped)
     "x</think>odd",  # wrong
     "fine reasoning</think>no",  # correct
     "y</think>yes"],  # wrong
]
CORRECT = [2, 3, 2]  # per prompt, whatever the filters drop
FILTERED = {"unfinished": 1, "duplicate": 1, "empty_answer": 1, "too_long": 1, "language_mix": 1}
# (prompt, sample) written by each keep policy
KEPT = {"all": [(0, 0), (0, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)],
        "correct": [(0, 0), (1, 2), (1, 3), (2, 2)],
        "first_correct": [(0, 0), (1, 2), (2, 2)],
        "shortest_correct": [(0, 0), (1, 2), (2, 2)]}


def _scripted_generate(tokenizer, seed):
    """A stand-in for models.sampling.generate that answers each row from SCRIPTS by its key."""
    index = {}
    for p, samples in enumerate(SCRIPTS):
        for s in range(len(samples)):
            index[tuple(np.asarray(jax.random.key_data(tracegen.row_keys(seed, [p], [s])))[0])] = (p, s)

    def fake(model, prompts, *, keys, eos_ids, **_):
        rows = [index[tuple(k)] for k in np.asarray(jax.random.key_data(keys))]
        return [tokenizer(SCRIPTS[p][s], add_special_tokens=False)["input_ids"] + list(eos_ids)[:1] for p, s in rows]
    return fake


@pytest.mark.parametrize("keep", list(KEPT))
def test_filters_and_keep_policies(teacher, tmp_path, monkeypatch, keep):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"What is {i} plus 1?", "ref": "x"}) + "\n" for i in range(3)))
    out = str(tmp_path / "out")
    cfg = load_config(None, overrides(teacher[0], str(prompts), out, **{
        "generate.prompt_field": "question", "generate.reference_field": "ref", "generate.keep": keep,
        "generate.batch_size": 5, "generate.prompts_per_shard": 2, "generate.max_reasoning_tokens": 120,
        "generate.language_mix": "true"}))
    monkeypatch.setattr(tracegen, "generate", _scripted_generate(
        transformers.AutoTokenizer.from_pretrained(teacher[0]), cfg.generate.seed))
    report = tracegen.tracegen(cfg, show_progress=False)
    rows = [json.loads(line) for s in (0, 1) for line in open(tracegen.shard_path(out, s))]
    assert [(r["index"], r["sample"]) for r in rows] == KEPT[keep]
    for r in rows:
        assert r["prompt"] == f"What is {r['index']} plus 1?" and r["reference"] == "x"
        assert r["pass_rate"] == CORRECT[r["index"]] / 4 and r["correct"] == even_length(r["answer"], "x")
        script = SCRIPTS[r["index"]][r["sample"]]
        assert script.endswith(r["answer"]) and r["reasoning"] in script and "</think>" not in r["reasoning"]
    wrong = 3 if keep != "all" else 0
    assert report["dropped"] == {**dict.fromkeys(tracegen.DROP_REASONS, 0), **FILTERED, "wrong": wrong,
                                 "not_chosen": 1 if keep.endswith("_correct") else 0}
    assert report["kept"] == len(KEPT[keep]) and report["kept"] + sum(report["dropped"].values()) == 12
    assert report["pass_rate_histogram"] == {"0/4": 0, "1/4": 0, "2/4": 2, "3/4": 1, "4/4": 0}
    assert report["pass_at_k"] == {"pass@1": pytest.approx(7 / 12), "pass@4": 1.0}
    assert json.load(open(os.path.join(out, "report.json"))) == report


def test_a_plain_instruct_teacher_answers_without_reasoning(teacher, tmp_path, monkeypatch):
    """generate.reasoning=false: a teacher that does not think (SmolLM2-135M-Instruct, most instruct
    models). Its whole response up to EOS is the answer, written with empty reasoning; a response cut
    at max_new_tokens is unfinished; a response with a think close is taken whole, not split."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"What is {i} plus 1?", "ref": "x"}) + "\n" for i in range(2)))
    out = str(tmp_path / "out")
    cfg = load_config(None, overrides(teacher[0], str(prompts), out, **{
        "generate.prompt_field": "question", "generate.reference_field": "ref", "generate.samples_per_prompt": 2,
        "generate.reasoning": "false"}))
    tok = transformers.AutoTokenizer.from_pretrained(teacher[0])
    responses = {(0, 0): "ab", (0, 1): "a b</think>cd", (1, 0): "never ends", (1, 1): "odd"}
    index = {tuple(np.asarray(jax.random.key_data(tracegen.row_keys(cfg.generate.seed, [p], [j])))[0]): (p, j)
             for p, j in responses}

    def fake(model, prompts, *, keys, eos_ids, **_):
        rows = [index[tuple(k)] for k in np.asarray(jax.random.key_data(keys))]
        return [tok(responses[r], add_special_tokens=False)["input_ids"] + (list(eos_ids)[:1] if r != (1, 0) else [])
                for r in rows]
    monkeypatch.setattr(tracegen, "generate", fake)
    report = tracegen.tracegen(cfg, show_progress=False)
    rows = [json.loads(line) for line in open(tracegen.shard_path(out, 0))]
    assert [(r["index"], r["sample"], r["reasoning"], r["answer"], r["correct"]) for r in rows] == [
        (0, 0, "", "ab", True), (0, 1, "", "a b</think>cd", False), (1, 1, "", "odd", False)]
    assert report["dropped"]["unfinished"] == 1
    # an output written before the key existed (every teacher reasoned then) resumes as reasoning
    settings = os.path.join(out, tracegen.SETTINGS)
    saved = json.load(open(settings))
    old = {k: v for k, v in saved.items() if k != "generate.reasoning"}
    reasoning_out = str(tmp_path / "old")
    os.makedirs(reasoning_out)
    json.dump(old, open(os.path.join(reasoning_out, tracegen.SETTINGS), "w"))
    cfg_old = load_config(None, overrides(teacher[0], str(prompts), reasoning_out, **{
        "generate.prompt_field": "question", "generate.reference_field": "ref", "generate.samples_per_prompt": 2}))
    tracegen.claim_output(reasoning_out, tracegen.settings(cfg_old, tracegen.load_prompts(cfg_old.generate)))
    # the same folder with the setting changed is another output: refused, not mixed
    cfg = load_config(None, overrides(teacher[0], str(prompts), out, **{
        "generate.prompt_field": "question", "generate.reference_field": "ref", "generate.samples_per_prompt": 2}))
    with pytest.raises(tracegen.GenerateError, match="generate.reasoning: False -> True"):
        tracegen.tracegen(cfg, show_progress=False)


# ---------------------------------------------------------------- a real (tiny) teacher


def test_generated_traces_feed_precompute_and_a_rerun_resumes(teacher, tmp_path, capsys):
    out = str(tmp_path / "gen")
    cfg = load_config(None, overrides(*teacher, out))
    report = tracegen.tracegen(cfg, show_progress=False)
    print(tracegen.format_trace_report(report))
    assert report["prompts"] == 12 and report["samples"] == 48
    assert report["kept"] + sum(report["dropped"].values()) == 48
    assert report["kept"] >= 8 and report["dropped"]["unfinished"] >= 4  # the scaled rows: some of each
    assert report["generated_tokens"] > 48 and report["tokens_per_s"] > 0
    assert sorted(os.listdir(os.path.join(out, "done"))) == ["00000", "00001", "00002"]
    rows = [json.loads(line) for name in sorted(os.listdir(os.path.join(out, "traces")))
            for line in open(os.path.join(out, "traces", name))]
    assert len(rows) == report["kept"]
    assert all({"prompt", "reasoning", "answer", "pass_rate", "correct", "sample"} <= set(r) for r in rows)
    # precompute reads the traces as they are (data.traces = the traces folder)
    store = str(tmp_path / "store")
    pre = load_config(None, overrides(*teacher, out) + [
        f"data.traces={out}/traces", f"data.store={store}", "data.top_k=8", "data.seq_len=512",
        "precompute.chunk_tokens=256", "precompute.bucket=32", "precompute.batch_tokens=1024",
        f"run.output_dir={tmp_path}/runs"])
    precompute(pre, show_progress=False)
    assert KDStore.open(store).describe()["complete"] and len(KDStore.open(store)) == report["kept"]
    # a rerun finds every shard marked: nothing is sampled, the report is the same
    again = tracegen.tracegen(cfg, show_progress=False)
    assert _untimed(again) == _untimed(report) and again[TIMING[0]] == report[TIMING[0]]
    # other settings into the same folder are refused with what changed
    with pytest.raises(tracegen.GenerateError, match=r"generate.seed: 0 -> 1"):
        tracegen.tracegen(load_config(None, overrides(*teacher, out, **{"generate.seed": 1})))
    # but smaller batches may resume a run (one that ran out of memory)
    smaller = tracegen.tracegen(load_config(None, overrides(*teacher, out, **{"generate.batch_size": 2})))
    assert _untimed(smaller) == _untimed(report)


def test_one_line_errors(teacher, tmp_path, capsys):
    from kd_jax.generate import main
    for extra, fragment in (({"generate.prompts": str(tmp_path / "nope.jsonl")}, "does not exist"),
                            ({"generate.reference_field": "solution"},
                             "no field 'solution'.*set generate.reference_field")):
        args = overrides(*teacher, str(tmp_path / "o"), **extra)
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 1 and len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert re.search(fragment, err), err


# ---------------------------------------------------------------- kill, rerun, two processes

N_PROMPTS = 24  # 12 shards of 2: a kill after the first mark leaves most to do


def _cli(args, env_extra=None) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]), **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "kd_jax.generate", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(procs) -> list[str]:
    outs = [p.communicate(timeout=400)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(o[-3000:] for o in outs)
    return outs


def _files(out: str) -> dict[str, bytes]:
    """Every file of an output folder, the timing fields of the marks and the report left out."""
    files = {}
    for folder, _, names in os.walk(out):
        for name in names:
            path = os.path.join(folder, name)
            data = open(path, "rb").read()
            if name == "report.json" or os.path.basename(folder) == "done":
                data = json.dumps({k: v for k, v in json.loads(data).items() if k not in TIMING + ("seconds",)})
            files[os.path.relpath(path, out)] = data
    return files


@pytest.fixture(scope="module")
def many(teacher, tmp_path_factory):
    """(arguments maker, the output of one uninterrupted one-process run) on 24 prompts."""
    root = tmp_path_factory.mktemp("many")
    prompts = str(root / "prompts.jsonl")
    with open(prompts, "w") as f:
        for row in tiny_kd.traces(N_PROMPTS):
            f.write(json.dumps(row) + "\n")

    def args(out):
        return overrides(teacher[0], prompts, out, **{"generate.prompts_per_shard": 2, "generate.batch_size": 8})
    out = str(root / "one")
    _finish([_cli(args(out))])
    files = _files(out)
    assert sum(name.startswith("traces/") for name in files) >= 6  # most shards kept some samples
    return args, files


@pytest.mark.slow
def test_sigkill_then_rerun_writes_the_same_bytes(many, tmp_path):
    args, want = many
    out = str(tmp_path / "killed")
    proc = _cli(args(out))
    done = os.path.join(out, "done")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(done) and os.listdir(done):
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    marked = len(os.listdir(done))
    assert 1 <= marked < N_PROMPTS // 2 and not os.path.exists(os.path.join(out, "report.json"))
    outs = _finish([_cli(args(out))])
    assert f"prompts {N_PROMPTS}" in outs[0]
    assert _files(out) == want


@pytest.mark.slow
def test_two_processes_write_the_one_process_output(many, tmp_path):
    args, want = many
    out = str(tmp_path / "two")
    port = 20000 + (os.getpid() + 7) % 20000
    outs = _finish([_cli(args(out), {"KD_JAX_COORDINATOR": f"localhost:{port}", "KD_JAX_NUM_PROCESSES": "2",
                                     "KD_JAX_PROCESS_ID": str(p)}) for p in range(2)])
    assert "pass@1" in outs[0] and "pass@1" not in outs[1]  # process 0 alone reports
    assert _files(out) == want


# ---------------------------------------------------------------- the generation bench


def test_bench_generate_beside_transformers(teacher, tmp_path):
    out = tmp_path / "gen.json"
    bench_main(["generate", "--hf-path", teacher[0], "--batch", "2", "--prompt-len", "8", "--max-new-tokens", "8",
                "--steps", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    for side in ("kd_jax", "transformers"):
        assert result[side]["tokens_per_s"] > 0 and len(result[side]["times_s"]) == 1
    assert result["ratio"] == pytest.approx(result["kd_jax"]["tokens_per_s"] / result["transformers"]["tokens_per_s"])
    assert result["rows_identical"] == 2  # fp32 greedy on both sides: the same tokens


# ---------------------------------------------------------------- checks before any model is loaded


def _no_model(monkeypatch):
    """Loading a model or tokenizer fails the test: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the checks")
    monkeypatch.setattr(tracegen, "build_model", refuse)
    monkeypatch.setattr(tracegen, "load_tokenizer", refuse)


def _text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _one_line_error(args, capsys) -> str:
    from kd_jax.generate import main
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_out_folders_generate_did_not_write_are_refused_untouched(teacher, tmp_path, monkeypatch, capsys):
    _no_model(monkeypatch)
    mine = tmp_path / "mine"  # a user's folder: a report and traces of their own
    (mine / "traces").mkdir(parents=True)
    (mine / "report.json").write_text('{"mine": 1}')
    (mine / "traces" / "mine.jsonl").write_text('{"prompt": "p", "reasoning": "r", "answer": "a"}\n')
    other = tmp_path / "other"  # a settings.json generate did not write
    other.mkdir()
    (other / "settings.json").write_text('{"lr": 0.1}')
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    folder = tmp_path / "prompts"  # a folder of prompts, read recursively
    folder.mkdir()
    (folder / "p.jsonl").write_text(_text(teacher[1]))
    holder = tmp_path / "holder"  # the prompts inside the output folder
    holder.mkdir()
    (holder / "p.jsonl").write_text(_text(teacher[1]))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for prompts, out, fragment in (
            (teacher[1], mine, (r"generate.out='.*mine' is not empty \(2 entries, e.g. 'report.json'\) and is not a "
                                r"generate output \(no settings.json\).*new or empty folder")),
            (teacher[1], other, r"holds a settings.json that generate did not write"),
            (teacher[1], a_file, r"generate.out='.*a_file' is a file; set generate.out to a folder"),
            (folder, folder / "gen", (r"generate.out=.* is inside generate.prompts=.*read its own traces back as "
                                      r"prompts; set generate.out to a folder outside the prompts folder")),
            (holder / "p.jsonl", holder, r"generate.prompts=.* is inside generate.out=.*read its own output")):
        err = _one_line_error(overrides(teacher[0], str(prompts), str(out)), capsys)
        assert re.search(fragment, err), err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not (folder / "gen").exists()
    # an empty folder, or one a run killed while claiming it left, is claimed
    for leftover in ((), ("traces", "done")):
        empty = tmp_path / f"empty{len(leftover)}"
        for sub in ("", *leftover):
            (empty / sub).mkdir(exist_ok=True)
        tracegen.claim_output(str(empty), {"prompts_sha256": "x"})
        assert json.loads((empty / "settings.json").read_text()) == {"prompts_sha256": "x"}


def test_changed_teacher_weights_are_refused(teacher, tmp_path, monkeypatch):
    folder = str(tmp_path / "teacher")
    transformers.AutoTokenizer.from_pretrained(teacher[0]).save_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(teacher[0])
    model.save_pretrained(folder)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} plus 1?", "answer": "x"}) + "\n" for i in range(3)))
    out = str(tmp_path / "out")
    cfg = load_config(None, overrides(folder, str(prompts), out))
    monkeypatch.setattr(tracegen, "generate", _scripted_generate(
        transformers.AutoTokenizer.from_pretrained(folder), cfg.generate.seed))
    tracegen.tracegen(cfg, show_progress=False)
    tracegen.tracegen(cfg, show_progress=False)  # the same weights resume
    # another checkpoint of the same architecture (same safetensors headers and sizes) in the same folder
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(folder)
    with pytest.raises(tracegen.GenerateError, match=r"holds traces made with other settings \(teacher.weights: "
                                                     r"the teacher's weights at teacher.hf_path=.* changed"):
        tracegen.tracegen(cfg, show_progress=False)
    # an output written before the weights were recorded still resumes
    with open(os.path.join(out, "settings.json")) as f:
        settings = json.load(f)
    settings.pop("teacher.weights", None)
    with open(os.path.join(out, "settings.json"), "w") as f:
        json.dump(settings, f)
    tracegen.tracegen(cfg, show_progress=False)


def test_bad_prompt_rows_are_all_reported_before_any_model_is_loaded(teacher, tmp_path, monkeypatch, capsys):
    _no_model(monkeypatch)
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": None}, {"prompt": "c", "answer": "  "},
            {"prompt": None, "answer": "3"}, {"prompt": "e", "answer": "4"}, {"prompt": "f", "answer": ""}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    err = _one_line_error(overrides(teacher[0], str(prompts), str(out)), capsys)
    assert re.search(r"generate.prompts='.*prompts.jsonl' \(rows counted from 0\): row 3 has no prompt in 'prompt' "
                     r"\(generate.prompt_field.*\); rows 1, 2, 5 have no reference answer in 'answer' "
                     r"\(generate.reference_field\); fill them or drop the rows, or set generate.reference_field=null",
                     err), err
    assert not out.exists()  # nothing claimed, nothing sampled


def test_an_error_while_sampling_starts_its_own_line(teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tracegen, "build_model", lambda *a, **k: None)

    def fail(*args, **kwargs):
        raise tracegen.GenerateError("the teacher failed")
    monkeypatch.setattr(tracegen, "generate", fail)
    from kd_jax.generate import main
    with pytest.raises(SystemExit):
        main(overrides(*teacher, str(tmp_path / "out")))  # with its progress bar
    err = capsys.readouterr().err
    assert "teacher samples" in err and "error: the teacher failed\n" in err, err
    assert any(line.startswith("error: the teacher failed") for line in err.split("\n")), repr(err)


def test_an_empty_prompts_file_says_it_is_empty(teacher, tmp_path, monkeypatch, capsys):
    _no_model(monkeypatch)
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("")
    err = _one_line_error(overrides(teacher[0], str(empty), str(tmp_path / "out")), capsys)
    assert err == (f"error: {empty} is empty (generate.prompts={str(empty)!r}); fill it or point generate.prompts "
                   f"elsewhere"), err
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_text(_text(teacher[1]))
    (folder / "b.jsonl").write_text("\n")
    err = _one_line_error(overrides(teacher[0], str(folder), str(tmp_path / "out")), capsys)
    assert re.search(r"b.jsonl is empty \(generate.prompts=.*\); remove it from the folder or fill it", err), err


def test_config_errors_come_before_any_model_is_loaded(teacher, tmp_path, monkeypatch, capsys):
    _no_model(monkeypatch)
    for extra, fragment in (({"eval.matcher": "no_such_module:match"}, r"eval.matcher='no_such_module:match'"),
                            ({"teacher.hf_path": str(tmp_path / "no_teacher"), "data.tokenizer": teacher[0]},
                             r"no_teacher.* is not a local folder")):
        err = _one_line_error(overrides(teacher[0], teacher[1], str(tmp_path / "out"), **extra), capsys)
        assert re.search(fragment, err), err
    assert not (tmp_path / "out").exists()
