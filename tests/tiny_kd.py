"""A tiny teacher folder for store/precompute tests: the demo's byte-level BPE tokenizer with a
ChatML template (kd_jax.demo.arithmetic) trained in-process, a random llama teacher whose vocab is
padded past the tokenizer's (as Qwen's is), and a JSONL of R1-style traces; the train runs the
tests share: their overrides, a random 2-layer student (`STUDENT`), the commands run in a child
process (`cli`, `run_cli`), the logged losses (`train_losses`) and an interrupt after the first
checkpoint (`signal_after_first_checkpoint`) (test support)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import hf_tiny

from kd_jax.demo.arithmetic import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

# A random width-16 llama student (student.init=random, student.architecture): set vocab_size to the teacher's.
STUDENT = {"model_type": "llama", "vocab_size": None, "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
           "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def traces(n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        steps = [f"Step {j}: add {i + j} and {j + 1} to get {i + 2 * j + 1}." for j in range(1 + i % 4)]
        rows.append({"prompt": f"What is {i} plus {i + 3}? Think step by step.",
                     "reasoning": "\n\n".join(steps) * (1 + i % 3),
                     "answer": f"The answer is {2 * i + 3}."})
    return rows


def step_length(text: str, index: int, row: dict) -> float:
    """A data.step_scorer (test support): a step weighs its length in characters / 40."""
    return len(text) / 40


def make(root: str, n_traces: int = 12, pad_vocab: int = 16) -> tuple[str, str]:
    """(teacher folder with tokenizer, traces.jsonl path) under `root`."""
    rows = traces(n_traces)
    tok = train_tokenizer([r["prompt"] + r["reasoning"] + r["answer"] for r in rows], vocab_size=300)
    model = hf_tiny.build("llama3", vocab_size=len(tok) + pad_vocab, num_hidden_layers=2)
    teacher = os.path.join(root, "teacher")
    model.save_pretrained(teacher)
    tok.save_pretrained(teacher)
    path = os.path.join(root, "traces.jsonl")
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return teacher, path


def store_args(root: str) -> list[str]:
    """Overrides that build the tiny KD store of `make(root)` (precompute) and read it (train)."""
    return [f"teacher.hf_path={root}/teacher", "teacher.param_dtype=float32", "teacher.dtype=float32",
            "teacher.attention=blockwise",
            f"data.traces={root}/traces.jsonl", f"data.store={root}/store", "data.top_k=8", "data.seq_len=128",
            "precompute.chunk_tokens=256", "precompute.bucket=32", "precompute.batch_tokens=1024"]


def build_store(root: str) -> None:
    """`make(root)` with 40 traces, then its KD store on this process's devices."""
    from kd_jax.base.loader import load_config
    from kd_jax.core.precompute import precompute
    make(root, n_traces=40)
    precompute(load_config(None, store_args(root) + ["mesh.data=-1", f"run.output_dir={root}/runs"]),
               show_progress=False)


def train_args(root: str, name: str, steps: int, **extra) -> list[str]:
    """Overrides for a short train run `name` on that store: a 1-layer student cut from the teacher,
    blockwise attention (exact resume and two processes are tested on it), checkpoints every 4
    steps, metrics every step; `extra` (dotted keys) overrides any of them."""
    kw = {"run.output_dir": f"{root}/runs", "run.name": name, "run.log_every": 1, "run.tensorboard": "false",
          "student.init": "teacher_layers", "student.teacher_layers": "[1]", "student.dtype": "float32",
          "student.attention": "blockwise",
          "train.steps": steps, "train.global_batch_size": 8, "train.eval_every": 0, "optim.lr": 3e-3,
          "optim.warmup_steps": 2, "data.eval_fraction": 0.1, "checkpoint.every_steps": 4, "loss.beta": 0.5,
          "loss.chunk_size": 128, **extra}
    return store_args(root) + [f"{k}={v}" for k, v in kw.items()]


class RecordingBar:
    """A stand-in for kd_jax.base.progress.bar that records every bar made (`RecordingBar.made`; reset it
    per test): its keyword arguments, its count and whether it was closed."""
    made: list["RecordingBar"] = []

    def __init__(self, **kwargs):
        self.kwargs, self.n, self.closed = kwargs, 0, False
        RecordingBar.made.append(self)

    def update(self, n=1):
        self.n += n

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        self.closed = True


def cli(module: str, args: list[str], **popen) -> subprocess.Popen:
    """`python -m module args` in a child process on 8 fake CPU devices, stdout and stderr together."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def run_cli(module: str, args: list[str]) -> str:
    """`cli` to its end, which must be a success; its output."""
    out, _ = (p := cli(module, args)).communicate(timeout=300)
    assert p.returncode == 0, out.decode()[-3000:]
    return out.decode()


def train_losses(root: str, name: str) -> dict[int, float]:
    """step -> train loss of run `name` under root/runs; a resumed run rewrites the steps after its
    checkpoint (last one wins)."""
    out = {}
    with open(f"{root}/runs/{name}/metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if row["split"] == "train":
                out[row["step"]] = row["loss"]
    return out


def signal_after_first_checkpoint(proc: subprocess.Popen, ckpts: str, sig) -> bytes:
    """Deliver `sig` to a train process once its first checkpoint in `ckpts` is final; its output."""
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    return proc.communicate(timeout=120)[0]
