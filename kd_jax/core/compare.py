"""Does distillation pay on this data? The equal-compute comparison behind `python -m kd_jax.compare`
(and both demos): rows (a named config override each: cross-entropy, top-K, sampled, online,
on-policy, ...) x seeds, every row given the reference row's training compute, every run scored on
one held-out set, a table with seed ranges, verdicts only where the seeds support them, a picture
(metric vs training compute) and a JSON report.

A rows file (YAML; kd_jax/demo/rows/*.yaml are two):

    config: student.yaml              # the config every row starts from (relative to this file)
    overrides: [loss.beta=0]           # shared by every row (the command line adds its KEY=VALUEs)
    seeds: [0, 1, 2]                   # each run sets every key of seed_keys to its seed
    seed_keys: [run.seed, data.shuffle_seed]
    checkpoints: all                   # or last: all but the last deleted once a run is scored
    eval:
      kind: store                      # store: the KD store's held-out split + eval.data's task by generation
      data: questions.jsonl            # text: held-out documents ({"text": ...}), full-vocabulary KL and a
      examples: 512                    #   last-word task; examples = problems / documents scored
      curve_examples: 128              # per point of the curves (every checkpoint)
    rows:
      - name: cross-entropy            # the first row is the reference: its train.steps are the budget
        learns: CE on the traces
        overrides: [loss.alpha=0]
      - name: on-policy
        overrides: [teacher.mode=online, train.on_policy.fraction=1.0, student.init=hf, student.architecture=null]
        continues: cross-entropy       # starts from that row's half-way checkpoint (its first half is that row's)

`${name}` in an override is replaced by the caller's variables (`out` always: the comparison's folder).

Equal compute: a row trains max(min_steps, round(budget / its step FLOPs)) steps, the budget being the
reference row's steps times its step FLOPs (6·P + 3·A per trained token; an online teacher adds its
forward, on-policy sampling the student's forward over every sampled position, `step_flops`).

Every stage (a demo's data, store or teacher, and every run) is a folder under the comparison's
`out` recorded in <out>/compare.json with the inputs it was made from: a rerun reuses it when they
match, and redoes it (after removing only that folder) when they differ. A folder the comparison did
not write is never written over or removed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import time
from typing import Any, Callable, Protocol

import jax
import yaml

from kd_jax.base import sharding
from kd_jax.base.errors import KDJaxError
from kd_jax.base.loader import load_config, to_dict
from kd_jax.base.schema import Config
from kd_jax.core.checkpoint import Checkpointer
from kd_jax.core.evaluation import (
    TextEvaluator,
    data_problems,
    evaluate,
    held_out_text,
    store_eval_indices,
    store_problems,
    task_accuracy,
)
from kd_jax.core.grading import wilson_interval
from kd_jax.core.loop import train
from kd_jax.core.runs import export_run, flatten, restore_student
from kd_jax.data.store import KDStore
from kd_jax.models import flops
from kd_jax.models.hf import load_hf, load_tokenizer
from kd_jax.models.source import source_config

MANIFEST = "compare.json"
REPORT = "compare_report.json"
SEED_KEYS = ("run.seed", "data.shuffle_seed")
EVAL_KINDS = ("store", "text")
METRICS = (("ce", "held-out CE", "{:.3f}", True), ("kl", "KL(teacher)", "{:.3f}", True),
           ("top1_agree", "top-1 = teacher", "{:.1%}", False), ("step_task", "step acc", "{:.1%}", False))


class CompareError(KDJaxError, ValueError):
    """A rows file, row or comparison folder that cannot be run as given."""


# ------------------------------------------------------------------------------- the rows file


@dataclasses.dataclass(frozen=True)
class Row:
    """One way of training the student: the config with `overrides`."""
    name: str
    learns: str = ""  # the table's description of what it learns from
    overrides: tuple[str, ...] = ()
    continues: str | None = None  # starts from that row's half-way checkpoint

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "_", self.name.lower()).strip("_")

    def run_name(self, seed: int) -> str:
        return f"{self.slug}_s{seed}"


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    kind: str = "store"
    data: str | None = None  # store: eval.data (questions + answers); text: held-out documents (required)
    examples: int = 512
    curve_examples: int = 128
    start_name: str = "start (untrained)"  # the reference line of the student before training (init=hf)


@dataclasses.dataclass(frozen=True)
class Comparison:
    config: str
    rows: tuple[Row, ...]
    overrides: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    seed_keys: tuple[str, ...] = SEED_KEYS
    checkpoints: str = "all"
    min_steps: int = 4
    eval: EvalSpec = EvalSpec()

    @property
    def reference(self) -> Row:
        return self.rows[0]

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)


def _tuple(value, where: str) -> tuple:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise CompareError(f"{where} must be a list, got {value!r}")
    return tuple(value)


def load_rows(path: str) -> Comparison:
    """A rows file, checked: known keys, unique row names, `continues` naming an earlier row."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise CompareError(f"cannot read the rows file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise CompareError(f"{path} is not YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise CompareError(f"{path}: a rows file is a mapping with config, rows, seeds, ...; see kd_jax/demo/rows/")
    known = {f.name for f in dataclasses.fields(Comparison)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CompareError(f"{path}: unknown keys {unknown}; a rows file has {', '.join(sorted(known))}")
    if "config" not in raw or "rows" not in raw:
        raise CompareError(f"{path}: set config (the config every row starts from) and rows (at least one)")
    rows = []
    for i, r in enumerate(_tuple(raw["rows"], f"{path}: rows")):
        if not isinstance(r, dict) or "name" not in r:
            raise CompareError(f"{path}: rows[{i}] needs a name (and overrides, learns, continues)")
        bad = sorted(set(r) - {f.name for f in dataclasses.fields(Row)})
        if bad:
            raise CompareError(f"{path}: rows[{i}] ({r['name']}) has unknown keys {bad}; a row has name, learns, "
                               f"overrides, continues")
        rows.append(Row(str(r["name"]), str(r.get("learns", "")), tuple(str(o) for o in _tuple(
            r.get("overrides"), f"rows[{i}].overrides")), r.get("continues")))
    ev = raw.get("eval") or {}
    bad = sorted(set(ev) - {f.name for f in dataclasses.fields(EvalSpec)})
    if bad:
        raise CompareError(f"{path}: eval has unknown keys {bad}; it has kind, data, examples, curve_examples, "
                           f"start_name")
    config = raw["config"]
    if not os.path.isabs(config):
        config = os.path.join(os.path.dirname(os.path.abspath(path)), config)
    comparison = Comparison(config=config, rows=tuple(rows),
                            overrides=tuple(str(o) for o in _tuple(raw.get("overrides"), "overrides")),
                            seeds=tuple(int(s) for s in _tuple(raw.get("seeds", [0]), "seeds")),
                            seed_keys=tuple(_tuple(raw.get("seed_keys", list(SEED_KEYS)), "seed_keys")),
                            checkpoints=raw.get("checkpoints", "all"), min_steps=int(raw.get("min_steps", 4)),
                            eval=EvalSpec(**ev))
    check(comparison, path)
    return comparison


def check(c: Comparison, where: str = "the comparison") -> None:
    """Every rule a comparison must meet, before anything runs."""
    names = [r.name for r in c.rows]
    if not names:
        raise CompareError(f"{where}: no rows; the first row is the reference (e.g. cross-entropy)")
    if len(set(names)) != len(names) or len({r.slug for r in c.rows}) != len(names):
        raise CompareError(f"{where}: row names {names} repeat (or differ only in punctuation); name each row once")
    for i, r in enumerate(c.rows):
        if r.continues is not None and r.continues not in names[:i]:
            raise CompareError(f"{where}: row {r.name!r} continues {r.continues!r}, which is not an earlier row")
    if not c.seeds or len(set(c.seeds)) != len(c.seeds) or min(c.seeds) < 0:
        raise CompareError(f"{where}: seeds {list(c.seeds)} must be distinct non-negative integers (e.g. 0,1,2)")
    if c.checkpoints not in ("all", "last"):
        raise CompareError(f"{where}: checkpoints={c.checkpoints!r}; choose all or last")
    if c.min_steps < 1:
        raise CompareError(f"{where}: min_steps={c.min_steps} must be at least 1")
    e = c.eval
    if e.kind not in EVAL_KINDS:
        raise CompareError(f"{where}: eval.kind={e.kind!r}; choose store (the KD store's held-out split and "
                           f"eval.data's task) or text (held-out documents, full-vocabulary KL)")
    if e.kind == "text" and not e.data:
        raise CompareError(f"{where}: eval.kind=text needs eval.data, a JSONL file of held-out documents "
                           f"({{\"text\": ...}} per line)")
    if e.examples < 1 or e.curve_examples < 1:
        raise CompareError(f"{where}: eval.examples={e.examples} and eval.curve_examples={e.curve_examples} must "
                           f"be at least 1")
    if not os.path.exists(c.config):
        raise CompareError(f"{where}: config {c.config} does not exist")


def shown(path: str) -> str:
    """`path` relative to the working directory when it lies under it, else as it is."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _substitute(override: str, variables: dict[str, str]) -> str:
    def one(m):
        if m.group(1) not in variables:
            raise CompareError(f"override {override!r} names ${{{m.group(1)}}}; the variables are "
                               f"{', '.join(sorted(variables))}")
        return str(variables[m.group(1)])
    return re.sub(r"\$\{(\w+)\}", one, override)


# ------------------------------------------------------------------------------- stages


class Workspace:
    """The comparison's folder: every stage a folder under it, recorded in <out>/compare.json with the
    inputs it was made from and its result."""

    def __init__(self, out: str):
        if os.path.lexists(out) and not os.path.isdir(out):
            raise CompareError(f"--out {out} is a file, not a folder; pick a folder (new or one a comparison wrote)")
        self.out = out
        self.path = os.path.join(out, MANIFEST)
        self.entries: dict[str, dict] = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.entries = json.load(f)["stages"]

    def _save(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"stages": self.entries}, f, indent=1, default=str)
        os.replace(tmp, self.path)

    def check_writable(self, names) -> None:
        """Refuse, before any work, a stage folder that exists and was not written here."""
        ours = {n for name in self.entries for n in self._names(name)}
        for name in names:
            path = os.path.join(self.out, name)
            if os.path.lexists(path) and name not in ours:
                raise CompareError(f"{path} exists and was not written by this comparison (no record in "
                                   f"{self.path}); move it away or pick another --out: nothing of yours is "
                                   f"written over")

    def inputs(self, name: str) -> dict | None:
        """What the recorded stage `name` was made from (None: no such stage)."""
        return self.entries.get(name, {}).get("inputs")

    def claim(self, *names: str) -> None:
        """Record output files (a report, a picture) as this comparison's, refusing ones it did not write."""
        self.check_writable(names)
        new = [n for n in names if n not in self.entries]
        for n in new:
            self.entries[n] = {"inputs": {}, "state": "output"}
        if new:
            self._save()

    def _names(self, name: str) -> list[str]:
        return [name, *self.entries.get(name, {}).get("also", [])]

    def fresh(self) -> list[str]:
        """Remove every folder a recorded stage wrote (nothing else); returns their names."""
        removed = []
        for name, entry in list(self.entries.items()):
            if entry.get("state") != "adopted":
                for n in self._names(name):
                    _remove(os.path.join(self.out, n))
                    removed.append(n)
            del self.entries[name]
        if removed:
            self._save()
        return removed

    def stage(self, name: str, inputs: dict, build: Callable[[str], Any], *, adopt: Callable[[str], bool] | None = None,
              resumable: bool = False, also: tuple[str, ...] = ()):
        """build(<out>/<name>)'s result, or the recorded one when the stage was made from the same
        `inputs`. Changed inputs: the folder (and the folders `also` names, which the stage writes too)
        is removed and built again. `adopt(path)`: a folder that is already there and was not written
        here is used as it is (and never removed). `resumable`: a stage interrupted with the same
        inputs is built again over what it left (training resumes)."""
        path = os.path.join(self.out, name)
        inputs = json.loads(json.dumps(inputs, default=str))
        entry = self.entries.get(name)
        if entry is not None and entry["inputs"] == inputs and entry["state"] in ("done", "adopted"):
            return entry.get("result")
        if entry is None and os.path.lexists(path) and adopt is not None and adopt(path):
            self.entries[name] = {"inputs": inputs, "state": "adopted", "result": None}
            self._save()
            return None
        if entry is None:
            self.check_writable([name, *also])
        elif not (resumable and entry["inputs"] == inputs):
            if entry["state"] == "adopted":
                raise CompareError(f"{path} was there before this comparison (used as it is) and its inputs "
                                   f"changed: {_changed(entry['inputs'], inputs)}; move it away to have it built")
            changed = _changed(entry["inputs"], inputs)
            if changed:
                print(f"    {name}: made from other inputs ({changed}): built again", flush=True)
            for n in self._names(name):
                _remove(os.path.join(self.out, n))
        self.entries[name] = {"inputs": inputs, "state": "started", "also": list(also)}
        self._save()
        result = build(path)
        self.entries[name] = {"inputs": inputs, "state": "done", "also": list(also), "result": result}
        self._save()
        return json.loads(json.dumps(result, default=str))


def _remove(path: str) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def _changed(old: dict, new: dict, limit: int = 4) -> str:
    a, b = flatten(old), flatten(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:limit])
    return shown + (f", and {len(keys) - limit} more" if len(keys) > limit else "")


# ------------------------------------------------------------------------------- equal compute


def step_flops(cfg: Config, student, teacher) -> float:
    """Training FLOPs of one optimizer step of `cfg` for DecoderConfigs `student` and `teacher`
    (kd_jax.models.flops: 6·P + 3·A per trained token; an online teacher adds its forward, 2·P + A per
    token; on-policy sampling adds the student's forward over every sampled position at its upper
    bound, the prompt bucket plus max_new_tokens)."""
    seq, tokens = cfg.data.seq_len, cfg.data.seq_len * cfg.train.global_batch_size
    total = flops.train_flops_per_token(student, seq) * tokens
    if cfg.teacher.mode == "online":
        total += flops.forward_flops_per_token(teacher, seq) * tokens
        op = cfg.train.on_policy
        if op.fraction > 0:
            length = op.bucket + op.max_new_tokens
            total += op.fraction * (op.prompts_per_step or cfg.train.global_batch_size) * length * \
                flops.forward_flops_per_token(student, length)
    return total


@dataclasses.dataclass
class Plan:
    """Every run of a comparison: its config, steps, compute; the reference's step FLOPs."""
    runs: dict[tuple[str, int], Config]  # (row, seed) -> config
    args: dict[tuple[str, int], list[str]]  # (row, seed) -> its overrides of the rows file's config
    gflop: dict[str, float]  # row -> training compute of one run (a continued row's first half included)
    per_step: dict[str, float]  # row -> GFLOP of one of its steps
    start: dict[str, int]  # a continued row -> the step of its parent it starts from


def row_args(c: Comparison, out: str, overrides=(), variables=None) -> dict[tuple[str, int], list[str]]:
    """Every run's overrides of `c.config`, as a command line takes them (the steps and a continued
    row's start are added by `plan`)."""
    variables = {"out": out, **(variables or {})}
    shared = [_substitute(o, variables) for o in (*c.overrides, *overrides)]
    args = {}
    for row in c.rows:
        extra = [_substitute(o, variables) for o in row.overrides]
        for seed in c.seeds:
            args[(row.name, seed)] = [*shared, *extra, f"run.output_dir={out}", f"run.name={row.run_name(seed)}",
                                      *[f"{k}={seed}" for k in c.seed_keys]]
    return args


def row_configs(c: Comparison, out: str, overrides=(), variables=None) -> dict[tuple[str, int], Config]:
    """Every run's config before the budget is known: checks every override of every row."""
    configs = {}
    for (name, seed), args in row_args(c, out, overrides, variables).items():
        row = c.row(name)
        if row.continues:  # (the checkpoint it starts from is known once the budget is)
            args = [*args, f"student.hf_path={os.path.join(out, c.row(row.continues).run_name(seed), 'hf')}"]
        configs[(name, seed)] = load_config(c.config, args)
    return configs


def plan(c: Comparison, out: str, overrides=(), variables=None) -> Plan:
    """The runs at equal compute: the reference row's train.steps set the budget (its steps times its
    step FLOPs); every row trains as many steps as the budget buys, at least min_steps, checkpointed at
    each quarter. A row that continues another starts from that row's half-way checkpoint and spends
    the rest. The student's and teacher's shapes are read from the reference row's config (its
    teacher's config.json must exist when a row runs the teacher in its step)."""
    configs = row_configs(c, out, overrides, variables)
    args = row_args(c, out, overrides, variables)
    ref_cfg = configs[(c.reference.name, c.seeds[0])]
    student = source_config(ref_cfg.student, ref_cfg.teacher)
    needs_teacher = any(cfg.teacher.mode == "online" for cfg in configs.values())
    teacher = source_config(ref_cfg.teacher, role="teacher") if needs_teacher else None
    ref_steps, ref_per_step = ref_cfg.train.steps, step_flops(ref_cfg, student, teacher)
    p = Plan({}, {}, {}, {}, {})
    for row in c.rows:
        start = 0
        if row.continues:
            parent = p.runs[(row.continues, c.seeds[0])].train
            start = parent.steps // 2
            if start % max(1, parent.steps // 4):
                raise CompareError(f"row {row.name!r} continues {row.continues!r} from its half-way checkpoint, but "
                                   f"{row.continues!r} trains {parent.steps} steps, checkpointed every "
                                   f"{max(1, parent.steps // 4)}: none at step {start}; give the reference row a "
                                   f"multiple of 4 steps (train.steps)")
        for seed in c.seeds:
            cfg = configs[(row.name, seed)]
            per_step = step_flops(cfg, student, teacher)
            n = max(c.min_steps, round((ref_steps - start) * ref_per_step / per_step))
            extra = [f"train.steps={n}", f"checkpoint.every_steps={max(1, n // 4)}"]
            if row.continues:
                extra.append(f"student.hf_path={os.path.join(p.runs[(row.continues, seed)].run_dir, f'hf-{start}')}")
            p.args[(row.name, seed)] = [*args[(row.name, seed)], *extra]
            p.runs[(row.name, seed)] = load_config(c.config, p.args[(row.name, seed)])
            p.gflop[row.name] = (n * per_step + start * ref_per_step) / 1e9
            p.per_step[row.name] = per_step / 1e9
        if row.continues:
            p.start[row.name] = start
    return p


# ------------------------------------------------------------------------------- scoring


class Scorer(Protocol):
    """How every model of a comparison is scored on one held-out set."""
    curve_metric: str  # the metric drawn against training compute

    def identity(self) -> dict: ...  # what the scores depend on (a run is redone when it changes)

    def references(self) -> dict: ...  # {"lines": the teacher's (and the untrained student's) scores as
    #   table lines {"row": ..., metrics}, "start": the untrained student's curve metric (step 0) or None}

    def score(self, cfg: Config, steps: list[int]) -> tuple[dict, list[dict]]: ...  # final, curve points


EVAL_BATCH = 64  # generation rows per call and rows of the one held-out KD-loss batch (StoreScorer)


def base_args(c: Comparison, out: str, overrides=(), variables=None) -> list[str]:
    """The shared overrides of the rows file's config (no row's), `${name}`s replaced."""
    variables = {"out": out, **(variables or {})}
    return [_substitute(o, variables) for o in (*c.overrides, *overrides)] + [f"run.output_dir={out}"]


def base_config(c: Comparison, out: str, overrides=(), variables=None) -> Config:
    """The config with the shared overrides and no row's: what every model is scored under."""
    return load_config(c.config, base_args(c, out, overrides, variables))


def _store_metrics(report: dict) -> dict:
    """kd_jax.core.evaluation.evaluate's report with the comparison's metric names added."""
    out = dict(report)
    for new, old in (("ce", "hard"), ("kl", "soft"), ("task", "accuracy"), ("task_low", "accuracy_low"),
                     ("task_high", "accuracy_high"), ("task_n", "examples"), ("task_right", "correct_samples"),
                     ("step_task", "step_accuracy")):
        if report.get(old) is not None:
            out[new] = report[old]
    out.pop("samples", None)
    return out


class StoreScorer:
    """eval.kind=store: held-out CE, KL to the stored teacher targets and top-1 agreement on the KD
    store's held-out split (one batch of EVAL_BATCH rows), and the task by greedy generation on
    eval.data (or the store's held-out prompts) with its Wilson interval and, with eval.step_checker,
    step accuracy (kd_jax.core.evaluation.evaluate). The curves: task accuracy at every checkpoint on
    the first curve_examples problems."""
    curve_metric = "task"

    def __init__(self, base: Config, spec: EvalSpec):
        self.base, self.spec = base, spec

    def identity(self) -> dict:
        return {"kind": "store", "spec": dataclasses.asdict(self.spec), "store": self.base.data.store,
                "eval": to_dict(self.base.eval), "teacher": to_dict(self.base.teacher)}

    def _config(self, run_name: str, problems: int) -> Config:
        cfg = self.base
        return dataclasses.replace(
            cfg, run=dataclasses.replace(cfg.run, name=run_name),
            train=dataclasses.replace(cfg.train, global_batch_size=min(EVAL_BATCH, problems)),
            eval=dataclasses.replace(cfg.eval, data=self.spec.data or cfg.eval.data, batches=1))

    def references(self) -> dict:
        n = self.spec.examples
        lines = [{"row": "teacher", **_store_metrics(evaluate(self._config("references", n), "teacher", n))}]
        if self.base.student.init == "hf":
            lines.append({"row": self.spec.start_name, **_store_metrics(
                evaluate(self._config("references", n), "student", n, untrained=True))})
        return {"lines": lines, "start": None}

    def score(self, cfg: Config, steps: list[int]) -> tuple[dict, list[dict]]:
        n, m = self.spec.examples, min(self.spec.examples, self.spec.curve_examples)
        final = _store_metrics(evaluate(self._config(cfg.run.name, n), "student", n))
        curve_cfg = self._config(cfg.run.name, m)
        tokenizer = load_tokenizer(curve_cfg.tokenizer, curve_cfg.tokenizer_revision)
        mesh = sharding.mesh_from_config(curve_cfg.mesh)
        if curve_cfg.eval.data:
            problems = data_problems(curve_cfg.eval, tokenizer, m)
        else:  # the store's held-out prompts, as evaluate() reads them
            store = KDStore.open(curve_cfg.data.store)
            problems = store_problems(store, store_eval_indices(store, curve_cfg, tokenizer)[:m], tokenizer)
        points = []
        for step in steps[:-1]:
            model, _ = restore_student(curve_cfg, step, mesh)
            task = task_accuracy(model, tokenizer, problems, curve_cfg.eval, curve_cfg.train.global_batch_size,
                                 step_separator=curve_cfg.data.steps.separator)
            points.append({"step": step, "task": task["accuracy"], "task_low": task["accuracy_low"],
                           "task_high": task["accuracy_high"], "task_n": task["examples"]})
        points.append({"step": steps[-1], **{k: final[k] for k in ("task", "task_low", "task_high", "task_n")}})
        return final, points


class TextScorer:
    """eval.kind=text: the first `examples` held-out documents of eval.data (JSONL, {"text": ...}),
    scored against the teacher's full-vocabulary log-probs (kd_jax.core.evaluation.TextEvaluator):
    held-out CE, KL, top-1 agreement and the last-word task. The curves: held-out CE at every
    checkpoint on the first curve_examples documents. The teacher's log-probs are held in memory
    (documents x seq_len x vocab floats)."""
    curve_metric = "ce"

    def __init__(self, base: Config, spec: EvalSpec):
        self.base, self.spec = base, spec
        self._ev = None
        if not os.path.exists(spec.data):
            raise CompareError(f"eval.data {spec.data} does not exist: a JSONL file of held-out documents")

    def identity(self) -> dict:
        return {"kind": "text", "spec": dataclasses.asdict(self.spec), "seq_len": self.base.data.seq_len,
                "teacher": to_dict(self.base.teacher), "tokenizer": self.base.tokenizer}

    def _model(self, src):
        return load_hf(src.hf_path, param_dtype=src.param_dtype, dtype=src.dtype, revision=src.revision)

    def evaluator(self, teacher=None) -> TextEvaluator:
        if self._ev is None:
            with open(self.spec.data) as f:
                docs = [json.loads(line)["text"] for line in f][:self.spec.examples]
            tokenizer = load_tokenizer(self.base.tokenizer, self.base.tokenizer_revision)
            data = held_out_text(tokenizer, docs, self.base.data.seq_len)
            self._ev = TextEvaluator(teacher or self._model(self.base.teacher), data)
        return self._ev

    def references(self) -> dict:
        teacher = self._model(self.base.teacher)
        ev = self.evaluator(teacher)
        lines = [{"row": "teacher", **ev.score(teacher), "curve_ce": ev.score(teacher, self.spec.curve_examples)["ce"]}]
        start = None
        if self.base.student.init == "hf":
            initial = self._model(self.base.student)
            lines.append({"row": self.spec.start_name, **ev.score(initial)})
            start = {"ce": ev.score(initial, self.spec.curve_examples)["ce"]}
        return {"lines": lines, "start": start, "task_candidates": ev.candidates, "task_items": len(ev.items),
                "tokens": int(ev.data.mask.sum())}

    def score(self, cfg: Config, steps: list[int]) -> tuple[dict, list[dict]]:
        ev = self.evaluator()
        mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])  # where load_hf puts the teacher
        final, points = None, []
        for step in steps:
            model, _ = restore_student(cfg, step, mesh)
            if step == steps[-1]:
                final = ev.score(model)
            points.append({"step": step, "ce": ev.score(model, self.spec.curve_examples)["ce"]})
        return final, points


def check_eval_batch(c: Comparison, devices: int) -> None:
    """The store scorer's batches (min(EVAL_BATCH, examples) rows) are split over the data-parallel
    devices: refuse, before anything runs, a count they cannot split."""
    if c.eval.kind != "store":
        return
    for name, n in (("examples", c.eval.examples), ("curve_examples", min(c.eval.examples, c.eval.curve_examples))):
        batch = min(EVAL_BATCH, n)
        if batch % devices:
            raise CompareError(f"eval.{name}={n}: the scorer's batch of {batch} rows does not split over {devices} "
                               f"devices; use a multiple of {devices} (or {EVAL_BATCH} or more)")


def make_scorer(c: Comparison, base: Config) -> Scorer:
    return (TextScorer if c.eval.kind == "text" else StoreScorer)(base, c.eval)


def _tokens_per_s(cfg: Config) -> float | None:
    """A finished run's mean logged tokens/s (the first log, which holds the compile, left out)."""
    path = os.path.join(cfg.run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    rows = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "tokens_per_s" in row:
                rows.append(row["tokens_per_s"])
    rows = rows[1:] or rows
    return sum(rows) / len(rows) if rows else None


def _checkpoint_steps(cfg: Config) -> list[int]:
    with Checkpointer(cfg.checkpoint_dir, cfg.checkpoint) as ckpt:
        return ckpt.all_steps()


def _delete_checkpoints(cfg: Config, steps: list[int]) -> None:
    with Checkpointer(cfg.checkpoint_dir, cfg.checkpoint) as ckpt:
        for step in steps:
            ckpt.delete(step)


def run_all(c: Comparison, p: Plan, ws: Workspace, scorer: Scorer, *, start_point: dict | None = None,
            stage_title=None) -> list[dict]:
    """Train and score every run (each a recorded stage: reused when its config and the scorer's inputs
    are unchanged). `start_point`: the untrained student's curve metric (the curves' step 0). Returns
    one dict per run."""
    children = {r.continues for r in c.rows if r.continues}
    runs, curves, seconds = [], {}, {}
    for i, ((name, seed), cfg) in enumerate(p.runs.items()):
        row = c.row(name)
        title = (f"student {i + 1}/{len(p.runs)}: {name}, seed {seed} ({p.gflop[name]:,.0f} GFLOP, "
                 f"{cfg.train.steps} steps)")
        command = " ".join(["python -m kd_jax.train --config", shlex.quote(shown(c.config)),
                            *map(shlex.quote, p.args[(name, seed)])])
        print(f"\n=== {stage_title(title) if stage_title else title}\n    ({command})", flush=True)

        def build(path, cfg=cfg, name=name):
            t0 = time.perf_counter()
            train(cfg)
            seconds = time.perf_counter() - t0
            steps = _checkpoint_steps(cfg)
            if name in children:  # the half-way student a continued row starts from, before any is deleted
                half = next(p.start[r.name] for r in c.rows if r.continues == name)
                export_run(cfg.run_dir, os.path.join(cfg.run_dir, f"hf-{half}"), step=half, overwrite=True)
            final, curve = scorer.score(cfg, steps)
            if c.checkpoints == "last":
                _delete_checkpoints(cfg, steps[:-1])
            return {"seconds": seconds, "tokens_per_s": _tokens_per_s(cfg), "final": final, "curve": curve}

        inputs = {"config": to_dict(cfg), "scorer": scorer.identity(),
                  "start": ws.inputs(c.row(row.continues).run_name(seed)) if row.continues
                  else None}
        result = ws.stage(cfg.run.name, inputs, build, resumable=True)
        start = p.start.get(name, 0)
        x0 = p.gflop[name] - cfg.train.steps * p.per_step[name] if row.continues else 0.0  # the parent's half
        points = [{**pt, "gflop": x0 + pt["step"] * p.per_step[name]} for pt in result["curve"]]
        if row.continues:  # the parent's points up to the checkpoint this row starts from
            points = [pt for pt in curves[(row.continues, seed)] if pt["step"] <= start] + points
        elif start_point is not None:
            points = [{"step": 0, "gflop": 0.0, **start_point}] + points
        curves[(name, seed)] = points
        final = result["final"]
        seconds[(name, seed)] = result["seconds"]
        if row.continues:  # the parent's seconds up to the checkpoint this row starts from
            parent = p.runs[(row.continues, seed)]
            seconds[(name, seed)] += seconds[(row.continues, seed)] * start / parent.train.steps
        runs.append({**final, "row": name, "learns": row.learns, "seed": seed,
                     "steps": f"{start}+{cfg.train.steps}" if row.continues else cfg.train.steps,
                     "gflop": p.gflop[name], "train_s": seconds[(name, seed)], "tokens_per_s": result["tokens_per_s"],
                     "curve": points})
        said = ", ".join(f"{label} {fmt.format(final[k])}" for k, label, fmt, _ in METRICS if final.get(k) is not None)
        if final.get("task") is not None:
            said += f", task {final['task']:.1%}"
        print(f"    {name}, seed {seed}: {said}", flush=True)
    return runs


# ------------------------------------------------------------------------------- the report


def _mean(xs):
    return sum(xs) / len(xs)


def summarize(runs: list[dict]) -> list[dict]:
    """One line per row: each metric's mean over seeds and its seed range; the task pooled over seeds
    (right / n summed) with its Wilson interval; steps, compute, train seconds and tokens/s."""
    lines = []
    for name in dict.fromkeys(r["row"] for r in runs):
        rs = [r for r in runs if r["row"] == name]
        speeds = [r["tokens_per_s"] for r in rs if r.get("tokens_per_s")]
        seconds = [r["train_s"] for r in rs if r.get("train_s") is not None]
        line = {"row": name, "learns": rs[0].get("learns", "-"), "seeds": len(rs), "steps": rs[0].get("steps"),
                "gflop": rs[0].get("gflop"), "train_s": _mean(seconds) if seconds else None,
                "tokens_per_s": _mean(speeds) if speeds else None}
        for k in [m[0] for m in METRICS] + ["task"]:
            vals = [r[k] for r in rs if r.get(k) is not None]
            if len(vals) == len(rs):
                line[k], line[k + "_range"] = _mean(vals), (min(vals), max(vals))
        if "task" in line:
            right, n = sum(r["task_right"] for r in rs), sum(r["task_n"] for r in rs)
            line["task_low"], line["task_high"] = wilson_interval(right, n)
            line["task_n"] = rs[0]["task_n"]
        lines.append(line)
    return lines


def format_table(lines: list[dict]) -> str:
    """The table: a metric's mean and, with several seeds, its seed range; the task with its pooled
    95% Wilson interval. Columns no line has are left out."""
    cols = [("row", lambda ln: ln["row"]), ("learns from", lambda ln: ln.get("learns") or "-"),
            ("steps", lambda ln: str(ln["steps"]) if ln.get("steps") is not None else "-"),
            ("GFLOP", lambda ln: f"{ln['gflop']:,.0f}" if ln.get("gflop") else "-"),
            ("train s", lambda ln: f"{ln['train_s']:.0f}" if ln.get("train_s") is not None else "-"),
            ("tok/s", lambda ln: f"{ln['tokens_per_s']:,.0f}" if ln.get("tokens_per_s") else "-")]

    def rng(k, fmt):
        def cell(line):
            if k not in line:
                return "-"
            lo, hi = line[k + "_range"]
            return fmt.format(line[k]) + ("" if line["seeds"] == 1 else f" ({fmt.format(lo)}-{fmt.format(hi)})")
        return cell

    for k, label, fmt, _ in METRICS:
        if any(k in line for line in lines):
            cols.append((label, rng(k, fmt)))
    if any("task" in line for line in lines):
        cols.append(("task acc [95% interval]", lambda ln: rng("task", "{:.1%}")(ln) + (
            f" [{ln['task_low']:.1%}, {ln['task_high']:.1%}]" if "task" in ln else "")))
    cols = [(h, f) for h, f in cols if h in ("row", "learns from") or any(f(ln) != "-" for ln in lines)]
    cells = [[h for h, _ in cols]] + [[f(ln) for _, f in cols] for ln in lines]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    out = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
           for row in cells]
    return "\n".join([out[0], "-" * len(out[0]), *out[1:]])


def _compared(lines: list[dict], reference: str, references: set[str]) -> list[dict]:
    return [ln for ln in lines if ln["row"] != reference and ln["row"] not in references]


def verdicts(lines: list[dict], reference: str, references: set[str] = frozenset()) -> list[str]:
    """Every row against the reference row on held-out CE and on the task, read off the seed ranges: it
    beats (loses to) it when its worst seed is better (its best seed worse) than the reference's best
    (worst) seed; otherwise they tie. No verdict with fewer than two seeds on either side: a difference
    must exceed the seed spread, and one seed has none."""
    ref = next(ln for ln in lines if ln["row"] == reference)
    others = _compared(lines, reference, references)
    few = sorted({ln["seeds"] for ln in [ref, *others]})
    if few[0] < 2:
        return [f"no verdict: {few[0]} seed per row, and a verdict needs at least 2 on both sides (a difference "
                f"must exceed the seed spread); rerun with more seeds (--seeds 0,1,2)"]
    out = []
    for line in others:
        words = []
        for k, label, fmt, lower_better in (("ce", "held-out CE", "{:.3f}", True), ("task", "task", "{:.1%}", False)):
            if k not in line or k not in ref:
                continue
            (lo, hi), (rlo, rhi) = line[k + "_range"], ref[k + "_range"]
            better, worse = (hi < rlo, lo > rhi) if lower_better else (lo > rhi, hi < rlo)
            word = "beats" if better else "loses to" if worse else "ties"
            words.append(f"{label} {fmt.format(line[k])} {word} {reference}'s {fmt.format(ref[k])}")
        out.append(f"{line['row']}: " + "; ".join(words))
    return out


def teacher_check(lines: list[dict], reference: str) -> str | None:
    """Can the experiment show anything: is the teacher better than the reference row beyond the task's
    95% intervals (or, without a task, than every seed of it on held-out CE)?"""
    teacher = next((ln for ln in lines if ln["row"] == "teacher"), None)
    ref = next(ln for ln in lines if ln["row"] == reference)
    if teacher is None:
        return None
    if "task" in teacher and "task" in ref:
        def acc(ln):
            return f"{ln['task']:.1%} [{ln['task_low']:.1%}, {ln['task_high']:.1%}]"
        better = teacher["task_low"] > ref["task_high"]
        said = f"teacher {acc(teacher)} vs {reference} {acc(ref)}"
    else:
        better = teacher["ce"] < ref["ce_range"][0]
        said = f"teacher held-out CE {teacher['ce']:.3f} vs {reference} {ref['ce']:.3f}"
    return said + (": the teacher is better beyond the intervals" if better else
                   ": NOT better beyond the intervals: the teacher has nothing to teach here")


def plot(runs: list[dict], references: list[dict], metric: str, path: str, title: str) -> None:
    """`metric` against training compute for each row (the mean over seeds; one seed's 95% intervals as
    bars where the metric has them), the teacher as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    scale = 100 if metric == "task" else 1
    teacher = next((r for r in references if r["row"] == "teacher" and r.get(metric) is not None), None)
    if teacher is not None:  # on the curves' examples where it was scored on them
        v = scale * teacher.get("curve_" + metric, teacher[metric])
        ax.axhline(v, color="black", linestyle="--", label=f"teacher ({v:.1f}%)" if scale == 100 else
                   f"teacher ({v:.2f})")
    for name in dict.fromkeys(r["row"] for r in runs):
        curves = [r["curve"] for r in runs if r["row"] == name]
        n = min(len(cv) for cv in curves)
        x = [_mean([cv[i]["gflop"] for cv in curves]) for i in range(n)]
        y = [scale * _mean([cv[i][metric] for cv in curves]) for i in range(n)]
        if len(curves) == 1 and all(metric + "_low" in pt for pt in curves[0][:n]):
            pts = curves[0][:n]
            err = [[scale * (pt[metric] - pt[metric + "_low"]) for pt in pts],
                   [scale * (pt[metric + "_high"] - pt[metric]) for pt in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
        else:
            ax.plot(x, y, marker="o", label=name)
    ax.set_xlabel("training compute (GFLOP, the in-step teacher included)")
    ax.set_ylabel({"task": "task accuracy (%)", "ce": "held-out CE (nats/token)"}.get(metric, metric))
    if metric == "task":
        ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def compare(c: Comparison, out: str, ws: Workspace, *, overrides=(), variables=None,
            references_extra: dict[str, dict] | None = None, stage_title=None, picture: str = "compare.png",
            title: str = "students at equal training compute") -> dict:
    """Plan, train and score every run, then the table, verdicts, picture and report
    (<out>/compare_report.json). The caller has made the data, stores and teacher the rows read."""
    t0 = time.perf_counter()
    p = plan(c, out, overrides, variables)
    ws.check_writable(["references", *[cfg.run.name for cfg in p.runs.values()]])
    ws.claim(picture, REPORT)
    data = c.eval.data and _substitute(c.eval.data, {"out": out, **(variables or {})})
    scorer = make_scorer(dataclasses.replace(c, eval=dataclasses.replace(c.eval, data=data)),
                         base_config(c, out, overrides, variables))
    refs = ws.stage("references", {"scorer": scorer.identity()}, lambda path: scorer.references())
    references = [{**r, **(references_extra or {}).get(r["row"], {})} for r in refs["lines"]]
    runs = run_all(c, p, ws, scorer, start_point=refs["start"], stage_title=stage_title)
    lines = summarize(references + runs)
    check_line = teacher_check(lines, c.reference.name)
    verdict = verdicts(lines, c.reference.name, {r["row"] for r in references})
    plot(runs, references, scorer.curve_metric, os.path.join(out, picture), title)
    report = {"rows": lines, "runs": runs, "references": references, "checks": [check_line] if check_line else [],
              "verdicts": verdict, "reference": c.reference.name, "seeds": list(c.seeds), "gflop": p.gflop,
              "scorer": {k: v for k, v in refs.items() if k not in ("lines", "start")},
              "seconds": time.perf_counter() - t0}
    with open(os.path.join(out, REPORT), "w") as f:
        json.dump(report, f, indent=2, default=float)
    return report


def print_report(report: dict) -> None:
    print(format_table(report["rows"]))
    print("\n" + "\n".join(report["checks"] + report["verdicts"]))


__all__ = ["Comparison", "CompareError", "EvalSpec", "Plan", "Row", "Scorer", "Workspace", "check", "compare",
           "format_table", "load_rows", "plan", "print_report", "row_configs", "step_flops", "summarize",
           "teacher_check", "verdicts"]


def run_file(rows_file: str, out: str, *, seeds: tuple[int, ...] | None = None, fresh: bool = False,
             overrides=()) -> dict:
    """`python -m kd_jax.compare`: a rows file over the stores and teacher its config names, into `out`.
    Everything is checked (the rows file, every row's config, the folder) before anything is written."""
    c = load_rows(rows_file)
    if seeds is not None:
        c = dataclasses.replace(c, seeds=tuple(seeds))
        check(c, rows_file)
    row_configs(c, out, overrides)
    check_eval_batch(c, jax.device_count())
    ws = Workspace(out)
    if fresh:
        ws.fresh()
    report = compare(c, out, ws, overrides=overrides)
    print(f"\n=== {len(c.rows)} rows x {len(c.seeds)} seeds at {report['gflop'][c.reference.name]:,.0f} GFLOP each "
          f"(the reference: {c.reference.name}); report {os.path.join(out, REPORT)}, picture "
          f"{os.path.join(out, 'compare.png')}\n")
    print_report(report)
    return report
