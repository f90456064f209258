"""The full train step: tokens/s, step time, MFU, compile time and memory, for one or more variants
(remat, scan, attention, loss chunk, dtype) alternated in one process.

Student: `--preset` (a Qwen2.5-shaped random model, see bench/presets.py) or the config's
`student` section. Batches: synthetic (bench/presets.synthetic_batch: packed rows, random top-K
teacher tensors; no store needed) unless the config names a `data.store` and no preset is given;
then real batches come from the Grain pipeline, and the pipeline's own tokens/s is measured in the
same run.

Variants share one set of parameters and optimizer state (a variant only changes how the step is
compiled, never the parameter tree), so they run side by side: each is compiled, warmed up, then
the timed steps go round robin, one step of each variant per round, each timed to
`block_until_ready`; the median is reported. A variant is a comma-separated list of
remat=POLICY, scan=true|false, attention=xla|cudnn, chunk=TOKENS (loss.chunk_size),
dtype=bfloat16|float32, accum=N (train.grad_accum), batch=ROWS, seq=TOKENS, docs=PER_ROW,
teacher=offline|online (default: the config's teacher.mode), hidden=GAMMA (loss.hidden.weight,
needs teacher=online; default: the config's for online variants, off offline), name=LABEL.
XLA flags are per process: compare them across two runs (kd_jax/bench/h100.sh does).

Online teacher: teacher=online runs the teacher's forward pass inside the step
(`losses.kd_loss_online`, full vocabulary unless loss.online_top_k); the teacher is a
`--teacher-preset` shape (random weights in teacher.param_dtype, bf16 by default) or the config's
`teacher` section, built once, sharded on the mesh and passed to every online variant. hidden=γ
adds hidden-state alignment (every student layer to the evenly spaced teacher layer, unless
loss.hidden.layers); when the widths differ its train state carries the [M, D_s, D_t]
projections, so such variants get their own state (a copy of the student's parameters), shared by
the variants of that structure. One run reports offline, online and online+hidden side by side:
  --teacher-preset medium --variant name=offline --variant name=online,teacher=online
  --variant name=online+hidden,teacher=online,hidden=0.5

MFU (kd_jax/models/flops.py): training FLOPs per token = 6·P + 3·A, P the matmul parameters (output
projection in, input embedding out), A attention's causal forward FLOPs; MFU = that × tokens/s /
(peak bf16 FLOP/s × devices), the student's alone; TFLOP/s adds an online teacher's forward 2·P + A. `mfu_palm` counts full (non-causal) attention, PaLM's 6P + 12·L·N·H·T.
Tokens are real (non-padding) tokens. Memory: XLA's accounting of the compiled step (temporaries,
arguments, outputs: any backend) and, on GPU, the allocator's peak (process-wide, so after the
first variant's warm-up it is that variant's own; later variants only raise it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import jax
from flax import nnx

from kd_jax.base import sharding
from kd_jax.base.loader import load_config
from kd_jax.bench.presets import architecture, synthetic_batch
from kd_jax.core.optim import default_hyper
from kd_jax.core.prepare import prepare
from kd_jax.core.state import abstract_train_state, init_train_state
from kd_jax.core.step import compile_steps, layer_pairs
from kd_jax.fit.dryrun import compiled_memory
from kd_jax.models import build_model, flops
from kd_jax.models.decoder import Decoder

VARIANT_KEYS = ("name", "remat", "scan", "attention", "chunk", "dtype", "accum", "batch", "seq", "docs", "teacher",
                "hidden")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="a train config (default: all defaults)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    parser.add_argument("--preset", default=None,
                        help="student shape: qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b, tiny, small, medium")
    parser.add_argument("--teacher-preset", default=None,
                        help="shape of the online teacher (teacher=online variants); default: the config's teacher")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (train.global_batch_size)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (data.seq_len)")
    parser.add_argument("--docs-per-row", type=int, default=1, help="packed documents per synthetic row")
    parser.add_argument("--attention", default="xla", choices=("xla", "cudnn"), help="base attention implementation")
    parser.add_argument("--variant", action="append", default=[], metavar="K=V,...",
                        help=f"a variant of the base step (repeatable); keys: {', '.join(VARIANT_KEYS)}")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (round robin)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant after compiling")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s per device, if unknown")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def parse_variant(spec: str) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in VARIANT_KEYS:
            raise SystemExit(f"variant item {item!r}: expected KEY=VALUE with KEY in {VARIANT_KEYS}")
        out[key] = value
    return out


def _config(args):
    overrides = list(args.overrides)
    if args.preset:
        overrides += ["student.init=random", f"student.architecture={json.dumps(architecture(args.preset))}"]
    if args.teacher_preset:
        overrides += ["teacher.init=random", f"teacher.architecture={json.dumps(architecture(args.teacher_preset))}"]
    if args.batch:
        overrides.append(f"train.global_batch_size={args.batch}")
    if args.seq_len:
        overrides.append(f"data.seq_len={args.seq_len}")
    return load_config(args.config, overrides)


@dataclasses.dataclass
class Variant:
    name: str
    model_cfg: object  # DecoderConfig
    loss_cfg: object  # LossConfig
    grad_accum: int
    batch: dict  # host arrays
    seq_len: int
    online: bool = False  # the teacher runs in the step
    align: tuple | None = None  # the [M, D_s, D_t] projections its train state needs, if any
    compiled: object = None
    compile_s: float = 0.0
    memory: dict = dataclasses.field(default_factory=dict)
    peak_bytes: int | None = None
    times: list = dataclasses.field(default_factory=list)
    device_batches: list = dataclasses.field(default_factory=list)
    error: str | None = None  # why the variant was not run


def _peak_bytes() -> int | None:
    return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def _build(cfg, mesh):
    """Student config, train-state spec and fresh state (without a store; with one, `prepare`)."""
    teacher = build_model(cfg.teacher, mesh=mesh) if cfg.student.init == "teacher_layers" else None
    student = build_model(cfg.student, mesh=mesh, seed=cfg.run.seed, teacher=teacher)
    del teacher
    spec = abstract_train_state(student.cfg, cfg.optim, max(cfg.train.steps, 1), mesh)
    return student.cfg, spec, init_train_state(student, spec)


def _state_like(cfg, mesh, model_cfg, spec, state, align):
    """(spec, train state) with the structure `align` asks for (projections or none): a copy of
    `state`'s student parameters (the step donates its state, so two states never share arrays),
    fresh optimizer state and projections."""
    student = nnx.merge(spec.graphdef, jax.tree.map(lambda x: x.copy(), state["params"]))
    new_spec = abstract_train_state(model_cfg, cfg.optim, max(cfg.train.steps, 1), mesh, align_shape=align)
    return new_spec, init_train_state(student, new_spec, seed=cfg.run.seed)


def _variants(args, cfg, base_model_cfg, store_batches, teacher_cfg):
    specs = [parse_variant(s) for s in args.variant] or [{}]
    variants = []
    for i, spec in enumerate(specs):
        if store_batches is not None and {"batch", "seq", "docs"} & spec.keys():
            raise SystemExit("batch=, seq= and docs= variants need synthetic batches (use --preset)")
        mode = spec.get("teacher", cfg.teacher.mode)
        if mode not in ("offline", "online"):
            raise SystemExit(f"variant teacher={mode}: offline or online")
        online = mode == "online"
        if "hidden" in spec and not online:
            raise SystemExit("hidden= (hidden-state alignment) needs teacher=online in the same variant")
        model_cfg = dataclasses.replace(
            base_model_cfg, remat=spec.get("remat", base_model_cfg.remat),
            scan_layers=spec.get("scan", str(base_model_cfg.scan_layers)).lower() == "true",
            attention=spec.get("attention", args.attention), dtype=spec.get("dtype", base_model_cfg.dtype))
        hidden = dataclasses.replace(cfg.loss.hidden, weight=float(spec.get("hidden", 0.0)))
        if online and "hidden" not in spec:  # the config's alignment, schedule included
            hidden = cfg.loss.hidden
        loss_cfg = dataclasses.replace(cfg.loss, chunk_size=int(spec.get("chunk", cfg.loss.chunk_size)), hidden=hidden)
        align = None
        if online and hidden.on:
            pairs = layer_pairs(hidden, model_cfg.num_layers, teacher_cfg.num_layers)
            if model_cfg.hidden_size != teacher_cfg.hidden_size:
                align = (len(pairs), model_cfg.hidden_size, teacher_cfg.hidden_size)
        B = int(spec.get("batch", cfg.train.global_batch_size))
        L = int(spec.get("seq", cfg.data.seq_len))
        if store_batches is None:
            batch = synthetic_batch(B, L, model_cfg.vocab_size, cfg.data.top_k, seed=cfg.run.seed,
                                    docs_per_row=int(spec.get("docs", args.docs_per_row)))
        else:
            batch = store_batches
        name = spec.get("name") or ",".join(f"{k}={v}" for k, v in spec.items()) or "base"
        variants.append(Variant(name, model_cfg, loss_cfg, int(spec.get("accum", cfg.train.grad_accum)), batch, L,
                                online, align))
    return variants


def _teacher(args, cfg, mesh, student_cfg, prepared):
    """The online teacher (built once, sharded, in teacher.param_dtype) when a variant needs one."""
    if not any(parse_variant(s).get("teacher", cfg.teacher.mode) == "online" for s in args.variant or [""]):
        return None
    teacher = prepared if prepared is not None else build_model(cfg.teacher, mesh=mesh, seed=cfg.run.seed)
    if teacher.cfg.vocab_size < student_cfg.vocab_size:
        raise SystemExit(f"the teacher has {teacher.cfg.vocab_size} output rows, fewer than the student's "
                         f"{student_cfg.vocab_size}: pick a --teacher-preset with the student's vocabulary")
    return teacher


def run(args) -> None:
    cfg = _config(args)
    mesh = sharding.mesh_from_config(cfg.mesh)
    use_store = bool(cfg.data.store) and not args.preset
    input_tps = None
    prepared_teacher = None
    if use_store:
        r = prepare(cfg)
        base_model_cfg, spec, state, prepared_teacher = r.student.cfg, r.spec, r.state, r.teacher
        host_batches = [next(r.data_iter) for _ in range(args.warmup + args.steps)]
        t0 = time.perf_counter()  # the input pipeline alone, over as many fresh batches
        input_tokens = sum(int((next(r.data_iter)["segment_ids"] > 0).sum()) for _ in range(args.steps))
        input_tps = input_tokens / (time.perf_counter() - t0)
    else:
        base_model_cfg, spec, state = _build(cfg, mesh)
        host_batches = None
    teacher = _teacher(args, cfg, mesh, base_model_cfg, prepared_teacher)
    teacher_cfg = teacher.cfg if teacher is not None else None
    teacher_params = nnx.state(teacher) if teacher is not None else None
    variants = _variants(args, cfg, base_model_cfg, host_batches, teacher_cfg)
    # One train state per structure (with or without alignment projections), shared by its variants.
    base_align = tuple(spec.abstract["align"]["proj"].shape) if "align" in spec.abstract else None
    specs, states = {base_align: spec}, {base_align: state}
    for align in dict.fromkeys(v.align for v in variants):
        if align not in states:
            specs[align], states[align] = _state_like(cfg, mesh, base_model_cfg, spec, state, align)
    to_device = lambda b: sharding.shard_batch(b, mesh)  # noqa: E731
    metrics = None
    # A variant's structure (no values, no mesh: the logical names need no axes to be recorded).
    graphdefs = [nnx.graphdef(nnx.eval_shape(lambda: Decoder(v.model_cfg, rngs=nnx.Rngs(0)))) for v in variants]
    with jax.set_mesh(mesh):
        for v, graphdef in zip(variants, graphdefs):
            pairs = layer_pairs(v.loss_cfg.hidden, v.model_cfg.num_layers, teacher_cfg.num_layers) if v.online else ()
            steps = compile_steps(dataclasses.replace(specs[v.align], graphdef=graphdef), v.loss_cfg, v.grad_accum,
                                  mesh, teacher=nnx.graphdef(teacher) if v.online else None, pairs=pairs)
            v.device_batches = [to_device(b) for b in (v.batch if isinstance(v.batch, list) else [v.batch])]
            t_params = teacher_params if v.online else None
            state = states[v.align]
            t0 = time.perf_counter()
            try:
                hyper = default_hyper(v.loss_cfg)
                v.compiled = steps.train.lower(state, v.device_batches[0], hyper, t_params).compile()
            except Exception as e:  # noqa: BLE001 — e.g. cuDNN refusing a shape, or out of memory
                v.error = f"compile: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
                print(f"skipped {v.name}: {v.error}", flush=True)
                continue
            v.compile_s = time.perf_counter() - t0
            v.memory = compiled_memory(v.compiled)
            limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
            if limit and v.memory.get("total_bytes", 0) > limit:
                # Running it would fail mid-step, after params and optimizer state were donated.
                v.error = f"needs {v.memory['total_bytes'] / 2**30:.1f} GiB, the device has {limit / 2**30:.1f}"
                print(f"skipped {v.name}: {v.error}", flush=True)
                v.compiled = None
                continue
            for i in range(args.warmup):
                state, metrics = v.compiled(state, v.device_batches[i % len(v.device_batches)], hyper, t_params)
                jax.block_until_ready(metrics)
            states[v.align] = state
            v.peak_bytes = _peak_bytes()
            print(f"compiled {v.name}: {v.compile_s:.1f} s", flush=True)
        runnable = [v for v in variants if v.compiled is not None]
        for i in range(args.steps):  # round robin: drift (clocks, other load) hits every variant alike
            for v in runnable:
                b = v.device_batches[(args.warmup + i) % len(v.device_batches)]
                t_params = teacher_params if v.online else None
                t0 = time.perf_counter()
                states[v.align], metrics = v.compiled(states[v.align], b, default_hyper(v.loss_cfg), t_params)
                jax.block_until_ready(metrics)
                v.times.append(time.perf_counter() - t0)
    if metrics is None:
        raise SystemExit("no variant could be compiled and run; see the messages above")
    final_loss = float(metrics["loss"])
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    device = jax.devices()[0]
    header = dict(benchmark="step", device=device.device_kind, platform=device.platform, devices=jax.device_count(),
                  jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""), preset=args.preset,
                  config=args.config, overrides=args.overrides, params=int(sum(x.size for x in jax.tree.leaves(spec.abstract["params"]))),
                  teacher_preset=args.teacher_preset,
                  teacher_params=None if teacher is None else int(sum(x.size for x in jax.tree.leaves(teacher_params))),
                  teacher_param_dtype=None if teacher is None else teacher_cfg.param_dtype,
                  matmul_params=flops.matmul_params(base_model_cfg), store=cfg.data.store if use_store else None,
                  top_k=cfg.data.top_k, input_tokens_per_s=input_tps, final_loss=final_loss,
                  peak_flops=peak or flops.peak_flops())
    rows = []
    for v in variants:
        if v.error:
            rows.append(dict(name=v.name, error=v.error, **v.memory))
            continue
        step_s = statistics.median(v.times)
        batches = v.batch if isinstance(v.batch, list) else [v.batch]
        real = statistics.mean(int((b["segment_ids"] > 0).sum()) for b in batches)
        total = batches[0]["segment_ids"].size
        tps = real / step_s
        per_token = flops.train_flops_per_token(v.model_cfg, v.seq_len)
        teacher_per_token = flops.forward_flops_per_token(teacher_cfg, v.seq_len) if v.online else 0
        rows.append(dict(
            name=v.name, remat=v.model_cfg.remat, scan_layers=v.model_cfg.scan_layers, attention=v.model_cfg.attention,
            dtype=v.model_cfg.dtype, chunk_size=v.loss_cfg.chunk_size, grad_accum=v.grad_accum,
            teacher="online" if v.online else "offline", hidden_weight=v.loss_cfg.hidden.weight,
            align_shape=list(v.align) if v.align else None,
            batch=int(batches[0]["segment_ids"].shape[0]), seq_len=v.seq_len, step_ms=step_s * 1e3,
            times_ms=[t * 1e3 for t in v.times], compile_s=v.compile_s, tokens_per_s=tps,
            us_per_token=1e6 / tps, padded_tokens_per_s=total / step_s, train_flops_per_token=per_token,
            teacher_flops_per_token=teacher_per_token,
            model_tflops_per_s=(per_token + teacher_per_token) * tps / 1e12,
            mfu=flops.mfu(v.model_cfg, v.seq_len, tps, peak=peak),
            mfu_palm=flops.mfu(v.model_cfg, v.seq_len, tps, causal=False, peak=peak),
            peak_bytes_in_use=v.peak_bytes, **v.memory))
    keys = ("device", "devices", "jax", "preset", "params", "top_k", "xla_flags")
    keys += ("teacher_preset", "teacher_params", "teacher_param_dtype") if teacher is not None else ()
    print(" ".join(f"{k}={header[k]}" for k in keys))
    print(format_table(rows))
    if input_tps is not None and "error" not in rows[0]:
        print(f"input pipeline alone: {input_tps:,.0f} tokens/s "
              f"({input_tps / rows[0]['tokens_per_s']:,.1f}x the step's {rows[0]['tokens_per_s']:,.0f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(header, variants=rows), f, indent=2)


def _gib(n):
    return "-" if n is None else f"{n / 2**30:,.2f}"


def _mib(n):
    return "-" if n is None else f"{n / 2**20:,.1f}"


def format_table(rows) -> str:
    table = [("variant", "B x L", "step ms", "tokens/s", "us/token", "MFU", "MFU(PaLM)", "TFLOP/s", "compile s",
              "XLA temp MiB", "XLA arg MiB", "XLA total MiB", "peak GiB")]
    for r in rows:
        memory = tuple(_mib(r.get(k)) for k in ("temp_bytes", "argument_bytes", "total_bytes"))
        if "error" in r:
            table.append((r["name"], "-", "-", "-", "-", "-", "-", "-", "-", *memory, r["error"][:60]))
            continue
        pct = lambda x: "-" if x is None else f"{x:.1%}"  # noqa: E731
        table.append((r["name"], f"{r['batch']}x{r['seq_len']}", f"{r['step_ms']:,.1f}", f"{r['tokens_per_s']:,.0f}",
                      f"{r['us_per_token']:,.1f}", pct(r["mfu"]), pct(r["mfu_palm"]), f"{r['model_tflops_per_s']:,.3f}",
                      f"{r['compile_s']:.1f}", *memory, _gib(r.get("peak_bytes_in_use"))))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table)
