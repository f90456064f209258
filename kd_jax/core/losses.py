"""The distillation objective: per-token weights from the batch, and the fused chunked loss.

The objective (docs/architecture.md, "The loss") is linear in per-token terms, L = Σ_t a_t·soft_t + b_t·hard_t,
with a_t, b_t depending only on roles, steps, step weights and masks. `token_weights` computes a and b;
`kd_loss` walks the tokens in chunks, turns each chunk's hidden states into logits, reduces them to
the weighted terms and their gradient in the same pass, and never holds [tokens × vocab] logits.
`token_terms` is the per-token math on materialized logits, shared by both (and by evaluation).
`kd_loss_online` is the same walk against a teacher run in the same step: per chunk it also turns
the teacher's final hidden states into its logits, and takes the divergence over the full
vocabulary (`dense_token_terms`) or over the teacher's top-K (`token_terms`, as a store would).
`sample_targets` draws a sampled store's rows (precompute.targets=sampled; `token_terms` with
targets="sampled" is their unbiased soft term).
`hidden_alignment` is the intermediate-layer term (online teacher; no vocabulary dimension).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kd_jax.base.schema import DIVERGENCES, HIDDEN_DISTANCES, TARGETS, LossConfig
from kd_jax.base.sharding import constrain
from kd_jax.data.roles import Role

# Floor for the teacher's leftover mass 1 − Σ_k p_k: fp32 rounding can make it 0 or negative.
_TAIL_FLOOR = float(jnp.finfo(jnp.float32).tiny)


# --- Per-token weights -----------------------------------------------------------------------

def _step_groups(role_BxT, step_BxT, segment_ids_BxT, loss_mask_BxT, step_weight, answer_weight,
                 step_weights_BxT=None):
    """Run-length groups of (row, segment, role, step): one group per reasoning step or answer.

    Returns supervised_BxT, group_BxT (flat group ids in [0, B·T)), n_G (supervised tokens per
    group), w_G (the group's weight w_s) and w_BxT (each token's weight: step_weight times its
    per-token step weight for reasoning, answer_weight for answers, 0 for prompt).
    """
    B, T = role_BxT.shape
    supervised_BxT = (role_BxT != Role.PROMPT) & loss_mask_BxT.astype(bool) & (segment_ids_BxT != 0)
    # An answer is identified by (row, segment) alone: its step index does not split it.
    step_key_BxT = jnp.where(role_BxT == Role.REASONING, step_BxT, -1)
    differs_BxT1 = ((role_BxT[:, 1:] != role_BxT[:, :-1]) | (step_key_BxT[:, 1:] != step_key_BxT[:, :-1])
                    | (segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]))
    # Every row starts a group, so a step never crosses rows (n_s is local to the row).
    change_BxT = jnp.concatenate([jnp.ones((B, 1), bool), differs_BxT1], axis=1)
    group_BxT = (jnp.cumsum(change_BxT.reshape(-1)) - 1).reshape(B, T)
    reasoning_w = jnp.float32(step_weight)
    if step_weights_BxT is not None:  # the stored weight of each token's reasoning step
        reasoning_w = reasoning_w * step_weights_BxT.astype(jnp.float32)
    w_BxT = jnp.where(role_BxT == Role.REASONING, reasoning_w,
                      jnp.where(role_BxT == Role.ANSWER, jnp.float32(answer_weight), jnp.float32(0.0)))
    n_G = jax.ops.segment_sum(supervised_BxT.reshape(-1).astype(jnp.float32), group_BxT.reshape(-1),
                              num_segments=B * T)
    # A group's weight is read off its first token (all its tokens share the role).
    w_G = jax.ops.segment_sum(jnp.where(change_BxT, w_BxT, 0.0).reshape(-1), group_BxT.reshape(-1),
                              num_segments=B * T)
    return supervised_BxT, group_BxT, n_G, w_G, w_BxT


def weight_totals(role_BxT, step_BxT, segment_ids_BxT, loss_mask_BxT, *, step_weight, answer_weight,
                  step_weights_BxT=None):
    """(num_supervised, step_weight_sum) of this batch, fp32 scalars.

    A trainer sums these over micro-batches (and devices) and passes the sums to `token_weights`,
    so every mean in the objective is over the whole global batch. step_weights_BxT: as in
    `token_weights`.
    """
    supervised_BxT, _, n_G, w_G, _ = _step_groups(role_BxT, step_BxT, segment_ids_BxT, loss_mask_BxT,
                                                  step_weight, answer_weight, step_weights_BxT)
    # A step whose tokens are all masked out does not count in Σ_s w_s.
    return supervised_BxT.sum(dtype=jnp.float32), jnp.where(n_G > 0, w_G, 0.0).sum()


def token_weights(role_BxT, step_BxT, segment_ids_BxT, loss_mask_BxT, *, alpha, beta, step_weight,
                  answer_weight, num_supervised=None, step_weight_sum=None, step_weights_BxT=None):
    """Per-token coefficients (a_BxT, b_BxT), fp32, with L = Σ_t a_t·soft_t + b_t·hard_t.

    Inputs are aligned to the prediction targets: role_BxT[b, t] is the role of the label at t
    (0 prompt, 1 reasoning, 2 answer), step_BxT its reasoning step (−1 outside reasoning),
    segment_ids_BxT the packed document (0 = padding), loss_mask_BxT (bool) drops more tokens,
    step_weights_BxT (float, optional; None = all 1) the stored weight of the label's reasoning
    step (the batch's `step_weight`).
      a_t = α/N + β·α·w_s/(n_s·W),   b_t = (1−α)/N + β·(1−α)·w_s/(n_s·W)
    w_s = step_weight × the step's stored weight (read off its first token) for a reasoning step,
    answer_weight for an answer. N (`num_supervised`) and W (`step_weight_sum`, Σ w_s) must be
    global; None computes them from this batch (`weight_totals`). n_s, the supervised tokens of t's
    step, is local: steps stay in a row.
    """
    supervised_BxT, group_BxT, n_G, w_G, _ = _step_groups(
        role_BxT, step_BxT, segment_ids_BxT, loss_mask_BxT, step_weight, answer_weight, step_weights_BxT)
    if num_supervised is None:
        num_supervised = supervised_BxT.sum(dtype=jnp.float32)
    if step_weight_sum is None:
        step_weight_sum = jnp.where(n_G > 0, w_G, 0.0).sum()
    num_supervised = jnp.asarray(num_supervised, jnp.float32)
    step_weight_sum = jnp.asarray(step_weight_sum, jnp.float32)
    # Safe denominators: an empty batch or zero step weights give zero coefficients, not NaN.
    mean_coef = 1.0 / jnp.maximum(num_supervised, 1.0)
    n_BxT = n_G[group_BxT]
    step_coef_BxT = w_G[group_BxT] / (jnp.maximum(n_BxT, 1.0) * jnp.where(step_weight_sum > 0, step_weight_sum, 1.0))
    coef_BxT = jnp.where(supervised_BxT, mean_coef + beta * step_coef_BxT, 0.0)
    return alpha * coef_BxT, (1.0 - alpha) * coef_BxT


# --- Per-token terms on materialized logits ----------------------------------------------------

def _masked_logsumexp(x_CxJ, mask_CxJ):
    """logsumexp over the masked entries; 0 where a row has none (callers mask those rows).
    NaN-free in value and gradient: masked entries never reach exp or log."""
    m_C = jax.lax.stop_gradient(jnp.max(jnp.where(mask_CxJ, x_CxJ, -jnp.inf), axis=-1))
    m_C = jnp.where(jnp.isfinite(m_C), m_C, 0.0)
    e_CxJ = jnp.where(mask_CxJ, jnp.exp(jnp.where(mask_CxJ, x_CxJ, m_C[:, None]) - m_C[:, None]), 0.0)
    s_C = e_CxJ.sum(axis=-1)
    return m_C + jnp.log(jnp.where(s_C > 0, s_C, 1.0))


def _log_normalize(x_CxJ, mask_CxJ):
    """Log-probabilities over the masked entries (0 at the others, which callers mask)."""
    return jnp.where(mask_CxJ, x_CxJ - _masked_logsumexp(x_CxJ, mask_CxJ)[:, None], 0.0)


def _divergence(log_p_CxJ, log_q_CxJ, mask_CxJ, divergence, jsd_beta):
    """Divergence between teacher p and student q given as log-probs on the masked buckets.
    Masked buckets have probability 0 and add nothing (the 0·log 0 trap: both logs are
    finite stand-ins there and `where` drops them, so gradients stay finite). mask_CxJ=None:
    every bucket counts (full-vocabulary log_softmax on both sides, so every log is finite)."""
    p_CxJ, q_CxJ = jnp.exp(log_p_CxJ), jnp.exp(log_q_CxJ)
    if divergence == "forward_kl":
        terms_CxJ = p_CxJ * (log_p_CxJ - log_q_CxJ)
    elif divergence == "reverse_kl":
        terms_CxJ = q_CxJ * (log_q_CxJ - log_p_CxJ)
    elif divergence == "jsd":
        if jsd_beta <= 0.0 or jsd_beta >= 1.0:  # m equals p or q: the divergence is 0
            return jnp.zeros(log_p_CxJ.shape[:1], jnp.float32)
        log_m_CxJ = jnp.logaddexp(jnp.log(jsd_beta) + log_p_CxJ, jnp.log1p(-jsd_beta) + log_q_CxJ)
        terms_CxJ = (jsd_beta * p_CxJ * (log_p_CxJ - log_m_CxJ)
                     + (1.0 - jsd_beta) * q_CxJ * (log_q_CxJ - log_m_CxJ))
    else:
        raise ValueError(f"divergence={divergence!r}; expected one of {DIVERGENCES}")
    if mask_CxJ is not None:
        terms_CxJ = jnp.where(mask_CxJ, terms_CxJ, 0.0)
    return terms_CxJ.sum(axis=-1)


def token_terms(logits_CxV, labels_C, topk_ids_CxK, topk_logprobs_CxK, *, temperature=1.0,
                divergence="forward_kl", jsd_beta=0.5, tail=False, targets="topk"):
    """Per-token (soft_C, hard_C, top1_agree_C) from fp32 student logits.

    hard = −log softmax(z)[y] in nats (labels outside [0, V) give a finite, meaningless value:
    their weights must be 0). soft = T²·divergence(teacher ‖ student) in nats, over the teacher's
    valid top-K ids (ids outside [0, V) are dropped and the rest renormalized), or over K+1
    buckets with `tail`. top1_agree: student argmax equals the teacher's best valid id. K = 0
    (no teacher) gives soft = 0 and top1_agree = False.
    targets="sampled" (a store of `sample_targets` rows drawn at T_s = T): the stored weights
    w = exp(logprob) = count/N are the teacher's target as they are (not tempered again; only
    renormalized to undo the log-prob dtype's rounding), and soft = T²·Σ_i w_i (log w_i − log q_T(i))
    with q_T the student's softmax(z/T) over the full vocabulary. E[w_i] = p_T(i), so E[soft]
    differs from the dense T²·KL(p_T ‖ q_T) by a constant of the teacher and its gradient equals
    the dense one's in expectation. Forward KL only, no tail (ValueError otherwise).
    """
    C, V = logits_CxV.shape
    T = temperature  # a Python float or a traced scalar (a schedule does not recompile)
    z_CxV = logits_CxV.astype(jnp.float32)
    lp_CxK = topk_logprobs_CxK.astype(jnp.float32)
    # Teacher vocabularies padded past the student's (Qwen 152064 vs 151936) carry ids >= V.
    valid_CxK = (topk_ids_CxK >= 0) & (topk_ids_CxK < V) & jnp.isfinite(lp_CxK)
    ids_CxK = jnp.where(valid_CxK, topk_ids_CxK, 0)
    labels_C = jnp.clip(labels_C, 0, V - 1)

    hard_C = jax.nn.logsumexp(z_CxV, axis=-1) - jnp.take_along_axis(z_CxV, labels_C[:, None], axis=-1)[:, 0]
    if topk_ids_CxK.shape[-1] == 0:  # a tokens-only store: no teacher, so no soft term or agreement
        return jnp.zeros_like(hard_C), hard_C, jnp.zeros(hard_C.shape, bool)

    zt_CxV = z_CxV / T
    lse_t_C = jax.nn.logsumexp(zt_CxV, axis=-1)
    zt_CxK = jnp.take_along_axis(zt_CxV, ids_CxK, axis=-1)  # gather K columns, never upcast [N, V]
    if targets == "sampled":
        if tail or divergence != "forward_kl":
            raise ValueError(f"sampled targets take divergence='forward_kl' without tail (got divergence="
                             f"{divergence!r}, tail={tail}): only the cross-entropy to the draws is unbiased")
        log_w_CxK = _log_normalize(lp_CxK, valid_CxK)  # count/N: Σ = 1 but for the dtype's rounding
        log_q_CxK = jnp.where(valid_CxK, zt_CxK - lse_t_C[:, None], 0.0)
        soft_C = _divergence(log_w_CxK, log_q_CxK, valid_CxK, "forward_kl", jsd_beta)
    elif targets != "topk":
        raise ValueError(f"targets={targets!r}; expected one of {TARGETS}")
    elif not tail:
        log_p_CxK = _log_normalize(lp_CxK / T, valid_CxK)
        if divergence == "forward_kl":
            # Full-vocab student, sub-normalized on K: the mass outside K only adds to the loss.
            log_q_CxK = jnp.where(valid_CxK, zt_CxK - lse_t_C[:, None], 0.0)
        else:
            # Reverse KL and JSD need a proper distribution on both sides: renormalize on K.
            log_q_CxK = _log_normalize(zt_CxK, valid_CxK)
        soft_C = _divergence(log_p_CxK, log_q_CxK, valid_CxK, divergence, jsd_beta)
    else:
        # Teacher buckets at T = 1: its top-K probabilities and the leftover mass (dropped ids
        # included), then tempered over the K+1 buckets: p^T ∝ p^(1/T).
        mass_C = jnp.where(valid_CxK, jnp.exp(lp_CxK), 0.0).sum(axis=-1)
        log_tail_C = jnp.log(jnp.maximum(1.0 - mass_C, _TAIL_FLOOR))
        mask_CxJ = jnp.concatenate([valid_CxK, jnp.ones((C, 1), bool)], axis=-1)
        log_p_CxJ = _log_normalize(jnp.concatenate([lp_CxK, log_tail_C[:, None]], axis=-1) / T, mask_CxJ)
        # Student tail = mass outside the valid K ids, as a logsumexp over the other logits:
        # log(1 − Σ q) in fp32 cancels catastrophically when the top-K hold nearly all the mass.
        rows_CxK = jnp.broadcast_to(jnp.arange(C)[:, None], ids_CxK.shape)
        in_topk_CxV = jnp.zeros((C, V), bool).at[rows_CxK, jnp.where(valid_CxK, ids_CxK, V)].set(
            True, mode="drop")
        rest_CxV = ~in_topk_CxV
        has_rest_C = rest_CxV.any(axis=-1)
        log_q_tail_C = jnp.where(has_rest_C, _masked_logsumexp(zt_CxV, rest_CxV) - lse_t_C,
                                 jnp.log(_TAIL_FLOOR))
        log_q_CxJ = jnp.where(mask_CxJ, jnp.concatenate(
            [zt_CxK - lse_t_C[:, None], log_q_tail_C[:, None]], axis=-1), 0.0)
        soft_C = _divergence(log_p_CxJ, log_q_CxJ, mask_CxJ, divergence, jsd_beta)
    soft_C = (T * T) * soft_C

    best_C = jnp.argmax(jnp.where(valid_CxK, lp_CxK, -jnp.inf), axis=-1)
    teacher_top1_C = jnp.take_along_axis(ids_CxK, best_C[:, None], axis=-1)[:, 0]
    top1_agree_C = valid_CxK.any(axis=-1) & (jnp.argmax(z_CxV, axis=-1) == teacher_top1_C)
    return soft_C, hard_C, top1_agree_C


def dense_token_terms(logits_CxV, teacher_logits_CxV, labels_C, *, temperature=1.0, divergence="forward_kl",
                      jsd_beta=0.5):
    """Per-token (soft_C, hard_C, top1_agree_C) against the teacher's full distribution.

    logits_CxV / teacher_logits_CxV: fp32 student and teacher logits over the same V ids (the
    caller drops the teacher's padding rows >= V, so its distribution is renormalized over ids < V).
    soft = T²·divergence(p ‖ q), p = softmax(z_t/T), q = softmax(z/T), over all V ids; hard as in
    `token_terms`; top1_agree: the two argmaxes are equal. Both sides go through log_softmax, so
    every log is finite for finite logits; exp(log p) may underflow to 0 and then multiplies a
    finite number (no 0·log 0, no NaN in value or gradient).
    """
    T = temperature  # a Python float or a traced scalar (a schedule does not recompile)
    z_CxV = logits_CxV.astype(jnp.float32)
    zt_CxV = teacher_logits_CxV.astype(jnp.float32)
    V = z_CxV.shape[-1]
    labels_C = jnp.clip(labels_C, 0, V - 1)
    hard_C = jax.nn.logsumexp(z_CxV, axis=-1) - jnp.take_along_axis(z_CxV, labels_C[:, None], axis=-1)[:, 0]
    log_q_CxV = jax.nn.log_softmax(z_CxV / T, axis=-1)
    log_p_CxV = jax.nn.log_softmax(zt_CxV / T, axis=-1)
    soft_C = (T * T) * _divergence(log_p_CxV, log_q_CxV, None, divergence, jsd_beta)
    top1_agree_C = jnp.argmax(z_CxV, axis=-1) == jnp.argmax(zt_CxV, axis=-1)
    return soft_C, hard_C, top1_agree_C


# --- Sampled targets ---------------------------------------------------------------------------

def sample_targets(logits_CxW, keys_C, n: int, *, temperature, vocab_size: int):
    """n draws with replacement per row from softmax(logits / temperature) over ids < vocab_size,
    as the unique ids drawn and their empirical weights: (ids_CxN int32, padded with -1 after the
    unique ids, ascending; log_w_CxN fp32, log(count / n), 0 at the padding). exp(log_w) of a row
    sums to 1 and E[count_i / n] = p_T(i): the unbiased sparse target of "Sparse Logit Sampling"
    (Anshumann et al., 2025). keys_C: one PRNG key per row (the caller derives them from the
    position, so the draws do not depend on batching). Inverse-CDF sampling: one fp32 cumsum over
    the W logits per row, then n binary searches (ids whose probability is below the cumsum's fp32
    resolution, ~1e-7 of the row's mass, are never drawn)."""
    C, W = logits_CxW.shape
    z_CxW = logits_CxW.astype(jnp.float32) / temperature
    if W > vocab_size:  # padded teacher rows: ids the student cannot emit are never drawn
        z_CxW = jnp.where(jnp.arange(W)[None, :] < vocab_size, z_CxW, -jnp.inf)
    cdf_CxW = jnp.cumsum(jax.nn.softmax(z_CxW, axis=-1), axis=-1)
    u_CxN = jax.vmap(lambda k: jax.random.uniform(k, (n,), jnp.float32))(keys_C) * cdf_CxW[:, -1:]
    # side="right": the first id whose cdf exceeds u, so an id of probability 0 is never drawn.
    draws_CxN = jax.vmap(lambda c, u: jnp.searchsorted(c, u, side="right"))(cdf_CxW, u_CxN)
    draws_CxN = jnp.minimum(draws_CxN, vocab_size - 1).astype(jnp.int32)
    s_CxN = jnp.sort(draws_CxN, axis=-1)
    first_CxN = jnp.concatenate([jnp.ones((C, 1), bool), s_CxN[:, 1:] != s_CxN[:, :-1]], axis=-1)
    group_CxN = jnp.cumsum(first_CxN, axis=-1) - 1  # slot of each draw's unique id
    rows_CxN = jnp.broadcast_to(jnp.arange(C)[:, None], (C, n))
    counts_CxN = jnp.zeros((C, n), jnp.float32).at[rows_CxN, group_CxN].add(1.0)
    ids_CxN = jnp.full((C, n), -1, jnp.int32).at[rows_CxN, group_CxN].set(s_CxN)
    used_CxN = counts_CxN > 0
    log_w_CxN = jnp.where(used_CxN, jnp.log(jnp.where(used_CxN, counts_CxN, 1.0) / n), 0.0)
    return jnp.where(used_CxN, ids_CxN, -1), log_w_CxN


# --- The fused, chunked loss -----------------------------------------------------------------

_METRICS = ("soft_sum", "hard_sum", "num_tokens", "top1_agree")
# The online loss also sums the teacher's negative log-likelihood of the labels (at T = 1, over the
# student's V ids): on sampled sequences, how likely the teacher finds what the student wrote.
_ONLINE_METRICS = _METRICS + ("teacher_nll_sum",)


def _chunk_loss(logits_CxV, labels_C, ids_CxK, logprobs_CxK, a_C, b_C, temperature, cfg: LossConfig,
                targets="topk"):
    """Σ_t a·soft + b·hard over one chunk, and the chunk's metric sums."""
    soft_C, hard_C, agree_C = token_terms(logits_CxV, labels_C, ids_CxK, logprobs_CxK,
                                          temperature=temperature, divergence=cfg.divergence,
                                          jsd_beta=cfg.jsd_beta, tail=cfg.tail, targets=targets)
    return _weighted(soft_C, hard_C, agree_C, a_C, b_C)


def _weighted(soft_C, hard_C, agree_C, a_C, b_C):
    """(Σ_t a·soft + b·hard, metric sums) over the tokens with a ≠ 0 or b ≠ 0."""
    used_C = (a_C != 0) | (b_C != 0)
    # `where`, not a·soft: a padded token's garbage must not reach the sum even as 0·inf.
    loss = jnp.where(used_C, a_C * soft_C + b_C * hard_C, 0.0).sum()
    metrics = dict(soft_sum=jnp.where(used_C, soft_C, 0.0).sum(),
                   hard_sum=jnp.where(used_C, hard_C, 0.0).sum(),
                   num_tokens=used_C.sum(dtype=jnp.float32),
                   top1_agree=(used_C & agree_C).sum(dtype=jnp.float32))
    return loss, metrics


def _to_chunks(x_N, chunk_size):
    """[N, ...] -> [G, C, ...], padding N to C·G with zeros (zero-weight tokens).

    Layout under sharding: token n = c·G + g goes to chunk g, row c. N is sharded in contiguous
    blocks over the batch axes, so after the reshape to [C, G, ...] the *C* axis carries that
    sharding and the swap to [G, C, ...] is a local transpose. The scan then walks G, an unsharded
    axis: every step is one chunk spread over all devices (C / batch-shards rows each), with no
    gather. Scanning a sharded chunk axis instead would make XLA gather every chunk to every device.
    Keep N a multiple of C, and C of the batch shard count, for this to hold without a reshuffle.
    """
    N = x_N.shape[0]
    G = -(-N // chunk_size)
    pad = G * chunk_size - N
    if pad:
        x_N = jnp.pad(x_N, [(0, pad)] + [(0, 0)] * (x_N.ndim - 1))
    x_CxG = x_N.reshape((chunk_size, G) + x_N.shape[1:])
    return jnp.swapaxes(x_CxG, 0, 1)


def _from_chunks(x_GxC, N):
    x_CxG = jnp.swapaxes(x_GxC, 0, 1)
    return x_CxG.reshape((-1,) + x_CxG.shape[2:])[:N]


def _scan_tokens(hidden_NxD, out_embed_DxV, data, chunk_loss, chunk_size, with_grad, metric_names=_METRICS):
    """The chunk walk shared by the offline and the online loss.

    data: ([N, ...] array, logical names of its per-token axes or None) pairs, cut into chunks
    alongside the hidden states. chunk_loss(*data chunks) returns a function of the chunk's fp32
    student logits [C, V] alone, giving (loss, metrics); anything else it needs per chunk (the
    online teacher's logits) it computes before returning, outside the differentiated function.
    with_grad: also d loss / d hidden [N, D] and d loss / d out_embed [D, V] (fp32), from the same
    pass. Returns (loss, metrics) or (loss, metrics, dh_NxD, dw_DxV).
    """
    N, D = hidden_NxD.shape
    V = out_embed_DxV.shape[1]
    C = min(chunk_size, N)
    dtype = hidden_NxD.dtype
    w_DxV = out_embed_DxV.astype(dtype)  # compute dtype = hidden's; cast once, not per chunk
    xs = []
    for x_N, names in ((hidden_NxD, ("act_batch", "act_embed")),) + tuple(data):
        x_GxC = _to_chunks(x_N, C)
        xs.append(x_GxC if names is None else constrain(x_GxC, (None,) + tuple(names)))

    def body(carry, chunk):
        h_CxD, *rest = chunk
        # Compute dtype inputs, fp32 accumulation; only this chunk's [C, V] logits exist.
        logits_CxV = jnp.dot(h_CxD, w_DxV, preferred_element_type=jnp.float32)
        logits_CxV = constrain(logits_CxV, ("act_batch", "act_vocab"))
        f = chunk_loss(*rest)
        if not with_grad:
            loss, metrics = f(logits_CxV)
            return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], metrics)), None
        (loss, metrics), dlogits_CxV = jax.value_and_grad(f, has_aux=True)(logits_CxV)
        dlogits_CxV = dlogits_CxV.astype(dtype)
        dh_CxD = jnp.dot(dlogits_CxV, w_DxV.T, preferred_element_type=jnp.float32)
        dw_DxV = carry[2] + jnp.dot(h_CxD.T, dlogits_CxV, preferred_element_type=jnp.float32)
        return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], metrics), dw_DxV), dh_CxD

    zero = jnp.zeros((), jnp.float32)
    init = (zero, {k: zero for k in metric_names})
    if with_grad:
        init = init + (jnp.zeros((D, V), jnp.float32),)
    carry, dh_GxCxD = jax.lax.scan(body, init, tuple(xs))
    if not with_grad:
        return carry
    return carry[0], carry[1], _from_chunks(dh_GxCxD, N), carry[2]


def _scan_chunks(hidden_NxD, out_embed_DxV, labels_N, topk_ids_NxK, topk_logprobs_NxK, a_N, b_N,
                 temperature, cfg: LossConfig, with_grad, targets="topk"):
    data = ((labels_N, None), (topk_ids_NxK, None), (topk_logprobs_NxK, None),
            (a_N.astype(jnp.float32), None), (b_N.astype(jnp.float32), None))

    def chunk_loss(labels_C, ids_CxK, lps_CxK, a_C, b_C):
        return functools.partial(_chunk_loss, labels_C=labels_C, ids_CxK=ids_CxK, logprobs_CxK=lps_CxK,
                                 a_C=a_C, b_C=b_C, temperature=temperature, cfg=cfg, targets=targets)

    return _scan_tokens(hidden_NxD, out_embed_DxV, data, chunk_loss, cfg.chunk_size, with_grad)


# The offline scan per kind of stored targets: one object each, so the custom VJP's static argument
# is the same from call to call.
_OFFLINE_SCANS = {"topk": _scan_chunks, "sampled": functools.partial(_scan_chunks, targets="sampled")}


# One custom VJP for the offline and the online loss: `scan` (`_scan_chunks` or `_scan_online`) walks
# the chunks and, in the forward pass of differentiation, computes the gradients too.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(scan, cfg, hidden_NxD, out_embed_DxV, data, temperature):
    # Primal without differentiation (evaluation): values only, no gradient work.
    return scan(hidden_NxD, out_embed_DxV, *data, temperature, cfg, with_grad=False)


def _fused_fwd(scan, cfg, hidden_NxD, out_embed_DxV, data, temperature):
    loss, metrics, dh_NxD, dw_DxV = scan(hidden_NxD, out_embed_DxV, *data, temperature, cfg, with_grad=True)
    # Kept in the primals' dtypes (gradients must match them); g is 1 in training anyway.
    return (loss, metrics), (dh_NxD.astype(hidden_NxD.dtype), dw_DxV.astype(out_embed_DxV.dtype))


def _fused_bwd(scan, cfg, residuals, cotangents):
    # The gradients were computed in the forward pass; the loss is a scalar, so the backward rule
    # only scales them. Metrics are not differentiable; the data (labels, a, b, the teacher's top-K or
    # its hidden states and embedding) and the temperature get None: a symbolic zero, nothing is
    # allocated for the frozen teacher.
    dh_NxD, dw_DxV = residuals
    g = cotangents[0]
    return g.astype(dh_NxD.dtype) * dh_NxD, g.astype(dw_DxV.dtype) * dw_DxV, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def kd_loss(hidden_NxD, out_embed_DxV, labels_N, topk_ids_NxK, topk_logprobs_NxK, a_N, b_N,
            cfg: LossConfig | None = None, *, temperature=None, targets="topk", **overrides):
    """Fused distillation loss Σ_t a_t·soft_t + b_t·hard_t (nats) and its metrics.

    hidden_NxD: final hidden states (their dtype is the compute dtype); out_embed_DxV: the output
    projection; labels_N: next-token ids; topk_ids_NxK / topk_logprobs_NxK: the teacher's top-K
    (log-probs at T = 1; ids outside [0, V) are dropped); a_N, b_N: from `token_weights`.
    `cfg` (the run's LossConfig, default LossConfig(); `overrides` replace its fields, e.g.
    chunk_size=8) is the static argument (divergence, jsd_beta, tail, chunk_size); the temperature
    is data: cfg.temperature, or `temperature` (a float or a traced scalar: a schedule does not
    recompile). `targets` (static): what the store's rows are, its StoreMeta.targets: "topk", or
    "sampled" (`sample_targets` rows; `token_terms` says how they enter the soft term).
    Walks `chunk_size` tokens at a time (global, over all devices): peak extra memory is
    O(chunk_size × V). Gradients w.r.t. hidden and out_embed come from the same pass (custom VJP).
    Returns (loss, metrics): fp32 sums soft_sum, hard_sum, num_tokens, top1_agree over the tokens
    with a ≠ 0 or b ≠ 0.
    """
    cfg = dataclasses.replace(cfg or LossConfig(), **overrides)
    temperature = jnp.asarray(cfg.temperature if temperature is None else temperature, jnp.float32)
    if targets not in _OFFLINE_SCANS:
        raise ValueError(f"targets={targets!r}; expected one of {TARGETS}")
    return _fused(_OFFLINE_SCANS[targets], cfg, hidden_NxD, out_embed_DxV,
                  (labels_N, topk_ids_NxK, topk_logprobs_NxK, a_N, b_N), temperature)


# --- The online teacher: its logits per chunk, next to the student's -------------------------

def _online_chunk_loss(logits_CxV, teacher_logits_CxV, labels_C, a_C, b_C, keys_Cx2, temperature, cfg: LossConfig):
    """Σ_t a·soft + b·hard over one chunk against the teacher's fp32 logits [C, V]."""
    if cfg.online_sampled:
        # As precompute writes a sampled store: N draws per position at the loss temperature, each
        # position's own key (keys_Cx2: raw key data), then the offline sampled-target loss.
        keys_C = jax.random.wrap_key_data(keys_Cx2)
        ids_CxN, log_w_CxN = sample_targets(teacher_logits_CxV, keys_C, cfg.online_sampled, temperature=temperature,
                                            vocab_size=logits_CxV.shape[-1])
        loss, metrics = _chunk_loss(logits_CxV, labels_C, ids_CxN, log_w_CxN, a_C, b_C, temperature, cfg,
                                    targets="sampled")
    elif cfg.online_top_k:
        # As precompute writes a store of K (teacher.topk_logprobs): log-probs at T = 1 over the
        # teacher's W rows, padding ids (>= V) excluded from the top K.
        V = logits_CxV.shape[-1]
        logp_CxW = jax.nn.log_softmax(teacher_logits_CxV, axis=-1)
        if logp_CxW.shape[-1] > V:
            logp_CxW = jnp.where(jnp.arange(logp_CxW.shape[-1])[None, :] < V, logp_CxW, -jnp.inf)
        lps_CxK, ids_CxK = jax.lax.top_k(logp_CxW, cfg.online_top_k)
        loss, metrics = _chunk_loss(logits_CxV, labels_C, ids_CxK, lps_CxK, a_C, b_C, temperature, cfg)
    else:
        soft_C, hard_C, agree_C = dense_token_terms(logits_CxV, teacher_logits_CxV, labels_C,
                                                    temperature=temperature, divergence=cfg.divergence,
                                                    jsd_beta=cfg.jsd_beta)
        loss, metrics = _weighted(soft_C, hard_C, agree_C, a_C, b_C)
    zt_CxV = teacher_logits_CxV[:, :logits_CxV.shape[-1]]
    labels_C = jnp.clip(labels_C, 0, zt_CxV.shape[-1] - 1)
    nll_C = jax.nn.logsumexp(zt_CxV, axis=-1) - jnp.take_along_axis(zt_CxV, labels_C[:, None], axis=-1)[:, 0]
    used_C = (a_C != 0) | (b_C != 0)
    return loss, dict(metrics, teacher_nll_sum=jnp.where(used_C, nll_C, 0.0).sum())


def _scan_online(hidden_NxD, out_embed_DxV, teacher_hidden_NxE, teacher_embed_ExV, labels_N, a_N, b_N, keys_Nx2,
                 temperature, cfg: LossConfig, with_grad):
    data = ((teacher_hidden_NxE, ("act_batch", "act_embed")), (labels_N, None),
            (a_N.astype(jnp.float32), None), (b_N.astype(jnp.float32), None), (keys_Nx2, None))

    def chunk_loss(th_CxE, labels_C, a_C, b_C, keys_Cx2):
        # The teacher's chunk logits: its compute dtype, fp32 accumulation; a constant to the
        # differentiated function below (the teacher is frozen).
        zt_CxV = jnp.dot(th_CxE, teacher_embed_ExV, preferred_element_type=jnp.float32)
        zt_CxV = constrain(zt_CxV, ("act_batch", "act_vocab"))
        return functools.partial(_online_chunk_loss, teacher_logits_CxV=zt_CxV, labels_C=labels_C, a_C=a_C,
                                 b_C=b_C, keys_Cx2=keys_Cx2, temperature=temperature, cfg=cfg)

    return _scan_tokens(hidden_NxD, out_embed_DxV, data, chunk_loss, cfg.chunk_size, with_grad, _ONLINE_METRICS)


def kd_loss_online(hidden_NxD, out_embed_DxV, teacher_hidden_NxE, teacher_embed_ExW, labels_N, a_N, b_N,
                   cfg: LossConfig | None = None, *, temperature=None, key=None, **overrides):
    """`kd_loss` against a teacher run in the same step: Σ_t a_t·soft_t + b_t·hard_t and its metrics.

    hidden_NxD, out_embed_DxV, labels_N, a_N, b_N, cfg, `temperature` and `overrides` as in
    `kd_loss`. teacher_hidden_NxE: the teacher's final (normed) hidden states, its own width E and
    compute dtype (typically bf16); teacher_embed_ExW: its output projection over W >= V rows,
    whose rows >= V are vocabulary padding the student cannot emit.
    cfg.online_top_k = 0: soft is the divergence over the full vocabulary at temperature T
    (`dense_token_terms`), the teacher renormalized over ids < V; K > 0: the teacher's log-probs at
    T = 1 over all W rows, its top K ids < V (exactly what precompute stores), then `token_terms`
    as `kd_loss` with a store of K (cfg.tail, divergence and jsd_beta behave the same; the tail
    bucket holds the padding's mass too, as offline). cfg.online_sampled = N > 0: N draws per
    position from the teacher's softmax(z / T) over ids < V (`sample_targets`; token n draws with
    fold_in(key, n), so `key`, one PRNG key per step, is required), then the sampled-target soft
    term of `token_terms`: unbiased, its gradient equal to the dense forward KL's in expectation.
    Walks `chunk_size` tokens at a time (global, over all devices) and computes both models' logits
    per chunk only: peak extra memory O(chunk_size × V) for the two together. Gradients w.r.t.
    hidden and out_embed come from the same pass (custom VJP); the teacher is frozen (no gradient).
    Returns (loss, metrics) as `kd_loss`, plus teacher_nll_sum: Σ −log p_teacher(label) at T = 1
    over the student's V ids, on the same tokens.
    """
    cfg = dataclasses.replace(cfg or LossConfig(), **overrides)
    N = hidden_NxD.shape[0]
    V = out_embed_DxV.shape[1]
    E, W = teacher_embed_ExW.shape
    if W < V:
        raise ValueError(f"teacher vocabulary W={W} is smaller than the student's V={V}: the online teacher "
                         f"needs a logit for every student id")
    if teacher_hidden_NxE.shape != (N, E):
        raise ValueError(f"teacher hidden states {teacher_hidden_NxE.shape} do not match N={N} tokens and the "
                         f"teacher embedding's width E={E}")
    if cfg.online_top_k > V:
        raise ValueError(f"online_top_k={cfg.online_top_k} exceeds the vocabulary V={V}")
    if cfg.online_sampled and key is None:
        raise ValueError("online_sampled draws need a PRNG key: pass key= (one per step)")
    if cfg.online_sampled:
        keys_Nx2 = jax.random.key_data(jax.vmap(lambda n: jax.random.fold_in(key, n))(jnp.arange(N)))
    else:
        keys_Nx2 = jnp.zeros((N, 0), jnp.uint32)  # no draws: an empty column rides along
    # In the teacher's compute dtype, cast once, not per chunk. The full-vocabulary divergence uses
    # the first V rows; the top-K keeps all W to normalize its log-probs as precompute does.
    teacher_embed_ExV = teacher_embed_ExW if cfg.online_top_k else teacher_embed_ExW[:, :V]
    teacher_embed_ExV = teacher_embed_ExV.astype(teacher_hidden_NxE.dtype)
    temperature = jnp.asarray(cfg.temperature if temperature is None else temperature, jnp.float32)
    return _fused(_scan_online, cfg, hidden_NxD, out_embed_DxV,
                  (teacher_hidden_NxE, teacher_embed_ExV, labels_N, a_N, b_N, keys_Nx2), temperature)


# --- Intermediate-layer alignment ------------------------------------------------------------

def hidden_alignment(student_MxNxD, teacher_MxNxE, projections, weight_N, distance: str) -> jax.Array:
    """Σ_m Σ_n weight_n · d(s_mn·P_m, t_mn) / M over M mapped layer pairs, an fp32 scalar.

    student_MxNxD: the student's hidden states at M layers (compute dtype); teacher_MxNxE: the
    teacher's at the mapped layers (constants: no gradient flows to them); projections: None when
    D == E, else [M, D, E] (fp32, learned; applied in fp32 as s @ P[m]); weight_N: fp32 per-token
    weights (1/N_global on supervised tokens, 0 elsewhere). distance "mse": mean over E of
    (s·P − t)²; "cosine": 1 − cos(s·P, t), with cos = 0 (and no gradient) where either vector is
    exactly zero. Tokens with weight 0 are zeroed before and after the distance, so garbage there
    reaches neither value nor gradient (not even as 0·inf). Memory: O(M × N × E) (no vocabulary).
    """
    M, N, D = student_MxNxD.shape
    E = teacher_MxNxE.shape[-1]
    if teacher_MxNxE.shape[:2] != (M, N):
        raise ValueError(f"teacher states {teacher_MxNxE.shape} do not match the student's {student_MxNxD.shape}")
    if projections is None and D != E:
        raise ValueError(f"student width D={D} differs from the teacher's E={E}: pass projections [M, D, E]")
    if projections is not None and projections.shape != (M, D, E):
        raise ValueError(f"projections {projections.shape} must be [M, D, E] = {(M, D, E)}")
    used_1xN = (weight_N != 0)[None, :]
    s_MxNxD = jnp.where(used_1xN[..., None], student_MxNxD.astype(jnp.float32), 0.0)
    t_MxNxE = jnp.where(used_1xN[..., None], jax.lax.stop_gradient(teacher_MxNxE).astype(jnp.float32), 0.0)
    if projections is not None:
        s_MxNxD = jnp.einsum("mnd,mde->mne", s_MxNxD, projections.astype(jnp.float32),
                             precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    if distance == "mse":
        d_MxN = jnp.mean(jnp.square(s_MxNxD - t_MxNxE), axis=-1)
    elif distance == "cosine":
        ss_MxN = jnp.sum(jnp.square(s_MxNxD), axis=-1)
        tt_MxN = jnp.sum(jnp.square(t_MxNxE), axis=-1)
        nonzero_MxN = (ss_MxN > 0) & (tt_MxN > 0)
        # rsqrt of a stand-in 1 where a vector is zero: the `where` below drops it, gradient included.
        inv_MxN = (jax.lax.rsqrt(jnp.where(nonzero_MxN, ss_MxN, 1.0))
                   * jax.lax.rsqrt(jnp.where(nonzero_MxN, tt_MxN, 1.0)))
        cos_MxN = jnp.where(nonzero_MxN, jnp.sum(s_MxNxD * t_MxNxE, axis=-1) * inv_MxN, 0.0)
        d_MxN = 1.0 - cos_MxN
    else:
        raise ValueError(f"distance={distance!r}; expected one of {HIDDEN_DISTANCES}")
    w_1xN = weight_N.astype(jnp.float32)[None, :]
    return jnp.where(used_1xN, w_1xN * d_MxN, 0.0).sum() / M
