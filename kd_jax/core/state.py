"""The train state, built one way for training, the dry run, evaluation and export.

A train state is the dict `{"params", "opt_state", "nonfinite"}`: the student's NNX parameters
(fp32 masters, sharded by the rules table), the optax state (Adam moments sharded like their
parameters, scalars such as the step count replicated) and the count of consecutive skipped
(non-finite) steps. `abstract_train_state` gives its shapes, dtypes and shardings without
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

from kd_jax.core import sharding
from kd_jax.core.checkpoint import Checkpointer
from kd_jax.core.config import OptimConfig
from kd_jax.core.step import make_optimizer
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


def abstract_train_state(model_cfg: DecoderConfig, optim_cfg: OptimConfig, steps: int, mesh) -> TrainSpec:
    """The train state's structure on `mesh`, for `steps` optimizer steps (the schedule's length)."""
    graphdef, params = abstract_params(model_cfg, mesh)
    tx, schedule = make_optimizer(optim_cfg, steps)
    opt_state = _with_shardings(jax.eval_shape(tx.init, params), opt_state_shardings(tx, params, mesh))
    nonfinite = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.named_sharding(mesh, None))
    return TrainSpec(graphdef, tx, schedule, {"params": params, "opt_state": opt_state, "nonfinite": nonfinite})


def init_train_state(model: Decoder, spec: TrainSpec) -> dict[str, Any]:
    """A fresh train state from a built (sharded) student: its parameters, zero Adam moments laid
    out like them, and no skipped steps."""
    params = nnx.state(model)
    shardings = spec.shardings
    opt_state = jax.jit(spec.tx.init, out_shardings=shardings["opt_state"])(params)
    nonfinite = jax.device_put(jnp.zeros((), jnp.int32), shardings["nonfinite"])
    return {"params": params, "opt_state": opt_state, "nonfinite": nonfinite}


def restore_params(ckpt: Checkpointer, step: int | None, model_cfg: DecoderConfig, mesh) -> tuple[Decoder, int]:
    """(student, its step) from checkpoint `step` (None: the latest), parameters only, each array
    read straight onto its shard of `mesh`."""
    graphdef, params = abstract_params(model_cfg, mesh)
    state, extra = ckpt.restore(step, {"params": params}, partial=True)
    return nnx.merge(graphdef, state["params"]), int(extra["step"])
