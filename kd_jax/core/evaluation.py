"""Evaluation of a student or teacher (the library behind `python -m kd_jax.evaluate`), on the
held-out split of the KD store or on an external set of questions and answers (`eval.data`).

- KD losses and top-1 agreement with the teacher on the store's held-out split (the train loop's
  evaluation); skipped when there is no store (`eval.data` without `data.store`).
- Task accuracy by generation: the text after `</think>` is compared with the reference answer by
  `eval.matcher`, with a 95% Wilson interval over the problems; `eval.samples` answers per problem
  give pass@1 (their mean) and the unbiased pass@k of `eval.pass_k`.
- Step accuracy (`eval.step_checker`): the generated reasoning, split at `data.steps.separator`, is
  judged step by step by a task's checker.
- Cost: generation tokens/s, parameter memory and, with `eval.latency`, time to first token and
  per-token decode time at batch 1 and N, and generation's peak memory, with the hardware named.

Sample j of problem i draws from fold_in(fold_in(key(run.seed), i), j) (`row_keys`, as
kd_jax/core/tracegen.py samples), so a problem's samples do not depend on its batch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kd_jax.base import sharding
from kd_jax.base.progress import bar
from kd_jax.base.schema import Config, ConfigError, DataConfig, EvalConfig
from kd_jax.core.grading import (
    extract_answer,
    has_reference,
    matcher,
    pass_at_k,
    reasoning_steps,
    reference_answer,
    row_keys,
    step_checker,
    wilson_interval,
)
from kd_jax.core.optim import default_hyper
from kd_jax.core.prepare import pruned_student
from kd_jax.core.runs import restore_student
from kd_jax.core.step import Objective, eval_step, loss_metrics
from kd_jax.data import tables
from kd_jax.data.pipeline import make_eval_iter, split_indices
from kd_jax.data.roles import Role
from kd_jax.data.store import KDStore
from kd_jax.data.traces import encode_text, render_prompt
from kd_jax.models import build_model, num_params
from kd_jax.models.hf import load_tokenizer
from kd_jax.models.sampling import generate, sample_tokens


@dataclasses.dataclass
class Problem:
    tokens: list[int]  # the prompt's ids, ending in the generation prompt
    prompt: str  # the prompt as text (special tokens dropped): what a step checker reads
    reference: str  # the reference answer


def store_eval_indices(store: KDStore, cfg: Config, tokenizer) -> np.ndarray:
    """The store's held-out split for `cfg` (its usable sequences, data.eval_fraction, data.shuffle_seed)."""
    usable = store.usable_sequences(cfg, tokenizer=tokenizer)
    return usable[split_indices(len(usable), cfg.data.eval_fraction, cfg.data.shuffle_seed)[1]]


def store_problems(store: KDStore, indices: np.ndarray, tokenizer) -> list[Problem]:
    """Problems from KD store sequences: their prompt tokens and answer tokens (EOS dropped)."""
    eos = {tokenizer.eos_token_id}
    out = []
    for i in indices:
        s = store.read(int(i))
        tokens = s["tokens"][s["role"] == Role.PROMPT].tolist()
        ref = tokenizer.decode([t for t in s["tokens"][s["role"] == Role.ANSWER] if t not in eos],
                               skip_special_tokens=True).strip()
        out.append(Problem(tokens, tokenizer.decode(tokens, skip_special_tokens=True), ref))
    return out


def data_problems(eval_cfg: EvalConfig, tokenizer, max_examples: int | None = None) -> list[Problem]:
    """Problems from `eval.data` (kd_jax/data/tables.py reads it): the question rendered with the
    chat template and the generation prompt exactly as training prompts are (data/traces.py), the
    reference after its last "####" when there is one (`reference_answer`)."""
    dataset = tables.load_table(eval_cfg.data, {"eval.question_field": eval_cfg.question_field,
                                                "eval.answer_field": eval_cfg.answer_field}, "eval.data",
                                error=ConfigError)
    if max_examples is not None:
        dataset = dataset.select(range(min(max_examples, len(dataset))))
    missing = [i for i, value in enumerate(dataset[eval_cfg.answer_field]) if not has_reference(value)]
    if missing:
        rows = ", ".join(map(str, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(f"eval.data={eval_cfg.data}: row(s) {rows} have no reference answer in "
                          f"{eval_cfg.answer_field!r} (eval.answer_field; null or empty), so they could only be "
                          f"scored wrong; fill them in or drop those rows")
    out = []
    for i, row in enumerate(dataset):
        messages = tables.prompt_messages(row[eval_cfg.question_field], i, "eval.question_field", ConfigError)
        tokens = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
        out.append(Problem(tokens, tokenizer.decode(tokens, skip_special_tokens=True),
                           reference_answer(row[eval_cfg.answer_field])))
    return out


def task_accuracy(model, tokenizer, problems: list[Problem], eval_cfg: EvalConfig, batch_size: int, *,
                  step_separator: str = "\n\n", seed: int = 0, show_progress: bool = False) -> dict:
    """Generate `eval.samples` answers for each problem and compare each extracted answer with the
    reference (`eval.matcher`); with `eval.step_checker`, judge the reasoning step by step. Rows
    (problem, sample) are cut into full batches of `batch_size` in order (the last padded with
    copies: one compile serves every batch); each row samples from its own key (`row_keys`).
    `show_progress`: a bar of the answers generated (stderr)."""
    match = matcher(eval_cfg.matcher)
    check = step_checker(eval_cfg.step_checker) if eval_cfg.step_checker else None
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    n = eval_cfg.samples
    rows = [(i, j) for i in range(len(problems)) for j in range(n)]
    correct = np.zeros(len(problems), int)
    new_tokens, seconds, samples = 0, 0.0, []
    steps_total = steps_right = traces_all_right = 0
    run = functools.partial(generate, model, max_new_tokens=eval_cfg.max_new_tokens, eos_ids=eos,
                            temperature=eval_cfg.sampling_temperature, top_p=eval_cfg.top_p)
    timed_tokens = 0
    single = len(rows) <= batch_size
    progress = bar(total=len(rows), unit="answer", desc="generate", disable=not show_progress)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        padded = batch + [batch[-1]] * (batch_size - len(batch))
        prompts = [problems[i].tokens for i, _ in padded]
        keys = row_keys(seed, np.array([i for i, _ in padded]), np.array([j for _, j in padded]))
        # tokens/s excludes compiling: it counts every batch but the first, or, when there is only
        # one, that batch run a second time (the first run compiles).
        if single:
            run(prompts, keys=keys)
        t0 = time.perf_counter()
        outs = run(prompts, keys=keys)[:len(batch)]
        if single or start > 0:
            seconds += time.perf_counter() - t0
            timed_tokens += sum(len(out) for out in outs)
        for (i, _), out in zip(batch, outs):
            problem = problems[i]
            new_tokens += len(out)
            # Special tokens kept: some tokenizers mark <think> tags special (EOS is dropped).
            text = tokenizer.decode([t for t in out if t not in eos])
            pred = extract_answer(text, reasoning=eval_cfg.reasoning, ended=bool(out) and out[-1] in eos)
            ok = bool(match(pred, problem.reference))
            correct[i] += ok
            if check is not None:
                steps = reasoning_steps(text, step_separator)
                verdicts = [bool(v) for v in check(steps, problem.prompt, problem.reference)]
                if len(verdicts) != len(steps):
                    raise ConfigError(f"eval.step_checker={eval_cfg.step_checker!r} returned {len(verdicts)} "
                                      f"verdicts for {len(steps)} steps; it must return one bool per step")
                steps_total += len(steps)
                steps_right += sum(verdicts)
                traces_all_right += bool(steps) and all(verdicts)
            if len(samples) < 3:
                samples.append({"prediction": pred, "reference": problem.reference, "correct": ok})
        progress.update(len(batch))
    progress.close()
    m = len(problems)
    share = float(np.sum(correct / n))  # the problems' shares of correct samples, summed: pass@1 * m
    low, high = wilson_interval(share, m)
    report = {"accuracy": share / max(m, 1), "accuracy_low": low, "accuracy_high": high, "examples": m,
              "samples_per_problem": n, "correct_samples": int(correct.sum())}
    report.update({f"pass@{k}": float(np.mean([pass_at_k(n, int(c), k) for c in correct])) if m else 0.0
                   for k in eval_cfg.ks})
    if check is not None:
        report.update(step_accuracy=steps_right / max(steps_total, 1),
                      all_steps_correct=traces_all_right / max(len(rows), 1), steps=steps_total)
    report.update(generated_tokens=new_tokens, generation_tokens_per_s=timed_tokens / max(seconds, 1e-9),
                  samples=samples)
    return report


def _best_seconds(fn, repeats: int) -> float:
    """The fastest of `repeats` calls: the least disturbed by whatever else runs on the machine."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def generation_latency(model, prompts: list[list[int]], batch_sizes: list[int], eval_cfg: EvalConfig,
                       repeats: int = 5) -> dict:
    """Time to first token and per-token decode time of `generate` at each batch size (rows are
    the first prompts, cycled), after a warm-up compile, the fastest of `repeats` calls: TTFT =
    a call with max_new_tokens=1 (prefill and one sample, host transfers included), decode = (a
    call with M = max(2, eval.max_new_tokens) new tokens and no EOS stop, minus TTFT) / (M - 1).
    Peak memory: the device's peak_bytes_in_use (memory_stats; the process's peak so far, model
    included) when the backend reports it, else the compiled generate program's memory analysis
    (parameters, KV cache and temporaries at the largest batch); `generation_peak_source` says which."""
    device = jax.devices()[0]
    M = max(2, eval_cfg.max_new_tokens)
    report = {"device_kind": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
              "latency_new_tokens": M, "latency_prompt_tokens": max(len(p) for p in prompts)}
    for b in batch_sizes:
        batch = [prompts[r % len(prompts)] for r in range(b)]
        run = functools.partial(generate, model, batch, eos_ids=(), temperature=eval_cfg.sampling_temperature,
                                top_p=eval_cfg.top_p)
        run(max_new_tokens=1), run(max_new_tokens=M)  # compile both lengths
        first = _best_seconds(functools.partial(run, max_new_tokens=1), repeats)
        full = _best_seconds(functools.partial(run, max_new_tokens=M), repeats)
        decode = max(full - first, 0.0) / (M - 1)
        report[f"ttft_ms_b{b}"] = 1e3 * first
        report[f"decode_ms_per_token_b{b}"] = 1e3 * decode
        report[f"decode_tokens_per_s_b{b}"] = b / max(decode, 1e-12)
    stats = device.memory_stats() or {}
    if stats.get("peak_bytes_in_use"):
        report.update(generation_peak_bytes=int(stats["peak_bytes_in_use"]), generation_peak_source="memory_stats")
    else:
        b, T = max(batch_sizes), -(-report["latency_prompt_tokens"] // 32) * 32  # generate's default bucket
        graphdef, state = nnx.split(model)
        compiled = sample_tokens.lower(graphdef, state, jnp.zeros((b, T), jnp.int32), jnp.ones((b, T), bool),
                                       jax.random.key(0), M, float(eval_cfg.sampling_temperature),
                                       float(eval_cfg.top_p), jnp.asarray([-1], jnp.int32)).compile()
        mem = compiled.memory_analysis()
        peak = getattr(mem, "peak_memory_in_bytes", 0) or (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                                             + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
        report.update(generation_peak_bytes=int(peak), generation_peak_source="compiled memory analysis")
    return report


def evaluate_losses(eval_fn, train_vars, store: KDStore, eval_idx: np.ndarray, data_cfg: DataConfig, *,
                    batches: int, batch_size: int, mesh) -> dict[str, float] | None:
    """Held-out losses over up to `batches` batches: soft, hard, step, perplexity, top-1.
    eval_fn(train_vars, batch) -> metric sums: the jitted `step.eval_step` with the hyper-values
    and the teacher bound."""
    if len(eval_idx) == 0:
        return None
    sums: dict[str, float] = {}
    done = 0
    for batch in make_eval_iter(store, eval_idx, data_cfg, batch_size=batch_size):
        if done == batches:
            break
        batch = {k: sharding.process_share(v) for k, v in batch.items()}  # every process reads the whole batch
        out = jax.device_get(eval_fn(train_vars, sharding.to_global(batch, mesh)))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        done += 1
    # loss, step loss and hidden are per-batch means: average them; the other sums are per token
    for k in ("loss", "step_loss", "hidden"):
        if k in sums:
            sums[k] /= done
    out = loss_metrics(sums)
    out["perplexity"] = float(np.exp(out["hard"]))
    return out


# One jitted eval step for every evaluate() call: models of one structure and loss (the demo's
# students) share its compile.
_EVAL_STEP = jax.jit(eval_step, static_argnums=0)


def load_for_eval(cfg: Config, which: str, mesh, *, untrained: bool = False):
    """The teacher as configured, or the student from the run's latest checkpoint; the student as
    initialized (pretrained, teacher layers, random, or cut from the teacher as training cuts it)
    only when asked with `untrained`."""
    if which == "teacher":
        return build_model(cfg.teacher, mesh=mesh)
    if not untrained:
        return restore_student(cfg, mesh=mesh)[0]
    if cfg.student.init == "pruned":
        return pruned_student(cfg, mesh)
    teacher = build_model(cfg.teacher, mesh=mesh) if cfg.student.init == "teacher_layers" else None
    return build_model(cfg.student, mesh=mesh, teacher=teacher, seed=cfg.run.seed)


def evaluate(cfg: Config, which: str = "student", max_examples: int | None = None, *,
             untrained: bool = False) -> dict:
    """Task accuracy (and step accuracy, latency when configured), held-out KD losses and cost of
    the student (or teacher) of `cfg`; also written to <run_dir>/eval_<which>.json. The problems
    are `eval.data`'s when it is set, else the store's held-out split; `max_examples` caps them.
    The KD losses need the store: they are computed on its held-out split whenever `data.store` is
    set (with `eval.data` too: they are the model's distance to the teacher, not a task score) and
    skipped otherwise."""
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.tokenizer_revision)
    store = KDStore.open(cfg.data.store) if cfg.data.store else None
    eval_idx = None
    if store is not None:
        eval_idx = store_eval_indices(store, cfg, tokenizer)[:max_examples]
    if cfg.eval.data:
        problems, source = data_problems(cfg.eval, tokenizer, max_examples), cfg.eval.data
    elif store is not None:
        problems, source = store_problems(store, eval_idx, tokenizer), f"{cfg.data.store} (held-out split)"
    else:
        raise ConfigError("nothing to evaluate on: set data.store (its held-out split) or eval.data (an eval set)")
    if not problems:
        raise ConfigError(f"no problems to evaluate on in {source}; raise data.eval_fraction or --max-examples")
    mesh = sharding.mesh_from_config(cfg.mesh)
    model = load_for_eval(cfg, which, mesh, untrained=untrained)  # after the problems: a bad eval set fails fast
    batch = cfg.train.global_batch_size
    # Generation first: with memory_stats, the peak it reports then holds no loss evaluation.
    task = task_accuracy(model, tokenizer, problems, cfg.eval, batch, step_separator=cfg.data.steps.separator,
                         seed=cfg.run.seed, show_progress=jax.process_index() == 0)
    cost = generation_latency(model, [p.tokens for p in problems], sorted({1, batch}), cfg.eval) \
        if cfg.eval.latency else {}
    graphdef, params = nnx.split(model)
    losses = {}
    if store is not None:
        # An online teacher runs beside the evaluated model for the soft loss (no alignment term: the
        # projections are training state, not part of the model).
        teacher = build_model(cfg.teacher, mesh=mesh) if cfg.teacher.mode == "online" else None
        objective = Objective(graphdef, cfg.loss, nnx.graphdef(teacher) if teacher is not None else None,
                              targets=store.meta.targets)
        step = functools.partial(_EVAL_STEP, objective)
        teacher_params = nnx.state(teacher) if teacher is not None else None
        eval_fn = lambda v, b: step(v, b, default_hyper(cfg.loss), teacher_params)  # noqa: E731
        with jax.set_mesh(mesh):
            losses = evaluate_losses(eval_fn, {"params": params}, store, eval_idx, cfg.data,
                                     batches=cfg.eval.batches, batch_size=batch, mesh=mesh) or {}
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    report = {"model": which, "eval_set": source, "parameters": num_params(model), "parameter_bytes": param_bytes,
              **losses, **task, **cost}
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, f"eval_{which}.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def format_eval_report(report: dict) -> str:
    """The report as a table: accuracy as "41.2% [37.0, 45.5] (n=512)" (the 95% Wilson interval
    and the number of problems), then every other number it holds."""
    rows = [("model", str(report.get("model", "-")))]
    if "accuracy" in report:
        n = report["samples_per_problem"]
        per = f", {n} samples each" if n > 1 else ""
        rows.append(("accuracy", f"{100 * report['accuracy']:.1f}% [{100 * report['accuracy_low']:.1f}, "
                                 f"{100 * report['accuracy_high']:.1f}] (n={report['examples']}{per})"))
    keys = ["eval_set", *sorted((k for k in report if k.startswith("pass@")), key=lambda k: int(k[5:])),
            "step_accuracy", "all_steps_correct", "hard", "soft", "step_loss", "top1_agree", "perplexity",
            "parameters", "parameter_bytes", "generation_tokens_per_s", "platform", "device_kind"]
    keys += [k for k in report if k.startswith(("ttft_ms", "decode_"))]
    keys += ["generation_peak_bytes", "generation_peak_source"]
    rows += [(k, f"{report[k]:.4g}" if isinstance(report[k], float) else str(report[k])) for k in keys if k in report]
    return "\n".join(f"{k:>24}  {v}" for k, v in rows)


# ------------------------------------------------------------------------------- held-out text

CLOZE_MIN_LETTERS = 4  # letters of a last-word task's answer
_WORD_END = re.compile(r"\s([a-z]{%d,})\.(\s|$)" % CLOZE_MIN_LETTERS)
TEXT_EVAL_ROWS = 8  # held-out documents per forward in TextEvaluator


def sentence_final_words(text: str, min_context: int = 60) -> list[tuple[int, int]]:
    """The last-word task's words in `text` (LAMBADA-style): (start, end) character spans of every
    lowercase word of at least CLOZE_MIN_LETTERS letters that ends a sentence (a period, then a space
    or the end) after the first `min_context` characters."""
    return [(m.start(1), m.end(1)) for m in _WORD_END.finditer(text, min_context)]


@dataclasses.dataclass
class HeldOutText:
    """Held-out documents as [R, seq_len] rows, one document per row (cut to seq_len)."""
    tokens: np.ndarray  # int32 [R, L]
    mask: np.ndarray  # bool [R, L]: position t predicts a token of the same document
    items: list[tuple[int, int, int]]  # last-word items: (row, first, last) positions predicting the word's tokens


def held_out_text(tokenizer, docs: list[str], seq_len: int) -> HeldOutText:
    """Documents -> rows; the task's items are the sentence-final words (`sentence_final_words`) whose
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
        for word_start, word_end in sentence_final_words(doc):
            if word_start - 1 not in starts or word_end not in starts:
                continue
            first, last = starts.index(word_start - 1), starts.index(word_end) - 1  # token indices of the word
            if first >= 1 and last < n - 1:
                items.append((r, first - 1, last - 1))  # the positions predicting them
    return HeldOutText(tokens, mask, items)


@functools.lru_cache(maxsize=4)
def _logits_fn(graphdef):
    @jax.jit
    def f(state, tokens_BxT):
        return nnx.merge(graphdef, state)(tokens_BxT)
    return f


def logits(model, tokens_BxT: np.ndarray) -> jax.Array:
    """The model's [B, T, V] logits of whole rows (one jit per model structure)."""
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


class TextEvaluator:
    """The teacher's full-vocabulary log-probs on held-out documents, computed once; every model scored
    against them: held-out CE, KL(teacher || model) over the whole vocabulary, top-1 agreement, and the
    last-word task on the items the teacher completes right (with its 95% Wilson interval)."""

    def __init__(self, teacher, data: HeldOutText):
        self.data = data
        self.teacher_logp = [jax.nn.log_softmax(logits(teacher, data.tokens[i:i + TEXT_EVAL_ROWS]), axis=-1)
                             for i in range(0, len(data.tokens), TEXT_EVAL_ROWS)]
        teacher_right = self._per_token(teacher, len(self.teacher_logp))["right"]
        self.items = [it for it in data.items if teacher_right[it[0], it[1]:it[2] + 1].all()]
        self.candidates = len(data.items)

    def _per_token(self, model, batches: int) -> dict[str, np.ndarray]:
        out = {"ce": [], "kl": [], "agree": [], "right": []}
        for b in range(batches):
            rows = self.data.tokens[b * TEXT_EVAL_ROWS:(b + 1) * TEXT_EVAL_ROWS]
            for k, v in zip(out, _token_metrics(logits(model, rows), self.teacher_logp[b], jnp.asarray(rows))):
                out[k].append(np.asarray(v))
        return {k: np.concatenate(v) for k, v in out.items()}

    def score(self, model, docs: int | None = None) -> dict:
        """Held-out CE, KL, top-1 agreement over the first `docs` documents (all by default) and the
        task's accuracy with its interval (all documents only)."""
        batches = (len(self.teacher_logp) if docs is None
                   else min(len(self.teacher_logp), math.ceil(docs / TEXT_EVAL_ROWS)))
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
