"""The R1-style recipe end to end, offline, on CPU: the library behind `python -m kd_jax.demo`
(`make demo`).

  1. traces      arithmetic word problems with one reasoning step per paragraph, and a BPE
                 tokenizer trained on them (kd_jax.data.arithmetic)
  2. teacher     a small llama trained from scratch on a tokens-only store with hard labels only
                 (configs/demo/teacher.yaml: data.top_k=0, loss.alpha=0, loss.beta=0), exported
  3. precompute  the teacher's top-16 next-token log-probs into the KD store
  4. students    three students of half the teacher's depth, the same budget, three losses:
                 hard labels only, soft + hard, soft + hard + step (configs/demo/student.yaml)
  5. evaluate    teacher and students on 512 fresh problems (none among the training problems):
                 answer accuracy by greedy generation with its 95% Wilson interval, step accuracy
                 (kd_jax.data.arithmetic:check_steps), held-out losses, agreement with the teacher,
                 parameters, generation tokens/s; each student also at every quarter of its training
                 (the first 128 problems), drawn as accuracy vs step into <out>/demo.png
  6. export      the best student to a Hugging Face folder, loaded back with transformers'
                 AutoModelForCausalLM and AutoTokenizer to answer one held-out problem

Each stage is the library call behind a CLI command (printed as the stage starts), run in this one
process. Every number in the final table is measured in this run; it is also written to
<out>/demo_report.json. `--scale` multiplies the problem count and every step budget (the tests
run a reduced demo with a small scale).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import transformers

from kd_jax.core import sharding
from kd_jax.core.checkpoint import Checkpointer
from kd_jax.core.config import Config, load_config
from kd_jax.core.evaluation import data_problems, evaluate, extract_answer, matcher, task_accuracy
from kd_jax.core.loop import train
from kd_jax.core.runs import export_run, restore_student
from kd_jax.core.teacher import precompute
from kd_jax.data import arithmetic
from kd_jax.data.pipeline import split_indices
from kd_jax.data.roles import Role
from kd_jax.data.store import KDStore
from kd_jax.models.hf import load_tokenizer

HELD_OUT_SEED = 12345  # the evaluation problems: arithmetic.problems(..., seed=HELD_OUT_SEED), training ones removed
CURVE_PROBLEMS = 128  # problems per point of the accuracy curves (the final point uses them all)
EVAL_BATCH = 64  # generation rows per call in the evaluation

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "demo")
# (name, loss overrides) of the three students: the same budget and model, only the loss differs
STUDENTS = (("hard", ["loss.alpha=0", "loss.beta=0"]),
            ("soft+hard", ["loss.beta=0"]),
            ("soft+hard+step", []))


def _stage(n: int, title: str, command: str) -> None:
    print(f"\n=== [{n}/6] {title}\n    ({command})", flush=True)


def _configs(out: str, scale: float, seed: int = 0) -> tuple[Config, dict[str, Config]]:
    """The teacher's and the three students' configs, with every path under `out`; `seed` is
    run.seed (parameter init) of every model (the problems and the data order stay)."""
    data = os.path.join(out, "data")
    paths = [f"run.output_dir={out}", f"data.traces={data}/traces.jsonl", f"data.tokenizer={data}/tokenizer",
             f"run.seed={seed}"]

    def steps(cfg_file: str) -> int:
        return max(4, round(load_config(cfg_file).train.steps * scale))

    teacher_file, student_file = os.path.join(CONFIGS, "teacher.yaml"), os.path.join(CONFIGS, "student.yaml")
    teacher = load_config(teacher_file, paths + [f"data.store={out}/tokens_store",
                                                 f"train.steps={steps(teacher_file)}"])
    student_steps = steps(student_file)
    every = max(1, student_steps // 4)  # a checkpoint at every quarter: the curves' points
    students = {name: load_config(student_file, paths + [
        f"data.store={out}/kd_store", f"teacher.hf_path={out}/teacher/hf", f"train.steps={student_steps}",
        f"checkpoint.every_steps={every}", "checkpoint.max_to_keep=4",
        f"run.name=student_{name.replace('+', '_')}", *overrides]) for name, overrides in STUDENTS}
    return teacher, students


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


def _eval_config(cfg: Config, held_out: str, problems: int) -> Config:
    """`cfg` evaluating on the held-out file with the step checker, EVAL_BATCH rows per generation
    call (fewer for fewer problems) and one KD-loss batch of as many rows."""
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, global_batch_size=min(EVAL_BATCH, problems)),
        eval=dataclasses.replace(cfg.eval, data=held_out, batches=1,
                                 step_checker="kd_jax.data.arithmetic:check_steps"))


def accuracy_curve(cfg: Config, problems) -> list[dict]:
    """(step, accuracy) of every checkpoint of the run but the last, on `problems`."""
    with Checkpointer(cfg.checkpoint_dir, cfg.checkpoint) as ckpt:
        steps = ckpt.all_steps()[:-1]
    tokenizer, mesh = load_tokenizer(cfg.tokenizer), sharding.mesh_from_config(cfg.mesh)
    points = []
    for step in steps:
        model, _ = restore_student(cfg, step, mesh)
        task = task_accuracy(model, tokenizer, problems, cfg.eval, cfg.train.global_batch_size,
                             step_separator=cfg.data.step_separator)
        points.append({"step": step, "accuracy": task["accuracy"], "accuracy_low": task["accuracy_low"],
                       "accuracy_high": task["accuracy_high"], "examples": task["examples"]})
    return points


def plot(rows: list[dict], path: str) -> None:
    """Accuracy vs training step for each student (95% intervals as bars), the teacher as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    teacher = rows[0]
    ax.axhline(100 * teacher["accuracy"], color="black", linestyle="--", label=f"teacher ({teacher['accuracy']:.1%})")
    for r in rows[1:]:
        pts = r["curve"]
        x = [p["step"] for p in pts]
        y = [100 * p["accuracy"] for p in pts]
        err = [[100 * (p["accuracy"] - p["accuracy_low"]) for p in pts],
               [100 * (p["accuracy_high"] - p["accuracy"]) for p in pts]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=r["model"].replace("student: ", ""))
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy on held-out problems (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"kd_jax demo: students at equal steps, greedy, 95% Wilson intervals "
                 f"(n={CURVE_PROBLEMS}; last point n={rows[1]['examples']})", fontsize=8)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _timed_train(cfg: Config) -> float:
    """Train (or find the run finished) and return its training wall time, kept in the run folder
    so that a rerun that reuses the finished run reports the time it took."""
    path = os.path.join(cfg.run_dir, "demo_train_seconds.json")
    if os.path.exists(path):
        train(cfg)  # resumes at the last step: nothing left to do
        with open(path) as f:
            return json.load(f)["seconds"]
    t0 = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - t0
    with open(path, "w") as f:
        json.dump({"seconds": seconds}, f)
    return seconds


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


COLUMNS = (("model", "{}"), ("loss", "{}"), ("steps", "{}"), ("train_s", "{:.0f}"), ("accuracy", "{:.1%}"),
           ("interval", "{}"), ("step_accuracy", "{:.1%}"), ("hard", "{:.3f}"), ("soft", "{:.3f}"),
           ("top1_agree", "{:.1%}"), ("parameters", "{:,}"), ("generation_tokens_per_s", "{:,.0f}"))
HEADERS = {"hard": "held-out CE", "soft": "KL(teacher)", "top1_agree": "top-1 = teacher", "train_s": "train s",
           "generation_tokens_per_s": "gen tok/s", "interval": "95% interval", "step_accuracy": "step acc"}


def _interval(r: dict) -> str | None:
    if "accuracy_low" not in r:
        return None
    return f"[{r['accuracy_low']:.1%}, {r['accuracy_high']:.1%}] n={r['examples']}"


def format_table(rows: list[dict]) -> str:
    cells = [[HEADERS.get(k, k) for k, _ in COLUMNS]]
    cells += [[fmt.format(v) if (v := (_interval(r) if k == "interval" else r.get(k))) is not None else "-"
               for k, fmt in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def run(out: str = "runs/demo", scale: float = 1.0, problems: int = 8000, max_examples: int = 512,
        fresh: bool = False, seed: int = 0) -> dict:
    t_start = time.perf_counter()
    if fresh and os.path.isdir(out):
        shutil.rmtree(out)
    teacher_cfg, student_cfgs = _configs(out, scale, seed)

    _stage(1, "traces and tokenizer", f"python -m kd_jax.data.arithmetic --out {out}/data --n {round(problems * scale)}")
    if not os.path.isdir(teacher_cfg.data.tokenizer):  # (a store made with another tokenizer would not fit)
        arithmetic.write(os.path.dirname(teacher_cfg.data.tokenizer), max(64, round(problems * scale)))
    held_out = write_held_out(os.path.dirname(teacher_cfg.data.tokenizer), teacher_cfg.data.traces, max_examples)

    _stage(2, "teacher: hard labels only, from scratch, then exported",
           "python -m kd_jax.precompute --config configs/demo/teacher.yaml; "
           "python -m kd_jax.train --config configs/demo/teacher.yaml; python -m kd_jax.export --run runs/demo/teacher")
    precompute(teacher_cfg, show_progress=False)
    teacher_s = _timed_train(teacher_cfg)
    export_run(teacher_cfg.run_dir, os.path.join(teacher_cfg.run_dir, "hf"), overwrite=True)

    first = next(iter(student_cfgs.values()))
    _stage(3, "precompute the teacher's top-16 log-probs", "python -m kd_jax.precompute --config configs/demo/student.yaml")
    precompute(first, show_progress=False)

    train_s = {}
    for i, (name, cfg) in enumerate(student_cfgs.items()):
        overrides = " ".join(dict(STUDENTS)[name]) or "(as configured)"
        _stage(4, f"student {i + 1}/3: {name}", f"python -m kd_jax.train --config configs/demo/student.yaml "
               f"run.name={cfg.run.name} {overrides}")
        train_s[name] = _timed_train(cfg)

    _stage(5, f"evaluate on {max_examples} fresh problems, and each student at every quarter of its training",
           f"python -m kd_jax.evaluate --config configs/demo/student.yaml [--model teacher] eval.data={held_out} "
           f"eval.step_checker=kd_jax.data.arithmetic:check_steps")
    # The teacher is scored against the same KD store (its own top-16: KL ~ 0, agreement ~ 100%).
    teacher_eval_cfg = dataclasses.replace(first, run=dataclasses.replace(first.run, name=teacher_cfg.run.name))
    rows = [{**evaluate(_eval_config(teacher_eval_cfg, held_out, max_examples), "teacher", max_examples), "model": "teacher",
             "loss": "hard (α=0, β=0)", "steps": teacher_cfg.train.steps, "train_s": teacher_s}]
    curve_problems = data_problems(_eval_config(first, held_out, max_examples).eval,
                                   load_tokenizer(first.tokenizer), CURVE_PROBLEMS)
    for name, cfg in student_cfgs.items():
        loss = f"α={cfg.loss.alpha:g}, β={cfg.loss.beta:g}"
        final = evaluate(_eval_config(cfg, held_out, max_examples), "student", max_examples)
        curve = accuracy_curve(_eval_config(cfg, held_out, min(max_examples, CURVE_PROBLEMS)), curve_problems)
        curve.append({k: final[k] for k in ("accuracy", "accuracy_low", "accuracy_high", "examples")}
                     | {"step": cfg.train.steps})
        rows.append({**final, "model": f"student: {name}", "loss": loss, "curve": curve,
                     "steps": cfg.train.steps, "train_s": train_s[name], "variant": name})
    plot(rows, os.path.join(out, "demo.png"))

    best = max(rows[1:], key=lambda r: (r["accuracy"], -r["hard"]))
    best_cfg = student_cfgs[best["variant"]]
    folder = os.path.join(out, "export")
    _stage(6, f"export the best student ({best['model']}) and load it with transformers",
           f"python -m kd_jax.export --run {best_cfg.run_dir} --out {folder}")
    export_run(best_cfg.run_dir, folder, overwrite=True)
    prompt_ids, prompt, reference = _held_out_problem(first, transformers.AutoTokenizer.from_pretrained(folder))
    text = _hf_answer(folder, prompt_ids, first.eval.max_new_tokens)
    answer = extract_answer(text.replace("<|im_end|>", ""))

    report = {"rows": rows, "best": best["model"], "export": folder, "prompt": prompt, "reference": reference,
              "generated": text, "answer": answer, "correct": matcher("numeric")(answer, reference),
              "seconds": time.perf_counter() - t_start}
    with open(os.path.join(out, "demo_report.json"), "w") as f:
        json.dump(report, f, indent=2, default=float)
    print(f"\n=== transformers loads {folder} and answers a held-out problem:\n{prompt}\n---\n{text}\n---"
          f"\nextracted {answer!r}, reference {reference!r}: {'correct' if report['correct'] else 'wrong'}")
    print(f"\n=== kd_jax demo: {round(problems * scale)} problems, {max_examples} held out for accuracy, "
          f"{time.perf_counter() - t_start:.0f} s in all\n")
    print(format_table(rows))
    print(f"\nbest student: {best['model']} ({best['accuracy']:.1%}); teacher {rows[0]['accuracy']:.1%}. "
          f"Report: {out}/demo_report.json; accuracy vs step: {out}/demo.png")
    return report
