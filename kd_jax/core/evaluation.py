"""Evaluation of a student or teacher on the held-out split of the KD store (the library behind
`python -m kd_jax.evaluate`). Three axes: the KD losses and top-1 agreement with the teacher (the
train loop's evaluation), task accuracy by generation (the text after `</think>` is compared with
the reference answer by `eval.matcher`), and cost: generation tokens/s and the parameters' memory.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import time

import jax
import numpy as np
from flax import nnx

from kd_jax.core import sharding
from kd_jax.core.config import Config, ConfigError, EvalConfig
from kd_jax.core.generate import generate
from kd_jax.core.loop import evaluate_losses, usable_sequences
from kd_jax.core.runs import restore_student
from kd_jax.core.step import Objective, default_hyper, eval_step
from kd_jax.data.pipeline import split_indices
from kd_jax.data.roles import Role
from kd_jax.data.store import KDStore
from kd_jax.data.traces import THINK_CLOSE
from kd_jax.models import build_model, num_params
from kd_jax.models.hf import load_tokenizer

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(text: str) -> str:
    """The answer part of a generation: what follows the last `</think>`; "" when the reasoning
    never closed (the model ran out of tokens or never answered: not a match by accident)."""
    return text.rsplit(THINK_CLOSE, 1)[1].strip() if THINK_CLOSE in text else ""


def matcher(spec: str):
    """`exact` (whitespace-normalized equality), `numeric` (the last number of each, equal to 1e-6
    relative) or `module.path:function` taking (prediction, reference) -> bool."""
    if spec == "exact":
        return lambda pred, ref: " ".join(pred.split()) == " ".join(ref.split())
    if spec == "numeric":
        def numeric(pred: str, ref: str) -> bool:
            p, r = _NUMBER.findall(pred), _NUMBER.findall(ref)
            return bool(p and r) and abs(float(p[-1]) - float(r[-1])) <= 1e-6 * max(1.0, abs(float(r[-1])))
        return numeric
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"eval.matcher={spec!r}: cannot import {name!r} from {module!r} ({e}); use exact, "
                         f"numeric or an importable module.path:function") from None


def task_accuracy(model, tokenizer, store: KDStore, indices: np.ndarray, eval_cfg: EvalConfig,
                  batch_size: int) -> dict:
    """Generate from each held-out prompt (its prompt tokens, ending in the generation prompt) and
    compare the extracted answer with the reference (its answer tokens, EOS dropped)."""
    match = matcher(eval_cfg.matcher)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    correct, new_tokens, seconds, samples = 0, 0, 0.0, []
    run = functools.partial(generate, model, max_new_tokens=eval_cfg.max_new_tokens, eos_ids=eos,
                            temperature=eval_cfg.sampling_temperature, top_p=eval_cfg.top_p)
    warm = False
    for start in range(0, len(indices), batch_size):
        seqs = [store.read(int(i)) for i in indices[start:start + batch_size]]
        prompts = [s["tokens"][s["role"] == Role.PROMPT].tolist() for s in seqs]
        # Full batches (the last one padded with copies), so one compile serves every batch.
        padded = prompts + [prompts[-1]] * (batch_size - len(prompts))
        if not warm:  # tokens/s is measured after a warm-up call (compile excluded)
            run(padded)
            warm = True
        t0 = time.perf_counter()
        outs = run(padded)[:len(prompts)]
        seconds += time.perf_counter() - t0
        for s, out in zip(seqs, outs):
            new_tokens += len(out)
            # Special tokens kept: some tokenizers mark <think> tags special (EOS is dropped).
            pred = extract_answer(tokenizer.decode([t for t in out if t not in eos]))
            ref = tokenizer.decode([t for t in s["tokens"][s["role"] == Role.ANSWER] if t not in eos],
                                   skip_special_tokens=True).strip()
            ok = bool(match(pred, ref))
            correct += ok
            if len(samples) < 3:
                samples.append({"prediction": pred, "reference": ref, "correct": ok})
    n = len(indices)
    return {"accuracy": correct / max(n, 1), "examples": n, "generated_tokens": new_tokens,
            "generation_tokens_per_s": new_tokens / max(seconds, 1e-9), "samples": samples}


def load_for_eval(cfg: Config, which: str, mesh, *, untrained: bool = False):
    """The teacher as configured, or the student from the run's latest checkpoint; the student as
    initialized (pretrained, teacher layers or random) only when asked with `untrained`."""
    if which == "teacher":
        return build_model(cfg.teacher, mesh=mesh)
    if not untrained:
        return restore_student(cfg, mesh=mesh)[0]
    teacher = build_model(cfg.teacher, mesh=mesh) if cfg.student.init == "teacher_layers" else None
    return build_model(cfg.student, mesh=mesh, teacher=teacher, seed=cfg.run.seed)


def evaluate(cfg: Config, which: str = "student", max_examples: int | None = None, *,
             untrained: bool = False) -> dict:
    """Held-out KD losses, task accuracy and cost of the student (or teacher) of `cfg`; also
    written to <run_dir>/eval_<which>.json."""
    mesh = sharding.mesh_from_config(cfg.mesh)
    model = load_for_eval(cfg, which, mesh, untrained=untrained)
    tokenizer = load_tokenizer(cfg.tokenizer)
    store = KDStore.open(cfg.data.store)
    usable = usable_sequences(store, cfg)
    _, eval_pos = split_indices(len(usable), cfg.data.eval_fraction, cfg.data.shuffle_seed)
    eval_idx = usable[eval_pos][:max_examples]
    graphdef, params = nnx.split(model)
    # An online teacher runs beside the evaluated model for the soft loss (no alignment term: the
    # projections are training state, not part of the model).
    teacher = build_model(cfg.teacher, mesh=mesh) if cfg.teacher.mode == "online" else None
    objective = Objective(graphdef, cfg.loss, nnx.graphdef(teacher) if teacher is not None else None)
    step = jax.jit(functools.partial(eval_step, objective))
    teacher_params = nnx.state(teacher) if teacher is not None else None
    eval_fn = lambda v, b: step(v, b, default_hyper(cfg.loss), teacher_params)  # noqa: E731
    with jax.set_mesh(mesh):
        losses = evaluate_losses(eval_fn, {"params": params}, cfg.data.store, eval_idx, cfg.data, cfg.loss,
                                 batches=cfg.eval.batches, batch_size=cfg.train.global_batch_size, mesh=mesh) or {}
    task = task_accuracy(model, tokenizer, store, eval_idx, cfg.eval, cfg.train.global_batch_size)
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    report = {"model": which, "parameters": num_params(model), "parameter_bytes": param_bytes, **losses, **task}
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, f"eval_{which}.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def format_report(report: dict) -> str:
    keys = ("model", "accuracy", "examples", "hard", "soft", "step_loss", "top1_agree", "perplexity",
            "parameters", "parameter_bytes", "generation_tokens_per_s")
    rows = [(k, f"{report[k]:.4g}" if isinstance(report.get(k), float) else str(report.get(k, "-"))) for k in keys]
    return "\n".join(f"{k:>24}  {v}" for k, v in rows)
