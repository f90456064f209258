"""Tiny random transformers models of every supported family, saved as HF folders (test support).

Every parameter, norms and biases included, is drawn at random so that a swapped or transposed
weight changes the logits.
"""

from __future__ import annotations

import os

import torch
import transformers

_COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-5)

FAMILIES = {
    # Llama 3.1-style rope scaling with a small original context so all three frequency bands occur.
    "llama3": dict(model_type="llama", rope_theta=500000.0, tie_word_embeddings=False,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=64)),
    "llama_bias_tied": dict(model_type="llama", rope_theta=10000.0, tie_word_embeddings=True,
                            attention_bias=True, mlp_bias=True),
    "qwen2": dict(model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=False),
    "qwen2_tied": dict(model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", rope_theta=1000000.0, tie_word_embeddings=True, head_dim=16),
    "mistral": dict(model_type="mistral", rope_theta=10000.0, tie_word_embeddings=False, sliding_window=4),
}


def hf_config(family: str, **overrides) -> transformers.PretrainedConfig:
    kw = {**_COMMON, **FAMILIES[family], **overrides}
    model_type = kw.pop("model_type")
    return transformers.AutoConfig.for_model(model_type, **kw)


def build(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A random fp32 HF causal LM of `family` (config `overrides` on top), eager attention, eval mode."""
    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def save(family: str, folder: str, seed: int = 0, **overrides) -> tuple[transformers.PreTrainedModel, str]:
    model = build(family, seed, **overrides)
    path = os.path.join(folder, family)
    model.save_pretrained(path)
    return model, path
