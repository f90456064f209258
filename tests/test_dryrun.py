"""`--dry-run`: every recipe sizes offline on a fake mesh of its own device count (analytic path),
with parameter counts of the real models; a tiny config compiles ahead of time on 8 CPU devices."""

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "configs", "recipes")

# recipe -> (devices for train, local devices for precompute, student params, teacher params).
# Parameter counts of the published models (model cards / safetensors totals).
EXPECTED = {
    "r1_qwen7b_to_qwen2.5_1.5b_v5e32.yaml": (32, 4, 1.54e9, 7.62e9),
    "r1_qwen7b_to_qwen2.5_1.5b_8xh100.yaml": (8, 8, 1.54e9, 7.62e9),
    "qwen3_8b_to_qwen3_0.6b_8xh100.yaml": (8, 8, 0.60e9, 8.19e9),
    "llama3.1_8b_to_llama3.2_1b_8xh100.yaml": (8, 8, 1.24e9, 8.03e9),
}
NON_EMBEDDING = {"qwen3_8b_to_qwen3_0.6b_8xh100.yaml": 0.44e9}


def _dry_run(module: str, config: str, devices: int, *args: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", module, "--config", config, "--dry-run", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("dry-run summary: "))
    return json.loads(line.removeprefix("dry-run summary: ")) | {"_stdout": out.stdout}


def test_every_recipe_is_listed():
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(RECIPES, "*.yaml"))) == sorted(EXPECTED)


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_recipe_dry_run(recipe):
    devices, local, student, teacher = EXPECTED[recipe]
    config = os.path.join(RECIPES, recipe)
    s = _dry_run("kd_jax.train", config, devices, "--no-compile")
    assert abs(s["params"] / student - 1) < 0.01, s["params"]
    if recipe in NON_EMBEDDING:
        assert abs(s["params_without_embedding"] / NON_EMBEDDING[recipe] - 1) < 0.01
    assert s["devices"] == devices and "compiled" not in s
    a = s["analytic"]
    # fp32 master weights sharded over fsdp (and tensor): 4 bytes/param / shards, within padding
    shards = s["mesh"]["fsdp"] * s["mesh"]["tensor"]
    assert abs(a["params"] / (4 * s["params"] / shards) - 1) < 0.01
    assert a["optimizer"] == 2 * a["params"] and a["grads"] >= a["params"]
    assert 0 < a["loss"] < a["total"] and 0 < a["activations"] < a["total"]
    assert a["total"] == sum(v for k, v in a.items() if k != "total")
    assert s["fits"] is True and a["total"] <= s["device_memory"]
    assert "config from student.architecture" in s["_stdout"]  # no network: the recipe's architecture

    p = _dry_run("kd_jax.precompute", config, local, "--no-compile")
    assert abs(p["params"] / teacher - 1) < 0.01, p["params"]
    assert abs(p["analytic"]["params"] / (2 * p["params"] / (p["mesh"]["fsdp"] * p["mesh"]["tensor"])) - 1) < 0.01
    assert p["devices"] == local and p["fits"] is True


def test_dry_run_reports_a_misfit():
    """The same recipe with 4x the sequences per device no longer fits: exit status 1."""
    config = os.path.join(RECIPES, "r1_qwen7b_to_qwen2.5_1.5b_v5e32.yaml")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=32")
    out = subprocess.run([sys.executable, "-m", "kd_jax.train", "--config", config, "--dry-run", "--no-compile",
                          "train.grad_accum=1", "train.global_batch_size=128"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "does NOT fit" in out.stdout, out.stdout + out.stderr


def test_tiny_config_compiles_ahead_of_time():
    """On 8 local (fake) devices the real train step and teacher pass compile; XLA's numbers are
    reported and the analytic estimate is of the same size."""
    config = os.path.join(ROOT, "configs", "tiny_llama.yaml")
    s = _dry_run("kd_jax.train", config, 8, "train.global_batch_size=8", "mesh.data=2", "mesh.fsdp=4",
                 "mesh.device_memory_gib=1")
    c = s["compiled"]
    assert c["total_bytes"] == c["argument_bytes"] + c["output_bytes"] - c["alias_bytes"] + c["temp_bytes"]
    # arguments: fp32 params + Adam mu, nu, sharded 4 ways like the analytic estimate says (+ batch)
    state = s["analytic"]["params"] + s["analytic"]["optimizer"]
    assert state <= c["argument_bytes"] <= state + s["analytic"]["batch"] + 4096
    assert c["alias_bytes"] > 0.9 * state  # params and optimizer state are donated
    assert 0.3 < s["analytic"]["total"] / c["total_bytes"] < 3
    assert s["fits"] is True
    p = _dry_run("kd_jax.precompute", config, 8)
    assert p["compiled"]["total_bytes"] > 0 and 0.3 < p["analytic"]["total"] / p["compiled"]["total_bytes"] < 3
