"""Model shapes and synthetic KD batches shared by the benchmarks (numpy only: the PyTorch
baseline imports this too, so both frameworks see the very same numbers).

Presets are HF config.json-style dicts (what `student.architecture` takes with init=random), with
the shapes of the Qwen2.5 checkpoints of the same name; weights are random, only the shape matters
for speed. `tiny` is for CPU tests; `small` (~5M parameters) and `medium` (~33M, about 6x small's
matmul FLOPs, same vocabulary) are a student and a teacher sized for CPU measurements.
"""

from __future__ import annotations

import numpy as np

from kd_jax.data.roles import Role

_QWEN2 = dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0,
              max_position_embeddings=32768)

PRESETS = {
    "qwen2.5-0.5b": dict(_QWEN2, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(_QWEN2, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(_QWEN2, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "tiny": dict(_QWEN2, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                 max_position_embeddings=1024),
    "small": dict(_QWEN2, vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                  max_position_embeddings=4096),
    "medium": dict(_QWEN2, vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                   max_position_embeddings=4096),
}


def architecture(name: str) -> dict:
    if name not in PRESETS:
        raise SystemExit(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def synthetic_batch(batch: int, seq_len: int, vocab: int, k: int, *, seed: int = 0, docs_per_row: int = 1,
                    prompt_fraction: float = 0.1, step_tokens: int = 64) -> dict[str, np.ndarray]:
    """A packed KD batch in the layout of kd_jax.data.pipeline, every position real (no padding).

    Each row holds `docs_per_row` documents of equal length (segment ids 1.., positions restarting
    at 0); each document is a prompt (`prompt_fraction` of it, role 0, unsupervised), reasoning in
    steps of `step_tokens` (role 1) and a last step as the answer (role 2). Teacher top-K: K
    distinct ids per token with decreasing log-probs that leave some mass outside the K, as a
    real teacher's do. Returns inputs, labels, positions, segment_ids, role, reasoning_step (int32 [B, L]),
    loss_mask (bool [B, L]), topk_ids (int32 [B, L, K]), topk_logprobs (float32 [B, L, K]).
    """
    if seq_len % docs_per_row:
        raise ValueError(f"seq_len={seq_len} must be a multiple of docs_per_row={docs_per_row}")
    rng = np.random.default_rng(seed)
    B, L, K = batch, seq_len, k
    doc = L // docs_per_row
    tokens = rng.integers(0, vocab, (B, L + 1), dtype=np.int64).astype(np.int32)
    pos_in_doc = np.arange(L) % doc
    segment_ids = np.broadcast_to(1 + np.arange(L) // doc, (B, L)).astype(np.int32)
    positions = np.broadcast_to(pos_in_doc, (B, L)).astype(np.int32)
    prompt = max(1, int(doc * prompt_fraction))
    step_1d = np.where(pos_in_doc < prompt, -1, (pos_in_doc - prompt) // step_tokens)
    last_step = (doc - 1 - prompt) // step_tokens
    role_1d = np.where(pos_in_doc < prompt, Role.PROMPT, np.where(step_1d == last_step, Role.ANSWER, Role.REASONING))
    step_1d = np.where(role_1d == Role.REASONING, step_1d, -1)
    role = np.broadcast_to(role_1d, (B, L)).astype(np.int32)
    step = np.broadcast_to(step_1d, (B, L)).astype(np.int32)
    # base + j·p mod V with p a prime that does not divide V: K distinct ids per row.
    prime = 7919 if vocab % 7919 else 7927
    base = rng.integers(0, vocab, (B, L, 1))
    topk_ids = ((base + prime * np.arange(K)) % vocab).astype(np.int32)
    # Decreasing log-probs holding 1 − leftover of the mass, leftover in [5%, 50%].
    scores = -np.sort(rng.exponential(1.0, (B, L, K)), axis=-1)
    scores -= np.log(np.exp(scores).sum(-1, keepdims=True))
    topk_logprobs = (scores + np.log1p(-rng.uniform(0.05, 0.5, (B, L, 1)))).astype(np.float32)
    return {"inputs": tokens[:, :-1], "labels": tokens[:, 1:].copy(), "positions": positions.copy(),
            "segment_ids": segment_ids.copy(), "role": role.copy(),
            "reasoning_step": step.copy(), "loss_mask": role != Role.PROMPT, "topk_ids": topk_ids, "topk_logprobs": topk_logprobs}
