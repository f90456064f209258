"""One Flax NNX decoder for the Llama family as Hugging Face ships it.

Covers Llama 2/3/3.1+ (llama3 rope scaling), Qwen2/2.5 (qkv bias), Qwen3 (q/k RMSNorm), Mistral
(sliding window) and SmolLM2: GQA, RMSNorm, SwiGLU, rotary embeddings (HF's rotate-half layout),
tied or untied output embedding. Layer parameters are stacked on a leading `layers` axis; the
forward pass scans over them (one compiled layer) or unrolls them, with the same parameter tree
either way, so checkpoints do not depend on `scan_layers`.

Shapes: B batch, T sequence, D embed, F mlp, N query heads, K kv heads, H head dim, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kd_jax.base.schema import ATTENTION, REMAT_POLICIES
from kd_jax.base.sharding import constrain, create_sharded
from kd_jax.models import attention as attn_lib


def remat_policy(name: str):
    """jax's checkpoint policy for a name of kd_jax.base.schema.REMAT_POLICIES ("none": no remat)."""
    if name == "none":
        return None
    if name == "offload_dots":  # the saved projections go to host memory instead of staying on device
        return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    return getattr(jax.checkpoint_policies, name)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    model_type: str = "llama"  # HF model_type: llama, qwen2, qwen3 or mistral
    vocab_size: int = 32000  # output classes (rows of the embedding)
    hidden_size: int = 4096  # D
    intermediate_size: int = 11008  # F, SwiGLU width
    num_layers: int = 32  # L
    num_heads: int = 32  # N query heads
    num_kv_heads: int = 32  # K key/value heads (GQA when K < N)
    head_dim: int = 128  # H
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted (key, value) pairs of HF's dict
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2, Llama attention_bias
    o_bias: bool = False  # Llama attention_bias
    mlp_bias: bool = False  # Llama mlp_bias
    qk_norm: bool = False  # Qwen3: RMSNorm over the head dim of q and k, before rope
    sliding_window: int | None = None  # Mistral: attend to at most this many previous tokens
    bos_token_id: int | None = None  # kept for export and generation
    eos_token_id: int | tuple[int, ...] | None = None  # one id or several (Llama 3)
    param_dtype: str = "float32"  # storage dtype of the parameters (fp32 master weights)
    dtype: str = "float32"  # compute dtype of activations and matmuls
    scan_layers: bool = True  # one jax.lax.scan over layers (fast compile) vs a Python loop
    remat: str = "none"  # rematerialization policy, one of kd_jax.base.schema.REMAT_POLICIES
    attention: str = "auto"  # dot-product attention, one of kd_jax.base.schema.ATTENTION (kd_jax.models.attention)
    attention_block: int = 512  # query/key tile of "blockwise" (and the largest "splash" may use)

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; choose one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention={self.attention!r}; choose one of {ATTENTION}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")


def rope_inv_freq(cfg: DecoderConfig) -> jax.Array:
    """Inverse frequencies [H/2] of the rotary embedding, with HF's rope_scaling variants."""
    H = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
    scaling = dict(cfg.rope_scaling or ())
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":  # Llama 3.1: transformers' _compute_llama3_parameters
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return jnp.where(medium, smoothed, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: default, linear, llama3")


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, inv_freq: jax.Array) -> jax.Array:
    freqs_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * _lead(inv_freq, 3)
    emb_BxTxH = jnp.concatenate([freqs_BxTxH2, freqs_BxTxH2], axis=-1)
    cos, sin = (f(emb_BxTxH)[:, :, None, :].astype(x_BxTxNxH.dtype) for f in (jnp.cos, jnp.sin))
    x1, x2 = jnp.split(x_BxTxNxH, 2, axis=-1)
    return x_BxTxNxH * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """HF's LlamaRMSNorm: normalize in fp32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return _lead(scale.astype(x.dtype), x.ndim) * y.astype(x.dtype)


def _lead(v: jax.Array, ndim: int) -> jax.Array:
    """`v` with leading unit axes up to `ndim` (explicit: the tests forbid implicit rank promotion)."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def _param(rngs: nnx.Rngs, shape, names, dtype, init="normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = 0.02 * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


class Layers(nnx.Module):
    """All L decoder layers, each parameter stacked on a leading `layers` axis."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        L, D, F, N, K, H = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                            cfg.num_kv_heads, cfg.head_dim)
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.attn_norm = _param(rngs, (L, D), ("layers", "norm"), pd, "ones")
        self.wq = _param(rngs, (L, D, N, H), ("layers", "embed", "heads", "head_dim"), pd)
        self.wk = _param(rngs, (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), pd)
        self.wv = _param(rngs, (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), pd)
        self.wo = _param(rngs, (L, N, H, D), ("layers", "heads", "head_dim", "embed"), pd)
        if cfg.qkv_bias:
            self.bq = _param(rngs, (L, N, H), ("layers", "heads", "head_dim"), pd, "zeros")
            self.bk = _param(rngs, (L, K, H), ("layers", "kv_heads", "head_dim"), pd, "zeros")
            self.bv = _param(rngs, (L, K, H), ("layers", "kv_heads", "head_dim"), pd, "zeros")
        if cfg.o_bias:
            self.bo = _param(rngs, (L, D), ("layers", "norm"), pd, "zeros")
        if cfg.qk_norm:
            self.q_norm = _param(rngs, (L, H), ("layers", "head_dim"), pd, "ones")
            self.k_norm = _param(rngs, (L, H), ("layers", "head_dim"), pd, "ones")
        self.mlp_norm = _param(rngs, (L, D), ("layers", "norm"), pd, "ones")
        self.w_gate = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), pd)
        self.w_up = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), pd)
        self.w_down = _param(rngs, (L, F, D), ("layers", "mlp", "embed"), pd)
        if cfg.mlp_bias:
            self.b_gate = _param(rngs, (L, F), ("layers", "mlp"), pd, "zeros")
            self.b_up = _param(rngs, (L, F), ("layers", "mlp"), pd, "zeros")
            self.b_down = _param(rngs, (L, D), ("layers", "norm"), pd, "zeros")


def layer(cfg: DecoderConfig, p: dict[str, jax.Array], x_BxTxD, positions_BxT, who, inv_freq,
          kv_cache=None, cache_index=None, implementation=None, taps: dict | None = None):
    """One decoder layer on the parameter slices `p` of one layer (no leading L axis).

    `who` = (q_segment_BxT, kv_segment_BxS, q_pos_BxT, kv_pos_BxS): which key each query may see
    (kd_jax.models.attention). Without a cache the T tokens attend to each other (S = T). With
    `kv_cache` = (k, v, l): the whole model's cache, each [L, B, S, K, H], and this layer's index
    l; the new keys and values are written into layer l at slot `cache_index` (in place: the cache
    is a loop carry, never sliced and restacked) and the T tokens attend to layer l's S slots;
    returns (x, (k, v)) then.
    `implementation` overrides cfg.attention (generation's decode steps).
    `taps`: a dict this call fills with the layer's inner activations while it traces (pruning's
    importance measures, kd_jax.models.prune): "attn_in", "mlp_in" (the normed inputs [B, T, D]),
    "heads" (each head's attention output before o_proj [B, T, N, H]) and "mlp_act" ([B, T, F])."""
    dt = jnp.dtype(cfg.dtype)
    w = {k: v.astype(dt) for k, v in p.items()}
    h = rms_norm(x_BxTxD, w["attn_norm"], cfg.rms_norm_eps)
    q_BxTxNxH = jnp.einsum("btd,dnh->btnh", h, w["wq"])
    k_BxTxKxH = jnp.einsum("btd,dkh->btkh", h, w["wk"])
    v_BxTxKxH = jnp.einsum("btd,dkh->btkh", h, w["wv"])
    if cfg.qkv_bias:
        q_BxTxNxH = q_BxTxNxH + _lead(w["bq"], 4)
        k_BxTxKxH = k_BxTxKxH + _lead(w["bk"], 4)
        v_BxTxKxH = v_BxTxKxH + _lead(w["bv"], 4)
    if cfg.qk_norm:
        q_BxTxNxH = rms_norm(q_BxTxNxH, w["q_norm"], cfg.rms_norm_eps)
        k_BxTxKxH = rms_norm(k_BxTxKxH, w["k_norm"], cfg.rms_norm_eps)
    q_BxTxNxH = constrain(apply_rope(q_BxTxNxH, positions_BxT, inv_freq), ("act_batch", "act_seq", "act_heads", None))
    k_BxTxKxH = constrain(apply_rope(k_BxTxKxH, positions_BxT, inv_freq), ("act_batch", "act_seq", "act_kv_heads", None))
    if kv_cache is not None:
        k_LxBxSxKxH, v_LxBxSxKxH, index = kv_cache
        at = (index, 0, cache_index, 0, 0)
        k_LxBxSxKxH = jax.lax.dynamic_update_slice(k_LxBxSxKxH, k_BxTxKxH[None].astype(k_LxBxSxKxH.dtype), at)
        v_LxBxSxKxH = jax.lax.dynamic_update_slice(v_LxBxSxKxH, v_BxTxKxH[None].astype(v_LxBxSxKxH.dtype), at)
        kv_cache = (k_LxBxSxKxH, v_LxBxSxKxH)
        k_BxTxKxH = jax.lax.dynamic_index_in_dim(k_LxBxSxKxH, index, 0, keepdims=False)
        v_BxTxKxH = jax.lax.dynamic_index_in_dim(v_LxBxSxKxH, index, 0, keepdims=False)
    q_segment_BxT, kv_segment_BxS, q_pos_BxT, kv_pos_BxS = who
    o_BxTxNxH = attn_lib.attention(
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, q_segment_BxT=q_segment_BxT, kv_segment_BxS=kv_segment_BxS,
        q_pos_BxT=q_pos_BxT, kv_pos_BxS=kv_pos_BxS, window=cfg.sliding_window,
        implementation=implementation or cfg.attention, block_q=cfg.attention_block, block_kv=cfg.attention_block)
    if taps is not None:
        taps.update(attn_in=h, heads=o_BxTxNxH)
    attn_BxTxD = jnp.einsum("btnh,nhd->btd", o_BxTxNxH, w["wo"])
    if cfg.o_bias:
        attn_BxTxD = attn_BxTxD + _lead(w["bo"], 3)
    x_BxTxD = constrain(x_BxTxD + attn_BxTxD, ("act_batch", "act_seq", "act_embed"))
    h = rms_norm(x_BxTxD, w["mlp_norm"], cfg.rms_norm_eps)
    gate_BxTxF = jnp.einsum("btd,df->btf", h, w["w_gate"])
    up_BxTxF = jnp.einsum("btd,df->btf", h, w["w_up"])
    if cfg.mlp_bias:
        gate_BxTxF, up_BxTxF = gate_BxTxF + _lead(w["b_gate"], 3), up_BxTxF + _lead(w["b_up"], 3)
    act_BxTxF = constrain(jax.nn.silu(gate_BxTxF) * up_BxTxF, ("act_batch", "act_seq", "act_mlp"))
    if taps is not None:
        taps.update(mlp_in=h, mlp_act=act_BxTxF)
    mlp_BxTxD = jnp.einsum("btf,fd->btd", act_BxTxF, w["w_down"])
    if cfg.mlp_bias:
        mlp_BxTxD = mlp_BxTxD + _lead(w["b_down"], 3)
    x_BxTxD = constrain(x_BxTxD + mlp_BxTxD, ("act_batch", "act_seq", "act_embed"))
    return x_BxTxD if kv_cache is None else (x_BxTxD, kv_cache)


class Decoder(nnx.Module):
    """Causal LM. `model(tokens)` gives logits; `model.hidden_states(tokens)` the final normed
    hidden states and `model.output_embedding()` the [D, V] projection, for the fused loss."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)
        self.layers = Layers(cfg, rngs=rngs)
        self.final_norm = _param(rngs, (cfg.hidden_size,), ("norm",), pd, "ones")
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd)

    def output_embedding(self) -> jax.Array:
        """[D, V] output projection (the transposed embedding when tied), in the param dtype."""
        return self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]

    def hidden_states(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
                      segment_ids_BxT: jax.Array | None = None, collect: tuple[int, ...] = ()):
        """Final normed hidden states [B, T, D] in the compute dtype.

        segment_ids_BxT: packed-document ids; tokens attend only within their own segment (ids
        equal), so documents never see each other. Padding can be any id (0 by convention).
        positions_BxT: rotary positions, restarting at 0 in every segment; default 0..T-1.
        collect: layer indices whose outputs (the residual stream after that layer, before the
        final norm) are also returned, as (h_BxTxD, collected_MxBxTxD) in `collect`'s order. Under
        the layer scan they go into an [M+1, B, T, D] buffer carried beside the stream (slot M
        takes the other layers), outside the remat boundary: memory O(M), not O(L).
        """
        cfg = self.cfg
        B, T = tokens_BxT.shape
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids_BxT is None:
            segment_ids_BxT = jnp.ones((B, T), jnp.int32)
        who = (segment_ids_BxT, segment_ids_BxT, positions_BxT, positions_BxT)  # no [T, T] mask here
        inv_freq = rope_inv_freq(cfg)
        x_BxTxD = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(jnp.dtype(cfg.dtype))
        x_BxTxD = constrain(x_BxTxD, ("act_batch", "act_seq", "act_embed"))

        stacked = {k: v[...] for k, v in vars(self.layers).items() if isinstance(v, nnx.Param)}

        def one_layer(x, p):
            return layer(cfg, p, x, positions_BxT, who, inv_freq)

        policy = remat_policy(cfg.remat)
        if cfg.remat != "none":
            one_layer = jax.checkpoint(one_layer, policy=policy, prevent_cse=not cfg.scan_layers)
        bad = [i for i in collect if not 0 <= i < cfg.num_layers]
        if bad:
            raise ValueError(f"collect={list(collect)}: layer indices must be in [0, {cfg.num_layers})")
        M = len(collect)
        slot_L = [collect.index(i) if i in collect else M for i in range(cfg.num_layers)]
        if cfg.scan_layers:
            def body(carry, xs):
                x, buf = carry
                p, slot = xs
                x = one_layer(x, p)
                if buf is not None:
                    buf = jax.lax.dynamic_update_index_in_dim(buf, x, slot, 0)
                return (x, buf), None

            buf = jnp.zeros((M + 1,) + x_BxTxD.shape, x_BxTxD.dtype) if M else None
            (x_BxTxD, buf), _ = jax.lax.scan(body, (x_BxTxD, buf), (stacked, jnp.asarray(slot_L, jnp.int32)))
            collected = buf[:M] if M else None
        else:
            outs = [None] * M
            for i in range(cfg.num_layers):
                x_BxTxD = one_layer(x_BxTxD, {k: v[i] for k, v in stacked.items()})
                if slot_L[i] < M:
                    outs[slot_L[i]] = x_BxTxD
            collected = jnp.stack(outs) if M else None
        h_BxTxD = rms_norm(x_BxTxD, self.final_norm[...].astype(x_BxTxD.dtype), cfg.rms_norm_eps)
        return (h_BxTxD, collected) if collect else h_BxTxD

    def _logits(self, h_BxTxD: jax.Array) -> jax.Array:
        w_DxV = self.output_embedding().astype(h_BxTxD.dtype)
        logits_BxTxV = jnp.einsum("btd,dv->btv", h_BxTxD, w_DxV, preferred_element_type=jnp.float32)
        return constrain(logits_BxTxV, ("act_batch", "act_seq", "act_vocab"))

    def init_cache(self, batch: int, slots: int):
        """An empty KV cache: (k, v), each [L, B, S, K, H] in the compute dtype."""
        cfg = self.cfg
        shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
        return jnp.zeros(shape, jnp.dtype(cfg.dtype)), jnp.zeros(shape, jnp.dtype(cfg.dtype))

    def decode(self, tokens_BxT, positions_BxT, kv_cache, cache_index, key_valid_BxS):
        """Logits [B, T, V] (fp32) of T new tokens written at slot `cache_index` of `kv_cache`, and
        the updated cache. Token t sits in slot cache_index + t and attends to the valid slots
        (`key_valid_BxS`: False for left padding) at or before its own."""
        cfg = self.cfg
        B, T = tokens_BxT.shape
        S = key_valid_BxS.shape[1]
        # Keys are cache slots: segment 1 where written (0 for left padding and empty slots), and
        # causality and the window by slot (slots and positions differ by the row's padding only).
        slot_BxT = jnp.broadcast_to(cache_index + jnp.arange(T, dtype=jnp.int32), (B, T))
        who = (jnp.ones((B, T), jnp.int32), key_valid_BxS.astype(jnp.int32), slot_BxT,
               jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)))
        # One new token attends through a [B, N, 1, S] row: the dense path is the cheap one. A
        # prefill against the cache (T < S) takes blockwise where the kernels take self-attention only.
        impl = attn_lib.resolve(cfg.attention)
        impl = "xla" if T == 1 else ("blockwise" if impl in ("splash", "cudnn") else impl)
        inv_freq = rope_inv_freq(cfg)
        x_BxTxD = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(jnp.dtype(cfg.dtype))
        stacked = {k: v[...] for k, v in vars(self.layers).items() if isinstance(v, nnx.Param)}

        # The cache rides in the scan's carry and each layer writes its slot in place: as scanned
        # inputs and outputs it would be sliced and restacked (copied whole) at every token.
        def body(carry, xs):
            x, k_cache, v_cache = carry
            p, index = xs
            x, (k_cache, v_cache) = layer(cfg, p, x, positions_BxT, who, inv_freq, (k_cache, v_cache, index),
                                          cache_index, impl)
            return (x, k_cache, v_cache), None

        (x_BxTxD, *kv_cache), _ = jax.lax.scan(body, (x_BxTxD,) + tuple(kv_cache),
                                               (stacked, jnp.arange(cfg.num_layers, dtype=jnp.int32)))
        kv_cache = tuple(kv_cache)
        h_BxTxD = rms_norm(x_BxTxD, self.final_norm[...].astype(x_BxTxD.dtype), cfg.rms_norm_eps)
        return self._logits(h_BxTxD), kv_cache

    def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
                 segment_ids_BxT: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, V] in fp32 (fp32 accumulation of a compute-dtype matmul)."""
        return self._logits(self.hidden_states(tokens_BxT, positions_BxT, segment_ids_BxT))


def init_decoder(cfg: DecoderConfig, *, seed: int = 0, mesh=None) -> Decoder:
    """A randomly initialised decoder, created directly sharded on `mesh` (None: default device)."""
    return create_sharded(lambda: Decoder(cfg, rngs=nnx.Rngs(seed)), mesh)


def num_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
