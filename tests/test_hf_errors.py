"""Bad HF folders and exports fail with one line that names the problem and the fix, never a
traceback from elsewhere; a refused export changes nothing."""

from __future__ import annotations

import json
import os
import shutil

import hf_tiny
import pytest
import safetensors.numpy

from kd_jax.base.errors import KDJaxError
from kd_jax.models import HFFormatError, load_hf, save_hf
from kd_jax.models.hf import FolderNotEmptyError


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {fam: hf_tiny.save(fam, str(root))[1] for fam in ("llama3", "qwen2")}


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, KDJaxError) and "\n" not in msg, msg
    return msg


def _copy_with_config(src: str, dst, **changes) -> str:
    """`dst` with src's weights (linked) and its config.json updated by `changes`."""
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    (dst / "config.json").write_text(json.dumps(dict(cfg, **changes)))
    os.symlink(os.path.join(src, "model.safetensors"), dst / "model.safetensors")
    return str(dst)


def _snapshot(folder: str) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


# --- load_hf ------------------------------------------------------------------------------------


def test_pytorch_bin_only_folder_says_how_to_convert(folders, tmp_path):
    shutil.copy(os.path.join(folders["qwen2"], "config.json"), tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(HFFormatError) as e:
        load_hf(str(tmp_path))
    assert "reads safetensors" in _one_line(e) and "save_pretrained(out, safe_serialization=True)" in str(e.value)


def test_folder_without_weights_or_config_is_named(folders, tmp_path):
    with pytest.raises(HFFormatError, match="no config.json") as e:
        load_hf(str(tmp_path))
    _one_line(e)
    shutil.copy(os.path.join(folders["qwen2"], "config.json"), tmp_path)
    with pytest.raises(HFFormatError, match=f"no \\*.safetensors weights in {tmp_path}") as e:
        load_hf(str(tmp_path))
    _one_line(e)


def test_missing_weight_names_the_tensor_and_the_folder(folders, tmp_path):
    tensors = safetensors.numpy.load_file(os.path.join(folders["qwen2"], "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(folders["qwen2"], "config.json"), tmp_path)
    with pytest.raises(HFFormatError) as e:
        load_hf(str(tmp_path))
    assert "'model.layers.1.self_attn.k_proj.bias' is missing from " + str(tmp_path) in _one_line(e)


def test_missing_shard_names_the_file_and_the_index(folders, tmp_path):
    out = str(tmp_path / "sharded")
    save_hf(load_hf(folders["qwen2"]), out, max_shard_size=16 * 1024)
    second = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(out, second))
    with pytest.raises(HFFormatError) as e:
        load_hf(out)
    msg = _one_line(e)
    assert second in msg and "model.safetensors.index.json" in msg


def test_git_lfs_pointer_instead_of_weights_is_named(folders, tmp_path):
    shutil.copy(os.path.join(folders["qwen2"], "config.json"), tmp_path)
    (tmp_path / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(HFFormatError) as e:
        load_hf(str(tmp_path))
    assert "model.safetensors is not a safetensors file" in _one_line(e) and "git lfs pull" in str(e.value)


@pytest.mark.parametrize("changes,names", [
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "gpt2.*GPT2LMHeadModel"),
    (dict(architectures=["LlamaForSequenceClassification"]), "LlamaForSequenceClassification"),
])
def test_unsupported_architecture_is_one_line_naming_the_supported_ones(folders, tmp_path, changes, names):
    path = _copy_with_config(folders["llama3"], tmp_path, **changes)
    with pytest.raises(HFFormatError, match=f"unsupported architecture.*{names}.*LlamaForCausalLM.*"
                                            "Qwen2ForCausalLM.*Qwen3ForCausalLM.*MistralForCausalLM") as e:
        load_hf(path)
    _one_line(e)


def test_config_without_a_required_key_or_not_json_is_one_line(folders, tmp_path):
    path = _copy_with_config(folders["llama3"], tmp_path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    del cfg["num_attention_heads"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFFormatError, match="lacks num_attention_heads") as e:
        load_hf(path)
    _one_line(e)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(HFFormatError, match="config.json is not valid JSON") as e:
        load_hf(path)
    _one_line(e)


def test_shape_mismatch_names_the_tensor_and_both_shapes(folders, tmp_path):
    path = _copy_with_config(folders["qwen2"], tmp_path, intermediate_size=64)
    with pytest.raises(HFFormatError) as e:
        load_hf(path)
    # tiny models: hidden 32, intermediate 48 in the file, 64 in config.json; HF down_proj is [D, I]
    assert "'model.layers.0.mlp.down_proj.weight'" in _one_line(e)
    assert "shape (32, 48), which does not fit the (32, 64)" in str(e.value)


# --- save_hf ------------------------------------------------------------------------------------


def test_export_into_the_teachers_folder_is_refused_and_changes_nothing(folders, tmp_path):
    teacher = str(tmp_path / "teacher")
    shutil.copytree(folders["llama3"], teacher)
    before = _snapshot(teacher)
    model = load_hf(teacher)
    with pytest.raises(FolderNotEmptyError, match="--overwrite") as e:
        save_hf(model, teacher)
    assert teacher in _one_line(e)
    with pytest.raises(FolderNotEmptyError, match="--overwrite"):
        save_hf(model, teacher, dtype="bfloat16", max_shard_size=1024)
    assert _snapshot(teacher) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(FolderNotEmptyError, match="is a file"):
        save_hf(model, str(tmp_path / "file"), overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    save_hf(model, str(empty))  # an existing empty folder is fine


def test_overwrite_replaces_an_earlier_sharded_export(folders, tmp_path):
    out = str(tmp_path / "out")
    model = load_hf(folders["qwen2"])
    save_hf(model, out, max_shard_size=16 * 1024)
    save_hf(model, out, max_shard_size=48 * 1024, overwrite=True)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        assert sorted(set(json.load(f)["weight_map"].values())) == files
    assert files == [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)]
    assert len(files) < 3
    load_hf(out)
