"""Teacher-written traces, R1's first stage (the library behind `python -m kd_jax.generate`).

The teacher (`teacher.*`) samples `generate.samples_per_prompt` completions for every prompt of
`generate.prompts`, each prompt rendered with the chat template and the generation prompt as
kd_jax/data/traces.py renders them. Every sample is split into reasoning and answer at the think
close (`data.format.think_close`; with `generate.reasoning: false`, a plain instruct teacher, the whole
response up to EOS is the answer and the reasoning is empty), checked against the reference answer with
`eval.matcher`, and passed through the R1 filters (each counted): unfinished (no think close, or no EOS
for a plain teacher), empty answer, reasoning over
`generate.max_reasoning_tokens`, duplicate (the same reasoning and answer for the same prompt), and
optionally mixed scripts (`generate.language_mix`, see `mixed_script_share`). `generate.keep` picks
what is written per prompt: every sample that passed the filters (`all`, with its `correct` field),
the correct ones, the first correct one, or the one with the shortest reasoning.

`generate.out` holds

    traces/shard-00000.jsonl  r1 traces of prompts [0, P), P = generate.prompts_per_shard: the
                              data.format.prompt_field / reasoning_field / answer_field of kd_jax.data.traces
                              plus `pass_rate` (the prompt's correct / samples), `correct`,
                              `sample`, `index` (the prompt's row) and `reference`; a shard whose
                              samples were all dropped has no file
    done/00000                the shard's completion mark: its counts as JSON, written after it
    settings.json             what the output depends on (the teacher's weights by fingerprint too);
                              a rerun with other settings is refused (but for generate.batch_size and
                              bucket: see _RESUMABLE_WITH_CHANGES), and so is a folder that holds
                              files but no settings.json (not a generate output)
    report.json               prompts, pass rates, pass@k, kept and dropped counts, tokens/s

so `python -m kd_jax.precompute ... data.traces=<out>/traces` reads the traces unchanged (the
report sits outside traces/: a folder of traces is read with every *.json in it).

Determinism. Sample j of prompt i draws from the key fold_in(fold_in(key(generate.seed), i), j)
through models/sampling's per-row keys, so its random numbers do not depend on its batch. Its logits
might (XLA is free to order a reduction differently for another batch shape), so the batches are a
fixed function of the shard: its rows (prompt, sample) in order of prompt length, cut every
`generate.batch_size` rows, the last one padded with copies. Shards are assigned round robin
(shard s to process s % count) and written whole (a temporary name, then a rename, then the mark),
so a run killed at any moment and run again, or run on any number of processes, writes the same
bytes.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import time
import unicodedata

import datasets
import jax
import numpy as np

from kd_jax.base import sharding
from kd_jax.base.errors import KDJaxError
from kd_jax.base.progress import bar as progress_bar
from kd_jax.base.schema import Config, GenerateConfig
from kd_jax.core import distributed
from kd_jax.core.grading import has_reference, matcher, pass_at_k, row_keys
from kd_jax.data import tables
from kd_jax.data.traces import render_prompt
from kd_jax.models import build_model
from kd_jax.models.hf import (
    load_tokenizer,
    read_hf_config,
    resolve_path,
    source_eos_ids,
    weights_fingerprint,
)
from kd_jax.models.sampling import generate
from kd_jax.models.source import source_config

log = logging.getLogger("kd_jax.core.tracegen")

TRACES, DONE, SETTINGS, REPORT = "traces", "done", "settings.json", "report.json"
# Why a sample is not written, in the order the checks run (the filters, then generate.keep).
DROP_REASONS = ("unfinished", "empty_answer", "too_long", "duplicate", "language_mix", "wrong", "not_chosen")


class GenerateError(KDJaxError, ValueError):
    """Prompts, settings or an output folder that trace generation cannot use."""


# ---------------------------------------------------------------- prompts


def load_prompts(gen_cfg: GenerateConfig) -> datasets.Dataset:
    """`generate.prompts` (a JSONL/JSON/Parquet file, a folder of them, or a hub dataset id) with
    its prompt and reference fields checked (kd_jax/data/tables.py)."""
    return tables.load_table(
        gen_cfg.prompts, {"generate.prompt_field": gen_cfg.prompt_field,
                          "generate.reference_field": gen_cfg.reference_field}, "generate.prompts",
        error=GenerateError,
        hints={"generate.reference_field": "; or generate.reference_field=null to write unverified traces (keep: all)"})


def prompt_messages(value, index: int) -> list[dict]:
    """A prompt field's value (text, or role/content turns) as chat messages."""
    return tables.prompt_messages(value, index, "generate.prompt_field", GenerateError)


def _reference(value, index: int, field: str) -> str:
    if not has_reference(value):
        raise GenerateError(f"prompt row {index} has no reference answer in {field!r} (generate.reference_field); "
                            f"fill it, drop the row, or set generate.reference_field=null (keep: all)")
    return str(value).strip()


def check_rows(gen: GenerateConfig, dataset) -> None:
    """Every row's prompt (text or role/content turns) and, with generate.reference_field set, its
    reference answer (not null, not blank), before any model is loaded: a bad row met when its shard
    is reached would cost the shards sampled before it (the fixed file then changes prompts_sha256)."""
    bad: dict[str, list[int]] = {"prompt": [], "reference": []}
    fields = [f for f in (gen.prompt_field, gen.reference_field) if f]
    offset = 0
    for batch in dataset.select_columns(fields).iter(batch_size=4096):
        for i, value in enumerate(batch[gen.prompt_field]):
            try:
                prompt_messages(value, offset + i)
                usable = not (isinstance(value, str) and not value.strip())
            except GenerateError:
                usable = False
            if not usable:
                bad["prompt"].append(offset + i)
        for i, value in enumerate(batch[gen.reference_field] if gen.reference_field else ()):
            if not has_reference(value):
                bad["reference"].append(offset + i)
        offset += len(batch[gen.prompt_field])

    def rows(indices: list[int]) -> str:
        shown = ", ".join(map(str, indices[:8])) + (f", ... ({len(indices)} in all)" if len(indices) > 8 else "")
        return f"{'row' if len(indices) == 1 else 'rows'} {shown} {'has' if len(indices) == 1 else 'have'}"
    problems = []
    if bad["prompt"]:
        problems.append(f"{rows(bad['prompt'])} no prompt in "
                        f"{gen.prompt_field!r} (generate.prompt_field: text or a list of role/content turns)")
    if bad["reference"]:
        problems.append(f"{rows(bad['reference'])} no reference answer in "
                        f"{gen.reference_field!r} (generate.reference_field)")
    if problems:
        raise GenerateError(f"generate.prompts={gen.prompts!r} (rows counted from 0): " + "; ".join(problems)
                            + "; fill them or drop the rows" + (
            ", or set generate.reference_field=null (keep: all)" if bad["reference"] else "") + "; nothing was sampled")


# ---------------------------------------------------------------- one sample


def split_sample(text: str, think_open: str, think_close: str, inside: bool) -> tuple[str, str] | None:
    """(reasoning, answer) of a generated text, both stripped, or None when the reasoning never
    closed. The answer is what follows the last think close, as evaluation.extract_answer reads it.
    `inside`: the prompt already opened the reasoning (the template wrote the think open), so the
    text starts inside it; else an opening tag in front of the reasoning is removed."""
    if think_close not in text:
        return None
    reasoning, answer = text.rsplit(think_close, 1)
    if not inside:
        reasoning = reasoning.split(think_open.strip(), 1)[-1]
    return reasoning.strip(), answer.strip()


def _script(ch: str) -> str | None:
    """A letter's script, the first word of its Unicode name (LATIN, CYRILLIC, ARABIC, ...); CJK
    ideographs and kana are one script (Japanese mixes them); Greek and mathematical letters are
    math notation, not a language, and are not counted."""
    if ch.isascii():
        return "LATIN"
    word = unicodedata.name(ch, "UNKNOWN").split()[0]
    if word in ("GREEK", "MATHEMATICAL", "UNKNOWN"):
        return None
    return "CJK" if word in ("CJK", "HIRAGANA", "KATAKANA", "HALFWIDTH") else word


def mixed_script_share(text: str) -> float:
    """The share of the letters of `text` that are outside its most common script (0 = one script).
    `generate.language_mix` drops a sample whose reasoning is above `language_mix_threshold`: e.g. an
    English reasoning that switches to Chinese for a sentence."""
    counts = collections.Counter(s for ch in text if ch.isalpha() and (s := _script(ch)) is not None)
    total = sum(counts.values())
    return 0.0 if total == 0 else 1.0 - max(counts.values()) / total


# ---------------------------------------------------------------- one shard


@dataclasses.dataclass
class Prompt:
    """A prompt of the generate run, rendered (`render_prompts`)."""
    index: int
    value: object  # the prompt field as read (written back unchanged)
    reference: str | None
    tokens: list[int]
    inside: bool  # the rendered prompt ends inside the reasoning (the template wrote the think open)


def render_prompts(cfg: Config, dataset, tokenizer, indices: range) -> list[Prompt]:
    """Rows `indices` of the prompts `dataset` through the tokenizer's chat template: their ids,
    references (generate.reference_field) and whether the template opens the reasoning."""
    gen, think_open = cfg.generate, cfg.data.format.think_open.strip()
    rows = dataset.select(indices)
    refs = rows[gen.reference_field] if gen.reference_field else [None] * len(rows)
    out = []
    for index, value, ref in zip(indices, rows[gen.prompt_field], refs):
        text = render_prompt(tokenizer, prompt_messages(value, index))
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        reference = _reference(ref, index, gen.reference_field) if gen.reference_field else None
        out.append(Prompt(index, value, reference, tokens, text.rstrip().endswith(think_open)))
    return out


def _sample_all(model, prompts: list[Prompt], gen: GenerateConfig, eos: list[int], bar) -> list[list[list[int]]]:
    """Token ids [prompt][sample] (EOS included when reached), batched as a fixed function of
    the shard (module doc)."""
    n = gen.samples_per_prompt
    rows = [(p, j) for p in range(len(prompts)) for j in range(n)]
    order = sorted(range(len(rows)), key=lambda r: (len(prompts[rows[r][0]].tokens), r))
    out: list[list[list[int]]] = [[[] for _ in range(n)] for _ in prompts]
    for start in range(0, len(order), gen.batch_size):
        batch = order[start:start + gen.batch_size]
        batch = batch + [batch[-1]] * (gen.batch_size - len(batch))  # one compile per padded prompt length
        keys = row_keys(gen.seed, np.array([prompts[rows[r][0]].index for r in batch]),
                        np.array([rows[r][1] for r in batch]))
        ids = generate(model, [prompts[rows[r][0]].tokens for r in batch], max_new_tokens=gen.max_new_tokens,
                       eos_ids=eos, temperature=gen.temperature, top_p=gen.top_p, bucket=gen.bucket, keys=keys)
        for r, sample_ids in zip(batch, ids):
            p, j = rows[r]
            out[p][j] = sample_ids
        bar.update(len(set(batch)))
    return out


def _judge(cfg: Config, prompt: Prompt, samples: list[list[int]], tokenizer, eos: set[int], match,
           dropped: collections.Counter) -> tuple[int, list[dict]]:
    """(correct samples, rows to write) of one prompt; `dropped` counts the rest by reason."""
    gen, data = cfg.generate, cfg.data
    n = len(samples)
    survivors, seen, correct = [], set(), 0
    for j, ids in enumerate(samples):
        text = tokenizer.decode([t for t in ids if t not in eos])  # special tokens kept: think tags may be special
        if gen.reasoning:
            split = split_sample(text, data.format.think_open, data.format.think_close, prompt.inside)
        else:  # a plain instruct teacher: its whole response is the answer, unfinished without EOS
            split = ("", text.strip()) if ids and ids[-1] in eos else None
        reasoning, answer = split or ("", "")
        ok = None if prompt.reference is None else bool(split and answer and match(answer, prompt.reference))
        correct += bool(ok)
        length = None
        if split is None:
            reason = "unfinished"
        elif not answer:
            reason = "empty_answer"
        else:
            if gen.max_reasoning_tokens is not None or gen.keep == "shortest_correct":
                length = len(tokenizer(reasoning, add_special_tokens=False)["input_ids"])
            if gen.max_reasoning_tokens is not None and length > gen.max_reasoning_tokens:
                reason = "too_long"
            elif (reasoning, answer) in seen:
                reason = "duplicate"
            elif gen.language_mix and mixed_script_share(reasoning) > gen.language_mix_threshold:
                reason = "language_mix"
            elif gen.keep != "all" and not ok:
                reason = "wrong"
            else:
                reason = None
            seen.add((reasoning, answer))
        if reason is not None:
            dropped[reason] += 1
            continue
        survivors.append((length, j, reasoning, answer, ok))
    if gen.keep in ("first_correct", "shortest_correct") and survivors:
        chosen = min(survivors, key=lambda s: (s[0], s[1])) if gen.keep == "shortest_correct" else survivors[0]
        dropped["not_chosen"] += len(survivors) - 1
        survivors = [chosen]
    pass_rate = None if prompt.reference is None else correct / n
    rows = [{data.format.prompt_field: prompt.value, data.format.reasoning_field: reasoning, data.format.answer_field: answer,
             "pass_rate": pass_rate, "correct": ok, "sample": j, "index": prompt.index, "reference": prompt.reference}
            for _, j, reasoning, answer, ok in survivors]
    return correct, rows


def _write_atomic(path: str, text: str) -> None:
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_shard(cfg: Config, shard: int, model, dataset, tokenizer, eos: list[int], bar) -> dict:
    """Sample, judge and write shard `shard` (its traces, then its mark); returns its counts."""
    gen = cfg.generate
    indices = range(shard * gen.prompts_per_shard, min((shard + 1) * gen.prompts_per_shard, len(dataset)))
    prompts = render_prompts(cfg, dataset, tokenizer, indices)
    t0 = time.perf_counter()
    samples = _sample_all(model, prompts, gen, eos, bar)
    seconds = time.perf_counter() - t0
    match, eos_set = matcher(cfg.eval.matcher), set(eos)
    dropped: collections.Counter = collections.Counter()
    correct, lines = [], []
    for prompt, prompt_samples in zip(prompts, samples):
        c, rows = _judge(cfg, prompt, prompt_samples, tokenizer, eos_set, match, dropped)
        correct.append(c)
        lines += [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
    if lines:
        _write_atomic(shard_path(gen.out, shard), "".join(lines))
    elif os.path.exists(shard_path(gen.out, shard)):  # left by a killed run with other batches: none now
        os.remove(shard_path(gen.out, shard))
    stats = {"shard": shard, "prompts": [indices.start, indices.stop], "correct": correct, "kept": len(lines),
             "dropped": {r: dropped[r] for r in DROP_REASONS}, "samples": len(prompts) * gen.samples_per_prompt,
             "generated_tokens": sum(len(ids) for per_prompt in samples for ids in per_prompt), "seconds": seconds}
    _write_atomic(mark_path(gen.out, shard), json.dumps(stats))
    return stats


def shard_path(out: str, shard: int) -> str:
    return os.path.join(out, TRACES, f"shard-{shard:05d}.jsonl")


def mark_path(out: str, shard: int) -> str:
    return os.path.join(out, DONE, f"{shard:05d}")


# ---------------------------------------------------------------- the run


# Settings a rerun may change: where the output goes, and the batching (a run that ran out of
# memory resumes with a smaller batch; shards already written keep their bytes, and with per-row
# keys only the floating-point rounding of the logits could depend on the batch).
_RESUMABLE_WITH_CHANGES = ("out", "batch_size", "bucket")


def settings(cfg: Config, dataset) -> dict:
    """Everything the written traces depend on, as dotted keys: the generate section (but `out`
    and the batching), the teacher (and its weights' fingerprint) and tokenizer, the matcher and think
    tags, the output field names and the prompts' content (sha256). The process count is not among them: it does not
    change the output."""
    digest = hashlib.sha256()
    fields = [f for f in (cfg.generate.prompt_field, cfg.generate.reference_field) if f]
    for batch in dataset.select_columns(fields).iter(batch_size=4096):
        digest.update(json.dumps(batch, sort_keys=True, default=str).encode())
    out = {f"generate.{k}": v for k, v in dataclasses.asdict(cfg.generate).items() if k not in _RESUMABLE_WITH_CHANGES}
    out.update({f"teacher.{k}": v for k, v in dataclasses.asdict(cfg.teacher).items() if k != "mode"})
    if cfg.teacher.init == "random":
        out["run.seed"] = cfg.run.seed
    out.update({"tokenizer": cfg.tokenizer, "eval.matcher": cfg.eval.matcher, "prompts_sha256": digest.hexdigest()})
    out.update({f"data.{k}": getattr(cfg.data.format, k)  # the keys as before data.* moved into data.format
                for k in ("think_open", "think_close", "prompt_field", "reasoning_field", "answer_field")})
    if cfg.teacher.init == "hf":
        out[_WEIGHTS] = teacher_weights(cfg.teacher)
    return json.loads(json.dumps(out))  # as it reads back from the file


_WEIGHTS = "teacher.weights"  # not in settings written before it was recorded: such an output still resumes


def teacher_weights(teacher) -> str:
    """What identifies an init=hf teacher's weights: a local folder's models.hf.weights_fingerprint
    (sizes, safetensors headers and sampled bytes; cheap), or a hub id's snapshot commit (its config
    files only are fetched here)."""
    if os.path.isdir(teacher.hf_path):
        return "sha256:" + weights_fingerprint(teacher.hf_path)
    return "hub commit " + os.path.basename(resolve_path(teacher.hf_path, teacher.revision, weights=False))


def claim_output(out: str, current: dict) -> None:
    """Writes settings.json into a new output folder, or checks that an existing one was made
    with the same settings (process 0)."""
    path = os.path.join(out, SETTINGS)
    if os.path.exists(out) and not os.path.isdir(out):
        raise GenerateError(f"generate.out={out!r} is a file; set generate.out to a folder (a new one, or an "
                            f"earlier generate output to resume)")
    before = None
    if os.path.isfile(path):
        try:
            with open(path) as f:
                before = json.load(f)
        except (OSError, ValueError):
            before = None
        if not (isinstance(before, dict) and "prompts_sha256" in before):
            raise GenerateError(f"generate.out={out!r} holds a {SETTINGS} that generate did not write: it is not a "
                                f"generate output; set generate.out to a new or empty folder")
    if before is not None:
        if _WEIGHTS not in before:  # written before the weights were recorded
            before[_WEIGHTS] = current.get(_WEIGHTS)
        before.setdefault("generate.reasoning", True)  # written before plain teachers: every teacher reasoned
        changes = [f"{k}: {before.get(k)!r} -> {current.get(k)!r}" if k != _WEIGHTS else
                   f"{_WEIGHTS}: the teacher's weights at teacher.hf_path={current.get('teacher.hf_path')!r} changed "
                   f"({str(before.get(k))[:19]} -> {str(current.get(k))[:19]})"
                   for k in sorted(set(before) | set(current)) if before.get(k) != current.get(k)]
        if changes:
            raise GenerateError(f"generate.out={out!r} holds traces made with other settings ({'; '.join(changes)}); "
                                f"set generate.out to a new folder, or delete it to start over")
        return
    held = _held(out)
    if held:
        raise GenerateError(f"generate.out={out!r} is not empty ({len(held)} entries, e.g. {held[0]!r}) and is not a "
                            f"generate output (no {SETTINGS}); generate would write beside and over what it holds: "
                            f"set generate.out to a new or empty folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:  # a file on the way (NotADirectoryError, FileExistsError), no permission
        raise GenerateError(f"cannot create generate.out={out!r} ({type(e).__name__}: {e.strerror or e}); set "
                            f"generate.out to a folder that can be created") from None
    _write_atomic(path, json.dumps(current, indent=2, sort_keys=True))  # first: the folder is now a generate output
    for sub in (TRACES, DONE):
        os.makedirs(os.path.join(out, sub), exist_ok=True)


def _held(out: str) -> list[str]:
    """What a folder without settings holds, but what a run killed while claiming it left: the
    settings' temporary file and empty traces/ and done/ folders."""
    if not os.path.isdir(out):
        return []
    leftover = {"." + SETTINGS + ".tmp"}
    return sorted(n for n in os.listdir(out) if n not in leftover and not (
        n in (TRACES, DONE) and os.path.isdir(os.path.join(out, n)) and not os.listdir(os.path.join(out, n))))


def check_paths(gen: GenerateConfig) -> None:
    """generate.out neither inside a prompts folder (read recursively: the traces written would be
    read back as prompts) nor holding the prompts (writing could replace them)."""
    if not gen.prompts or not os.path.exists(gen.prompts):
        return  # a hub dataset id (or a missing path, which load_prompts reports)
    out, prompts = os.path.realpath(gen.out), os.path.realpath(gen.prompts)
    if os.path.isdir(prompts) and os.path.commonpath([out, prompts]) == prompts:
        raise GenerateError(f"generate.out={gen.out!r} is inside generate.prompts={gen.prompts!r}, a folder read "
                            f"recursively: generate would read its own traces back as prompts; set generate.out to a "
                            f"folder outside the prompts folder")
    if os.path.commonpath([out, prompts]) == out:
        raise GenerateError(f"generate.prompts={gen.prompts!r} is inside generate.out={gen.out!r}: generate would read "
                            f"its own output as prompts (and could write over them); move the prompts out of "
                            f"generate.out, or set generate.out to another folder")


def pass_summary(marks: list[dict], samples_per_prompt: int, verified: bool) -> dict:
    """The report of a finished run from its shards' marks."""
    n = samples_per_prompt
    correct = [c for m in marks for c in m["correct"]]
    tokens, seconds = sum(m["generated_tokens"] for m in marks), sum(m["seconds"] for m in marks)
    report = {"prompts": len(correct), "samples_per_prompt": n, "samples": sum(m["samples"] for m in marks),
              "kept": sum(m["kept"] for m in marks),
              "dropped": {r: sum(m["dropped"][r] for m in marks) for r in DROP_REASONS},
              "generated_tokens": tokens, "generation_seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9)}
    if verified:
        report["correct"] = sum(correct)
        report["pass_rate_histogram"] = {f"{c}/{n}": correct.count(c) for c in range(n + 1)}
        report["pass_at_k"] = {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for c in correct]))
                               for k in sorted({1, n})}
    return report


def format_trace_report(report: dict) -> str:
    lines = [f"prompts {report['prompts']}, samples {report['samples']} ({report['samples_per_prompt']} per prompt), "
             f"{report['generated_tokens']:,} tokens generated in {report['generation_seconds']:.1f} s "
             f"({report['tokens_per_s']:,.0f} tokens/s, compiles included)"]
    if "pass_at_k" in report:
        lines.append("  ".join(f"{k} {v:.4f}" for k, v in report["pass_at_k"].items())
                     + f"  (correct samples {report['correct']} of {report['samples']})")
        lines.append("prompts by correct samples: " + ", ".join(f"{k}: {v}" for k, v in
                                                               report["pass_rate_histogram"].items()))
    dropped = ", ".join(f"{k} {v}" for k, v in report["dropped"].items() if v) or "none"
    lines.append(f"kept {report['kept']}; dropped: {dropped}")
    return "\n".join(lines)


def _check_teacher(cfg: Config) -> None:
    """The teacher section, read without its weights: init=hf names a folder or hub id whose config.json
    kd_jax supports, init=random an architecture it supports."""
    src = cfg.teacher
    if src.init == "hf":
        if not src.hf_path:
            raise GenerateError("teacher.hf_path is not set: the teacher's Hugging Face folder or hub id (or "
                                "teacher.init=random with teacher.architecture)")
    elif src.init == "random" and not src.architecture:
        raise GenerateError("teacher.init=random needs teacher.architecture: an HF config.json-style dict")
    source_config(src, read_config=lambda s, role: s.architecture if s.init == "random" else
                  read_hf_config(resolve_path(s.hf_path, s.revision, weights=False)), role="teacher")


def tracegen(cfg: Config, *, show_progress: bool = True) -> dict:
    """Sample, judge and write every shard of `generate.prompts` that has no completion mark yet
    (this process's share), then (process 0) the report; returns it (process 0; {} elsewhere)."""
    gen = cfg.generate
    if not gen.out:
        raise GenerateError("generate.out is not set: the folder to write the traces to")
    process, processes = jax.process_index(), jax.process_count()
    # Everything the config and the prompts alone can tell, before a model or tokenizer is loaded.
    check_paths(gen)
    _check_teacher(cfg)
    matcher(cfg.eval.matcher)
    dataset = load_prompts(gen)
    check_rows(gen, dataset)
    distributed.on_process_0(lambda: claim_output(gen.out, settings(cfg, dataset)))
    num_shards = -(-len(dataset) // gen.prompts_per_shard)
    todo = [s for s in range(process, num_shards, processes) if not os.path.exists(mark_path(gen.out, s))]
    if todo:
        tokenizer = load_tokenizer(cfg.tokenizer, cfg.tokenizer_revision)
        eos = source_eos_ids(cfg.teacher, tokenizer)
        first = todo[0] * gen.prompts_per_shard
        render_prompt(tokenizer, prompt_messages(dataset[first][gen.prompt_field], first))  # the chat template
        mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=jax.local_devices())
        model = build_model(cfg.teacher, mesh=mesh, seed=cfg.run.seed)
        rows = sum(min((s + 1) * gen.prompts_per_shard, len(dataset)) - s * gen.prompts_per_shard for s in todo)
        bar = progress_bar(total=rows * gen.samples_per_prompt, unit="sample", desc="teacher samples",
                           disable=not (show_progress and process == 0))
        try:  # closed before an error propagates: its message then starts a line of its own
            tokens, t0 = 0, time.perf_counter()
            for shard in todo:
                tokens += run_shard(cfg, shard, model, dataset, tokenizer, eos, bar)["generated_tokens"]
                bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        finally:
            bar.close()
    distributed.barrier("generate_shards_written")

    def report() -> dict:
        marks = []
        for s in range(num_shards):
            if not os.path.exists(mark_path(gen.out, s)):
                raise GenerateError(f"shard {s} of {gen.out} has no completion mark after every process finished; "
                                    f"run the same command again to write it")
            with open(mark_path(gen.out, s)) as f:
                marks.append(json.load(f))
        summary = pass_summary(marks, gen.samples_per_prompt, gen.reference_field is not None)
        _write_atomic(os.path.join(gen.out, REPORT), json.dumps(summary, indent=2))
        return summary

    return distributed.on_process_0(report) or {}
