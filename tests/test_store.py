"""Nothing lost, nothing silent in the KD store: per-chunk checksums verified on read (missing,
altered and undecodable chunk files), store identity (tokenizer and input fingerprints; precompute
never reuses a store built from other inputs), the incomplete-store message, version-1 stores."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
import tiny_kd
import transformers

from kd_jax.base.loader import load_config
from kd_jax.base.schema import DataConfig
from kd_jax.core.precompute import precompute
from kd_jax.data import pipeline
from kd_jax.data.store import KDStore, StoreError, StoreMeta
from kd_jax.demo.arithmetic import train_tokenizer

C = 64  # chunk_tokens


def overrides(root, **extra):
    kw = {"teacher.hf_path": f"{root}/teacher", "teacher.param_dtype": "float32", "teacher.dtype": "float32",
          "data.traces": f"{root}/traces.jsonl", "data.store": f"{root}/store", "data.top_k": 4,
          "data.seq_len": 512, "precompute.chunk_tokens": C, "precompute.window_chunks": 4,
          "precompute.bucket": 16, "precompute.batch_tokens": 512, "mesh.data": -1, "run.output_dir": str(root),
          **extra}
    return load_config(None, [f"{k}={v}" for k, v in kw.items()])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    tiny_kd.make(str(root), n_traces=8)
    precompute(overrides(root), show_progress=False)
    return root


@pytest.fixture
def copy(built, tmp_path):
    """A private copy of the built store (a new path: nothing of it verified in this process yet)."""
    path = str(tmp_path / "store")
    shutil.copytree(built / "store", path)
    return path


def read_all(path):
    store = KDStore.open(path)
    return [store.read(i) for i in range(len(store))]


def test_store_has_checksums_fingerprints_and_no_done_array(built):
    store = KDStore.open(str(built / "store"))
    assert store.meta.version == 2 and store.verified and len(store.meta.tokenizer_fingerprint) == 64
    assert store.meta.inputs["data.seq_len"] == 512 and len(store.meta.inputs["traces"]) == 64
    assert not os.path.exists(built / "store" / "done")
    marks = sorted(os.listdir(built / "store" / "progress"))
    assert len(marks) == store.meta.num_chunks
    assert set(json.loads((built / "store" / "progress" / marks[0]).read_text())) == {"topk_ids", "topk_logprobs"}
    assert len(read_all(str(built / "store"))) == 8


def chunk_of(path, sequence):
    offsets = KDStore.open(path).offsets
    return int(offsets[sequence]) // C


def test_missing_chunk_file_names_array_chunk_and_sequences(copy):
    chunk = chunk_of(copy, 3)
    os.remove(os.path.join(copy, "topk_ids", "c", str(chunk), "0"))  # read back as the fill value -1
    with pytest.raises(StoreError) as error:
        read_all(copy)
    message = str(error.value)
    assert f"array 'topk_ids' chunk {chunk} " in message and "sequences " in message and "\n" not in message
    assert f"progress/{chunk:09d}" in message and "re-run precompute" in message


def test_missing_token_chunk_says_rebuild(copy):
    os.remove(os.path.join(copy, "tokens", "c", "1"))
    with pytest.raises(StoreError, match=r"array 'tokens' chunk 1 \(tokens 64\.\.127, sequences .*rebuild the store"):
        read_all(copy)


def test_altered_chunk_bytes_fail_checksum(copy):
    store = KDStore.open(copy)
    row = int(store.offsets[5]) + 2
    values = store.array("topk_logprobs")[row].read().result()
    store.array("topk_logprobs")[row].write(values - 1).result()  # validly encoded, different values
    with pytest.raises(StoreError, match=rf"'topk_logprobs' chunk {row // C} .*does not match its checksum"):
        read_all(copy)


def test_corrupt_blosc_chunk_is_a_store_error(copy):
    chunk_file = os.path.join(copy, "topk_logprobs", "c", "2", "0")
    with open(chunk_file, "r+b") as f:
        f.seek(20)
        f.write(b"\xde\xad\xbe\xef" * 8)
    with pytest.raises(StoreError, match=r"'topk_logprobs' chunk 2 .*cannot be decoded"):
        read_all(copy)


def test_pipeline_reads_are_verified(copy):
    os.remove(os.path.join(copy, "step", "c", "0"))
    store = KDStore.open(copy)
    it = pipeline.make_eval_iter(KDStore.open(copy), np.arange(len(store)), DataConfig(seq_len=512), batch_size=2)
    with pytest.raises(StoreError, match="array 'step' chunk 0"):
        next(it)


def test_incomplete_store_names_allow_incomplete(copy):
    os.remove(os.path.join(copy, "progress", f"{1:09d}"))
    store = KDStore.open(copy)
    with pytest.raises(StoreError, match="data.allow_incomplete=true"):
        store.check()
    usable = store.check(allow_incomplete=True)
    assert 0 < len(usable) < len(store)
    with pytest.raises(StoreError, match="has no completion mark"):  # a read past check() is refused too
        read_all(copy)


def test_check_compares_the_tokenizer_fingerprint(built):
    store = KDStore.open(str(built / "store"))
    stored = transformers.AutoTokenizer.from_pretrained(built / "teacher")
    store.check(tokenizer=stored)
    other = train_tokenizer(["some other corpus entirely, with other merges"] * 4, vocab_size=300)
    other.chat_template = stored.chat_template  # same template: only the vocab/merges differ
    with pytest.raises(StoreError) as error:
        store.check(tokenizer=other)
    assert repr(store.meta.tokenizer) in str(error.value) and "data.tokenizer" in str(error.value)


def test_rerun_same_config_resumes(built):
    before = (built / "store" / "kd_store.json").read_text()
    summary = precompute(overrides(built), show_progress=False)
    assert summary["complete"] and (built / "store" / "kd_store.json").read_text() == before


def test_rerun_with_other_seq_len_names_the_change(built):
    before = (built / "store" / "kd_store.json").read_text()
    with pytest.raises(StoreError) as error:
        precompute(overrides(built, **{"data.seq_len": 256}), show_progress=False)
    message = str(error.value)
    assert "data.seq_len 512 -> 256" in message and "data.store" in message and "delete" in message
    assert (built / "store" / "kd_store.json").read_text() == before  # neither reused nor deleted


def test_rerun_with_changed_traces_names_the_change(built, tmp_path):
    traces = tmp_path / "traces.jsonl"
    lines = (built / "traces.jsonl").read_text().splitlines()
    traces.write_text("\n".join(lines[:-1] + [lines[-1].replace("The answer", "So the answer")]) + "\n")
    with pytest.raises(StoreError, match=r"traces changed.*data\.store"):
        precompute(overrides(built, **{"data.traces": traces}), show_progress=False)
    assert KDStore.open(str(built / "store")).describe()["complete"]


def test_version_1_store_opens_and_reads(built, copy, caplog):
    """A store written before checksums and fingerprints: its kd_store.json fields, empty progress
    marks, no checksums.json. It opens, checks and feeds the pipeline, unverified, with one warning."""
    meta = json.loads(open(os.path.join(copy, "kd_store.json")).read())
    del meta["tokenizer_fingerprint"], meta["inputs"]
    meta["version"], meta["alignment"] = 1, "target"  # a field every store had before it was dropped
    with open(os.path.join(copy, "kd_store.json"), "w") as f:
        json.dump(meta, f)
    os.remove(os.path.join(copy, "checksums.json"))
    for mark in os.listdir(os.path.join(copy, "progress")):
        open(os.path.join(copy, "progress", mark), "wb").close()
    want = read_all(copy)
    os.remove(os.path.join(copy, "step", "c", "0"))  # not detected: v1 has no checksums
    with caplog.at_level(logging.WARNING, logger="kd_jax.store"):
        store = KDStore.open(copy)
        KDStore.open(copy)
    warnings = [r for r in caplog.records if "version 1" in r.getMessage()]
    assert len(warnings) == 1 and "rebuilding" in warnings[0].getMessage()
    assert not store.verified and store.meta.version == 1
    other = train_tokenizer(["some other corpus entirely, with other merges"] * 4, vocab_size=300)
    other.chat_template = transformers.AutoTokenizer.from_pretrained(built / "teacher").chat_template
    assert len(store.check(k=4, tokenizer=other)) == len(store)  # no fingerprint recorded: not compared
    np.testing.assert_array_equal(store.read(0)["tokens"], want[0]["tokens"])
    assert (store.read(0)["step_weight"] == 1).all() and store.difficulty is None  # no optional arrays
    it = pipeline.make_eval_iter(KDStore.open(copy), store.check(), DataConfig(seq_len=512), batch_size=2)
    assert next(it)["inputs"].shape == (2, 512)


def test_optional_arrays_are_verified(tmp_path):
    """step_weight [N_tok] and difficulty [N_seq]: written only when given, checksummed like the
    token arrays, and an altered one fails its read; a store without them reads 1 and None."""
    lengths = np.array([5, 7, 4])
    n = int(lengths.sum())
    meta = StoreMeta(k=0, vocab_size=50, teacher_vocab_size=50, tokenizer="t", chat_template_hash="", teacher="none",
                     teacher_revision=None, logprob_dtype="float16", num_sequences=3, num_tokens=n, chunk_tokens=4)
    arrays = (np.arange(n, dtype=np.int32), np.ones(n, np.uint8), np.zeros(n, np.int32),
              np.concatenate([[0], np.cumsum(lengths)]))
    weights = np.linspace(0.5, 2.0, n).astype(np.float32)
    for name in ("weighted", "altered"):
        KDStore.create(str(tmp_path / name), meta, *arrays, step_weight=weights,
                       difficulty=np.float32([0.5, 0.1, 0.9]))
    store = KDStore.open(str(tmp_path / "weighted"))
    assert store.has("step_weight") and store.has("difficulty")
    np.testing.assert_array_equal(np.concatenate([store.read(i)["step_weight"] for i in range(3)]), weights)
    np.testing.assert_array_equal(store.difficulty, np.float32([0.5, 0.1, 0.9]))
    path = str(tmp_path / "altered")  # not read yet in this process: its chunks are checked on first read
    store = KDStore.open(path)
    store.array("step_weight")[6].write(np.float32(9)).result()  # validly encoded, another value
    with pytest.raises(StoreError, match="'step_weight' chunk 1 .*does not match its checksum"):
        store.read(1)
    store.array("difficulty")[0].write(np.float32(0)).result()
    with pytest.raises(StoreError, match="'difficulty' does not match its checksum"):
        KDStore.open(path).difficulty
    plain = KDStore.create(str(tmp_path / "plain"), meta, *arrays)
    assert not plain.has("step_weight") and plain.difficulty is None
    assert (plain.read(1)["step_weight"] == 1).all() and plain.read(1)["step_weight"].dtype == np.float32
    with pytest.raises(StoreError, match="difficulty has 2 entries"):
        KDStore.create(str(tmp_path / "bad"), meta, *arrays, difficulty=np.float32([0, 1]))


def test_rerun_with_a_step_scorer_names_the_change(built):
    with pytest.raises(StoreError, match=r"data\.step_scorer None -> 'tiny_kd:step_length@[0-9a-f]{12}'"):
        precompute(overrides(built, **{"data.steps.scorer": "tiny_kd:step_length"}), show_progress=False)
    assert KDStore.open(str(built / "store")).describe()["complete"]


def _tokens_only(path: str, **fields) -> KDStore:
    """A tokens-only store (K = 0) of one sequence of 6 tokens at `path`; `fields`: StoreMeta fields."""
    n = 6
    meta = StoreMeta(**{"k": 0, "vocab_size": 50, "teacher_vocab_size": 50, "tokenizer": "t", "chat_template_hash": "",
                        "teacher": "none", "teacher_revision": None, "logprob_dtype": "float16", "num_sequences": 1,
                        "num_tokens": n, "chunk_tokens": 4, **fields})
    return KDStore.create(path, meta, np.arange(n, dtype=np.int32), np.ones(n, np.uint8), np.zeros(n, np.int32),
                          np.array([0, n]))


def test_a_tokens_only_store_refuses_an_alpha_scheduled_to_rise(tmp_path):
    """"Is the soft loss on" has one definition (LossConfig.soft): alpha 0 at the start but scheduled to end
    above 0 needs teacher log-probs, so a tokens-only store (K = 0) is refused before any step."""
    store = _tokens_only(str(tmp_path / "tokens"))
    rising = load_config(None, ["loss.alpha=0", "loss.alpha_schedule.kind=linear", "loss.alpha_schedule.end=0.5"])
    assert rising.loss.soft
    with pytest.raises(StoreError, match=r"loss.alpha=0.0 scheduled to 0.5 has no soft targets"):
        store.check_targets(rising)
    store.check_targets(load_config(None, ["loss.alpha=0"]))  # hard labels only
    store.check_targets(load_config(None, ["teacher.mode=online", "teacher.hf_path=t"]))  # the teacher in the step


def test_a_store_written_with_the_retired_alignment_field_opens(tmp_path):
    """kd_store.json of stores written before StoreMeta.alignment was dropped holds "alignment": they open."""
    path = str(tmp_path / "old")
    _tokens_only(path)
    with open(os.path.join(path, "kd_store.json")) as f:
        fields = json.load(f)
    assert "alignment" not in fields
    with open(os.path.join(path, "kd_store.json"), "w") as f:
        json.dump({**fields, "alignment": "target"}, f)
    store = KDStore.open(path)
    assert not hasattr(store.meta, "alignment") and len(store.check()) == 1


@pytest.mark.parametrize("url", ["s3://bucket/x", "http://host/x", "https://host/x", "ftp://host/x"])
def test_an_unsupported_store_url_is_refused_at_config_load(url):
    """TensorStore would wait forever on s3:// or http:// here; the config says which stores work instead."""
    from kd_jax.base.schema import ConfigError
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"data.store={url}"])
    message = str(err.value)
    assert message.startswith(f"data: store={url!r}") and "gs://" in message and "memory://" in message
    assert "\n" not in message
    for fine in ("runs/store", "/abs/store", "file:///tmp/store", "gs://bucket/store", "memory://store"):
        assert load_config(None, [f"data.store={fine}"]).data.store == fine


def test_an_unreachable_store_fails_in_bounded_time_naming_its_url(monkeypatch):
    """gs:// with no network (or no credentials) must not block: StoreError with the URL after the bound."""
    import time

    from kd_jax.data import store as store_module
    monkeypatch.setattr(store_module, "OPEN_TIMEOUT_S", 2.0)
    for call in (KDStore.exists, KDStore.open):
        start = time.monotonic()
        with pytest.raises(StoreError, match=r"KD store gs://kd-jax-unreachable-test/x/ did not answer within 2 s"):
            call("gs://kd-jax-unreachable-test/x")
        assert time.monotonic() - start < 30
