"""On-policy distillation (train.on_policy): the step schedule, completion roles, a teacher that
is the student's own copy (loss and gradient 0), loss and gradients on a sampled batch against a
materialized reference, exact resume after SIGKILL at λ = 0.5, sequence-level KD from the
teacher's samples, prompts from train.on_policy.prompts, and the logged sampling metrics."""

from __future__ import annotations

import argparse
import json
import signal

import hf_tiny
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny_kd
from flax import nnx

from kd_jax.base.loader import load_config
from kd_jax.base.schema import ConfigError
from kd_jax.base.sharding import to_global
from kd_jax.bench import onpolicy as bench
from kd_jax.core.onpolicy import (
    completion_roles,
    is_on_policy,
    make_example,
    on_policy_steps_before,
)
from kd_jax.core.optim import default_hyper
from kd_jax.core.prepare import prepare
from kd_jax.core.step import batch_loss, batch_totals, batch_weights
from kd_jax.data.roles import Role
from kd_jax.demo.arithmetic import write as write_arithmetic
from kd_jax.models.hf import load_tokenizer

STEPS = 8


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The demo task's traces and tokenizer, a random 2-layer teacher of that vocabulary."""
    root = str(tmp_path_factory.mktemp("onpolicy"))
    paths = write_arithmetic(f"{root}/arith", n=200)
    tok = load_tokenizer(paths["tokenizer"])
    teacher = hf_tiny.build("llama3", vocab_size=len(tok) + 16, num_hidden_layers=2, max_position_embeddings=512)
    teacher.save_pretrained(f"{root}/teacher")
    tok.save_pretrained(f"{root}/teacher")
    return root


def _args(root: str, name: str, **extra) -> list[str]:
    """Online teacher, the traces tokenized into the run; a random width-16 student; every second
    step on-policy (16 new tokens per prompt, one prompt per row)."""
    student = dict(tiny_kd.STUDENT, vocab_size=json.load(open(f"{root}/teacher/config.json"))["vocab_size"])
    kw = {"run.output_dir": f"{root}/runs", "run.name": name, "run.log_every": 1, "run.tensorboard": "false",
          "teacher.mode": "online", "teacher.hf_path": f"{root}/teacher", "teacher.param_dtype": "float32",
          "teacher.dtype": "float32", "student.init": "random", "student.architecture": json.dumps(student),
          "student.dtype": "float32", "data.traces": f"{root}/arith/traces.jsonl", "data.seq_len": 128,
          "data.eval_fraction": 0.1, "train.steps": STEPS, "train.global_batch_size": 8, "train.eval_every": 0,
          "optim.lr": 3e-3, "optim.warmup_steps": 2, "checkpoint.every_steps": 4, "loss.chunk_size": 128,
          "loss.beta": 0.5, "train.on_policy.fraction": 0.5, "train.on_policy.max_new_tokens": 16,
          "train.on_policy.temperature": 1.0, **extra}
    return [f"{k}={v}" for k, v in kw.items()]


def test_schedule_spreads_the_on_policy_steps_evenly():
    pattern = lambda f, n=8: [int(is_on_policy(s, f)) for s in range(n)]  # noqa: E731
    assert pattern(0.5) == [0, 1, 0, 1, 0, 1, 0, 1]
    assert pattern(0.25) == [0, 0, 0, 1, 0, 0, 0, 1]
    assert pattern(1.0) == [1] * 8 and pattern(0.0) == [0] * 8
    assert sum(pattern(0.1, 100)) == 10 and on_policy_steps_before(10, 0.1) == 1  # float error absorbed
    for f in (0.3, 0.5, 0.7):
        assert all(on_policy_steps_before(s, f) == sum(pattern(f, s)) for s in range(40))


def test_on_policy_needs_the_online_teacher():
    with pytest.raises(ConfigError, match="teacher.mode=online"):
        load_config(None, ["train.on_policy.fraction=0.5"])
    with pytest.raises(ConfigError, match="multiple of train.global_batch_size"):
        load_config(None, ["teacher.mode=online", "train.on_policy.fraction=0.5", "train.on_policy.prompts_per_step=12"])


def test_completion_roles_split_at_the_think_close_and_count_steps():
    """Pieces: "Start: 3." "\\n\\n" "Add 2: 3 + 2 = 5." "\\n" "</think>" "\\n\\n5" <eos>, the close one id."""
    pieces = {10: "<think>\n", 11: "Start: 3.", 12: "\n\n", 13: "Add 2: 3 + 2 = 5.", 14: "\n", 99: "</think>",
              15: "\n\n5", 2: "<|endoftext|>"}
    ids = [10, 11, 12, 13, 14, 99, 15, 2]
    role, step, closed = completion_roles(ids, [99], "\n\n", pieces.__getitem__)
    assert closed
    assert role.tolist() == [Role.REASONING] * 6 + [Role.ANSWER] * 2
    # The separator belongs to the step it ends; the close tag to the last step; answers have none.
    assert step.tolist() == [0, 0, 0, 1, 1, 1, -1, -1]
    role, step, closed = completion_roles(ids[:4], [99], "\n\n", pieces.__getitem__)  # cut before the close
    assert not closed and role.tolist() == [Role.REASONING] * 4 and step.tolist() == [0, 0, 0, 1]
    # The example: prompt labels unsupervised (role 0), shifted by one, cut at seq_len + 1 tokens.
    example, cut = make_example([7, 8], ids, role=np.asarray([1] * 8, np.uint8), step=np.zeros(8, np.int32),
                                seq_len=6, k=3)
    assert cut and example["inputs"].tolist() == [7, 8, 10, 11, 12, 13] and example["labels"][0] == 8
    assert example["role"].tolist() == [0, 1, 1, 1, 1, 1] and example["topk_ids"].shape == (6, 3)


def _sampled_batch(run):
    batch, sampled = run.on_policy.next_batch(run.state["params"])
    return to_global(batch, run.mesh), sampled


def test_teacher_as_the_students_own_copy_gives_zero_loss_and_gradient(root):
    """A student cut from all of the teacher's layers, graded on its own samples at step 0: the
    reverse KL to itself is 0 and so is its gradient (the real jitted train step)."""
    run = prepare(load_config(None, _args(root, "self", **{
        "student.init": "teacher_layers", "student.teacher_layers": "[0,1]", "train.on_policy.fraction": 1.0,
        "loss.divergence": "forward_kl"})))
    assert run.on_policy.due(0)
    with jax.set_mesh(run.mesh):
        batch, sampled = _sampled_batch(run)
        assert sampled.samples == 8 and sampled.tokens > 0 and sampled.packed == 8
        hyper = dict(default_hyper(run.cfg.loss), alpha=1.0)
        _, metrics = run.on_policy.steps.train(run.state, batch, hyper, run.teacher_params)
    assert run.on_policy.steps is not run.steps  # compiled with the on-policy divergence (reverse KL)
    assert float(metrics["num_tokens"]) >= sampled.tokens - 8  # the completions, minus each first token's input
    assert abs(float(metrics["loss"])) < 1e-6 and float(metrics["grad_norm"]) < 1e-6, metrics


def _reference_loss(objective, trainable, teacher_params, batch, hyper):
    """Both models' [B, L, V] logits materialized, reverse KL and CE written out, the same weights."""
    loss_cfg = objective.loss
    student = nnx.merge(objective.student, trainable["params"])
    teacher = nnx.merge(objective.teacher, teacher_params)
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    z = student(*args)
    V = z.shape[-1]
    zt = teacher(*args)[..., :V]
    T = hyper["temperature"]
    log_q, log_p = jax.nn.log_softmax(z / T), jax.nn.log_softmax(zt / T)
    soft = T * T * jnp.sum(jnp.exp(log_q) * (log_q - log_p), -1)  # KL(student || teacher)
    hard = -jnp.take_along_axis(jax.nn.log_softmax(z), batch["labels"][..., None], -1)[..., 0]
    a, b = batch_weights(batch, loss_cfg, batch_totals(batch, loss_cfg), loss_cfg.beta, hyper["alpha"])
    return jnp.where((a != 0) | (b != 0), a * soft + b * hard, 0.0).sum()


def test_loss_and_gradients_on_a_sampled_batch_equal_a_materialized_reference(root):
    run = prepare(load_config(None, _args(root, "reference", **{"train.on_policy.alpha": 0.7,
                                                               "loss.temperature": 2.0})))
    objective = run.on_policy.steps.objective
    assert objective.loss.divergence == "reverse_kl"
    with jax.set_mesh(run.mesh):
        batch, _ = _sampled_batch(run)
        assert int((batch["role"] == Role.REASONING).sum()) > 0
        hyper = {k: jnp.float32(v) for k, v in dict(default_hyper(run.cfg.loss), alpha=0.7).items()}
        trainable = {"params": run.state["params"]}
        totals = batch_totals(batch, objective.loss)
        fused = jax.jit(jax.value_and_grad(
            lambda t: batch_loss(objective, t, run.teacher_params, batch, totals, hyper)[0]))(trainable)
        want = jax.jit(jax.value_and_grad(
            lambda t: _reference_loss(objective, t, run.teacher_params, batch, hyper)))(trainable)
    np.testing.assert_allclose(fused[0], want[0], rtol=1e-5)
    got_g, want_g = jax.tree.leaves(fused[1]), jax.tree.leaves(want[1])
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * float(optax.tree.norm(want[1])))


@pytest.mark.slow
def test_resume_after_sigkill_at_half_on_policy_is_bitwise_identical(root):
    # The uninterrupted run and the one to be killed side by side (two processes, two cores).
    full = tiny_kd.cli("kd_jax.train", _args(root, "full"))
    proc = tiny_kd.cli("kd_jax.train", _args(root, "killed"))
    tiny_kd.signal_after_first_checkpoint(proc, f"{root}/runs/killed/checkpoints", signal.SIGKILL)
    out, _ = full.communicate(timeout=300)
    assert full.returncode == 0, out.decode()[-3000:]
    rows = [json.loads(line) for line in open(f"{root}/runs/full/metrics.jsonl")]
    train = {r["step"]: r for r in rows if r["split"] == "train"}
    assert [train[s]["on_policy"] for s in range(1, STEPS + 1)] == [0.0, 1.0] * (STEPS // 2)
    for s in range(2, STEPS + 1, 2):  # what each on-policy step logs about its samples
        r = train[s]
        assert 1 <= r["sampled_len"] <= 16 and 0 <= r["closed_think"] <= 1 and 0 <= r["ended_eos"] <= 1
        assert r["teacher_logprob_sampled"] < 0 and r["sample_tokens_per_s"] > 0 and 0 < r["sample_share"] < 1
        assert 0 <= r["sample_truncated"] <= 1 and 0 <= r["sample_left_out"] <= 1
    assert "sampled_len" not in train[1]
    # The step loss, as each step reports it, completes the loss with the step's own alpha:
    # train.on_policy.alpha (1.0) on on-policy steps, loss.alpha (0.5) on the others; it is a mean of
    # losses, so never negative.
    for s, r in train.items():
        alpha = 1.0 if r["on_policy"] else 0.5
        assert r["step_loss"] >= 0, (s, r["step_loss"])
        assert r["loss"] == pytest.approx(alpha * r["soft"] + (1 - alpha) * r["hard"] + 0.5 * r["step_loss"],
                                          rel=1e-5)

    assert len(tiny_kd.train_losses(root, "killed")) < STEPS
    tiny_kd.run_cli("kd_jax.train", _args(root, "killed"))
    # bitwise: floats round-trip through JSON
    assert tiny_kd.train_losses(root, "killed") == tiny_kd.train_losses(root, "full")


def test_teacher_samples_and_prompts_from_a_prompt_file(root):
    """source=teacher (sequence-level KD): the completions are the teacher's, whatever the student;
    train.on_policy.prompts: the prompts are that file's rows through the chat template."""
    with open(f"{root}/prompts.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"question": f"Ana has {i} coins and finds 2. How many coins does Ana have?"}) + "\n")
    extra = {"train.on_policy.source": "teacher", "train.on_policy.prompts": f"{root}/prompts.jsonl",
             "train.on_policy.prompts_field": "question", "train.on_policy.fraction": 1.0}
    run = prepare(load_config(None, _args(root, "from_teacher", **extra)))
    assert run.on_policy.prompts.count == 5 and run.on_policy.graphdef == nnx.graphdef(run.teacher)
    tok = load_tokenizer(f"{root}/teacher")
    prompts = run.on_policy.prompts.take(0, 8)
    assert tok.decode(prompts[0]).endswith("<|im_start|>assistant\n") and len({tuple(p) for p in prompts}) == 5
    with jax.set_mesh(run.mesh):
        first, _ = run.on_policy.sample(run.teacher_params, prompts)
        batch, sampled = run.on_policy.next_batch(run.teacher_params)
    assert all(len(c) >= 1 for c in first) and sampled.samples == 8 and sampled.packed == 8
    # Back to the first key (what a resume restores): the same completions.
    run.on_policy.restore({"key": np.asarray(jax.random.key_data(jax.random.key(0))).tolist(), "done": 0}, 0)
    with jax.set_mesh(run.mesh):
        second, _ = run.on_policy.sample(run.teacher_params, prompts)
    assert first == second


def test_bench_onpolicy_times_both_samplers_and_the_step(root, tmp_path):
    """`python -m kd_jax.bench onpolicy` on the tiny setup: every side timed, the JSON written."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    report = bench.run(parser.parse_args([*_args(root, "bench"), "--steps", "1", "--out", str(tmp_path / "r.json")]))
    assert report["prompts"] == 8 and report["max_new_tokens"] == 16
    for side in ("kd_jax", "transformers", "train_step"):
        assert report[side]["tokens_per_s"] > 0
    assert report["ratio"] > 0 and 0 < report["sample_share"] < 1
    assert json.load(open(tmp_path / "r.json"))["ratio"] == report["ratio"]
