"""Splash attention compiled for TPUs that are not here: the real train step (kd_jax.fit.dryrun.compiled_train,
the step kd_jax.core.step.compile_steps builds) of a tiny llama, lowered on abstract arrays under a mesh of a
v5e:2x2 slice's 4 chips and compiled ahead of time by the XLA TPU compiler in libtpu, on this CPU.

What it shows: the mask info of the kernel is no device array made at trace time (it traces under
compile-only TPU devices); splash runs in shard_map (GSPMD cannot partition a Mosaic call), batch over
data x fsdp and heads over tensor; attention in the compiled program is Mosaic's `tpu_custom_call`
(splash's forward, dq and dkv kernels) and no [T, T] buffer of any dtype appears at T = 2048, where the
dense reference has several; XLA's memory_analysis() is filled. Head dim 16 (the tiny llama's): splash
takes head dims that are not multiples of 128 (Mosaic compiled 16, 80, 96, 256 too). A tile that is not a
multiple of 128 is refused at trace time by name.

libtpu is in the test extra: imported plainly, never skipped."""

from __future__ import annotations

import dataclasses
import functools
import os
import re

# Each process that describes a TPU slice initialises libtpu, which otherwise holds a machine-wide lock
# (/tmp/libtpu_lockfile): a second process (a pytest-xdist worker, another test run) would fail with
# "Internal error when accessing libtpu multi-process lockfile". Compile-only slices use no chip.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import libtpu  # noqa: F401 - the TPU compiler (the test extra carries it)
import pytest
from jax.experimental import topologies

from kd_jax.base import sharding
from kd_jax.base.loader import load_config
from kd_jax.fit import dryrun
from kd_jax.models.attention import AttentionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 2048  # long enough that a [T, T] buffer would be the largest thing in the step


@functools.cache
def v5e_chips() -> tuple:
    """The 4 chips of a v5e:2x2 slice as compile-only devices."""
    desc = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1)
    return tuple(desc.devices)


def tiny(*overrides: str):
    """configs/tiny_llama.yaml (4 query heads, 2 kv heads, head dim 16), bf16 compute, 4 rows of T tokens."""
    return load_config(os.path.join(ROOT, "configs", "tiny_llama.yaml"),
                       ["student.dtype=bfloat16", "student.architecture.max_position_embeddings=65536",
                        "train.global_batch_size=4", f"data.seq_len={T}", *overrides])


def compile_step(cfg, model_cfg=None):
    """The train step compiled for the v5e:2x2 chips on cfg.mesh."""
    model_cfg = model_cfg or dryrun.model_config(cfg.student, "student", cfg.teacher)[0]
    return dryrun.compiled_train(cfg, model_cfg, sharding.mesh_from_config(cfg.mesh, devices=v5e_chips()))


@functools.cache
def compiled(*overrides: str) -> tuple[dict, int, str]:
    """(kd_jax's memory numbers, XLA's peak_memory_in_bytes, the optimised HLO) of tiny(*overrides)'s step."""
    c = compile_step(tiny(*overrides))
    return dryrun.compiled_memory(c), c.memory_analysis().peak_memory_in_bytes, c.as_text()


def square_buffers(hlo: str, n: int) -> set[str]:
    """Shapes in `hlo` whose last two dimensions are n x n (any dtype, any leading dimensions)."""
    return set(re.findall(rf"\b[a-z]+[0-9]*\[(?:\d+,)*{n},{n}\]", hlo))


@pytest.mark.parametrize("mesh", ["mesh.data=4", "mesh.tensor=2"], ids=["data4", "data2-tensor2"])
def test_splash_train_step_compiles_for_v5e(mesh):
    """The splash train step on 4 v5e chips (data=4, or data=2 with the heads over tensor=2, one kv
    head per chip: splash's MQA kernel): Mosaic kernels, no [T, T] buffer, memory accounted."""
    memory, peak, hlo = compiled("student.attention=splash", mesh)
    assert 'custom_call_target="tpu_custom_call"' in hlo
    for kernel in ("fwd", "dq", "dkv"):  # the forward and both backward kernels
        assert re.search(rf"%splash_m[hq]a_{kernel}_[\w.]* = .*custom_call_target=\"tpu_custom_call\"", hlo), kernel
    assert not square_buffers(hlo, T), square_buffers(hlo, T)
    assert memory["temp_bytes"] > 0 and memory["argument_bytes"] > 0 and memory["total_bytes"] > 0, memory
    assert peak > 0


def test_dense_attention_has_the_square_buffers():
    """The control: the same step with the dense "xla" attention has [T, T] scores and masks in its
    HLO and no Mosaic call, so the checks above would see them; XLA's peak is several times splash's."""
    _, peak, hlo = compiled("student.attention=xla", "mesh.data=4")
    assert "tpu_custom_call" not in hlo
    assert {"f32", "pred"} <= {s.split("[")[0] for s in square_buffers(hlo, T)}, square_buffers(hlo, T)
    assert peak > 4 * compiled("student.attention=splash", "mesh.data=4")[1]


def test_splash_tile_off_128_refused_before_compiling():
    """splash's kernel takes tiles (block_q, block_kv) that are multiples of 128 only: attention_block
    200 is an AttentionError naming it, raised while tracing under the v5e mesh (nothing compiles)."""
    cfg = tiny("student.attention=splash", "mesh.data=4")
    model_cfg = dataclasses.replace(dryrun.model_config(cfg.student, "student", cfg.teacher)[0], attention_block=200)
    with pytest.raises(AttentionError, match="multiples of 128.*attention_block=200"):
        compile_step(cfg, model_cfg)
