"""The KD store and `python -m kd_jax.precompute`: teacher top-K equal to transformers', exact
resumption after SIGKILL, and two processes writing the one-process store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tiny_kd
import torch
import transformers

from kd_jax.base.loader import load_config
from kd_jax.core.precompute import precompute as run
from kd_jax.data.store import KDStore, StoreError

K = 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def overrides(teacher, traces, store, **extra):
    kw = {"teacher.hf_path": teacher, "teacher.param_dtype": "float32", "teacher.dtype": "float32",
          "data.traces": traces, "data.store": store, "data.top_k": K, "data.seq_len": 512,
          "precompute.chunk_tokens": 64, "precompute.window_chunks": 2, "precompute.bucket": 16,
          "precompute.batch_tokens": 256, "mesh.data": -1, "run.output_dir": os.path.dirname(store), **extra}
    return [f"{k}={v}" for k, v in kw.items()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("kd")
    teacher, traces = tiny_kd.make(str(root))
    store_path = str(root / "store")
    summary = run(load_config(None, overrides(teacher, traces, store_path)), show_progress=False)
    return teacher, traces, store_path, summary


def _arrays(path):
    store = KDStore.open(path)
    return {n: store.array(n).read().result() for n in
            ("tokens", "role", "step", "offsets", "topk_ids", "topk_logprobs")}


def test_stored_topk_equals_transformers(built):
    teacher, _, path, summary = built
    assert summary["complete"] and summary["sequences"] == 12
    store = KDStore.open(path)
    tok = transformers.AutoTokenizer.from_pretrained(teacher)
    hf = transformers.AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    V = len(tok)
    assert store.meta.vocab_size == V and store.meta.teacher_vocab_size == V + 16
    for i in range(len(store)):
        seq = store.read(i)
        n = len(seq["tokens"])
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor(seq["tokens"][None])).logits[0], -1).numpy()
        logp = logp[:, :V]  # ids the student cannot emit are never stored
        # target alignment: row t is token t's distribution, predicted from position t-1
        assert (seq["topk_ids"][0] == -1).all() and (seq["topk_logprobs"][0] == 0).all()
        ids, vals = seq["topk_ids"][1:], seq["topk_logprobs"][1:].astype(np.float32)
        ref_vals = np.take_along_axis(logp[:n - 1], ids, axis=1)
        np.testing.assert_allclose(vals, ref_vals, atol=2e-3, rtol=1e-3)  # fp16 storage
        ref_ids = np.argsort(-logp[:n - 1], axis=1, kind="stable")[:, :K]
        sorted_ref = -np.sort(-logp[:n - 1], axis=1)
        gaps = np.abs(np.diff(sorted_ref[:, :K + 1], axis=1))  # ids must match where neighbours differ
        clear = np.concatenate([gaps[:, :1] > 1e-4, (gaps[:, 1:] > 1e-4) & (gaps[:, :-1] > 1e-4)], axis=1)
        assert (ids[clear] == ref_ids[clear]).all()
        assert ids.max() < V


def test_roles_steps_and_done(built):
    _, _, path, _ = built
    a = _arrays(path)
    assert KDStore.open(path).done_sequences().all() and a["offsets"][-1] == len(a["tokens"])
    assert set(np.unique(a["role"])) == {0, 1, 2}
    assert (a["step"][a["role"] != 1] == -1).all()


def test_describe_and_checks(built):
    teacher, _, path, summary = built
    assert summary["bytes_per_token"] > 0 and summary["k"] == K
    store = KDStore.open(path)
    with pytest.raises(StoreError, match="data.top_k=8"):
        store.check(k=16)
    with pytest.raises(StoreError, match="output rows"):
        store.check(vocab_size=store.meta.vocab_size - 1)
    store.check(vocab_size=store.meta.vocab_size + 5)  # a student with spare rows (Qwen) is fine
    other = transformers.AutoTokenizer.from_pretrained(teacher)
    other.chat_template = "{{ messages }}"
    with pytest.raises(StoreError, match="chat template"):
        store.check(tokenizer=other)
    with pytest.raises(StoreError, match="no KD store"):
        KDStore.open(path + "_missing")


def _cli(args, env_extra=None, **popen):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "kd_jax.precompute", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


@pytest.fixture(scope="module")
def one_device(built, tmp_path_factory):
    """The store an uninterrupted `python -m kd_jax.precompute` on one CPU device writes: what the
    resumed and the two-process runs (one device each) must reproduce bit for bit."""
    teacher, traces, reference, _ = built
    path = str(tmp_path_factory.mktemp("one_device") / "store")
    out, _ = _cli(overrides(teacher, traces, path)).communicate(timeout=300)
    assert KDStore.open(path).describe()["complete"], out.decode()[-2000:]
    return path


@pytest.mark.slow
def test_device_count_changes_only_fp16_rounding(built, one_device):
    """8 devices (the in-process store) vs 1: per-device batch shapes differ, so XLA's matmuls may
    round differently; the stored values agree to one fp16 step and the ids to near-ties."""
    want, got = _arrays(built[2]), _arrays(one_device)
    for name in ("tokens", "role", "step", "offsets"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    np.testing.assert_allclose(got["topk_logprobs"], want["topk_logprobs"], atol=4e-3, rtol=0)
    assert (got["topk_ids"] == want["topk_ids"]).mean() > 0.999


@pytest.mark.slow
def test_sigkill_then_resume_is_identical(built, one_device, tmp_path):
    teacher, traces, _, _ = built
    reference = one_device
    path = str(tmp_path / "store")
    proc = _cli(overrides(teacher, traces, path, **{"precompute.window_chunks": 1}))
    progress = os.path.join(path, "progress")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # kill once some, not all, chunks are done
        if os.path.isdir(progress) and len(os.listdir(progress)) >= 1:  # early: most chunks still to do
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = KDStore.open(path)
    assert not partial.describe()["complete"] and partial.done_chunks().any()
    with pytest.raises(StoreError, match="incomplete"):
        partial.check()
    assert len(partial.check(allow_incomplete=True)) < len(partial)
    out, _ = _cli(overrides(teacher, traces, path)).communicate(timeout=300)
    assert KDStore.open(path).describe()["complete"], out.decode()[-2000:]
    want, got = _arrays(reference), _arrays(path)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.slow
def test_two_processes_write_the_one_process_store(built, one_device, tmp_path):
    teacher, traces, _, _ = built
    reference = one_device  # one device per process: the same per-device batches, bit for bit
    path = str(tmp_path / "store2")
    port = 20000 + os.getpid() % 20000
    procs = [_cli(overrides(teacher, traces, path),
                  {"KD_JAX_COORDINATOR": f"localhost:{port}", "KD_JAX_NUM_PROCESSES": "2",
                   "KD_JAX_PROCESS_ID": str(p)}) for p in range(2)]
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    # process 0 alone tokenized and described the store: the two really ran as processes 0 and 1
    assert '"bytes_per_token"' in outs[0] and '"bytes_per_token"' not in outs[1], outs[1][-2000:]
    want, got = _arrays(reference), _arrays(path)  # the store one uninterrupted process wrote
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_progress_moves_per_teacher_batch(built, tmp_path, monkeypatch):
    """The bar advanced once per window (8 x 16,384 tokens by default: 0% for 17 minutes on a 135M
    teacher on 2 CPU cores); it must advance with every teacher batch, in tokens with a rate shown."""
    from kd_jax.core import precompute as module
    teacher, traces, _, _ = built
    bars, seen = [], []
    monkeypatch.setattr(tiny_kd.RecordingBar, "made", bars)
    topk = module.topk_logprobs_jit

    def recorded(*args, **kwargs):
        seen.append(bars[-1].n)  # the bar's count as each teacher batch starts
        return topk(*args, **kwargs)
    monkeypatch.setattr(module, "progress_bar", tiny_kd.RecordingBar)
    monkeypatch.setattr(module, "topk_logprobs_jit", recorded)
    # one window of every chunk, several length buckets: several teacher batches in the one window
    cfg = load_config(None, overrides(teacher, traces, str(tmp_path / "store"), **{"precompute.window_chunks": 1000}))
    run(cfg, show_progress=False)
    bar = bars[-1]
    assert len(seen) > 2 and seen == sorted(set(seen)), seen  # moved before every batch after the first
    assert bar.n == bar.kwargs["total"] == KDStore.open(str(tmp_path / "store")).meta.num_tokens and bar.closed
    assert bar.kwargs["unit"] == "tok" and bar.kwargs.get("unit_scale")
