"""A student cut from its teacher by measured importance (NVIDIA Minitron: Sreenivas et al. 2024,
Muralidharan et al. 2024; depth by ShortGPT's Block Influence, Men et al. 2024).

`measure` runs the teacher over calibration batches once and scores every prunable unit:

- layers: Block Influence, the mean over calibration tokens of 1 - cos(x_in, x_out) between a
  layer's input and output residual streams (a layer that changes nothing scores 0); optionally
  (`layer_loss`) Minitron's LM-loss increase when that one layer is skipped (one forward per layer);
- MLP channels: mean |silu(gate) * up| of the SwiGLU intermediate, per layer and channel;
- attention heads: mean L2 norm of each query head's attention output before o_proj, per layer; a
  KV group scores the sum of its query heads, and whole groups are dropped, so the query heads
  stay a multiple of the kv heads (query heads per group G = N / K is kept);
- hidden (embedding) channels: mean |y| per channel of every RMSNorm output (each layer's two and
  the final norm's), averaged over the 2L + 1 norms.

`plan` keeps the most important units of each kind (per layer for MLP channels and KV groups, over
the whole model for layers and hidden channels), each in its original order; `apply` slices the
weights into a new Decoder of the smaller DecoderConfig. `prune` does the three.

Slicing the hidden axis changes what RMSNorm divides by (the mean square over D' channels, not D):
`apply` multiplies the kept norm scales by sqrt(D / D') and rms_norm_eps by D / D', since
g sqrt(D/D') / sqrt(S/D' + eps D/D') = g / sqrt(S/D + eps) for a sum of squares S. That makes a
pruned model equal its teacher exactly when the pruned channels are zero in the teacher's residual
stream, and keeps the norms' outputs at their scale otherwise (otherwise no exact parity holds: the
kept channels' S is smaller). Qwen3's q/k norms (over the head dim, not pruned) share rms_norm_eps:
theirs grows by D / D' too, a change of the order of eps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kd_jax.base import sharding
from kd_jax.base.errors import KDJaxError
from kd_jax.base.schema import DEPTH_METRICS
from kd_jax.models.decoder import Decoder, DecoderConfig, layer, rms_norm, rope_inv_freq

_NORM_SCALES = ("attn_norm", "mlp_norm", "final_norm")  # RMSNorm scales over the hidden axis


class PruneError(KDJaxError, ValueError):
    """A pruning target the teacher cannot give (larger than it, not a whole number of groups)."""


# ---------------------------------------------------------------------------------------------
# targets -> the pruned DecoderConfig


def pruned_config(cfg: DecoderConfig, *, layers: int | None = None, intermediate_size: int | None = None,
                  num_kv_heads: int | None = None, hidden_size: int | None = None, rescale_norms: bool = True,
                  **overrides) -> DecoderConfig:
    """The DecoderConfig of `cfg` pruned to these sizes (None keeps a dimension). The query heads
    scale with the kv heads: num_heads = num_kv_heads * (cfg.num_heads // cfg.num_kv_heads); with
    the hidden size cut to D' and `rescale_norms`, rms_norm_eps is times D / D' (the module doc).
    `overrides` change other DecoderConfig fields (dtypes, remat)."""
    wanted = {"layers": (layers, cfg.num_layers), "intermediate_size": (intermediate_size, cfg.intermediate_size),
              "num_key_value_heads": (num_kv_heads, cfg.num_kv_heads), "hidden_size": (hidden_size, cfg.hidden_size)}
    for name, (value, have) in wanted.items():
        if value is not None and not 1 <= value <= have:
            raise PruneError(f"prune.{name}={value}: the teacher has {have}; pruning keeps between 1 and {have} "
                             f"(null keeps all)")
    group = cfg.num_heads // cfg.num_kv_heads
    K = cfg.num_kv_heads if num_kv_heads is None else num_kv_heads
    D = cfg.hidden_size if hidden_size is None else hidden_size
    eps = cfg.rms_norm_eps * cfg.hidden_size / D if rescale_norms else cfg.rms_norm_eps
    return dataclasses.replace(
        cfg, num_layers=cfg.num_layers if layers is None else layers,
        intermediate_size=cfg.intermediate_size if intermediate_size is None else intermediate_size,
        num_kv_heads=K, num_heads=K * group, hidden_size=D, rms_norm_eps=eps, **overrides)


# ---------------------------------------------------------------------------------------------
# calibration batches


def calibration_batches(sequences: Iterable[np.ndarray], *, seq_len: int, batch_size: int,
                        max_tokens: int) -> list[dict[str, np.ndarray]]:
    """Token sequences packed into [batch_size, seq_len] batches of tokens, positions (restarting
    per sequence) and segment_ids (1, 2, ... per sequence in a row; 0 = padding, never measured),
    until `max_tokens` tokens are taken. A sequence longer than seq_len is cut to it; every batch
    has the same shape (the last is padded with empty rows), so the measure compiles once."""
    if seq_len < 2 or batch_size < 1 or max_tokens < 1:
        raise PruneError(f"calibration needs seq_len >= 2, batch_size >= 1, max_tokens >= 1 (got {seq_len}, "
                         f"{batch_size}, {max_tokens})")
    rows, row, taken = [], [], 0
    for seq in sequences:
        seq = np.asarray(seq, np.int32)[: min(seq_len, max_tokens - taken)]
        if not len(seq):
            continue
        if sum(map(len, row)) + len(seq) > seq_len:
            rows.append(row)
            row = []
        row.append(seq)
        taken += len(seq)
        if taken >= max_tokens:
            break
    if row:
        rows.append(row)
    if not rows:
        raise PruneError("no calibration tokens: the calibration data is empty")
    rows += [[]] * (-len(rows) % batch_size)
    tokens = np.zeros((len(rows), seq_len), np.int32)
    positions = np.zeros_like(tokens)
    segments = np.zeros_like(tokens)
    for r, parts in enumerate(rows):
        at = 0
        for s, seq in enumerate(parts):
            n = len(seq)
            tokens[r, at:at + n], positions[r, at:at + n], segments[r, at:at + n] = seq, np.arange(n), s + 1
            at += n
    return [{"tokens": tokens[i:i + batch_size], "positions": positions[i:i + batch_size],
             "segment_ids": segments[i:i + batch_size]} for i in range(0, len(rows), batch_size)]


# ---------------------------------------------------------------------------------------------
# importance


@dataclasses.dataclass(frozen=True)
class Importance:
    """Scores of the teacher's units on the calibration tokens (higher = more important)."""
    block_influence: np.ndarray  # [L] mean 1 - cos(layer input, layer output)
    mlp: np.ndarray  # [L, F] mean |silu(gate) * up|
    heads: np.ndarray  # [L, N] mean L2 norm of each query head's output before o_proj
    kv_groups: np.ndarray  # [L, K] sum of heads over the query heads of each KV group
    hidden: np.ndarray  # [D] mean |RMSNorm output| over the 2L + 1 norms
    tokens: int  # calibration tokens measured
    layer_loss: np.ndarray | None = None  # [L] LM loss with the layer skipped minus the full model's


def _parts(model: Decoder):
    stacked = {k: v[...] for k, v in vars(model.layers).items() if isinstance(v, nnx.Param)}
    return stacked, model.embed[...], model.final_norm[...], model.output_embedding()


def _embed_in(cfg, embed, batch):
    tokens, pos, seg = batch["tokens"], batch["positions"], batch["segment_ids"]
    x = jnp.take(embed, tokens, axis=0).astype(jnp.dtype(cfg.dtype))
    return x, pos, (seg, seg, pos, pos), rope_inv_freq(cfg), (seg > 0).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _sums(cfg: DecoderConfig, stacked, embed, final_norm, batch):
    """Sums over the batch's real tokens of every score (divide by the count)."""
    x, pos, who, inv_freq, m_BxT = _embed_in(cfg, embed, batch)
    m3 = m_BxT[..., None]

    def body(x, p):
        taps = {}
        y = layer(cfg, p, x, pos, who, inv_freq, taps=taps)
        x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
        den = jnp.linalg.norm(x32, axis=-1) * jnp.linalg.norm(y32, axis=-1)
        cos = jnp.sum(x32 * y32, axis=-1) / jnp.maximum(den, 1e-30)
        heads_BxTxN = jnp.linalg.norm(taps["heads"].astype(jnp.float32), axis=-1)
        hidden = jnp.abs(taps["attn_in"].astype(jnp.float32)) + jnp.abs(taps["mlp_in"].astype(jnp.float32))
        return y, (jnp.sum((1.0 - cos) * m_BxT), jnp.sum(heads_BxTxN * m3, axis=(0, 1)),
                   jnp.sum(jnp.abs(taps["mlp_act"].astype(jnp.float32)) * m3, axis=(0, 1)),
                   jnp.sum(hidden * m3, axis=(0, 1)))

    x, (bi, heads, mlp, hidden) = jax.lax.scan(body, x, stacked)
    h = rms_norm(x, final_norm.astype(x.dtype), cfg.rms_norm_eps)
    hidden = jnp.sum(hidden, axis=0) + jnp.sum(jnp.abs(h.astype(jnp.float32)) * m3, axis=(0, 1))
    return bi, heads, mlp, hidden, jnp.sum(m_BxT)


@functools.partial(jax.jit, static_argnums=0)
def _lm_loss(cfg: DecoderConfig, stacked, embed, final_norm, out_DxV, batch, keep_L):
    """(sum of next-token cross-entropies, count) over the batch with the layers where keep_L is
    False skipped (the identity)."""
    x, pos, who, inv_freq, _ = _embed_in(cfg, embed, batch)

    def body(x, xs):
        p, keep = xs
        return jnp.where(keep, layer(cfg, p, x, pos, who, inv_freq), x), None

    x, _ = jax.lax.scan(body, x, (stacked, keep_L))
    h = rms_norm(x, final_norm.astype(x.dtype), cfg.rms_norm_eps)
    seg, tokens = batch["segment_ids"], batch["tokens"]
    valid_BxT1 = ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)).astype(jnp.float32)

    def row(args):  # one row's [T, V] logits at a time
        h_TxD, target_T1 = args
        logits = jnp.einsum("td,dv->tv", h_TxD[:-1], out_DxV.astype(h_TxD.dtype),
                            preferred_element_type=jnp.float32)
        return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, target_T1[:, None], -1)[:, 0]

    ce_BxT1 = jax.lax.map(row, (h, tokens[:, 1:]))
    return jnp.sum(ce_BxT1 * valid_BxT1), jnp.sum(valid_BxT1)


def measure(model: Decoder, batches: Iterable[dict], *, layer_loss: bool = False) -> Importance:
    """The importance of every layer, MLP channel, head and hidden channel of `model` on the
    calibration `batches` (`calibration_batches`); `layer_loss` also scores each layer by the LM
    loss increase when it is skipped (L + 1 forwards per batch)."""
    cfg = model.cfg
    stacked, embed, final_norm, out = _parts(model)
    where = embed.sharding  # the batches go where the model is: replicated over its mesh
    if isinstance(where, jax.sharding.NamedSharding):
        where = jax.sharding.NamedSharding(where.mesh, jax.sharding.PartitionSpec())
    batches = [{k: jax.device_put(np.asarray(v), where) for k, v in b.items()} for b in batches]
    total = None
    for b in batches:
        sums = _sums(cfg, stacked, embed, final_norm, b)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    if total is None:
        raise PruneError("no calibration batches")
    bi, heads, mlp, hidden, n = (np.asarray(v, np.float64) for v in total)
    if n == 0:
        raise PruneError("the calibration batches hold no tokens (all padding)")
    G = cfg.num_heads // cfg.num_kv_heads
    heads = heads / n
    losses = None
    if layer_loss:
        def loss(keep):
            s = c = 0.0
            for b in batches:
                ds, dc = _lm_loss(cfg, stacked, embed, final_norm, out, b, jnp.asarray(keep))
                s, c = s + float(ds), c + float(dc)
            if c == 0:  # every layer would score 0 and be kept by tie order
                raise PruneError(f"depth_metric=layer_loss: the {int(n)} calibration tokens hold no next-token pair "
                                 f"(every sequence is one token long); calibrate on sequences of 2 tokens or more, "
                                 f"or use depth_metric=block_influence")
            return s / c
        full = loss(np.ones(cfg.num_layers, bool))
        losses = np.array([loss(np.arange(cfg.num_layers) != i) - full for i in range(cfg.num_layers)])
    return Importance(block_influence=bi / n, mlp=mlp / n, heads=heads,
                      kv_groups=heads.reshape(cfg.num_layers, cfg.num_kv_heads, G).sum(-1),
                      hidden=hidden / (n * (2 * cfg.num_layers + 1)), tokens=int(n), layer_loss=losses)


# ---------------------------------------------------------------------------------------------
# what to keep, and the cut


@dataclasses.dataclass(frozen=True)
class Keep:
    """The teacher's units a pruned model keeps, each in ascending (original) order."""
    layers: np.ndarray  # [L'] teacher layer indices
    mlp: np.ndarray  # [L', F'] MLP channels of each kept layer
    kv_groups: np.ndarray  # [L', K'] KV groups (with their G query heads) of each kept layer
    hidden: np.ndarray  # [D'] hidden channels

    def heads(self, group: int) -> np.ndarray:
        """[L', K' * G] query heads of the kept KV groups."""
        return (self.kv_groups[..., None] * group + np.arange(group)).reshape(len(self.layers), -1)


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n highest scores along the last axis, ascending (ties keep the earlier unit)."""
    order = np.argsort(-scores, axis=-1, kind="stable")[..., :n]
    return np.sort(order, axis=-1)


def choose(importance: Importance, cfg: DecoderConfig, *, layers: int | None = None,
           intermediate_size: int | None = None, num_kv_heads: int | None = None, hidden_size: int | None = None,
           depth_metric: str = "block_influence") -> Keep:
    """Keep the most important units to reach the target sizes (None keeps a dimension whole)."""
    small = pruned_config(cfg, layers=layers, intermediate_size=intermediate_size, num_kv_heads=num_kv_heads,
                          hidden_size=hidden_size)
    if depth_metric not in DEPTH_METRICS:
        raise PruneError(f"depth_metric={depth_metric!r}; choose one of {', '.join(DEPTH_METRICS)}")
    depth = importance.block_influence if depth_metric == "block_influence" else importance.layer_loss
    if small.num_layers == cfg.num_layers:
        keep = np.arange(cfg.num_layers)
    elif depth is None:
        raise PruneError("depth_metric=layer_loss needs the importance measured with layer_loss=True")
    else:
        keep = _top(depth, small.num_layers)
    return Keep(layers=keep, mlp=_top(importance.mlp[keep], small.intermediate_size),
                kv_groups=_top(importance.kv_groups[keep], small.num_kv_heads),
                hidden=_top(importance.hidden, small.hidden_size))


def apply(model: Decoder, keep: Keep, *, mesh=None, rescale_norms: bool = True, **overrides) -> Decoder:
    """A new Decoder holding the units `keep` of `model` (its own arrays: the teacher's stay
    untouched), on `mesh` when given. Each parameter is sliced by the logical names of its axes:
    layers, embed and norm (hidden channels), mlp, heads and kv_heads; vocab and head_dim stay.
    `rescale_norms`: multiply the RMSNorm scales by sqrt(D / D') and eps by D / D' (see the module doc).
    `overrides` change DecoderConfig fields (dtypes, remat)."""
    cfg = model.cfg
    G = cfg.num_heads // cfg.num_kv_heads
    small = pruned_config(cfg, layers=len(keep.layers), intermediate_size=keep.mlp.shape[1],
                          num_kv_heads=keep.kv_groups.shape[1], hidden_size=len(keep.hidden),
                          rescale_norms=rescale_norms, **overrides)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(small, rngs=nnx.Rngs(0))))
    source = dict(nnx.to_flat_state(nnx.state(model)))
    per_layer = {"mlp": jnp.asarray(keep.mlp), "heads": jnp.asarray(keep.heads(G)),
                 "kv_heads": jnp.asarray(keep.kv_groups)}
    hidden = jnp.asarray(keep.hidden)
    norm_scale = math.sqrt(cfg.hidden_size / small.hidden_size) if rescale_norms else 1.0
    shardings = None if mesh is None else dict(nnx.to_flat_state(sharding.state_shardings(state, mesh)))
    for path, var in nnx.to_flat_state(state):
        value = source[path][...]
        names = tuple(var.get_metadata().get("out_sharding") or ())
        if names and names[0] == "layers":
            value = value[jnp.asarray(keep.layers)]
        for axis, name in enumerate(names):
            if name in ("embed", "norm"):
                value = jnp.take(value, hidden, axis=axis)
            elif name in per_layer:  # a different selection per layer: axis 0 is `layers`
                value = jax.vmap(lambda v, i, a=axis: jnp.take(v, i, axis=a - 1))(value, per_layer[name])
        value = value.astype(var.dtype)
        if str(path[-1]) in _NORM_SCALES and norm_scale != 1.0:
            value = (value.astype(jnp.float32) * norm_scale).astype(var.dtype)
        if tuple(value.shape) != tuple(var.shape):
            raise AssertionError(f"{path}: sliced to {value.shape}, the pruned model wants {var.shape}")
        if shardings is not None:
            value = jax.device_put(value, shardings[path].get_value())
        var.set_value(value)
    return nnx.merge(graphdef, state)


def select(model: Decoder, batches: Iterable[dict], *, layers: int | None = None,
           intermediate_size: int | None = None, num_kv_heads: int | None = None, hidden_size: int | None = None,
           depth_metric: str = "block_influence") -> Keep:
    """The units of `model` to keep for the target sizes, by importance measured on `batches` (None
    keeps a dimension): `measure`, then `choose`."""
    targets = {"layers": layers, "intermediate_size": intermediate_size, "num_kv_heads": num_kv_heads,
               "hidden_size": hidden_size}
    pruned_config(model.cfg, **targets)  # refuse impossible targets before any forward
    if depth_metric not in DEPTH_METRICS:
        raise PruneError(f"depth_metric={depth_metric!r}; choose one of {', '.join(DEPTH_METRICS)}")
    drops_layers = layers is not None and layers < model.cfg.num_layers
    importance = measure(model, batches, layer_loss=drops_layers and depth_metric == "layer_loss")
    return choose(importance, model.cfg, depth_metric=depth_metric, **targets)


def prune(model: Decoder, batches: Iterable[dict], *, layers: int | None = None,
          intermediate_size: int | None = None, num_kv_heads: int | None = None, hidden_size: int | None = None,
          depth_metric: str = "block_influence", mesh=None, **overrides) -> Decoder:
    """`model` pruned to the target sizes by importance measured on `batches` (None keeps a
    dimension; nothing to prune is a copy): `apply(model, select(...))`."""
    keep = select(model, batches, layers=layers, intermediate_size=intermediate_size, num_kv_heads=num_kv_heads,
                  hidden_size=hidden_size, depth_metric=depth_metric)
    return apply(model, keep, mesh=mesh, **overrides)
