"""The metrics log of a training run: console lines, TensorBoard event files and metrics.jsonl in
the run directory, written by process 0 only.
"""

from __future__ import annotations

import json
import os

import jax
from tqdm import tqdm

from kd_jax.base.schema import RunConfig


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a blank or cut line (a run killed mid-write)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class Logger:
    """Console + TensorBoard + metrics.jsonl, on process 0 only. Resuming at `start`, lines of
    metrics.jsonl past `start` (logged after the checkpoint, by the run that was stopped) are
    dropped, so each step appears once."""

    def __init__(self, run_dir: str, run_cfg: RunConfig, start: int = 0):
        self.on = jax.process_index() == 0
        self.writer = None
        self.jsonl = None
        if not self.on:
            return
        if run_cfg.tensorboard:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(os.path.join(run_dir, "tb"))
        path = os.path.join(run_dir, "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if _logged_step(line) <= start]
            with open(path, "w") as f:
                f.writelines(kept)
        self.jsonl = open(path, "a")

    def write(self, step: int, prefix: str, values: dict[str, float]) -> None:
        if not self.on:
            return
        self.jsonl.write(json.dumps({"step": step, "split": prefix, **values}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in values.items():
                if v is not None:
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)
        text = " ".join(f"{k}={v:.4g}" for k, v in values.items() if v is not None)
        tqdm.write(f"[{prefix} step {step}] {text}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
