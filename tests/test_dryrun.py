"""`--dry-run`: every recipe sizes offline on a fake mesh of its own device count (analytic path),
with parameter counts of the real models (the online-teacher recipes count the teacher in the
train step); a tiny config compiles ahead of time on 8 CPU devices, offline and with an online
teacher plus hidden-alignment projections."""

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
    "r1_qwen7b_to_qwen2.5_1.5b_v5e32_online.yaml": (32, 4, 1.54e9, 7.62e9),
    "r1_qwen7b_to_qwen2.5_1.5b_8xh100_online.yaml": (8, 8, 1.54e9, 7.62e9),
    "r1_qwen7b_to_qwen2.5_1.5b_8xh100_online_hidden.yaml": (8, 8, 1.54e9, 7.62e9),
}
# Online recipes: (hidden-alignment pairs, projection shape) of their teacher in the train step.
ONLINE = {"r1_qwen7b_to_qwen2.5_1.5b_v5e32_online.yaml": (0, None),
          "r1_qwen7b_to_qwen2.5_1.5b_8xh100_online.yaml": (0, None),
          "r1_qwen7b_to_qwen2.5_1.5b_8xh100_online_hidden.yaml": (28, [28, 1536, 3584])}
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
    if recipe in ONLINE:
        _check_online_teacher(s, teacher, *ONLINE[recipe])
        p = _dry_run("kd_jax.precompute", config, local, "--no-compile")
        assert p["tokens_only"] is True and p["fits"] is True  # data.top_k=0: precompute only tokenizes
        return
    assert "teacher" not in s and not any(k.startswith(("teacher_", "hidden_", "align_")) for k in a)

    p = _dry_run("kd_jax.precompute", config, local, "--no-compile")
    assert abs(p["params"] / teacher - 1) < 0.01, p["params"]
    assert abs(p["analytic"]["params"] / (2 * p["params"] / (p["mesh"]["fsdp"] * p["mesh"]["tensor"])) - 1) < 0.01
    assert p["devices"] == local and p["fits"] is True


def _check_online_teacher(s: dict, teacher: float, pairs: int, proj) -> None:
    """The online teacher's rows: its bf16 weights sharded like the student's (2 bytes/param /
    shards), its gathered weights, forward activations, loss chunk; alignment when it has pairs."""
    t, a = s["teacher"], s["analytic"]
    assert t["mode"] == "online" and t["param_dtype"] == "bfloat16" and abs(t["params"] / teacher - 1) < 0.01
    shards = s["mesh"]["fsdp"] * s["mesh"]["tensor"]
    assert abs(a["teacher_params"] / (2 * t["params"] / shards) - 1) < 0.01
    assert min(a["teacher_gathered_weights"], a["teacher_activations"], a["teacher_loss"]) > 0
    assert t["hidden_pairs"] == pairs and t["align_shape"] == proj
    assert ("hidden_alignment" in a) == bool(pairs) and ("align_state" in a) == bool(proj)
    if proj:  # fp32 [M, D_s, D_t] sharded over fsdp on D_s: params, grads (+ accumulator), Adam mu, nu
        M, D, E = proj
        assert a["align_state"] == 5 * 4 * M * D * E // s["mesh"]["fsdp"]
    out = s["_stdout"]
    assert "teacher parameters (online, bfloat16)" in out and "teacher (online, in the train step)" in out


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


def test_online_teacher_compiles_ahead_of_time():
    """The tiny config with the teacher in the step (twice the student's width, so hidden alignment
    adds [2, 64, 128] projections to the state) lowers the real online step: its compiled memory
    holds the teacher's parameters and the projections' train state on top of the offline step's."""
    config = os.path.join(ROOT, "configs", "tiny_llama.yaml")
    args = ("train.global_batch_size=8", "mesh.data=2", "mesh.fsdp=4", "mesh.device_memory_gib=1")
    teacher = json.dumps({"model_type": "llama", "vocab_size": 256, "hidden_size": 128, "intermediate_size": 256,
                          "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                          "max_position_embeddings": 512, "tie_word_embeddings": True})
    off = _dry_run("kd_jax.train", config, 8, *args, f"teacher.architecture={teacher}")
    on = _dry_run("kd_jax.train", config, 8, *args, f"teacher.architecture={teacher}", "teacher.mode=online",
                  "teacher.param_dtype=bfloat16", "loss.hidden.weight=0.5")
    assert on["teacher"]["align_shape"] == [2, 64, 128] and on["teacher"]["hidden_pairs"] == 2
    a, c, c_off = on["analytic"], on["compiled"], off["compiled"]
    # arguments: the offline step's (less the top-K arrays the online step leaves unused, which jit
    # prunes) plus the teacher's bf16 shards and the projections' fp32 state
    extra = a["teacher_params"] + a["align_state"] * 3 // 4  # of its 4 fp32 copies, the gradient is no argument
    assert c["argument_bytes"] >= c_off["argument_bytes"] - off["analytic"]["batch"] + extra
    assert c["temp_bytes"] > c_off["temp_bytes"] and c["total_bytes"] > c_off["total_bytes"]
    assert a["total"] > off["analytic"]["total"] and 0.3 < a["total"] / c["total_bytes"] < 3
    assert on["fits"] is True
