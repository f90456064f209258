"""The fused loss equals a plain materialized-logits reference; token weights reproduce the objective."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import loss_reference as ref
import numpy as np
import pytest

from kd_jax.base import sharding
from kd_jax.core import losses

# --- Cases -----------------------------------------------------------------------------------

def make_case(N, D, V, K, seed=0, logit_scale=1.0, teacher_scale=2.0, extra_vocab=10):
    """Random student, a teacher over V + extra_vocab ids (so some top-K ids are >= V), one
    negative id, tokens with zero weight and out-of-range labels."""
    rng = np.random.RandomState(seed)
    hidden = rng.randn(N, D).astype(np.float32)
    embed = (rng.randn(D, V) * logit_scale / np.sqrt(D)).astype(np.float32)
    t_logits = rng.randn(N, V + extra_vocab) * teacher_scale
    t_logprobs = t_logits - np.log(np.exp(t_logits - t_logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - t_logits.max(-1, keepdims=True)
    ids = np.argsort(-t_logprobs, axis=-1)[:, :K].astype(np.int32)
    lps = np.take_along_axis(t_logprobs, ids, -1).astype(np.float32)
    ids[1, -1] = -1  # a dropped slot
    labels = rng.randint(0, V, N).astype(np.int32)
    a = rng.rand(N).astype(np.float32)
    b = rng.rand(N).astype(np.float32)
    zero = rng.rand(N) < 0.2
    a[zero], b[zero] = 0.0, 0.0
    labels[zero] = np.where(rng.rand(zero.sum()) < 0.5, -100, V + 3)  # unsafe labels, zero weight
    a[rng.rand(N) < 0.1] = 0.0  # hard-only tokens
    return tuple(jnp.asarray(x) for x in (hidden, embed, labels, ids, lps, a, b))


@functools.lru_cache(maxsize=None)
def _terms_fn(**opts):
    return jax.jit(lambda logits, T, *data: losses.token_terms(logits, *data, temperature=T, **opts),
                   compiler_options=ref.FAST_COMPILE)


def _soft_terms(case, temperature, **opts):
    hidden, embed, labels, ids, lps, _, _ = case
    return _terms_fn(**opts)(hidden @ embed, jnp.float32(temperature), labels, ids, lps)[:2]


def _check_against_reference(case, *, temperature, divergence, jsd_beta, tail, chunk_size):
    opts = dict(temperature=temperature, divergence=divergence, jsd_beta=jsd_beta, tail=tail)
    loss, metrics, dh, dw = ref.grads(losses.kd_loss, case, chunk_size=chunk_size, **opts)
    r_loss, r_metrics, r_dh, r_dw = ref.grads(ref.reference_loss, case, **opts)
    ref.close(loss, r_loss)
    for k in r_metrics:
        ref.close(metrics[k], r_metrics[k])
    ref.close(dh, r_dh)
    ref.close(dw, r_dw)
    # Per token (from the shared math on materialized logits): every soft term is a divergence.
    soft, hard = _soft_terms(case, **opts)
    assert np.all(np.isfinite(soft)) and np.all(np.isfinite(hard))
    assert soft.min() >= -1e-6 * temperature ** 2, soft.min()




@pytest.mark.parametrize("tail", [False, True], ids=["notail", "tail"])
@pytest.mark.parametrize("divergence,jsd_beta", ref.DIVS, ids=[d for d, _ in ref.DIVS])
def test_matches_reference(divergence, jsd_beta, tail):
    """Every T in {1, 2, 4} and K in {1, 8, 64}; N=37 is not a multiple of chunk_size=8."""
    for K, V in ((1, 50), (8, 50), (64, 128)):
        case = make_case(N=37, D=16, V=V, K=K, seed=K)
        for T in (1.0, 2.0, 4.0):
            _check_against_reference(case, temperature=T, divergence=divergence, jsd_beta=jsd_beta,
                                     tail=tail, chunk_size=8)


@pytest.mark.parametrize("tail", [False, True], ids=["notail", "tail"])
def test_soft_nonnegative_under_stress(tail):
    """Large, peaked logits on both sides: still finite, ≥ 0 and finite in gradient."""
    case = make_case(N=64, D=16, V=50, K=8, seed=3, logit_scale=60.0, teacher_scale=20.0)
    for divergence, jsd_beta in ref.DIVS:
        for T in (1.0, 4.0):
            opts = dict(temperature=T, divergence=divergence, jsd_beta=jsd_beta, tail=tail)
            soft, hard = _soft_terms(case, **opts)
            assert np.all(np.isfinite(soft)) and np.all(np.isfinite(hard))
            assert soft.min() >= -1e-6 * T ** 2 * max(1.0, float(soft.max())), (divergence, T, soft.min())
            _, _, dh, dw = ref.grads(losses.kd_loss, case, chunk_size=16, **opts)
            assert np.all(np.isfinite(dh)) and np.all(np.isfinite(dw))


def test_eval_primal_matches_training_pass():
    """Without differentiation the custom VJP's primal (values only) gives the same loss."""
    case = make_case(N=37, D=16, V=50, K=8)
    loss, metrics = jax.jit(lambda *c: losses.kd_loss(*c, tail=True, chunk_size=8))(*case)
    t_loss, t_metrics, _, _ = ref.grads(losses.kd_loss, case, tail=True, chunk_size=8)
    ref.close(loss, t_loss)
    for k in metrics:
        ref.close(metrics[k], t_metrics[k])


# --- Sharded equals unsharded ----------------------------------------------------------------

@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 1, 4)], ids=str)
def test_sharded_matches_single_device(mesh_shape):
    N, D, V, K, C = 128, 16, 64, 8, 16
    case = make_case(N=N, D=D, V=V, K=K, seed=7)
    opts = dict(temperature=2.0, divergence="jsd", jsd_beta=0.3, tail=True, chunk_size=C)
    want = ref.grads(losses.kd_loss, case, **opts)
    mesh = sharding.make_mesh(*mesh_shape)
    hidden, embed, *data = case
    hidden = jax.device_put(hidden, sharding.batch_sharding(mesh, 2))
    embed = jax.device_put(embed, sharding.named_sharding(mesh, ("embed", "vocab"), embed.shape))
    data = [jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)) for x in data]
    with jax.set_mesh(mesh):
        got = ref.grads(losses.kd_loss, (hidden, embed, *data), **opts)
    ref.close(got[0], want[0])
    for k in want[1]:
        ref.close(got[1][k], want[1][k])
    ref.close(got[2], want[2])
    ref.close(got[3], want[3])


# --- Token weights ---------------------------------------------------------------------------

ALPHA, BETA, STEP_W, ANSWER_W = 0.3, 0.7, 1.5, 2.5


def _packed_batch():
    """Row 0: doc 1 (prompt, step 0 ×2, step 1 ×3, truncated) and doc 2 (step 1 ×2, answer ×3),
    whose step 1 touches doc 1's step 1: only the segment change separates them; one pad token.
    Row 1: one doc with a loss-masked token inside step 0, a fully masked step 1, then padding."""
    seg = [[1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0],
           [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]]
    role = [[0, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 0],
            [0, 0, 1, 1, 1, 1, 2, 2, 2, 0, 0, 0]]
    step = [[-1, 0, 0, 1, 1, 1, 1, 1, -1, -1, -1, -1],
            [-1, -1, 0, 0, 1, 1, -1, -1, -1, -1, -1, -1]]
    mask = [[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0],
            [1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0]]
    return (np.array(role), np.array(step), np.array(seg), np.array(mask, bool))


def _objective_by_hand(role, step, seg, mask, soft, hard):
    """α·L_soft + (1−α)·L_hard + β·L_step, looping over tokens and steps in plain Python."""
    tokens = [(r, t) for r in range(role.shape[0]) for t in range(role.shape[1])
              if role[r, t] != 0 and mask[r, t]]
    l_soft = sum(soft[r, t] for r, t in tokens) / len(tokens)
    l_hard = sum(hard[r, t] for r, t in tokens) / len(tokens)
    steps: dict[tuple, list] = {}
    for r, t in tokens:
        key = (r, seg[r, t], "reasoning", step[r, t]) if role[r, t] == 1 else (r, seg[r, t], "answer")
        steps.setdefault(key, []).append((r, t))
    num = den = 0.0
    for key, members in steps.items():
        w = STEP_W if key[2] == "reasoning" else ANSWER_W
        num += w * np.mean([ALPHA * soft[r, t] + (1 - ALPHA) * hard[r, t] for r, t in members])
        den += w
    assert len(steps) == 6  # row 0: step 0, step 1 (doc 1), step 1 (doc 2), answer; row 1: step 0, answer
    return ALPHA * l_soft + (1 - ALPHA) * l_hard + BETA * num / den


def test_token_weights_reproduce_objective():
    role, step, seg, mask = _packed_batch()
    rng = np.random.RandomState(0)
    soft, hard = rng.rand(*role.shape) * 3, rng.rand(*role.shape) * 5
    kw = dict(step_weight=STEP_W, answer_weight=ANSWER_W)
    a, b = jax.jit(lambda *x: losses.token_weights(*x, alpha=ALPHA, beta=BETA, **kw))(role, step, seg, mask)
    total = float((np.asarray(a, np.float64) * soft + np.asarray(b, np.float64) * hard).sum())
    want = _objective_by_hand(role, step, seg, mask, soft, hard)
    np.testing.assert_allclose(total, want, rtol=1e-6)
    assert np.all(np.asarray(a)[(role == 0) | ~mask] == 0) and np.all(np.asarray(b)[(role == 0) | ~mask] == 0)

    # Two micro-batches (one row each) with the global totals give the same objective.
    parts = [tuple(x[i:i + 1] for x in (role, step, seg, mask)) for i in range(2)]
    totals = [losses.weight_totals(*p, **kw) for p in parts]
    n_sup, w_sum = sum(t[0] for t in totals), sum(t[1] for t in totals)
    assert float(n_sup) == 14 and float(w_sum) == 4 * STEP_W + 2 * ANSWER_W  # row 1's step 1 is masked out
    split = 0.0
    for i, p in enumerate(parts):
        a_i, b_i = losses.token_weights(*p, alpha=ALPHA, beta=BETA, num_supervised=n_sup,
                                        step_weight_sum=w_sum, **kw)
        split += float((np.asarray(a_i, np.float64) * soft[i:i + 1] + np.asarray(b_i, np.float64) * hard[i:i + 1]).sum())
    np.testing.assert_allclose(split, want, rtol=1e-6)


def test_token_weights_feed_kd_loss():
    """End to end: [B, T] weights flattened to N drive kd_loss; L_soft alone is the mean soft term."""
    role, step, seg, mask = _packed_batch()
    B, T = role.shape
    a, b = losses.token_weights(role, step, seg, mask, alpha=1.0, beta=0.0, step_weight=1.0, answer_weight=1.0)
    hidden, embed, labels, ids, lps, _, _ = make_case(N=B * T, D=16, V=50, K=8)
    loss, metrics = losses.kd_loss(hidden, embed, labels, ids, lps, a.reshape(-1), b.reshape(-1), chunk_size=8)
    assert float(metrics["num_tokens"]) == 14
    ref.close(loss, metrics["soft_sum"] / metrics["num_tokens"])


# Stored per-step weights of _packed_batch's tokens (1 outside the reasoning, as the store writes):
# row 0: doc 1 step 0 → 3, doc 1 step 1 → 0.5, doc 2 step 1 → 2; row 1: step 0 → 4, the masked step 1 → 7.
STEP_WEIGHTS = np.array([[1, 3, 3, 0.5, 0.5, 0.5, 2, 2, 1, 1, 1, 1],
                         [1, 1, 4, 4, 7, 7, 1, 1, 1, 1, 1, 1]], np.float32)
# The batch's steps written out: (row, supervised tokens, w_s = loss.step_weight × stored weight, or answer_weight).
STEPS_BY_HAND = [(0, [1, 2], STEP_W * 3), (0, [3, 4, 5], STEP_W * 0.5), (0, [6, 7], STEP_W * 2),
                 (0, [8, 9, 10], ANSWER_W), (1, [2], STEP_W * 4), (1, [6, 7, 8], ANSWER_W)]


def test_token_weights_with_stored_step_weights_by_hand():
    """a_t = α/N + β·α·w_s/(n_s·W), b_t = (1−α)/N + β·(1−α)·w_s/(n_s·W), w_s = step_weight × the
    step's stored weight: the coefficients of a packed batch equal them token by token."""
    role, step, seg, mask = _packed_batch()
    N = sum(len(tokens) for _, tokens, _ in STEPS_BY_HAND)
    W = sum(w for _, _, w in STEPS_BY_HAND)
    assert (N, W) == (14, STEP_W * 9.5 + 2 * ANSWER_W)  # row 1's masked step 1 (weight 7) is not counted
    want_a, want_b = np.zeros(role.shape), np.zeros(role.shape)
    for row, tokens, w in STEPS_BY_HAND:
        for t in tokens:
            want_a[row, t] = ALPHA / N + BETA * ALPHA * w / (len(tokens) * W)
            want_b[row, t] = (1 - ALPHA) / N + BETA * (1 - ALPHA) * w / (len(tokens) * W)
    kw = dict(step_weight=STEP_W, answer_weight=ANSWER_W)
    fn = jax.jit(lambda *x, sw: losses.token_weights(*x, alpha=ALPHA, beta=BETA, step_weights_BxT=sw, **kw))
    a, b = fn(role, step, seg, mask, sw=STEP_WEIGHTS)
    np.testing.assert_allclose(a, want_a, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(b, want_b, rtol=1e-6, atol=1e-9)

    # Global totals from per-row micro-batches give the same coefficients.
    parts = [tuple(x[i:i + 1] for x in (role, step, seg, mask)) for i in range(2)]
    totals = [losses.weight_totals(*p, step_weights_BxT=STEP_WEIGHTS[i:i + 1], **kw) for i, p in enumerate(parts)]
    n_sup, w_sum = sum(t[0] for t in totals), sum(t[1] for t in totals)
    np.testing.assert_allclose([float(n_sup), float(w_sum)], [N, W], rtol=1e-6)
    for i, p in enumerate(parts):
        a_i, b_i = losses.token_weights(*p, alpha=ALPHA, beta=BETA, num_supervised=n_sup, step_weight_sum=w_sum,
                                        step_weights_BxT=STEP_WEIGHTS[i:i + 1], **kw)
        np.testing.assert_allclose(a_i, want_a[i:i + 1], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(b_i, want_b[i:i + 1], rtol=1e-6, atol=1e-9)

    # All-ones stored weights are exactly today's single loss.step_weight.
    ones, none = fn(role, step, seg, mask, sw=np.ones_like(STEP_WEIGHTS)), fn(role, step, seg, mask, sw=None)
    np.testing.assert_array_equal(ones[0], none[0])
    np.testing.assert_array_equal(ones[1], none[1])
