"""The R1-style recipe end to end, offline, on CPU, as an experiment: the library behind
`python -m kd_jax.demo` (`make demo`). What did the teacher buy?

  1. traces      arithmetic word problems, one reasoning step per paragraph in one of several
                 equivalent phrasings, and a BPE tokenizer trained on them (kd_jax.demo.arithmetic)
  2. teacher     a llama with twice the student's depth and 2.25 times its training steps,
                 trained from scratch on a tokens-only store with hard labels only
                 (kd_jax/demo/configs/teacher.yaml), exported
  3. precompute  the teacher's top-16 next-token log-probs into the KD store
  4. teacher traces  the teacher writes a trace for each of the students' training prompts
                 (greedy), kept when its answer is right (R1's rejection sampling; kd_jax.generate),
                 into a tokens-only store
  5. students    one row per way of using the teacher, every one at the same training compute
                 (FLOPs, the teacher's forward included where it runs inside the step;
                 kd_jax/demo/configs/student.yaml): hard labels on the reference traces; soft + hard
                 (the top-16 store); hard labels on the teacher's traces; on-policy (the hard row's
                 half-way checkpoint, continued on its own samples graded by the online teacher);
                 optionally soft + hard + step and hidden-state alignment (`--rows`)
  6. evaluate    teacher and students on 512 fresh problems (none among the training problems):
                 answer accuracy by greedy generation with its 95% Wilson interval, step accuracy
                 (kd_jax.demo.arithmetic:check_steps), held-out losses on the reference traces,
                 agreement with the teacher; each student also at every quarter of its training
                 (the first 128 problems), drawn as accuracy vs training compute into <out>/demo.png;
                 the verdicts (does the teacher beat the hard-label student, does any row beat it)
                 are read off the intervals
  7. export      the best student to a Hugging Face folder, loaded back with transformers'
                 AutoModelForCausalLM and AutoTokenizer to answer one held-out problem

Each stage is the library call behind a CLI command (printed as the stage starts), run in this one
process. Every number in the final table is measured in this run; it is also written to
<out>/demo_report.json. `--scale` multiplies the problem count and every step budget (the tests
run a reduced demo with a small scale).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time

import transformers

from kd_jax.base import sharding
from kd_jax.base.loader import load_config, to_dict
from kd_jax.base.schema import Config
from kd_jax.core.checkpoint import Checkpointer
from kd_jax.core.evaluation import data_problems, evaluate, task_accuracy
from kd_jax.core.grading import extract_answer, matcher
from kd_jax.core.loop import train
from kd_jax.core.precompute import precompute
from kd_jax.core.runs import export_run, restore_student
from kd_jax.core.tracegen import format_trace_report, tracegen
from kd_jax.data.pipeline import split_indices
from kd_jax.data.roles import Role
from kd_jax.data.store import KDStore
from kd_jax.demo import arithmetic
from kd_jax.models import flops
from kd_jax.models.hf import config_from_hf, load_tokenizer

HELD_OUT_SEED = 12345  # the evaluation problems: arithmetic.problems(..., seed=HELD_OUT_SEED), training ones removed
CURVE_PROBLEMS = 128  # problems per point of the accuracy curves (the final point uses them all)
EVAL_BATCH = 64  # generation rows per call in the evaluation
# Most prompts the teacher writes traces for: generation is the demo's dearest stage on CPU (~40 ms a
# prompt), so the row on the teacher's traces reads about 2,000 verified traces twice where the hard
# row reads about 5,000 reference traces once (R1's students, too, trained several epochs on them).
TRACE_PROMPTS = 2048
# Problems generated for training (the teacher reads them ~1.9 times in its 900 steps, the students
# fewer than once): `make demo`'s default for `python -m kd_jax.demo --problems`.
PROBLEMS = 6000
STAGES = 7

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")  # package data: found in a wheel too


@dataclasses.dataclass(frozen=True)
class Row:
    """One student of the table: kd_jax/demo/configs/student.yaml with `overrides`."""
    name: str
    loss: str  # the table's description of what it learns from
    overrides: tuple[str, ...] = ()
    teacher_traces: bool = False  # trains on the teacher's verified traces (a tokens-only store)
    continues: str | None = None  # starts from that row's half-way checkpoint; its first half is that row's

    @property
    def run_name(self) -> str:
        return "student_" + re.sub(r"[^a-z0-9]+", "_", self.name)


ROWS = {r.name: r for r in (
    Row("hard", "hard labels", ("loss.alpha=0", "loss.beta=0")),
    Row("soft+hard", "top-16 KL + CE, α=0.5", ("loss.beta=0",)),
    Row("teacher traces", "hard labels on the teacher's verified traces",
        ("loss.alpha=0", "loss.beta=0", "data.top_k=0"), teacher_traces=True),
    Row("on-policy", "hard half, then on-policy reverse KL",
        ("teacher.mode=online", "train.on_policy.fraction=1.0", "train.on_policy.prompts_per_step=16",
         "train.on_policy.max_new_tokens=96", "student.init=hf", "student.architecture=null"), continues="hard"),
    Row("soft+hard+step", "top-16 KL + CE + step, α=0.5, β=1", ()),
    Row("hidden", "online KL + CE + hidden MSE, α=0.5, γ=1",
        ("teacher.mode=online", "loss.beta=0", "loss.hidden.weight=1.0")),
)}
DEFAULT_ROWS = ("hard", "soft+hard", "teacher traces", "on-policy")


def _stage(n: int, title: str, command: str) -> None:
    print(f"\n=== [{n}/{STAGES}] {title}\n    ({command})", flush=True)


@dataclasses.dataclass
class Plan:
    """Every config of one demo run, with every path under `out`."""
    out: str
    teacher: Config
    base: Config  # the students' config as kd_jax/demo/configs/student.yaml has it (the KD store)
    students: dict[str, Config]  # row name -> config
    gflop: dict[str, float]  # row name -> training compute of the whole row (its first half included)
    half: int  # the checkpoint a `continues` row starts from
    traces: Config  # kd_jax.generate's config for the teacher's traces
    teacher_args: list[str]  # the overrides that put the teacher's paths under `out`
    student_args: list[str]  # the overrides that put the students' paths under `out`

    def command(self, module: str, which: str, *extra: str) -> str:
        """`python -m kd_jax.<module>` on the demo config `which` (teacher or student) with the overrides
        that differ from that file: exact for this `out` (and short for the default runs/demo)."""
        path = os.path.join(CONFIGS, f"{which}.yaml")
        file = to_dict(load_config(path))
        args = [a for a in (self.teacher_args if which == "teacher" else self.student_args)
                if _value(file, a.partition("=")[0]) != _value(to_dict(load_config(path, [a])), a.partition("=")[0])]
        shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
        return " ".join([f"python -m kd_jax.{module} --config {shown}", *args, *extra])


def _value(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def step_flops(cfg: Config, student_arch: dict, teacher_arch: dict) -> float:
    """Training FLOPs of one optimizer step (kd_jax.models.flops: 6·P + 3·A per trained token; an
    online teacher adds its forward, 2·P + A per token; on-policy sampling adds the student's forward
    over every sampled position at its upper bound, the prompt bucket plus max_new_tokens)."""
    seq, tokens = cfg.data.seq_len, cfg.data.seq_len * cfg.train.global_batch_size
    student = config_from_hf(student_arch)
    total = flops.train_flops_per_token(student, seq) * tokens
    if cfg.teacher.mode == "online":
        total += flops.forward_flops_per_token(config_from_hf(teacher_arch), seq) * tokens
        op = cfg.train.on_policy
        if op.fraction > 0:
            length = op.bucket + op.max_new_tokens
            total += op.fraction * (op.prompts_per_step or cfg.train.global_batch_size) * length * \
                flops.forward_flops_per_token(student, length)
    return total


def plan(out: str, scale: float, seed: int = 0, rows: tuple[str, ...] = DEFAULT_ROWS,
         teacher_scale: float | None = None) -> Plan:
    """The teacher's and every row's config, `seed` as run.seed (parameter init) of every model (the
    problems and the data order stay). Every row gets the hard row's training compute: train.steps of
    student.yaml for the rows that cost what it costs per step, fewer steps for the ones that run the
    teacher inside the step."""
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown demo rows {unknown}; the rows are {', '.join(ROWS)}")
    rows = ("hard",) + tuple(r for r in rows if r != "hard")
    data = os.path.join(out, "data")
    paths = [f"run.output_dir={out}", f"data.traces={data}/traces.jsonl", f"data.tokenizer={data}/tokenizer",
             f"run.seed={seed}"]

    def steps(cfg_file: str) -> int:
        return max(4, round(load_config(cfg_file).train.steps * scale))

    def teacher_steps(cfg_file: str) -> int:  # `teacher_scale`, when given, instead of `scale`
        return max(4, round(load_config(cfg_file).train.steps * (scale if teacher_scale is None else teacher_scale)))

    teacher_file, student_file = os.path.join(CONFIGS, "teacher.yaml"), os.path.join(CONFIGS, "student.yaml")
    teacher_args = paths + [f"data.store={out}/tokens_store"]
    teacher = load_config(teacher_file, teacher_args + [f"train.steps={teacher_steps(teacher_file)}"])
    student = [*paths, f"data.store={out}/kd_store", f"teacher.hf_path={out}/teacher/hf", "checkpoint.max_to_keep=4"]
    base = load_config(student_file, student)
    arch, teacher_arch = base.student.architecture, teacher.student.architecture
    budget_steps = max(4, 4 * round(steps(student_file) / 4))  # quarters of whole steps
    per_step = step_flops(base, arch, teacher_arch)
    half = budget_steps // 2
    students, gflop = {}, {}
    for name in rows:
        row = ROWS[name]
        extra = [f"run.name={row.run_name}", *row.overrides]
        if row.teacher_traces:
            extra += [f"data.traces={out}/teacher_traces/traces", f"data.store={out}/traces_store"]
        if row.continues:
            extra.append(f"student.hf_path={out}/{ROWS[row.continues].run_name}/hf-{half}")
        cfg = load_config(student_file, student + extra)
        own = budget_steps - (half if row.continues else 0)  # the steps' worth of compute left to this row
        n = max(1, round(own * per_step / step_flops(cfg, arch, teacher_arch)))
        students[name] = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, steps=n),
            checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=max(1, n // 4)))
        gflop[name] = (n * step_flops(cfg, arch, teacher_arch) + (half * per_step if row.continues else 0)) / 1e9
    traces = load_config(student_file, student + [
        f"generate.prompts={data}/teacher_prompts.jsonl", f"generate.out={out}/teacher_traces",
        "generate.samples_per_prompt=1", "generate.temperature=0", "generate.keep=correct",
        f"generate.max_new_tokens={base.eval.max_new_tokens}", "generate.batch_size=256", "generate.bucket=64",
        "generate.prompts_per_shard=1024"])
    return Plan(out, teacher, base, students, gflop, half, traces, teacher_args, student)


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


def write_teacher_prompts(cfg: Config, steps: int) -> str:
    """The prompts the teacher writes traces for (data/teacher_prompts.jsonl: prompt, answer): as many
    of the KD store's training problems, in the order of the traces file, as `steps` steps of `cfg`
    read (batch x seq_len tokens over the mean problem length), at most TRACE_PROMPTS. The store's held-out problems stay out,
    so held-out CE stays held out for the row trained on the teacher's traces."""
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
    path = os.path.join(os.path.dirname(cfg.data.traces), "teacher_prompts.jsonl")
    with open(path, "w") as f:
        for i in train_rows:
            f.write(json.dumps({"prompt": rows[i]["prompt"], "answer": rows[i]["answer"]}) + "\n")
    return path


def _eval_config(cfg: Config, held_out: str, problems: int) -> Config:
    """`cfg` evaluating on the held-out file with the step checker, EVAL_BATCH rows per generation
    call (fewer for fewer problems) and one KD-loss batch of as many rows."""
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, global_batch_size=min(EVAL_BATCH, problems)),
        eval=dataclasses.replace(cfg.eval, data=held_out, batches=1,
                                 step_checker="kd_jax.demo.arithmetic:check_steps"))


def _as_run(base: Config, run_name: str) -> Config:
    """`base` (the students' KD-store config) pointed at another run's checkpoints: every model is
    scored on the same held-out reference traces and the same teacher top-16."""
    return dataclasses.replace(base, run=dataclasses.replace(base.run, name=run_name))


def accuracy_curve(cfg: Config, problems, steps: list[int]) -> list[dict]:
    """(step, accuracy) of the run's checkpoints at `steps`, on `problems`."""
    tokenizer, mesh = load_tokenizer(cfg.tokenizer), sharding.mesh_from_config(cfg.mesh)
    points = []
    for step in steps:
        model, _ = restore_student(cfg, step, mesh)
        task = task_accuracy(model, tokenizer, problems, cfg.eval, cfg.train.global_batch_size,
                             step_separator=cfg.data.steps.separator)
        points.append({"step": step, "accuracy": task["accuracy"], "accuracy_low": task["accuracy_low"],
                       "accuracy_high": task["accuracy_high"], "examples": task["examples"]})
    return points


def _checkpoint_steps(cfg: Config) -> list[int]:
    with Checkpointer(cfg.checkpoint_dir, cfg.checkpoint) as ckpt:
        return ckpt.all_steps()


def plot(rows: list[dict], path: str) -> None:
    """Accuracy vs training compute for each student (95% intervals as bars), the teacher as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    teacher = rows[0]
    ax.axhline(100 * teacher["accuracy"], color="black", linestyle="--", label=f"teacher ({teacher['accuracy']:.1%})")
    for r in rows[1:]:
        pts = r["curve"]
        x = [p["gflop"] for p in pts]
        y = [100 * p["accuracy"] for p in pts]
        err = [[100 * (p["accuracy"] - p["accuracy_low"]) for p in pts],
               [100 * (p["accuracy_high"] - p["accuracy"]) for p in pts]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=r["model"].replace("student: ", ""))
    ax.set_xlabel("training compute (GFLOP)")
    ax.set_ylabel("accuracy on held-out problems (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"kd_jax demo: students at equal compute, greedy, 95% Wilson intervals "
                 f"(n={CURVE_PROBLEMS}; last point n={rows[1]['examples']})", fontsize=8)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _timed(path: str, fn) -> float:
    """Run `fn` and return its wall time, kept in `path` so that a rerun that finds the stage finished
    (fn then returns at once) reports the time it took."""
    if os.path.exists(path):
        fn()
        with open(path) as f:
            return json.load(f)["seconds"]
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    os.makedirs(os.path.dirname(path), exist_ok=True)
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


COLUMNS = (("model", "{}"), ("loss", "{}"), ("steps", "{}"), ("gflop", "{:,.0f}"), ("train_s", "{:.0f}"),
           ("accuracy", "{:.1%}"), ("interval", "{}"), ("step_accuracy", "{:.1%}"), ("hard", "{:.3f}"),
           ("soft", "{:.3f}"), ("top1_agree", "{:.1%}"), ("parameters", "{:,}"))
HEADERS = {"hard": "held-out CE", "soft": "KL(teacher)", "top1_agree": "top-1 = teacher", "train_s": "train s",
           "interval": "95% interval", "step_accuracy": "step acc", "gflop": "GFLOP"}


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


def _beats(a: dict, b: dict) -> bool:
    """a's accuracy is above b's by more than the intervals allow: a's lower bound above b's upper."""
    return a["accuracy_low"] > b["accuracy_high"]


def verdicts(rows: list[dict]) -> list[str]:
    """What the table shows, read off its 95% intervals: the teacher against the hard-label student
    (the teacher must be better before anything is distilled from it), then every distillation row
    against the hard-label student."""
    teacher, hard = rows[0], next(r for r in rows if r.get("variant") == "hard")

    def acc(r):
        return f"{r['accuracy']:.1%} [{r['accuracy_low']:.1%}, {r['accuracy_high']:.1%}]"

    lines = [f"teacher {acc(teacher)} vs hard-label student {acc(hard)}: "
             + ("the teacher is better beyond the intervals" if _beats(teacher, hard) else
                "NOT better beyond the intervals: the teacher has nothing to teach here")]
    for r in rows:
        if r.get("variant") in (None, "hard"):
            continue
        word = ("beats" if _beats(r, hard) else "loses to" if _beats(hard, r) else "is not told apart from")
        lines.append(f"{r['variant']} {acc(r)} {word} hard labels"
                     + (" (beyond the 95% intervals)" if word != "is not told apart from" else " (the intervals overlap)"))
    return lines


def run(out: str = "runs/demo", scale: float = 1.0, problems: int = PROBLEMS, max_examples: int = 512,
        fresh: bool = False, seed: int = 0, rows: tuple[str, ...] = DEFAULT_ROWS,
        teacher_scale: float | None = None) -> dict:
    t_start = time.perf_counter()
    if fresh and os.path.isdir(out):
        shutil.rmtree(out)
    p = plan(out, scale, seed, rows, teacher_scale)
    data = os.path.dirname(p.teacher.data.tokenizer)

    _stage(1, "traces and tokenizer", f"python -m kd_jax.demo.arithmetic --out {out}/data --n {round(problems * scale)}")
    if not os.path.isdir(p.teacher.data.tokenizer):  # (a store made with another tokenizer would not fit)
        arithmetic.write(data, max(64, round(problems * scale)))
    held_out = write_held_out(data, p.teacher.data.traces, max_examples)

    _stage(2, "teacher: hard labels only, from scratch, then exported",
           f"{p.command('precompute', 'teacher')}; {p.command('train', 'teacher')}; "
           f"python -m kd_jax.export --run {p.teacher.run_dir}")
    precompute(p.teacher, show_progress=False)
    teacher_s = _timed(os.path.join(p.teacher.run_dir, "demo_seconds.json"), lambda: train(p.teacher))
    export_run(p.teacher.run_dir, os.path.join(p.teacher.run_dir, "hf"), overwrite=True)

    _stage(3, "precompute the teacher's top-16 log-probs", p.command("precompute", "student"))
    precompute(p.base, show_progress=False)

    seconds = {}
    if any(ROWS[name].teacher_traces for name in p.students):
        hard = p.students["hard"]
        prompts = write_teacher_prompts(p.base, hard.train.steps)
        _stage(4, "the teacher writes a trace for each student training prompt, kept when its answer is right",
               p.command("generate", "student", f"generate.prompts={prompts}", f"generate.out={p.traces.generate.out}",
                         "generate.samples_per_prompt=1", "generate.temperature=0"))
        seconds["teacher traces"] = _timed(os.path.join(p.traces.generate.out, "demo_seconds.json"),
                                           lambda: tracegen(p.traces, show_progress=False))
        with open(os.path.join(p.traces.generate.out, "report.json")) as f:
            trace_report = json.load(f)
        print(f"    {format_trace_report(trace_report)}", flush=True)
        if trace_report["kept"]:
            precompute(p.students["teacher traces"], show_progress=False)
        else:  # (a teacher trained far too briefly, as in the tests' reduced demo)
            print(f"    no row 'teacher traces': the teacher answered none of {trace_report['prompts']} prompts "
                  f"right, so there is no verified trace to train on", flush=True)
            del p.students["teacher traces"]

    train_s = {}
    for i, (name, cfg) in enumerate(p.students.items()):
        row = ROWS[name]
        _stage(5, f"student {i + 1}/{len(p.students)}: {name} ({p.gflop[name]:,.0f} GFLOP)",
               p.command("train", "student", *row.overrides, f"run.name={cfg.run.name}",
                         f"train.steps={cfg.train.steps}"))
        if row.continues:
            parent = p.students[row.continues]
            start = os.path.join(parent.run_dir, f"hf-{p.half}")
            if not os.path.isdir(start):
                export_run(parent.run_dir, start, step=p.half)
        train_s[name] = _timed(os.path.join(cfg.run_dir, "demo_seconds.json"), lambda: train(cfg)) \
            + seconds.get(name, 0.0)

    _stage(6, f"evaluate on {max_examples} fresh problems, and each student at every quarter of its training",
           p.command("evaluate", "student", "[--model teacher]", f"eval.data={held_out}",
                     "eval.step_checker=kd_jax.demo.arithmetic:check_steps"))
    # Every model is scored against the same KD store (the teacher against its own top-16: KL ~ 0).
    table = [{**evaluate(_eval_config(_as_run(p.base, p.teacher.run.name), held_out, max_examples), "teacher",
                         max_examples),
              "model": "teacher", "loss": "hard labels (4 layers)", "steps": p.teacher.train.steps, "train_s": teacher_s,
              "gflop": p.teacher.train.steps * step_flops(p.teacher, p.teacher.student.architecture, {}) / 1e9}]
    curve_cfg = _eval_config(p.base, held_out, min(max_examples, CURVE_PROBLEMS))
    curve_problems = data_problems(curve_cfg.eval, load_tokenizer(p.base.tokenizer), CURVE_PROBLEMS)
    arch, per_step = p.base.student.architecture, {}
    curves = {}
    for name, cfg in p.students.items():
        row = ROWS[name]
        as_run = _as_run(p.base, cfg.run.name)
        final = evaluate(_eval_config(as_run, held_out, max_examples), "student", max_examples)
        per_step[name] = step_flops(cfg, arch, p.teacher.student.architecture) / 1e9
        offset = p.gflop[name] - cfg.train.steps * per_step[name]  # a continued row: its first half
        points = accuracy_curve(_as_run(curve_cfg, cfg.run.name), curve_problems, _checkpoint_steps(cfg)[:-1])
        for pt in points:
            pt["gflop"] = offset + pt["step"] * per_step[name]
        if row.continues:  # the parent's points up to the half-way checkpoint it starts from
            points = [pt for pt in curves[row.continues] if pt["step"] <= p.half] + points
        points.append({k: final[k] for k in ("accuracy", "accuracy_low", "accuracy_high", "examples")}
                      | {"step": cfg.train.steps, "gflop": p.gflop[name]})
        curves[name] = points
        table.append({**final, "model": f"student: {name}", "loss": row.loss, "curve": points, "variant": name,
                      "steps": f"{p.half}+{cfg.train.steps}" if row.continues else cfg.train.steps,
                      "gflop": p.gflop[name], "train_s": train_s[name]
                      + (train_s[row.continues] / 2 if row.continues else 0.0)})
    plot(table, os.path.join(out, "demo.png"))
    verdict = verdicts(table)

    best = max(table[1:], key=lambda r: (r["accuracy"], -r["hard"]))
    best_cfg = p.students[best["variant"]]
    folder = os.path.join(out, "export")
    _stage(7, f"export the best student ({best['model']}) and load it with transformers",
           f"python -m kd_jax.export --run {best_cfg.run_dir} --out {folder}")
    export_run(best_cfg.run_dir, folder, overwrite=True)
    prompt_ids, prompt, reference = _held_out_problem(p.base, transformers.AutoTokenizer.from_pretrained(folder))
    text = _hf_answer(folder, prompt_ids, p.base.eval.max_new_tokens)
    answer = extract_answer(text.replace("<|im_end|>", ""))

    report = {"rows": table, "verdicts": verdict, "best": best["model"], "export": folder, "prompt": prompt,
              "reference": reference, "generated": text, "answer": answer,
              "correct": matcher("numeric")(answer, reference), "seconds": time.perf_counter() - t_start}
    with open(os.path.join(out, "demo_report.json"), "w") as f:
        json.dump(report, f, indent=2, default=float)
    print(f"\n=== transformers loads {folder} and answers a held-out problem:\n{prompt}\n---\n{text}\n---"
          f"\nextracted {answer!r}, reference {reference!r}: {'correct' if report['correct'] else 'wrong'}")
    print(f"\n=== kd_jax demo: {round(problems * scale)} problems, {max_examples} held out for accuracy, "
          f"students at {p.gflop['hard']:,.0f} GFLOP each, {time.perf_counter() - t_start:.0f} s in all\n")
    print(format_table(table))
    print("\n" + "\n".join(verdict))
    print(f"\nbest student: {best['model']} ({best['accuracy']:.1%}). "
          f"Report: {out}/demo_report.json; accuracy vs compute: {out}/demo.png")
    return report
