"""`--dry-run` for `python -m kd_jax.train` and `python -m kd_jax.precompute`: will this config fit?

Builds the model on abstract arrays (`nnx.eval_shape`: no weights, store or traces are read, nothing
is allocated) and reports, per device, the bytes of parameters, gradients, optimizer state,
activations under the remat policy and the fused loss's [chunk, vocab] temporaries, against
`mesh.device_memory_gib`. Two estimates:

- analytic, always: from the model's shapes, the sharding rules table and the mesh the config
  resolves to (a -1 axis takes this machine's devices; fake a slice on CPU with
  XLA_FLAGS=--xla_force_host_platform_device_count=N). Attention by implementation
  (`attention_bytes`): "auto" is resolved for mesh.platform (tpu: splash, gpu: cudnn, cpu: xla;
  unset: this machine's backend), so a CPU sizes an accelerator's kernels; xla holds [rows, heads,
  T, T] fp32 scores per layer, the flash implementations O(T). With `teacher.mode: online` the
  teacher's rows are added: its parameters (param dtype, sharded like the student's), its
  gathered weights, its forward activations (no backward: one layer live), its half of the online
  loss's [chunk, vocab] temporaries and, with `loss.hidden`, both models' collected layer outputs,
  the alignment's fp32 terms and the projections' train state.
- with `student.init: pruned`, the cut at start (`prune_estimate`): the whole teacher, a calibration
  forward and the cut student, held before the train state exists; the fit is checked against the
  larger of it and the step.
- compiled, when the mesh fits this machine's devices (and not --no-compile): the real jitted step
  lowered on abstract arrays and compiled ahead of time; XLA's `memory_analysis()` per device.
  Splash off a TPU and cuDNN off a GPU cannot compile here: blockwise stands in (and it says so).

`--max-seq-len` (`max_seq_len_report`): the longest data.seq_len, a multiple of 128, that fits by
the analytic estimate (rows per device kept), then the table at that length.

Models: `hf_path` is read when it is a local folder or already in the Hugging Face cache;
otherwise the section's `architecture` (the model's config.json values) stands in, which is how the
recipes under configs/recipes/ dry-run offline. When both exist they must agree.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh

from kd_jax.base import sharding
from kd_jax.base.errors import KDJaxError
from kd_jax.base.schema import Config, ModelSource
from kd_jax.core.onpolicy import sample_batch
from kd_jax.core.optim import default_hyper
from kd_jax.core.precompute import sampled_logprobs, topk_logprobs
from kd_jax.core.state import abstract_params, abstract_train_state
from kd_jax.core.step import compile_steps, layer_pairs
from kd_jax.fit import hlo_cost
from kd_jax.fit import topology as topology_lib
from kd_jax.models import attention as attn_lib
from kd_jax.models.decoder import Decoder, DecoderConfig
from kd_jax.models.flops import attention_flops_per_token, forward_flops_per_token, train_flops_per_token
from kd_jax.models.hf import read_hf_config
from kd_jax.models.source import source_config

GiB = 2**30


class DryRunError(KDJaxError, ValueError):
    """A config the dry run cannot size, with what to add."""


# ---------------------------------------------------------------- models and mesh


def _cached_folder(path: str, revision: str | None) -> str | None:
    """`path` when it is a folder, else its snapshot in the local HF cache, else None (never the network)."""
    if os.path.isdir(path):
        return path
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(repo_id=path, revision=revision, local_files_only=True,
                                 allow_patterns=["config.json"])
    except Exception:  # noqa: BLE001 - not cached (or not a hub id): fall back to `architecture`
        return None


def hf_config(src: ModelSource, role: str) -> tuple[dict, str]:
    """The HF config.json dict of an init=hf or init=random section, and where it came from."""
    if src.init == "random":
        if not src.architecture:
            raise DryRunError(f"{role}.init=random needs {role}.architecture")
        return src.architecture, f"{role}.architecture"
    folder = _cached_folder(src.hf_path, src.revision) if src.hf_path else None
    if folder is None:
        if not src.architecture:
            raise DryRunError(
                f"{role}.hf_path={src.hf_path!r} is not a local folder or in the Hugging Face cache, so the dry "
                f"run cannot read its config.json; download it, or add {role}.architecture with the model's "
                f"config.json values (see configs/recipes/)")
        return src.architecture, f"{role}.architecture ({src.hf_path} not available offline)"
    hf = read_hf_config(folder)
    wrong = {k: (v, hf[k]) for k, v in (src.architecture or {}).items() if k in hf and hf[k] != v}
    if wrong:
        text = ", ".join(f"{k}: {a!r} in the config, {b!r} in config.json" for k, (a, b) in wrong.items())
        raise DryRunError(f"{role}.architecture disagrees with {folder}/config.json ({text}); fix the config")
    return hf, folder


def model_config(src: ModelSource, role: str, teacher_src: ModelSource | None = None) -> tuple[DecoderConfig, str]:
    """The DecoderConfig `build_model` would build for a config section, read offline, and where
    its config.json came from."""
    where: dict[str, str] = {}

    def read(section: ModelSource, name: str) -> dict:
        hf, where[name] = hf_config(section, name)
        return hf

    model_cfg = source_config(src, teacher_src, read_config=read, role=role)
    if src.init == "teacher_layers":
        return model_cfg, f"teacher layers {list(src.teacher_layers)} of {where['teacher']}"
    if src.init == "pruned":
        return model_cfg, f"pruned from {where['teacher']} (student.prune)"
    return model_cfg, where[role]


def resolve_mesh(cfg: Config, num_devices: int) -> AbstractMesh:
    """The config's mesh over `num_devices` devices, without needing the devices."""
    try:
        return sharding.abstract_mesh(cfg.mesh, num_devices)
    except ValueError as e:
        raise DryRunError(str(e)) from None


def _variables(state) -> list[nnx.Variable]:
    return jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _local_bytes(var: nnx.Variable, mesh, itemsize: int | None = None) -> int:
    """Bytes of one device's shard of a parameter under the rules table."""
    spec = sharding.logical_to_spec(var.get_metadata().get("out_sharding"), var.shape, mesh)
    shape = list(var.shape)
    for i, axes in enumerate(spec):
        for ax in (axes,) if isinstance(axes, str) else (axes or ()):
            shape[i] = -(-shape[i] // mesh.shape[ax])
    return math.prod(shape) * (itemsize or np.dtype(var.dtype).itemsize)


@dataclasses.dataclass
class ParamInfo:
    count: int  # all parameters
    embedding: int  # input embedding rows (the gather, not a matmul)
    local_bytes: int  # one device's shard, in the param dtype
    layer_gathered: int  # one layer's weights after the fsdp all-gather, in the compute dtype
    out_embed_gathered: int  # the [D, V] output projection gathered for the loss, compute dtype


@functools.lru_cache(maxsize=32)  # the --max-seq-len search asks again at every length
def param_info(model_cfg: DecoderConfig, mesh) -> ParamInfo:
    _, state = nnx.split(nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0))))
    variables = _variables(state)
    count = sum(math.prod(v.shape) for v in variables)
    local = sum(_local_bytes(v, mesh) for v in variables)
    s = jnp.dtype(model_cfg.dtype).itemsize
    gathered = 0  # a layer's slice, sharded over tensor only: what one scan step holds after the gather
    for v in _variables(state["layers"]):
        names = tuple(n if n != "embed" else None for n in v.get_metadata().get("out_sharding"))
        gathered += _local_bytes(_Stub(v.shape[1:], names[1:], v.dtype), mesh, s)
    V, D, t = model_cfg.vocab_size, model_cfg.hidden_size, sharding.logical_size(mesh, "vocab")
    out_embed = D * (V // t if V % t == 0 else V) * s
    return ParamInfo(count, V * D, local, gathered, out_embed)


@dataclasses.dataclass(frozen=True)
class _Stub:
    """Shape, logical names and dtype: what `_local_bytes` reads of a Variable."""
    shape: tuple
    names: tuple
    dtype: object

    def get_metadata(self):
        return {"out_sharding": self.names}


# ---------------------------------------------------------------- analytic activations


def _per_device(n: int, size: int) -> int:
    return n // size if n % size == 0 else n  # the rules table replicates a dimension the axis does not divide


def _local_heads(c: DecoderConfig, mesh) -> tuple[int, int]:
    """(query heads, kv heads) of one device: heads split over the tensor axis."""
    heads = sharding.logical_size(mesh, "heads")
    return _per_device(c.num_heads, heads), _per_device(c.num_kv_heads, heads)


@dataclasses.dataclass(frozen=True)
class AttentionBytes:
    """One device's bytes of one layer's attention, beyond q, k, v and its output."""
    forward: int  # the forward pass's temporaries
    backward: int  # what the backward pass adds on top of the (recomputed) forward's
    saved: int  # what the dots_saveable policy keeps of it (the outputs of its dot_generals)
    shared: int  # once per step, shared by the layers: the [rows, 1, T, T] mask (xla) or bias (cudnn)


def attention_bytes(c: DecoderConfig, rows: int, T: int, mesh) -> AttentionBytes:
    """Per-device attention bytes of one layer for `rows` sequences of T tokens, by the concrete
    implementation `c.attention` (resolve "auto" first: `resolve_attention`).

    xla: [rows, N, T, T] fp32 scores and softmax (their two gradients in the backward) and the
      [rows, 1, T, T] bool mask.
    blockwise: [rows, N, bq, bk] fp32 tiles (scores and probabilities forward; probabilities, dP and
      dS backward), bq = bk = min(attention_block, T), and O(T) rows: the fp32 logsumexp and
      rowsum(dO * O) per query and head, the fp32 [rows, T, N, H] dq accumulator, dk and dv.
    splash: as blockwise with splash's tiles (the largest multiple of 128 <= attention_block that
      divides T padded to 128; on a TPU they live in VMEM, so counting them is an upper bound) plus
      its [rows, N, T, H] transposed copies of q, k, v.
    cudnn: O(T): softmax statistics and the fp32 dq accumulator; and, assuming packed rows (the
      data pipeline packs), the dense [rows, 1, T, T] bias in the compute dtype with its bool mask.
      `_cudnn` picks one-segment or packed at run time with a lax.cond whose branches are both
      compiled, so XLA reserves the packed branch's bias either way. cuDNN's own workspace is not
      counted."""
    N, K = _local_heads(c, mesh)
    H, s, n = c.head_dim, jnp.dtype(c.dtype).itemsize, rows * T
    row_stats = rows * N * T * 4  # one fp32 value per query and head
    if c.attention == "xla":
        scores = rows * N * T * T * 4
        return AttentionBytes(forward=2 * scores, backward=2 * scores, saved=scores + n * N * H * s,
                              shared=rows * T * T)
    if c.attention == "cudnn":
        return AttentionBytes(forward=row_stats, backward=2 * row_stats + n * N * H * 4, saved=0,
                              shared=rows * T * T * (s + 1))
    if c.attention == "blockwise":
        bq = bk = min(c.attention_block, T)
        copies = 0
    elif c.attention == "splash":
        bq = bk = attn_lib._splash_block(-(-T // 128) * 128, c.attention_block)
        copies = n * (N + 2 * K) * H * s
    else:
        raise DryRunError(f"attention {c.attention!r} is not resolved; resolve_attention() first")
    tile = rows * N * bq * bk * 4
    forward = 2 * tile + row_stats + rows * N * bq * H * 4 + copies  # + the fp32 output accumulator of a tile
    backward = 3 * tile + 2 * row_stats + n * N * H * 4 + 2 * n * K * H * s + copies
    return AttentionBytes(forward=forward, backward=backward, saved=0, shared=0)


def layer_activation_bytes(c: DecoderConfig, rows: int, T: int, mesh) -> tuple[int, int, int]:
    """(saved, full, backward) bytes of one decoder layer on one device for `rows` sequences of T
    tokens: `saved` is what the remat policy keeps for the backward pass, `full` everything the
    layer's forward makes, `backward` what one layer's backward pass holds at once (its recompute
    under remat, and the gradients). Attention by `attention_bytes` (c.attention resolved)."""
    s = jnp.dtype(c.dtype).itemsize
    n = rows * T
    N, K = _local_heads(c, mesh)
    F = _per_device(c.intermediate_size, sharding.logical_size(mesh, "mlp"))
    x = n * c.hidden_size * s  # residual stream, norm outputs, projections back to D
    qkv = n * (N + 2 * K) * c.head_dim * s
    av = n * N * c.head_dim * s
    mlp = n * F * s  # one of gate, up, silu(gate)*up
    attn = attention_bytes(c, rows, T, mesh)
    other = 6 * x + 2 * qkv + av + 3 * mlp + 2 * n * c.hidden_size * 4  # + fp32 norms
    full = other + attn.forward
    # Remat: the layer's forward again, then its gradients (about its size again); without remat
    # the forward's activations are already saved and only the gradients are new.
    backward = other + attn.backward + (0 if c.remat == "none" else other + attn.forward)
    saved = {
        "none": full,
        "dots_saveable": 3 * x + qkv + 2 * mlp + attn.saved,  # every dot output, attention's included
        "dots_with_no_batch_dims_saveable": 3 * x + qkv + 2 * mlp,  # the projections (weights: no batch dims)
        "offload_dots": x,  # the projections go to host memory; the layer input stays
        "nothing_saveable": x,  # only the layer input
    }[c.remat]
    return saved, full, backward


def train_estimate(cfg: Config, model_cfg: DecoderConfig, mesh, teacher_cfg: DecoderConfig | None = None) -> dict:
    """Analytic per-device bytes of one train step, by component; `teacher_cfg`: the online
    teacher's (adds `online_estimate`)."""
    batch_shards = sharding.logical_size(mesh, "batch")
    micro = cfg.train.global_batch_size // cfg.train.grad_accum
    if micro % batch_shards:
        raise DryRunError(f"train.global_batch_size / train.grad_accum = {micro} sequences per micro-batch do not "
                          f"split over data x fsdp = {batch_shards} devices; make it a multiple")
    rows, T, t = micro // batch_shards, cfg.data.seq_len, sharding.logical_size(mesh, "vocab")
    info = param_info(model_cfg, mesh)
    s = jnp.dtype(model_cfg.dtype).itemsize
    saved, _, transient = layer_activation_bytes(model_cfg, rows, T, mesh)  # transient: one layer's backward
    n = rows * T
    V, D = model_cfg.vocab_size, model_cfg.hidden_size
    activations = (model_cfg.num_layers * saved + transient
                   + attention_bytes(model_cfg, rows, T, mesh).shared  # the mask (xla) or bias (cudnn)
                   + n * D * (2 * s + 4))  # embedding output, final hidden states, their fp32 gradient
    chunk = -(-cfg.loss.chunk_size // batch_shards)  # the loss chunk is global; each device holds its rows
    Vt = _per_device(V, t)
    loss = (3 * chunk * Vt * 4 + chunk * Vt * s  # fp32 logits, softmax, their gradient; compute-dtype gradient
            + D * Vt * 4)  # the fp32 output-projection gradient the loss accumulates over chunks
    K = cfg.data.top_k
    batch = micro // batch_shards * T * (7 * 4 + 1 + K * 8)  # 7 int32 rows, the bool mask, top-K ids + fp32 log-probs
    grads = info.local_bytes * (2 if cfg.train.grad_accum > 1 else 1)  # + the accumulator across micro-batches
    out = dict(
        params=info.local_bytes, grads=grads, optimizer=2 * info.local_bytes,  # Adam mu, nu in the param dtype
        activations=activations, gathered_weights=2 * info.layer_gathered + info.out_embed_gathered,
        loss=loss, batch=batch,
        _rows=rows, _chunk=chunk, _info=info)
    if teacher_cfg is not None:
        out.update(online_estimate(cfg, model_cfg, teacher_cfg, mesh, rows, chunk, transient))
    return out


def align_shape(cfg: Config, model_cfg: DecoderConfig, teacher_cfg: DecoderConfig):
    """(hidden-alignment layer pairs, the projections' shape [M, D_s, D_t] or None when the widths
    agree), as `kd_jax.core.prepare.prepare` builds them."""
    pairs = layer_pairs(cfg.loss.hidden, model_cfg.num_layers, teacher_cfg.num_layers)
    widths = model_cfg.hidden_size, teacher_cfg.hidden_size
    return pairs, ((len(pairs), *widths) if pairs and widths[0] != widths[1] else None)


def online_estimate(cfg: Config, model_cfg: DecoderConfig, teacher_cfg: DecoderConfig, mesh, rows: int,
                    chunk: int, student_transient: int) -> dict:
    """Analytic per-device bytes the online teacher adds to a train step (keys prefixed teacher_,
    hidden_, align_). `student_transient`: the student's one-layer backward bytes, which are never
    live together with the teacher's one-layer forward bytes (the teacher runs in the forward pass)."""
    T, n = cfg.data.seq_len, rows * cfg.data.seq_len
    t_info = param_info(teacher_cfg, mesh)
    st, s = jnp.dtype(teacher_cfg.dtype).itemsize, jnp.dtype(model_cfg.dtype).itemsize
    D, E = model_cfg.hidden_size, teacher_cfg.hidden_size
    _, t_full, _ = layer_activation_bytes(teacher_cfg, rows, T, mesh)
    pairs, proj = align_shape(cfg, model_cfg, teacher_cfg)
    M = len(pairs)
    collected = (M + 1) * n * E * st if M else 0  # [M+1, rows, T, E]: the scan's collect buffer
    # Forward only, outside differentiation: one layer's activations at a time (counted beyond the
    # student's backward transients, the step's other one-layer peak), its own attention mask (or
    # bias), the residual stream and the final normed hidden states the loss reads chunk by chunk.
    activations = (max(t_full - student_transient, 0) + attention_bytes(teacher_cfg, rows, T, mesh).shared
                   + 2 * n * E * st + collected)
    Vt = _per_device(model_cfg.vocab_size, sharding.logical_size(mesh, "vocab"))
    out = dict(teacher_params=t_info.local_bytes,
               teacher_gathered_weights=2 * t_info.layer_gathered + t_info.out_embed_gathered,
               teacher_activations=activations,
               teacher_loss=2 * chunk * Vt * 4)  # the teacher's fp32 [chunk, V] logits and softmax
    if M:
        # The student's collect buffer and its gradient (compute dtype); the alignment term in fp32:
        # the projected student states, their gradient, the gradient back to the student's width
        # (XLA fuses the elementwise rest).
        out["hidden_alignment"] = 2 * (M + 1) * n * D * s + M * n * (D + 2 * E) * 4
    if proj is not None:
        local = _local_bytes(_Stub(proj, (None, "embed", None), jnp.float32), mesh)
        # fp32 projections, their gradient (+ the accumulator), Adam mu and nu
        out["align_state"] = local * (4 + (cfg.train.grad_accum > 1))
    out["_teacher_info"], out["_pairs"], out["_proj"] = t_info, pairs, proj
    return out


def prune_estimate(cfg: Config, model_cfg: DecoderConfig, teacher_cfg: DecoderConfig, mesh) -> dict:
    """student.init=pruned: analytic per-device bytes of the cut at start (kd_jax.core.prepare.prepare,
    kd_jax.models.prune.select and apply), before any train state exists: the whole teacher in its
    param dtype (teacher.param_dtype, sharded like a student's), one layer of it gathered at a time,
    the forward of one calibration batch (student.prune.calibration_batch_size rows of data.seq_len,
    on every device: `measure` replicates the batches) with the fp32 copies its scores are summed
    from, with depth_metric=layer_loss one row's fp32 [T, V] logits, and the cut student's
    parameters, made while the teacher is still held."""
    p, T = cfg.student.prune, cfg.data.seq_len
    rows, n = p.calibration_batch_size, p.calibration_batch_size * cfg.data.seq_len
    t_info = param_info(teacher_cfg, mesh)
    E, st = teacher_cfg.hidden_size, jnp.dtype(teacher_cfg.dtype).itemsize
    _, full, _ = layer_activation_bytes(teacher_cfg, rows, T, mesh)
    layer_loss = p.depth_metric == "layer_loss" and (p.layers or teacher_cfg.num_layers) < teacher_cfg.num_layers
    activations = (full + attention_bytes(teacher_cfg, rows, T, mesh).shared
                   + n * E * (st + 2 * 4)  # the residual stream, a layer's input and output in fp32 (the scores)
                   + (2 * T * teacher_cfg.vocab_size * 4 if layer_loss else 0))  # a row's logits, log-sum-exp
    return dict(prune_teacher_params=t_info.local_bytes,
                prune_teacher_gathered=2 * t_info.layer_gathered + (t_info.out_embed_gathered if layer_loss else 0),
                prune_calibration=activations, prune_batch=3 * n * 4,  # tokens, positions, segment ids (int32)
                prune_student_params=param_info(model_cfg, mesh).local_bytes)


def precompute_estimate(cfg: Config, model_cfg: DecoderConfig, mesh) -> dict:
    """Analytic per-device bytes of the teacher's top-K pass on its longest batch."""
    batch_shards = sharding.logical_size(mesh, "batch")
    pre, t = cfg.precompute, sharding.logical_size(mesh, "vocab")
    T = -(-cfg.data.seq_len // pre.bucket) * pre.bucket  # the longest bucket
    total_rows = max(batch_shards, (pre.batch_tokens // T) // batch_shards * batch_shards)  # teacher._batches
    rows = total_rows // batch_shards
    info = param_info(model_cfg, mesh)
    _, full, _ = layer_activation_bytes(model_cfg, rows, T, mesh)
    n, D, s, K = rows * T, model_cfg.hidden_size, jnp.dtype(model_cfg.dtype).itemsize, cfg.data.top_k
    shared = attention_bytes(model_cfg, rows, T, mesh).shared
    activations = full + shared + 2 * n * D * s  # forward only: one layer live; mask or bias; hidden states
    Vt = _per_device(model_cfg.vocab_size, t)
    loss = 3 * rows * min(pre.logits_chunk, T) * Vt * 4 + n * K * 8  # fp32 logits, log-softmax, top-k; outputs
    return dict(params=info.local_bytes, activations=activations,
                gathered_weights=2 * info.layer_gathered + info.out_embed_gathered, loss=loss,
                batch=n * 4, _rows=rows, _T=T, _info=info)


# ---------------------------------------------------------------- ahead-of-time compile


def compiled_memory(compiled) -> dict[str, int]:
    """XLA's memory accounting of a compiled program (any backend), per device: argument, output,
    alias (donated arguments reused as outputs), temporary and total bytes, where total counts
    aliased bytes once; and peak_bytes, the compiler's peak, where it is above that total (on TPU,
    temp_bytes can read 0 while the peak holds [T, T] temporaries). {} when the backend gives none.
    Shared by the dry run and the benchmarks."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = dict(argument_bytes=m.argument_size_in_bytes, output_bytes=m.output_size_in_bytes,
               alias_bytes=m.alias_size_in_bytes, temp_bytes=m.temp_size_in_bytes)
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    peak = getattr(m, "peak_memory_in_bytes", 0) or 0
    if peak > out["total_bytes"]:  # the TPU compiler's temp_bytes leaves buffers out that its peak counts
        out["peak_bytes"] = peak
    return out


def compile_train(cfg: Config, model_cfg: DecoderConfig, mesh, teacher_cfg: DecoderConfig | None = None) -> dict:
    """memory_analysis() of the real train step (`compiled_train`)."""
    return compiled_memory(compiled_train(cfg, model_cfg, mesh, teacher_cfg))


def compiled_train(cfg: Config, model_cfg: DecoderConfig, mesh, teacher_cfg: DecoderConfig | None = None):
    """The real train step (kd_jax.core.step.compile_steps) compiled ahead of time on the abstract
    train state for `mesh`'s devices; with `teacher_cfg`, the online teacher's abstract parameters
    (its param dtype, sharded on `mesh`), its hidden-alignment pairs and the projections in the
    state, as `prepare.prepare` builds them."""
    teacher, teacher_params, pairs, proj = None, None, (), None
    if teacher_cfg is not None:
        teacher, teacher_params = abstract_params(teacher_cfg, mesh)
        pairs, proj = align_shape(cfg, model_cfg, teacher_cfg)
    spec = abstract_train_state(model_cfg, cfg.optim, cfg.train.steps, mesh, align_shape=proj)
    with jax.set_mesh(mesh):
        steps = compile_steps(spec, cfg.loss, cfg.train.grad_accum, mesh, teacher=teacher, pairs=pairs)
        B, T, K = cfg.train.global_batch_size, cfg.data.seq_len, cfg.data.top_k
        shapes = dict(inputs=(B, T), labels=(B, T), positions=(B, T), segment_ids=(B, T), role=(B, T),
                      reasoning_step=(B, T), step_weight=(B, T), loss_mask=(B, T), topk_ids=(B, T, K),
                      topk_logprobs=(B, T, K))
        dtypes = dict(loss_mask=jnp.bool_, step_weight=jnp.float32, topk_logprobs=jnp.float32)
        batch = {k: jax.ShapeDtypeStruct(v, dtypes.get(k, jnp.int32), sharding=sharding.batch_sharding(mesh, len(v)))
                 for k, v in shapes.items()}
        lowered = steps.train.lower(spec.abstract, batch, default_hyper(cfg.loss), teacher_params)
        return lowered.compile()


def compile_precompute(cfg: Config, model_cfg: DecoderConfig, mesh, rows: int, T: int) -> dict:
    """memory_analysis() of the teacher's pass (`compiled_precompute`)."""
    return compiled_memory(compiled_precompute(cfg, model_cfg, mesh, rows, T))


def teacher_pass(cfg: Config) -> str:
    """What the teacher's pass of precompute computes at each position, for the report."""
    if cfg.precompute.targets == "sampled":
        return f"sampled pass ({cfg.data.top_k} draws)"
    return f"top-{cfg.data.top_k} pass"


def compiled_precompute(cfg: Config, model_cfg: DecoderConfig, mesh, rows: int, T: int):
    """The teacher's pass that precompute runs (kd_jax.core.precompute.run_teacher): `topk_logprobs`,
    or `sampled_logprobs` with precompute.targets=sampled, on its longest batch, compiled ahead of
    time for `mesh`'s devices."""
    graphdef, params = abstract_params(model_cfg, mesh)
    shards = sharding.logical_size(mesh, "batch")
    tokens = jax.ShapeDtypeStruct((rows * shards, T), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))
    kw = dict(k=cfg.data.top_k, vocab_size=model_cfg.vocab_size, logits_chunk=min(cfg.precompute.logits_chunk, T))
    if cfg.precompute.targets == "sampled":
        seqs = jax.ShapeDtypeStruct((rows * shards,), jnp.int32, sharding=sharding.batch_sharding(mesh, 1))
        # the key made inside: a replicated argument would need a sharding on the (compile-only) devices
        fn = jax.jit(lambda p, x, s: sampled_logprobs(nnx.merge(graphdef, p), x, s,
                                                      jax.random.key(cfg.precompute.sample_seed), **kw,
                                                      temperature=float(cfg.precompute.sample_temperature)))
        args = (params, tokens, seqs)
    else:
        fn = jax.jit(lambda p, x: topk_logprobs(nnx.merge(graphdef, p), x, **kw))
        args = (params, tokens)
    with jax.set_mesh(mesh):
        return fn.lower(*args).compile()


def compiled_sampler(cfg: Config, model_cfg: DecoderConfig, mesh):
    """The on-policy sampler (kd_jax.core.onpolicy.sample_batch: prefill, then KV-cache decode of
    train.on_policy.max_new_tokens) for prompts_per_step prompts of the longest bucketed length that
    leaves room for them in data.seq_len, compiled ahead of time for `mesh`'s devices."""
    op = cfg.train.on_policy
    rows = op.prompts_per_step or cfg.train.global_batch_size
    prompt_len = max(op.bucket, (cfg.data.seq_len - op.max_new_tokens) // op.bucket * op.bucket)
    graphdef, params = abstract_params(model_cfg, mesh)

    def arg(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))

    with jax.set_mesh(mesh):
        return sample_batch.lower(graphdef, params, arg((rows, prompt_len), jnp.int32),
                                  arg((rows, prompt_len), jnp.bool_), arg((rows, 2), jnp.uint32), op.max_new_tokens,
                                  float(op.temperature), float(op.top_p),
                                  jax.ShapeDtypeStruct((1,), jnp.int32)).compile(), rows, prompt_len


# ---------------------------------------------------------------- report


def device_memory(cfg: Config, topology: topology_lib.Topology | None = None) -> tuple[int | None, str]:
    """Bytes of one device's memory: mesh.device_memory_gib (what a run may use), else the --topology
    chip's HBM, else what the local device reports."""
    if topology is not None and cfg.mesh.device_memory_gib is None:
        return int(topology.chip.hbm_gib * GiB), f"{topology.chip.name} HBM"
    if cfg.mesh.device_memory_gib is not None:
        return int(cfg.mesh.device_memory_gib * GiB), "mesh.device_memory_gib"
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]), f"{jax.local_devices()[0].device_kind} bytes_limit"
    return None, "unknown: set mesh.device_memory_gib"


_LABELS = {
    "params": "parameters", "grads": "gradients", "optimizer": "optimizer state (Adam mu, nu)",
    "activations": "activations", "gathered_weights": "gathered weights (fsdp, one layer + output)",
    "loss": "fused loss (chunk x vocab)", "batch": "batch",
    "teacher_params": "teacher parameters (online, {dtype})",
    "teacher_gathered_weights": "teacher gathered weights (one layer + output)",
    "teacher_activations": "teacher activations (forward only)",
    "teacher_loss": "online loss, teacher's chunk x vocab (fp32)",
    "hidden_alignment": "hidden alignment ({M} layers of both models)",
    "align_state": "alignment projections + grads + Adam (fp32)",
    "prune_teacher_params": "teacher parameters (whole, {dtype})",
    "prune_teacher_gathered": "teacher gathered weights (one layer)",
    "prune_calibration": "calibration forward ({rows} x {T} tokens)",
    "prune_batch": "calibration batch",
    "prune_student_params": "the cut student's parameters",
}


def _gib(n: int) -> str:
    return f"{n / GiB:9.3f}"


@dataclasses.dataclass(frozen=True)
class Target:
    """What a dry run sizes: the models (attention resolved for `platform`), the mesh and its device count."""
    entry: str  # "train" or "precompute"
    model_cfg: DecoderConfig  # the student (train) or the teacher (precompute)
    where: str  # where its config.json came from
    teacher_cfg: DecoderConfig | None  # the online teacher in the train step, else None
    teacher_where: str | None
    num_devices: int  # devices of the mesh: all (train) or this process's (precompute)
    mesh: AbstractMesh
    platform: str  # "tpu", "gpu" or "cpu"
    platform_from: str  # "mesh.platform" or "this machine"
    cut_from: DecoderConfig | None = None  # student.init=pruned: the teacher the student is cut from at start


def target_platform(cfg: Config) -> tuple[str, str]:
    """(the platform the dry run sizes for, where it came from): mesh.platform, else this machine's backend."""
    if cfg.mesh.platform:
        return cfg.mesh.platform, "mesh.platform"
    return jax.default_backend(), "this machine"


def resolve_attention(model_cfg: DecoderConfig, platform: str) -> DecoderConfig:
    """`model_cfg` with its attention concrete on `platform` ("auto": splash on tpu, cudnn on gpu, xla on cpu)."""
    return dataclasses.replace(model_cfg, attention=attn_lib.resolve(model_cfg.attention, platform))


def compile_stand_in(model_cfg: DecoderConfig, compiler: str | None = None) -> tuple[DecoderConfig, str | None]:
    """(the model config to compile for `compiler`'s platform (default: this machine's backend; "tpu"
    under --topology), a note when its attention was swapped): splash needs a TPU and cudnn a GPU;
    elsewhere blockwise stands in, flash attention with O(T) memory too (splash's Pallas interpret
    mode would compile something else, and jax refuses cuDNN off a GPU)."""
    need = {"splash": "tpu", "cudnn": "gpu"}.get(model_cfg.attention)
    if need is None or (compiler or jax.default_backend()) == need:
        return model_cfg, None
    return (dataclasses.replace(model_cfg, attention="blockwise"),
            f"{model_cfg.attention} attention needs a {need.upper()}: compiled with blockwise standing in")


def target(cfg: Config, entry: str, topology: topology_lib.Topology | None = None) -> Target | None:
    """The models and mesh of a dry run of `entry` (on `topology`'s chips when given); None for a
    precompute that runs no teacher (a tokens-only store, data.top_k=0, or precompute.import_logprobs)."""
    platform, platform_from = ((topology.chip.platform, f"--topology {topology.name}") if topology
                               else target_platform(cfg))
    teacher_cfg = teacher_where = None
    if entry == "train":
        model_cfg, where = model_config(cfg.student, "student", cfg.teacher)
        num_devices = topology.chips if topology else jax.device_count()
        if cfg.teacher.mode == "online":
            teacher_cfg, teacher_where = model_config(cfg.teacher, "teacher")
            if teacher_cfg.vocab_size < model_cfg.vocab_size:  # as kd_jax.models.source.check_online_teacher
                raise DryRunError(f"the online teacher has {teacher_cfg.vocab_size} output rows, fewer than the "
                                  f"student's {model_cfg.vocab_size}: pick a pair of one tokenizer family")
            teacher_cfg = resolve_attention(teacher_cfg, platform)
    elif cfg.precompute.import_logprobs:  # a served teacher's log-probs are read: no teacher pass
        return None
    elif cfg.data.top_k == 0:  # kd_jax.core.precompute.precompute: a tokens-only store, no teacher runs
        return None
    else:  # precompute runs the teacher on each process's own devices (kd_jax.core.precompute.precompute)
        model_cfg, where = model_config(cfg.teacher, "teacher")
        num_devices = topology.host_chips if topology else jax.local_device_count()
    cut_from = None
    if entry == "train" and cfg.student.init == "pruned":
        cut_from = resolve_attention(model_config(cfg.teacher, "teacher")[0], platform)
    return Target(entry, resolve_attention(model_cfg, platform), where, teacher_cfg, teacher_where, num_devices,
                  resolve_mesh(cfg, num_devices), platform, platform_from, cut_from)


def estimate(cfg: Config, t: Target) -> dict:
    """The analytic estimate of `t` under `cfg` (train_estimate or precompute_estimate); with a
    pruned student, the cut at start under "_prune" (`prune_estimate`: never live with a train step)."""
    if t.entry == "train":
        est = train_estimate(cfg, t.model_cfg, t.mesh, t.teacher_cfg)
        if t.cut_from is not None:
            est["_prune"] = prune_estimate(cfg, t.model_cfg, t.cut_from, t.mesh)
        return est
    return precompute_estimate(cfg, t.model_cfg, t.mesh)


def analytic_total(est: dict) -> int:
    return sum(v for k, v in est.items() if not k.startswith("_"))


def analytic_peak(est: dict) -> int:
    """The most one device holds at once by the analytic estimate: the step's total, or the cut at
    start of a pruned student when it holds more."""
    return max(analytic_total(est), sum(est.get("_prune", {}).values()))


def with_seq_len(cfg: Config, seq_len: int) -> Config:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=seq_len))


def _doublings(step: int, cap: int) -> list[int]:
    """step, 2 step, 4 step, ... below cap, then cap."""
    out = [step]
    while out[-1] < cap:
        out.append(min(2 * out[-1], cap))
    return out


def longest_seq_len(cfg: Config, t: Target, limit: int, step: int = 128) -> tuple[int | None, int]:
    """(the longest data.seq_len, a multiple of `step`, whose analytic estimate fits `limit` bytes
    per device, or None when none does; the search's cap: the models' smallest
    max_position_embeddings, rounded down to `step`). Everything else in `cfg` stays: in training
    the rows per device per micro-batch (train.global_batch_size, train.grad_accum), in precompute
    precompute.batch_tokens (rows = batch_tokens // length, at least one per device, so short
    lengths mean many rows: there the estimate first falls with the length, then grows). Doubling
    from `step` to the first length that fits and on to the first that does not, then bisection."""
    models = [t.model_cfg] + ([t.teacher_cfg] if t.teacher_cfg is not None else [])
    cap = max(step, min(m.max_position_embeddings for m in models) // step * step)
    fits = lambda n: analytic_peak(estimate(with_seq_len(cfg, n), t)) <= limit  # noqa: E731
    probes = _doublings(step, cap)
    ok = [fits(n) for n in probes]
    if not any(ok):
        return None, cap
    first = ok.index(True)
    after = next((i for i in range(first + 1, len(probes)) if not ok[i]), None)
    if after is None:
        return cap, cap
    good, bad = probes[after - 1], probes[after]
    while bad - good > step:
        mid = (good + bad) // 2 // step * step
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good, cap


def _compile_for_topology(cfg: Config, t: Target, est: dict, p, summary: dict,
                          topology: topology_lib.Topology) -> int:
    """Compile `t`'s program for `topology`'s chips with their compiler (libtpu's, or XLA's GPU compiler
    in the CUDA plugin), print its memory per chip
    (beside the analytic total), the compiler's FLOPs and HBM bytes per chip (beside the analytic
    model FLOPs) and the roofline floor; fill `summary`; return the compiled total bytes."""
    host_note = ""
    if t.entry == "precompute" and topology.chips > topology.host_chips:
        # Each host runs the teacher on its own chips. The TPU compiler refuses a program on part of a
        # v5e slice ("device assignment should include all slice devices", limited ICI routing), so one
        # host's chips are compiled for as a slice of their own; GPUs: the first host's.
        host = topology_lib.host_topology(topology)
        host_note = f" on one host's chips (compiled as {host.name}: a program on part of a slice is refused)"
        devices, compiled_for = topology_lib.devices(host), host.name
    else:
        devices, compiled_for = topology_lib.devices(topology), topology.name
    real = sharding.mesh_from_config(cfg.mesh, devices=devices)
    compiled_cfg, note = compile_stand_in(t.model_cfg, t.platform)
    compiled_teacher = compile_stand_in(t.teacher_cfg, t.platform)[0] if t.teacher_cfg is not None else None
    t0 = time.perf_counter()
    if t.entry == "train":
        compiled = compiled_train(cfg, compiled_cfg, real, compiled_teacher)
        T, tokens = cfg.data.seq_len, cfg.train.global_batch_size * cfg.data.seq_len
        model_flops = tokens * train_flops_per_token(t.model_cfg, T)
        if t.teacher_cfg is not None:  # the online teacher's forward runs inside the step
            model_flops += tokens * forward_flops_per_token(t.teacher_cfg, T)
        what = "train step"
    else:
        T = est["_T"]
        compiled = compiled_precompute(cfg, compiled_cfg, real, est["_rows"], T)
        tokens = est["_rows"] * len(devices) * T
        model_flops = tokens * forward_flops_per_token(t.model_cfg, T)
        what = f"teacher's {teacher_pass(cfg)}{host_note}"
    seconds = time.perf_counter() - t0
    mem, cost = compiled_memory(compiled), topology_lib.cost(compiled)
    analytic = analytic_total({k: v for k, v in est.items() if not k.startswith("_")})
    resident = max(mem["total_bytes"], mem.get("peak_bytes", 0))  # what the chip must hold
    compiler = "libtpu's XLA TPU compiler" if t.platform == "tpu" else "XLA's GPU compiler (CUDA plugin)"
    p(f"per-chip memory of the {what}, compiled for {compiled_for} ({len(devices)} {topology.chip.device_kind} "
      f"chips) by {compiler} in {seconds:.0f} s (memory_analysis, GiB" + (f"; {note}" if note else "") + "):")
    for k, v in mem.items():
        p(f"  {k:<48}{_gib(v)}")
    p(f"  {'analytic total (above)':<48}{_gib(analytic)}  (compiled / analytic = {resident / analytic:.2f})")
    summary.update(topology=topology.name, chip=topology.chip.name, compile_seconds=round(seconds, 1), compiled=mem)
    # Counted from the compiled program with every loop body times its trip count (kd_jax/fit/hlo_cost.py):
    # cost_analysis() counts a scan's body once, so a layer scan reports about one layer's work.
    walked = hlo_cost.program_cost(compiled.as_text())
    flops = walked["flops"]
    blind = sorted({c["target"] for c in walked["custom_calls"] if "cost_estimate" not in c})
    kernel_flops = 0.0
    if blind:  # splash's Mosaic kernels and cuDNN's carry no cost estimate: their work from the model (causal)
        kernels = ("splash", "cudnn")
        if t.model_cfg.attention in kernels:
            kernel_flops += tokens * (3.0 if t.entry == "train" else 1.0) * attention_flops_per_token(t.model_cfg, T)
        if t.teacher_cfg is not None and t.teacher_cfg.attention in kernels:
            kernel_flops += tokens * attention_flops_per_token(t.teacher_cfg, T)
        kernel_flops /= len(devices)
        flops += kernel_flops
    roof = topology_lib.roofline(topology.chip, flops, walked["bytes_accessed"], tokens, model_flops, len(devices))
    per_chip = model_flops / len(devices)
    said = f", and says {cost['flops']:.3e}" if cost.get("flops") else ""
    p(f"the compiled program's work per chip per call (every loop body times its trip count, "
      f"kd_jax/fit/hlo_cost.py; the compiler's cost_analysis() counts a loop body once{said}): "
      f"{walked['flops']:.3e} FLOPs ({walked['matmul_flops']:.3e} in matmuls)"
      + (f" + {kernel_flops:.3e} in the attention kernels (no cost estimate in them: the model's causal "
         f"attention FLOPs)" if kernel_flops else "")
      + f" = {flops / per_chip:.2f}x the model's {'6·P + 3·A' if t.entry == 'train' else '2·P + A'} "
      f"({per_chip:.3e}; the rest is recomputation under remat, "
      f"masked attention blocks and elementwise work); {walked['bytes_accessed']:.3e} bytes of HBM traffic"
      + (f"; custom calls without a cost estimate: {', '.join(blind)}" if blind else "")
      + (f"; {walked['unknown_trip_counts']} loops of unknown length counted once" if walked["unknown_trip_counts"]
         else ""))
    chip = topology.chip
    p(f"roofline floor (the compiler's accounting, not a measured speed): FLOPs / {chip.peak_flops / 1e12:.0f}"
      f" TFLOP/s = {roof['compute_s']:.3f} s, bytes / {chip.hbm_bytes_per_s / 1e9:.0f} GB/s = "
      f"{roof['memory_s']:.3f} s: at least {roof['floor_s']:.3f} s a call ({roof['bound']}-bound), so at most "
      f"{roof['tokens_per_s']:,.0f} tokens/s on {compiled_for} and MFU at most {roof['mfu']:.1%}")
    summary.update(cost={**{k: walked[k] for k in ("flops", "matmul_flops", "bytes_accessed", "unknown_trip_counts")},
                         "kernel_flops": kernel_flops, "custom_calls_without_estimate": blind},
                   compiler_cost_analysis=cost, model_flops=model_flops, roofline=roof)
    if t.entry == "train" and cfg.train.on_policy.fraction > 0:
        t0 = time.perf_counter()
        sampler, rows, prompt_len = compiled_sampler(cfg, compiled_cfg, real)
        seconds, smem = time.perf_counter() - t0, compiled_memory(sampler)
        p(f"per-chip memory of the on-policy sampler ({rows} prompts of {prompt_len} tokens, prefill + KV-cache decode "
          f"of {cfg.train.on_policy.max_new_tokens}), compiled in {seconds:.0f} s (GiB): "
          + ", ".join(f"{k} {v / GiB:.3f}" for k, v in smem.items()))
        # While it samples, the train state stays on the chips: the step's arguments plus the sampler's own
        sampling = mem["argument_bytes"] + smem["temp_bytes"] + smem["output_bytes"]
        p(f"  while sampling: the train step's arguments (train state, batch) + the sampler's temporaries and "
          f"outputs = {sampling / GiB:.3f} GiB per chip")
        summary["sampler"] = dict(compiled=smem, rows=rows, prompt_len=prompt_len, compile_seconds=round(seconds, 1),
                                  while_sampling_bytes=sampling)
        return max(resident, sampling)
    return resident


def report(cfg: Config, entry: str, *, compile: bool = True, out=sys.stdout, extra: dict | None = None,
           topology: topology_lib.Topology | None = None) -> dict:
    """Print the dry-run table for `entry` ("train" or "precompute"); returns the summary dict
    (`extra` is merged into it). With `topology`, compiled for that TPU slice or GPU host by its
    compiler (`compile` is then implied), with the program's FLOPs, bytes and the roofline floor."""
    t0 = time.perf_counter()
    p = lambda *a: print(*a, file=out)  # noqa: E731
    t = target(cfg, entry, topology)
    if t is None and cfg.precompute.import_logprobs:
        p(f"dry run of kd_jax.precompute: precompute.import_logprobs={cfg.precompute.import_logprobs!r}, so precompute "
          f"reads a served teacher's top-{cfg.data.top_k} from that file into the store (no teacher pass, nothing on "
          f"the devices to size)")
        summary = dict(entry=entry, imported=True, fits=True, **(extra or {}),
                       seconds=round(time.perf_counter() - t0, 2))
        p("dry-run summary: " + json.dumps(summary))
        return summary
    if t is None:
        p("dry run of kd_jax.precompute: data.top_k=0, so precompute only tokenizes the traces into a tokens-only "
          "store (no teacher pass, nothing on the devices to size)")
        summary = dict(entry=entry, tokens_only=True, fits=True, **(extra or {}),
                       seconds=round(time.perf_counter() - t0, 2))
        p("dry-run summary: " + json.dumps(summary))
        return summary
    model_cfg, teacher_cfg, mesh, num_devices = t.model_cfg, t.teacher_cfg, t.mesh, t.num_devices
    est = estimate(cfg, t)
    info: ParamInfo = est.pop("_info")
    t_info: ParamInfo | None = est.pop("_teacher_info", None)
    pairs, proj = est.pop("_pairs", ()), est.pop("_proj", None)
    cut = est.pop("_prune", None)
    parts = {k: v for k, v in est.items() if not k.startswith("_")}
    total = sum(parts.values())
    T = cfg.data.seq_len if entry == "train" else est["_T"]
    role = "student" if entry == "train" else "teacher"
    p(f"dry run of kd_jax.{entry}: nothing is allocated; no weights, store or traces are read")
    p(f"{role}: {model_cfg.model_type}, {info.count:,} parameters ({info.count / 1e9:.2f}B; "
      f"{(info.count - info.embedding) / 1e9:.2f}B without the input embedding); config from {t.where}")
    if teacher_cfg is not None:
        align = (f"hidden alignment of {len(pairs)} layer pairs"
                 + (f", projections {list(proj)} fp32" if proj else ", same width: no projections")
                 if pairs else "no hidden alignment")
        p(f"teacher (online, in the train step): {teacher_cfg.model_type}, {t_info.count:,} parameters "
          f"({t_info.count / 1e9:.2f}B) in {teacher_cfg.param_dtype}, compute {teacher_cfg.dtype}, forward only; "
          f"{align}; config from {t.teacher_where}")
    sizes = dict(mesh.shape)
    p(f"mesh: {sharding.describe(mesh)} ({mesh.size} devices); "
      f"per device {est['_rows']} x {T} tokens per (micro-)batch; dtype {model_cfg.dtype}, params "
      f"{model_cfg.param_dtype}, remat {model_cfg.remat if entry == 'train' else 'n/a (forward only)'}"
      + (f"; loss chunk {est['_chunk']} rows x {model_cfg.vocab_size} vocab" if entry == "train" else ""))
    attention = dict(student=model_cfg.attention) if entry == "train" else dict(teacher=model_cfg.attention)
    if teacher_cfg is not None:
        attention["teacher"] = teacher_cfg.attention
    p(f"attention on {t.platform} ({t.platform_from}): "
      + ", ".join(f"{k} {v}" for k, v in attention.items())
      + f"; attention_block {model_cfg.attention_block} (kd_jax.fit.dryrun.attention_bytes)")
    p("per-device memory, analytic (GiB):")
    for k, v in parts.items():
        label = _LABELS[k].format(dtype=teacher_cfg and teacher_cfg.param_dtype, M=len(pairs))
        label += f" ({model_cfg.remat})" if k == "activations" and entry == "train" else ""
        p(f"  {label:<48}{_gib(v)}")
    p(f"  {'total':<48}{_gib(total)}")
    summary = dict(entry=entry, model_type=model_cfg.model_type, params=info.count,
                   params_without_embedding=info.count - info.embedding, mesh=sizes, devices=mesh.size,
                   rows_per_device=est["_rows"], seq_len=T, platform=t.platform, attention=attention,
                   analytic=dict(parts, total=total))
    if entry == "precompute":
        summary["targets"] = cfg.precompute.targets  # the teacher pass compiled: top-K, or K draws
    if teacher_cfg is not None:
        summary["teacher"] = dict(mode="online", model_type=teacher_cfg.model_type, params=t_info.count,
                                  param_dtype=teacher_cfg.param_dtype, hidden_pairs=len(pairs),
                                  align_shape=list(proj) if proj else None)
    cut_total = 0
    if cut is not None:
        cut_total = sum(cut.values())
        pr = cfg.student.prune
        p(f"per-device memory of the cut at start (student.init=pruned: the student is cut from the whole teacher "
          f"after {pr.depth_metric} scores on calibration batches; before the train state exists), analytic (GiB):")
        for k, v in cut.items():
            label = _LABELS[k].format(dtype=t.cut_from.param_dtype, rows=pr.calibration_batch_size, T=T)
            p(f"  {label:<48}{_gib(v)}")
        p(f"  {'total':<48}{_gib(cut_total)}")
        summary["prune"] = dict(cut, total=cut_total, teacher_param_dtype=t.cut_from.param_dtype)
    checked = total
    if topology is not None:
        checked = _compile_for_topology(cfg, t, est, p, summary, topology)
    elif compile and mesh.size == num_devices:
        devices = jax.devices() if entry == "train" else jax.local_devices()
        real = sharding.mesh_from_config(cfg.mesh, devices=devices)
        compiled_cfg, note = compile_stand_in(model_cfg)
        compiled_teacher, teacher_note = compile_stand_in(teacher_cfg) if teacher_cfg is not None else (None, None)
        c = (compile_train(cfg, compiled_cfg, real, compiled_teacher) if entry == "train"
             else compile_precompute(cfg, compiled_cfg, real, est["_rows"], T))
        notes = [n for n in (note, teacher_note and f"teacher: {teacher_note}") if n]
        of = "" if entry == "train" else f" of the teacher's {teacher_pass(cfg)}"
        p(f"per-device memory{of}, compiled ahead of time on {devices[0].platform} (XLA memory_analysis, GiB"
          + "".join(f"; {n}" for n in dict.fromkeys(notes)) + "):")
        for k, v in c.items():
            p(f"  {k:<48}{_gib(v)}")
        summary["compiled"] = c
        checked = c["total_bytes"]
    elif compile:
        p(f"(no ahead-of-time compile: the mesh needs {mesh.size} devices, this machine has {num_devices})")
    by = f"the {'compiled' if 'compiled' in summary else 'analytic'} estimate"
    if cut_total > checked:  # the cut at start holds more than the step: that is the peak to check
        checked, by = cut_total, "the cut at start (analytic)"
    limit, source = device_memory(cfg, topology)
    fits = None if limit is None else checked <= limit
    if limit is None:
        p(f"device memory {source}; fit not checked")
    else:
        p(f"device memory {limit / GiB:.2f} GiB ({source}): {'fits' if fits else 'does NOT fit'}, "
          f"{100 * checked / limit:.0f}% used by {by}")
    summary.update(extra or {})
    summary.update(device_memory=limit, fits=fits, seconds=round(time.perf_counter() - t0, 2))
    p("dry-run summary: " + json.dumps(summary))
    return summary


def max_seq_len_report(cfg: Config, entry: str, *, compile: bool = True, out=sys.stdout,
                       topology: topology_lib.Topology | None = None) -> dict:
    """`--max-seq-len`: search the longest data.seq_len that fits by the analytic estimate
    (`longest_seq_len`), print the dry-run table at that length (compiled too when the devices are
    here: the confirmation) and the line "longest data.seq_len that fits: N"."""
    p = lambda *a: print(*a, file=out)  # noqa: E731
    t = target(cfg, entry, topology)
    if t is None:  # tokens-only precompute: no length limit on the devices
        return report(cfg, entry, compile=compile, out=out, topology=topology)
    limit, source = device_memory(cfg, topology)
    if limit is None:
        raise DryRunError(f"--max-seq-len needs the device memory ({source})")
    t0 = time.perf_counter()
    best, cap = longest_seq_len(cfg, t, limit)
    kept = ("rows per device per micro-batch kept (train.global_batch_size, train.grad_accum)" if entry == "train"
            else "precompute.batch_tokens kept (rows = batch_tokens // length, at least 1 per device)")
    how = (f"searched multiples of 128 up to {cap} (max_position_embeddings) by the analytic "
           f"estimate, {kept}, in {time.perf_counter() - t0:.1f} s")
    if best is None:
        need, at = min((analytic_peak(estimate(with_seq_len(cfg, n), t)), n) for n in _doublings(128, cap))
        p(f"no data.seq_len fits: the least any tried length needs is {need / GiB:.2f} GiB per device ({at} "
          f"tokens) of {limit / GiB:.2f} ({source}); {how}")
        summary = dict(entry=entry, max_seq_len=None, fits=False)
        p("dry-run summary: " + json.dumps(summary))
        return summary
    summary = report(with_seq_len(cfg, best), entry, compile=compile, out=out,
                     extra=dict(max_seq_len=best, max_seq_len_cap=cap), topology=topology)
    confirmed = ("; the compiled step confirms it" if summary["fits"] and "compiled" in summary
                 else "; the compiled step does NOT fit: trust the compiler" if "compiled" in summary else "")
    p(f"longest data.seq_len that fits: {best}" + (" (the cap)" if best == cap else "") + f" ({how}{confirmed})")
    return summary


def main(cfg: Config, entry: str, *, compile: bool = True, max_seq_len: bool = False,
         topology: str | None = None) -> None:
    """The entry points' --dry-run (and --max-seq-len, --topology): exits 1 when the config does not
    fit its device memory (no length fits, or the compiled step at the length found does not)."""
    try:
        topo = topology_lib.parse(topology) if topology else None
        summary = (max_seq_len_report if max_seq_len else report)(cfg, entry, compile=compile, topology=topo)
    except (DryRunError, topology_lib.TopologyError) as e:
        raise SystemExit(f"error: {e}") from None
    if summary["fits"] is False:
        raise SystemExit(1)
