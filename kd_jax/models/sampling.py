"""Batched sampling from a kd_jax decoder with a KV cache: one prefill of the (left-padded) prompts,
then a `jax.lax.while_loop` of single-token decode steps. Greedy (temperature 0) or temperature +
top-p sampling; a row stops at one of `eos_ids` or after `max_new_tokens`.

Left padding puts every prompt's last token in the same cache slot, so each decode step writes
one slot for the whole batch; rotary positions count real tokens only (as transformers does with
an attention mask), so padding changes nothing.

Sampling draws from one key for the whole batch (`seed`), or from one key per row (`keys`): then
a row's draws depend on its own key and logits only, not on which other rows share the batch
(kd_jax.core.tracegen seeds every sample from its prompt's index).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _sample(logits_BxV, key, temperature: float, top_p: float):
    """Next ids [B]; `key` is one key for the batch, or [B] keys (one per row)."""
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / temperature
    if top_p < 1.0:  # keep the smallest set of ids whose probability reaches top_p
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        cum_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
        cutoff_B = jnp.take_along_axis(sorted_BxV, jnp.sum(cum_BxV < top_p, axis=-1, keepdims=True), axis=-1)
        logits_BxV = jnp.where(logits_BxV < cutoff_B, -jnp.inf, logits_BxV)
    if key.ndim:  # one key per row: each row's draw is its own
        return jax.vmap(lambda k, logits_V: jax.random.categorical(k, logits_V))(key, logits_BxV).astype(jnp.int32)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


def _next_key(key, i):
    """(carried key, key for draw i): split one batch key; fold the draw index into per-row keys."""
    if key.ndim:
        return key, jax.vmap(jax.random.fold_in, (0, None))(key, i)
    return jax.random.split(key)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def sample_tokens(graphdef, state, tokens_BxT, valid_BxT, key, max_new: int, temperature: float, top_p: float,
                  eos_E):
    """[B, max_new] int32 new ids (0 after a row's EOS) for left-padded prompts `tokens_BxT`
    (`valid_BxT` False on padding) from the model nnx.merge(graphdef, state); `key` one key or [B]
    keys; eos_E int32 [E] ids that end a row. Jitted: one compile per (graphdef, T, max_new,
    temperature, top_p); under a mesh, the prompts' sharding carries into the cache and the loop."""
    model = nnx.merge(graphdef, state)
    B, T = tokens_BxT.shape
    positions_BxT = jnp.maximum(jnp.cumsum(valid_BxT, axis=1) - 1, 0).astype(jnp.int32)
    key_valid_BxS = jnp.concatenate([valid_BxT, jnp.ones((B, max_new), bool)], axis=1)
    cache = model.init_cache(B, T + max_new)
    logits, cache = model.decode(tokens_BxT, positions_BxT, cache, 0, key_valid_BxS)
    key, sub = _next_key(key, 0)
    first_B = _sample(logits[:, -1], sub, temperature, top_p)
    out_BxN = jnp.zeros((B, max_new), jnp.int32).at[:, 0].set(first_B)
    done_B = jnp.isin(first_B, eos_E)
    next_pos_B = positions_BxT[:, -1] + 1

    def cond(carry):
        i, _, _, done_B, _, _ = carry
        return (i < max_new) & ~done_B.all()

    def step(carry):
        i, tok_B, cache, done_B, out_BxN, key = carry
        logits, cache = model.decode(tok_B[:, None], (next_pos_B + i - 1)[:, None], cache, T + i - 1, key_valid_BxS)
        key, sub = _next_key(key, i)
        new_B = jnp.where(done_B, 0, _sample(logits[:, 0], sub, temperature, top_p))
        out_BxN = jax.lax.dynamic_update_slice_in_dim(out_BxN, new_B[:, None], i, axis=1)
        return i + 1, new_B, cache, done_B | jnp.isin(new_B, eos_E), out_BxN, key

    carry = (jnp.int32(1), first_B, cache, done_B, out_BxN, key)
    _, _, _, _, out_BxN, _ = jax.lax.while_loop(cond, step, carry)
    return out_BxN


def left_pad(prompts: Sequence[Sequence[int]], bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [B, T], valid bool [B, T]): the prompts left-padded to T, the longest prompt's
    length rounded up to a multiple of `bucket`."""
    T = -(-max(len(p) for p in prompts) // bucket) * bucket
    tokens = np.zeros((len(prompts), T), np.int32)
    valid = np.zeros((len(prompts), T), bool)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p):] = p
        valid[b, T - len(p):] = True
    return tokens, valid


def cut_at_eos(ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """`ids` up to and including the first of `eos_ids` (all of them when none occurs)."""
    eos = set(eos_ids)
    ids = list(ids)
    stop = next((i for i, t in enumerate(ids) if t in eos), None)
    return ids if stop is None else ids[:stop + 1]


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_ids: Sequence[int] = (),
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, bucket: int = 32,
             keys: jax.Array | None = None) -> list[list[int]]:
    """New token ids for each prompt (ids lists), up to and including the first EOS. Prompts are
    left-padded to a multiple of `bucket` tokens, so batches of similar prompts share one compile.
    `keys` (a [B] array of jax.random keys, one per prompt) replaces `seed`: each row samples
    from its own key, so its tokens do not depend on the other rows' keys."""
    tokens, valid = left_pad(prompts, bucket)
    graphdef, state = nnx.split(model)
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    if keys is not None and keys.shape != (len(prompts),):
        raise ValueError(f"keys has shape {keys.shape}; pass one key per prompt: ({len(prompts)},)")
    key = jax.random.key(seed) if keys is None else keys
    out = np.asarray(sample_tokens(graphdef, state, jnp.asarray(tokens), jnp.asarray(valid), key,
                                   max_new_tokens, float(temperature), float(top_p), eos))
    return [cut_at_eos(row.tolist(), eos_ids) for row in out]
