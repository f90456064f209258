"""The device mesh and the one table that maps logical axis names to mesh axes.

Model code names its axes logically (`embed`, `mlp`, `heads`, `vocab`, `layers`, and `act_*` for
activations); only this file knows the mesh axes `data`, `fsdp` and `tensor`. Moving from one CPU
to a pod is a change of mesh shape in the config, never of model code (MaxText's rules table).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes, or None = replicated). Parameters are sharded over `fsdp`
# on their embed dimension (ZeRO-3) and over `tensor` on heads/mlp/vocab (Megatron); batches over
# data x fsdp. Activations keep their embed dimension whole: the fsdp gather happens on weights.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)
_RULES = dict(RULES)


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes over `num_devices` devices, with a -1 axis taking the rest."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices do not divide by the fixed axes' product {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {num_devices} devices; "
            "set one axis to -1 to take the remaining devices")
    return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); one size may be -1 = the rest."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh(mesh_shape(data, fsdp, tensor, len(devices)), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(mesh_cfg, devices: Sequence[Any] | None = None) -> Mesh:
    """`make_mesh` from a config section with `data`, `fsdp`, `tensor` fields."""
    return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, devices=devices)


def abstract_mesh(mesh_cfg, num_devices: int) -> jax.sharding.AbstractMesh:
    """The config's mesh over `num_devices` devices, without needing the devices (the dry run)."""
    return jax.sharding.AbstractMesh(mesh_shape(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, num_devices),
                                     MESH_AXES)


def logical_size(mesh, name: str) -> int:
    """How many shards the rules table splits logical axis `name` into on `mesh` (e.g. "batch":
    data x fsdp, "vocab": tensor)."""
    axes = _RULES[name]
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))


def describe(mesh) -> str:
    """`data=2 fsdp=4 tensor=1` for logs and reports."""
    return " ".join(f"{axis}={size}" for axis, size in mesh.shape.items())


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
    """PartitionSpec for logical axis `names`. With `shape` and `mesh`, a mesh axis that does not
    divide its dimension (e.g. 2 kv heads over tensor=4) is dropped, so that dimension is
    replicated instead of failing; a mesh axis is used at most once per array."""
    if names is None:
        return P()
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        axes = _RULES.get(name) if name is not None else None
        if name is not None and name not in _RULES:
            raise KeyError(f"logical axis {name!r} has no rule in kd_jax.base.sharding.RULES")
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = []
        for ax in axes:
            if ax in used:
                continue
            if shape is not None and mesh is not None:
                size = math.prod(mesh.shape[a] for a in kept) * mesh.shape[ax]
                if shape[i] % size:
                    continue
            kept.append(ax)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*spec)


def named_sharding(mesh: Mesh, names, shape=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh))


def _var_names(v) -> tuple | None:
    return v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedSharding for every Variable of an (abstract or concrete) NNX state, from the logical
    names each parameter carries in its `out_sharding` metadata."""
    def one(v):
        if isinstance(v, nnx.Variable):
            return v.replace(named_sharding(mesh, _var_names(v), v.shape))
        return NamedSharding(mesh, P())
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(make_model, mesh: Mesh | None):
    """Build an NNX module directly sharded on `mesh` (None: the default device): shapes first
    (`nnx.eval_shape`), then one jitted init whose outputs land on their shards, so no device
    ever holds a full copy. The values do not depend on the mesh."""
    graphdef, abs_state = nnx.split(nnx.eval_shape(make_model))
    shardings = None if mesh is None else state_shardings(abs_state, mesh)

    @jax.jit
    def init():
        state = nnx.state(make_model())
        return state if shardings is None else jax.lax.with_sharding_constraint(state, shardings)

    return nnx.merge(graphdef, init())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [B, ...] batch array: B over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Put a pytree of host [B, ...] arrays (the global batch, one process) onto the mesh."""
    return jax.tree.map(lambda x: jax.device_put(np.asarray(x), batch_sharding(mesh, np.ndim(x))), batch)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def process_share(x_N: np.ndarray) -> np.ndarray:
    """This process's rows of an array that every process holds whole: the p-th of jax.process_count()
    equal parts (N must be a multiple of the process count)."""
    share = len(x_N) // jax.process_count()
    return x_N[jax.process_index() * share:(jax.process_index() + 1) * share]


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's share of a batch -> global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in batch.items()}
