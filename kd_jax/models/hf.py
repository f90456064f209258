"""Hugging Face interop: `load_hf` reads a local HF folder (or a hub id) straight into a sharded
Decoder; `save_hf` writes config.json + safetensors (+ tokenizer) that transformers loads.

Loading opens each safetensors file with `safetensors.safe_open` and lets every device read only
its own slice of every tensor (`get_slice` inside `jax.make_array_from_callback`), so no device, and
no host, ever holds a full copy of the model beyond the page cache.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from kd_jax.base import sharding
from kd_jax.base.errors import KDJaxError
from kd_jax.models.decoder import Decoder, DecoderConfig

SUPPORTED = {  # model_type -> architecture class name in transformers
    "llama": "LlamaForCausalLM",  # Llama 2/3/3.x, SmolLM2
    "qwen2": "Qwen2ForCausalLM",  # Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
# config.json keys without a default
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

# Per-layer kd parameter -> (HF name under model.layers.{i}., layout conversion).
_LAYER_MAP = {
    "attn_norm": ("input_layernorm.weight", "copy"),
    "wq": ("self_attn.q_proj.weight", "in_heads"),
    "wk": ("self_attn.k_proj.weight", "in_heads"),
    "wv": ("self_attn.v_proj.weight", "in_heads"),
    "wo": ("self_attn.o_proj.weight", "out_heads"),
    "bq": ("self_attn.q_proj.bias", "bias_heads"),
    "bk": ("self_attn.k_proj.bias", "bias_heads"),
    "bv": ("self_attn.v_proj.bias", "bias_heads"),
    "bo": ("self_attn.o_proj.bias", "copy"),
    "q_norm": ("self_attn.q_norm.weight", "copy"),
    "k_norm": ("self_attn.k_norm.weight", "copy"),
    "mlp_norm": ("post_attention_layernorm.weight", "copy"),
    "w_gate": ("mlp.gate_proj.weight", "transpose"),
    "w_up": ("mlp.up_proj.weight", "transpose"),
    "w_down": ("mlp.down_proj.weight", "transpose"),
    "b_gate": ("mlp.gate_proj.bias", "copy"),
    "b_up": ("mlp.up_proj.bias", "copy"),
    "b_down": ("mlp.down_proj.bias", "copy"),
}
_TOP_MAP = {
    "embed": ("model.embed_tokens.weight", "copy"),
    "final_norm": ("model.norm.weight", "copy"),
    "lm_head": ("lm_head.weight", "transpose"),
}


class HFFormatError(KDJaxError, ValueError):
    """An HF folder kd_jax cannot read, with what is wrong and how to fix it."""


class FolderNotEmptyError(KDJaxError, FileExistsError):
    """`save_hf` refused to write into a folder that already holds files (e.g. the teacher's)."""


# ---------------------------------------------------------------------------------------------
# config.json <-> DecoderConfig


def config_from_hf(hf: dict[str, Any], **overrides) -> DecoderConfig:
    """DecoderConfig from an HF config.json dict, either generation: transformers 4.x top-level
    `rope_theta`/`rope_scaling` or the 5.x `rope_parameters` block."""
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    if model_type not in SUPPORTED or (architectures and not set(architectures) & set(SUPPORTED.values())):
        raise HFFormatError(
            f"unsupported architecture model_type={model_type!r} (architectures={architectures}); "
            f"kd_jax supports {', '.join(f'{v} ({k})' for k, v in SUPPORTED.items())}")
    if any(t != "full_attention" for t in hf.get("layer_types") or ()) or (
            model_type != "mistral" and hf.get("use_sliding_window")):
        raise HFFormatError(f"{model_type} with per-layer sliding-window attention (layer_types="
                            f"{hf.get('layer_types')}) is not supported; use a full-attention checkpoint")
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise HFFormatError(f"config.json of this {model_type} model lacks {', '.join(missing)}; use the "
                            f"config.json saved with the weights")
    heads = hf["num_attention_heads"]
    rope_params = hf.get("rope_parameters")
    if rope_params:
        theta = rope_params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf.get("rope_scaling") or {})
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = {}
    attention_bias = bool(hf.get("attention_bias", False))
    eos = hf.get("eos_token_id")
    kw = dict(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=tuple(sorted(scaling.items())) or None,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or (model_type in ("llama", "qwen3") and attention_bias),
        o_bias=model_type in ("llama", "qwen3") and attention_bias,
        mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
    )
    if hf.get("hidden_act", "silu") != "silu":
        raise HFFormatError(f"hidden_act={hf['hidden_act']!r} is not supported (SwiGLU with silu only)")
    kw.update(overrides)
    return DecoderConfig(**kw)


def config_to_hf(cfg: DecoderConfig, dtype: str) -> dict[str, Any]:
    """config.json for `cfg`, in the transformers 4.x layout that both 4.x and 5.x load."""
    hf: dict[str, Any] = {
        "architectures": [SUPPORTED[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": dtype,
    }
    if cfg.model_type in ("llama", "qwen3"):
        hf["attention_bias"] = cfg.o_bias
    if cfg.model_type == "llama":
        hf["mlp_bias"] = cfg.mlp_bias
    if cfg.model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    for key in ("bos_token_id", "eos_token_id"):
        value = getattr(cfg, key)
        if value is not None:
            hf[key] = list(value) if isinstance(value, tuple) else value
    return hf


# ---------------------------------------------------------------------------------------------
# layout conversion (loading reads only the HF rows and columns of each device's block)


def _hf_shape(kind: str, kd_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the HF tensor behind a kd tensor of `kd_shape`."""
    if kind == "copy":
        return kd_shape
    if kind == "transpose":
        return kd_shape[::-1]
    if kind == "in_heads":  # kd [D, N, H] <- HF [N*H, D]
        D, N, H = kd_shape
        return (N * H, D)
    if kind == "out_heads":  # kd [N, H, D] <- HF [D, N*H]
        N, H, D = kd_shape
        return (D, N * H)
    if kind == "bias_heads":  # kd [N, H] <- HF [N*H]
        N, H = kd_shape
        return (N * H,)
    raise AssertionError(kind)


def _head_rows(n: slice, H: int) -> slice:
    """HF rows (columns for o_proj) of heads n.start..n.stop-1 of size H."""
    return slice(n.start * H, n.stop * H)


def read_kd_block(hf: Any, kind: str, kd_shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """Block `index` of the kd-layout tensor of `kd_shape` behind the safetensors slice `hf`,
    reading only the HF rows and columns that block covers."""
    index = tuple(slice(*s.indices(size)) for s, size in zip(index, kd_shape))
    if kind == "copy":
        return hf[index]
    if kind == "transpose":
        return hf[index[::-1]].T
    if kind == "in_heads":  # HF [nn*H, dd] -> [dd, nn, hh]
        d, n, h = index
        block = hf[_head_rows(n, kd_shape[2]), d]
        return block.reshape(n.stop - n.start, kd_shape[2], -1)[:, h].transpose(2, 0, 1)
    if kind == "out_heads":  # HF [dd, nn*H] -> [nn, hh, dd]
        n, h, d = index
        block = hf[d, _head_rows(n, kd_shape[1])]
        return block.reshape(-1, n.stop - n.start, kd_shape[1])[:, :, h].transpose(1, 2, 0)
    if kind == "bias_heads":  # HF [nn*H] -> [nn, hh]
        n, h = index
        return hf[(_head_rows(n, kd_shape[1]),)].reshape(-1, kd_shape[1])[:, h]
    raise AssertionError(kind)


def to_hf_layout(kd_arr: np.ndarray, kind: str) -> np.ndarray:
    """A kd-layout tensor in the layout of its HF file (`read_kd_block` reads it back), by the
    parameter's `kind`: copy, transpose, in_heads [D, N, H] -> [N·H, D], out_heads [N, H, D] ->
    [D, N·H], bias_heads [N, H] -> [N·H]."""
    if kind == "copy":
        return kd_arr
    if kind == "transpose":
        return kd_arr.T
    if kind == "in_heads":
        D, N, H = kd_arr.shape
        return kd_arr.transpose(1, 2, 0).reshape(N * H, D)
    if kind == "out_heads":
        N, H, D = kd_arr.shape
        return kd_arr.transpose(2, 0, 1).reshape(D, N * H)
    if kind == "bias_heads":
        return kd_arr.reshape(-1)
    raise AssertionError(kind)


class _Weights(contextlib.ExitStack):
    """Every tensor in a folder's safetensors files, by HF name, as a safetensors slice: indexing one
    reads only those bytes (bfloat16 too, as ml_dtypes' numpy dtype, which jax registers)."""

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
        if not files:
            if any(n.endswith(".bin") for n in os.listdir(folder)):
                raise HFFormatError(
                    f"{folder} holds PyTorch .bin weights but no *.safetensors, and kd_jax reads safetensors only; "
                    f"convert with transformers: AutoModelForCausalLM.from_pretrained(folder)"
                    f".save_pretrained(out, safe_serialization=True)")
            raise HFFormatError(f"no *.safetensors weights in {folder}; pass the Hugging Face folder with its weights")
        self.slices: dict[str, Any] = {}
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                raise HFFormatError(f"{name}, listed in {index}, is missing: the checkpoint is incomplete; "
                                    f"download the folder again")
            try:
                f = self.enter_context(safetensors.safe_open(path, framework="numpy"))
            except safetensors.SafetensorError as e:
                raise HFFormatError(f"{path} is not a safetensors file ({e}); download it again (a git-lfs "
                                    f"pointer is not the weights: run `git lfs pull`)") from e
            self.slices.update({key: f.get_slice(key) for key in f.keys()})

    def get(self, name: str) -> Any:
        if name not in self.slices:
            raise HFFormatError(f"weight {name!r} is missing from {self.folder}: the checkpoint is incomplete or "
                                f"does not match its config.json")
        return self.slices[name]


def _param_sources(cfg: DecoderConfig, names: list[str]):
    """kd param name -> (list of HF names, one per layer or a single one, conversion kind, stacked)."""
    out = {}
    for name in names:
        if name in _LAYER_MAP:
            hf_name, kind = _LAYER_MAP[name]
            out[name] = ([f"model.layers.{i}.{hf_name}" for i in range(cfg.num_layers)], kind, True)
        else:
            hf_name, kind = _TOP_MAP[name]
            out[name] = ([hf_name], kind, False)
    return out


def _hf_slices(weights: _Weights, name: str, shape: tuple[int, ...], hf_names: list[str], kind: str,
               stacked: bool) -> list[Any]:
    """The safetensors slices behind parameter `name` of kd `shape`, their HF shapes checked."""
    want = _hf_shape(kind, shape[1:] if stacked else shape)
    out = []
    for n in hf_names:
        hf = weights.get(n)
        if tuple(hf.get_shape()) != want:
            raise HFFormatError(f"weight {n!r} in {weights.folder} has shape {tuple(hf.get_shape())}, which does "
                                f"not fit the {want} that config.json implies; use the config.json saved with it")
        out.append(hf)
    return out


def _flat_params(state: nnx.State) -> dict[str, Any]:
    """{'embed': v, 'wq': v, ...}: the model's Params by their attribute name (unique by design)."""
    flat = {}
    for path, v in nnx.to_flat_state(state):
        flat[str(path[-1])] = v
    return flat


# ---------------------------------------------------------------------------------------------
# load / save


def resolve_path(path: str, revision: str | None = None, *, weights: bool = True) -> str:
    """A local folder as is; anything else is a hub id fetched with huggingface_hub (without its
    *.safetensors when `weights` is False: config and tokenizer files only)."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise HFFormatError(f"{path} is a file; pass the folder that holds config.json and *.safetensors")
    from huggingface_hub import snapshot_download
    patterns = ["*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"] + (["*.safetensors"] if weights else [])
    try:
        return snapshot_download(repo_id=path, revision=revision, allow_patterns=patterns)
    except Exception as e:  # noqa: BLE001 - report every hub failure the same way
        reason = " ".join(str(e).split())  # hub errors span lines; the message is one
        raise HFFormatError(f"{path!r} is not a local folder and could not be fetched from the Hugging Face "
                            f"hub ({type(e).__name__}: {reason}); pass a local HF folder") from e


def weights_fingerprint(folder: str) -> str:
    """sha256 that changes when the weights of the local HF folder `folder` do, read cheaply (never a
    whole file): model.safetensors.index.json's bytes when there is one, and for every *.safetensors
    file its name, size and header (tensor names, dtypes, shapes and offsets: the first 8 bytes give the
    header's length) plus 16 blocks of 4 KiB spread over its tensor data, so that another checkpoint of
    the same architecture (same headers and sizes: a fine-tune) differs as well."""
    import hashlib
    digest = hashlib.sha256()
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, "rb") as f:
            digest.update(b"index\0" + f.read())
    names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not names:
        raise HFFormatError(f"no *.safetensors weights in {folder}; pass the Hugging Face folder with its weights")
    for name in names:
        path = os.path.join(folder, name)
        size = os.path.getsize(path)
        digest.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 <= length <= size - 8:
                raise HFFormatError(f"{path} is not a safetensors file (no valid header); download it again (a "
                                    f"git-lfs pointer is not the weights: run `git lfs pull`)")
            digest.update(f.read(length))
            start, span = 8 + length, size - 8 - length
            for i in range(16):
                f.seek(start + span * i // 16)
                digest.update(f.read(min(4096, span)))
    return digest.hexdigest()


def load_tokenizer(path: str, revision: str | None = None):
    """transformers' AutoTokenizer from a local folder or hub id (`Config.tokenizer`)."""
    import transformers
    return transformers.AutoTokenizer.from_pretrained(resolve_path(path, revision, weights=False))


def eos_token_ids(tokenizer, hf_path: str | None = None, revision: str | None = None) -> list[int]:
    """Ids that end a generation: the tokenizer's EOS and the model folder's generation_config.json
    eos_token_id(s) (instruct models often stop on <|im_end|> as well as <|endoftext|>)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if hf_path:
        path = os.path.join(resolve_path(hf_path, revision, weights=False), "generation_config.json")
        if os.path.exists(path):
            with open(path) as f:
                extra = json.load(f).get("eos_token_id")
            ids += [extra] if isinstance(extra, int) else list(extra or [])
    if not ids:
        raise HFFormatError("neither the tokenizer nor the model's generation_config.json names an EOS token; "
                            "set tokenizer.eos_token so that samples can end")
    return sorted(set(ids))


def source_eos_ids(src, tokenizer) -> list[int]:
    """`eos_token_ids` of a config's model section (student or teacher): its folder's generation
    config counts when the model is loaded from one (init=hf)."""
    return eos_token_ids(tokenizer, src.hf_path if src.init == "hf" else None, src.revision)


def read_hf_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise HFFormatError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise HFFormatError(f"{path} is not valid JSON ({e}); download it again") from e


def load_hf(path: str, *, mesh: jax.sharding.Mesh | None = None, param_dtype: str = "float32",
            dtype: str = "float32", revision: str | None = None, **overrides) -> Decoder:
    """Decoder with the weights of the HF folder (or hub id) `path`, sharded over `mesh`.

    param_dtype: storage dtype of the parameters; dtype: compute dtype. `overrides` go to
    DecoderConfig (e.g. scan_layers=False, remat="dots_saveable").
    """
    folder = resolve_path(path, revision)
    cfg = config_from_hf(read_hf_config(folder), param_dtype=param_dtype, dtype=dtype, **overrides)
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    if mesh is None:
        mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    shardings = sharding.state_shardings(abs_state, mesh)
    flat_abs, flat_sh = _flat_params(abs_state), _flat_params(shardings)
    target = jnp.dtype(param_dtype)
    with _Weights(folder) as weights:
        params = _param_sources(cfg, list(flat_abs))
        sources = {name: _hf_slices(weights, name, flat_abs[name].shape, *src)  # validate all first
                   for name, src in params.items()}

        def load_one(name):
            var, per_layer, (_, kind, stacked) = flat_abs[name], sources[name], params[name]
            inner = var.shape[1:] if stacked else var.shape

            def read(index):  # called once per device with that device's slice of the array
                if stacked:
                    return np.stack([read_kd_block(per_layer[i], kind, inner, index[1:])
                                     for i in range(var.shape[0])[index[0]]]).astype(target)
                return read_kd_block(per_layer[0], kind, inner, index).astype(target)

            return jax.make_array_from_callback(var.shape, flat_sh[name].get_value(), read)

        for path_, v in nnx.to_flat_state(abs_state):
            v.set_value(load_one(str(path_[-1])))
    return nnx.merge(graphdef, abs_state)


def check_export_folder(path: str, overwrite: bool) -> None:
    """Raises FolderNotEmptyError unless `path` is absent, an empty folder, or `overwrite` is set."""
    if os.path.isfile(path):
        raise FolderNotEmptyError(f"{path} is a file; choose a folder to export to")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        held = sorted(os.listdir(path))
        raise FolderNotEmptyError(f"{path} is not empty ({len(held)} files, e.g. {held[0]}); pass --overwrite "
                                  f"(overwrite=True) to replace the model in it, or choose another folder")


def save_hf(model: Decoder, path: str, tokenizer=None, *, dtype: str | None = None,
            max_shard_size: int | str = 5 * 2**30, overwrite: bool = False) -> str:
    """Write `model` as an HF folder: config.json, safetensors (split above `max_shard_size`, bytes
    or "5GB", with model.safetensors.index.json) and the tokenizer's files if one is given.
    dtype: saved dtype (default: the parameters' dtype). A folder that already holds files (say, the
    teacher's) is refused unless `overwrite`, which also removes an earlier export's safetensors."""
    check_export_folder(path, overwrite)
    cfg = model.cfg
    dtype = dtype or cfg.param_dtype
    np_dtype = np.dtype(jnp.dtype(dtype))
    os.makedirs(path, exist_ok=True)
    flat = _flat_params(nnx.state(model, nnx.Param))
    tensors: dict[str, np.ndarray] = {}
    for name, (hf_names, kind, stacked) in _param_sources(cfg, list(flat)).items():
        host = np.asarray(jax.device_get(flat[name].get_value())).astype(np_dtype)
        for i, hf_name in enumerate(hf_names):
            tensors[hf_name] = np.ascontiguousarray(to_hf_layout(host[i] if stacked else host, kind))

    split = huggingface_hub.split_state_dict_into_shards_factory(
        dict(sorted(tensors.items())), get_storage_size=lambda t: t.nbytes,
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    for stale in os.listdir(path):  # an earlier export with another shard count must not linger
        if stale.endswith(".safetensors") or stale == "model.safetensors.index.json":
            os.remove(os.path.join(path, stale))
    for fname, names in split.filename_to_tensors.items():
        safetensors.numpy.save_file({n: tensors[n] for n in names}, os.path.join(path, fname),
                                    metadata={"format": "pt"})
    if split.is_sharded:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f, indent=2,
                      sort_keys=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg, dtype), f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
