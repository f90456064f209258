"""configs/smollm2/distill.yaml, the real-model example: its command lines (the README's) run end to
end on a few demo traces, with paths moved into tmp_path and a 3-step run."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import time

import pytest

from kd_jax.base.loader import load_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "smollm2" / "distill.yaml")


def _run(*args: str) -> str:
    """`python -m ARGS` from the repository root, on one CPU device (as a user runs it)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # not the test session's 8 fake devices: 4 rows on 2 cores
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    print(f"{args[0]}: {time.perf_counter() - t0:.1f} s")
    return p.stdout + p.stderr


def test_gguf_cli_help():
    out = _run("kd_jax.models.gguf", "--help")
    assert "--gguf" in out and "--out" in out


def test_recipe_config_keeps_6_of_30_teacher_layers():
    cfg = load_config(CONFIG)
    assert cfg.student.init == "teacher_layers" and len(cfg.student.teacher_layers) == 6
    assert all(0 <= i < 30 for i in cfg.student.teacher_layers) and 29 in cfg.student.teacher_layers
    assert cfg.teacher.hf_path == "runs/smollm2/teacher" and cfg.data.tokenizer is None
    assert cfg.data.traces == "runs/smollm2/data/traces.jsonl" and cfg.run_dir.endswith("runs/smollm2/distill")


@pytest.mark.slow
def test_recipe_runs_convert_traces_precompute_train_export(smollm2_dir, tmp_path):
    import torch
    import transformers

    data, store, runs = tmp_path / "data", tmp_path / "store", tmp_path / "runs"
    _run("kd_jax.demo.arithmetic", "--out", str(data), "--n", "16")
    overrides = [f"teacher.hf_path={smollm2_dir}", f"data.traces={data / 'traces.jsonl'}", f"data.store={store}",
                 f"run.output_dir={runs}", "data.seq_len=256", "train.global_batch_size=4", "train.steps=3",
                 "train.eval_every=0", "run.log_every=1", "checkpoint.async_save=false"]
    out = _run("kd_jax.precompute", "--config", CONFIG, *overrides)
    summary = json.loads(out[out.rindex("{\n"):out.rindex("\n}") + 2])
    assert summary["complete"] and summary["sequences"] == 16 and summary["k"] == 64

    _run("kd_jax.train", "--config", CONFIG, *overrides)
    run_dir = runs / "distill"
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    train = [m for m in metrics if m["split"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) for m in train)
    assert (run_dir / "checkpoints" / "3").is_dir()

    _run("kd_jax.export", "--run", str(run_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf", dtype=torch.float32)
    assert model.config.num_hidden_layers == 6 and model.config.vocab_size == 49152
    tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir / "hf")
    ids = tokenizer("Ana has 3 apples", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
