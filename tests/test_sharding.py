"""The sharded forward on 8 fake CPU devices equals the single-device forward."""

from __future__ import annotations

import hf_tiny
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from kd_jax.base import sharding
from kd_jax.models import DecoderConfig, init_decoder, load_hf

# Dimensions that every mesh axis below divides, so the sharding rules are exercised in full.
DIMS = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=8,
            num_key_value_heads=4)
MESHES = [(8, 1, 1), (2, 4, 1), (2, 1, 4), (1, 2, 4), (1, 8, 1)]


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
    return hf_tiny.save("qwen2", str(tmp_path_factory.mktemp("hf")), **DIMS)[1]


@nnx.jit
def _forward(model, tokens, positions, segments):
    return model(tokens, positions, segments)


def _batch(seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, 128, (8, 16)).astype(np.int32)
    segments = np.repeat(np.array([[1] * 10 + [2] * 6]), 8, axis=0).astype(np.int32)
    positions = np.concatenate([np.arange(10), np.arange(6)])[None].repeat(8, axis=0).astype(np.int32)
    return tokens, positions, segments


def test_eight_devices():
    assert jax.device_count() == 8, "conftest sets --xla_force_host_platform_device_count=8"


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_load_and_forward_equal_single_device(qwen2_folder, shape):
    batch = _batch()
    single = np.asarray(_forward(load_hf(qwen2_folder), *map(jnp.asarray, batch)))
    mesh = sharding.make_mesh(*shape)
    model = load_hf(qwen2_folder, mesh=mesh)
    data, fsdp, tensor = shape
    wq = model.layers.wq[...]
    assert wq.sharding.is_equivalent_to(
        sharding.named_sharding(mesh, ("layers", "embed", "heads", "head_dim"), wq.shape), wq.ndim)
    # each device holds only its slice of the weights: never a full copy
    assert wq.addressable_shards[0].data.shape == (2, 64 // fsdp, 8 // tensor, 8)
    with jax.set_mesh(mesh):
        sharded_batch = sharding.shard_batch(batch, mesh)
        assert sharded_batch[0].sharding.spec == P(("data", "fsdp"), None)
        out = _forward(model, *sharded_batch)
    np.testing.assert_allclose(np.asarray(out), single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 4, 1), (2, 1, 4)])
def test_random_init_is_created_sharded_and_matches(shape):
    cfg = DecoderConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                        num_kv_heads=4, head_dim=8, tie_word_embeddings=True)
    single = init_decoder(cfg, seed=3)
    mesh = sharding.make_mesh(*shape)
    sharded = init_decoder(cfg, seed=3, mesh=mesh)
    embed = sharded.embed[...]
    assert embed.sharding.is_equivalent_to(sharding.named_sharding(mesh, ("vocab", "embed"), embed.shape), 2)
    assert embed.addressable_shards[0].data.shape == (128 // shape[2], 64 // shape[1])
    for a, b in zip(jax.tree.leaves(nnx.state(single)), jax.tree.leaves(nnx.state(sharded))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    batch = _batch(1)
    with jax.set_mesh(mesh):
        out = _forward(sharded, *sharding.shard_batch(batch, mesh))
    np.testing.assert_allclose(np.asarray(out), np.asarray(_forward(single, *map(jnp.asarray, batch))),
                               atol=1e-5, rtol=1e-5)


def test_mesh_sizes_and_rules():
    assert dict(sharding.make_mesh(-1, 2, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.make_mesh(1, -1, 1).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(ValueError, match="at most one axis"):
        sharding.make_mesh(-1, -1, 1)
    with pytest.raises(ValueError, match="devices"):
        sharding.make_mesh(3, 1, 1)
    mesh = sharding.make_mesh(2, 2, 2)
    # 2 kv heads do not divide over tensor=... they do here; 3 would not: that axis is replicated
    assert sharding.logical_to_spec(("embed", "kv_heads"), (64, 3), mesh) == P("fsdp", None)
    assert sharding.logical_to_spec(("batch", None), (8, 4), mesh) == P(("data", "fsdp"), None)
    with pytest.raises(KeyError, match="no rule"):
        sharding.logical_to_spec(("nonsense",))
