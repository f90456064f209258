"""Dot-product attention for the decoder: one entry point, several implementations.

`attention(q, k, v, ...)` is causal, packed-segment, optionally sliding-window attention with GQA,
for training (T = S, the row attends to itself) and generation (T new tokens against S cache
slots). The mask is described by per-token segment ids and positions, never passed in as a dense
[B, 1, T, S] array; only the "xla" reference (and cuDNN on packed rows) builds one.

Semantics (every implementation): query t may attend key s iff
  q_segment[t] == kv_segment[s]                 packed documents never see each other; padding
                                                (segment 0) attends other padding, so its output
                                                is finite (it is ignored by the loss);
  kv_pos[s] <= q_pos[t]                         causal by position (positions restart at 0 in every
                                                packed segment);
  and, when T == S, s <= t                      causal by index too: with T == S the query and key
                                                sequences are the same tokens (self-attention, or a
                                                prefill that fills the cache from slot 0). Inside a
                                                segment positions increase with the index, so this
                                                changes nothing there; it keeps padding rows (all at
                                                position 0) exactly as kd_jax.models.decoder's
                                                attention_mask has them, and matches the index-based
                                                masks of splash and cuDNN;
  q_pos[t] - kv_pos[s] < window                 with a sliding window (Mistral).
GQA: N query heads, K kv heads, N % K == 0; query head n uses kv head n // (N / K)
(jax.nn.dot_product_attention's grouping). Scale 1/sqrt(H).

Generation calls it with the S cache slots as keys: kv_segment 1 for a written slot and 0 for an
empty or left-padding one, q_segment 1, q_pos / kv_pos the slot indices (causality by slot), so a
query never attends an empty slot. A query row whose keys are all masked gives a finite output
(0 in "blockwise", the mean of v in "xla") and finite gradients.

Implementations (IMPLEMENTATIONS; "auto" picks by jax.default_backend(), see `resolve`):
  "xla"        the reference: the dense [B, 1, T, S] mask and jax.nn.dot_product_attention, which
               holds [B, N, T, S] fp32 scores per layer (and their gradient in the backward).
  "blockwise"  pure JAX, any backend: flash attention (online softmax over [block_q, block_kv]
               tiles, fp32 accumulators, masks computed per tile from segments and positions)
               with a FlashAttention-2 custom VJP that recomputes the tiles from q, k, v and the
               saved per-row logsumexp. GQA by grouping the query heads ([B, T, K, G, H]); k and v
               are never repeated. Memory O(T x block) per layer forward and backward: the tile
               scores [B, N, block_q, block_kv] fp32 plus O(T) rows (output, logsumexp, the fp32
               dq accumulator), never [T, S]. With T == S the key tiles past the diagonal are not
               visited; other fully masked tiles (other segments, outside the window) are skipped
               by a jax.lax.cond on the tile's mask, reduced over the batch (under a batch-sharded
               jit that reduction is one small all-reduce per tile).
  "splash"     TPU Pallas splash attention (interpret mode off TPU, for tests): self-attention only
               (T == S; ValueError for decode against a cache), index-causal masks (see _splash),
               T padded internally to a multiple of 128, tiles (block_q / block_kv) multiples of 128
               (AttentionError otherwise); any head dim. Under kd_jax's (data, fsdp, tensor) mesh it
               runs in jax.shard_map (a Mosaic call GSPMD cannot partition): batch over data x fsdp,
               heads over tensor. Memory O(T x block), like blockwise; no [T, T] buffer (checked in
               the program the TPU compiler makes: tests/test_tpu_compile.py).
  "cudnn"      jax.nn.dot_product_attention(implementation="cudnn"), GPU only (bf16/fp16, head dim
               a multiple of 8, <= 128 before Hopper, <= 256 from it), self-attention only
               (ValueError for decode against a cache). cuDNN has no segment ids: packed rows cost
               a dense [B, 1, T, T] bias (see _cudnn). Unchecked on a GPU so far.

Shapes: B batch, T queries, S keys/values, N query heads, K kv heads, G = N / K, H head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kd_jax.base.errors import KDJaxError
from kd_jax.base.schema import ATTENTION
from kd_jax.base.sharding import MESH_AXES, logical_to_spec

IMPLEMENTATIONS = ATTENTION  # ("auto", "xla", "blockwise", "splash", "cudnn"), the config's choices

# Segment ids of the internal padding of "blockwise" (and "splash"): they match no real segment
# (real ids are >= 0) and, for blockwise, not each other (padded keys are never attended).
_PAD_Q_SEGMENT = -1
_PAD_KV_SEGMENT = -2


def resolve(implementation: str, platform: str | None = None) -> str:
    """The concrete implementation for `implementation`: "auto" -> "splash" on TPU, "cudnn" on
    GPU, "xla" otherwise (CPU); any other name of IMPLEMENTATIONS is returned as is. `platform`
    ("tpu", "gpu", "cpu"): the devices it is for (the dry run sizes other machines'); None =
    jax.default_backend()."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    return {"tpu": "splash", "gpu": "cudnn"}.get(platform or jax.default_backend(), "xla")


def _allowed(q_segment_BxT, kv_segment_BxS, q_pos_BxT, kv_pos_BxS, q_index_T, kv_index_S,
             window: int | None, index_causal: bool) -> jax.Array:
    """[B, T, S] boolean: the semantics of the module docstring, for any T, S (a tile or all)."""
    mask_BxTxS = (q_segment_BxT[:, :, None] == kv_segment_BxS[:, None, :]) \
        & (kv_pos_BxS[:, None, :] <= q_pos_BxT[:, :, None])
    if index_causal:
        mask_BxTxS &= (kv_index_S[None, :] <= q_index_T[:, None])[None]
    if window is not None:
        mask_BxTxS &= (q_pos_BxT[:, :, None] - kv_pos_BxS[:, None, :]) < window
    return mask_BxTxS


def attention_mask(q_segment_BxT: jax.Array, kv_segment_BxS: jax.Array, q_pos_BxT: jax.Array,
                   kv_pos_BxS: jax.Array, window: int | None) -> jax.Array:
    """[B, 1, T, S] boolean mask of the module's semantics (the "xla" path's). With T == S and
    positions from packing, it is the packed rows' causal mask within each document; with cache
    slots as keys, the decoder's decode mask."""
    T, S = q_segment_BxT.shape[1], kv_segment_BxS.shape[1]
    mask_BxTxS = _allowed(q_segment_BxT, kv_segment_BxS, q_pos_BxT, kv_pos_BxS, jnp.arange(T), jnp.arange(S),
                          window, T == S)
    return mask_BxTxS[:, None]


class AttentionError(KDJaxError, ValueError):
    """An attention implementation this machine cannot run, or a setting it refuses (student.attention /
    teacher.attention, attention_block, the heads of the architecture)."""


def _cannot_run(implementation: str, platform: str) -> AttentionError:
    return AttentionError(f"attention {implementation!r} needs an NVIDIA GPU with cuDNN; on {platform} use auto, xla "
                          f"or blockwise (student.attention / teacher.attention)")


def check_runnable(implementation: str, platform: str | None = None) -> str:
    """resolve(implementation, platform), refusing what cannot run there: "cudnn" off a GPU (cheap, for
    model-build time; the forward says the same while tracing). "splash" runs anywhere (interpret
    mode off TPU, slowly)."""
    impl = resolve(implementation, platform)
    platform = platform or jax.default_backend()
    if impl == "cudnn" and platform != "gpu":
        raise _cannot_run(impl, platform)
    return impl


def attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array, *, q_segment_BxT: jax.Array,
              kv_segment_BxS: jax.Array, q_pos_BxT: jax.Array, kv_pos_BxS: jax.Array, window: int | None,
              implementation: str, block_q: int = 512, block_kv: int = 512) -> jax.Array:
    """Attention output [B, T, N, H] in q's dtype; see the module docstring for the mask.

    q_BxTxNxH: queries; k_BxSxKxH, v_BxSxKxH: keys and values (K divides N), same dtype as q.
    q_segment_BxT, kv_segment_BxS: int segment ids (>= 0; 0 = padding / empty cache slot).
    q_pos_BxT, kv_pos_BxS: int positions (restarting per packed segment) or cache slot indices.
    window: sliding window (a key at most window - 1 positions back), None for none.
    implementation: one of IMPLEMENTATIONS. block_q, block_kv: tile sizes of "blockwise" (cut to T
    and S when larger) and the largest tiles "splash" may use.
    """
    B, T, N, H = q_BxTxNxH.shape
    _, S, K, _ = k_BxSxKxH.shape
    if k_BxSxKxH.shape != (B, S, K, H) or v_BxSxKxH.shape != (B, S, K, H):
        raise ValueError(f"attention: q {q_BxTxNxH.shape}, k {k_BxSxKxH.shape}, v {v_BxSxKxH.shape}; "
                         f"want q [B, T, N, H] and k, v [B, S, K, H]")
    if N % K:
        raise AttentionError(f"attention: {N} query heads is not a multiple of {K} kv heads (GQA groups whole query "
                             f"heads per kv head): fix num_attention_heads / num_key_value_heads of "
                             f"student.architecture / teacher.architecture")
    for name, x, shape in (("q_segment", q_segment_BxT, (B, T)), ("q_pos", q_pos_BxT, (B, T)),
                           ("kv_segment", kv_segment_BxS, (B, S)), ("kv_pos", kv_pos_BxS, (B, S))):
        if x.shape != shape:
            raise ValueError(f"attention: {name} has shape {x.shape}, want {shape}")
    if window is not None and window < 1:
        raise ValueError(f"attention: window={window} must be >= 1 (or None)")
    impl = resolve(implementation)
    if impl == "xla":
        mask = attention_mask(q_segment_BxT, kv_segment_BxS, q_pos_BxT, kv_pos_BxS, window)
        return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask)
    if impl == "blockwise":
        return _blockwise(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxT, kv_segment_BxS, q_pos_BxT, kv_pos_BxS,
                          window, block_q, block_kv)
    if impl == "splash":
        return _splash(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxT, kv_segment_BxS, window, block_q, block_kv)
    return _cudnn(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxT, kv_segment_BxS, q_pos_BxT, kv_pos_BxS, window)


# --- "blockwise": flash attention in pure JAX ------------------------------------------------

def _pad_to(x: jax.Array, length: int, value) -> jax.Array:
    """`x` padded with `value` along axis 1 to `length`."""
    pad = length - x.shape[1]
    if pad == 0:
        return x
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def _blockwise(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxT, kv_segment_BxS, q_pos_BxT, kv_pos_BxS,
               window, block_q, block_kv):
    """Flash attention: pads T and S to whole tiles (segment ids that match nothing), groups the
    query heads by kv head ([B, T, K, G, H]; k and v are never repeated) and slices the padding
    off the output."""
    B, T, N, H = q_BxTxNxH.shape
    S, K = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
    bq, bk = min(block_q, T), min(block_kv, S)
    Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
    q_BxTpxKxGxH = _pad_to(q_BxTxNxH, Tp, 0).reshape(B, Tp, K, N // K, H)
    k_BxSpxKxH, v_BxSpxKxH = _pad_to(k_BxSxKxH, Sp, 0), _pad_to(v_BxSxKxH, Sp, 0)
    q_seg = _pad_to(q_segment_BxT.astype(jnp.int32), Tp, _PAD_Q_SEGMENT)
    kv_seg = _pad_to(kv_segment_BxS.astype(jnp.int32), Sp, _PAD_KV_SEGMENT)
    q_pos, kv_pos = _pad_to(q_pos_BxT.astype(jnp.int32), Tp, 0), _pad_to(kv_pos_BxS.astype(jnp.int32), Sp, 0)
    o_BxTpxKxGxH = _flash(q_BxTpxKxGxH, k_BxSpxKxH, v_BxSpxKxH, q_seg, kv_seg, q_pos, kv_pos,
                          window, bq, bk, T == S)
    return o_BxTpxKxGxH.reshape(B, Tp, N, H)[:, :T]


def _tile_mask(q_seg, kv_seg, q_pos, kv_pos, i, j, bq, bk, window, index_causal):
    """[B, bq, bk] mask of query tile i against key tile j (padded inputs)."""
    qs, qp = (jax.lax.dynamic_slice_in_dim(x, i * bq, bq, 1) for x in (q_seg, q_pos))
    ks, kp = (jax.lax.dynamic_slice_in_dim(x, j * bk, bk, 1) for x in (kv_seg, kv_pos))
    q_index = i * bq + jnp.arange(bq)
    kv_index = j * bk + jnp.arange(bk)
    return _allowed(qs, ks, qp, kp, q_index, kv_index, window, index_causal)


def _flash_forward(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, q_seg, kv_seg, q_pos, kv_pos, window, bq, bk, index_causal):
    """(o [B, T, K, G, H] in q's dtype, logsumexp [B, K, G, T] fp32; +inf on rows with no key)."""
    B, T, K, G, H = q_BxTxKxGxH.shape
    S = k_BxSxKxH.shape[1]
    nq, nk = T // bq, S // bk
    scale = 1.0 / math.sqrt(H)
    f32 = jnp.float32
    dt = q_BxTxKxGxH.dtype  # tile matmul operands: the input dtype, fp32 accumulation (as jax's xla path)

    def q_tile(i, carry):
        o_BxTxKxGxH, lse_BxKxGxT = carry
        q_i = jax.lax.dynamic_slice_in_dim(q_BxTxKxGxH, i * bq, bq, 1)

        def kv_tile(j, acc):
            mask_Bxbqxbk = _tile_mask(q_seg, kv_seg, q_pos, kv_pos, i, j, bq, bk, window, index_causal)

            def compute(acc):
                m_BxKxGxbq, l_BxKxGxbq, o_BxKxGxbqxH = acc
                k_j = jax.lax.dynamic_slice_in_dim(k_BxSxKxH, j * bk, bk, 1)
                v_j = jax.lax.dynamic_slice_in_dim(v_BxSxKxH, j * bk, bk, 1)
                s = jnp.einsum("bqkgh,bskh->bkgqs", q_i, k_j, preferred_element_type=f32) * scale
                mask = mask_Bxbqxbk[:, None, None]
                s = jnp.where(mask, s, -jnp.inf)
                m_new = jnp.maximum(m_BxKxGxbq, s.max(axis=-1))
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with no key yet: no NaN
                p = jnp.where(mask, jnp.exp(s - m_safe[..., None]), 0.0)
                alpha = jnp.exp(m_BxKxGxbq - m_safe)  # 0 while the row had no key
                l_new = alpha * l_BxKxGxbq + p.sum(axis=-1)
                pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(dt), v_j, preferred_element_type=f32)
                return m_new, l_new, alpha[..., None] * o_BxKxGxbqxH + pv

            return jax.lax.cond(mask_Bxbqxbk.any(), compute, lambda acc: acc, acc)

        init = (jnp.full((B, K, G, bq), -jnp.inf, f32), jnp.zeros((B, K, G, bq), f32),
                jnp.zeros((B, K, G, bq, H), f32))
        # With T == S (index-causal) the key tiles past the diagonal are masked: not even visited.
        last = jnp.minimum(nk, ((i + 1) * bq - 1) // bk + 1) if index_causal else nk
        m, l, o = jax.lax.fori_loop(0, last, kv_tile, init)
        seen = l > 0
        o = jnp.where(seen[..., None], o / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
        o_i = o.transpose(0, 3, 1, 2, 4).astype(q_BxTxKxGxH.dtype)
        o_BxTxKxGxH = jax.lax.dynamic_update_slice_in_dim(o_BxTxKxGxH, o_i, i * bq, 1)
        lse_BxKxGxT = jax.lax.dynamic_update_slice_in_dim(lse_BxKxGxT, lse, i * bq, 3)
        return o_BxTxKxGxH, lse_BxKxGxT

    init = (jnp.zeros_like(q_BxTxKxGxH), jnp.zeros((B, K, G, T), f32))
    return jax.lax.fori_loop(0, nq, q_tile, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, q_seg, kv_seg, q_pos, kv_pos, window, bq, bk, index_causal):
    """Flash attention on whole tiles (T % bq == S % bk == 0): o [B, T, K, G, H]."""
    return _flash_forward(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, q_seg, kv_seg, q_pos, kv_pos,
                          window, bq, bk, index_causal)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, q_pos, kv_pos, window, bq, bk, index_causal):
    o, lse = _flash_forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, window, bq, bk, index_causal)
    return o, (q, k, v, q_seg, kv_seg, q_pos, kv_pos, o, lse)


def _flash_bwd(window, bq, bk, index_causal, residuals, do_BxTxKxGxH):
    """FlashAttention-2 backward: for each key tile j (outer) and query tile i (inner), recompute
    P = exp(S - lse) from the tile scores; dV_j += P^T dO_i, dS = P * (dO_i V_j^T - D_i) with
    D = rowsum(dO * O), dQ_i += dS K_j * scale, dK_j += dS^T Q_i * scale. dK_j, dV_j live in fp32
    tile accumulators, dQ in one fp32 [B, T, K, G, H] buffer updated in place."""
    q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, q_seg, kv_seg, q_pos, kv_pos, o_BxTxKxGxH, lse_BxKxGxT = residuals
    B, T, K, G, H = q_BxTxKxGxH.shape
    S = k_BxSxKxH.shape[1]
    nq, nk = T // bq, S // bk
    scale = 1.0 / math.sqrt(H)
    f32 = jnp.float32
    dt = q_BxTxKxGxH.dtype  # tile matmul operands: the input dtype, fp32 accumulation (as jax's xla path)
    do_BxTxKxGxH = do_BxTxKxGxH.astype(q_BxTxKxGxH.dtype)
    D_BxKxGxT = jnp.einsum("btkgh,btkgh->bkgt", do_BxTxKxGxH.astype(f32), o_BxTxKxGxH.astype(f32))

    def kv_tile(j, carry):
        dq_BxTxKxGxH, dk_BxSxKxH, dv_BxSxKxH = carry
        k_j = jax.lax.dynamic_slice_in_dim(k_BxSxKxH, j * bk, bk, 1)
        v_j = jax.lax.dynamic_slice_in_dim(v_BxSxKxH, j * bk, bk, 1)

        def q_tile(i, acc):
            mask_Bxbqxbk = _tile_mask(q_seg, kv_seg, q_pos, kv_pos, i, j, bq, bk, window, index_causal)

            def compute(acc):
                dq, dk_j, dv_j = acc
                q_i = jax.lax.dynamic_slice_in_dim(q_BxTxKxGxH, i * bq, bq, 1)
                do_i = jax.lax.dynamic_slice_in_dim(do_BxTxKxGxH, i * bq, bq, 1)
                lse_i = jax.lax.dynamic_slice_in_dim(lse_BxKxGxT, i * bq, bq, 3)
                D_i = jax.lax.dynamic_slice_in_dim(D_BxKxGxT, i * bq, bq, 3)
                s = jnp.einsum("bqkgh,bskh->bkgqs", q_i, k_j, preferred_element_type=f32) * scale
                p = jnp.where(mask_Bxbqxbk[:, None, None], jnp.exp(s - lse_i[..., None]), 0.0)
                dv_j = dv_j + jnp.einsum("bkgqs,bqkgh->bskh", p.astype(dt), do_i, preferred_element_type=f32)
                dp = jnp.einsum("bqkgh,bskh->bkgqs", do_i, v_j, preferred_element_type=f32)
                ds = (p * (dp - D_i[..., None])).astype(dt)
                dq_i = jnp.einsum("bkgqs,bskh->bqkgh", ds, k_j, preferred_element_type=f32) * scale
                dq = jax.lax.dynamic_update_slice_in_dim(
                    dq, jax.lax.dynamic_slice_in_dim(dq, i * bq, bq, 1) + dq_i, i * bq, 1)
                dk_j = dk_j + jnp.einsum("bkgqs,bqkgh->bskh", ds, q_i, preferred_element_type=f32) * scale
                return dq, dk_j, dv_j

            return jax.lax.cond(mask_Bxbqxbk.any(), compute, lambda acc: acc, acc)

        zeros = jnp.zeros((B, bk, K, H), f32)
        first = (j * bk) // bq if index_causal else 0  # query tiles before the diagonal see no key of tile j
        dq_BxTxKxGxH, dk_j, dv_j = jax.lax.fori_loop(first, nq, q_tile, (dq_BxTxKxGxH, zeros, zeros))
        dk_BxSxKxH = jax.lax.dynamic_update_slice_in_dim(dk_BxSxKxH, dk_j.astype(dk_BxSxKxH.dtype), j * bk, 1)
        dv_BxSxKxH = jax.lax.dynamic_update_slice_in_dim(dv_BxSxKxH, dv_j.astype(dv_BxSxKxH.dtype), j * bk, 1)
        return dq_BxTxKxGxH, dk_BxSxKxH, dv_BxSxKxH

    init = (jnp.zeros((B, T, K, G, H), f32), jnp.zeros_like(k_BxSxKxH), jnp.zeros_like(v_BxSxKxH))
    dq, dk, dv = jax.lax.fori_loop(0, nk, kv_tile, init)
    # Integer inputs (segments, positions) have no cotangent.
    return dq.astype(q_BxTxKxGxH.dtype), dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --- "splash": TPU Pallas splash attention ---------------------------------------------------

SPLASH_LANES = 128  # splash's tiles (block_q, block_kv) are multiples of the TPU lane width; T is padded to it


def _splash_block(length: int, block: int) -> int:
    """The largest multiple of 128 that is <= `block` and divides `length` (a multiple of 128).
    AttentionError unless `block` is a positive multiple of 128: splash refuses other tiles."""
    if block < SPLASH_LANES or block % SPLASH_LANES:
        raise AttentionError(
            f"attention 'splash' takes tiles that are multiples of {SPLASH_LANES} (the TPU lane width; its "
            f"kernel refuses block_q / block_kv of other sizes), got attention_block={block} "
            f"(kd_jax.models.decoder.DecoderConfig.attention_block): use 128, 256, 512, ...")
    b = block
    while length % b:
        b -= SPLASH_LANES
    return b


@functools.lru_cache(maxsize=64)
def _splash_mask(N: int, T: int, window: int | None):
    """splash's index mask for N heads over T queries and keys (a lazy description, no [T, T] array)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if window is None:
        head_mask = sa.CausalMask((T, T))
    else:  # keys at index distance 0 .. window - 1 back: causal and local in one mask
        head_mask = sa.LocalMask((T, T), window_size=(window - 1, 0), offset=0)
    return sa.MultiHeadMask(tuple(head_mask for _ in range(N)))


def _splash_kernel(N: int, K: int, T: int, window: int | None, bq: int, bkv: int, interpret: bool):
    """A splash kernel for [N, T, H] queries and K kv heads over T keys, made inside the trace that
    calls it (as MaxText does). Its mask info (the block tables) is computed in numpy by splash's
    process_mask (cached by jax) and turned into arrays by jnp.array, which inside a trace stages
    them as constants of the program: never device arrays made at trace time, so the kernel also
    traces under a mesh of compile-only TPU devices (a topology on a CPU). Not cached itself: its
    arrays belong to the trace that made it."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    blocks = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                           block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    make = sa.make_splash_mqa if K == 1 else sa.make_splash_mha
    return make(_splash_mask(N, T, window), block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_platform() -> str:
    """The platform splash is traced for: the current mesh's devices (a TPU topology compiled on a
    CPU says "tpu"), else jax.default_backend()."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()


def _splash_mesh():
    """The current (abstract) mesh when it is kd_jax's (data, fsdp, tensor) mesh and none of its axes
    is manual yet; None otherwise (no mesh: splash runs as one program)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names) or mesh.manual_axes:
        return None
    return mesh


def _local_kv(x_BxSxKxH, n_local: int, G: int, axis):
    """The kv heads of this device's n_local query heads, when the query heads are split over mesh
    `axis` and the K kv heads are not (K does not divide by it; so n_local is not a multiple of G):
    device i holds query heads i * n_local .. and query head n reads kv head n // G."""
    i = jax.lax.axis_index(axis)
    if G % n_local == 0:  # all of them in one group: one kv head
        return jax.lax.dynamic_slice_in_dim(x_BxSxKxH, (i * n_local) // G, 1, axis=2)
    return jnp.take(x_BxSxKxH, (i * n_local + jnp.arange(n_local)) // G, axis=2)  # one kv head per query head


def _splash(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxT, kv_segment_BxS, window, block_q, block_kv):
    """Splash attention, vmapped over the batch, in its [N, T, H] layout.

    Splash's CausalMask / LocalMask are by index, and positions are ignored: inside a packed
    segment positions increase by one with the index (restarting at 0 per segment), so index
    causality and index distance plus segment equality are exactly the position semantics. Only
    padding rows (segment 0, all at position 0, outputs ignored) can differ from "xla" with a
    window: splash keeps a padding token to the `window` padding tokens before it.

    T is padded to a multiple of 128 (the kernel's lane width) with segment -1: padded rows attend
    themselves only, and no real row sees them. Tiles are the largest multiples of 128 up to
    block_q / block_kv dividing the padded length; block_q / block_kv (attention_block) must be
    multiples of 128 (AttentionError). Off TPU the kernel runs in Pallas interpret mode (slow;
    tests only); "TPU" is the current mesh's devices when a mesh is set (a TPU topology compiled
    on a CPU), else jax.default_backend().

    Under kd_jax's (data, fsdp, tensor) mesh (jax.set_mesh) splash is a Mosaic custom call that
    GSPMD cannot partition, so it runs in jax.shard_map over the mesh, sharded as the decoder's
    activations are (kd_jax.base.sharding's rules): the batch over the data and fsdp axes, query
    heads over tensor when they divide by it, kv heads likewise; when the kv heads do not divide
    and the query heads do, each device takes the kv heads of its query heads (_local_kv). A mesh
    axis a dimension does not divide by leaves that dimension whole (computed on every device of
    that axis). The sequence is never split.

    Splash calls a query row with no key an undefined softmax: it cannot happen in self-attention
    of packed rows (every token sees itself); it gave finite values in interpret mode, unchecked
    on a TPU."""
    T, N = q_BxTxNxH.shape[1], q_BxTxNxH.shape[2]
    S, K = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
    if T != S:
        raise ValueError(f"attention: 'splash' needs self-attention (T == S), got T={T} queries against S={S} "
                         f"keys (decode against a cache); use 'blockwise' or 'xla' for those calls")
    Tp = -(-T // SPLASH_LANES) * SPLASH_LANES
    bq, bkv = _splash_block(Tp, block_q), _splash_block(Tp, block_kv)
    interpret = _splash_platform() != "tpu"
    local = functools.partial(_splash_local, window=window, bq=bq, bkv=bkv, interpret=interpret)
    return _per_device(local, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxT, kv_segment_BxS)


def _per_device(local, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *rows_BxT):
    """`local(q, k, v, *rows)` (a kernel GSPMD cannot partition: splash's Mosaic call, cuDNN's) on
    each device's shard under kd_jax's mesh, in jax.shard_map: the batch over the data and fsdp
    axes, query heads over tensor when they divide, kv heads likewise, and when the kv heads do not
    divide but the query heads do, each device takes its query heads' kv heads (_local_kv); the
    [B, T] rows (segment ids, positions) with the batch. No mesh: `local` on the whole arrays."""
    mesh = _splash_mesh()
    if mesh is None:
        return local(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *rows_BxT)
    N, K = q_BxTxNxH.shape[2], k_BxSxKxH.shape[2]
    q_spec = logical_to_spec(("act_batch", None, "act_heads", None), q_BxTxNxH.shape, mesh)
    kv_spec = logical_to_spec(("act_batch", None, "act_kv_heads", None), k_BxSxKxH.shape, mesh)
    row_spec = P(q_spec[0], None)
    heads_axis = q_spec[2]
    n_local = N // math.prod(mesh.shape[a] for a in ((heads_axis,) if isinstance(heads_axis, str) else
                                                     heads_axis or ()))
    select_kv = heads_axis is not None and kv_spec[2] is None  # query heads split, kv heads whole

    def body(q, k, v, *rows):
        if select_kv:
            k, v = (_local_kv(x, n_local, N // K, heads_axis) for x in (k, v))
        return local(q, k, v, *rows)

    return jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec) + (row_spec,) * len(rows_BxT),
                         out_specs=q_spec, check_vma=False)(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *rows_BxT)


def _splash_local(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxT, kv_segment_BxS, *, window, bq, bkv,
                  interpret):
    """Splash on one device's arrays (the whole arrays without a mesh): pads T to the tiles' 128,
    transposes to splash's [N, T, H], vmaps the kernel over the batch."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    _, T, N, H = q_BxTxNxH.shape
    K = k_BxSxKxH.shape[2]
    Tp = -(-T // SPLASH_LANES) * SPLASH_LANES
    kernel = _splash_kernel(N, K, Tp, window, bq, bkv, interpret)
    scale = 1.0 / math.sqrt(H)
    q = (_pad_to(q_BxTxNxH, Tp, 0).astype(jnp.float32) * scale).astype(q_BxTxNxH.dtype).transpose(0, 2, 1, 3)
    k_BxKxSxH = _pad_to(k_BxSxKxH, Tp, 0).transpose(0, 2, 1, 3)
    v_BxKxSxH = _pad_to(v_BxSxKxH, Tp, 0).transpose(0, 2, 1, 3)
    if K == 1:  # make_splash_mqa: one [S, H] key and value for all heads
        k_BxKxSxH, v_BxKxSxH = k_BxKxSxH[:, 0], v_BxKxSxH[:, 0]
    segments = sa.SegmentIds(q=_pad_to(q_segment_BxT.astype(jnp.int32), Tp, -1),
                             kv=_pad_to(kv_segment_BxS.astype(jnp.int32), Tp, -1))
    o_BxNxTxH = jax.vmap(kernel)(q, k_BxKxSxH, v_BxKxSxH, segments)
    return o_BxNxTxH.transpose(0, 2, 1, 3)[:, :T].astype(q_BxTxNxH.dtype)


# --- "cudnn": cuDNN flash attention through jax.nn.dot_product_attention ---------------------

def one_segment_rows(q_segment_BxT: jax.Array, kv_segment_BxS: jax.Array) -> jax.Array:
    """Scalar bool: every row is one segment then right padding (s, ..., s, 0, ..., 0 with any
    s > 0, or all padding), and queries and keys carry the same ids."""
    nonzero_BxT = q_segment_BxT != 0
    lengths_B = nonzero_BxT.sum(axis=1, dtype=jnp.int32)
    index_T = jnp.arange(q_segment_BxT.shape[1], dtype=jnp.int32)
    prefix_BxT = (index_T[None, :] < lengths_B[:, None]) == nonzero_BxT
    one_id_BxT = (q_segment_BxT == q_segment_BxT[:, :1]) | ~nonzero_BxT
    return jnp.all(prefix_BxT & one_id_BxT) & jnp.all(q_segment_BxT == kv_segment_BxS)


def _cudnn(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxT, kv_segment_BxS, q_pos_BxT, kv_pos_BxS, window):
    """cuDNN flash attention (GPU only; bf16/fp16 and the head dims cuDNN supports). NOT YET RUN ON
    A GPU: jax refuses to even trace it without cuDNN ("cuDNN is not detected"), so the CPU tests
    check only the arguments built here, with jax's xla implementation standing in for cuDNN.

    cuDNN takes no segment ids, so the choice is made at run time (jax.lax.cond; both branches are
    compiled, XLA reserves memory for the larger one):
      every row one segment, right-padded (segment ids s, ..., s, 0, ..., 0, any s > 0) and
      q_segment == kv_segment: is_causal plus query/key lengths = the number of non-zero ids
      (at least 1), and the window as local_window_size (window - 1, 0). No mask in memory; padded
      query rows come out as cuDNN leaves them (ignored by the loss). Index causality equals
      position causality here (positions consecutive in the one segment).
      otherwise (packed rows, several segments): the dense [B, 1, T, T] mask as today, which
      cuDNN reads as a [B, 1, T, T] bias in q's dtype: packing costs a T x T bias on cuDNN
      (is_causal still lets it skip the tiles above the diagonal).
    Self-attention only (T == S): raises ValueError for decode against a cache. cuDNN with a bias
    also wants T even in training. (jax's private cuDNN module takes packed segments as offsets
    and lengths, Hopper and later, which would drop the bias for packed rows: not used here.)"""
    B, T, N, H = q_BxTxNxH.shape
    S = k_BxSxKxH.shape[1]
    if T != S:
        raise ValueError(f"attention: 'cudnn' needs self-attention (T == S), got T={T} queries against S={S} "
                         f"keys (decode against a cache); use 'xla' or 'blockwise' for those calls")
    try:
        # Per device (_per_device): left to GSPMD, jax's cuDNN partitioning gathered the whole batch
        # of q, k, v and the [B, 1, T, T] mask onto every device (compiled for 8 H100s at 32k tokens:
        # a 16 GiB bias per GPU).
        return _per_device(functools.partial(_cudnn_local, window=window), q_BxTxNxH, k_BxSxKxH, v_BxSxKxH,
                           q_segment_BxT, kv_segment_BxS, q_pos_BxT, kv_pos_BxS)
    except RuntimeError as e:  # jax's own words are one frame of a long trace; say what runs here instead
        if "cuDNN is not detected" not in str(e):
            raise
        raise _cannot_run("cudnn", jax.default_backend()) from None


def _cudnn_local(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxT, kv_segment_BxS, q_pos_BxT, kv_pos_BxS, *,
                 window):
    """cuDNN on one device's rows (see _cudnn): one segment per row, or the packed rows' mask."""
    unpacked = one_segment_rows(q_segment_BxT, kv_segment_BxS)
    lengths_B = jnp.maximum((q_segment_BxT != 0).sum(axis=1, dtype=jnp.int32), 1)

    def one_segment(q, k, v):
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, query_seq_lengths=lengths_B, key_value_seq_lengths=lengths_B,
            local_window_size=None if window is None else (window - 1, 0), implementation="cudnn")

    def packed(q, k, v):
        mask = attention_mask(q_segment_BxT, kv_segment_BxS, q_pos_BxT, kv_pos_BxS, window)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")

    return jax.lax.cond(unpacked, one_segment, packed, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH)

