"""precompute.import_logprobs: a served teacher's prompt log-probs (vLLM's format, written here by
a transformers teacher through launch/vllm_prompt_logprobs.py's own serializer) imported into a KD
store equal to the one precompute computes; resumable and split by process like precompute; a
changed tokenization, too few log-probs per position or another file refused."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import py_compile
import shutil
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiny_kd
import torch
import transformers

from kd_jax.base.loader import load_config
from kd_jax.core.precompute import open_or_tokenize, precompute, run_import
from kd_jax.data.served import ServedLogprobs
from kd_jax.data.store import KDStore, StoreError
from kd_jax.fit import dryrun

K, PAD = 8, 16  # data.top_k; the tiny teacher's vocabulary is padded 16 rows past its tokenizer's
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "vllm_prompt_logprobs.py")
ARRAYS = ("tokens", "role", "step", "offsets", "topk_ids", "topk_logprobs")


def _launch():
    spec = importlib.util.spec_from_file_location("vllm_prompt_logprobs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launch = _launch()


def config(root, store, served=None, **extra):
    kw = {"teacher.hf_path": f"{root}/teacher", "teacher.param_dtype": "float32", "teacher.dtype": "float32",
          "data.traces": f"{root}/traces.jsonl", "data.store": f"{root}/{store}", "data.top_k": K,
          "data.seq_len": 512, "precompute.chunk_tokens": 64, "precompute.window_chunks": 2,
          "precompute.bucket": 256, "precompute.batch_tokens": 2048, "mesh.data": -1, "run.output_dir": str(root),
          "precompute.import_logprobs": served or "null", **extra}
    return load_config(None, [f"{k}={v}" for k, v in kw.items()])


def write_served(path, seqs, logps, top, *, edit=None):
    """What vLLM returns for prompt_logprobs=top, as the launch script writes it: per position t >= 1,
    the `top` most likely ids over the full (padded) vocabulary plus the actual token t if not among
    them, as Logprob-like objects; `edit(index, ids, entries)` alters a row first."""
    with open(path, "w") as f:
        for index, (ids, logp) in enumerate(zip(seqs, logps)):
            entries = [None]
            for t in range(1, len(ids)):
                best = [int(i) for i in np.argsort(-logp[t - 1], kind="stable")[:top]]
                if ids[t] not in best:
                    best.append(ids[t])
                entries.append({i: types.SimpleNamespace(logprob=float(logp[t - 1, i])) for i in best})
            ids = list(ids)
            if edit is not None:
                edit(index, ids, entries)
            f.write(launch.served_row(index, ids, entries))
    return str(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny teacher, precompute's store from kd_jax's forward pass, and served files from the
    transformers forward pass of the same teacher on kd_jax's token ids."""
    root = tmp_path_factory.mktemp("served")
    teacher, _ = tiny_kd.make(str(root))
    precompute(config(root, "reference"), show_progress=False)
    seqs = launch.sequences(config(root, "unused"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        logps = [torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1).numpy() for ids in seqs]
    files = {"full": write_served(root / "served.jsonl", seqs, logps, K + PAD),  # --extra 16: K real ids always
             "k1": write_served(root / "served_k1.jsonl", seqs, logps, K)}  # plain prompt_logprobs=K
    imported = config(root, "imported", files["full"])
    precompute(imported, show_progress=False)
    return types.SimpleNamespace(root=root, teacher=teacher, seqs=seqs, logps=logps, files=files,
                                 tokenizer=transformers.AutoTokenizer.from_pretrained(teacher))


def arrays(path):
    store = KDStore.open(str(path))
    return {n: store.array(n).read().result() for n in ARRAYS}


def test_imported_store_equals_precompute(built):
    want, got = arrays(built.root / "reference"), arrays(built.root / "imported")
    for name in ("tokens", "role", "step", "offsets"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    store = KDStore.open(str(built.root / "imported"))
    reference = KDStore.open(str(built.root / "reference"))
    V = len(built.tokenizer)
    assert store.meta.teacher == f"imported:{built.files['full']}" and store.meta.teacher_revision.startswith("sha256:")
    assert (store.meta.vocab_size, store.meta.teacher_vocab_size) == (V, V + PAD)
    assert (store.meta.vocab_size, store.meta.teacher_vocab_size) == (reference.meta.vocab_size,
                                                                      reference.meta.teacher_vocab_size)
    # the store trains: training opens it with check (K, tokenizer, vocab, completeness) and reads it
    assert len(store.check(k=K, tokenizer=built.tokenizer, vocab_size=V)) == len(store) == 12
    for i, logp in enumerate(built.logps):
        seq, ref = store.read(i), reference.read(i)
        assert (seq["topk_ids"][0] == -1).all() and (seq["topk_logprobs"][0] == 0).all()  # "no teacher" row
        np.testing.assert_array_equal(seq["topk_ids"][0], ref["topk_ids"][0])
        # ids equal wherever the teacher's neighbouring log-probs differ by > 1e-4 (near-ties may swap)
        sorted_ref = -np.sort(-logp[:len(seq["tokens"]) - 1, :V], axis=1)
        gaps = np.abs(np.diff(sorted_ref[:, :K + 1], axis=1))
        clear = np.concatenate([gaps[:, :1] > 1e-4, (gaps[:, 1:] > 1e-4) & (gaps[:, :-1] > 1e-4)], axis=1)
        ids, ref_ids = seq["topk_ids"][1:], ref["topk_ids"][1:]
        assert clear.mean() > 0.9 and (ids[clear] == ref_ids[clear]).all()
        assert ids.max() < V
        # log-probs equal to fp16 rounding: at most one fp16 step apart
        a, b = seq["topk_logprobs"][1:], ref["topk_logprobs"][1:]
        step = np.spacing(np.abs(b)).astype(np.float32)
        assert (np.abs(a.astype(np.float32) - b.astype(np.float32)) <= step)[clear].all()


def test_padded_ids_dropped_rows_kept_as_served(built, tmp_path, caplog):
    """prompt_logprobs=K over a padded vocabulary: padding ids among a position's top K are dropped
    (as precompute drops them); those positions keep what was served (the actual token, then id -1,
    which the loss ignores) and are counted once; every other row is the exact one."""
    with caplog.at_level(logging.WARNING, logger="kd_jax.core.precompute"):
        precompute(config(built.root, "unused", built.files["k1"], **{"data.store": str(tmp_path / "store")}),
                   show_progress=False)
    got, full = arrays(tmp_path / "store"), arrays(built.root / "imported")
    V = len(built.tokenizer)
    inexact = np.zeros(len(got["tokens"]), bool)
    for start, logp in zip(full["offsets"], built.logps):  # row t: a padding id in the teacher's top K at t - 1
        top = np.argsort(-logp[:-1], axis=1, kind="stable")[:, :K]
        inexact[start + 1:start + len(logp)] = (top >= V).any(axis=1)
    assert inexact.any() and f"{int(inexact.sum())} positions had fewer than {K} ids" in caplog.text
    np.testing.assert_array_equal(got["topk_ids"][~inexact], full["topk_ids"][~inexact])
    np.testing.assert_array_equal(got["topk_logprobs"][~inexact], full["topk_logprobs"][~inexact])
    assert (got["topk_ids"][inexact] < V).all() and (got["topk_ids"][inexact] == -1).any()


def test_two_processes_then_resume_equal_one_pass(built, tmp_path):
    """Process 1 of 2 writes its chunks (process 0 'killed'); the one-process command then fills only
    the rest: the store is the one-pass import, bit for bit."""
    cfg = config(built.root, "unused", built.files["full"], **{"data.store": str(tmp_path / "store")})
    store = open_or_tokenize(cfg, built.tokenizer, len(built.tokenizer) + PAD)
    run_import(store, ServedLogprobs(built.files["full"]), built.tokenizer, cfg.precompute, process=1, processes=2,
               show_progress=False)
    done = store.done_chunks()
    assert done.any() and not done.all() and not done[0]
    precompute(cfg, show_progress=False)
    want, got = arrays(built.root / "imported"), arrays(tmp_path / "store")
    for name in ARRAYS:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_parquet_folder_equals_jsonl(built, tmp_path):
    rows = [json.loads(line) for line in open(built.files["full"])]
    folder = tmp_path / "parquet"
    folder.mkdir()
    entry = pa.map_(pa.int64(), pa.float64())
    schema = pa.schema([("index", pa.int64()), ("prompt_token_ids", pa.list_(pa.int64())),
                        ("prompt_logprobs", pa.list_(entry))])
    for part, chunk in enumerate((rows[:5], rows[5:])):  # two files, read in name order
        table = pa.table({"index": [r["index"] for r in chunk],
                          "prompt_token_ids": [r["prompt_token_ids"] for r in chunk],
                          "prompt_logprobs": [[None if e is None else [(int(i), v) for i, v in e.items()]
                                               for e in r["prompt_logprobs"]] for r in chunk]}, schema=schema)
        pq.write_table(table, folder / f"part-{part:05d}.parquet", row_group_size=2)
    precompute(config(built.root, "unused", str(folder), **{"data.store": str(tmp_path / "store")}),
               show_progress=False)
    want, got = arrays(built.root / "imported"), arrays(tmp_path / "store")
    for name in ARRAYS:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _refused(built, tmp_path, served, match, store=None):
    """The error precompute stops with, importing `served` into `store` (default: a new one)."""
    store = store or str(tmp_path / ("store_" + os.path.basename(served)))
    cfg = config(built.root, "unused", str(served), **{"data.store": store})
    with pytest.raises(StoreError, match=match) as error:
        precompute(cfg, show_progress=False)
    return str(error.value)


def test_changed_tokenization_refused_at_its_first_position(built, tmp_path):
    other = (built.seqs[3][10] + 1) % len(built.tokenizer)

    def edit(index, ids, entries):
        if index == 3:
            ids[10] = other  # e.g. the server's own chat template rendered the prompt differently
    served = write_served(tmp_path / "served.jsonl", built.seqs, built.logps, K, edit=edit)
    message = _refused(built, tmp_path, served, "sequence 3 ")
    decode = built.tokenizer.decode
    assert "position 10:" in message and f"served {other} {decode([other])!r}" in message
    assert f"kd_jax {built.seqs[3][10]} {decode([built.seqs[3][10]])!r}" in message
    assert "TokensPrompt" in message and "\n" not in message

    def bos(index, ids, entries):  # a BOS the server added: one token more, from position 0 on
        if index == 0:
            ids.insert(0, built.seqs[0][0] + 1)
            entries.insert(0, None)
    served = write_served(tmp_path / "bos.jsonl", built.seqs, built.logps, K, edit=bos)
    assert "position 0:" in _refused(built, tmp_path, served, "sequence 0 ")


def test_too_few_logprobs_per_position_refused(built, tmp_path):
    served = write_served(tmp_path / "served.jsonl", built.seqs, built.logps, K - 1)
    message = _refused(built, tmp_path, served, "fewer than data.top_k=8")
    assert "holds 7 log-probs" in message and "top-7" in message and "position " in message


def test_rows_out_of_order_or_missing_refused(built, tmp_path):
    lines = open(built.files["full"]).readlines()
    (tmp_path / "missing.jsonl").write_text("".join(lines[:-1]))
    _refused(built, tmp_path, tmp_path / "missing.jsonl", "holds 11 rows, the traces give 12 sequences")
    (tmp_path / "swapped.jsonl").write_text("".join([lines[1], lines[0]] + lines[2:]))
    _refused(built, tmp_path, tmp_path / "swapped.jsonl", "index 1 where sequence 0 was expected")


def test_rerun_with_another_file_refused(built, tmp_path):
    path = str(tmp_path / "store")
    shutil.copytree(built.root / "imported", path)
    precompute(config(built.root, "unused", built.files["full"], **{"data.store": path}), show_progress=False)
    message = _refused(built, tmp_path, built.files["k1"], "built from other inputs", store=path)
    assert "teacher imported:" in message and "served_k1.jsonl" in message
    with pytest.raises(StoreError, match="built from other inputs"):  # nor is the teacher run into it
        precompute(config(built.root, "unused", None, **{"data.store": path}), show_progress=False)


def test_dry_run_and_config_checks(built):
    out = io.StringIO()
    summary = dryrun.report(config(built.root, "unused", built.files["full"]), "precompute", out=out)
    assert summary["imported"] and summary["fits"] and "no teacher pass" in out.getvalue()
    cfg = config(built.root, "unused", built.files["full"], **{"data.top_k": 0, "loss.alpha": 0})
    with pytest.raises(StoreError, match="tokens-only store has no teacher rows to import"):
        precompute(cfg, show_progress=False)
    with pytest.raises(StoreError, match="does not exist"):
        precompute(config(built.root, "unused", str(built.root / "nothing.jsonl")), show_progress=False)


def test_launch_script(tmp_path):
    py_compile.compile(SCRIPT, doraise=True)
    assert os.access(SCRIPT, os.X_OK)
    out = tmp_path / "out.jsonl"
    out.write_text('{"index": 0}\n{"index": 1}\n{"ind')  # killed mid-line: resumes after the last whole one
    assert launch.rows_written(str(out)) == 2 and out.read_text().endswith("}\n")
    assert launch.rows_written(str(tmp_path / "none.jsonl")) == 0


def _corrupted(built, tmp_path, name, index, t, change):
    """A served file whose row `index` has map t changed by `change(entry) -> entry`; the refusal
    (one line naming the file, its line index + 1 and position t) and that the chunk holding that
    position was not written as complete."""
    def edit(i, ids, entries):
        if i == index:
            entries[t] = change(dict(entries[t]))
    served = write_served(tmp_path / f"{name}.jsonl", built.seqs, built.logps, K + PAD, edit=edit)
    store = str(tmp_path / f"store_{name}")
    message = _refused(built, tmp_path, served, f"position {t}:", store=store)
    assert message.startswith(f"{served}:{index + 1}: position {t}: ") and "\n" not in message, message
    opened = KDStore.open(store)
    chunk = (int(opened.offsets[index]) + t) // opened.meta.chunk_tokens
    assert not opened.done_chunks()[chunk] and not opened.describe()["complete"]
    return message


def _best(entry):
    return max(entry, key=lambda i: entry[i].logprob)


def test_probabilities_instead_of_logprobs_refused(built, tmp_path):
    """exp(log-prob) stored as they are read 3.24 instead of 0.50 in the soft loss: refused."""
    message = _corrupted(built, tmp_path, "probs", 3, 1, lambda e: {i: float(np.exp(v.logprob)) for i, v in e.items()})
    assert "above 0" in message and "probabilities" in message
    # log-probs <= 0 whose probabilities add up past 1 (not one distribution) are refused too
    message = _corrupted(built, tmp_path, "mass", 4, 2, lambda e: {i: float(np.log(0.5)) for i in e})
    assert "sum to " in message and "above 1" in message


def test_nan_logprob_refused(built, tmp_path):
    """A NaN top-1 was dropped (the teacher's best id lost) under the padded-vocabulary warning: refused."""
    def change(entry):
        entry[_best(entry)] = float("nan")
        return entry
    message = _corrupted(built, tmp_path, "nan", 5, 7, change)
    assert "nan" in message.lower() and "finite" in message


def test_out_of_vocab_id_refused(built, tmp_path):
    """An id past the teacher's (padded) vocabulary was dropped as padding: refused, naming it; ids
    in the padded range alone are dropped (test_padded_ids_dropped_rows_kept_as_served)."""
    far = 10 ** 6

    def change(entry):
        entry[far] = entry.pop(_best(entry))
        return entry
    message = _corrupted(built, tmp_path, "oov", 2, 4, change)
    assert f"id {far}" in message and f"[0, {len(built.tokenizer) + PAD})" in message


def test_refused_import_closes_its_progress_bar(built, tmp_path, monkeypatch):
    """The error is printed on a line of its own: the bar is closed before the exception leaves run_import."""
    from kd_jax.core import precompute as module
    bars = []
    monkeypatch.setattr(tiny_kd.RecordingBar, "made", bars)
    monkeypatch.setattr(module, "progress_bar", tiny_kd.RecordingBar)

    served = write_served(tmp_path / "bar.jsonl", built.seqs, built.logps, K - 1)
    _refused(built, tmp_path, served, "fewer than data.top_k")
    assert len(bars) == 1 and bars[0].closed
