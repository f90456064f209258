"""The loss oracle tests/test_losses.py and tests/test_online_loss.py share: materialized [N, V]
fp32 logits with the formulas written out (`reference_terms`, `reference_loss`), jitted
(loss, metrics, gradients) of a loss function (`grads`) and the comparison they use (`close`)
(test support)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

f32 = jnp.float32
# XLA:CPU compile time dominates these tiny cases; LLVM's backend optimizations halve it and do
# not change float semantics (no fast-math).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def kl(x, y, mask):
    """Σ x·(log x − log y) over mask, 0·log 0 = 0."""
    x = jnp.where(mask, x, 0.0)
    y = jnp.where(mask, y, 1.0)
    return jnp.where(mask & (x > 0), x * (jnp.log(jnp.where(x > 0, x, 1.0)) - jnp.log(y)), 0.0).sum(-1)


def reference_divergence(p, q, mask, divergence, jsd_beta):
    """The divergence (forward or reverse KL, or JSD with weight jsd_beta) of p and q over mask."""
    if divergence == "forward_kl":
        return kl(p, q, mask)
    if divergence == "reverse_kl":
        return kl(q, p, mask)
    m = jsd_beta * p + (1 - jsd_beta) * q
    return jsd_beta * kl(p, m, mask) + (1 - jsd_beta) * kl(q, m, mask)


def reference_terms(logits_NxV, labels_N, ids_NxK, lps_NxK, *, temperature, divergence, jsd_beta, tail):
    N, V = logits_NxV.shape
    T = temperature
    valid = (ids_NxK >= 0) & (ids_NxK < V)
    ids = jnp.where(valid, ids_NxK, 0)
    hard = -jnp.take_along_axis(jax.nn.log_softmax(logits_NxV), jnp.clip(labels_N, 0, V - 1)[:, None], -1)[:, 0]
    q_full = jax.nn.softmax(logits_NxV / T)
    q_k = jnp.where(valid, jnp.take_along_axis(q_full, ids, -1), 0.0)
    if not tail:
        p = jnp.where(valid, jax.nn.softmax(jnp.where(valid, lps_NxK / T, -jnp.inf)), 0.0)
        q = q_k if divergence == "forward_kl" else q_k / jnp.where(valid, q_k, 0.0).sum(-1, keepdims=True)
        soft = reference_divergence(p, q, valid, divergence, jsd_beta)
    else:
        probs = jnp.where(valid, jnp.exp(lps_NxK), 0.0)
        t_tail = jnp.maximum(1.0 - probs.sum(-1, keepdims=True), np.finfo(np.float32).tiny)
        buckets = jnp.concatenate([probs, t_tail], -1) ** (1.0 / T)
        p = buckets / buckets.sum(-1, keepdims=True)
        q = jnp.concatenate([q_k, 1.0 - q_k.sum(-1, keepdims=True)], -1)
        mask = jnp.concatenate([valid, jnp.ones((N, 1), bool)], -1)
        soft = reference_divergence(p, q, mask, divergence, jsd_beta)
    teacher_best = jnp.take_along_axis(ids, jnp.argmax(jnp.where(valid, lps_NxK, -jnp.inf), -1)[:, None], -1)[:, 0]
    agree = valid.any(-1) & (jnp.argmax(logits_NxV, -1) == teacher_best)
    return T * T * soft, hard, agree


def reference_loss(hidden, embed, labels, ids, lps, a, b, **opts):
    logits = jnp.dot(hidden.astype(f32), embed.astype(f32), precision="highest")
    soft, hard, agree = reference_terms(logits, labels, ids, lps, **opts)
    used = (a != 0) | (b != 0)
    loss = jnp.where(used, a * soft + b * hard, 0.0).sum()
    return loss, dict(soft_sum=jnp.where(used, soft, 0.0).sum(), hard_sum=jnp.where(used, hard, 0.0).sum(),
                      num_tokens=used.sum(dtype=f32), top1_agree=(used & agree).sum(dtype=f32))


@functools.lru_cache(maxsize=None)
def grad_fn(fn, **opts):
    """Jitted (loss, metrics, d hidden, d embed) with a traced temperature: one compile per shape
    and static options, shared by every T (compiles dominate this file's run time)."""
    def run(hidden, embed, temperature, *data):
        (loss, metrics), (dh, dw) = jax.value_and_grad(
            lambda h, w: fn(h, w, *data, temperature=temperature, **opts), argnums=(0, 1), has_aux=True)(
                hidden, embed)
        return loss, metrics, dh, dw
    return jax.jit(run, compiler_options=FAST_COMPILE)


def grads(fn, case, temperature=1.0, **opts):
    hidden, embed, *data = case
    return grad_fn(fn, **opts)(hidden, embed, jnp.float32(temperature), *data)


def close(actual, desired, rtol=1e-5):
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=1e-6 * max(np.abs(desired).max(), 1e-30))


DIVS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]  # jsd β ≠ 0.5 catches a β/1−β swap
