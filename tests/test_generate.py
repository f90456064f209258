"""KV-cache generation: greedy output equals transformers' `generate` (tiny models, SmolLM2)."""

from __future__ import annotations

import hf_tiny
import jax
import numpy as np
import pytest
import torch
import transformers

from kd_jax.models import load_hf
from kd_jax.models.sampling import generate

# blockwise: the prompt's prefill against the cache runs blockwise (4-token tiles), decode steps
# one token at a time through the dense row; splash takes self-attention only, so generation's
# prefill falls back to blockwise there.
BLOCKWISE, SPLASH = dict(attention="blockwise", attention_block=4), dict(attention="splash")
CASES = [("llama3", {}), ("qwen3", {}), ("mistral", {}), ("llama3", BLOCKWISE), ("mistral", BLOCKWISE),
         ("llama3", SPLASH)]


@pytest.mark.parametrize("family,attn", CASES, ids=[f"{f}-{a.get('attention', 'auto')}" for f, a in CASES])
def test_greedy_batch_equals_transformers(family, attn, tmp_path):
    hf_model, path = hf_tiny.save(family, str(tmp_path))
    hf_model.generation_config.eos_token_id = None  # 32 tokens every time, on both sides
    hf_model.generation_config.pad_token_id = 0
    rng = np.random.RandomState(0)
    prompts = [rng.randint(1, 97, n).tolist() for n in (9, 4)]  # different lengths: left padding
    ours = generate(load_hf(path, **attn), prompts, max_new_tokens=32)
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = hf_model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False)[:, T:].tolist()
    assert ours == ref


def test_sampling_is_seeded_and_stops_at_eos(tmp_path):
    _, path = hf_tiny.save("qwen2", str(tmp_path))
    model = load_hf(path)
    prompt = [[5, 6, 7, 8]]
    a = generate(model, prompt, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=1)
    assert a == generate(model, prompt, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=1)
    greedy = generate(model, prompt, max_new_tokens=16)[0]
    eos = greedy[3]
    stopped = generate(model, prompt, max_new_tokens=16, eos_ids=[eos])[0]
    assert stopped == greedy[:greedy.index(eos) + 1]


@pytest.mark.slow
def test_smollm2_greedy_32_tokens_equal_transformers(smollm2_dir):
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "Write a short story about a cat who learns to fly."}],
                                  add_generation_prompt=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    ours = generate(load_hf(smollm2_dir), [ids], max_new_tokens=32, eos_ids=[tok.eos_token_id])[0]
    print("\nSmolLM2:", repr(tok.decode(ours)))
    assert len(ref) == 32 and ours == ref


def test_per_row_keys_sample_each_row_apart_from_its_batch(tmp_path):
    """With one key per row, a row's samples are its own: alone or beside other rows (other padding,
    another bucket) it draws the same tokens; only its key changes them."""
    _, path = hf_tiny.save("qwen2", str(tmp_path))
    model = load_hf(path)
    rng = np.random.RandomState(1)
    prompts = [rng.randint(1, 97, n).tolist() for n in (5, 9, 3, 12)]
    keys = jax.random.split(jax.random.key(3), 4)
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9)
    together = generate(model, prompts, keys=keys, **kw)
    assert generate(model, prompts[:1], keys=keys[:1], **kw) == together[:1]
    assert generate(model, [prompts[3], prompts[1]], keys=keys[np.array([3, 1])], bucket=8, **kw) == [
        together[3], together[1]]
    assert generate(model, prompts[:1], keys=jax.random.split(jax.random.key(4), 1), **kw) != together[:1]
    with pytest.raises(ValueError, match="one key per prompt"):
        generate(model, prompts, keys=keys[:2], **kw)
