"""Grading generated answers, shared by trace generation (kd_jax/core/tracegen.py) and evaluation
(kd_jax/core/evaluation.py): the answer after `</think>` and the reasoning steps before it, the
answer matchers and step checkers of the config, pass@k, the Wilson interval, and the sampling key
of every (prompt, sample) row, so that a row's sample never depends on its batch.
"""

from __future__ import annotations

import importlib
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.base.schema import ConfigError
from kd_jax.data.traces import THINK_CLOSE, THINK_OPEN

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(text: str, *, reasoning: bool = True, ended: bool = True) -> str:
    """The answer part of a generation: what follows the last `</think>`; "" when the reasoning
    never closed (the model ran out of tokens or never answered: not a match by accident).
    `reasoning=False` (a plain instruct model): the whole text, "" unless it `ended` with EOS."""
    if not reasoning:
        return text.strip() if ended else ""
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
    return _import_function(spec, "eval.matcher", "use exact, numeric or an importable module.path:function")


def _import_function(spec: str, key: str, fix: str):
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}={spec!r}: cannot import {name!r} from {module!r} ({e}); {fix}") from None


def step_checker(spec: str):
    """`eval.step_checker`: a `module.path:function` called as fn(steps, prompt, reference) ->
    one bool per step. `steps`: the generated reasoning (before `</think>`, or all of it when the
    reasoning never closed) split at `data.steps.separator`, stripped, empty pieces dropped;
    `prompt`: the problem as the model saw it (the chat-rendered prompt, special tokens dropped);
    `reference`: the reference answer. kd_jax.demo.arithmetic:check_steps is the demo task's."""
    return _import_function(spec, "eval.step_checker", "use an importable module.path:function taking "
                            "(steps, prompt, reference) -> list[bool], or null")


def wilson_interval(correct: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion correct / n (95% at z = 1.96); (0, 1) when n = 0.
    `correct` may be fractional: with several samples per problem it is the sum of the problems'
    shares of correct samples, so the interval counts problems, not (correlated) samples."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one prompt with c correct of n samples: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def row_keys(seed: int, prompt_index: np.ndarray, sample: np.ndarray) -> jax.Array:
    """[R] sampling keys: fold_in(fold_in(key(seed), prompt index), sample index) per row."""
    base = jax.random.key(seed)
    fold = jax.vmap(lambda p, s: jax.random.fold_in(jax.random.fold_in(base, p), s))
    return fold(jnp.asarray(prompt_index, jnp.uint32), jnp.asarray(sample, jnp.uint32))


def reference_answer(value) -> str:
    """A reference answer as text: what follows the last "####" when there is one (GSM8K writes
    its worked solution, then "#### 42"), else the whole value, stripped."""
    text = str(value)
    return (text.rsplit("####", 1)[1] if "####" in text else text).strip()


def has_reference(value) -> bool:
    """Whether a row's reference answer can be scored against: not null, not blank."""
    return value is not None and bool(str(value).strip())


def reasoning_steps(text: str, separator: str) -> list[str]:
    """The reasoning steps of a generation: the text before the last `</think>` (all of it when the
    reasoning never closed), without a leading `<think>`, split at `separator`, stripped, empty
    pieces dropped."""
    reasoning = text.rsplit(THINK_CLOSE, 1)[0] if THINK_CLOSE in text else text
    reasoning = reasoning.split(THINK_OPEN, 1)[1] if THINK_OPEN in reasoning else reasoning
    return [s.strip() for s in reasoning.split(separator) if s.strip()]
