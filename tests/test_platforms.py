"""A quiet start: the commands pick jax's platforms before it starts (kd_jax.base.cli.choose_platforms),
so libtpu (installed with the test extra) is not started on a machine without a TPU, where it printed
its start-up errors before the command's first line; a TPU VM, a GPU or the user's JAX_PLATFORMS keep
jax's own choice."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys

import pytest

from kd_jax.base import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBTPU_START = ("Failed to find host bounds", "unexpected worker hostname", "Source Location Trace")


def _files(*present: str):
    """A stand-in for glob.glob over a machine holding only the device files `present`."""
    return lambda pattern: [f for f in present if fnmatch.fnmatch(f, pattern)]


def test_cpu_only_where_no_accelerator_is_here():
    assert cli.local_platforms({}, _files()) == "cpu"
    assert cli.local_platforms({}, _files("/dev/vfio/vfio", "/dev/null")) == "cpu"  # VFIO's container alone: no TPU
    assert cli.local_platforms({"CUDA_VISIBLE_DEVICES": ""}, _files()) == "cpu"
    for env, files in [({}, ("/dev/vfio/0",)), ({}, ("/dev/accel0",)), ({}, ("/dev/nvidia0", "/dev/nvidiactl")),
                       ({"TPU_ACCELERATOR_TYPE": "v5litepod-8"}, ()), ({"TPU_WORKER_ID": "0"}, ()),
                       ({"CUDA_VISIBLE_DEVICES": "0,1"}, ()), ({"JAX_PLATFORMS": ""}, ())]:
        assert cli.local_platforms(env, _files(*files)) is None, (env, files)  # jax's own choice


def test_a_tpu_vm_keeps_its_tpu(monkeypatch):
    """On a (faked) v5e VM the command leaves JAX_PLATFORMS unset and jax's platforms alone."""
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(cli.glob, "glob", _files("/dev/vfio/0", "/dev/vfio/1", "/dev/vfio/vfio"))
    cli.choose_platforms()
    assert "JAX_PLATFORMS" not in os.environ


def test_a_command_starts_without_libtpus_errors():
    """`python -m kd_jax.train --dry-run` on this machine, JAX_PLATFORMS unset: no libtpu start-up lines."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    if cli.local_platforms(env) is None:
        pytest.skip("an accelerator (or its variables) is here: jax's own choice starts it")
    out = subprocess.run([sys.executable, "-m", "kd_jax.train", "--config",
                          os.path.join(ROOT, "configs", "tiny_llama.yaml"), "--dry-run", "--no-compile"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert not [line for line in LIBTPU_START if line in out.stderr], out.stderr[-2000:]
    assert '"platform": "cpu"' in out.stdout
