"""The sharded train step (the loop that drives it is kd_jax/core/loop.py).

One optimizer step = one `jax.jit` over the global batch: the batch's totals for the global loss
normalizers first, then a scan over `grad_accum` micro-batches (fused KD loss, summed gradients),
global-norm clipping and AdamW. Parameters are fp32 masters sharded by the rules table; the
model computes in its `dtype` (bf16 by default). A non-finite loss or gradient skips the update.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax.core import losses
from kd_jax.core.config import LossConfig, OptimConfig

# Parameters that get weight decay: the matrices. Norm scales and biases do not (as in most LLM recipes).
DECAYED = frozenset({"embed", "lm_head", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"})


def _param_name(path) -> str:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return [n for n in names if isinstance(n, str) and n != "value"][-1]


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: _param_name(path) in DECAYED, params)


def lr_schedule(cfg: OptimConfig, steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine / linear decay to lr·min_lr_ratio at `steps`, or constant."""
    warmup = min(cfg.warmup_steps, max(steps - 1, 0))
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(steps, warmup + 1), end)
    rise = optax.linear_schedule(0.0, cfg.lr, warmup)
    if cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, max(steps - warmup, 1))
    else:
        decay = optax.constant_schedule(cfg.lr)
    return optax.join_schedules([rise, decay], [warmup])


def make_optimizer(cfg: OptimConfig, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = lr_schedule(cfg, steps)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw) if cfg.clip_norm > 0 else adamw
    return tx, schedule


def _micro_batches(x, n: int):
    """[B, ...] -> [n, B/n, ...] taking rows i, i+n, i+2n, ... for micro-batch i: the batch axis is
    sharded in contiguous blocks, so strided micro-batches each span every device (a contiguous
    split would put micro-batch 0 on the first devices only)."""
    B = x.shape[0]
    return jnp.swapaxes(x.reshape((B // n, n) + x.shape[1:]), 0, 1)


def _weights(batch, loss_cfg: LossConfig, totals, beta: float):
    """Per-token (a, b) of the objective for this (micro-)batch, with the global normalizers `totals`."""
    return losses.token_weights(batch["role"], batch["reasoning_step"], batch["segment_ids"], batch["loss_mask"],
                                alpha=loss_cfg.alpha, beta=beta, step_weight=loss_cfg.step_weight,
                                answer_weight=loss_cfg.answer_weight, num_supervised=totals[0],
                                step_weight_sum=totals[1])


def _fused_loss(model, h_BxLxD, batch, a_BxL, b_BxL, loss_cfg: LossConfig):
    B, L, D = h_BxLxD.shape
    K = batch["topk_ids"].shape[-1]
    return losses.kd_loss(
        h_BxLxD.reshape(B * L, D), model.output_embedding(), batch["labels"].reshape(B * L),
        batch["topk_ids"].reshape(B * L, K), batch["topk_logprobs"].reshape(B * L, K),
        a_BxL.reshape(B * L), b_BxL.reshape(B * L), loss_cfg)


def batch_loss(graphdef, params, batch: dict[str, jax.Array], loss_cfg: LossConfig, totals):
    """(loss, metrics) of one (micro-)batch with the global normalizers `totals`."""
    model = nnx.merge(graphdef, params)
    h_BxLxD = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"])
    a_BxL, b_BxL = _weights(batch, loss_cfg, totals, loss_cfg.beta)
    return _fused_loss(model, h_BxLxD, batch, a_BxL, b_BxL, loss_cfg)


def batch_totals(batch, loss_cfg: LossConfig):
    return losses.weight_totals(batch["role"], batch["reasoning_step"], batch["segment_ids"], batch["loss_mask"],
                                step_weight=loss_cfg.step_weight, answer_weight=loss_cfg.answer_weight)


def train_step(graphdef, tx, loss_cfg: LossConfig, grad_accum: int, params, opt_state, nonfinite, batch):
    """One optimizer step on the global batch; returns (params, opt_state, nonfinite, metrics)."""
    totals = batch_totals(batch, loss_cfg)  # normalizers over the whole global batch
    micro = jax.tree.map(functools.partial(_micro_batches, n=grad_accum), batch)
    grad_fn = jax.value_and_grad(lambda p, mb: batch_loss(graphdef, p, mb, loss_cfg, totals), has_aux=True)

    def accumulate(carry, mb):  # the loss is globally normalized: micro-batch terms simply add
        return jax.tree.map(jnp.add, carry, grad_fn(params, mb)), None

    first = jax.tree.map(lambda x: x[0], micro)
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, params, first))
    ((loss, metrics), grads), _ = jax.lax.scan(accumulate, zero, micro)
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, skipped=(~ok).astype(jnp.float32))
    return keep(new_params, params), keep(new_opt_state, opt_state), jnp.where(ok, 0, nonfinite + 1), metrics


def eval_step(graphdef, loss_cfg: LossConfig, params, batch):
    """Held-out sums for one batch: the fused metrics, the batch's total loss and its step loss.
    One forward pass; the loss head runs twice on its hidden states, the second time with the
    pure step loss's coefficients (those with β = 1 minus those with β = 0)."""
    totals = batch_totals(batch, loss_cfg)
    model = nnx.merge(graphdef, params)
    h_BxLxD = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"])
    loss, metrics = _fused_loss(model, h_BxLxD, batch, *_weights(batch, loss_cfg, totals, loss_cfg.beta), loss_cfg)
    (a1, b1), (a0, b0) = _weights(batch, loss_cfg, totals, 1.0), _weights(batch, loss_cfg, totals, 0.0)
    step_loss, _ = _fused_loss(model, h_BxLxD, batch, a1 - a0, b1 - b0, loss_cfg)
    return dict(metrics, loss=loss, step_loss=step_loss)


@dataclasses.dataclass
class Steps:
    """The jitted train and eval steps for one model structure, mesh and config."""
    train: Any
    eval: Any


def compile_steps(spec, loss_cfg: LossConfig, grad_accum: int, mesh) -> Steps:
    """The jitted steps for a train state's structure (`kd_jax.core.state.TrainSpec`): its graphdef,
    optimizer and shardings; params and optimizer state are donated to the train step."""
    replicated = NamedSharding(mesh, P())
    shardings = spec.shardings
    train = jax.jit(functools.partial(train_step, spec.graphdef, spec.tx, loss_cfg, grad_accum), donate_argnums=(0, 1),
                    out_shardings=(shardings["params"], shardings["opt_state"], replicated, replicated))
    evaluate = jax.jit(functools.partial(eval_step, spec.graphdef, loss_cfg), out_shardings=replicated)
    return Steps(train, evaluate)


def summarize(sums: dict[str, float], loss_cfg: LossConfig) -> dict[str, float]:
    """Per-token means from summed metrics: soft and hard losses, the step loss, top-1 agreement."""
    n = max(sums["num_tokens"], 1.0)
    out = {"soft": sums["soft_sum"] / n, "hard": sums["hard_sum"] / n, "top1_agree": sums["top1_agree"] / n,
           "loss": sums["loss"]}
    if "step_loss" in sums:
        out["step_loss"] = sums["step_loss"]
    elif loss_cfg.beta > 0:  # L = α·L_soft + (1−α)·L_hard + β·L_step, so L_step follows exactly
        out["step_loss"] = (sums["loss"] - loss_cfg.alpha * out["soft"] - (1 - loss_cfg.alpha) * out["hard"]) / loss_cfg.beta
    return out
