"""On-policy distillation (GKD, Agarwal et al. 2024) and sequence-level KD (Kim & Rush 2016) in
the train loop (`train.on_policy`).

A deterministic fraction λ of optimizer steps (step s is one when floor((s+1)λ) > floor(sλ), so
λ = 0.5 is every second step) trains on completions sampled in the loop instead of the next batch
of traces:

  prompts (the traces' prompt part, or train.on_policy.prompts) in a seeded order -> left-padded to a
  multiple of `bucket` -> sampled with the KV cache (kd_jax.models.sampling) by the student's
  current parameters (source: student) or by the teacher (source: teacher), sharded over the
  mesh's batch axes, one compile per bucket -> each completion cut after its EOS, its tokens
  tagged reasoning up to and including `</think>` (split into steps at data.steps.separator) and
  answer after it (no `</think>`: all reasoning, a reasoning cut off by max_new_tokens) -> packed
  into a training batch by the pipeline's packer -> the online teacher's forward on the same
  sequences and the fused dense loss on the completion tokens (the prompt is never supervised),
  with train.on_policy.divergence (default reverse KL) and alpha (default 1: no cross-entropy on
  the model's own tokens).

The sampling key and the count of on-policy steps done live in the checkpoint (`state`), so a
resumed run samples the same completions; the prompt order is a function of that count.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from kd_jax.base import sharding
from kd_jax.base.errors import KDJaxError
from kd_jax.base.schema import Config, OnPolicyConfig
from kd_jax.data.pipeline import pack_examples
from kd_jax.data.roles import Role
from kd_jax.data.store import KDStore
from kd_jax.data.traces import THINK_CLOSE, render_prompt
from kd_jax.models.sampling import cut_at_eos, left_pad, sample_tokens


class OnPolicyError(KDJaxError, ValueError):
    """On-policy settings that cannot work with this data (no prompt fits data.seq_len, ...)."""


def is_on_policy(step: int, fraction: float) -> bool:
    """Whether optimizer step `step` (0-based) trains on sampled completions: the on-policy steps
    are spread evenly, floor((step + 1)·λ) > floor(step·λ)."""
    return on_policy_steps_before(step + 1, fraction) > on_policy_steps_before(step, fraction)


def on_policy_steps_before(step: int, fraction: float) -> int:
    """On-policy steps among steps 0 .. step - 1: floor(step·λ) (1e-9 absorbs float error: λ=0.1
    at step 10 is 1, not 0.999...)."""
    return math.floor(step * fraction + 1e-9)


class Prompts:
    """The prompt pool: token ids of prompt i (ending in the generation prompt) by `get(i)`, in a
    seeded order that is a new permutation every epoch over the pool."""

    def __init__(self, get: Callable[[int], list[int]], count: int, seed: int):
        if count == 0:
            raise OnPolicyError("no prompts to sample from: the training split is empty; check data.traces / "
                                "train.on_policy.prompts")
        self.get, self.count, self.seed = get, count, seed
        self._perm: tuple[int, np.ndarray] | None = None

    @classmethod
    def from_store(cls, store: KDStore, indices: np.ndarray, seed: int) -> "Prompts":
        """The prompt part (role 0) of the store's sequences `indices` (the training split)."""
        indices = np.asarray(indices, np.int64)

        def get(i: int) -> list[int]:
            start, end = int(store.offsets[indices[i]]), int(store.offsets[indices[i] + 1])
            tokens, role = store.read_range("tokens", start, end), store.read_range("role", start, end)
            answer = np.flatnonzero(role != Role.PROMPT)
            return tokens[:answer[0] if len(answer) else len(tokens)].tolist()

        return cls(get, len(indices), seed)

    @classmethod
    def from_messages(cls, rows: list[list[dict]], tokenizer, seq_len: int, seed: int) -> "Prompts":
        """Chat turns per prompt (kd_jax.data.tables.prompt_messages), rendered with the chat template and
        its generation prompt as the traces are; prompts with no room left in data.seq_len for a
        completion are left out."""
        ids = [tokenizer(render_prompt(tokenizer, m), add_special_tokens=False)["input_ids"] for m in rows]
        kept = [p for p in ids if len(p) < seq_len]
        if not kept:
            raise OnPolicyError(f"every one of the {len(ids)} train.on_policy.prompts is {min(map(len, ids))} tokens or longer, "
                                f"leaving no room for a completion in data.seq_len={seq_len}; raise data.seq_len")
        return cls(kept.__getitem__, len(kept), seed)

    def take(self, j: int, n: int) -> list[list[int]]:
        """The prompts of on-policy step j: positions j·n .. j·n + n − 1 of the epochs' permutations."""
        out = []
        for pos in range(j * n, (j + 1) * n):
            epoch, i = divmod(pos, self.count)
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.count))
            out.append(self.get(int(self._perm[1][i])))
        return out


def _sequence(ids: list[int], closing: list[int]) -> int | None:
    """Index just past the first occurrence of the token run `closing` in `ids`, or None."""
    n = len(closing)
    for i in range(len(ids) - n + 1):
        if ids[i:i + n] == closing:
            return i + n
    return None


def completion_roles(ids: list[int], closing: list[int], separator: str,
                     piece: Callable[[int], str]) -> tuple[np.ndarray, np.ndarray, bool]:
    """(role uint8 [n], step int32 [n], closed) of a completion's tokens: reasoning up to and
    including the think close `closing` (ids), answer after it (step −1); all reasoning when it
    never closes. A reasoning token's step counts the `separator`s that end before it starts, in the
    text of the tokens' pieces (piece(id) = its decoded text), as kd_jax.data.traces splits traces:
    a separator belongs to the step it ends, the close tag to the last step."""
    end = _sequence(ids, closing) if closing else None
    n_reasoning = len(ids) if end is None else end
    role = np.full(len(ids), Role.ANSWER, np.uint8)
    role[:n_reasoning] = Role.REASONING
    step = np.full(len(ids), -1, np.int32)
    if n_reasoning:
        pieces = [piece(t) for t in ids[:n_reasoning]]
        starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
        sep_ends = [m.end() for m in re.finditer(re.escape(separator), "".join(pieces))] if separator else []
        step[:n_reasoning] = np.searchsorted(np.asarray(sep_ends, np.int64), starts, side="right")
    return role, step, end is not None


def make_example(prompt: list[int], completion: list[int], role: np.ndarray, step: np.ndarray, seq_len: int,
                 k: int) -> tuple[dict[str, np.ndarray], bool]:
    """(shifted example as kd_jax.data.pipeline.shift_example makes them, truncated): prompt +
    completion cut to seq_len + 1 tokens; no teacher top-K (-1 ids: the online teacher grades)."""
    tokens = np.asarray(prompt + completion, np.int32)
    roles = np.concatenate([np.full(len(prompt), Role.PROMPT, np.uint8), role])
    steps = np.concatenate([np.full(len(prompt), -1, np.int32), step])
    truncated = len(tokens) > seq_len + 1
    tokens, roles, steps = tokens[:seq_len + 1], roles[:seq_len + 1], steps[:seq_len + 1]
    n = len(tokens) - 1
    return {"inputs": tokens[:-1], "labels": tokens[1:], "role": roles[1:], "reasoning_step": steps[1:],
            "step_weight": np.ones(n, np.float32), "topk_ids": np.full((n, k), -1, np.int32),
            "topk_logprobs": np.zeros((n, k), np.float32)}, truncated


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def sample_batch(graphdef, params, tokens_BxT, valid_BxT, key_data_Bx2, max_new: int, temperature: float, top_p: float,
            eos_E):
    keys = jax.random.wrap_key_data(key_data_Bx2)
    return sample_tokens(graphdef, params, tokens_BxT, valid_BxT, keys, max_new, temperature, top_p, eos_E)


@dataclasses.dataclass
class Sampled:
    """What one on-policy step sampled (sums over its completions)."""
    samples: int
    tokens: int  # completion tokens sampled (EOS included)
    closed: int  # completions that closed the reasoning (`</think>`)
    ended: int  # completions that ended with EOS (not cut by max_new_tokens)
    truncated: int  # examples cut at data.seq_len
    packed: int  # examples that fit in the batch's rows
    seconds: float  # sampling wall time (prefill + decode, device to host)


class OnPolicy:
    """The sampling half of on-policy steps: which steps they are, their prompts, the sampling key
    (checkpointed), and the packed batch of completions."""

    def __init__(self, cfg: Config, mesh, tokenizer, prompts: Prompts, graphdef: Any, eos_ids: list[int],
                 steps: Any, top_k: int):
        self.cfg: OnPolicyConfig = cfg.train.on_policy
        self.data_cfg, self.batch_size = cfg.data, cfg.train.global_batch_size
        self.mesh, self.prompts, self.graphdef, self.steps, self.top_k = mesh, prompts, graphdef, steps, top_k
        self.n = self.cfg.prompts_per_step or self.batch_size
        self.eos = list(eos_ids)
        self.closing = tokenizer(THINK_CLOSE, add_special_tokens=False)["input_ids"]
        self._tokenizer, self._pieces = tokenizer, {}
        self.key = jax.random.key(self.cfg.seed)
        self.done = 0  # on-policy steps taken

    def due(self, step: int) -> bool:
        return is_on_policy(step, self.cfg.fraction)

    def state(self) -> dict:
        """The checkpointed position: the sampling key and the on-policy steps done."""
        return {"key": np.asarray(jax.random.key_data(self.key)).tolist(), "done": self.done}

    def restore(self, saved: dict | None, step: int) -> None:
        """Back to the position saved at optimizer step `step`."""
        expected = on_policy_steps_before(step, self.cfg.fraction)
        if saved is None:
            raise OnPolicyError(f"the checkpoint at step {step} holds no on-policy sampling state (it was trained "
                                f"without train.on_policy); resume with the settings it was trained with, or start "
                                f"a new run")
        if saved["done"] != expected:
            raise OnPolicyError(f"the checkpoint at step {step} took {saved['done']} on-policy steps, but "
                                f"train.on_policy.fraction={self.cfg.fraction} gives {expected}; resume with the "
                                f"fraction it was trained with")
        self.key = jax.random.wrap_key_data(jnp.asarray(saved["key"], jnp.uint32))
        self.done = saved["done"]

    def _piece(self, token: int) -> str:
        if token not in self._pieces:
            self._pieces[token] = self._tokenizer.decode([token])
        return self._pieces[token]

    def _to_mesh(self, x: np.ndarray) -> jax.Array:
        """The global [n, ...] array (the same on every process) sharded over the batch axes."""
        return jax.make_array_from_process_local_data(sharding.batch_sharding(self.mesh, x.ndim),
                                                      sharding.process_share(x))

    def sample(self, params, prompts: list[list[int]]) -> tuple[list[list[int]], float]:
        """(completions cut after EOS, seconds) from nnx.merge(graphdef, params), with the next keys."""
        self.key, sub = jax.random.split(self.key)
        key_data = np.asarray(jax.random.key_data(jax.random.split(sub, len(prompts))))
        tokens, valid = left_pad(prompts, self.cfg.bucket)
        jax.block_until_ready(params)  # the step before must finish: its time is training time
        t0 = time.perf_counter()
        out = sample_batch(self.graphdef, params, self._to_mesh(tokens), self._to_mesh(valid), self._to_mesh(key_data),
                      self.cfg.max_new_tokens, float(self.cfg.temperature), float(self.cfg.top_p),
                      jnp.asarray(self.eos or [-1], jnp.int32))
        out = np.asarray(multihost_utils.process_allgather(out, tiled=True))
        seconds = time.perf_counter() - t0
        return [cut_at_eos(row.tolist(), self.eos) for row in out], seconds

    def next_batch(self, params) -> tuple[dict[str, np.ndarray], Sampled]:
        """This process's rows of the next on-policy batch (the batch contract of
        kd_jax.data.pipeline) and what was sampled; advances the key and the step count."""
        prompts = self.prompts.take(self.done, self.n)
        completions, seconds = self.sample(params, prompts)
        examples, closed, truncated = [], 0, 0
        for prompt, completion in zip(prompts, completions):
            role, step, did_close = completion_roles(completion, self.closing, self.data_cfg.steps.separator,
                                                     self._piece)
            example, cut = make_example(prompt, completion, role, step, self.data_cfg.seq_len, self.top_k)
            examples.append(example)
            closed += did_close
            truncated += cut
        batch, packed = pack_examples(examples, self.data_cfg, self.batch_size)
        self.done += 1
        batch = {k: sharding.process_share(v) for k, v in batch.items()}
        eos = set(self.eos)
        return batch, Sampled(samples=len(completions), tokens=sum(map(len, completions)), closed=closed,
                              ended=sum(bool(c) and c[-1] in eos for c in completions), truncated=truncated,
                              packed=packed, seconds=seconds)
