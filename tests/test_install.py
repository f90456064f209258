"""constraints.txt, checked on the files (no network, no pip): the exact versions `make demo` and
`make test` install, so a fresh clone gets the environment the README's numbers were measured in."""

from __future__ import annotations

import pathlib
import re

import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9][A-Za-z0-9.!+-]*)$")
KEY_PACKAGES = ("transformers", "tokenizers", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
                "tensorstore", "datasets", "numpy", "torch")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for n, line in enumerate(CONSTRAINTS.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = PIN.match(line)
        assert m, f"constraints.txt:{n}: not `name==version`: {line!r}"
        name = _canonical(m.group(1))
        assert name not in pins, f"constraints.txt:{n}: {name} pinned twice"
        pins[name] = m.group(2)
    return pins


def _pyproject_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return reqs


def _name(requirement: str) -> str:
    return _canonical(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip()).group(0))


def test_constraints_lines_are_exact_pins():
    assert CONSTRAINTS.is_file()
    assert _pins(), "constraints.txt pins nothing"


def test_key_packages_are_pinned():
    missing = [p for p in KEY_PACKAGES if p not in _pins()]
    assert not missing, f"constraints.txt does not pin {missing}"


def test_every_pyproject_dependency_is_pinned():
    pins = _pins()
    missing = sorted({_name(r) for r in _pyproject_requirements()} - set(pins))
    assert not missing, f"named in pyproject.toml but not pinned in constraints.txt: {missing}"


def test_torch_pin_equals_pyproject_extras():
    torch = [r.replace(" ", "") for r in _pyproject_requirements() if _name(r) == "torch"]
    assert torch, "pyproject's extras name torch"
    versions = {r.partition("==")[2] for r in torch}
    assert all("==" in r for r in torch) and len(versions) == 1, f"extras pin torch exactly, once: {torch}"
    assert _pins()["torch"] == versions.pop()


def test_every_makefile_pip_install_uses_constraints():
    lines = [ln for ln in (ROOT / "Makefile").read_text().splitlines()
             if "pip install" in ln and not ln.lstrip().startswith("#")]
    assert len(lines) >= 5, lines
    unconstrained = [ln.strip() for ln in lines if "-c constraints.txt" not in ln]
    assert not unconstrained, f"pip install without -c constraints.txt: {unconstrained}"
    base = next(ln for ln in (ROOT / "Makefile").read_text().splitlines() if ln.startswith("$(VENV)/.installed-base:"))
    assert {"pyproject.toml", "constraints.txt"} <= set(base.partition(":")[2].split()), base


def test_the_demo_runs_from_an_installed_wheel(tmp_path):
    """The demo's configs are package data: a wheel installed outside the checkout finds and loads them
    (the recipe never climbs out of the package), and `python -m kd_jax.demo --help` runs from it."""
    import shutil
    import subprocess
    import sys
    source, wheels, target = tmp_path / "source", tmp_path / "wheels", tmp_path / "site"
    # Built from a copy: setuptools' build/ folder in the checkout could hold files of an older build.
    shutil.copytree(ROOT / "kd_jax", source / "kd_jax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(source)], check=True, capture_output=True)
    (wheel,) = wheels.glob("kd_jax-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    probe = ("import os, kd_jax.demo.recipe as r, kd_jax.demo.prune as p; from kd_jax.base.loader import load_config; "
             "print(r.CONFIGS); [load_config(os.path.join(r.CONFIGS, n)) for n in ('student.yaml', 'teacher.yaml')]; "
             "assert r.ROWS and p.ROWS")  # the rows files (kd_jax/demo/rows/) are package data too
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))
    help_ = subprocess.run([sys.executable, "-m", "kd_jax.demo", "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert help_.returncode == 0 and "--out" in help_.stdout, help_.stderr
