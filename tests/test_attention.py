"""kd_jax.models.attention: every implementation equals the "xla" reference (the dense mask and
jax.nn.dot_product_attention) in output and in gradients w.r.t. q, k, v, on packed rows, sliding
windows, GQA and decode against a cache; blockwise attention's compiled memory grows linearly in
T where the reference's grows quadratically.

Tolerances: fp32 rtol = atol = 1e-5 (observed differences ~4e-6 on values of order 1: a different
summation order only); bf16 atol = rtol = 3e-2 (one bf16 ulp is 2^-8 ~ 4e-3 of the value, and the
tile matmuls round p and dS to bf16 at other points than the reference)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.base import sharding
from kd_jax.models import attention as attn
from kd_jax.models import decoder

FAST_COMPILE = {"xla_backend_optimization_level": 0}
F32_TOL = dict(rtol=1e-5, atol=1e-5)
BF16_TOL = dict(rtol=3e-2, atol=3e-2)


# --- Batches ---------------------------------------------------------------------------------

def packed_rows(B: int, T: int, pad: int, seed: int):
    """(segment_ids, positions) [B, T]: each row several segments (ids 1.., positions restarting
    at 0, lengths 5..70) then `pad` tokens of padding (segment 0, position 0), as the pipeline
    packs them."""
    rng = np.random.default_rng(seed)
    seg, pos = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for b in range(B):
        t, s = 0, 1
        while t < T - pad:
            n = min(int(rng.integers(5, 71)), T - pad - t)
            seg[b, t:t + n], pos[b, t:t + n] = s, np.arange(n)
            t, s = t + n, s + 1
    assert (seg.max(axis=1) >= 3).all()  # several segments per row
    return jnp.asarray(seg), jnp.asarray(pos)


def cache_rows(T: int, S: int, cache_index: int, left_pad: tuple[int, ...]):
    """A decode step: T new tokens in slots cache_index.. of S cache slots, row b left-padded by
    left_pad[b] empty slots. (q_segment, kv_segment, q_pos, kv_pos) as the decoder passes them."""
    B = len(left_pad)
    slot_S = np.arange(S)
    valid = (slot_S[None, :] >= np.asarray(left_pad)[:, None]) & (slot_S[None, :] < cache_index + T)
    q_pos = np.broadcast_to(cache_index + np.arange(T), (B, T))
    return (jnp.ones((B, T), jnp.int32), jnp.asarray(valid.astype(np.int32)), jnp.asarray(q_pos, jnp.int32),
            jnp.asarray(np.broadcast_to(slot_S, (B, S)), jnp.int32))


def qkv(B, T, S, N, K, H, dtype=jnp.float32, seed=0):
    """Random q [B, T, N, H], k, v [B, S, K, H] and the output's cotangent do [B, T, N, H]."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
                 for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H), (B, T, N, H)))


@functools.lru_cache(maxsize=None)
def _vjp_fn(impl, window, block_q, block_kv):
    """jit of (output, (dq, dk, dv)) of `impl`: the vjp of the attention output against `do`; one
    compile per implementation, window, tiles and shapes (the masks are arguments)."""
    def f(q, k, v, do, q_seg, kv_seg, q_pos, kv_pos):
        o, vjp = jax.vjp(lambda q, k, v: attn.attention(
            q, k, v, q_segment_BxT=q_seg, kv_segment_BxS=kv_seg, q_pos_BxT=q_pos, kv_pos_BxS=kv_pos,
            window=window, implementation=impl, block_q=block_q, block_kv=block_kv), q, k, v)
        return o, vjp(do)

    return jax.jit(f, compiler_options=FAST_COMPILE)


def run(impl, q, k, v, do, masks, window, block_q=512, block_kv=512):
    return _vjp_fn(impl, window, block_q, block_kv)(q, k, v, do, *masks)


def assert_same(got, want, rows=None, **tol):
    """Outputs and gradients equal; `rows` [B, T] bool restricts the output comparison to them."""
    (o, grads), (o_ref, grads_ref) = got, want
    assert o.dtype == o_ref.dtype and o.shape == o_ref.shape
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    if rows is not None:
        o, o_ref = o * rows[:, :, None, None], o_ref * rows[:, :, None, None]
    np.testing.assert_allclose(f32(o), f32(o_ref), **tol)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert g.dtype == g_ref.dtype and g.shape == g_ref.shape, name
        np.testing.assert_allclose(f32(g), f32(g_ref), err_msg=f"d{name}", **tol)


# --- The mask helper is the decoder's mask ---------------------------------------------------

@pytest.mark.parametrize("window", [None, 9])
def test_mask_equals_decoder(window):
    """Self-attention on packed rows (what Decoder.hidden_states gives the attention: segment ids
    and positions for queries and keys alike): a token sees the earlier tokens of its own document
    within the window, padding rows included (padding is one run of segment 0, all at position 0).
    Decode: the mask Decoder.decode builds from key_valid and slots."""
    seg, pos = packed_rows(3, 150, pad=17, seed=1)
    index = jnp.arange(seg.shape[1])
    want = (seg[:, :, None] == seg[:, None, :]) & (index[None, None, :] <= index[None, :, None])
    if window is not None:
        want &= (pos[:, :, None] - pos[:, None, :]) < window
    np.testing.assert_array_equal(attn.attention_mask(seg, seg, pos, pos, window), want[:, None])

    T, S, cache_index = 3, 40, 20
    q_seg, kv_seg, q_pos, kv_pos = cache_rows(T, S, cache_index, (0, 5, 12))
    slot_T, slot_S = cache_index + jnp.arange(T), jnp.arange(S)
    want = (kv_seg != 0)[:, None, :] & (slot_S[None, None, :] <= slot_T[None, :, None])
    if window is not None:
        want &= (slot_T[None, :, None] - slot_S[None, None, :]) < window
    np.testing.assert_array_equal(attn.attention_mask(q_seg, kv_seg, q_pos, kv_pos, window), want[:, None])


# --- 1. blockwise == xla (fp32) ----------------------------------------------------------------

@pytest.mark.parametrize("N,K", [(4, 2), (4, 1)])
@pytest.mark.parametrize("window", [None, 24])
def test_blockwise_packed(N, K, window):
    """T = 200 in tiles of 64 (queries) and 48 (keys): both padded internally; packed rows with
    several segments and padding at the row ends; GQA and MQA."""
    B, T, H = 2, 200, 16
    seg, pos = packed_rows(B, T, pad=13, seed=N + K)
    q, k, v, do = qkv(B, T, T, N, K, H)
    masks = (seg, seg, pos, pos)
    assert_same(run("blockwise", q, k, v, do, masks, window, block_q=64, block_kv=48),
                run("xla", q, k, v, do, masks, window), **F32_TOL)


@pytest.mark.parametrize("window", [None, 8])
def test_blockwise_decode(window):
    """T = 3 new tokens against S = 40 cache slots, rows left-padded by 0, 5 and 17 slots, query
    positions = slots; tiles of 16 keys (S padded to 48)."""
    T, S, N, K, H = 3, 40, 4, 2, 16
    masks = cache_rows(T, S, cache_index=25, left_pad=(0, 5, 17))
    q, k, v, do = qkv(3, T, S, N, K, H, seed=3)
    assert_same(run("blockwise", q, k, v, do, masks, window, block_q=64, block_kv=16),
                run("xla", q, k, v, do, masks, window), **F32_TOL)


def test_blockwise_under_remat_and_scan():
    """As the decoder calls it: inside jax.checkpoint (a remat policy) inside a jax.lax.scan over
    layers; gradients w.r.t. the input and the stacked weights equal the reference's."""
    B, T, N, K, H = 2, 160, 4, 2, 16
    seg, pos = packed_rows(B, T, pad=7, seed=11)
    q, k, v, do = qkv(B, T, T, N, K, H, seed=11)
    w_LxHxH = jnp.asarray(0.3 * np.random.default_rng(12).standard_normal((3, H, H), np.float32))

    def grads(impl):
        def one_layer(x, w):
            y = attn.attention(jnp.einsum("btnh,hg->btng", x, w), k, v, q_segment_BxT=seg, kv_segment_BxS=seg,
                               q_pos_BxT=pos, kv_pos_BxS=pos, window=16, implementation=impl,
                               block_q=32, block_kv=32)
            return x + y, None

        one_layer = jax.checkpoint(one_layer, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

        def loss(x, w):
            return (jax.lax.scan(one_layer, x, w)[0] * do).sum()

        return jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=FAST_COMPILE)(q, w_LxHxH)

    for g, g_ref in zip(grads("blockwise"), grads("xla")):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-4)  # |dw| ~ 50


# --- 2. splash (Pallas interpret mode on CPU) == xla ----------------------------------------

@pytest.mark.parametrize("T,N,K,H,window", [
    (256, 4, 2, 64, None),  # GQA through make_splash_mha
    (256, 4, 2, 64, 32),  # sliding window: LocalMask
    (256, 2, 1, 128, 32),  # MQA through make_splash_mqa
    (200, 4, 4, 64, None),  # T padded to 256 inside
])
def test_splash(T, N, K, H, window):
    """Packed rows (several segments, 20 padding tokens at the end: fewer than the window, so
    splash's index window and the reference's position window agree on padding rows too).
    About 5 s each in interpret mode."""
    B = 2
    seg, pos = packed_rows(B, T, pad=20, seed=T + K)
    q, k, v, do = qkv(B, T, T, N, K, H, seed=K)
    masks = (seg, seg, pos, pos)
    assert_same(run("splash", q, k, v, do, masks, window, block_q=128, block_kv=128),
                run("xla", q, k, v, do, masks, window), **F32_TOL)


@pytest.mark.parametrize("mesh_shape,N,K", [
    ((2, 1, 2), 4, 2),  # batch over data, query and kv heads over tensor
    ((2, 1, 4), 4, 2),  # 2 kv heads do not divide by tensor=4: each device takes its query head's kv head
    ((2, 1, 3), 6, 2),  # 2 query heads per device, groups of 3: one kv head per query head (jnp.take)
    ((1, 2, 4), 2, 1),  # MQA, 2 query heads do not divide by tensor=4: heads whole, batch over fsdp
])
def test_splash_sharded(mesh_shape, N, K):
    """Under a (data, fsdp, tensor) mesh splash runs in shard_map (batch over data x fsdp, heads over
    tensor where they divide): output and gradients equal the unsharded xla reference. Interpret
    mode on the CPU devices; about 1 s each."""
    B, T, H = 2, 256, 32
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:np.prod(mesh_shape)])
    seg, pos = packed_rows(B, T, pad=20, seed=N + K)
    q, k, v, do = qkv(B, T, T, N, K, H, seed=N)
    masks = (seg, seg, pos, pos)

    def f(q, k, v, do, q_seg, kv_seg, q_pos, kv_pos):
        o, vjp = jax.vjp(lambda q, k, v: attn.attention(
            q, k, v, q_segment_BxT=q_seg, kv_segment_BxS=kv_seg, q_pos_BxT=q_pos, kv_pos_BxS=kv_pos,
            window=None, implementation="splash", block_q=128, block_kv=128), q, k, v)
        return o, vjp(do)

    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(f)(q, k, v, do, *masks))
        got = jax.jit(f, compiler_options=FAST_COMPILE)(q, k, v, do, *masks)
    assert_same(got, run("xla", q, k, v, do, masks, None), **F32_TOL)


def test_splash_refuses_tiles_off_128():
    """splash's kernel takes tiles that are multiples of 128 only: another attention_block is an
    AttentionError naming the setting, at trace time (nothing is compiled)."""
    q, k, v, _ = qkv(1, 256, 256, 2, 1, 64)
    seg = jnp.ones((1, 256), jnp.int32)
    for block in (64, 200):
        with pytest.raises(attn.AttentionError, match=f"multiples of 128.*attention_block={block}"):
            jax.eval_shape(lambda q, k, v, block=block: attn.attention(
                q, k, v, q_segment_BxT=seg, kv_segment_BxS=seg, q_pos_BxT=seg, kv_pos_BxS=seg, window=None,
                implementation="splash", block_q=block, block_kv=block), q, k, v)


@pytest.mark.parametrize("impl", ["splash", "blockwise", "xla"])
def test_query_heads_must_group_over_kv_heads(impl):
    """3 query heads over 2 kv heads: an AttentionError naming the architecture's head counts."""
    q, k, v, _ = qkv(1, 128, 128, 3, 2, 64)
    seg = jnp.ones((1, 128), jnp.int32)
    with pytest.raises(attn.AttentionError, match="num_attention_heads / num_key_value_heads"):
        attn.attention(q, k, v, q_segment_BxT=seg, kv_segment_BxS=seg, q_pos_BxT=seg, kv_pos_BxS=seg, window=None,
                       implementation=impl)


def test_splash_refuses_decode():
    masks = cache_rows(3, 128, cache_index=60, left_pad=(0,))
    q, k, v, _ = qkv(1, 3, 128, 2, 1, 64)
    with pytest.raises(ValueError, match="'splash' needs self-attention.*use 'blockwise' or 'xla'"):
        attn.attention(q, k, v, q_segment_BxT=masks[0], kv_segment_BxS=masks[1], q_pos_BxT=masks[2],
                       kv_pos_BxS=masks[3], window=None, implementation="splash")


# --- 3. bf16, and rows with no key -----------------------------------------------------------

@pytest.mark.parametrize("window", [None, 24])
def test_blockwise_bf16(window):
    """bf16 in, bf16 out and bf16 gradients, close to the reference at bf16 tolerance."""
    B, T, N, K, H = 2, 160, 4, 2, 32
    seg, pos = packed_rows(B, T, pad=9, seed=5)
    q, k, v, do = qkv(B, T, T, N, K, H, dtype=jnp.bfloat16, seed=5)
    masks = (seg, seg, pos, pos)
    got = run("blockwise", q, k, v, do, masks, window, block_q=64, block_kv=64)
    assert got[0].dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got[1])
    assert_same(got, run("xla", q, k, v, do, masks, window), **BF16_TOL)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rows_without_keys_are_finite(dtype):
    """A prefill of a left-padded prompt (T = S, q_segment 1, the first slots empty): the padding
    queries have no key at all. Output and gradients stay finite (blockwise gives those rows 0,
    the reference the mean of v); rows with keys agree. A decode step whose query segment
    matches no slot (all of row 1's keys masked) likewise."""
    N, K, H = 4, 2, 16
    tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
    T, left_pad = 96, (0, 11, 40)
    prefill = cache_rows(T, T, cache_index=0, left_pad=left_pad)
    prefill_rows = jnp.asarray(np.arange(T)[None, :] >= np.asarray(left_pad)[:, None])
    q_seg, kv_seg, q_pos, kv_pos = cache_rows(3, 40, cache_index=20, left_pad=(0, 4))
    decode = (q_seg, kv_seg.at[1].set(0), q_pos, kv_pos)  # row 1: every slot empty
    decode_rows = jnp.asarray([[True] * 3, [False] * 3])
    for masks, rows, (q, k, v, do) in ((prefill, prefill_rows, qkv(3, T, T, N, K, H, dtype=dtype, seed=7)),
                                       (decode, decode_rows, qkv(2, 3, 40, N, K, H, dtype=dtype, seed=8))):
        got = run("blockwise", q, k, v, do, masks, None, block_q=32, block_kv=32)
        want = run("xla", q, k, v, do, masks, None)
        for x in jax.tree.leaves((got, want)):
            assert np.isfinite(np.asarray(x, np.float32)).all()
        assert not np.asarray(got[0], np.float32)[~np.asarray(rows)].any()  # no key: 0
        # Gradients: the rows without keys pass none in blockwise (a constant 0), so compare
        # against the reference's with those rows' cotangents zeroed.
        do_rows = do * rows[:, :, None, None].astype(do.dtype)
        assert_same(run("blockwise", q, k, v, do_rows, masks, None, block_q=32, block_kv=32),
                    run("xla", q, k, v, do_rows, masks, None), rows=rows, **tol)


# --- 4. Memory: blockwise linear in T, the reference quadratic -------------------------------

def _temp_bytes(impl, T, B=1, N=4, H=32, block=256):
    def grad_sum(q, k, v, seg, pos):
        return jax.grad(lambda q, k, v: attn.attention(
            q, k, v, q_segment_BxT=seg, kv_segment_BxS=seg, q_pos_BxT=pos, kv_pos_BxS=pos, window=None,
            implementation=impl, block_q=block, block_kv=block).sum(), argnums=(0, 1, 2))(q, k, v)

    x = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
    compiled = jax.jit(grad_sum, compiler_options=FAST_COMPILE).lower(x, x, x, ids, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_memory_linear_in_T():
    """jit(grad(sum(attention))) at T = 1024 and 4096 (B 1, N 4, H 32, tiles 256). On XLA:CPU:
    blockwise 7.0 MiB -> 10.1 MiB (x1.44: the O(T) rows; the tile working set is fixed), xla
    49 MiB -> 772 MiB (x15.75: the [N, T, T] scores and their gradient)."""
    sizes = {impl: [_temp_bytes(impl, T) for T in (1024, 4096)] for impl in ("blockwise", "xla")}
    for impl, (small, big) in sizes.items():
        print(f"{impl}: temp {small / 2**20:.1f} MiB at T=1024, {big / 2**20:.1f} MiB at T=4096, x{big / small:.2f}")
    (b1, b4), (x1, x4) = sizes["blockwise"], sizes["xla"]
    assert b4 / b1 < 6, sizes
    assert x4 / x1 > 10, sizes
    assert b4 < x4 / 20, sizes


# --- cuDNN: only its control flow is checkable on CPU -----------------------------------------

def test_cudnn_one_segment_rows():
    """The run-time test that picks cuDNN's mask-free branch: every row one segment, then
    padding, and the same ids for queries and keys."""
    unpacked = jnp.asarray([[3, 3, 3, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    assert bool(attn.one_segment_rows(unpacked, unpacked))
    for bad in ([[1, 1, 2, 2, 0]],  # packed
                [[0, 1, 1, 1, 1]],  # left padding
                [[1, 1, 0, 1, 0]]):  # padding inside
        assert not bool(attn.one_segment_rows(jnp.asarray(bad), jnp.asarray(bad)))
    assert not bool(attn.one_segment_rows(unpacked, unpacked.at[0, 0].set(0)))


@pytest.mark.parametrize("window", [None, 24])
def test_cudnn_branches_with_xla_standing_in(monkeypatch, window):
    """Both branches of the "cudnn" path (lengths + is_causal + local_window_size on unpacked
    rows; the dense mask on packed rows), with jax.nn.dot_product_attention's xla implementation
    standing in for cuDNN (absent on CPU: jax raises "cuDNN is not detected" while tracing). The
    arguments are what cuDNN gets; that cuDNN computes them as xla does is unchecked until a GPU run.
    Padding query rows are left out: cuDNN leaves them as it likes."""
    real = jax.nn.dot_product_attention

    def stand_in(*args, implementation=None, **kwargs):
        assert implementation == "cudnn"
        return real(*args, implementation="xla", **kwargs)

    B, T, N, K, H = 2, 128, 4, 2, 32
    q, k, v, do = qkv(B, T, T, N, K, H, seed=9)
    seg, pos = packed_rows(B, T, pad=10, seed=9)
    lengths = np.asarray([100, 128])
    one_seg = jnp.asarray((np.arange(T)[None, :] < lengths[:, None]).astype(np.int32) * 7)
    one_pos = jnp.asarray(np.where(np.asarray(one_seg) != 0, np.arange(T)[None, :], 0).astype(np.int32))
    for masks, s in (((seg, seg, pos, pos), seg), ((one_seg, one_seg, one_pos, one_pos), one_seg)):
        rows = s != 0
        do_rows = do * rows[:, :, None, None]
        want = run("xla", q, k, v, do_rows, masks, window)
        monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
        got = run("cudnn", q, k, v, do_rows, masks, window)
        monkeypatch.setattr(jax.nn, "dot_product_attention", real)
        assert_same(got, want, rows=rows, **F32_TOL)


def test_cudnn_refuses_decode():
    masks = cache_rows(3, 40, cache_index=20, left_pad=(0,))
    q, k, v, _ = qkv(1, 3, 40, 4, 2, 32, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="'cudnn' needs self-attention"):
        attn.attention(q, k, v, q_segment_BxT=masks[0], kv_segment_BxS=masks[1], q_pos_BxT=masks[2],
                       kv_pos_BxS=masks[3], window=None, implementation="cudnn")


# --- Names and argument checks ---------------------------------------------------------------

def test_resolve_and_errors():
    assert attn.IMPLEMENTATIONS == ("auto", "xla", "blockwise", "splash", "cudnn")
    assert attn.resolve("auto") == "xla"  # the tests run on CPU
    # for another machine's devices (the dry run's mesh.platform)
    assert [attn.resolve("auto", p) for p in ("tpu", "gpu", "cpu")] == ["splash", "cudnn", "xla"]
    assert attn.resolve("blockwise", "tpu") == "blockwise"
    assert [attn.resolve(i) for i in attn.IMPLEMENTATIONS[1:]] == list(attn.IMPLEMENTATIONS[1:])
    with pytest.raises(ValueError, match="choose one of"):
        attn.resolve("flash")
    q, k, v, _ = qkv(1, 8, 8, 3, 2, 16)
    ids = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="not a multiple"):
        attn.attention(q, k, v, q_segment_BxT=ids, kv_segment_BxS=ids, q_pos_BxT=ids, kv_pos_BxS=ids,
                       window=None, implementation="xla")
    q, k, v, _ = qkv(1, 8, 8, 4, 2, 16)
    with pytest.raises(ValueError, match="kv_pos has shape"):
        attn.attention(q, k, v, q_segment_BxT=ids, kv_segment_BxS=ids, q_pos_BxT=ids, kv_pos_BxS=ids[:, :4],
                       window=None, implementation="blockwise")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks a machine without cuDNN")
def test_cudnn_without_a_gpu_is_one_line_naming_what_runs_here():
    """jax raises "cuDNN is not detected" deep in tracing (a 60-line traceback): one KDJaxError line instead,
    from the model's forward under jit, naming the implementations this machine runs."""
    from kd_jax.base.errors import KDJaxError
    cfg = decoder.DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=8, dtype="bfloat16", attention="cudnn")
    with pytest.raises(KDJaxError) as err:
        attn.check_runnable("cudnn")
    message = str(err.value)
    assert message == (f"attention 'cudnn' needs an NVIDIA GPU with cuDNN; on {jax.default_backend()} use auto, "
                       f"xla or blockwise (student.attention / teacher.attention)")
    assert attn.check_runnable("cudnn", "gpu") == "cudnn"  # the dry run sizes a GPU machine from here
    assert attn.check_runnable("auto") == attn.resolve("auto")
    model = decoder.Decoder(cfg, rngs=__import__("flax").nnx.Rngs(0))
    tokens = jnp.ones((1, 16), jnp.int32)
    with pytest.raises(KDJaxError) as err:
        jax.jit(model.hidden_states)(tokens)
    assert str(err.value) == message


@pytest.mark.parametrize("mesh_shape, N, K", [((2, 2, 2), 4, 2), ((1, 2, 4), 4, 1)])
def test_cudnn_sharded_with_xla_standing_in(monkeypatch, mesh_shape, N, K):
    """Under a (data, fsdp, tensor) mesh "cudnn" runs per device in shard_map (jax's cuDNN
    partitioning gathered the whole batch and the [B, 1, T, T] mask onto every device: 16 GiB per GPU
    at 32k tokens, compiled for 8 H100s): with xla standing in for cuDNN, packed and one-segment rows
    equal the unsharded reference, output and gradients."""
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, implementation=None, **kw: real(*a, implementation="xla", **kw))
    B, T, H = 4, 128, 32
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:np.prod(mesh_shape)])
    q, k, v, do = qkv(B, T, T, N, K, H, seed=3)
    seg, pos = packed_rows(B, T, pad=0, seed=3)
    seg = seg.at[0].set(1)  # row 0 one segment: each device decides its own rows' branch
    pos = pos.at[0].set(jnp.arange(T))
    masks = (seg, seg, pos, pos)

    def f(q, k, v, do, q_seg, kv_seg, q_pos, kv_pos):
        o, vjp = jax.vjp(lambda q, k, v: attn.attention(
            q, k, v, q_segment_BxT=q_seg, kv_segment_BxS=kv_seg, q_pos_BxT=q_pos, kv_pos_BxS=kv_pos,
            window=None, implementation="cudnn"), q, k, v)
        return o, vjp(do)

    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(f)(q, k, v, do, *masks))
        got = jax.jit(f)(q, k, v, do, *masks)
    assert_same(got, run("xla", q, k, v, do, masks, None), **F32_TOL)
