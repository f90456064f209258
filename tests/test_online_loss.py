"""The online-teacher loss equals a materialized-logits reference (full vocabulary), equals the
offline loss on the same top-K, stays flat in memory over tokens; hidden alignment equals a
closed-form reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import loss_reference as ref
import numpy as np
import pytest

from kd_jax.base import sharding
from kd_jax.core import losses

f32 = jnp.float32


# --- The oracle: both models' [N, V] fp32 logits, the divergence written out -----------------

def _teacher_logits(t_hidden, t_embed, V):
    return jnp.dot(t_hidden.astype(f32), t_embed[:, :V].astype(f32), precision="highest")


def reference_online(hidden, embed, t_hidden, t_embed, labels, a, b, *, temperature, divergence, jsd_beta):
    N, V = hidden.shape[0], embed.shape[1]
    T = temperature
    z = jnp.dot(hidden.astype(f32), embed.astype(f32), precision="highest")
    zt = _teacher_logits(t_hidden, t_embed, V)
    p, q = jax.nn.softmax(zt / T), jax.nn.softmax(z / T)
    soft = T * T * ref.reference_divergence(p, q, jnp.ones((N, V), bool), divergence, jsd_beta)
    hard = -jnp.take_along_axis(jax.nn.log_softmax(z), jnp.clip(labels, 0, V - 1)[:, None], -1)[:, 0]
    agree = jnp.argmax(z, -1) == jnp.argmax(zt, -1)
    used = (a != 0) | (b != 0)
    loss = jnp.where(used, a * soft + b * hard, 0.0).sum()
    t_nll = -jnp.take_along_axis(jax.nn.log_softmax(zt), jnp.clip(labels, 0, V - 1)[:, None], -1)[:, 0]
    return loss, dict(soft_sum=jnp.where(used, soft, 0.0).sum(), hard_sum=jnp.where(used, hard, 0.0).sum(),
                      num_tokens=used.sum(dtype=f32), top1_agree=(used & agree).sum(dtype=f32),
                      teacher_nll_sum=jnp.where(used, t_nll, 0.0).sum())


def make_online_case(N, D, E, V, W, seed=0, logit_scale=1.0, teacher_scale=2.0):
    """(hidden, embed, teacher hidden, teacher embed, labels, a, b): a teacher of width E ≠ D over
    W > V rows whose padding rows would win every argmax if they were not dropped; tokens with
    zero weight (and out-of-range labels) and hard-only tokens."""
    rng = np.random.RandomState(seed)
    hidden = rng.randn(N, D).astype(np.float32)
    embed = (rng.randn(D, V) * logit_scale / np.sqrt(D)).astype(np.float32)
    t_hidden = rng.randn(N, E).astype(np.float32)
    t_embed = (rng.randn(E, W) * teacher_scale / np.sqrt(E)).astype(np.float32)
    t_embed[:, V:] = 10.0 * np.sign(t_hidden.mean(0))[:, None]  # huge logits on the padding ids
    labels = rng.randint(0, V, N).astype(np.int32)
    a = rng.rand(N).astype(np.float32)
    b = rng.rand(N).astype(np.float32)
    zero = rng.rand(N) < 0.2
    a[zero], b[zero] = 0.0, 0.0
    labels[zero] = np.where(rng.rand(zero.sum()) < 0.5, -100, V + 3)  # unsafe labels, zero weight
    a[rng.rand(N) < 0.1] = 0.0  # hard-only tokens
    return tuple(jnp.asarray(x) for x in (hidden, embed, t_hidden, t_embed, labels, a, b))


def _check_all(got, want, rtol=1e-5):
    loss, metrics, dh, dw = got
    ref.close(loss, want[0], rtol)
    for k in want[1]:
        ref.close(metrics[k], want[1][k], rtol)
    ref.close(dh, want[2], rtol)
    ref.close(dw, want[3], rtol)


# --- 1. Full vocabulary: value and gradients equal the reference -----------------------------

@pytest.mark.parametrize("divergence,jsd_beta", ref.DIVS, ids=[d for d, _ in ref.DIVS])
def test_matches_reference(divergence, jsd_beta):
    """N=37 is not a multiple of chunk_size=8; E=24 ≠ D=16; W=56 > V=50; T in {1, 2}."""
    case = make_online_case(N=37, D=16, E=24, V=50, W=56, seed=1)
    opts = dict(divergence=divergence, jsd_beta=jsd_beta)
    for T in (1.0, 2.0):
        got = ref.grads(losses.kd_loss_online, case, T, chunk_size=8, **opts)
        want = ref.grads(reference_online, case, T, **opts)
        _check_all(got, want)
        assert float(got[1]["soft_sum"]) > 0 and float(got[1]["num_tokens"]) > 0
    # The temperature is data: both T ran on one compiled program.
    assert ref.grad_fn(losses.kd_loss_online, chunk_size=8, **opts)._cache_size() == 1


def test_teacher_in_bf16():
    """A bf16 teacher (its compute dtype) against a reference on the same values in fp32: a
    product of two bf16 numbers is exact in fp32, so only the summation order differs."""
    hidden, embed, t_hidden, t_embed, *rest = make_online_case(N=37, D=16, E=24, V=50, W=56, seed=2)
    t_hidden, t_embed = t_hidden.astype(jnp.bfloat16), t_embed.astype(jnp.bfloat16)
    case = (hidden, embed, t_hidden, t_embed, *rest)
    opts = dict(divergence="reverse_kl", jsd_beta=0.5)
    got = ref.grads(losses.kd_loss_online, case, 2.0, chunk_size=8, **opts)
    want = ref.grads(reference_online, (hidden, embed, t_hidden.astype(f32), t_embed.astype(f32), *rest), 2.0, **opts)
    _check_all(got, want)
    assert got[2].dtype == hidden.dtype and got[3].dtype == embed.dtype


def test_teacher_vocab_smaller_than_student_is_refused():
    hidden, embed, t_hidden, t_embed, *rest = make_online_case(N=8, D=16, E=24, V=50, W=56)
    with pytest.raises(ValueError, match="W=40.*V=50"):
        losses.kd_loss_online(hidden, embed, t_hidden, t_embed[:, :40], *rest)


# --- 2. Sharded equals unsharded -------------------------------------------------------------

SHARDED = [((8, 1, 1), 0), ((2, 4, 1), 0), ((2, 1, 4), 0), ((2, 1, 4), 8)]


@pytest.mark.parametrize("mesh_shape,top_k", SHARDED, ids=[f"{m}-k{k}" for m, k in SHARDED])
def test_sharded_matches_single_device(mesh_shape, top_k):
    """Token axis over data x fsdp (both models' hidden states), embeddings by (embed, vocab);
    the top-K case runs lax.top_k on vocab-sharded teacher logits."""
    N, D, E, V, W, C = 128, 16, 24, 64, 72, 16
    case = make_online_case(N=N, D=D, E=E, V=V, W=W, seed=7)
    opts = dict(divergence="jsd", jsd_beta=0.3, tail=True, online_top_k=top_k, chunk_size=C)
    want = ref.grads(losses.kd_loss_online, case, 2.0, **opts)
    mesh = sharding.make_mesh(*mesh_shape)
    hidden, embed, t_hidden, t_embed, *data = case
    embeds = [jax.device_put(w, sharding.named_sharding(mesh, ("embed", "vocab"), w.shape)) for w in (embed, t_embed)]
    states = [jax.device_put(x, sharding.batch_sharding(mesh, 2)) for x in (hidden, t_hidden)]
    data = [jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)) for x in data]
    with jax.set_mesh(mesh):
        got = ref.grads(losses.kd_loss_online, (states[0], embeds[0], states[1], embeds[1], *data), 2.0, **opts)
    _check_all(got, want)


# --- 3. online_top_k = K equals the offline loss on the teacher's top K ----------------------

def _offline_case(case, K):
    """The teacher's top K by hand from materialized logits, as precompute stores it: log_softmax
    at T = 1 over all W rows, then the best K ids < V."""
    hidden, embed, t_hidden, t_embed, labels, a, b = case
    V, W = embed.shape[1], t_embed.shape[1]
    logp = jax.nn.log_softmax(_teacher_logits(t_hidden, t_embed, W), axis=-1)
    lps, ids = jax.lax.top_k(jnp.where(jnp.arange(W) < V, logp, -jnp.inf), K)
    return hidden, embed, labels, ids, lps, a, b


@functools.lru_cache(maxsize=None)
def _reference_jacobians(**opts):
    """d(loss, d hidden, d embed)/d teacher log-probs of the plain reference (test_losses)."""
    def outputs(lps, hidden, embed, labels, ids, a, b):
        loss_fn = lambda h, w: ref.reference_loss(h, w, labels, ids, lps, a, b, **opts)[0]
        return (loss_fn(hidden, embed),) + jax.grad(loss_fn, argnums=(0, 1))(hidden, embed)
    return jax.jit(jax.jacfwd(outputs), compiler_options=ref.FAST_COMPILE)


TOPK = [("forward_kl", 0.5, False), ("jsd", 0.3, True)]


@pytest.mark.parametrize("divergence,jsd_beta,tail", TOPK, ids=["forward_kl-notail", "jsd-tail"])
def test_top_k_matches_offline(divergence, jsd_beta, tail):
    K, T = 8, 2.0
    case = make_online_case(N=37, D=16, E=24, V=50, W=56, seed=3)
    # Padding rows as a real teacher has them (untrained, small logits), not the dominant ones of
    # the dense tests: they take a share of the normalization, which the store keeps too.
    t_embed = case[3].at[:, 50:].set(0.1 * jax.random.normal(jax.random.key(0), (24, 6)))
    case = case[:3] + (t_embed,) + case[4:]
    opts = dict(divergence=divergence, jsd_beta=jsd_beta, tail=tail, chunk_size=8)
    got = ref.grads(losses.kd_loss_online, case, T, online_top_k=K, **opts)
    offline = _offline_case(case, K)
    _check_all(got, ref.grads(losses.kd_loss, offline, T, **opts))

    # An offline store keeps the log-probs in float16 (11 significant bits, unit roundoff
    # u = 2^-11): each log-prob moves by |Δlp| <= u·|lp|. Loss and gradients are smooth in the
    # log-probs, so to first order each output y moves by at most Σ_j |∂y/∂lp_j|·|Δlp_j|, with the
    # Jacobian of the plain reference; we allow twice that (the second order is ~|Δlp|², 1e-7 here)
    # plus fp32 noise. A tolerance of "rtol 1e-3" would be a guess; this one follows the rounding.
    hidden, embed, labels, ids, lps, a, b = offline
    lps16 = lps.astype(jnp.float16).astype(f32)
    d_lps = np.abs(np.asarray(lps16 - lps, np.float64))
    assert d_lps.max() > 0 and np.all(d_lps <= 2.0 ** -11 * np.abs(np.asarray(lps)) + 1e-30)
    store = ref.grads(losses.kd_loss, (hidden, embed, labels, ids, lps16, a, b), T, **opts)
    jacs = _reference_jacobians(temperature=T, divergence=divergence, jsd_beta=jsd_beta, tail=tail)(
        lps, hidden, embed, labels, ids, a, b)
    for y_online, y_store, jac in zip((got[0], got[2], got[3]), (store[0], store[2], store[3]), jacs):
        jac = np.asarray(jac, np.float64)
        bound = 2.0 * (np.abs(jac) * d_lps).reshape(jac.shape[:jac.ndim - 2] + (-1,)).sum(-1)
        diff = np.abs(np.asarray(y_online, np.float64) - np.asarray(y_store, np.float64))
        noise = 1e-5 * np.abs(np.asarray(y_store, np.float64)) + 1e-6 * np.abs(np.asarray(y_store)).max()
        assert np.all(diff <= bound + noise), float((diff - bound - noise).max())


# --- 4. Compiled memory is flat in the number of tokens --------------------------------------

def _temp_bytes(fn, *shapes):
    return jax.jit(fn, compiler_options=ref.FAST_COMPILE).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def test_memory_flat_in_tokens():
    """temp(8N) − temp(N) of the training pass is O(tokens × (D + E)) (d hidden, the chunked
    copies of both models' states), never O(tokens × V): 7N more tokens of materialized fp32
    logits would add 7N·V·4 bytes per model. The materialized reference, compiled the same way,
    does grow by that. On XLA:CPU: about 10.9 MiB at N = 256 and 11.7 MiB at 8N (the [chunk, V]
    working set is fixed), against 288 MiB for the reference at 8N."""
    N, D, E, V, W, C = 256, 32, 48, 4096, 4160, 64

    def shapes(n):
        s = jax.ShapeDtypeStruct
        return (s((n, D), f32), s((D, V), f32), s((n, E), f32), s((E, W), f32), s((n,), jnp.int32), s((n,), f32),
                s((n,), f32))

    def train(fn, **opts):
        def step(hidden, embed, *data):
            return jax.value_and_grad(lambda h, w: fn(h, w, *data, temperature=2.0, **opts)[0], argnums=(0, 1))(
                hidden, embed)
        return step

    online = train(losses.kd_loss_online, divergence="jsd", jsd_beta=0.3, chunk_size=C)
    small, large = _temp_bytes(online, *shapes(N)), _temp_bytes(online, *shapes(8 * N))
    logits_8N = 8 * N * V * 4  # one materialized fp32 [8N, V] logits array: 32 MiB
    print(f"online temp: N={N}: {small / 2**20:.2f} MiB, 8N: {large / 2**20:.2f} MiB; "
          f"[8N, V] fp32 logits: {logits_8N / 2**20:.0f} MiB")
    assert large - small < logits_8N / 4, (small, large)

    reference = train(reference_online, divergence="jsd", jsd_beta=0.3)
    r_large = _temp_bytes(reference, *shapes(8 * N))
    print(f"materialized reference temp at 8N: {r_large / 2**20:.2f} MiB")
    assert r_large > logits_8N


# --- 5. Stress and the evaluation primal -----------------------------------------------------

def test_finite_under_stress():
    """Large, peaked logits on both sides: finite values, soft ≥ 0, finite gradients."""
    case = make_online_case(N=64, D=16, E=24, V=50, W=56, seed=5, logit_scale=60.0, teacher_scale=60.0)
    hidden, embed, t_hidden, t_embed, labels, _, _ = case
    z, zt = hidden @ embed, _teacher_logits(t_hidden, t_embed, embed.shape[1])
    assert float(jnp.abs(z).max()) > 100 and float(jnp.abs(zt).max()) > 100
    for divergence, jsd_beta in ref.DIVS:
        for T in (1.0, 4.0):
            soft, hard, _ = losses.dense_token_terms(z, zt, labels, temperature=T, divergence=divergence,
                                                     jsd_beta=jsd_beta)
            assert np.all(np.isfinite(soft)) and np.all(np.isfinite(hard))
            assert float(soft.min()) >= -1e-6 * T ** 2 * max(1.0, float(soft.max())), (divergence, T)
            loss, _, dh, dw = ref.grads(losses.kd_loss_online, case, T, divergence=divergence, jsd_beta=jsd_beta,
                                     chunk_size=16)
            assert np.isfinite(loss) and np.all(np.isfinite(dh)) and np.all(np.isfinite(dw)), (divergence, T)


def test_eval_primal_matches_training_pass():
    """Without differentiation the custom VJP's primal (values only) gives the same loss."""
    case = make_online_case(N=37, D=16, E=24, V=50, W=56, seed=1)
    opts = dict(divergence="jsd", jsd_beta=0.3, chunk_size=8)
    loss, metrics = jax.jit(lambda *c: losses.kd_loss_online(*c, temperature=2.0, **opts))(*case)
    t_loss, t_metrics, _, _ = ref.grads(losses.kd_loss_online, case, 2.0, **opts)
    ref.close(loss, t_loss)
    for k in metrics:
        ref.close(metrics[k], t_metrics[k])


# --- 6. Hidden alignment ---------------------------------------------------------------------

def _alignment_reference(s, t, P, w, distance):
    """Value and closed-form gradients (d s, d P) in float64 numpy, over the weighted tokens."""
    s, t, w = (np.asarray(x, np.float64) for x in (s, t, w))
    M, _, D = s.shape
    P = np.broadcast_to(np.eye(D), (M, D, D)) if P is None else np.asarray(P, np.float64)
    used = w != 0
    sp = np.einsum("mnd,mde->mne", np.where(used[None, :, None], s, 0.0), P)
    t = np.where(used[None, :, None], t, 0.0)
    if distance == "mse":
        d = ((sp - t) ** 2).mean(-1)
        dd_dsp = 2.0 * (sp - t) / sp.shape[-1]
    else:
        ns, nt = np.linalg.norm(sp, axis=-1), np.linalg.norm(t, axis=-1)
        ok = (ns > 0) & (nt > 0)
        ns1, nt1 = np.where(ok, ns, 1.0), np.where(ok, nt, 1.0)
        cos = np.where(ok, (sp * t).sum(-1) / (ns1 * nt1), 0.0)
        d = 1.0 - cos
        # d(1 − cos)/d sp = −(t/(|sp||t|) − cos·sp/|sp|²); 0 where a vector is zero (cos := 0).
        dd_dsp = np.where(ok[..., None], -(t / (ns1 * nt1)[..., None] - cos[..., None] * sp / (ns1 ** 2)[..., None]),
                          0.0)
    value = np.where(used[None], w[None] * d, 0.0).sum() / M
    g_sp = np.where(used[None, :, None], w[None, :, None] * dd_dsp / M, 0.0)
    g_s = np.einsum("mne,mde->mnd", g_sp, P)
    g_P = np.einsum("mnd,mne->mde", np.where(used[None, :, None], s, 0.0), g_sp)
    return value, g_s, g_P


@pytest.mark.parametrize("projected", [False, True], ids=["same-width", "projected"])
@pytest.mark.parametrize("distance", ["mse", "cosine"])
def test_hidden_alignment_matches_reference(distance, projected):
    M, N, D = 3, 11, 8
    E = 12 if projected else D
    rng = np.random.RandomState(11)
    s = rng.randn(M, N, D).astype(np.float32)
    t = rng.randn(M, N, E).astype(np.float32)
    P = (rng.randn(M, D, E) / np.sqrt(D)).astype(np.float32) if projected else None
    used = rng.rand(N) < 0.7
    used[:3] = True
    w = np.where(used, 1.0 / used.sum(), 0.0).astype(np.float32)
    s[0, 0] = 0.0  # a zero student vector on a weighted token (cosine: distance 1, no gradient)
    t[1, 1] = 0.0  # a zero teacher vector on a weighted token
    pad = np.flatnonzero(~used)
    assert pad.size
    s[:, pad[0]] = np.inf  # garbage on padding must reach neither value nor gradient
    t[:, pad[0]] = np.nan

    def f(s_, t_, P_):
        return losses.hidden_alignment(s_, t_, P_, jnp.asarray(w), distance)

    value, grads = jax.value_and_grad(f, argnums=(0, 1, 2) if projected else (0, 1))(
        jnp.asarray(s), jnp.asarray(t), None if P is None else jnp.asarray(P))
    r_value, r_gs, r_gP = _alignment_reference(s, t, P, w, distance)
    assert value.dtype == f32
    ref.close(value, r_value)
    ref.close(grads[0], r_gs)
    assert np.all(np.asarray(grads[1]) == 0)  # the teacher's states are constants
    if projected:
        ref.close(grads[2], r_gP)
