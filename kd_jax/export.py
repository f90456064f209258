"""`python -m kd_jax.export --run RUN_DIR [--step N] [--out DIR] [--dtype bfloat16]`: a trained
student as a Hugging Face folder (config.json, safetensors, tokenizer) via `save_hf`.

One process: it reads the whole checkpoint (whatever the number of processes that wrote it) onto
this host's devices, so run it on one host, not on every worker of a slice."""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax
from flax import nnx

from kd_jax import sharding
from kd_jax.checkpoint import Checkpointer
from kd_jax.config import load_config
from kd_jax.models import Decoder, save_hf
from kd_jax.models.hf import load_tokenizer
from kd_jax.models.source import source_config
from kd_jax.step import make_optimizer


def restore_student(run_dir: str, step: int | None = None):
    """(student model, its step, the run config) from the checkpoints of `run_dir` (default: latest step)."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir} has no config.yaml: pass the run directory that kd_jax.train wrote")
    cfg = load_config(path)
    # the run may have moved since it was trained: its checkpoints are where run_dir is now
    run_dir = os.path.abspath(run_dir)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=os.path.dirname(run_dir),
                                                           name=os.path.basename(run_dir)))
    mesh = sharding.make_mesh(-1, 1, 1)
    # The checkpoint holds the whole train state; its abstract shape comes from the same builders.
    student_cfg = source_config(cfg.student, cfg.teacher)
    graphdef, abs_params = nnx.split(nnx.eval_shape(lambda: Decoder(student_cfg, rngs=nnx.Rngs(0))))
    replicated = sharding.named_sharding(mesh, None)
    abs_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_params,
                              sharding.state_shardings(abs_params, mesh))
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    abs_opt = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                           jax.eval_shape(tx.init, abs_params))
    abs_state = {"params": abs_params, "opt_state": abs_opt,
                 "nonfinite": jax.ShapeDtypeStruct((), jax.numpy.int32, sharding=replicated)}
    ckpt = Checkpointer(cfg.checkpoint_dir, cfg.checkpoint)
    try:
        state, extra = ckpt.restore(step, abs_state)
    finally:
        ckpt.close()
    return nnx.merge(graphdef, state["params"]), extra.get("step"), cfg


def export(run_dir: str, out: str | None = None, step: int | None = None, dtype: str | None = None) -> str:
    """Write the student of `run_dir` at `step` (default: latest) as an HF folder with the
    tokenizer to `out` (default: RUN_DIR/hf or RUN_DIR/hf-<step>). Returns the folder."""
    model, restored_step, cfg = restore_student(run_dir, step)
    out = out or os.path.join(run_dir, "hf" if step is None else f"hf-{step}")
    tokenizer = load_tokenizer(cfg.tokenizer)
    save_hf(model, out, tokenizer=tokenizer, dtype=dtype)
    print(f"exported step {restored_step} of {run_dir} to {out}")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True, help="run directory written by kd_jax.train (holds config.yaml)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN/hf)")
    parser.add_argument("--dtype", default=None, help="saved dtype, e.g. bfloat16 (default: the parameters')")
    args = parser.parse_args(argv)
    try:
        export(args.run, args.out, args.step, args.dtype)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
