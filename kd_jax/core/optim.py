"""What moves over training, step by step: the optimizer (AdamW with global-norm clipping, weight
decay on the matrices only, the learning-rate schedule) and the loss values with a schedule
(alpha, temperature, the hidden-alignment weight). The train step (kd_jax/core/step.py) applies
the optimizer; the loop (kd_jax/core/loop.py) evaluates the loss schedules on the host and passes
their values to the step as traced scalars (`hyper_at`), so a schedule never recompiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from kd_jax.base.schema import LossConfig, OptimConfig, ScheduleConfig

# --- The optimizer ---------------------------------------------------------------------------

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


# --- Loss values that move over training -----------------------------------------------------

def _scheduled(start: float, sched: ScheduleConfig, steps: int) -> optax.Schedule:
    if sched.kind == "constant" or sched.end is None:
        return optax.constant_schedule(start)
    if sched.kind == "linear":
        return optax.linear_schedule(start, sched.end, max(steps - 1, 1))
    end, span = sched.end, max(steps - 1, 1)
    return lambda step: end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(step, span) / span))


def loss_schedules(loss_cfg: LossConfig, steps: int) -> dict[str, optax.Schedule]:
    """step -> value of alpha, temperature and the hidden-alignment weight, each from its config
    value at step 0 to its schedule's `end` at the last step (`steps` - 1)."""
    return {"alpha": _scheduled(loss_cfg.alpha, loss_cfg.alpha_schedule, steps),
            "temperature": _scheduled(loss_cfg.temperature, loss_cfg.temperature_schedule, steps),
            "hidden_weight": _scheduled(loss_cfg.hidden.weight, loss_cfg.hidden.weight_schedule, steps)}


def scheduled(loss_cfg: LossConfig) -> dict[str, str]:
    """{loss value: its schedule's config key} for the values that move over training (kind != constant)."""
    sections = (("alpha", "loss.alpha_schedule", loss_cfg.alpha_schedule),
                ("temperature", "loss.temperature_schedule", loss_cfg.temperature_schedule),
                ("hidden_weight", "loss.hidden.weight_schedule", loss_cfg.hidden.weight_schedule))
    return {name: key for name, key, sched in sections if sched.kind != "constant"}


def hyper_at(schedules: dict[str, optax.Schedule], step: int) -> dict[str, float]:
    """The scheduled loss values of optimizer step `step` (0-based), as Python floats, and the step
    itself (it seeds loss.online_sampled's draws): the step takes them as traced fp32 scalars, so a
    schedule never recompiles."""
    return {**{k: float(f(step)) for k, f in schedules.items()}, "step": float(step)}


def default_hyper(loss_cfg: LossConfig) -> dict[str, float]:
    """The loss values of the config, unscheduled (step 0's; what evaluation and benchmarks pass)."""
    return {"alpha": loss_cfg.alpha, "temperature": loss_cfg.temperature, "hidden_weight": loss_cfg.hidden.weight}
