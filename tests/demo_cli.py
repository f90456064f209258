"""`python -m kd_jax.demo` run as a user runs it, in a child process: its memory is returned when it
ends instead of staying in the test process."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(out, *args, devices: int | None = None) -> str:
    """The demo's stdout; fails the test with the output's tail on a non-zero exit. `devices`: CPU
    devices (default: the demo's own choice, one per core up to 8)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the tests' 8 devices are not the demo's
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    p = subprocess.run([sys.executable, "-m", "kd_jax.demo", "--out", str(out), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout
