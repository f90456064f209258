"""load_hf -> save_hf -> transformers: bit-identical weights, and a fixed point on the second trip."""

from __future__ import annotations

import filecmp
import json
import os

import hf_tiny
import numpy as np
import pytest
import torch
import transformers

from kd_jax.models import load_hf, save_hf
from kd_jax.models.hf import read_kd_block, to_hf_layout


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("family", ["llama3", "llama_bias_tied", "qwen2", "qwen3", "mistral"])
def test_round_trip_is_bit_identical_and_a_fixed_point(family, tmp_path):
    hf_model, path = hf_tiny.save(family, str(tmp_path))
    once, twice = str(tmp_path / "once"), str(tmp_path / "twice")
    save_hf(load_hf(path), once)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(once, dtype=torch.float32)
    assert type(reloaded) is type(hf_model)
    _assert_same_weights(hf_model, reloaded)
    save_hf(load_hf(once), twice)
    for name in ("config.json", "model.safetensors"):
        assert filecmp.cmp(os.path.join(once, name), os.path.join(twice, name), shallow=False), name


def test_sharded_files_with_index(tmp_path):
    hf_model, path = hf_tiny.save("qwen2", str(tmp_path))
    out = str(tmp_path / "sharded")
    save_hf(load_hf(path), out, max_shard_size=16 * 1024)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        assert set(json.load(f)["weight_map"].values()) == set(files)
    _assert_same_weights(hf_model, transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
    # and kd_jax reads its own sharded export back; a re-export unsharded leaves no stale shard
    again = load_hf(out)
    save_hf(again, out, overwrite=True)
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == ["model.safetensors"]
    _assert_same_weights(hf_model, transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))


def test_bf16_export(tmp_path):
    hf_model, path = hf_tiny.save("llama3", str(tmp_path))
    out = str(tmp_path / "bf16")
    save_hf(load_hf(path), out, dtype="bfloat16")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16
    want = {k: v.to(torch.bfloat16) for k, v in hf_model.state_dict().items()}
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, want[k]), k
    # kd_jax loads bf16 files into fp32 parameters exactly
    loaded = load_hf(out)
    np.testing.assert_array_equal(np.asarray(loaded.embed[...]),
                                  want["model.embed_tokens.weight"].float().numpy())


@pytest.mark.parametrize("kind,shape", [("copy", (6, 5)), ("transpose", (6, 5)), ("in_heads", (6, 4, 3)),
                                        ("out_heads", (4, 3, 6)), ("bias_heads", (4, 3))])
def test_each_block_read_from_safetensors_equals_that_block(kind, shape, tmp_path):
    """A device reads its block of a kd-layout tensor straight from the HF file, whatever the block."""
    import safetensors
    import safetensors.numpy
    kd = np.random.RandomState(0).randn(*shape).astype(np.float32)
    safetensors.numpy.save_file({"w": np.ascontiguousarray(to_hf_layout(kd, kind))}, str(tmp_path / "w.safetensors"))
    rng = np.random.RandomState(1)
    with safetensors.safe_open(str(tmp_path / "w.safetensors"), framework="numpy") as f:
        hf = f.get_slice("w")
        for _ in range(20):
            index = []
            for n in shape:
                a, b = sorted(rng.choice(n + 1, 2, replace=False))
                index.append(slice(a, b))
            index = tuple(index)
            np.testing.assert_array_equal(read_kd_block(hf, kind, shape, index), kd[index])
        np.testing.assert_array_equal(read_kd_block(hf, kind, shape, (slice(None),) * len(shape)), kd)
