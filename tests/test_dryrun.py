"""`--dry-run`: every recipe sizes offline on a fake mesh of its own device count (analytic path),
with parameter counts of the real models (the online-teacher recipes count the teacher in the
train step), attention resolved for the recipe's mesh.platform, and the longest data.seq_len its
header states (`--max-seq-len`); a tiny config compiles ahead of time on 8 CPU devices, offline and
with an online teacher plus hidden-alignment projections; the analytic attention memory of xla and
blockwise against XLA's compiled numbers; the `--max-seq-len` search on a tiny config."""

import dataclasses
import glob
import io
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from kd_jax.base import sharding
from kd_jax.base.loader import load_config
from kd_jax.fit import dryrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "configs", "recipes")

# recipe -> (devices for train, local devices for precompute, student params, teacher params).
# Parameter counts of the published models (model cards / safetensors totals).
EXPECTED = {
    "r1_qwen7b_to_qwen2.5_1.5b_v5e32.yaml": (32, 4, 1.54e9, 7.62e9),
    "r1_qwen7b_to_qwen2.5_1.5b_8xh100.yaml": (8, 8, 1.54e9, 7.62e9),
    "r1_qwen7b_to_qwen2.5_1.5b_v5e32_32k.yaml": (32, 4, 1.54e9, 7.62e9),
    "r1_qwen7b_to_qwen2.5_1.5b_8xh100_32k.yaml": (8, 8, 1.54e9, 7.62e9),
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
KERNEL = {"gpu": "cudnn", "tpu": "splash"}  # what attention auto is on the recipe's mesh.platform
# "# longest data.seq_len that fits (--max-seq-len): train N, precompute M" (or "precompute n/a")
LONGEST = re.compile(r"longest data\.seq_len that fits \(--max-seq-len\): train (\d+), precompute (\d+|n/a)")


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
    assert s["attention"] == {"student": KERNEL[s["platform"]]} | (
        {"teacher": KERNEL[s["platform"]]} if recipe in ONLINE else {})
    _check_longest(recipe, config, devices, local, s["seq_len"])
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


def _longest(module: str, config: str, devices: int) -> int | None:
    out = _dry_run(module, config, devices, "--max-seq-len", "--no-compile")
    if out.get("tokens_only"):
        return None
    line = next(x for x in out["_stdout"].splitlines() if x.startswith("longest data.seq_len that fits: "))
    assert out["max_seq_len"] == out["seq_len"] == int(line.split()[4]) and out["fits"] is True
    return out["max_seq_len"]


def _check_longest(recipe: str, config: str, devices: int, local: int, seq_len: int) -> None:
    """The recipe's header states what `--max-seq-len` finds, for train and for precompute, and
    its own data.seq_len is no longer."""
    with open(config) as f:
        stated = LONGEST.search(f.read())
    assert stated, f"{recipe}: no '# longest data.seq_len that fits (--max-seq-len): ...' line in its header"
    train = _longest("kd_jax.train", config, devices)
    precompute = _longest("kd_jax.precompute", config, local)
    assert (str(train), str(precompute or "n/a")) == stated.groups(), (recipe, train, precompute)
    assert seq_len <= min(train, precompute or train)


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
    """The v5e-32 recipe at 32k tokens on its fsdp=4 mesh no longer fits (its _32k variant spreads
    the state over all 32 chips): exit status 1."""
    config = os.path.join(RECIPES, "r1_qwen7b_to_qwen2.5_1.5b_v5e32.yaml")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=32")
    out = subprocess.run([sys.executable, "-m", "kd_jax.train", "--config", config, "--dry-run", "--no-compile",
                          "data.seq_len=32768"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
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


def test_sampled_targets_compile_the_sampled_pass():
    """precompute.targets=sampled: the dry run compiles the teacher pass precompute runs (K draws per
    position: threefry keys, a searchsorted per draw), not the top-K pass it compiled before."""
    cfg = _tiny("precompute.targets=sampled", "mesh.data=1")
    model_cfg, _ = dryrun.model_config(cfg.teacher, "teacher")
    mesh = sharding.mesh_from_config(cfg.mesh, devices=jax.devices()[:1])
    hlo = dryrun.compiled_precompute(cfg, model_cfg, mesh, 2, 128).as_text()
    assert "threefry" in hlo and "searchsorted" in hlo and "TopK" not in hlo
    out = io.StringIO()
    s = dryrun.report(_tiny("precompute.targets=sampled"), "precompute", out=out)  # compiled on the 8 CPU devices
    assert s["targets"] == "sampled" and "memory of the teacher's sampled pass (8 draws), compiled" in out.getvalue()


def test_pruned_student_sizes_the_cut_at_start():
    """student.init=pruned: the student is cut from the whole teacher at start (kd_jax.core.prepare),
    after calibration forwards. The dry run prints that peak (the teacher's parameters in its param
    dtype, a calibration batch's forward on every device, the cut student), checks the fit against
    it when it is above the step's, and its calibration forward is of the size XLA compiles for
    kd_jax.models.prune's scoring pass."""
    from kd_jax.core.state import abstract_params
    from kd_jax.models import prune

    overrides = ("student.init=pruned", "student.prune.layers=1", "student.prune.calibration_batch_size=4",
                 "data.seq_len=512")
    out = io.StringIO()
    s = dryrun.report(_tiny(*overrides), "train", compile=False, out=out)
    cut, t = s["prune"], dryrun.target(_tiny(*overrides), "train")
    mesh = sharding.mesh_from_config(_tiny("mesh.data=1").mesh, devices=jax.devices()[:1])
    teacher_params = dryrun.param_info(t.cut_from, mesh).count
    assert cut["teacher_param_dtype"] == "float32" and cut["prune_teacher_params"] == 4 * teacher_params  # whole
    assert cut["total"] == sum(v for k, v in cut.items() if k.startswith("prune_")) > s["analytic"]["total"]
    text = out.getvalue()
    assert "memory of the cut at start" in text and "teacher parameters (whole, float32)" in text
    assert "calibration forward (4 x 512 tokens)" in text
    limit = (cut["total"] + s["analytic"]["total"]) / 2 / 2**30  # the step fits, the cut does not
    s = dryrun.report(_tiny(*overrides, f"mesh.device_memory_gib={limit}"), "train", compile=False, out=out)
    assert s["fits"] is False and "used by the cut at start" in out.getvalue()
    # the scoring pass (prune._sums) compiled on one CPU device for the same teacher and batch
    state = {tuple(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(abstract_params(t.cut_from, mesh)[1])}
    batch = {k: jax.ShapeDtypeStruct((4, 512), jnp.int32) for k in ("tokens", "positions", "segment_ids")}
    with jax.set_mesh(mesh):
        compiled = prune._sums.lower(t.cut_from, {k[1]: v for k, v in state.items() if k[0] == "layers"},
                                     state["embed",], state["final_norm",], batch).compile()
    forward = dryrun.prune_estimate(_tiny(*overrides), t.model_cfg, t.cut_from, mesh)["prune_calibration"]
    assert 0.3 < forward / dryrun.compiled_memory(compiled)["temp_bytes"] < 3


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


def _tiny(*overrides: str):
    """configs/tiny_llama.yaml, bf16 compute, positions up to 64k, one row per device of 8."""
    return load_config(os.path.join(ROOT, "configs", "tiny_llama.yaml"),
                       ["student.dtype=bfloat16", "student.architecture.max_position_embeddings=65536",
                        "train.global_batch_size=8", *overrides])


def test_attention_memory_against_xla():
    """The analytic estimate per attention implementation against XLA's compiled train step (CPU,
    one device, one row of T tokens; attention_block 512): xla and blockwise within the band the
    other tests use, and from T = 1024 to 2048 the dense scores' growth is many times the
    blockwise tiles' (quadratic against linear), in both accountings."""
    cfg = _tiny("train.global_batch_size=1", "mesh.data=1")
    base, _ = dryrun.model_config(cfg.student, "student", cfg.teacher)
    mesh = sharding.mesh_from_config(cfg.mesh, devices=jax.devices()[:1])
    temp, analytic = {}, {}
    for impl in ("xla", "blockwise"):
        model_cfg = dataclasses.replace(base, attention=impl)
        for T in (1024, 2048):
            cfg_T = dryrun.with_seq_len(cfg, T)
            c = dryrun.compile_train(cfg_T, model_cfg, mesh)
            a = dryrun.analytic_total(dryrun.train_estimate(cfg_T, model_cfg, mesh))
            assert 0.3 < a / c["total_bytes"] < 3, (impl, T, a, c)
            temp[impl, T], analytic[impl, T] = c["temp_bytes"], a
    for d in (temp, analytic):
        assert d["xla", 2048] - d["xla", 1024] > 4 * (d["blockwise", 2048] - d["blockwise", 1024]) > 0, d


def test_max_seq_len_search():
    """On a tiny config with 64 MiB per device: the longest multiple of 128 whose analytic estimate
    fits (the next one does not), the table printed at that length, compiled on the 8 local
    devices as confirmation; blockwise attention reaches further than xla; the command prints the
    same length."""
    cfg = _tiny("mesh.device_memory_gib=0.0625")
    limit = 64 * 2**20
    buf = io.StringIO()
    s = dryrun.max_seq_len_report(cfg, "train", compile=True, out=buf)
    n = s["max_seq_len"]
    t = dryrun.target(cfg, "train")
    total = lambda T: dryrun.analytic_total(dryrun.estimate(dryrun.with_seq_len(cfg, T), t))  # noqa: E731
    assert n % 128 == 0 and 128 <= n < 65536 and total(n) <= limit < total(n + 128), (n, total(n))
    assert s["seq_len"] == n and s["fits"] is True and s["compiled"]["total_bytes"] <= limit
    text = buf.getvalue()
    assert f"longest data.seq_len that fits: {n} " in text and "the compiled step confirms it" in text
    assert s["attention"] == {"student": "xla"} and s["platform"] == "cpu"  # auto on this machine
    flash = dryrun.longest_seq_len(_tiny("mesh.device_memory_gib=0.0625", "student.attention=blockwise"),
                                   dryrun.target(_tiny("student.attention=blockwise"), "train"), limit)[0]
    assert flash > 2 * n
    cli = _dry_run("kd_jax.train", os.path.join(ROOT, "configs", "tiny_llama.yaml"), 8, "--max-seq-len",
                   "--no-compile", "student.dtype=bfloat16", "student.architecture.max_position_embeddings=65536",
                   "train.global_batch_size=8", "mesh.device_memory_gib=0.0625")
    assert cli["max_seq_len"] == n and "compiled" not in cli


def test_platform_resolves_auto():
    """mesh.platform picks what attention auto is in the dry run: splash on tpu, cudnn on gpu, xla on cpu."""
    for platform, impl in (("tpu", "splash"), ("gpu", "cudnn"), ("cpu", "xla")):
        t = dryrun.target(_tiny(f"mesh.platform={platform}"), "train")
        assert (t.platform, t.platform_from, t.model_cfg.attention) == (platform, "mesh.platform", impl)
    t = dryrun.target(_tiny("mesh.platform=gpu", "student.attention=blockwise"), "train")
    assert t.model_cfg.attention == "blockwise"
    gpu = dryrun.target(_tiny("mesh.platform=gpu"), "train").model_cfg
    assert dryrun.compile_stand_in(gpu)[0].attention == "blockwise"
