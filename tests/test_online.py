"""The online teacher in the train step, end to end: a run on the demo task's traces with a teacher
of another width (dense KD, hidden alignment through learned projections, scheduled alpha and
temperature) learns, aligns, exports without its projections and resumes bitwise after SIGKILL;
online_top_k=K equals the offline store of the same K; mismatched teachers are refused."""

from __future__ import annotations

import json
import os
import signal

import hf_tiny
import jax
import numpy as np
import pytest
import safetensors
import tiny_kd
import torch
import transformers

from kd_jax.base.loader import load_config
from kd_jax.base.schema import ConfigError, HiddenConfig, LossConfig, ScheduleConfig
from kd_jax.base.sharding import to_global
from kd_jax.core.optim import default_hyper, hyper_at, loss_schedules
from kd_jax.core.prepare import prepare
from kd_jax.core.step import layer_pairs, trainable
from kd_jax.data.pipeline import make_eval_iter
from kd_jax.data.store import StoreError
from kd_jax.demo.arithmetic import write as write_arithmetic
from kd_jax.models.decoder import DecoderConfig
from kd_jax.models.hf import load_tokenizer
from kd_jax.models.source import TeacherMismatchError, check_online_teacher

STEPS = 24


def _online_args(root: str, name: str) -> list[str]:
    """Demo-task traces, no store (the traces are tokenized into the run directory), a 2-layer
    width-32 teacher and a 2-layer width-16 random student: hidden alignment needs projections."""
    student = dict(tiny_kd.STUDENT, vocab_size=json.load(open(f"{root}/arith_teacher/config.json"))["vocab_size"])
    kw = {"run.output_dir": f"{root}/runs", "run.name": name, "run.log_every": 1, "run.tensorboard": "false",
          "teacher.mode": "online", "teacher.hf_path": f"{root}/arith_teacher", "teacher.param_dtype": "float32",
          "teacher.dtype": "float32", "student.init": "random", "student.architecture": json.dumps(student),
          "student.dtype": "float32", "data.traces": f"{root}/arith/traces.jsonl", "data.seq_len": 128,
          "data.eval_fraction": 0.1, "train.steps": STEPS, "train.global_batch_size": 8, "train.eval_every": 0,
          "optim.lr": 3e-3, "optim.warmup_steps": 2, "checkpoint.every_steps": 4, "loss.chunk_size": 128,
          "loss.alpha": 0.9, "loss.alpha_schedule": "{kind: linear, end: 0.3}", "loss.temperature": 2.0,
          "loss.temperature_schedule": "{kind: cosine, end: 1.0}", "loss.divergence": "reverse_kl",
          "loss.hidden.weight": 1.0, "loss.hidden.distance": "cosine"}
    return [f"{k}={v}" for k, v in kw.items()]


def _metrics(root: str, name: str) -> dict[int, dict]:
    out = {}
    with open(f"{root}/runs/{name}/metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if row["split"] == "train":
                out[row["step"]] = row
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("online"))
    tiny_kd.build_store(root)  # the offline store (K = 8) of tiny_kd's teacher, for the top-K comparison
    paths = write_arithmetic(f"{root}/arith", n=300)
    tok = load_tokenizer(paths["tokenizer"])
    teacher = hf_tiny.build("llama3", vocab_size=len(tok) + 16, num_hidden_layers=2, max_position_embeddings=512)
    teacher.save_pretrained(f"{root}/arith_teacher")
    tok.save_pretrained(f"{root}/arith_teacher")
    tiny_kd.run_cli("kd_jax.train", _online_args(root, "online"))
    return root


@pytest.mark.slow
def test_online_run_learns_aligns_logs_schedules_and_exports_without_projections(root):
    rows = _metrics(root, "online")
    assert sorted(rows) == list(range(1, STEPS + 1))
    first, last = [rows[s] for s in (1, 2, 3)], [rows[s] for s in (STEPS - 2, STEPS - 1, STEPS)]
    # The mapped hidden states turn toward the teacher's (1 - cosine: 0.99 -> ~0.45 here); the hard
    # loss falls. The total and the soft loss are not compared: alpha and T move under them.
    assert np.mean([r["hidden"] for r in last]) < 0.7 * np.mean([r["hidden"] for r in first])
    assert np.mean([r["hard"] for r in last]) < np.mean([r["hard"] for r in first]) - 0.3
    # The schedules, logged every step: linear alpha 0.9 -> 0.3 and cosine temperature 2 -> 1.
    np.testing.assert_allclose([rows[1]["alpha"], rows[STEPS]["alpha"]], [0.9, 0.3], rtol=1e-6)
    np.testing.assert_allclose([rows[1]["temperature"], rows[STEPS]["temperature"]], [2.0, 1.0], rtol=1e-6)
    assert rows[1]["alpha"] > rows[STEPS // 2]["alpha"] > rows[STEPS]["alpha"]
    assert os.path.isdir(f"{root}/runs/online/tokens")  # the traces were tokenized once, into the run

    tiny_kd.run_cli("kd_jax.export", ["--run", f"{root}/runs/online", "--out", f"{root}/online_export"])
    names = []
    for f in os.listdir(f"{root}/online_export"):
        if f.endswith(".safetensors"):
            with safetensors.safe_open(f"{root}/online_export/{f}", "np") as st:
                names += list(st.keys())
    assert names and not [n for n in names if "proj" in n and "layers" not in n], names
    assert not [n for n in names if "align" in n], names
    hf = transformers.AutoModelForCausalLM.from_pretrained(f"{root}/online_export", dtype=torch.float32)
    assert hf.config.hidden_size == 16 and sum(p.numel() for p in hf.parameters()) > 0


@pytest.mark.slow
def test_online_resume_after_sigkill_is_bitwise_identical(root):
    name = "online_resume"
    proc = tiny_kd.cli("kd_jax.train", _online_args(root, name))
    tiny_kd.signal_after_first_checkpoint(proc, f"{root}/runs/{name}/checkpoints", signal.SIGKILL)
    assert len(tiny_kd.train_losses(root, name)) < STEPS
    tiny_kd.run_cli("kd_jax.train", _online_args(root, name))
    # bitwise: floats round-trip through JSON
    assert tiny_kd.train_losses(root, name) == tiny_kd.train_losses(root, "online")


def test_online_top_k_equals_the_offline_store_of_the_same_k(root):
    """tiny_kd's teacher online, keeping its top-8 per token, against the store it wrote with K = 8:
    the same batch, student and loss give the same loss up to the store's fp16 log-prob rounding
    (a relative error of at most 2^-11 per log-prob)."""
    base = tiny_kd.train_args(root, "topk", 1, **{"loss.divergence": "forward_kl", "loss.temperature": 2.0,
                                                  "loss.tail": "true"})
    offline = prepare(load_config(None, base))
    online = prepare(load_config(None, base + ["teacher.mode=online", "loss.online_top_k=8"]))
    dense = prepare(load_config(None, base + ["teacher.mode=online"]))
    batch = next(make_eval_iter(offline.store, offline.eval_idx, offline.cfg.data, batch_size=8))
    out = {}
    with jax.set_mesh(offline.mesh):
        for name, run in (("offline", offline), ("online", online), ("dense", dense)):
            out[name] = jax.device_get(run.steps.eval(trainable(offline.state), to_global(batch, offline.mesh),
                                                      default_hyper(run.cfg.loss), run.teacher_params))
    # The hard terms see no teacher: equal to fp32 noise. The soft terms see the store's fp16
    # log-probs (relative rounding <= 2^-11 each, amplified in a KL of near-equal distributions;
    # tests/test_online_loss.py bounds it exactly at the loss level): within 1%, while the dense
    # (full-vocabulary) loss of the same teacher is much further away.
    for key in ("hard_sum", "num_tokens"):
        np.testing.assert_allclose(out["online"][key], out["offline"][key], rtol=1e-5, err_msg=key)
    for key in ("loss", "soft_sum", "step_loss", "top1_agree"):
        np.testing.assert_allclose(out["online"][key], out["offline"][key], rtol=1e-2, err_msg=key)
    gap = abs(out["online"]["soft_sum"] - out["offline"]["soft_sum"])
    assert abs(out["dense"]["soft_sum"] - out["offline"]["soft_sum"]) > 5 * gap, (out, gap)


def test_online_sampled_trains_and_draws_anew_each_step(root):
    """loss.online_sampled=8: the in-step teacher's draws are the soft target; the eval loss of one
    batch moves with the step that seeds the draws and not otherwise."""
    base = tiny_kd.train_args(root, "online_sampled", 1, **{"teacher.mode": "online", "loss.online_sampled": 8})
    run = prepare(load_config(None, base))
    batch = next(make_eval_iter(run.store, run.eval_idx, run.cfg.data, batch_size=8))
    with jax.set_mesh(run.mesh):
        def soft(step):
            hyper = dict(default_hyper(run.cfg.loss), step=float(step))
            out = run.steps.eval(trainable(run.state), to_global(batch, run.mesh), hyper, run.teacher_params)
            return float(jax.device_get(out["soft_sum"]))
        assert soft(3) == soft(3) and soft(3) != soft(4) and np.isfinite(soft(3)) and soft(3) > 0
    from kd_jax.core.loop import train
    metrics = train(load_config(None, tiny_kd.train_args(root, "online_sampled_run", 3, **{
        "teacher.mode": "online", "loss.online_sampled": 8})))
    assert np.isfinite(metrics["loss"]) and metrics["soft"] > 0


def test_each_tokenizer_is_read_once_per_run_at_its_revision(root, monkeypatch):
    """prepare reads the run's tokenizer once and passes it down (store checks, on-policy prompts);
    an online teacher and an HF student are read at their own revisions (a local folder ignores
    them), each (folder, revision) once: here the teacher's is the run's (no data.tokenizer)."""
    from kd_jax.core import prepare as module
    calls, real = [], module.load_tokenizer

    def recording(path, revision=None):
        calls.append((path, revision))
        return real(path, revision)
    monkeypatch.setattr(module, "load_tokenizer", recording)
    teacher = f"{root}/teacher"
    prepare(load_config(None, tiny_kd.train_args(root, "tokenizers", 1, **{
        "teacher.mode": "online", "teacher.revision": "t-rev", "student.init": "hf", "student.hf_path": teacher,
        "student.revision": "s-rev"})))
    assert calls == [(teacher, "t-rev"), (teacher, "s-rev")]
    calls.clear()  # no data.store: the traces are tokenized into the run with the run's tokenizer
    prepare(load_config(None, _online_args(root, "tokenizer_once")))
    assert calls == [(f"{root}/arith_teacher", None)]


def test_online_teacher_with_fewer_output_rows_is_refused():
    cfg = load_config(None, ["teacher.mode=online", "teacher.hf_path=t", "student.hf_path=s",
                             "student.init=random"])  # random: no tokenizer folder to compare
    small, big = DecoderConfig(vocab_size=100), DecoderConfig(vocab_size=128)
    with pytest.raises(TeacherMismatchError, match=r"t has 100 output rows.*student s's 128"):
        check_online_teacher(cfg, big, small)


def test_schedules_and_layer_maps():
    cfg = LossConfig(alpha=0.9, alpha_schedule=ScheduleConfig("linear", 0.3), temperature=2.0,
                     temperature_schedule=ScheduleConfig("cosine", 1.0))
    sched = loss_schedules(cfg, 11)
    assert hyper_at(sched, 0) == pytest.approx({"alpha": 0.9, "temperature": 2.0, "hidden_weight": 0.0, "step": 0})
    assert hyper_at(sched, 5) == pytest.approx({"alpha": 0.6, "temperature": 1.5, "hidden_weight": 0.0, "step": 5})
    assert hyper_at(sched, 10) == pytest.approx({"alpha": 0.3, "temperature": 1.0, "hidden_weight": 0.0, "step": 10})
    assert layer_pairs(HiddenConfig(weight=1.0), 4, 8) == ((0, 1), (1, 3), (2, 5), (3, 7))  # last to last
    assert layer_pairs(HiddenConfig(weight=1.0), 3, 3) == ((0, 0), (1, 1), (2, 2))
    assert layer_pairs(HiddenConfig(weight=1.0, layers={1: 6}), 4, 8) == ((1, 6),)
    assert layer_pairs(HiddenConfig(weight=0.0), 4, 8) == ()
    with pytest.raises(ConfigError, match=r"out of range.*student has layers 0..3, the teacher 0..7"):
        layer_pairs(HiddenConfig(weight=1.0, layers={4: 1}), 4, 8)
    with pytest.raises(ConfigError, match="teacher.mode=online"):
        load_config(None, ["loss.hidden.weight=0.5"])
    with pytest.raises(ConfigError, match="teacher.mode=online"):
        load_config(None, ["loss.online_top_k=8"])


def test_online_teacher_with_another_tokenizer_than_the_store_is_refused(root):
    """The student is random (no tokenizer of its own to compare), data.tokenizer names the store's
    tokenizer, and the teacher folder carries another one: refused before any model is built."""
    import shutil
    other = f"{root}/other_teacher"
    shutil.copytree(f"{root}/arith_teacher", other)
    for name in os.listdir(other):
        if "token" in name or name.endswith(".jinja"):
            os.remove(os.path.join(other, name))
    load_tokenizer(f"{root}/teacher").save_pretrained(other)  # tiny_kd's tokenizer: other merges
    args = _online_args(root, "other_tokenizer") + [f"teacher.hf_path={other}",
                                                   f"data.tokenizer={root}/arith_teacher"]
    with pytest.raises(StoreError, match=r"has another tokenizer .* than the one store .* tokenized"):
        prepare(load_config(None, args))


def test_online_top_k_above_the_student_vocabulary_is_one_line_before_the_step_compiles():
    """K past the vocabulary would fail while tracing the loss (a 30-line traceback): refused with the sizes."""
    from kd_jax.base.errors import KDJaxError
    cfg = load_config(None, ["teacher.mode=online", "teacher.hf_path=t", "student.hf_path=s", "student.init=random",
                             "loss.online_top_k=200"])
    student, teacher = DecoderConfig(vocab_size=128), DecoderConfig(vocab_size=144)
    with pytest.raises(KDJaxError) as err:
        check_online_teacher(cfg, student, teacher)
    assert str(err.value).startswith("loss.online_top_k=200 is more than the student's vocabulary of 128 tokens")
    assert "\n" not in str(err.value)
    check_online_teacher(load_config(None, ["teacher.mode=online", "teacher.hf_path=t", "student.init=random",
                                            "loss.online_top_k=128"]), student, teacher)  # all of it is fine
