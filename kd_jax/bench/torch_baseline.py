"""PyTorch + Liger baseline: the same student shape, batch and top-K teacher tensors as `bench step`.

The student is a transformers Qwen2ForCausalLM of a `--preset` shape (random init) on the first
CUDA device (CPU when there is none), trained with AdamW and global-norm clipping like kd_jax. The
batch is `bench/presets.synthetic_batch` from the same seed, so both sides see identical inputs,
labels and teacher top-K; loss: α·mean soft + (1−α)·mean hard over the supervised tokens (role ≠
prompt), soft = forward KL from the teacher's top-K (renormalized over the K ids) to the student's
full-vocabulary softmax at T = 1 — kd_jax's default objective.

Losses (`--loss`):
  liger  liger-kernel's fused linear distillation (LigerFusedLinearDistillationBase: chunked
         logits, gradients in the forward pass, torch.compile'd chunks). Liger ships no loss that
         takes a stored top-K (its JSD/KL losses recompute teacher logits from teacher hidden
         states and a teacher head); so a subclass gives its base the top-K as the "teacher
         logits": teacher_input = [ids, log-probs] (fp32, [N, 2K]) and teacher_weight = the 2K
         identity, which its chunk loop multiplies exactly (fp32, TF32 off), and its
         distillation_loss_fn is the top-K forward KL. Written against liger-kernel 0.8.5.
         With `--liger-model` (default) RMSNorm, SwiGLU and RoPE are Liger's Triton kernels too.
  naive  plain PyTorch on materialized [N, V] logits (the CPU fallback: Liger needs Triton/CUDA).
  auto   liger when `liger_kernel` imports and CUDA is there, else naive (the output says which).

Precision (`--precision`): amp = fp32 master weights, bf16 autocast (kd_jax's numerics);
bf16 = bf16 weights and optimizer state (the lighter recipe many PyTorch setups use).
torch and transformers are imported inside `run` only; liger-kernel is not a kd_jax dependency:
the GPU run carries its wheel (kd_jax/bench/h100.sh).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from kd_jax.bench.presets import architecture, synthetic_batch

ALPHA = 0.5  # kd_jax's LossConfig default: weight of the soft loss


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, help="student shape: qwen2.5-0.5b, qwen2.5-1.5b, tiny")
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per row")
    parser.add_argument("--topk", type=int, default=64, help="teacher top-K per token")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic batch (same as bench step's run.seed)")
    parser.add_argument("--loss", default="auto", choices=("auto", "liger", "naive"))
    parser.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk of Liger's loss")
    parser.add_argument("--precision", default="amp", choices=("amp", "bf16"))
    parser.add_argument("--gradient-checkpointing", action="store_true", help="HF activation checkpointing per layer")
    parser.add_argument("--no-liger-model", dest="liger_model", action="store_false",
                        help="keep transformers' own RMSNorm/SwiGLU/RoPE")
    parser.add_argument("--no-compile", dest="compiled", action="store_false", help="Liger's chunks uncompiled")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def _losses(torch):
    """(liger_topk_loss or None, naive_topk_loss): both (hidden_NxD, weight_VxD, ids, lps, labels) -> loss."""
    F = torch.nn.functional

    def soft_terms(student_logits_CxV, ids_CxK, lps_CxK):
        log_p = torch.log_softmax(lps_CxK.float(), dim=-1)  # teacher renormalized over its K ids
        log_q = torch.log_softmax(student_logits_CxV.float(), dim=-1).gather(-1, ids_CxK)
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    def naive(hidden_NxD, weight_VxD, ids_NxK, lps_NxK, labels_N):
        logits_NxV = (hidden_NxD @ weight_VxD.t()).float()
        used = labels_N != -100
        n = used.sum().clamp_min(1)
        hard = F.cross_entropy(logits_NxV, labels_N, ignore_index=-100, reduction="sum") / n
        soft = soft_terms(logits_NxV, ids_NxK, lps_NxK).masked_fill(~used, 0.0).sum() / n
        return ALPHA * soft + (1 - ALPHA) * hard

    try:
        from liger_kernel.chunked_loss.fused_linear_distillation import (
            LigerFusedLinearDistillationBase,
        )
    except ImportError:
        return None, naive

    class TopKForwardKL(LigerFusedLinearDistillationBase):
        @staticmethod
        def distillation_loss_fn(student_logits, teacher_logits, target=None, ignore_index=-100, **_):
            K = teacher_logits.shape[-1] // 2
            ids = teacher_logits[:, :K].round().long()  # exact: fp32 identity product of integers < 2^24
            soft = soft_terms(student_logits, ids, teacher_logits[:, K:])
            return soft.masked_fill(target == ignore_index, 0.0).sum()

        @classmethod
        def forward(cls, ctx, student_input, student_weight, teacher_packed, identity, labels, chunk_size, compiled):
            return super().forward(cls=cls, ctx=ctx, student_input=student_input, student_weight=student_weight,
                                   teacher_input=teacher_packed, teacher_weight=identity, target=labels,
                                   chunk_size=chunk_size, weight_hard_loss=1 - ALPHA, weight_soft_loss=ALPHA,
                                   temperature=1.0, compiled=compiled)

        @staticmethod
        def backward(ctx, grad_output, *args):
            grad_input, grad_weight = LigerFusedLinearDistillationBase.backward(ctx, grad_output, *args)[:2]
            return grad_input, grad_weight, None, None, None, None, None

    def liger(hidden_NxD, weight_VxD, ids_NxK, lps_NxK, labels_N, *, chunk_size, compiled):
        K = ids_NxK.shape[-1]
        packed = torch.cat([ids_NxK.float(), lps_NxK.float()], dim=-1)
        identity = torch.eye(2 * K, device=hidden_NxD.device, dtype=torch.float32)
        return TopKForwardKL.apply(hidden_NxD, weight_VxD, packed, identity, labels_N, chunk_size, compiled)

    return liger, naive


def run(args) -> None:
    import torch
    import transformers

    from kd_jax.models import config_from_hf, flops

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # the identity product must stay exact
    liger_loss, naive_loss = _losses(torch)
    loss_name = args.loss if args.loss != "auto" else ("liger" if liger_loss is not None and cuda else "naive")
    if loss_name == "liger" and liger_loss is None:
        raise SystemExit("--loss liger: liger_kernel is not importable; install its wheel (kd_jax/bench/h100.sh)")
    liger_model = loss_name == "liger" and args.liger_model
    if liger_model:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2
        apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)

    arch = architecture(args.preset)
    hf_cfg = transformers.Qwen2Config(**{k: v for k, v in arch.items() if k != "model_type"},
                                      attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(args.seed)
    param_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = transformers.Qwen2ForCausalLM(hf_cfg).to(device=device, dtype=param_dtype)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01,
                                  fused=cuda)

    batch = synthetic_batch(args.batch, args.seq_len, arch["vocab_size"], args.topk, seed=args.seed)
    B, L, K = batch["topk_ids"].shape
    to = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device)  # noqa: E731
    inputs = to(batch["inputs"]).long()
    labels = to(np.where(batch["loss_mask"], batch["labels"], -100).reshape(-1)).long()
    ids = to(batch["topk_ids"].reshape(B * L, K)).long()
    lps = to(batch["topk_logprobs"].reshape(B * L, K))

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "amp"):
            hidden = model.model(input_ids=inputs).last_hidden_state.reshape(B * L, -1).to(torch.bfloat16)
        weight = model.lm_head.weight.to(torch.bfloat16)  # tied: the input embedding
        # Outside autocast: it would run the fp32 identity product (the top-K ids) in bf16.
        if loss_name == "liger":
            loss = liger_loss(hidden, weight, ids, lps, labels, chunk_size=args.chunk_size, compiled=args.compiled)
        else:
            loss = naive_loss(hidden, weight, ids, lps, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    sync()
    warmup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tps = B * L / step_s
    decoder_cfg = config_from_hf(arch)
    kind = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = flops.peak_flops_of_kind(kind)
    per_token = flops.train_flops_per_token(decoder_cfg, L)
    result = dict(benchmark="torch", device=kind, torch=torch.__version__, transformers=transformers.__version__,
                  liger=_liger_version() if loss_name == "liger" else None, loss=loss_name, liger_model=liger_model,
                  precision=args.precision, gradient_checkpointing=args.gradient_checkpointing,
                  chunk_size=args.chunk_size if loss_name == "liger" else None, preset=args.preset, batch=B,
                  seq_len=L, topk=K, seed=args.seed, params=sum(p.numel() for p in model.parameters()),
                  step_ms=step_s * 1e3, times_ms=[t * 1e3 for t in times], warmup_s=warmup_s, tokens_per_s=tps,
                  train_flops_per_token=per_token, model_tflops_per_s=per_token * tps / 1e12,
                  mfu=None if peak is None else per_token * tps / peak,
                  peak_bytes_allocated=torch.cuda.max_memory_allocated() if cuda else None,
                  peak_bytes_reserved=torch.cuda.max_memory_reserved() if cuda else None, final_loss=float(loss.detach()))
    note = "" if loss_name == "liger" else "  (naive PyTorch loss: liger-kernel/CUDA not available)"
    print(f"device={kind} torch={torch.__version__} preset={args.preset} B x L={B}x{L} K={K} loss={loss_name}"
          f" precision={args.precision} liger_model={liger_model}{note}")
    mfu = "-" if result["mfu"] is None else f"{result['mfu']:.1%}"
    mem = "-" if not cuda else f"{result['peak_bytes_allocated'] / 2**30:,.2f}"
    print(f"step {result['step_ms']:,.1f} ms  {tps:,.0f} tokens/s  MFU {mfu}  peak allocated {mem} GiB  "
          f"loss {result['final_loss']:.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


def _liger_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("liger-kernel")
    except PackageNotFoundError:
        return None
