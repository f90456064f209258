"""The R1-style recipe end to end, offline, on CPU, as an experiment: the library behind
`python -m kd_jax.demo` (`make demo`). What did the teacher buy?

  1. traces      arithmetic word problems, one reasoning step per paragraph in one of several
                 equivalent phrasings, and a BPE tokenizer trained on them (kd_jax.demo.arithmetic);
                 512 fresh problems held out for the task
  2. teacher     a llama with twice the student's depth and 2.25 times its training steps,
                 trained from scratch on a tokens-only store with hard labels only
                 (kd_jax/demo/configs/teacher.yaml), exported
  3. precompute  the teacher's top-16 next-token log-probs into the KD store
  4. teacher traces  the teacher writes a trace for each of the students' training prompts
                 (greedy), kept when its answer is right (R1's rejection sampling; kd_jax.generate),
                 into a tokens-only store
  5. students    kd_jax/demo/rows/r1.yaml through the comparison harness (kd_jax.core.compare, the
                 library behind `python -m kd_jax.compare`): one row per way of using the teacher,
                 every one at the hard row's training compute (FLOPs, the teacher's forward included
                 where it runs inside the step): hard labels; soft + hard (the top-16 store); hard
                 labels on the teacher's traces; on-policy (the hard row's half-way checkpoint,
                 continued on its own samples graded by the online teacher); optionally soft + hard +
                 step and hidden-state alignment (`--rows`). Each is scored as it finishes: answer
                 accuracy by greedy generation on the held-out problems with its 95% Wilson interval,
                 step accuracy (kd_jax.demo.arithmetic:check_steps), held-out losses on the store's
                 held-out split and agreement with the teacher; accuracy at every quarter of training
                 (the first 128 problems) is drawn against training compute into <out>/demo.png
  6. export      the best student to a Hugging Face folder, loaded back with transformers'
                 AutoModelForCausalLM and AutoTokenizer to answer one held-out problem

Every stage is a folder of <out> recorded with what it was made from (kd_jax.core.compare.Workspace):
a rerun reuses it when that is unchanged and redoes it when not. Every number in the table is
measured in this run; the report is <out>/demo_report.json. `--scale` multiplies the problem count
and every step budget (the tests run a reduced demo with a small scale).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import transformers

from kd_jax.base.loader import load_config, to_dict
from kd_jax.base.schema import Config
from kd_jax.core import compare
from kd_jax.core.grading import extract_answer, matcher
from kd_jax.core.loop import train
from kd_jax.core.precompute import precompute
from kd_jax.core.runs import export_run
from kd_jax.core.tracegen import format_trace_report, tracegen
from kd_jax.data.pipeline import split_indices
from kd_jax.data.roles import Role
from kd_jax.data.store import KDStore
from kd_jax.demo import arithmetic
from kd_jax.models.source import source_config

HELD_OUT_SEED = 12345  # the evaluation problems: arithmetic.problems(..., seed=HELD_OUT_SEED), training ones removed
# Most prompts the teacher writes traces for: generation is the demo's dearest stage on CPU (~40 ms a
# prompt), so the row on the teacher's traces reads about 2,000 verified traces twice where the hard
# row reads about 5,000 reference traces once (R1's students, too, trained several epochs on them).
TRACE_PROMPTS = 2048
# Problems generated for training (the teacher reads them ~1.9 times in its 900 steps, the students
# fewer than once): `make demo`'s default for `python -m kd_jax.demo --problems`.
PROBLEMS = 6000
STAGES = 6

HERE = os.path.dirname(os.path.abspath(__file__))  # package data: found in a wheel too
CONFIGS = os.path.join(HERE, "configs")
ROWS_FILE = os.path.join(HERE, "rows", "r1.yaml")
ROWS = tuple(r.name for r in compare.load_rows(ROWS_FILE).rows)
DEFAULT_ROWS = ("hard", "soft+hard", "teacher traces", "on-policy")
TRACES_ROW = "teacher traces"


def _stage(n: int, title: str, command: str) -> None:
    print(f"\n=== [{n}/{STAGES}] {title}\n    ({command})", flush=True)


def comparison(rows: tuple[str, ...], seeds: tuple[int, ...], max_examples: int) -> compare.Comparison:
    """r1.yaml with the chosen rows (hard always first: the reference), `seeds` and `max_examples`."""
    c = compare.load_rows(ROWS_FILE)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise compare.CompareError(f"unknown demo rows {unknown}; the rows are {', '.join(ROWS)}")
    chosen = ("hard",) + tuple(r for r in ROWS if r in rows and r != "hard")
    return dataclasses.replace(c, rows=tuple(c.row(r) for r in chosen), seeds=tuple(seeds),
                               eval=dataclasses.replace(c.eval, examples=max_examples,
                                                        curve_examples=min(max_examples, c.eval.curve_examples)))


def _named(cfg: Config, run_name: str) -> Config:
    """`cfg` with its run directory (where precompute leaves its config) at <output_dir>/<run_name>."""
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=run_name))


def _steps(cfg_file: str, scale: float) -> int:
    return max(4, round(load_config(cfg_file).train.steps * scale))


def write_held_out(out: str, traces: str, n: int) -> str:
    """<out>/heldout.jsonl: n problems (question, answer) drawn with HELD_OUT_SEED, none of them
    among the training traces' prompts."""
    with open(traces) as f:
        seen = {json.loads(line)["prompt"] for line in f}
    rows, drawn = [], 0
    while len(rows) < n:
        drawn += n
        rows = [p for p in arithmetic.problems(drawn, seed=HELD_OUT_SEED) if p["prompt"] not in seen][:n]
    path = os.path.join(out, "heldout.jsonl")
    with open(path, "w") as f:
        for p in rows:
            f.write(json.dumps({"question": p["prompt"], "answer": p["answer"]}) + "\n")
    return path


def _hf_answer(folder: str, prompt_ids: list[int], max_new_tokens: int) -> str:
    """The exported student, loaded with transformers (PyTorch), answers one prompt greedily."""
    import torch
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=False)


def _held_out_problem(cfg: Config, tokenizer) -> tuple[list[int], str, str]:
    """(prompt ids, prompt text, reference answer) of the first held-out sequence of the KD store:
    the prompt as the chat template rendered it, the answer without EOS."""
    store = KDStore.open(cfg.data.store)
    usable = store.check()
    seq = store.read(int(usable[split_indices(len(usable), cfg.data.eval_fraction, cfg.data.shuffle_seed)[1][0]]))
    prompt = seq["tokens"][seq["role"] == Role.PROMPT].tolist()
    answer = [t for t in seq["tokens"][seq["role"] == Role.ANSWER].tolist() if t != tokenizer.eos_token_id]
    return prompt, tokenizer.decode(prompt), tokenizer.decode(answer).strip()


def write_teacher_prompts(cfg: Config, steps: int, path: str) -> str:
    """`path` (JSONL: prompt, answer): the prompts the teacher writes traces for: as many of the KD
    store's training problems, in the order of the traces file, as `steps` steps of `cfg` read (batch x
    seq_len tokens over the mean problem length), at most TRACE_PROMPTS. The store's held-out
    problems stay out, so held-out CE stays held out for the row trained on the teacher's traces."""
    store = KDStore.open(cfg.data.store)
    rows, seen = [], set()
    with open(cfg.data.traces) as f:
        for line in f:  # precompute's one filter that applies here: a repeated trace is stored once
            row = json.loads(line)
            if (key := (row["prompt"], row["reasoning"], row["answer"])) not in seen:
                seen.add(key)
                rows.append(row)
    if len(rows) != len(store):
        raise ValueError(f"{cfg.data.traces} has {len(rows)} problems but {cfg.data.store} {len(store)} sequences; "
                         f"rerun the demo with --fresh")
    mean_len = float(store.offsets[-1]) / len(store)
    wanted = min(TRACE_PROMPTS, math.ceil(steps * cfg.train.global_batch_size * cfg.data.seq_len / mean_len))
    train_rows = sorted(split_indices(len(store), cfg.data.eval_fraction, cfg.data.shuffle_seed)[0])[:wanted]
    with open(path, "w") as f:
        for i in train_rows:
            f.write(json.dumps({"prompt": rows[i]["prompt"], "answer": rows[i]["answer"]}) + "\n")
    return path


def run(out: str = "runs/demo", scale: float = 1.0, problems: int = PROBLEMS, max_examples: int = 512,
        fresh: bool = False, seed: int = 0, rows: tuple[str, ...] = DEFAULT_ROWS,
        teacher_scale: float | None = None, seeds: tuple[int, ...] | None = None) -> dict:
    """The demo; `seed` is the teacher's run.seed and, without `seeds`, the students' one seed."""
    t_start = time.perf_counter()
    c = comparison(rows, seeds or (seed,), max_examples)
    compare.check(c, ROWS_FILE)
    compare.check_eval_batch(c, jax.device_count())
    n_problems = max(64, round(problems * scale))
    data = os.path.join(out, "data")
    paths = [f"run.output_dir={out}", f"data.traces={data}/traces.jsonl", f"data.tokenizer={data}/tokenizer",
             f"run.seed={seed}"]
    teacher_file, student_file = os.path.join(CONFIGS, "teacher.yaml"), os.path.join(CONFIGS, "student.yaml")
    teacher_args = paths + [f"data.store={out}/tokens_store",
                            f"train.steps={_steps(teacher_file, scale if teacher_scale is None else teacher_scale)}"]
    teacher = load_config(teacher_file, teacher_args)
    budget_steps = max(4, 4 * round(_steps(student_file, scale) / 4))  # quarters of whole steps
    overrides = (f"run.seed={seed}", f"train.steps={budget_steps}")
    base = compare.base_config(c, out, overrides)
    compare.row_configs(c, out, overrides)  # every row's config checked before anything is written
    ws = compare.Workspace(out)
    if fresh:
        ws.fresh()
    names = ["data", "tokens_store", "teacher", "kd_store", "precompute_kd", "teacher_prompts.jsonl",
             "teacher_traces", "traces_store", "precompute_traces", "export"]
    ws.check_writable(names)
    ws.claim("demo.png", "demo_report.json", compare.REPORT)

    _stage(1, "traces and tokenizer", f"python -m kd_jax.demo.arithmetic --out {data} --n {n_problems}")

    def write_data(path):
        arithmetic.write(path, n_problems)
        write_held_out(path, os.path.join(path, "traces.jsonl"), max_examples)
    ws.stage("data", {"problems": n_problems, "held_out": max_examples, "seed": HELD_OUT_SEED}, write_data)

    _stage(2, "teacher: hard labels only, from scratch, then exported",
           f"python -m kd_jax.precompute --config {compare.shown(teacher_file)} {' '.join(teacher_args)}; "
           f"python -m kd_jax.train --config {compare.shown(teacher_file)} {' '.join(teacher_args)}; "
           f"python -m kd_jax.export --run {teacher.run_dir}")
    data_inputs = ws.inputs("data")

    def train_teacher(path):
        precompute(teacher, show_progress=False)
        t0 = time.perf_counter()
        train(teacher)
        seconds = time.perf_counter() - t0
        export_run(teacher.run_dir, os.path.join(teacher.run_dir, "hf"), overwrite=True)
        return {"seconds": seconds}
    teacher_s = ws.stage("teacher", {"config": to_dict(teacher), "data": data_inputs}, train_teacher,
                         also=("tokens_store",))["seconds"]
    teacher_inputs = ws.inputs("teacher")

    _stage(3, "precompute the teacher's top-16 log-probs",
           " ".join(["python -m kd_jax.precompute --config", compare.shown(student_file),
                     *compare.base_args(c, out, overrides)]))
    ws.stage("kd_store", {"config": to_dict(base), "teacher": teacher_inputs},
             lambda path: precompute(_named(base, "precompute_kd"), show_progress=False), also=("precompute_kd",))

    runs = compare.plan(c, out, overrides).runs  # (the teacher's config.json is there now)
    if TRACES_ROW in [r.name for r in c.rows]:
        hard = runs[("hard", c.seeds[0])]
        traces_cfg = load_config(student_file, compare.base_args(c, out, overrides) + [
            f"generate.prompts={out}/teacher_prompts.jsonl", f"generate.out={out}/teacher_traces",
            "generate.samples_per_prompt=1", "generate.temperature=0", "generate.keep=correct",
            f"generate.max_new_tokens={base.eval.max_new_tokens}", "generate.batch_size=256", "generate.bucket=64",
            "generate.prompts_per_shard=1024"])
        _stage(4, "the teacher writes a trace for each student training prompt, kept when its answer is right",
               f"python -m kd_jax.generate --config {compare.shown(student_file)} ... generate.prompts="
               f"{traces_cfg.generate.prompts} generate.out={traces_cfg.generate.out} generate.samples_per_prompt=1 "
               f"generate.temperature=0")
        ws.stage("teacher_prompts.jsonl", {"kd_store": ws.inputs("kd_store"), "steps": hard.train.steps,
                                           "max": TRACE_PROMPTS},
                 lambda path: write_teacher_prompts(base, hard.train.steps, path))

        def write_traces(path):
            t0 = time.perf_counter()
            tracegen(traces_cfg, show_progress=False)
            with open(os.path.join(path, "report.json")) as f:
                return {"seconds": time.perf_counter() - t0, "report": json.load(f)}
        traces = ws.stage("teacher_traces", {"config": to_dict(traces_cfg), "teacher": teacher_inputs,
                                             "prompts": ws.inputs("teacher_prompts.jsonl")}, write_traces)
        print(f"    {format_trace_report(traces['report'])}", flush=True)
        if traces["report"]["kept"]:
            row_cfg = runs[(TRACES_ROW, c.seeds[0])]
            ws.stage("traces_store", {"config": to_dict(row_cfg), "traces": ws.inputs("teacher_traces")},
                     lambda path: precompute(_named(row_cfg, "precompute_traces"), show_progress=False),
                     also=("precompute_traces",))
        else:  # (a teacher trained far too briefly)
            print(f"    no row 'teacher traces': the teacher answered none of {traces['report']['prompts']} prompts "
                  f"right, so there is no verified trace to train on", flush=True)
            c = dataclasses.replace(c, rows=tuple(r for r in c.rows if r.name != TRACES_ROW))

    gflop_teacher = teacher.train.steps * compare.step_flops(
        teacher, source_config(teacher.student, teacher.teacher), None) / 1e9
    report = compare.compare(
        c, out, ws, overrides=overrides, picture="demo.png",
        references_extra={"teacher": {"learns": "hard labels (4 layers)", "steps": teacher.train.steps,
                                      "gflop": gflop_teacher, "train_s": teacher_s}},
        stage_title=lambda title: f"[5/{STAGES}] {title}, then scored on {max_examples} fresh problems",
        title=f"kd_jax demo: students at equal compute, greedy, 95% Wilson intervals (n={c.eval.curve_examples}; "
              f"last point n={max_examples})")

    best = max(report["runs"], key=lambda r: (r["task"], -r["ce"]))
    best_cfg = runs[(best["row"], best["seed"])]
    folder = os.path.join(out, "export")
    _stage(6, f"export the best student ({best['row']}) and load it with transformers",
           f"python -m kd_jax.export --run {best_cfg.run_dir} --out {folder}")

    def export(path):
        export_run(best_cfg.run_dir, path, overwrite=True)
        prompt_ids, prompt, reference = _held_out_problem(base, transformers.AutoTokenizer.from_pretrained(path))
        text = _hf_answer(path, prompt_ids, base.eval.max_new_tokens)
        answer = extract_answer(text.replace("<|im_end|>", ""))
        return {"prompt": prompt, "reference": reference, "generated": text, "answer": answer,
                "correct": matcher("numeric")(answer, reference)}
    answered = ws.stage("export", {"run": ws.inputs(best_cfg.run.name)}, export)
    report |= {"best": best["row"], "export": folder, **answered, "seconds": time.perf_counter() - t_start}
    with open(os.path.join(out, "demo_report.json"), "w") as f:
        json.dump(report, f, indent=2, default=float)
    print(f"\n=== transformers loads {folder} and answers a held-out problem:\n{answered['prompt']}\n---\n"
          f"{answered['generated']}\n---\nextracted {answered['answer']!r}, reference {answered['reference']!r}: "
          f"{'correct' if answered['correct'] else 'wrong'}")
    print(f"\n=== kd_jax demo: {n_problems} problems, {max_examples} held out for accuracy, students at "
          f"{report['gflop']['hard']:,.0f} GFLOP each, {time.perf_counter() - t_start:.0f} s in all\n")
    compare.print_report(report)
    print(f"\nbest student: {best['row']} ({best['task']:.1%}). "
          f"Report: {out}/demo_report.json; accuracy vs compute: {out}/demo.png")
    return report
