"""`python -m kd_jax.train` end to end on 8 fake CPU devices: loss falls, export loads in
transformers, exact resume after SIGKILL and SIGTERM, gradient accumulation, packing, mesh change."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_kd
import torch
import transformers

from kd_jax.base import sharding
from kd_jax.base.loader import load_config, save_config
from kd_jax.base.schema import RunConfig
from kd_jax.base.sharding import to_global
from kd_jax.core.checkpoint import Checkpointer, CheckpointError
from kd_jax.core.evaluation import evaluate
from kd_jax.core.loop import NonFiniteError, train
from kd_jax.core.metrics import Logger
from kd_jax.core.optim import default_hyper
from kd_jax.core.runs import (
    RunDirError,
    RunLock,
    export_run,
    load_run_config,
    restore_student,
)
from kd_jax.core.state import abstract_train_state, init_train_state
from kd_jax.core.step import compile_steps, loss_metrics, trainable
from kd_jax.data.pipeline import make_eval_iter, make_train_iter
from kd_jax.data.store import KDStore
from kd_jax.models import build_model
from kd_jax.models.hf import FolderNotEmptyError

STEPS = 24  # long enough after the first checkpoint (step 4) for the interrupting signal to land


def _train_args(root, name, **extra) -> list[str]:
    return tiny_kd.train_args(root, name, STEPS, **{**extra})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("train"))
    tiny_kd.build_store(root)
    tiny_kd.run_cli("kd_jax.train", _train_args(root, "reference"))
    return root


@pytest.mark.slow
def test_train_loss_falls_and_export_loads_in_transformers(root):
    losses = tiny_kd.train_losses(root, "reference")
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert np.mean([losses[s] for s in (STEPS - 2, STEPS - 1, STEPS)]) < np.mean([losses[s] for s in (1, 2, 3)]) - 0.3
    tiny_kd.run_cli("kd_jax.export", ["--run", f"{root}/runs/reference", "--out", f"{root}/export"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(f"{root}/export", dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(f"{root}/export")
    assert len(tok) == len(transformers.AutoTokenizer.from_pretrained(f"{root}/teacher"))
    student, step = restore_student(load_run_config(f"{root}/runs/reference"))
    assert step == STEPS
    tokens = np.asarray(KDStore.open(f"{root}/store").read(0)["tokens"])[None]
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(student(jnp.asarray(tokens))), ref, atol=1e-4, rtol=0)


def _interrupt(root, name, sig) -> None:
    """Start a run, deliver `sig` once its first checkpoint is final, then run it again to the end."""
    proc = tiny_kd.cli("kd_jax.train", _train_args(root, name))
    out = tiny_kd.signal_after_first_checkpoint(proc, f"{root}/runs/{name}/checkpoints", sig)
    if sig == signal.SIGTERM:  # preemption: a clean exit after saving the current step
        assert proc.returncode == 0 and "SIGTERM: saved step" in out.decode(), out.decode()[-3000:]
    assert len(tiny_kd.train_losses(root, name)) < STEPS
    tiny_kd.run_cli("kd_jax.train", _train_args(root, name))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_resume_is_bitwise_identical(root, sig):
    name = f"resume_{sig.name.lower()}"
    _interrupt(root, name, sig)
    # bitwise: floats round-trip through JSON
    assert tiny_kd.train_losses(root, name) == tiny_kd.train_losses(root, "reference")


@pytest.mark.slow
def test_restore_on_another_mesh_gives_the_same_next_step_loss(root):
    # a copy of the reference run's checkpoint at step STEPS - 4, continued one step on a (2, 4, 1) mesh
    src, dst, at = f"{root}/runs/reference", f"{root}/runs/mesh", STEPS - 4
    shutil.copytree(f"{src}/checkpoints/{at}", f"{dst}/checkpoints/{at}")
    tiny_kd.run_cli("kd_jax.train", _train_args(root, "mesh", **{"mesh.data": 2, "mesh.fsdp": 4}))
    mesh_losses = tiny_kd.train_losses(root, "mesh")
    assert min(mesh_losses) == at + 1  # it resumed, rather than starting over
    np.testing.assert_allclose(mesh_losses[at + 1], tiny_kd.train_losses(root, "reference")[at + 1], rtol=1e-5)


def _setup(root, **overrides):
    cfg = load_config(None, _train_args(root, "inproc", **overrides))
    mesh = sharding.mesh_from_config(cfg.mesh)
    teacher = build_model(cfg.teacher, mesh=mesh)
    student = build_model(cfg.student, mesh=mesh, teacher=teacher)
    spec = abstract_train_state(student.cfg, cfg.optim, cfg.train.steps, mesh)
    return cfg, mesh, spec, init_train_state(student, spec)


def test_gradient_accumulation_gives_the_same_update(root):
    """The same update with and without gradient accumulation; and either way, the step loss the
    train step reports (loss.beta = 0.5) is the one the eval step computes with its own pass of the
    loss head, and it completes the loss: L = α·soft + (1−α)·hard + β·L_step."""
    cfg, mesh, spec, state = _setup(root)
    assert cfg.loss.beta == 0.5
    store = KDStore.open(cfg.data.store)
    batch = next(make_train_iter(store, np.arange(len(store)), cfg.data, global_batch_size=8, seed=0))
    hyper = default_hyper(cfg.loss)
    results = []
    for accum in (1, 4):
        steps = compile_steps(spec, cfg.loss, accum, mesh)
        fresh = jax.tree.map(jnp.copy, state)  # the step donates its inputs
        with jax.set_mesh(mesh):
            if accum == 1:
                held_out = jax.device_get(steps.eval(trainable(state), to_global(batch, mesh), hyper, None))
            new, metrics = steps.train(fresh, to_global(batch, mesh), hyper, None)
        results.append((jax.device_get(new["params"]), jax.device_get(metrics)))
    (p1, m1), (p4, m4) = results
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    alpha = hyper["alpha"]
    for m in (m1, m4):
        logged = loss_metrics({k: float(v) for k, v in m.items()})
        np.testing.assert_allclose(logged["step_loss"], float(held_out["step_loss"]), rtol=1e-5)
        assert logged["loss"] == pytest.approx(alpha * logged["soft"] + (1 - alpha) * logged["hard"]
                                               + cfg.loss.beta * logged["step_loss"], rel=1e-6)


def test_packing_keeps_documents_apart(root):
    """Losses of a packed batch equal the sums over its documents evaluated one per row: any
    attention or loss term crossing a segment boundary would change them."""
    cfg, mesh, spec, state = _setup(root)
    params = state["params"]
    store = KDStore.open(cfg.data.store)
    steps = compile_steps(spec, cfg.loss, 1, mesh)
    packed = next(make_eval_iter(store, np.arange(len(store)), cfg.data, batch_size=8))
    assert (packed["segment_ids"].max(axis=1) > 1).any(), "the batch must actually pack documents"
    alone = {k: np.zeros_like(v[:1]).repeat(8 * 8, axis=0) for k, v in packed.items()}
    for k, fill in (("topk_ids", -1), ("reasoning_step", -1)):
        alone[k][...] = fill
    row = 0
    for b in range(8):
        for s in range(1, packed["segment_ids"][b].max() + 1):
            idx = np.flatnonzero(packed["segment_ids"][b] == s)
            for k in alone:
                alone[k][row, :len(idx)] = packed[k][b, idx]
            alone["segment_ids"][row, :len(idx)] = 1
            row += 1
    assert row <= 64
    with jax.set_mesh(mesh):
        a = jax.device_get(steps.eval({"params": params}, to_global(packed, mesh), default_hyper(cfg.loss), None))
        b = jax.device_get(steps.eval({"params": params}, to_global(alone, mesh), default_hyper(cfg.loss), None))
    for key in ("soft_sum", "hard_sum", "num_tokens", "top1_agree", "loss"):
        np.testing.assert_allclose(a[key], b[key], rtol=2e-5, err_msg=key)


# ---------------------------------------------------------------- nothing lost, nothing silent


def _cfg(root, name, **extra):
    return load_config(None, _train_args(root, name, **extra))


def test_changed_config_on_resume_is_refused_with_a_diff(root):
    path = f"{root}/runs/reference/config.yaml"
    before = open(path, "rb").read()
    with pytest.raises(RunDirError, match=r"student\.teacher_layers: \[1\] -> \[0, 1\]") as e:
        train(_cfg(root, "reference", **{"student.teacher_layers": "[0,1]"}))
    assert "\n" not in str(e.value)
    assert open(path, "rb").read() == before  # the run's own config is untouched
    with pytest.raises(RunDirError, match="checkpoint.resume=false"):
        train(_cfg(root, "reference", **{"checkpoint.resume": "false"}))


def test_second_trainer_on_a_locked_run_dir_is_refused(root):
    run_dir = f"{root}/runs/reference"
    with RunLock(run_dir):  # a live trainer (this process) holds the directory
        with pytest.raises(RunDirError, match="in use by another trainer"):
            train(_cfg(root, "reference"))
    RunLock(run_dir).acquire().release()  # free again once its holder let go


def test_stale_lock_from_a_killed_trainer_is_taken_over(root):
    run_dir = f"{root}/runs/reference"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from kd_jax.core.runs import RunLock; "
                               f"RunLock({run_dir!r}).acquire(); print('held', flush=True); sys.stdin.read()"],
                              cwd=tiny_kd.ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"held"
    with pytest.raises(RunDirError, match=f"pid {holder.pid}"):
        RunLock(run_dir).acquire()
    holder.kill()  # SIGKILL: no cleanup runs, the lock file stays
    holder.wait()
    assert os.path.exists(f"{run_dir}/run.lock")
    train(_cfg(root, "reference"))  # finished run: resumes at its last step, nothing to do


def test_evaluate_and_export_without_a_checkpoint_are_refused_and_leave_nothing(root):
    cfg = _cfg(root, "never_trained")
    save_config(cfg)
    with pytest.raises(CheckpointError, match="has no checkpoint"):
        evaluate(cfg, "student", max_examples=1)
    proc = tiny_kd.cli("kd_jax.export", ["--run", cfg.run_dir])
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 1 and out.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in out and "has no checkpoint" in out
    assert not os.path.exists(cfg.checkpoint_dir)  # no empty checkpoints/ left behind
    proc = tiny_kd.cli("kd_jax.export", ["--run", cfg.run_dir, "--debug"])
    assert "Traceback" in proc.communicate(timeout=120)[0].decode() and proc.returncode == 1


def test_export_refuses_a_non_empty_folder_without_overwrite(root):
    teacher = f"{root}/teacher"
    before = {n: open(f"{teacher}/{n}", "rb").read() for n in os.listdir(teacher)}
    with pytest.raises(FolderNotEmptyError, match="--overwrite"):
        export_run(f"{root}/runs/reference", teacher)
    assert {n: open(f"{teacher}/{n}", "rb").read() for n in os.listdir(teacher)} == before


def test_metrics_jsonl_has_each_step_once_after_a_resume(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 7):  # logged up to 6; the checkpoint it resumes from is step 4
            f.write(json.dumps({"step": step, "split": "train", "loss": 1.0}) + "\n")
    logger = Logger(str(tmp_path), RunConfig(tensorboard=False), start=4)
    logger.write(5, "train", {"loss": 0.5})
    logger.close()
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5]


def test_nonfinite_stop_is_checked_every_step_not_only_when_logging(root):
    cfg = _cfg(root, "diverges", **{"optim.lr": 1e30, "optim.warmup_steps": 0, "optim.clip_norm": 0,
                                    "train.max_nonfinite": 2, "run.log_every": 50, "train.steps": 12})
    with pytest.raises(NonFiniteError, match=r"up to step (\d+)") as e:
        train(cfg)
    assert int(re.search(r"up to step (\d+)", str(e.value)).group(1)) < 12


def test_disk_full_names_the_folder_and_the_last_good_step(root, monkeypatch):
    save = Checkpointer.save

    def full_at_8(self, step, *args, **kwargs):
        if step == 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", full_at_8)
    cfg = _cfg(root, "disk_full", **{"train.steps": 10})
    with pytest.raises(CheckpointError, match="disk full") as e:
        train(cfg)
    assert cfg.checkpoint_dir in str(e.value) and "last good checkpoint is step 4" in str(e.value)


def test_precompute_bad_traces_is_one_line_exit_1(root):
    args = [a for a in tiny_kd.store_args(root) if not a.startswith(("data.traces=", "data.store="))]
    proc = tiny_kd.cli("kd_jax.precompute", args + [f"data.traces={root}/missing.jsonl",
                                                    f"data.store={root}/other_store", f"run.output_dir={root}/runs"])
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 1 and "Traceback" not in out, out[-2000:]
    assert out.strip().splitlines()[-1].startswith("error: ") and "missing.jsonl" in out.strip().splitlines()[-1]


def test_train_without_a_store_is_one_line_and_writes_nothing(tmp_path):
    """data.store=null: the one line, exit 1, no orbax traceback at shutdown, and no run folder made."""
    proc = tiny_kd.cli("kd_jax.train", ["--config", "configs/tiny_llama.yaml", "data.store=null",
                                        f"run.output_dir={tmp_path}/runs"])
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 1 and out.strip().splitlines() == [
        "error: data.store is not set: build a store with `python -m kd_jax.precompute` first"], out[-2000:]
    assert not os.path.exists(tmp_path / "runs")


def test_extending_a_run_with_a_loss_schedule_is_refused(tmp_path):
    """A run trained 2 steps with alpha linear to 0.1 and resumed with train.steps=4 would log alpha 0.5,
    0.1, 0.233, 0.1 (the schedule re-stretched over steps already taken): refused, the saved config kept.
    Without a loss schedule, extending a run stays allowed."""
    from kd_jax.core.runs import check_and_save_config
    base = [f"run.output_dir={tmp_path}", "run.name=r", "train.steps=2"]
    scheduled_cfg = load_config(None, base + ["loss.alpha_schedule.kind=linear", "loss.alpha_schedule.end=0.1"])
    check_and_save_config(scheduled_cfg)
    os.makedirs(os.path.join(scheduled_cfg.checkpoint_dir, "2"))  # a checkpoint at step 2
    saved = open(tmp_path / "r" / "config.yaml").read()
    longer = dataclasses.replace(scheduled_cfg, train=dataclasses.replace(scheduled_cfg.train, steps=4))
    with pytest.raises(RunDirError, match=r"train.steps=2 with loss.alpha_schedule .* keep train.steps=2"):
        check_and_save_config(longer)
    assert open(tmp_path / "r" / "config.yaml").read() == saved
    plain = load_config(None, [f"run.output_dir={tmp_path}", "run.name=p", "train.steps=2"])
    check_and_save_config(plain)
    os.makedirs(os.path.join(plain.checkpoint_dir, "2"))
    check_and_save_config(dataclasses.replace(plain, train=dataclasses.replace(plain.train, steps=4)))


def test_config_changes_keep_a_layer_map_as_one_value():
    """loss.hidden.layers maps int layer indices: the config diff (resume, evaluate, export) names it as
    one key and does not fail on the int keys (the prune demo's online + hidden row crashed on it)."""
    from kd_jax.core.runs import config_changes
    online = ["teacher.mode=online", "loss.hidden.weight=1.0"]
    a = load_config(None, online + ["loss.hidden.layers={0: 0, 1: 2}"])
    b = load_config(None, online + ["loss.hidden.layers={0: 1, 1: 3}", "train.steps=7"])
    assert config_changes(a, a) == {}
    assert config_changes(a, b) == {"loss.hidden.layers": ({0: 0, 1: 2}, {0: 1, 1: 3}),
                                    "train.steps": (a.train.steps, 7)}
