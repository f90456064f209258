"""Sampled teacher targets (precompute.targets=sampled, "Sparse Logit Sampling", Anshumann et al. 2025):
the soft loss against K draws is unbiased (its mean gradient is the dense forward KL's, top-K's is not),
precompute writes them deterministically whatever the windows or process split, training reads them
and refuses settings that would re-temper or bucket them, and older stores read as top-K."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_kd

from kd_jax.base.loader import load_config
from kd_jax.core import losses
from kd_jax.core import precompute as pre
from kd_jax.data.store import KDStore, StoreError, StoreMeta, identity_changes
from kd_jax.models.hf import load_tokenizer

K = 8
T_S = 2.0  # the draws' temperature: not 1, so a second tempering in the loss would show


# --- Unbiasedness ----------------------------------------------------------------------------

def _soft(z_V, ids_K, lps_K, targets, T):
    soft_C, _, _ = losses.token_terms(z_V[None], jnp.zeros(1, jnp.int32), ids_K[None], lps_K[None], temperature=T,
                                      targets=targets)
    return soft_C[0]


def test_sampled_soft_gradient_is_unbiased_and_topk_is_not():
    V, M, T = 128, 2000, T_S
    k_teacher, k_student, k_draws = jax.random.split(jax.random.key(0), 3)
    zt_V = 3.0 * jax.random.normal(k_teacher, (V,))
    z_V = jax.random.normal(k_student, (V,))
    ids_MxK, lw_MxK = losses.sample_targets(jnp.broadcast_to(zt_V, (M, V)), jax.random.split(k_draws, M), K,
                                            temperature=T, vocab_size=V)
    used = np.asarray(ids_MxK) >= 0
    np.testing.assert_allclose(np.where(used, np.exp(np.asarray(lw_MxK)), 0).sum(-1), 1.0, atol=1e-6)
    grads_MxV = jax.vmap(jax.grad(_soft), (None, 0, 0, None, None))(z_V, ids_MxK, lw_MxK, "sampled", T)
    dense_fn = lambda z: losses.dense_token_terms(z[None], zt_V[None], jnp.zeros(1, jnp.int32), temperature=T)[0][0]
    dense_V = jax.grad(dense_fn)(z_V)
    # Tolerance from the draws: 5 standard errors of the mean per logit, the per-seed spread's (floored by
    # the binomial one, T·sqrt(p(1-p)/(K·M)), for ids so unlikely that 2,000 seeds barely draw them).
    p_V = jax.nn.softmax(zt_V / T)
    se_V = jnp.maximum(grads_MxV.std(0, ddof=1), T * jnp.sqrt(p_V * (1 - p_V) / K)) / np.sqrt(M)
    tol_V = 5 * se_V
    err_V = jnp.abs(grads_MxV.mean(0) - dense_V)
    assert float(jnp.max(err_V / tol_V)) < 1.0, (float(jnp.max(err_V)), float(jnp.max(tol_V)))
    # mean soft/T² − mean Σ w log w = the dense cross-entropy H(p_T, q_T), within 5 standard errors
    soft_M = jax.vmap(_soft, (None, 0, 0, None, None))(z_V, ids_MxK, lw_MxK, "sampled", T) / T**2
    neg_entropy_M = jnp.where(used, jnp.exp(lw_MxK) * lw_MxK, 0.0).sum(-1)
    ce_M = soft_M - neg_entropy_M
    dense_ce = -(p_V * jax.nn.log_softmax(z_V / T)).sum()
    assert abs(float(ce_M.mean() - dense_ce)) < 5 * float(ce_M.std(ddof=1)) / np.sqrt(M)
    # top-K of the same size (the teacher's K best log-probs at T = 1, renormalized at T): biased
    vals_K, top_K = jax.lax.top_k(jax.nn.log_softmax(zt_V), K)
    topk_V = jax.grad(_soft)(z_V, top_K, vals_K, "topk", T)
    assert float(jnp.max(jnp.abs(topk_V - dense_V) / tol_V)) > 3.0


def test_sampled_targets_rows():
    """Unique ascending ids < vocab_size (padded rows never drawn), -1 after them, counts summing to K."""
    V, W, C = 24, 32, 64
    logits = jax.random.normal(jax.random.key(1), (C, W)).at[:, V:].set(20.0)  # padding rows most likely
    ids, lw = losses.sample_targets(logits, jax.random.split(jax.random.key(2), C), K, temperature=1.0,
                                    vocab_size=V)
    ids, lw = np.asarray(ids), np.asarray(lw)
    used = ids >= 0
    assert ids.max() < V and (lw[~used] == 0).all()
    counts = np.where(used, np.exp(lw) * K, 0)
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-4)
    np.testing.assert_allclose(counts.sum(-1), K, atol=1e-4)
    for row, u in zip(ids, used):  # unique ids first, ascending, then the padding
        assert (np.diff(row[u]) > 0).all() and u[:u.sum()].all()


# --- Precompute and training on a tiny teacher -------------------------------------------------

def _store_args(root, store, **extra):
    kw = {"data.store": store, "precompute.targets": "sampled", "precompute.sample_temperature": T_S,
          "precompute.sample_seed": 7, "mesh.data": -1, "run.output_dir": f"{root}/runs", **extra}
    return tiny_kd.store_args(root) + [f"{k}={v}" for k, v in kw.items()]


def _teacher_rows(path):
    store = KDStore.open(path)
    return {n: store.read_range(n, 0, store.meta.num_tokens) for n in ("topk_ids", "topk_logprobs")}


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sampled"))
    tiny_kd.make(root, n_traces=24)
    path = f"{root}/store"
    pre.precompute(load_config(None, _store_args(root, path)), show_progress=False)
    return root, path


def test_precompute_writes_sampled_rows(sampled):
    _, path = sampled
    store = KDStore.open(path)
    m = store.meta
    assert (m.targets, m.sample_temperature, m.sample_seed, m.k) == ("sampled", T_S, 7, K)
    described = store.describe()
    assert described["targets"] == "sampled" and described["complete"]
    rows = _teacher_rows(path)
    ids, lw = rows["topk_ids"], rows["topk_logprobs"].astype(np.float32)
    used = ids >= 0
    first = store.offsets[:-1]
    assert not used[first].any()  # a sequence's first token has no prediction
    rest = np.setdiff1d(np.arange(m.num_tokens), first)
    w = np.where(used, np.exp(lw), 0.0)
    np.testing.assert_allclose(w[rest].sum(-1), 1.0, atol=4e-3)  # fp16 log(count/K)
    counts = w[rest] * K
    np.testing.assert_allclose(counts, np.round(counts), atol=0.02)
    assert ids.max() < m.vocab_size and used[rest].sum(-1).min() >= 1
    # draws, not the top-K: a near-uniform random teacher at T = 2 still repeats an id in some rows
    assert (used[rest].sum(-1) < K).any()


def test_sampled_store_is_the_same_whatever_the_windows_and_processes(sampled, tmp_path):
    """Keys are per (sequence, token): other windows, a process split and a resume write the same rows."""
    root, path = sampled
    other = str(tmp_path / "store")
    cfg = load_config(None, _store_args(root, other, **{"precompute.window_chunks": 1}))
    pre.precompute(cfg, show_progress=False)
    want = _teacher_rows(path)
    for name, values in _teacher_rows(other).items():
        np.testing.assert_array_equal(values, want[name], err_msg=name)
    # "kill" process 1 of 2's chunks (marks and rows gone), then refill them as process 1 of 2
    store = KDStore.open(other)
    mine = pre.process_chunks(store.meta.num_chunks, 1, 2)
    C = store.meta.chunk_tokens
    for c in mine:
        a, b = c * C, min((c + 1) * C, store.meta.num_tokens)
        store.array("topk_ids")[a:b].write(np.full((b - a, K), -1, np.int32)).result()
        os.remove(os.path.join(other, "progress", f"{c:09d}"))
    assert not KDStore.open(other).describe()["complete"]
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    teacher = pre.build_model(cfg.teacher, mesh=mesh, seed=cfg.run.seed)
    pre.run_teacher(KDStore.open(other), teacher, mesh, cfg.precompute, process=1, processes=2, show_progress=False)
    assert KDStore.open(other).describe()["complete"]
    for name, values in _teacher_rows(other).items():
        np.testing.assert_array_equal(values, want[name], err_msg=name)


def test_sampled_identity_and_import_refused(sampled, tmp_path):
    root, path = sampled
    for key, value, shown in (("precompute.sample_temperature", 1.0, "precompute.sample_temperature 2.0 -> 1.0"),
                              ("precompute.sample_seed", 8, "precompute.sample_seed 7 -> 8"),
                              ("precompute.targets", "topk", "precompute.targets 'sampled' -> 'topk'")):
        with pytest.raises(StoreError, match=shown):
            pre.precompute(load_config(None, _store_args(root, path, **{key: value})), show_progress=False)
    with pytest.raises(StoreError, match="precompute.targets=topk"):
        pre.precompute(load_config(None, _store_args(root, str(tmp_path / "s"), **{
            "precompute.import_logprobs": f"{root}/none.jsonl"})), show_progress=False)


def _train_cfg(root, name, steps=3, **extra):
    kw = {"loss.temperature": T_S, "checkpoint.every_steps": 100, **extra}
    return load_config(None, tiny_kd.train_args(root, name, steps, **kw))


def test_training_reads_sampled_rows_and_refuses_retempering(sampled):
    from kd_jax.core.loop import train
    root, path = sampled
    metrics = train(_train_cfg(root, "sampled"))
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["soft"]) and metrics["soft"] > 0
    store = KDStore.open(path)
    tokenizer = load_tokenizer(f"{root}/teacher")
    for extra, pattern in (({"loss.temperature": 1.0}, r"loss.temperature=1: .*set loss.temperature=2"),
                           ({"loss.temperature_schedule.kind": "linear", "loss.temperature_schedule.end": 1.0},
                            "temperature_schedule"),
                           ({"loss.tail": "true"}, "loss.tail=true.*set loss.tail=false"),
                           ({"loss.divergence": "reverse_kl"}, "loss.divergence='reverse_kl'.*forward_kl")):
        with pytest.raises(StoreError, match=pattern):
            store.usable_sequences(_train_cfg(root, "refused", **extra), tokenizer=tokenizer)
    hard = _train_cfg(root, "hard", **{"loss.alpha": 0.0, "loss.temperature": 1.0})  # no soft term
    assert len(store.usable_sequences(hard, tokenizer=tokenizer)) == len(store)


def test_sampled_loss_refuses_tail_and_other_divergences():
    z, ids, lps = jnp.zeros((2, 16)), jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 4))
    for kw in ({"tail": True}, {"divergence": "jsd"}):
        with pytest.raises(ValueError, match="forward_kl"):
            losses.token_terms(z, jnp.zeros(2, jnp.int32), ids, lps, targets="sampled", **kw)


# --- Older stores -----------------------------------------------------------------------------

def test_store_without_target_fields_reads_as_topk(tmp_path):
    n = 6
    meta = StoreMeta(k=4, vocab_size=50, teacher_vocab_size=50, tokenizer="t", chat_template_hash="", teacher="t",
                     teacher_revision=None, logprob_dtype="float16", num_sequences=1, num_tokens=n, chunk_tokens=4)
    path = str(tmp_path / "old")
    KDStore.create(path, meta, np.arange(n, dtype=np.int32), np.ones(n, np.uint8), np.zeros(n, np.int32),
                   np.array([0, n]))
    with open(os.path.join(path, "kd_store.json")) as f:
        fields = json.load(f)
    for key in ("targets", "sample_temperature", "sample_seed"):  # as a store written before them
        del fields[key]
    with open(os.path.join(path, "kd_store.json"), "w") as f:
        json.dump(fields, f)
    old = KDStore.open(path).meta
    assert (old.targets, old.sample_temperature, old.sample_seed) == ("topk", 1.0, 0)
    wanted = {k: getattr(old, k) for k in ("tokenizer", "tokenizer_fingerprint", "teacher", "teacher_revision", "k",
                                           "logprob_dtype", "inputs")}
    assert identity_changes(old, wanted) == []  # a top-K precompute of old (no target keys) is the same store
    assert identity_changes(old, dict(wanted, targets="topk", sample_temperature=1.0, sample_seed=0)) == []
    assert identity_changes(old, dict(wanted, targets="sampled", sample_temperature=1.0, sample_seed=0)) == [
        "precompute.targets 'topk' -> 'sampled'"]
    assert dataclasses.replace(old, targets="sampled").targets == "sampled"


# --- Online draws (loss.online_sampled) -------------------------------------------------------

def _online_args(seed=0, N=4, D=8, E=6, V=64):
    ks = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(ks[0], (N, D))
    w = jax.random.normal(ks[1], (D, V)) / np.sqrt(D)
    th = jax.random.normal(ks[2], (N, E))
    tw = 3.0 * jax.random.normal(ks[3], (E, V)) / np.sqrt(E)
    labels = jnp.arange(N, dtype=jnp.int32)
    a = jnp.full((N,), 1.0 / N)
    return h, w, th, tw, labels, a, jnp.zeros((N,))


def test_online_sampled_gradient_is_the_dense_one_in_expectation():
    """loss.online_sampled=K: K draws per position from the in-step teacher at T; the gradient's mean
    over 1,000 step keys equals the dense online forward KL's (to 5 standard errors), one key gives
    the same draws twice, and another key other draws."""
    h, w, th, tw, labels, a, b = _online_args()
    T, M = T_S, 1000
    cfg = dataclasses.replace(losses.LossConfig(), online_sampled=K, temperature=T, chunk_size=2)

    def sampled(h, key):
        return losses.kd_loss_online(h, w, th, tw, labels, a, b, cfg, key=key)[0]

    dense_cfg = dataclasses.replace(cfg, online_sampled=0)
    dense = jax.grad(lambda h: losses.kd_loss_online(h, w, th, tw, labels, a, b, dense_cfg)[0])(h)
    grads = jax.jit(jax.vmap(jax.grad(sampled), (None, 0)))(h, jax.random.split(jax.random.key(7), M))
    se = grads.std(0, ddof=1) / np.sqrt(M)
    err = jnp.abs(grads.mean(0) - dense)
    assert float(jnp.max(err / (5 * se + 1e-6))) < 1.0, (float(jnp.max(err)), float(jnp.max(se)))
    key = jax.random.key(3)
    assert float(sampled(h, key)) == float(sampled(h, key))
    assert float(sampled(h, key)) != float(sampled(h, jax.random.key(4)))
    with pytest.raises(ValueError, match="PRNG key"):
        losses.kd_loss_online(h, w, th, tw, labels, a, b, cfg)


def test_online_sampled_config_checks():
    for extra, pattern in (({"loss.online_top_k": 8}, "choose the teacher's top-K or draws"),
                           ({"loss.tail": True}, "online_sampled=8 takes divergence=forward_kl without tail"),
                           ({"teacher.mode": "offline"}, "online_sampled=8 is for teacher.mode=online")):
        overrides = {"teacher.mode": "online", "loss.online_sampled": 8, **extra}
        with pytest.raises(Exception, match=pattern):
            load_config(None, [f"{k}={v}" for k, v in overrides.items()])
