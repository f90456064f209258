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

from kd_jax.core.config import DataConfig, load_config
from kd_jax.core.teacher import precompute as run
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
                                             "reasoning_step", "loss_mask")}, "topk_ids": (B, L, K), "topk_logprobs": (B, L, K)}
    assert batch["topk_logprobs"].dtype == np.float32 and batch["loss_mask"].dtype == bool
    assert all(batch[k].dtype == np.int32 for k in ("inputs", "labels", "positions", "segment_ids", "role",
                                                    "reasoning_step", "topk_ids"))
    seg = batch["segment_ids"]
    pad = seg == 0
    for name, value in dict(inputs=0, labels=0, positions=0, role=0, reasoning_step=-1, loss_mask=False).items():
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
    it = pipeline.make_train_iter(store_path, train, cfg, global_batch_size=4, seed=0)
    found = [i for batch in take(it, 6) for i in check_batch(batch, ref, set(train), B=4)]
    assert len(found) > 6 * 4  # rows hold several sequences: packing happened
    assert set(found) == set(train)  # 6 batches run past one epoch


def test_resume_is_exact_and_seed_matters(store_path, ref, split, tmp_path):
    from etils import epath
    from grain.checkpoint import CheckpointHandler, CheckpointRestore, CheckpointSave

    train, _ = split
    it = pipeline.make_train_iter(store_path, train, CFG, global_batch_size=4, seed=7)
    first = take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # the state is JSON, as grain.checkpoint writes it
    CheckpointHandler().save(epath.Path(tmp_path), args=CheckpointSave(it))  # what Orbax calls
    after = take(it, 3)
    again = pipeline.make_train_iter(store_path, train, CFG, global_batch_size=4, seed=7)
    assert_same(take(again, 5), first)
    fresh = pipeline.make_train_iter(store_path, train, CFG, global_batch_size=4, seed=7)
    fresh.set_state(state)
    assert_same(take(fresh, 3), after)
    restored = pipeline.make_train_iter(store_path, train, CFG, global_batch_size=4, seed=7)
    CheckpointHandler().restore(epath.Path(tmp_path), args=CheckpointRestore(restored))
    assert_same(take(restored, 3), after)
    other = pipeline.make_train_iter(store_path, train, CFG, global_batch_size=4, seed=8)
    assert not np.array_equal(next(other)["inputs"], first[0]["inputs"])


def test_process_shards_are_disjoint_and_cover_an_epoch(store_path, ref, split):
    train, _ = split
    n = len(train)
    kw = dict(global_batch_size=4, seed=1, process_count=2)
    streams = [pipeline.train_examples(store_path, train, CFG, process_index=p, **kw) for p in (0, 1)]
    shards = [[streams[p][j]["index"] for j in range((n + 1 - p) // 2)] for p in (0, 1)]
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == sorted(train)
    # One global stream: process p's j-th example is the single-process stream's (2j + p)-th.
    single = pipeline.train_examples(store_path, train, CFG, global_batch_size=4, seed=1)
    assert shards[0][:4] == [single[2 * j]["index"] for j in range(4)]
    it = pipeline.make_train_iter(store_path, train, CFG, process_index=1, **kw)
    check_batch(next(it), ref, set(train), B=2)  # process-local batch
    with pytest.raises(ValueError, match="multiple of the 2 processes"):
        pipeline.make_train_iter(store_path, train, CFG, global_batch_size=5, seed=1, process_count=2)


def test_eval_is_one_deterministic_padded_pass(store_path, ref, split):
    _, ev = split
    batches = list(pipeline.make_eval_iter(store_path, ev, CFG, batch_size=8))
    found = [i for batch in batches for i in check_batch(batch, ref, set(ev), B=8)]
    assert sorted(found) == sorted(ev)  # each eval sequence exactly once
    assert (batches[-1]["segment_ids"].max(axis=1) == 0).any()  # 6 sequences in 8 rows: empty rows added
    assert_same(list(pipeline.make_eval_iter(store_path, ev, CFG, batch_size=8)), batches)
    everything = list(pipeline.make_eval_iter(store_path, np.arange(N_SEQ), CFG, batch_size=3))
    assert sorted(i for b in everything for i in check_batch(b, ref, set(range(N_SEQ)), B=3)) == list(range(N_SEQ))


def test_worker_processes(store_path, ref, split):
    """Grain's mp_prefetch gives each worker a slice of the example stream and packs it there, so
    batches with workers differ from num_workers=0 (Grain documents this) but are deterministic
    and resume exactly."""
    train, _ = split
    cfg = dataclasses.replace(CFG, num_workers=2)
    it = pipeline.make_train_iter(store_path, train, cfg, global_batch_size=4, seed=2)
    first = take(it, 3)
    for batch in first:
        check_batch(batch, ref, set(train), B=4)
    state = it.get_state()
    after = take(it, 2)
    it.close()
    fresh = pipeline.make_train_iter(store_path, train, cfg, global_batch_size=4, seed=2)
    fresh.set_state(json.loads(json.dumps(state)))
    assert_same(take(fresh, 2), after)
    fresh.close()


def test_curriculum_starts_easiest_first(store_path, ref, split):
    train, _ = split
    seqs, _ = ref
    reasoning = np.array([(s["role"] == 1).sum() for s in seqs])
    np.testing.assert_array_equal(pipeline.reasoning_lengths(KDStore.open(store_path)), reasoning)
    cfg = dataclasses.replace(CFG, curriculum_fraction=0.5)
    ds = pipeline.train_examples(store_path, train, cfg, global_batch_size=4, seed=0, steps=4)  # 8 easy first
    head = [ds[j]["index"] for j in range(8)]
    assert list(reasoning[head]) == sorted(reasoning[train])[:8]
    assert sorted(ds[j]["index"] for j in range(8, 8 + len(train))) == sorted(train)  # then whole epochs
    custom = pipeline.train_examples(store_path, train, cfg, global_batch_size=4, seed=0, steps=4,
                                     difficulty=-reasoning)  # hardest first
    assert reasoning[custom[0]["index"]] == reasoning[train].max()


def test_overlong_sequence_fails_clearly(store_path, split):
    train, _ = split
    with pytest.raises(StoreError, match="data.seq_len"):
        pipeline.make_train_iter(store_path, train, DataConfig(seq_len=64), global_batch_size=4, seed=0)


def test_source_pickles_without_tensorstore(store_path):
    import pickle
    src = pipeline.StoreSource(store_path, np.array([3, 5]))
    assert src[1]["index"] == 5  # opens the store here
    copy = pickle.loads(pickle.dumps(src))
    assert copy._store is None and copy[0]["index"] == 3 and os.getpid() == copy._pid
