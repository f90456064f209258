"""`--dry-run --topology CHIP:AxB`: a TPU slice's chips from libtpu as compile targets on this CPU
(kd_jax/fit/topology.py), the train step and the teacher pass compiled for them by the real TPU
compiler, the memory, cost and roofline report, and one clear line without libtpu."""

from __future__ import annotations

import importlib.util
import io
import os

import pytest

from kd_jax.base.cli import parse_command
from kd_jax.base.loader import load_config
from kd_jax.fit import dryrun
from kd_jax.fit import topology as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(*overrides: str):
    return load_config(os.path.join(ROOT, "configs", "tiny_llama.yaml"),
                       ["student.dtype=bfloat16", "train.global_batch_size=8", "mesh.data=-1", *overrides])


def test_parse_names_chips_and_refuses_the_rest():
    t = tl.parse("v5e:4x8")
    assert (t.chip.name, t.chips, t.host_chips, t.chip.hbm_gib) == ("v5e", 32, 4, 16)
    assert tl.parse("v5p:2x2x2").chips == 8 and tl.parse("v6e:2x2").chip.peak_flops == 918e12
    for bad in ("v4:2x2x2", "v5e", "tpu-v5e-32"):
        with pytest.raises(tl.TopologyError, match="supported chips: v5e, v5p, v6e"):
            tl.parse(bad)


def test_parse_refuses_shapes_the_chip_cannot_take():
    """v5e and v6e slices are AxB, v5p's AxBxC, h100 N or HOSTSxN, and no number is 0: refused by the
    parser, before libtpu (whose compiler aborts the process on a v5e:4x8x2) or the estimate (which
    divided by the 0 GPUs of h100:0)."""
    for bad, said in [("v5e:4x8x2", "v5e takes v5e:AxB (a 2-D slice), e.g. v5e:4x8"), ("v5e:4", "v5e takes v5e:AxB"),
                      ("v6e:2x2x1", "v6e takes v6e:AxB"), ("v5p:2x2", "v5p takes v5p:AxBxC (a 3-D slice)"),
                      ("h100:1x2x8", "h100 takes h100:N or h100:HOSTSxN"),
                      ("h100:0", "every number must be at least 1, e.g. h100:8"), ("h100:0x8", "at least 1"),
                      ("v5e:0x4", "at least 1")]:
        with pytest.raises(tl.TopologyError) as e:
            tl.parse(bad)
        assert str(e.value).startswith(f"--topology '{bad}': ") and said in str(e.value), str(e.value)


@pytest.mark.parametrize("entry, name", [("precompute", "v5e:4x8x2"), ("train", "h100:0"), ("precompute", "h100:0"),
                                         ("train", "h100:0x8")])
def test_a_topology_the_chip_cannot_take_is_one_line_before_any_work(entry, name, capsys):
    """The commands' --topology (kd_jax.fit.dryrun.main): precompute on v5e:4x8x2 had compiled for
    "v5e:2x2x1" and exited 0, h100:0 ended in a ZeroDivisionError."""
    with pytest.raises(SystemExit) as e:
        dryrun.main(_tiny(), entry, topology=name)
    assert str(e.value).startswith(f"error: --topology '{name}': ") and "\n" not in str(e.value)
    assert capsys.readouterr().out == ""  # nothing sized or compiled first


def test_no_compile_with_a_topology_is_one_line(capsys):
    """--topology is a compile for that hardware (as MaxText's train_compile.py): with --no-compile
    the two flags contradict each other, and the command says so instead of compiling anyway."""
    with pytest.raises(SystemExit) as e:
        parse_command(["--config", os.path.join(ROOT, "configs", "tiny_llama.yaml"), "--topology", "v5e:2x2",
                       "--no-compile"], dry_run=True)
    assert e.value.code == 1 and capsys.readouterr().err == (
        "error: --topology v5e:2x2 compiles for that hardware, which --no-compile forbids; drop --no-compile, or "
        "drop --topology for the analytic estimate alone\n")


def test_sampled_targets_compile_the_sampled_pass():
    """precompute.targets=sampled: the pass compiled for the slice is the one precompute runs (K draws
    per position, kd_jax.core.precompute.sampled_logprobs), not the top-K pass."""
    out = io.StringIO()
    s = dryrun.report(_tiny("precompute.targets=sampled", "precompute.batch_tokens=1024"), "precompute", out=out,
                      topology=tl.parse("v5e:2x2"))
    assert s["targets"] == "sampled" and s["compiled"]["total_bytes"] > 0
    assert "memory of the teacher's sampled pass (8 draws), compiled for v5e:2x2" in out.getvalue()


def test_roofline_is_the_slower_of_compute_and_memory():
    chip = tl.CHIPS["v5e"]
    r = tl.roofline(chip, flops=197e12, bytes_accessed=819e9 / 2, tokens=1000, model_flops=4 * 98.5e12, chips=4)
    assert r["floor_s"] == pytest.approx(1.0) and r["bound"] == "compute" and r["memory_s"] == pytest.approx(0.5)
    assert r["tokens_per_s"] == pytest.approx(1000) and r["mfu"] == pytest.approx(0.5)
    assert tl.roofline(chip, 0.0, 819e9, 10, 0.0, 1)["bound"] == "memory"


def test_slice_devices_are_tpu_chips():
    devices = tl.devices(tl.parse("v5e:2x2"))
    assert len(devices) == 4 and {d.device_kind for d in devices} == {"TPU v5 lite"}


@pytest.mark.parametrize("entry", ["train", "precompute"])
def test_dry_run_compiles_for_the_slice(entry):
    out = io.StringIO()
    s = dryrun.report(_tiny(), entry, out=out, topology=tl.parse("v5e:2x2"))  # attention auto: splash on TPU
    text = out.getvalue()
    assert s["topology"] == "v5e:2x2" and s["platform"] == "tpu" and s["fits"] is True
    assert s["compiled"]["total_bytes"] > 0 and s["compiled"]["argument_bytes"] > 0
    assert s["device_memory"] == 16 * 2**30 and "v5e HBM" in text
    assert s["devices"] == 4 and s["cost"]["flops"] > 0 and s["roofline"]["floor_s"] > 0
    assert "not a measured speed" in text and "compiled for v5e:2x2 (4 TPU v5 lite chips) by libtpu's" in text
    assert s["attention"][{"train": "student", "precompute": "teacher"}[entry]] == "splash"
    assert s["cost"]["kernel_flops"] > 0 and s["cost"]["custom_calls_without_estimate"] == ["tpu_custom_call"]


def test_without_libtpu_one_clear_line(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else find_spec(name, *a))
    with pytest.raises(SystemExit) as e:
        dryrun.main(_tiny(), "train", topology="v5e:2x2")
    assert str(e.value) == ("error: --topology v5e:2x2 compiles with the TPU compiler in libtpu, which is not "
                            "installed: pip install -e '.[tpu]' (or drop --topology)")


def test_on_policy_dry_run_compiles_the_sampler_too():
    cfg = _tiny("teacher.mode=online", "teacher.init=random", "train.on_policy.fraction=0.5",
                "train.on_policy.max_new_tokens=32")  # splash in both train steps' forwards, blockwise in prefill
    out = io.StringIO()
    s = dryrun.report(cfg, "train", out=out, topology=tl.parse("v5e:2x2"))
    sampler = s["sampler"]
    assert (sampler["rows"], sampler["prompt_len"]) == (8, 64) and sampler["compiled"]["temp_bytes"] > 0
    assert sampler["while_sampling_bytes"] == (s["compiled"]["argument_bytes"] + sampler["compiled"]["temp_bytes"]
                                               + sampler["compiled"]["output_bytes"])
    assert "on-policy sampler (8 prompts of 64 tokens" in out.getvalue()


@pytest.mark.slow
def test_h100_compile_only_with_cudnn_attention(tmp_path):
    """`--topology h100:2` with the CUDA plugin (installed here into a folder of its own, as the `cuda`
    extra pins it; the test environment stays without it): the train step compiled by XLA's GPU
    compiler with cuDNN attention, and one clear line without the plugin."""
    import subprocess
    import sys
    plugin = tmp_path / "plugin"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--no-deps", "-c",
                    os.path.join(ROOT, "constraints.txt"), "--target", str(plugin), "jax-cuda12-pjrt",
                    "jax-cuda12-plugin"], check=True, capture_output=True)
    args = [sys.executable, "-m", "kd_jax.train", "--config", os.path.join(ROOT, "configs", "tiny_llama.yaml"),
            "--topology", "h100:2", "student.dtype=bfloat16", "student.attention=cudnn", "train.global_batch_size=8",
            "mesh.data=-1"]
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    out = subprocess.run(args, env={**env, "PYTHONPATH": f"{plugin}:{ROOT}"}, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "compiled for h100:2 (2 NVIDIA H100 80GB HBM3 chips) by XLA's GPU compiler" in out.stdout
    assert '"platform": "gpu"' in out.stdout and '"attention": {"student": "cudnn"}' in out.stdout
    probe = ("import os; os.environ['JAX_SKIP_CUDA_CONSTRAINTS_CHECK'] = '1'; import jax, jax.numpy as jnp; "
             "from kd_jax.fit import topology as tl; d = tl.devices(tl.parse('h100:1'))[0]; "
             "q = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.bfloat16, sharding=jax.sharding.SingleDeviceSharding(d)); "
             "f = lambda q: jax.nn.dot_product_attention(q, q, q, implementation='cudnn', is_causal=True).sum(); "
             "print('__cudnn$fmha' in jax.jit(jax.grad(f)).lower(q).compile().as_text())")
    cudnn = subprocess.run([sys.executable, "-c", probe], env={**env, "JAX_PLATFORMS": "cpu",
                                                              "PYTHONPATH": f"{plugin}:{ROOT}"},
                           capture_output=True, text=True, cwd=ROOT)
    assert cudnn.stdout.strip() == "True", cudnn.stderr[-2000:]
    missing = subprocess.run(args, env={**env, "PYTHONPATH": ROOT}, capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1] == (
        "error: --topology h100:2 compiles with XLA's GPU compiler in the CUDA plugin, which is not installed: "
        "pip install -e '.[cuda]' (or drop --topology)")


def test_max_seq_len_confirmed_by_one_compile_for_the_slice():
    out = io.StringIO()
    s = dryrun.max_seq_len_report(_tiny("student.architecture.max_position_embeddings=1024"), "train", out=out,
                                  topology=tl.parse("v5e:2x2"))
    assert s["max_seq_len"] == 1024 and s["seq_len"] == 1024 and s["compiled"]["total_bytes"] > 0
    assert "longest data.seq_len that fits: 1024 (the cap)" in out.getvalue()
    assert "the compiled step confirms it" in out.getvalue()
