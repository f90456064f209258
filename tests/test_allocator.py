"""The glibc settings for XLA on CPU (kd_jax/base/allocator.py): the demo restarts itself with them,
the caller's own values and KD_JAX_ALLOCATOR=0 win, and `make test` exports the same values."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

from kd_jax.base.allocator import ENV

ROOT = pathlib.Path(__file__).resolve().parent.parent
START = "from kd_jax.base.allocator import restart_with_allocator as r; r('probe', ['a', 'b']); print('not restarted')"
PROBE = "import os, sys; print(sys.argv[1:], *(os.environ.get(k) for k in {keys}))"


def _run(tmp_path, **env) -> str:
    (tmp_path / "probe.py").write_text(PROBE.format(keys=sorted(ENV)))
    base = {k: v for k, v in os.environ.items() if k not in ENV and k != "KD_JAX_ALLOCATOR"}
    out = subprocess.run([sys.executable, "-c", START], env={**base, "PYTHONPATH": f"{tmp_path}:{ROOT}", **env},
                         cwd=tmp_path, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_restart_adds_the_settings_and_keeps_the_arguments(tmp_path):
    assert _run(tmp_path) == " ".join(["['a', 'b']", *(ENV[k] for k in sorted(ENV))])


def test_own_values_win_and_the_switch_turns_it_off(tmp_path):
    own = _run(tmp_path, MALLOC_ARENA_MAX="7")
    assert own.split()[2:] == ["7", ENV["MALLOC_MMAP_MAX_"], ENV["MALLOC_TRIM_THRESHOLD_"]]
    assert _run(tmp_path, KD_JAX_ALLOCATOR="0") == "not restarted"
    assert _run(tmp_path, **ENV) == "not restarted"


def test_make_test_exports_the_same_values():
    exported = dict(re.findall(r"^test: export (\w+) = (\S+)$", (ROOT / "Makefile").read_text(), re.M))
    assert exported == ENV


def test_the_demo_restarts_itself_with_the_settings():
    source = (ROOT / "kd_jax" / "demo" / "__main__.py").read_text()
    assert 'restart_with_allocator("kd_jax.demo", sys.argv[1:])' in source.split('if __name__ == "__main__":')[1]
