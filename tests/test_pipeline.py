"""The Grain pipeline over a real KD store: every packed token lines up with the store (the
shift happens before packing), no leakage between packed sequences, exact resume from the
iterator state, disjoint process shards, one-pass eval, worker processes, curriculum."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import tiny_kd

from kd_jax.base.loader import load_config
from kd_jax.base.schema import DataConfig
from kd_jax.core.precompute import precompute as run
from kd_jax.data import pipeline
from kd_jax.data.store import KDStore, StoreError

L, K, N_SEQ = 256, 8, 24  # packed length; store top-K; sequences (53..219 tokens each)
CFG = DataConfig(seq_len=L)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("kd_pipeline")
    teacher, traces = tiny_kd.make(str(root), n_traces=N_SEQ)
    path = str(root / "store")
    kw = {"teacher.hf_path": teacher, "teacher.param_dtype": "float32", "teacher.dtype": "float32",
          "data.traces": traces, "data.store": path, "data.top_k": K, "data.seq_len": 512,
          "precompute.chunk_tokens": 256, "precompute.bucket": 16, "precompute.batch_tokens": 1024,
          "mesh.data": -1, "run.output_dir": str(root)}
    run(load_config(None, [f"{k}={v}" for k, v in kw.items()]), show_progress=False)
    return path


@pytest.fixture(scope="module")
def ref(store_path):
    """Every store sequence, and a lookup from a sequence's inputs (tokens[:-1]) to its index."""
    store = KDStore.open(store_path)
    seqs = [store.read(i) for i in range(len(store))]
    by_inputs = {s["tokens"][:-1].tobytes(): i for i, s in enumerate(seqs)}
    assert len(by_inputs) == len(seqs) == N_SEQ  # sequences are told apart by their tokens
    return seqs, by_inputs


@pytest.fixture(scope="module")
def split():
    return pipeline.split_indices(N_SEQ, 0.25, seed=0)


def check_batch(batch, ref, allowed, B):
    """Asserts the batch contract against the store; returns the store index of every segment."""
    seqs, by_inputs = ref
    shapes = {k: v.shape for k, v in batch.items()}
    assert shapes == {**{k: (B, L) for k in ("inputs", "labels", "positions", "segment_ids", "role",
                                             "reasoning_step", "step_weight", "loss_mask")},
                      "topk_ids": (B, L, K), "topk_logprobs": (B, L, K)}
    assert batch["topk_logprobs"].dtype == np.float32 and batch["loss_mask"].dtype == bool
    assert batch["step_weight"].dtype == np.float32
    assert all(batch[k].dtype == np.int32 for k in ("inputs", "labels", "positions", "segment_ids", "role",
                                                    "reasoning_step", "topk_ids"))
    seg = batch["segment_ids"]
    pad = seg == 0
    for name, value in dict(inputs=0, labels=0, positions=0, role=0, reasoning_step=-1, step_weight=1.0,
                            loss_mask=False).items():
        assert (batch[name][pad] == value).all(), name
    assert (batch["topk_ids"][pad] == -1).all() and (batch["topk_logprobs"][pad] == 0).all()
    # Row 0 of a sequence has no teacher prediction (ids -1); an off-by-one would pack it in.
    assert (batch["topk_ids"][~pad] >= 0).all()
    found = []
    for b in range(B):
        m = seg[b].max()
        # Segments are 1..m, each one contiguous run, then padding only.
        runs = seg[b][np.flatnonzero(np.diff(seg[b], prepend=-1))]
        assert list(runs[runs > 0]) == list(range(1, m + 1))
        assert (seg[b][:np.count_nonzero(seg[b])] > 0).all()  # padding only at the end
        for s in range(1, m + 1):
            t = np.flatnonzero(seg[b] == s)
            i = by_inputs.get(batch["inputs"][b, t].tobytes())
            assert i is not None, "a segment is not exactly one stored sequence: packed data leaked"
            assert i in allowed
            x = seqs[i]
            n = len(x["tokens"])
            assert len(t) == n - 1
            np.testing.assert_array_equal(batch["positions"][b, t], np.arange(n - 1))
            # labels[t] is the token after inputs[t]; everything else describes that label token.
            np.testing.assert_array_equal(batch["labels"][b, t], x["tokens"][1:])
            np.testing.assert_array_equal(batch["role"][b, t], x["role"][1:])
            np.testing.assert_array_equal(batch["reasoning_step"][b, t], x["step"][1:])
            np.testing.assert_array_equal(batch["step_weight"][b, t], x["step_weight"][1:])
            np.testing.assert_array_equal(batch["topk_ids"][b, t], x["topk_ids"][1:])
            np.testing.assert_array_equal(batch["topk_logprobs"][b, t], x["topk_logprobs"][1:].astype(np.float32))
            np.testing.assert_array_equal(batch["loss_mask"][b, t], x["role"][1:] != 0)
            # The classic off-by-one, spelled out at both ends of the segment.
            first, last = t[0], t[-1]
            assert batch["inputs"][b, first] == x["tokens"][0] and batch["labels"][b, first] == x["tokens"][1]
            assert batch["inputs"][b, last] == x["tokens"][-2] and batch["labels"][b, last] == x["tokens"][-1]
            assert batch["positions"][b, first] == 0
            found.append(i)
    return found


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_split_indices():
    tr, ev = pipeline.split_indices(100, 0.1, seed=3)
    assert len(ev) == 10 and len(tr) == 90 and not set(tr) & set(ev) and set(tr) | set(ev) == set(range(100))
    tr2, ev2 = pipeline.split_indices(100, 0.1, seed=3)
    assert (tr == tr2).all() and (ev == ev2).all()
    assert set(pipeline.split_indices(100, 0.1, seed=4)[1]) != set(ev)
    assert len(pipeline.split_indices(5, 0.01, seed=0)[1]) == 1  # a requested eval split is never empty


@pytest.mark.parametrize("packing", ["first_fit", "best_fit"])
def test_packed_batches_align_with_store(store_path, ref, split, packing):
    train, _ = split
    cfg = dataclasses.replace(CFG, packing=packing)
    it = pipeline.make_train_iter(KDStore.open(store_path), train, cfg, global_batch_size=4, seed=0)
    found = [i for batch in take(it, 6) for i in check_batch(batch, ref, set(train), B=4)]
    assert len(found) > 6 * 4  # rows hold several sequences: packing happened
    assert set(found) == set(train)  # 6 batches run past one epoch


def test_resume_is_exact_and_seed_matters(store_path, ref, split, tmp_path):
    from etils import epath
    from grain.checkpoint import CheckpointHandler, CheckpointRestore, CheckpointSave

    train, _ = split
    it = pipeline.make_train_iter(KDStore.open(store_path), train, CFG, global_batch_size=4, seed=7)
    first = take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # the state is JSON, as grain.checkpoint writes it
    CheckpointHandler().save(epath.Path(tmp_path), args=CheckpointSave(it))  # what Orbax calls
    after = take(it, 3)
    again = pipeline.make_train_iter(KDStore.open(store_path), train, CFG, global_batch_size=4, seed=7)
    assert_same(take(again, 5), first)
    fresh = pipeline.make_train_iter(KDStore.open(store_path), train, CFG, global_batch_size=4, seed=7)
    fresh.set_state(state)
    assert_same(take(fresh, 3), after)
    restored = pipeline.make_train_iter(KDStore.open(store_path), train, CFG, global_batch_size=4, seed=7)
    CheckpointHandler().restore(epath.Path(tmp_path), args=CheckpointRestore(restored))
    assert_same(take(restored, 3), after)
    other = pipeline.make_train_iter(KDStore.open(store_path), train, CFG, global_batch_size=4, seed=8)
    assert not np.array_equal(next(other)["inputs"], first[0]["inputs"])


def test_process_shards_are_disjoint_and_cover_an_epoch(store_path, ref, split):
    train, _ = split
    n = len(train)
    kw = dict(global_batch_size=4, seed=1, process_count=2)
    streams = [pipeline.train_examples(KDStore.open(store_path), train, CFG, process_index=p, **kw) for p in (0, 1)]
    shards = [[streams[p][j]["index"] for j in range((n + 1 - p) // 2)] for p in (0, 1)]
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == sorted(train)
    # One global stream: process p's j-th example is the single-process stream's (2j + p)-th.
    single = pipeline.train_examples(KDStore.open(store_path), train, CFG, global_batch_size=4, seed=1)
    assert shards[0][:4] == [single[2 * j]["index"] for j in range(4)]
    it = pipeline.make_train_iter(KDStore.open(store_path), train, CFG, process_index=1, **kw)
    check_batch(next(it), ref, set(train), B=2)  # process-local batch
    with pytest.raises(ValueError, match="multiple of the 2 processes"):
        pipeline.make_train_iter(KDStore.open(store_path), train, CFG, global_batch_size=5, seed=1, process_count=2)


def test_eval_is_one_deterministic_padded_pass(store_path, ref, split):
    _, ev = split
    batches = list(pipeline.make_eval_iter(KDStore.open(store_path), ev, CFG, batch_size=8))
    found = [i for batch in batches for i in check_batch(batch, ref, set(ev), B=8)]
    assert sorted(found) == sorted(ev)  # each eval sequence exactly once
    assert (batches[-1]["segment_ids"].max(axis=1) == 0).any()  # 6 sequences in 8 rows: empty rows added
    assert_same(list(pipeline.make_eval_iter(KDStore.open(store_path), ev, CFG, batch_size=8)), batches)
    everything = list(pipeline.make_eval_iter(KDStore.open(store_path), np.arange(N_SEQ), CFG, batch_size=3))
    assert sorted(i for b in everything for i in check_batch(b, ref, set(range(N_SEQ)), B=3)) == list(range(N_SEQ))


def test_worker_processes(store_path, ref, split):
    """Grain's mp_prefetch gives each worker a slice of the example stream and packs it there, so
    batches with workers differ from num_workers=0 (Grain documents this) but are deterministic
    and resume exactly."""
    train, _ = split
    cfg = dataclasses.replace(CFG, num_workers=2)
    it = pipeline.make_train_iter(KDStore.open(store_path), train, cfg, global_batch_size=4, seed=2)
    first = take(it, 3)
    for batch in first:
        check_batch(batch, ref, set(train), B=4)
    state = it.get_state()
    after = take(it, 2)
    it.close()
    fresh = pipeline.make_train_iter(KDStore.open(store_path), train, cfg, global_batch_size=4, seed=2)
    fresh.set_state(json.loads(json.dumps(state)))
    assert_same(take(fresh, 2), after)
    fresh.close()


def test_curriculum_starts_easiest_first(store_path, ref, split):
    train, _ = split
    seqs, _ = ref
    reasoning = np.array([(s["role"] == 1).sum() for s in seqs])
    np.testing.assert_array_equal(pipeline.reasoning_lengths(KDStore.open(store_path)), reasoning)
    # 8 easy first, in the strict easiest-first order (the default, curriculum_stages=0)
    cfg = dataclasses.replace(CFG, curriculum=dataclasses.replace(CFG.curriculum, fraction=0.5))
    ds = pipeline.train_examples(KDStore.open(store_path), train, cfg, global_batch_size=4, seed=0, steps=4)
    head = [ds[j]["index"] for j in range(8)]
    assert list(reasoning[head]) == sorted(reasoning[train])[:8]
    # One stage: the same 8 easiest, shuffled among themselves.
    one = pipeline.train_examples(KDStore.open(store_path), train, dataclasses.replace(cfg, curriculum=dataclasses.replace(cfg.curriculum, stages=1)),
                                  global_batch_size=4, seed=0, steps=4)
    assert sorted(reasoning[[one[j]["index"] for j in range(8)]]) == sorted(reasoning[train])[:8]
    assert sorted(ds[j]["index"] for j in range(8, 8 + len(train))) == sorted(train)  # then whole epochs
    custom = pipeline.train_examples(KDStore.open(store_path), train, cfg, global_batch_size=4, seed=0, steps=4,
                                     difficulty=-reasoning)  # hardest first
    assert reasoning[custom[0]["index"]] == reasoning[train].max()


def test_overlong_sequence_fails_clearly(store_path, split):
    train, _ = split
    with pytest.raises(StoreError, match="data.seq_len"):
        pipeline.make_train_iter(KDStore.open(store_path), train, DataConfig(seq_len=64), global_batch_size=4, seed=0)


def test_source_pickles_without_tensorstore(store_path):
    import pickle
    src = pipeline.StoreSource(KDStore.open(store_path), np.array([3, 5]))
    assert src[1]["index"] == 5  # opens the store here
    copy = pickle.loads(pickle.dumps(src))
    assert copy._store is None and copy[0]["index"] == 3 and os.getpid() == copy._pid


# --- Per-step weights and curriculum difficulty from the traces ---------------------------------

ALPHA, BETA, STEP_W, ANSWER_W = 0.3, 0.7, 1.5, 2.5


def _weighted_rows(n):
    """tiny_kd's traces plus, per trace, one weight per reasoning step (neighbours differ) and a
    distinct pass rate (the generator's field)."""
    rows = tiny_kd.traces(n)
    for i, row in enumerate(rows):
        steps = len(row["reasoning"].split("\n\n"))
        row["step_weights"] = [0.5 + ((i + k) % 4) for k in range(steps)]
        row["pass_rate"] = ((7 * i) % n) / n
    return rows


@pytest.fixture(scope="module")
def weighted(tmp_path_factory):
    """A tokens-only store (no teacher run) of traces with step_weights and pass_rate."""
    root = tmp_path_factory.mktemp("kd_weighted")
    teacher, _ = tiny_kd.make(str(root), n_traces=N_SEQ)
    rows = _weighted_rows(N_SEQ)
    traces = root / "weighted.jsonl"
    traces.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = str(root / "store")
    kw = {"data.tokenizer": teacher, "data.traces": str(traces), "data.store": path, "data.top_k": 0,
          "loss.alpha": 0, "data.seq_len": 512, "data.curriculum.difficulty_field": "pass_rate",
          "precompute.chunk_tokens": 256, "run.output_dir": str(root)}
    run(load_config(None, [f"{k}={v}" for k, v in kw.items()]), show_progress=False)
    return path, rows


def test_store_holds_step_weights_and_difficulty(weighted, store_path):
    path, rows = weighted
    store = KDStore.open(path)
    assert store.has("step_weight") and store.has("difficulty") and len(store) == len(rows)
    np.testing.assert_allclose(store.difficulty, [1 - r["pass_rate"] for r in rows], rtol=1e-6)  # easy = low
    for i, row in enumerate(rows):
        seq = store.read(i)
        reasoning = seq["role"] == 1
        np.testing.assert_array_equal(seq["step_weight"][reasoning],
                                      np.float32(row["step_weights"])[seq["step"][reasoning]])
        assert (seq["step_weight"][~reasoning] == 1).all()
    assert store.meta.inputs["data.step_weights_field"] == "step_weights"
    old = KDStore.open(store_path)  # built without per-step weights: reads as all ones
    assert not old.has("step_weight") and old.difficulty is None
    assert "data.step_weights_field" not in old.meta.inputs and (old.read(0)["step_weight"] == 1).all()


def _coefficients_by_hand(batch, indices, rows):
    """a_t, b_t of every label of the packed batch, written out per token from the traces' weights:
    a_t = α/N + β·α·w_s/(n_s·W), w_s = loss.step_weight × the trace's weight of step s."""
    seg, role, step = batch["segment_ids"], batch["role"], batch["reasoning_step"]
    supervised = (seg > 0) & (role != 0)
    groups: dict[tuple, list] = {}
    for b, t in zip(*np.nonzero(supervised)):
        key = (b, seg[b, t], int(step[b, t])) if role[b, t] == 1 else (b, seg[b, t], "answer")
        groups.setdefault(key, []).append((b, t))
    weight = {key: ANSWER_W if key[2] == "answer" else STEP_W * rows[indices[key[:2]]]["step_weights"][key[2]]
              for key in groups}
    N, W = supervised.sum(), sum(weight.values())
    a, b_ = np.zeros(seg.shape), np.zeros(seg.shape)
    for key, members in groups.items():
        for r, t in members:
            a[r, t] = ALPHA / N + BETA * ALPHA * weight[key] / (len(members) * W)
            b_[r, t] = (1 - ALPHA) / N + BETA * (1 - ALPHA) * weight[key] / (len(members) * W)
    return a, b_


def test_step_weights_reach_the_loss_coefficients(weighted):
    """traces with step_weights -> store -> packed batch -> step.batch_weights: each token's a_t, b_t
    equal the hand computation from the trace file's weights."""
    import jax

    from kd_jax.base.schema import LossConfig
    from kd_jax.core import step

    path, rows = weighted
    store = KDStore.open(path)
    by_inputs = {store.read(i)["tokens"][:-1].tobytes(): i for i in range(len(store))}
    batch = next(pipeline.make_eval_iter(KDStore.open(path), np.arange(N_SEQ), CFG, batch_size=4))
    seg = batch["segment_ids"]
    indices = {(b, s): by_inputs[batch["inputs"][b, seg[b] == s].tobytes()]
               for b in range(4) for s in range(1, seg[b].max() + 1)}
    assert len(indices) > 4  # packed
    cfg = LossConfig(alpha=ALPHA, beta=BETA, step_weight=STEP_W, answer_weight=ANSWER_W)
    a, b_ = jax.jit(lambda x: step.batch_weights(x, cfg, step.batch_totals(x, cfg), BETA, ALPHA))(batch)
    want_a, want_b = _coefficients_by_hand(batch, indices, rows)
    np.testing.assert_allclose(a, want_a, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(b_, want_b, rtol=1e-5, atol=1e-9)
    # Without the batch's weights, the same batch weighs every step loss.step_weight: other numbers.
    plain = {k: v for k, v in batch.items() if k != "step_weight"}
    a1, _ = jax.jit(lambda x: step.batch_weights(x, cfg, step.batch_totals(x, cfg), BETA, ALPHA))(plain)
    assert not np.allclose(a1, want_a, rtol=1e-3)


def test_curriculum_by_pass_rate(weighted, store_path, split):
    """data.curriculum.difficulty_field=pass_rate: the first stage is the highest pass rates, so the
    first batch packs only those; stages come in order of pass rate, each shuffled within."""
    path, rows = weighted
    train, _ = split
    pass_rate = np.array([r["pass_rate"] for r in rows])
    ranked = train[np.argsort(-pass_rate[train], kind="stable")]  # easiest (highest pass rate) first
    cfg = dataclasses.replace(CFG, curriculum=dataclasses.replace(CFG.curriculum, fraction=1.0, difficulty_field='pass_rate', stages=3))
    ds = pipeline.train_examples(KDStore.open(path), train, cfg, global_batch_size=4, seed=0, steps=3)  # 12 examples
    head = [ds[j]["index"] for j in range(12)]
    for s in range(3):
        assert set(head[4 * s:4 * s + 4]) == set(ranked[4 * s:4 * s + 4])
    one = dataclasses.replace(cfg, curriculum=dataclasses.replace(cfg.curriculum, stages=1))
    it = pipeline.make_train_iter(KDStore.open(path), train, one, global_batch_size=4, seed=0, steps=3)
    first = next(it)
    store = KDStore.open(path)
    by_inputs = {store.read(i)["tokens"][:-1].tobytes(): i for i in range(len(store))}
    seg = first["segment_ids"]
    packed = {by_inputs[first["inputs"][b, seg[b] == s].tobytes()] for b in range(4) for s in range(1, seg[b].max() + 1)}
    assert len(packed) >= 4 and packed <= set(ranked[:12])
    # The easiest sequences first: pass rates of the first batch are all above those left out of the head.
    assert pass_rate[list(packed)].min() >= pass_rate[ranked[12:]].max()
    with pytest.raises(StoreError, match=r"curriculum\.difficulty_field"):  # a store without difficulties
        pipeline.train_examples(KDStore.open(store_path), train, cfg, global_batch_size=4, seed=0, steps=3)
    with pytest.raises(StoreError, match="easy = high"):  # the other direction than the store's
        pipeline.train_examples(KDStore.open(path), train, dataclasses.replace(cfg, curriculum=dataclasses.replace(cfg.curriculum, easy='low')), global_batch_size=4,
                                seed=0, steps=3)
