"""The run configuration's schema: typed, frozen dataclasses that mirror the YAML file, each field
with its default and a one-line comment, and the checks of each section.

A run is described by one YAML file (`--config`) plus dotted command-line overrides
(`train.steps=10 loss.temperature=2`); kd_jax/base/loader.py reads those into a `Config`, and
`python -m kd_jax.config --reference` prints every key of it (docs/config.md).
"""

from __future__ import annotations

import dataclasses
import os

from kd_jax.base.errors import KDJaxError


class ConfigError(KDJaxError, ValueError):
    """A config file or override that does not fit the schema below."""


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; use one of {', '.join(map(repr, allowed))}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


DTYPES = ("float32", "bfloat16", "float16")
# Names of the per-layer activation checkpointing policies (kd_jax.models.decoder maps them to jax's).
REMAT_POLICIES = ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "offload_dots")
# Dot-product attention implementations of the decoder (kd_jax.models.attention): "auto" (splash on TPU,
# cudnn on GPU, xla on CPU), "xla" (dense reference), "blockwise" (flash attention in pure JAX, any
# backend), "splash" (TPU Pallas kernels), "cudnn" (GPU flash attention).
ATTENTION = ("auto", "xla", "blockwise", "splash", "cudnn")
PLATFORMS = ("tpu", "gpu", "cpu")  # device platforms the dry run can size for (mesh.platform)
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")  # soft-loss divergences (kd_jax.core.losses)
TEACHER_MODES = ("offline", "online")  # where the teacher's distribution comes from: the KD store, or the train step
TARGETS = ("topk", "sampled")  # teacher targets per position: its K most likely ids, or K draws (kd_jax.core.losses)
SCHEDULES = ("constant", "linear", "cosine")  # shapes of a loss weight's path over training (kd_jax.core.optim)
HIDDEN_DISTANCES = ("mse", "cosine")  # intermediate-layer alignment distances (kd_jax.core.losses)
KEEP = ("all", "correct", "first_correct", "shortest_correct")  # which teacher samples become traces (kd_jax.core.tracegen)
# URL schemes a KD store (data.store) can live at: TensorStore kvstores kd_jax reads and writes (a plain path is
# file://). TensorStore's s3:// and http(s):// (read-only) are not among them: untested here, they wait on the network.
STORE_SCHEMES = ("file", "gs", "memory")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str = "kd"  # run name; the run directory is output_dir/name
    output_dir: str = "runs"  # parent folder of all run directories
    seed: int = 0  # seed for random parameter init, data order and sampling
    log_every: int = 10  # steps between metric logs
    tensorboard: bool = True  # also write TensorBoard event files into the run directory

    def __post_init__(self):
        # run_dir = output_dir/name is written to (config, logs, checkpoints): it must stay inside output_dir.
        name = os.path.normpath(self.name) if self.name else ""
        _check(
            name not in ("", ".") and not os.path.isabs(name) and name.split(os.sep)[0] != "..",
            f"name={self.name!r} must be a plain folder name inside output_dir (e.g. 'kd' or 'exp/a'): "
            f"not empty, not absolute, no '..' leading out of it",
        )
        _check(self.seed >= 0, f"seed={self.seed} must be >= 0")
        _check(self.log_every >= 1, f"log_every={self.log_every} must be >= 1 (steps between logs)")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # data-parallel axis size in devices; -1 = the remaining devices
    fsdp: int = 1  # fully-sharded (parameter-sharding) axis size in devices; -1 = the remaining devices
    tensor: int = 1  # tensor-parallel axis size in devices; -1 = the remaining devices
    device_memory_gib: float | None = None  # memory of one device (GiB) that --dry-run checks against; None = the local device's
    platform: str | None = None  # "tpu", "gpu" or "cpu": the devices --dry-run sizes for (resolves attention "auto"); None = this machine's

    def __post_init__(self):
        sizes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name not in ("device_memory_gib", "platform")}
        for axis, size in sizes.items():
            _check(size == -1 or size >= 1, f"{axis}={size} must be a device count >= 1 or -1 (the remaining devices)")
        # Only one axis can absorb "the rest", otherwise the split is ambiguous.
        wild = [axis for axis, size in sizes.items() if size == -1]
        _check(len(wild) <= 1, f"axes {', '.join(wild)} are all -1; at most one may be -1, set the others to device counts")
        memory = self.device_memory_gib
        _check(memory is None or memory > 0, f"device_memory_gib={memory} must be > 0 (GiB) or null")
        if self.platform is not None:
            _check_choice("platform", self.platform, PLATFORMS)


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model comes from and how it runs: the fields student and teacher share."""
    hf_path: str | None = None  # local Hugging Face folder or hub id to load config/weights/tokenizer from
    revision: str | None = None  # hub revision (branch, tag or commit) for hf_path; None = default branch
    init: str = "hf"  # weight init: "hf" (load hf_path) or "random" (the student also: "teacher_layers", "pruned")
    architecture: dict | None = None  # HF config.json-style dict for init=random, e.g. {"model_type": "llama", ...}
    param_dtype: str = "float32"  # dtype the parameters are stored in
    dtype: str = "bfloat16"  # compute dtype of activations and matmuls
    scan_layers: bool = True  # scan over stacked layers (one compiled layer instead of N)
    remat: str = "nothing_saveable"  # activation rematerialization policy per layer
    attention: str = "auto"  # dot-product attention: auto, xla, blockwise, splash (TPU) or cudnn (GPU); see ATTENTION

    INITS = ("hf", "random")

    def __post_init__(self):
        _check_choice("init", self.init, self.INITS)
        _check_choice("param_dtype", self.param_dtype, DTYPES)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("remat", self.remat, REMAT_POLICIES)
        _check_choice("attention", self.attention, ATTENTION)

    def decoder_options(self) -> dict:
        """The DecoderConfig fields this section sets (the rest come from the model's config.json)."""
        return dict(param_dtype=self.param_dtype, dtype=self.dtype, scan_layers=self.scan_layers, remat=self.remat,
                    attention=self.attention)


DEPTH_METRICS = ("block_influence", "layer_loss")  # how init=pruned ranks layers (kd_jax.models.prune)


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    layers: int | None = None  # decoder layers to keep (the least important dropped); null = all the teacher's
    intermediate_size: int | None = None  # MLP channels to keep per layer (by the mean absolute value of silu(gate) * up); null = the teacher's
    num_key_value_heads: int | None = None  # KV groups to keep per layer, each with its query heads (by mean head-output norm); null = the teacher's
    hidden_size: int | None = None  # hidden (embedding) channels to keep (by the mean absolute RMSNorm output); null = the teacher's
    depth_metric: str = "block_influence"  # rank layers by "block_influence" (1 - cos(in, out)) or "layer_loss" (LM-loss increase when skipped: one forward per layer)
    calibration_tokens: int = 65536  # tokens of the store's training split the importance is measured on
    calibration_batch_size: int = 8  # rows of data.seq_len tokens per calibration forward

    def __post_init__(self):
        for name in ("layers", "intermediate_size", "num_key_value_heads", "hidden_size"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"{name}={value} must be >= 1 (units to keep) or null (keep all)")
        _check_choice("depth_metric", self.depth_metric, DEPTH_METRICS)
        _check(self.calibration_tokens >= 1, f"calibration_tokens={self.calibration_tokens} must be >= 1")
        # Block Influence scores a layer on one token; the LM loss needs a next-token pair in a sequence.
        _check(self.depth_metric != "layer_loss" or self.calibration_tokens >= 2,
               f"depth_metric=layer_loss with calibration_tokens={self.calibration_tokens}: the LM loss needs at "
               f"least one next-token pair, so calibration_tokens >= 2 (or depth_metric=block_influence)")
        _check(self.calibration_batch_size >= 1, f"calibration_batch_size={self.calibration_batch_size} must be >= 1")

    @property
    def targets(self) -> dict:
        return {"layers": self.layers, "intermediate_size": self.intermediate_size,
                "num_kv_heads": self.num_key_value_heads, "hidden_size": self.hidden_size}


@dataclasses.dataclass(frozen=True)
class StudentSource(ModelSource):
    teacher_layers: list[int] | None = None  # teacher layer indices to keep when init=teacher_layers
    prune: PruneConfig = dataclasses.field(default_factory=PruneConfig)  # init=pruned: the sizes cut from the teacher by measured importance (Minitron)

    INITS = ("hf", "random", "teacher_layers", "pruned")

    def __post_init__(self):
        super().__post_init__()
        layers = self.teacher_layers or []
        _check(all(i >= 0 for i in layers), f"teacher_layers={layers} must be layer indices >= 0")
        set_ = [f"prune.{k}" for k in ("layers", "intermediate_size", "num_key_value_heads", "hidden_size")
                if getattr(self.prune, k) is not None]
        _check(self.init == "pruned" or not set_,
               f"prune sets {', '.join(set_)} but init={self.init!r}; set init=pruned to cut the student from the "
               f"teacher, or drop the prune targets")


@dataclasses.dataclass(frozen=True)
class TeacherSource(ModelSource):
    param_dtype: str = "bfloat16"  # the teacher only runs forward: bfloat16 storage by default
    mode: str = "offline"  # "offline": its top-K from the KD store; "online": run in the train step (full vocabulary)

    def __post_init__(self):
        super().__post_init__()
        _check_choice("mode", self.mode, TEACHER_MODES)


@dataclasses.dataclass(frozen=True)
class TraceFormat:
    kind: str = "r1"  # trace layout: "r1" (prompt/reasoning/answer fields), "messages" (role/content chat list), "sharegpt" (from/value chat list) or "text" (plain documents, every token supervised)
    prompt_field: str = "prompt"  # field holding the prompt (kind=r1)
    reasoning_field: str = "reasoning"  # field holding the reasoning trace (kind=r1)
    answer_field: str = "answer"  # field holding the final answer (kind=r1)
    messages_field: str = "messages"  # field holding the chat messages (kind=messages)
    conversations_field: str = "conversations"  # field holding the from/value turns (kind=sharegpt)
    text_field: str = "text"  # field holding the document (kind=text: no chat template, BOS as the tokenizer adds it, EOS appended)
    think_open: str = "<think>"  # tag opening the reasoning in the traces as read, e.g. "<|begin_of_thought|>"
    think_close: str = "</think>"  # tag closing the reasoning in the traces as read, e.g. "<|end_of_thought|>"
    answer_open: str = ""  # tag stripped from the start of the answer, e.g. "<|begin_of_solution|>"; "" = none
    answer_close: str = ""  # tag stripped from the end of the answer, e.g. "<|end_of_solution|>"; "" = none

    def __post_init__(self):
        _check_choice("kind", self.kind, ("r1", "messages", "sharegpt", "text"))
        _check(bool(self.think_open) and bool(self.think_close),
               f"think_open={self.think_open!r} / think_close={self.think_close!r} must both be set (the tags "
               f"around the reasoning in the traces, default <think> / </think>)")


@dataclasses.dataclass(frozen=True)
class StepsConfig:
    separator: str = "\n\n"  # text that splits the reasoning into steps
    weights_field: str | None = "step_weights"  # trace field with one weight per reasoning step (list of floats >= 0); a trace without it weighs every step 1; None = never read
    scorer: str | None = None  # "module.path:function" (step_text, step_index, trace_row) -> weight >= 0 of each step of the traces without weights_field; None = weight 1

    def __post_init__(self):
        _check(self.weights_field != "", "weights_field='' names no field; use null to never read one")
        _check(self.scorer is None or ":" in self.scorer,
               f"scorer={self.scorer!r} must be 'module.path:function' or null")


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    min_reasoning_tokens: int = 0  # drop examples whose reasoning is shorter than this (tokens)
    max_reasoning_tokens: int | None = None  # drop traces whose reasoning is longer than this (tokens); None = no limit
    overlong: str = "drop"  # what to do with examples longer than data.seq_len: "drop" or "truncate"

    def __post_init__(self):
        _check_choice("overlong", self.overlong, ("drop", "truncate"))
        low, high = self.min_reasoning_tokens, self.max_reasoning_tokens
        _check(low >= 0, f"min_reasoning_tokens={low} must be >= 0 (0 = no minimum)")
        _check(high is None or high >= max(low, 1),
               f"max_reasoning_tokens={high} must be null (no limit) or >= 1 and >= min_reasoning_tokens={low}")


@dataclasses.dataclass(frozen=True)
class CurriculumConfig:
    fraction: float = 0.0  # first fraction of training steps fed easiest-first; 0 = plain shuffle
    difficulty_field: str | None = None  # trace field that orders the curriculum (stored by precompute), e.g. "pass_rate"; None = reasoning tokens per trace
    easy: str = "high"  # which end of difficulty_field is easy: "high" (a pass rate, an accuracy) or "low" (a level)
    stages: int = 0  # 0 = the curriculum strictly easiest first; N = N stages of increasing difficulty, each shuffled within

    def __post_init__(self):
        _check(0.0 <= self.fraction <= 1.0, f"fraction={self.fraction} must be in [0, 1]")
        _check_choice("easy", self.easy, ("high", "low"))
        _check(self.stages >= 0, f"stages={self.stages} must be >= 0 (0 = strictly easiest first; N = N stages, "
                                 f"each shuffled)")
        _check(self.difficulty_field != "", "difficulty_field='' names no field; use null for the reasoning length")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    traces: str | None = None  # teacher traces: JSONL/Parquet file, folder of them, or hub dataset id
    tokenizer: str | None = None  # HF tokenizer folder or hub id; None = the teacher's (teacher.hf_path)
    store: str | None = None  # KD store (folder or TensorStore kvstore URL) written by kd_jax.precompute
    allow_incomplete: bool = False  # train on the finished part of an incomplete KD store instead of failing
    top_k: int = 64  # teacher logits kept per token (count); 0 = tokens only, no teacher (needs loss.alpha=0)
    seq_len: int = 2048  # packed sequence length in tokens
    eval_fraction: float = 0.02  # fraction of examples held out for evaluation
    packing: str = "first_fit"  # sequence packing: "first_fit" or "best_fit"
    num_workers: int = 0  # data loader worker processes; 0 = load in the main process
    streams: int = 0  # example streams packed apart, side by side in a batch; 0 = one per process (fix: same batches at any process count)
    shuffle_seed: int = 0  # seed of the example shuffle
    format: TraceFormat = dataclasses.field(default_factory=TraceFormat)  # how the traces are laid out
    steps: StepsConfig = dataclasses.field(default_factory=StepsConfig)  # reasoning steps and their weights
    filter: FilterConfig = dataclasses.field(default_factory=FilterConfig)  # which examples are kept
    curriculum: CurriculumConfig = dataclasses.field(default_factory=CurriculumConfig)  # easiest-first ordering

    def __post_init__(self):
        _check_choice("packing", self.packing, ("first_fit", "best_fit"))
        _check(self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 = a tokens-only store, no teacher)")
        _check(self.seq_len >= 1, f"seq_len={self.seq_len} must be >= 1 token")
        _check(0.0 <= self.eval_fraction < 1.0, f"eval_fraction={self.eval_fraction} must be in [0, 1)")
        _check(self.streams >= 0, f"streams={self.streams} must be >= 0 (0 = one stream per process)")
        _check(self.num_workers >= 0, f"num_workers={self.num_workers} must be >= 0 (0 = the main process)")
        _check(self.shuffle_seed >= 0, f"shuffle_seed={self.shuffle_seed} must be >= 0")
        scheme = self.store.split("://", 1)[0] if self.store and "://" in self.store else None
        _check(scheme is None or scheme in STORE_SCHEMES,
               f"store={self.store!r}: a KD store is a local folder, file://, gs:// or memory:// URL; {scheme}:// is "
               f"not supported (TensorStore's http is read-only, s3 is untested here): copy the store to a local "
               f"folder or a gs:// bucket")


@dataclasses.dataclass(frozen=True)
class PrecomputeConfig:
    batch_tokens: int = 65536  # tokens (padding included) per teacher batch; rows per batch = batch_tokens // length
    bucket: int = 128  # sequences are right-padded to a multiple of this (one compile per padded length)
    logits_chunk: int = 512  # positions per slice of teacher logits (bounds the [rows, chunk, vocab] buffer)
    chunk_tokens: int = 65536  # store chunk length on the token axis: the unit of writing and of resuming
    window_chunks: int = 8  # chunks computed and written together; host memory ~ window * chunk * 6 * top_k bytes
    logprob_dtype: str = "float16"  # stored teacher log-prob dtype: float16 or bfloat16
    import_logprobs: str | None = None  # a served teacher's prompt log-probs (JSONL/Parquet file or folder, launch/vllm_prompt_logprobs.py) instead of running the teacher; null = run it
    targets: str = "topk"  # stored teacher rows: "topk" (its data.top_k most likely ids, biased) or "sampled" (data.top_k draws from softmax(logits / sample_temperature), unique ids with count/N: unbiased)
    sample_temperature: float = 1.0  # targets=sampled: teacher temperature of the draws; training needs loss.temperature equal to it
    sample_seed: int = 0  # targets=sampled: seed of the draws; token j of sequence s is drawn with fold_in(fold_in(key(seed), s), j)

    def __post_init__(self):
        _check_choice("logprob_dtype", self.logprob_dtype, ("float16", "bfloat16"))
        _check_choice("targets", self.targets, TARGETS)
        _check(self.sample_temperature > 0.0, f"sample_temperature={self.sample_temperature} must be > 0")
        for name in ("batch_tokens", "bucket", "logits_chunk", "chunk_tokens", "window_chunks"):
            _check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "constant"  # "constant", "linear" or "cosine": from the section's value at step 0 to `end` at train.steps
    end: float | None = None  # value at the last step (linear, cosine); None = no change

    def __post_init__(self):
        _check_choice("kind", self.kind, SCHEDULES)
        _check(self.kind == "constant" or self.end is not None,
               f"kind={self.kind!r} needs end: the value at the last step (or kind='constant')")
        _check(self.kind != "constant" or self.end is None,
               f"end={self.end} is ignored by kind='constant' (the value never moves); set kind=linear or cosine "
               f"to move to it, or drop end")


@dataclasses.dataclass(frozen=True)
class HiddenConfig:
    weight: float = 0.0  # γ: weight of the intermediate-layer alignment loss; 0 = off (needs teacher.mode=online)
    weight_schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)  # γ over training
    layers: dict | None = None  # {student layer: teacher layer}; None = every student layer, evenly spaced, last to last
    distance: str = "mse"  # "mse" (mean squared error per dimension) or "cosine" (1 - cosine similarity)

    def __post_init__(self):
        _check(self.weight >= 0.0, f"weight={self.weight} must be >= 0 (0 = no hidden alignment)")
        end = self.weight_schedule.end
        _check(end is None or end >= 0.0, f"weight_schedule.end={end} must be >= 0 (a loss weight; 0 = alignment "
                                          f"off by the last step)")
        _check_choice("distance", self.distance, HIDDEN_DISTANCES)
        pairs = self.layers or {}
        _check(all(isinstance(k, int) and isinstance(v, int) and k >= 0 and v >= 0 for k, v in pairs.items()),
               f"layers={self.layers!r} must map student layer indices to teacher layer indices (ints >= 0), "
               f"e.g. {{5: 13, 11: 27}}")
        _check(self.layers is None or bool(self.layers), "layers={} maps no layer; use null for the default map")

    def __hash__(self):  # `layers` is a dict; the loss config is a static (hashed) argument of the step
        return hash((self.weight, self.weight_schedule, tuple(sorted((self.layers or {}).items())), self.distance))

    @property
    def on(self) -> bool:
        return self.weight > 0 or bool(self.weight_schedule.end)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    alpha: float = 0.5  # weight of the soft (distillation) loss; the hard (label) loss gets 1 - alpha
    beta: float = 0.0  # weight of the per-reasoning-step loss added on top
    temperature: float = 1.0  # softmax temperature of teacher and student in the soft loss (eval.sampling_temperature is generation's)
    divergence: str = "forward_kl"  # soft loss: "forward_kl", "reverse_kl" or "jsd"
    jsd_beta: float = 0.5  # mixture weight of the generalized JSD (divergence=jsd)
    tail: bool = False  # add the probability mass outside the teacher top-k as one extra bucket
    step_weight: float = 1.0  # weight w_s of each reasoning step in the step loss
    answer_weight: float = 1.0  # weight w_s of each answer in the step loss
    chunk_size: int = 512  # tokens per chunk of the fused loss, global over devices (bounds its [chunk, vocab] memory)
    online_top_k: int = 0  # teacher.mode=online: 0 = divergence over the full vocabulary; K = over the teacher's top-K only
    online_sampled: int = 0  # teacher.mode=online: N > 0 = forward KL to N draws per position from the in-step teacher at the loss temperature (unbiased, as precompute.targets=sampled); 0 = off
    alpha_schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)  # alpha over training
    temperature_schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)  # temperature over training
    hidden: HiddenConfig = dataclasses.field(default_factory=HiddenConfig)  # intermediate-layer alignment (online teacher)

    def __post_init__(self):
        _check_choice("divergence", self.divergence, DIVERGENCES)
        _check(self.online_top_k >= 0, f"online_top_k={self.online_top_k} must be >= 0 (0 = the full vocabulary)")
        _check(self.online_sampled >= 0, f"online_sampled={self.online_sampled} must be >= 0 (0 = off)")
        _check(not (self.online_top_k and self.online_sampled),
               f"online_top_k={self.online_top_k} and online_sampled={self.online_sampled} are both set; choose the "
               f"teacher's top-K or draws from it (set the other to 0)")
        _check(not self.online_sampled or (self.divergence == "forward_kl" and not self.tail),
               f"online_sampled={self.online_sampled} takes divergence=forward_kl without tail (got divergence="
               f"{self.divergence!r}, tail={self.tail}): only the cross-entropy to the draws is unbiased")
        end = self.alpha_schedule.end
        _check(end is None or 0.0 <= end <= 1.0, f"alpha_schedule.end={end} must be in [0, 1]")
        end = self.temperature_schedule.end
        _check(end is None or end > 0.0, f"temperature_schedule.end={end} must be > 0")
        _check(0.0 <= self.alpha <= 1.0, f"alpha={self.alpha} must be in [0, 1]")
        _check(self.temperature > 0.0, f"temperature={self.temperature} must be > 0")
        _check(0.0 <= self.jsd_beta <= 1.0, f"jsd_beta={self.jsd_beta} must be in [0, 1]")
        _check(self.chunk_size >= 1, f"chunk_size={self.chunk_size} must be >= 1 token")
        for name in ("beta", "step_weight", "answer_weight"):
            _check(getattr(self, name) >= 0.0, f"{name}={getattr(self, name)} must be >= 0 (a loss weight)")

    @property
    def soft(self) -> bool:
        """Whether the soft (teacher) term is ever on: alpha > 0 at the start, or scheduled to end above 0."""
        return self.alpha > 0 or bool(self.alpha_schedule.end)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4  # peak learning rate
    schedule: str = "cosine"  # decay after warmup: "cosine", "linear" or "constant"
    warmup_steps: int = 100  # linear warmup length in steps
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.95  # Adam second-moment decay
    eps: float = 1e-8  # Adam denominator epsilon
    clip_norm: float = 1.0  # global gradient-norm clip; 0 disables clipping

    def __post_init__(self):
        _check_choice("schedule", self.schedule, ("cosine", "linear", "constant"))
        _check(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _check(self.clip_norm >= 0.0, f"clip_norm={self.clip_norm} must be >= 0 (0 disables clipping)")
        _check(self.lr > 0.0, f"lr={self.lr} must be > 0")
        _check(self.weight_decay >= 0.0, f"weight_decay={self.weight_decay} must be >= 0 (0 = none)")
        for name in ("b1", "b2"):
            _check(0.0 <= getattr(self, name) < 1.0, f"{name}={getattr(self, name)} must be in [0, 1)")
        _check(self.eps > 0.0, f"eps={self.eps} must be > 0")


SOURCES = ("student", "teacher")  # who writes the completions of on-policy steps (kd_jax.core.onpolicy)


@dataclasses.dataclass(frozen=True)
class OnPolicyConfig:
    fraction: float = 0.0  # λ: share of optimizer steps trained on sampled completions (step s is one when floor((s+1)λ) > floor(sλ)); 0 = off
    source: str = "student"  # who samples: "student" (on-policy distillation, GKD) or "teacher" (sequence-level KD)
    divergence: str = "reverse_kl"  # soft loss on sampled steps: "reverse_kl" (mode-seeking), "forward_kl" or "jsd" (loss.jsd_beta)
    alpha: float = 1.0  # weight of the soft loss on sampled steps; 1 - alpha goes to cross-entropy on the sampled tokens
    temperature: float = 1.0  # sampling temperature (> 0); loss.temperature stays the KD loss's
    top_p: float = 1.0  # nucleus sampling mass; 1 = off
    max_new_tokens: int = 256  # completion length limit (tokens); the prompt plus this must fit data.seq_len
    prompts_per_step: int = 0  # prompts sampled per on-policy step (one completion each), packed into the batch; 0 = train.global_batch_size
    bucket: int = 64  # prompts are left-padded to a multiple of this (one sampling compile per bucket)
    seed: int = 0  # seed of the sampling keys and of the prompt order
    prompts: str | None = None  # prompt-only dataset to sample from, a file, folder or hub id like data.traces; None = the traces' prompts
    prompts_field: str = "prompt"  # field of prompts holding the prompt: text, or a list of role/content turns

    def __post_init__(self):
        _check(0.0 <= self.fraction <= 1.0, f"fraction={self.fraction} must be in [0, 1] (0 = off, 1 = every step)")
        _check_choice("source", self.source, SOURCES)
        _check_choice("divergence", self.divergence, DIVERGENCES)
        _check(0.0 <= self.alpha <= 1.0, f"alpha={self.alpha} must be in [0, 1]")
        _check(self.temperature > 0.0, f"temperature={self.temperature} must be > 0 (sampling; greedy completions "
                                       f"would be one per prompt)")
        _check(0.0 < self.top_p <= 1.0, f"top_p={self.top_p} must be in (0, 1]")
        _check(self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be >= 1 token")
        _check(self.prompts_per_step >= 0, f"prompts_per_step={self.prompts_per_step} must be >= 0 "
                                           f"(0 = train.global_batch_size)")
        _check(self.bucket >= 1, f"bucket={self.bucket} must be >= 1 token")

    @property
    def on(self) -> bool:
        return self.fraction > 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps to train for
    global_batch_size: int = 8  # packed sequences per optimizer step, across all devices
    grad_accum: int = 1  # micro-batches accumulated per optimizer step
    eval_every: int = 200  # steps between evaluations; 0 disables
    max_nonfinite: int = 10  # consecutive non-finite-loss steps (skipped) before training stops
    on_policy: OnPolicyConfig = dataclasses.field(default_factory=OnPolicyConfig)  # completions sampled in the loop, graded by the online teacher

    def __post_init__(self):
        _check(self.steps >= 0, f"steps={self.steps} must be >= 0")
        _check(self.grad_accum >= 1, f"grad_accum={self.grad_accum} must be >= 1")
        # Each micro-batch must hold a whole number of sequences.
        _check(
            self.global_batch_size >= 1 and self.global_batch_size % self.grad_accum == 0,
            f"global_batch_size={self.global_batch_size} must be a positive multiple of grad_accum={self.grad_accum}",
        )
        _check(self.eval_every >= 0, f"eval_every={self.eval_every} must be >= 0 (0 disables evaluation)")
        # 0 would stop a healthy run at its first step.
        _check(self.max_nonfinite >= 1, f"max_nonfinite={self.max_nonfinite} must be >= 1")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    dir: str | None = None  # checkpoint folder (local or gs://); None = <run_dir>/checkpoints
    every_steps: int = 500  # steps between checkpoints
    max_to_keep: int = 3  # most recent checkpoints kept on disk
    async_save: bool = True  # write checkpoints in the background while training continues
    resume: bool = True  # resume from the latest checkpoint in dir if there is one

    def __post_init__(self):
        _check(self.every_steps >= 1, f"every_steps={self.every_steps} must be >= 1")
        _check(self.max_to_keep >= 1, f"max_to_keep={self.max_to_keep} must be >= 1")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    batches: int = 8  # held-out batches per evaluation
    max_new_tokens: int = 256  # generation length limit for answer accuracy (tokens)
    matcher: str = "numeric"  # answer check: "exact", "numeric", or "module.path:function"
    sampling_temperature: float = 0.0  # temperature of answer generation; 0 = greedy (loss.temperature is the KD loss's)
    top_p: float = 1.0  # nucleus sampling mass; 1 = off
    samples: int = 1  # answers sampled per problem (accuracy = pass@1 over them); > 1 needs sampling_temperature > 0
    pass_k: list[int] | None = None  # k of the reported pass@k, each <= samples; None = 1 and samples
    step_checker: str | None = None  # "module.path:function" (steps, prompt, reference) -> one bool per reasoning step; None = no step accuracy
    latency: bool = False  # also time generation (first token, per-token decode, batch 1 and N) and its peak memory
    data: str | None = None  # external eval set: JSONL/Parquet file, folder of them, or hub dataset id; None = the store's held-out split
    question_field: str = "question"  # field of eval.data holding the question: text, or a list of role/content turns
    answer_field: str = "answer"  # field of eval.data holding the reference; the text after its last "####" when present (GSM8K)
    reasoning: bool = True  # the model answers after a think block (the answer follows the last think close); false: a plain instruct model, its whole generation up to EOS is the answer

    def __post_init__(self):
        _check(self.batches >= 1, f"batches={self.batches} must be >= 1")
        _check(self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be >= 1 token")
        _check(
            self.matcher in ("exact", "numeric") or ":" in self.matcher,
            f"matcher={self.matcher!r} is not allowed; use 'exact', 'numeric' or 'module.path:function'",
        )
        _check(self.sampling_temperature >= 0.0,
               f"sampling_temperature={self.sampling_temperature} must be >= 0 (0 = greedy)")
        _check(0.0 < self.top_p <= 1.0, f"top_p={self.top_p} must be in (0, 1]")
        _check(self.samples >= 1, f"samples={self.samples} must be >= 1 (answers sampled per problem)")
        _check(self.samples == 1 or self.sampling_temperature > 0,
               f"samples={self.samples} at sampling_temperature=0 (greedy) draws the same answer {self.samples} "
               f"times; set eval.sampling_temperature > 0 (e.g. 0.7) or eval.samples=1")
        ks = self.pass_k
        _check(ks is None or (bool(ks) and all(1 <= k <= self.samples for k in ks)),
               f"pass_k={ks} must be null (1 and samples) or a non-empty list of k with 1 <= k <= samples={self.samples}")
        _check(self.step_checker is None or ":" in self.step_checker,
               f"step_checker={self.step_checker!r} must be 'module.path:function' or null")
        _check(self.data != "", "data='' names no eval set; use null for the store's held-out split")
        for name in ("question_field", "answer_field"):
            _check(bool(getattr(self, name)), f"{name}='' names no field; name a column of eval.data")

    @property
    def ks(self) -> list[int]:
        """The k of the reported pass@k: pass_k, or 1 and samples."""
        return sorted(set(self.pass_k)) if self.pass_k else sorted({1, self.samples})


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    prompts: str | None = None  # prompts to sample traces for: JSONL/Parquet file, folder of them, or hub dataset id
    prompt_field: str = "prompt"  # field holding the prompt: text, or a list of role/content turns
    reference_field: str | None = "answer"  # field holding the reference answer; None = no verification (keep=all)
    out: str | None = None  # output folder: traces/shard-*.jsonl (r1 traces), done/ marks, report.json
    samples_per_prompt: int = 4  # samples drawn per prompt (n of pass@k)
    temperature: float = 0.7  # sampling temperature; 0 = greedy (then every sample of a prompt is the same)
    top_p: float = 0.95  # nucleus sampling mass; 1 = off
    max_new_tokens: int = 1024  # generation length limit per sample (tokens); a sample without the think close is dropped
    batch_size: int = 64  # rows (prompt x sample) per generation batch
    bucket: int = 128  # prompts are left-padded to a multiple of this (one compile per padded length)
    prompts_per_shard: int = 256  # prompts per output shard: the unit of writing, resuming and splitting over processes
    seed: int = 0  # sampling seed; a sample's key depends on (seed, prompt index, sample index) only
    max_reasoning_tokens: int | None = None  # drop samples whose reasoning is longer (tokens); None = no limit
    language_mix: bool = False  # drop samples whose reasoning mixes scripts (language_mix_threshold)
    language_mix_threshold: float = 0.02  # share of the reasoning's letters outside its main script that counts as mixed
    keep: str = "correct"  # which samples are written: all, correct, first_correct or shortest_correct (per prompt)
    reasoning: bool = True  # the teacher reasons in a think block before its answer (R1); false: a plain instruct teacher, its whole response up to EOS is the answer, written with empty reasoning

    def __post_init__(self):
        _check_choice("keep", self.keep, KEEP)
        _check(self.reference_field is not None or self.keep == "all",
               f"keep={self.keep!r} needs verified samples: set reference_field (the reference answer's field) "
               f"or keep='all'")
        _check(self.samples_per_prompt >= 1, f"samples_per_prompt={self.samples_per_prompt} must be >= 1")
        _check(self.temperature >= 0.0, f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        _check(0.0 < self.top_p <= 1.0, f"top_p={self.top_p} must be in (0, 1]")
        for name in ("max_new_tokens", "batch_size", "bucket", "prompts_per_shard"):
            _check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        _check(self.seed >= 0, f"seed={self.seed} must be >= 0")
        high = self.max_reasoning_tokens
        _check(high is None or high >= 1, f"max_reasoning_tokens={high} must be null (no limit) or >= 1")
        _check(0.0 <= self.language_mix_threshold < 1.0,
               f"language_mix_threshold={self.language_mix_threshold} must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class Config:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)  # naming, output folder, seed, logging
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)  # device mesh axis sizes
    student: StudentSource = dataclasses.field(default_factory=StudentSource)  # the model being trained
    # The teacher is only run forward, so it is kept in bfloat16 by default.
    teacher: TeacherSource = dataclasses.field(default_factory=TeacherSource)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # traces, tokenization and packing
    precompute: PrecomputeConfig = dataclasses.field(default_factory=PrecomputeConfig)  # teacher top-K pass
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)  # distillation loss
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)  # AdamW and learning-rate schedule
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  # step counts and batch sizes
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)  # saving and resuming
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)  # held-out loss and answer accuracy
    generate: GenerateConfig = dataclasses.field(default_factory=GenerateConfig)  # teacher-written traces

    def __post_init__(self):
        online = self.teacher.mode == "online"
        if self.data.top_k == 0 and self.loss.soft and not online:
            raise ConfigError(f"data.top_k=0 (tokens only, no teacher log-probs) needs loss.alpha=0 (hard labels "
                              f"only), not {self.loss.alpha}; set loss.alpha=0, data.top_k >= 1, or "
                              f"teacher.mode=online (the teacher runs in the train step)")
        if not online and self.loss.hidden.on:
            raise ConfigError("loss.hidden.weight > 0 aligns the student's hidden states to the teacher's, which "
                              "needs the teacher in the train step: set teacher.mode=online (or loss.hidden.weight=0)")
        if self.train.on_policy.on and not online:
            raise ConfigError(f"train.on_policy.fraction={self.train.on_policy.fraction} trains on sampled completions "
                              f"that no store holds: the teacher must grade them in the train step; set "
                              f"teacher.mode=online (or train.on_policy.fraction=0)")
        if self.data.format.kind == "text" and self.loss.beta > 0:
            raise ConfigError(f"loss.beta={self.loss.beta} weights a loss over reasoning steps, and "
                              f"data.format.kind=text documents have none (every token is a plain target); set "
                              f"loss.beta=0, or train on reasoning traces (data.format.kind r1, messages or sharegpt)")
        if self.train.on_policy.on and self.loss.online_sampled and self.train.on_policy.divergence != "forward_kl":
            raise ConfigError(f"train.on_policy.divergence={self.train.on_policy.divergence!r} with "
                              f"loss.online_sampled={self.loss.online_sampled}: on-policy steps take their soft loss "
                              f"from train.on_policy.divergence, and the teacher's draws give an unbiased loss only "
                              f"for forward_kl; set train.on_policy.divergence=forward_kl (or loss.online_sampled=0)")
        if self.train.on_policy.on:
            new = self.train.on_policy.max_new_tokens
            _check(new < self.data.seq_len,
                   f"train.on_policy.max_new_tokens={new} leaves no room for a prompt in data.seq_len="
                   f"{self.data.seq_len} (the prompt plus the completion must fit one packed row); lower it or "
                   f"raise data.seq_len")
            pps = self.train.on_policy.prompts_per_step or self.train.global_batch_size
            _check(pps % self.train.global_batch_size == 0,
                   f"train.on_policy.prompts_per_step={pps} must be a multiple of train.global_batch_size="
                   f"{self.train.global_batch_size} (the sampling batch is sharded like the train batch)")
        if not online and self.loss.online_top_k:
            raise ConfigError(f"loss.online_top_k={self.loss.online_top_k} is for teacher.mode=online; offline, K is "
                              f"the store's (data.top_k at precompute)")
        if not online and self.loss.online_sampled:
            raise ConfigError(f"loss.online_sampled={self.loss.online_sampled} is for teacher.mode=online; offline, "
                              f"store draws with precompute.targets=sampled")

    @property
    def run_dir(self) -> str:
        return os.path.join(self.run.output_dir, self.run.name)

    @property
    def tokenizer(self) -> str:
        """data.tokenizer, or the teacher's folder / hub id when it is not set."""
        path = self.data.tokenizer or self.teacher.hf_path
        if not path:
            raise ConfigError("no tokenizer: set data.tokenizer (a folder or hub id) or teacher.hf_path")
        return path

    @property
    def tokenizer_revision(self) -> str | None:
        """The hub revision `tokenizer` is read at: the teacher's (teacher.revision) when it is the
        teacher's folder or hub id; None (the default branch) for data.tokenizer."""
        return None if self.data.tokenizer else self.teacher.revision

    @property
    def checkpoint_dir(self) -> str:
        """checkpoint.dir, or <run_dir>/checkpoints (absolute: Orbax wants one)."""
        return self.checkpoint.dir or os.path.join(os.path.abspath(self.run_dir), "checkpoints")
