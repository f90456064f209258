"""The train state, built one way for training, the dry run, evaluation and export.

A train state is the dict `{"params", "opt_state", "nonfinite"}`: the student's NNX parameters
(fp32 masters, sharded by the rules table), the optax state (Adam moments sharded like their
parameters, scalars such as the step count replicated) and the count of consecutive skipped
(non-finite) steps. A run with hidden-state alignment to a teacher of another width adds
`"align": {"proj": [M, D_student, D_teacher]}`, one learned projection per mapped layer pair,
trained with the student and checkpointed, never exported. `abstract_train_state` gives its shapes, dtypes and shardings without
allocating anything; `init_train_state` the values of a fresh run; `restore_params` reads only the
parameters of a checkpoint (no optimizer state is read) onto any mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kd_jax.base import sharding
from kd_jax.base.schema import OptimConfig
from kd_jax.core.checkpoint import Checkpointer
from kd_jax.core.optim import make_optimizer
from kd_jax.core.step import optimized
from kd_jax.models.decoder import Decoder, DecoderConfig


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def abstract_params(model_cfg: DecoderConfig, mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) of a student of `model_cfg`: ShapeDtypeStruct leaves carrying their
    sharding on `mesh`; nothing is allocated."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0))))
    return graphdef, _with_shardings(state, sharding.state_shardings(state, mesh))


def opt_state_shardings(tx: optax.GradientTransformation, params, mesh):
    """Shardings of tx's state for `params` (abstract or concrete, with shardings): every copy of
    the parameter tree inside it (Adam's mu and nu) shares the parameters' shardings; the other
    leaves (step counts) are replicated."""
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    return optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_shardings,
                                 transform_non_params=lambda _: sharding.named_sharding(mesh, None))


@dataclasses.dataclass
class TrainSpec:
    """What a train state is made of: the model structure, the optimizer and the abstract state."""
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract: dict[str, Any]  # {"params", "opt_state", "nonfinite"} of ShapeDtypeStruct with shardings

    @property
    def shardings(self) -> dict[str, Any]:
        return jax.tree.map(lambda x: x.sharding, self.abstract)


def abstract_train_state(model_cfg: DecoderConfig, optim_cfg: OptimConfig, steps: int, mesh,
                         align_shape: tuple[int, int, int] | None = None) -> TrainSpec:
    """The train state's structure on `mesh`, for `steps` optimizer steps (the schedule's length);
    `align_shape` (M, D_student, D_teacher) adds the hidden-alignment projections."""
    graphdef, params = abstract_params(model_cfg, mesh)
    tx, schedule = make_optimizer(optim_cfg, steps)
    train_vars = {"params": params}
    if align_shape is not None:
        names = (None, "embed", None)
        train_vars["align"] = {"proj": jax.ShapeDtypeStruct(
            align_shape, jnp.float32, sharding=sharding.named_sharding(mesh, names, align_shape))}
    opt_tree = optimized(train_vars)
    opt_state = _with_shardings(jax.eval_shape(tx.init, opt_tree), opt_state_shardings(tx, opt_tree, mesh))
    nonfinite = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.named_sharding(mesh, None))
    return TrainSpec(graphdef, tx, schedule, {**train_vars, "opt_state": opt_state, "nonfinite": nonfinite})


def init_train_state(model: Decoder, spec: TrainSpec, seed: int = 0) -> dict[str, Any]:
    """A fresh train state from a built (sharded) student: its parameters, zero Adam moments laid
    out like them, no skipped steps, and (when the spec has them) alignment projections drawn
    from N(0, 1/D_student)."""
    shardings = spec.shardings
    train_vars = {"params": nnx.state(model)}
    if "align" in spec.abstract:
        proj = spec.abstract["align"]["proj"]
        init = lambda key: jax.random.normal(key, proj.shape, proj.dtype) / jnp.sqrt(proj.shape[1])  # noqa: E731
        train_vars["align"] = {"proj": jax.jit(init, out_shardings=proj.sharding)(jax.random.key(seed))}
    opt_state = jax.jit(spec.tx.init, out_shardings=shardings["opt_state"])(optimized(train_vars))
    nonfinite = jax.device_put(jnp.zeros((), jnp.int32), shardings["nonfinite"])
    return {**train_vars, "opt_state": opt_state, "nonfinite": nonfinite}


def restore_params(ckpt: Checkpointer, step: int | None, model_cfg: DecoderConfig, mesh) -> tuple[Decoder, int]:
    """(student, its step) from checkpoint `step` (None: the latest), parameters only, each array
    read straight onto its shard of `mesh`."""
    graphdef, params = abstract_params(model_cfg, mesh)
    state, extra = ckpt.restore(step, {"params": params}, partial=True)
    return nnx.merge(graphdef, state["params"]), int(extra["step"])
