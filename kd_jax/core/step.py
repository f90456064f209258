"""The sharded train step (the loop that drives it is kd_jax/core/loop.py).

One optimizer step = one `jax.jit` over the global batch: the batch's totals for the global loss
normalizers first, then a scan over `grad_accum` micro-batches (fused KD loss, summed gradients),
global-norm clipping and AdamW (the optimizer and the loss schedules: kd_jax/core/optim.py).
Parameters are fp32 masters sharded by the rules table; the model computes in its `dtype` (bf16
by default). A non-finite loss or gradient skips the update.
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

from kd_jax.base.schema import ConfigError, LossConfig
from kd_jax.core import losses


def _micro_batches(x, n: int):
    """[B, ...] -> [n, B/n, ...] taking rows i, i+n, i+2n, ... for micro-batch i: the batch axis is
    sharded in contiguous blocks, so strided micro-batches each span every device (a contiguous
    split would put micro-batch 0 on the first devices only)."""
    B = x.shape[0]
    return jnp.swapaxes(x.reshape((B // n, n) + x.shape[1:]), 0, 1)


# --- The objective ---------------------------------------------------------------------------

def layer_pairs(hidden_cfg, student_layers: int, teacher_layers: int) -> tuple[tuple[int, int], ...]:
    """(student layer, teacher layer) pairs of hidden-state alignment: `layers` as given, or by
    default every student layer i <- teacher layer round((i + 1)·L_t / L_s) - 1 (evenly spaced,
    last to last); () when alignment is off."""
    if not hidden_cfg.on:
        return ()
    if hidden_cfg.layers is None:
        return tuple((i, round((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers))
    pairs = tuple(sorted(hidden_cfg.layers.items()))
    bad = [(i, j) for i, j in pairs if i >= student_layers or j >= teacher_layers]
    if bad:
        raise ConfigError(f"loss.hidden.layers={hidden_cfg.layers}: pairs {bad} are out of range; the student has "
                          f"layers 0..{student_layers - 1}, the teacher 0..{teacher_layers - 1}")
    return pairs


@dataclasses.dataclass(frozen=True)
class Objective:
    """The static part of what a step computes: the student's structure, the loss config, and for
    an online teacher its structure and the hidden-alignment layer pairs (student, teacher)."""
    student: Any  # nnx.GraphDef of the student
    loss: LossConfig
    teacher: Any = None  # nnx.GraphDef of the online teacher; None = the store's top-K (offline)
    pairs: tuple[tuple[int, int], ...] = ()
    targets: str = "topk"  # offline: what the store's teacher rows are (StoreMeta.targets: "topk" or "sampled")

    @property
    def online(self) -> bool:
        return self.teacher is not None


def batch_weights(batch, loss_cfg: LossConfig, totals, beta: float, alpha):
    """Per-token coefficients (a, b) of the objective, L = Σ_t a_t·soft_t + b_t·hard_t, for this
    (micro-)batch with the global normalizers `totals` (`batch_totals`); the batch's `step_weight`
    (the stored per-step weights), when it has one, scales loss.step_weight."""
    return losses.token_weights(batch["role"], batch["reasoning_step"], batch["segment_ids"], batch["loss_mask"],
                                alpha=alpha, beta=beta, step_weight=loss_cfg.step_weight,
                                answer_weight=loss_cfg.answer_weight, num_supervised=totals[0],
                                step_weight_sum=totals[1], step_weights_BxT=batch.get("step_weight"))


def _flat(x_BxLx):
    # Not reshape(-1, ...): a tokens-only store's [B, L, 0] teacher arrays have no size to infer it from.
    return x_BxLx.reshape((x_BxLx.shape[0] * x_BxLx.shape[1],) + x_BxLx.shape[2:])


def _forward(graphdef, params, batch, collect):
    """(model, final hidden states [B, L, D], collected layer outputs [M, B, L, D] or None)."""
    model = nnx.merge(graphdef, params)
    out = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"], collect=collect)
    h, collected = out if collect else (out, None)
    return model, h, collected


class _Pass:
    """One forward pass of the student (and of the online teacher, outside differentiation) over
    a (micro-)batch; its loss head can then run with several coefficient sets (evaluation)."""

    def __init__(self, objective: Objective, trainable, teacher_params, batch):
        self.objective, self.batch = objective, batch
        pairs = objective.pairs
        self.student, self.h, self.s_layers = _forward(objective.student, trainable["params"], batch,
                                                       tuple(i for i, _ in pairs))
        self.proj = (trainable.get("align") or {}).get("proj")
        if objective.online:
            self.teacher, t_h, t_layers = _forward(objective.teacher, teacher_params, batch,
                                                   tuple(j for _, j in pairs))
            self.t_h, self.t_layers = jax.lax.stop_gradient((t_h, t_layers))

    def loss(self, a_BxL, b_BxL, hyper, num_supervised, *, hidden: bool = True, step_loss: bool = False):
        """(loss, metrics) with per-token coefficients a, b; `hidden` adds the alignment term.
        `step_loss` (a and b of `batch_weights` with loss.beta > 0): the metrics also hold the step
        loss L_step, what the KD term holds beyond its per-token means (α·Σsoft + (1−α)·Σhard)/N."""
        cfg, batch, objective = self.objective.loss, self.batch, self.objective
        labels_N, a_N, b_N = _flat(batch["labels"]), _flat(a_BxL), _flat(b_BxL)
        if objective.online:
            # online_sampled: the draws of optimizer step s use fold_in(key(0), s) (hyper["step"])
            key = (jax.random.fold_in(jax.random.key(0), hyper.get("step", jnp.zeros(())).astype(jnp.int32))
                   if cfg.online_sampled else None)
            loss, metrics = losses.kd_loss_online(_flat(self.h), self.student.output_embedding(), _flat(self.t_h),
                                                  self.teacher.output_embedding(), labels_N, a_N, b_N, cfg,
                                                  temperature=hyper["temperature"], key=key)
        else:
            loss, metrics = losses.kd_loss(_flat(self.h), self.student.output_embedding(), labels_N,
                                           _flat(batch["topk_ids"]), _flat(batch["topk_logprobs"]), a_N, b_N, cfg,
                                           temperature=hyper["temperature"], targets=objective.targets)
        if step_loss and cfg.beta > 0:  # a_t = α·(1/N + β·s_t), b_t = (1−α)·(1/N + β·s_t)
            alpha, n = hyper["alpha"], jnp.maximum(num_supervised, 1.0)
            means = (alpha * metrics["soft_sum"] + (1 - alpha) * metrics["hard_sum"]) / n
            metrics = dict(metrics, step_loss=(loss - means) / cfg.beta)
        if objective.pairs and hidden:
            M = len(objective.pairs)
            w_N = jnp.where((a_N != 0) | (b_N != 0), 1.0 / jnp.maximum(num_supervised, 1.0), 0.0)
            hidden_loss = losses.hidden_alignment(self.s_layers.reshape(M, a_N.shape[0], -1),
                                                  self.t_layers.reshape(M, a_N.shape[0], -1), self.proj, w_N,
                                                  cfg.hidden.distance)
            loss = loss + hyper["hidden_weight"] * hidden_loss
            metrics = dict(metrics, hidden=hidden_loss)
        return loss, metrics


def batch_loss(objective: Objective, trainable, teacher_params, batch, totals, hyper):
    """(loss, metrics) of one (micro-)batch with the global normalizers `totals`."""
    a_BxL, b_BxL = batch_weights(batch, objective.loss, totals, objective.loss.beta, hyper["alpha"])
    return _Pass(objective, trainable, teacher_params, batch).loss(a_BxL, b_BxL, hyper, totals[0], step_loss=True)


def batch_totals(batch, loss_cfg: LossConfig):
    return losses.weight_totals(batch["role"], batch["reasoning_step"], batch["segment_ids"], batch["loss_mask"],
                                step_weight=loss_cfg.step_weight, answer_weight=loss_cfg.answer_weight,
                                step_weights_BxT=batch.get("step_weight"))


def trainable(state) -> dict[str, Any]:
    """What the optimizer updates: {"params"} (the student), plus {"align"} (the hidden-alignment
    projections) when the run has them."""
    return {k: state[k] for k in ("params", "align") if k in state}


def optimized(tree):
    """The tree the optimizer state mirrors: the student's parameters alone when there is nothing
    else to train (so offline checkpoints keep their layout), else the whole trainable dict."""
    return tree["params"] if tree.keys() == {"params"} else tree


def _hyper_arrays(hyper):
    return {k: jnp.asarray(v, jnp.float32) for k, v in hyper.items()}


def train_step(objective: Objective, tx, grad_accum: int, state, batch, hyper, teacher_params):
    """One optimizer step on the global batch; returns (state, metrics)."""
    hyper = _hyper_arrays(hyper)
    totals = batch_totals(batch, objective.loss)  # normalizers over the whole global batch
    micro = jax.tree.map(functools.partial(_micro_batches, n=grad_accum), batch)
    train_vars = trainable(state)
    grad_fn = jax.value_and_grad(lambda t, mb: batch_loss(objective, t, teacher_params, mb, totals, hyper),
                                 has_aux=True)

    def accumulate(carry, mb):  # the loss is globally normalized: micro-batch terms simply add
        return jax.tree.map(jnp.add, carry, grad_fn(train_vars, mb)), None

    first = jax.tree.map(lambda x: x[0], micro)
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, train_vars, first))
    ((loss, metrics), grads), _ = jax.lax.scan(accumulate, zero, micro)
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(optimized(grads), state["opt_state"], optimized(train_vars))
    new_vars = optax.apply_updates(optimized(train_vars), updates)
    new_vars = new_vars if "align" in state else {"params": new_vars}
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    nonfinite = jnp.where(ok, 0, state["nonfinite"] + 1)
    # The count is also a metric: the state is donated to the next step, the metrics are not.
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, skipped=(~ok).astype(jnp.float32), nonfinite=nonfinite)
    new_state = dict(keep(new_vars, train_vars), opt_state=keep(new_opt_state, state["opt_state"]), nonfinite=nonfinite)
    return new_state, metrics


def eval_step(objective: Objective, train_vars, batch, hyper, teacher_params):
    """Held-out sums for one batch: the fused metrics, the batch's total loss and its step loss.
    One forward pass; the loss head runs twice on its hidden states, the second time with the
    pure step loss's coefficients (those with β = 1 minus those with β = 0)."""
    hyper = _hyper_arrays(hyper)
    cfg = objective.loss
    totals = batch_totals(batch, cfg)
    forward = _Pass(objective, train_vars, teacher_params, batch)
    alpha = hyper["alpha"]
    loss, metrics = forward.loss(*batch_weights(batch, cfg, totals, cfg.beta, alpha), hyper, totals[0])
    (a1, b1), (a0, b0) = batch_weights(batch, cfg, totals, 1.0, alpha), batch_weights(batch, cfg, totals, 0.0, alpha)
    step_loss, _ = forward.loss(a1 - a0, b1 - b0, hyper, totals[0], hidden=False)
    return dict(metrics, loss=loss, step_loss=step_loss)


@dataclasses.dataclass
class Steps:
    """The jitted steps for one objective, optimizer and mesh:
    train(state, batch, hyper, teacher_params) -> (state, metrics), the state donated;
    eval(trainable, batch, hyper, teacher_params) -> metric sums. `hyper` is
    `kd_jax.core.optim.hyper_at(...)` of the step (or `optim.default_hyper`); teacher_params is
    None offline."""
    train: Any
    eval: Any
    objective: Objective


def compile_steps(spec, loss_cfg: LossConfig, grad_accum: int, mesh, *, teacher=None,
                  pairs: tuple[tuple[int, int], ...] = (), targets: str = "topk") -> Steps:
    """The jitted steps for a train state's structure (`kd_jax.core.state.TrainSpec`: its graphdef,
    optimizer and shardings), with an online `teacher` graphdef and hidden-alignment `pairs`;
    `targets`: what the store's teacher rows are (StoreMeta.targets), for the offline loss."""
    replicated = NamedSharding(mesh, P())
    objective = Objective(spec.graphdef, loss_cfg, teacher, tuple(pairs), targets)
    train = jax.jit(functools.partial(train_step, objective, spec.tx, grad_accum), donate_argnums=(0,),
                    out_shardings=(spec.shardings, replicated))
    evaluate = jax.jit(functools.partial(eval_step, objective), out_shardings=replicated)
    return Steps(train, evaluate, objective)


def loss_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Per-token means from summed metrics: soft and hard losses, top-1 agreement, and as the step
    reported them the total loss, the step loss (the train step with loss.beta > 0, every eval
    step) and the hidden-alignment loss when there is one."""
    n = max(sums["num_tokens"], 1.0)
    out = {"soft": sums["soft_sum"] / n, "hard": sums["hard_sum"] / n, "top1_agree": sums["top1_agree"] / n,
           "loss": sums["loss"]}
    if "hidden" in sums:
        out["hidden"] = sums["hidden"]
    if "teacher_nll_sum" in sums:  # an online teacher: its mean log-likelihood of the labels (T = 1)
        out["teacher_logprob"] = -sums["teacher_nll_sum"] / n
    if "step_loss" in sums:
        out["step_loss"] = sums["step_loss"]
    return out
