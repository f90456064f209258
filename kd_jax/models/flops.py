"""Model FLOPs per token and MFU.

Matmul FLOPs only (norms, softmax, rotary and other elementwise work are left out, as usual): an
[m, k] @ [k, n] product is 2·m·k·n FLOPs, and its backward is two products of the same size (one
for each input), so training costs 3× the forward:

    forward  per token = 2·P + A
    training per token = 6·P + 3·A

P, the parameters that take part in matmuls: per layer wq, wk, wv, wo (D·N·H + 2·D·K·H + N·H·D
with GQA's K ≤ N kv heads) and the SwiGLU MLP (3·D·F), plus the output projection D·V (a matmul
whether tied or not). The input embedding is a gather and does not count; biases and norm scales
are not matmuls.

A, attention's forward: QK^T and AV, each 2·H FLOPs per query head per (query, key) pair, per
layer. A causal sequence of T tokens has T(T+1)/2 pairs, (T+1)/2 keys per query on average:

    causal (default): A = 4·L·N·H·(T+1)/2  ≈ 2·L·N·H·T
    full:             A = 4·L·N·H·T         (PaLM, appendix B: 6·P + 12·L·N·H·T for training)

MFU uses the causal count: the masked half is work a flash kernel rightly skips, so crediting it
would inflate MFU by ~10% at T = 4096 on a 1.5B model. `mfu(..., causal=False)` gives PaLM's
number for comparison with papers that use it. A packed row counts as one sequence of length T
(the segment mask's further savings are not subtracted). Rematerialized recomputation is not
model work and is not counted (that would be HFU).

MFU = training FLOPs per token × tokens/s / (peak dense bf16 FLOP/s per device × devices).
"""

from __future__ import annotations

import jax

from kd_jax.models.decoder import DecoderConfig

# Dense (no sparsity) bf16 peak FLOP/s per device, by jax `device_kind` prefix, from the vendors'
# data sheets. First match wins: the more specific prefixes come first (an H100 PCIe is not an SXM).
PEAK_FLOPS = {
    "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12, "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12, "NVIDIA H20": 148e12, "NVIDIA GH200": 989e12,
    "NVIDIA A100": 312e12, "NVIDIA L40S": 362e12, "NVIDIA L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def matmul_params(cfg: DecoderConfig) -> int:
    """P: parameters used in matmuls (the input embedding gather excluded, the output projection in)."""
    D, F, N, K, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F
    return cfg.num_layers * per_layer + D * cfg.vocab_size


def attention_flops_per_token(cfg: DecoderConfig, seq_len: int, *, causal: bool = True) -> float:
    """A: forward FLOPs of QK^T and AV per token, averaged over a sequence of `seq_len` tokens."""
    keys = (seq_len + 1) / 2 if causal else seq_len
    if cfg.sliding_window is not None:
        keys = min(keys, cfg.sliding_window)
    return 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * keys


def forward_flops_per_token(cfg: DecoderConfig, seq_len: int, *, causal: bool = True) -> float:
    """2·P + A: one forward pass (a teacher's top-K pass, an evaluation)."""
    return 2.0 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len, causal=causal)


def train_flops_per_token(cfg: DecoderConfig, seq_len: int, *, causal: bool = True) -> float:
    """6·P + 3·A: forward and backward of one training token."""
    return 6.0 * matmul_params(cfg) + 3.0 * attention_flops_per_token(cfg, seq_len, causal=causal)


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None when unknown (CPU)."""
    return peak_flops_of_kind((device or jax.devices()[0]).device_kind)


def peak_flops_of_kind(kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of a device named `kind` (jax's device_kind, torch's device name)."""
    for prefix, flops in PEAK_FLOPS.items():
        if kind.startswith(prefix):
            return flops
    return None


def mfu(cfg: DecoderConfig, seq_len: int, tokens_per_s: float, *, causal: bool = True,
        forward_only: bool = False, peak: float | None = None) -> float | None:
    """Model FLOPs utilization of training (or, `forward_only`, of a forward pass) at
    `tokens_per_s` over all devices; None when the device's peak is unknown and `peak` not given."""
    peak = peak or peak_flops()
    if peak is None:
        return None
    per_token = (forward_flops_per_token if forward_only else train_flops_per_token)(cfg, seq_len, causal=causal)
    return per_token * tokens_per_s / (peak * jax.device_count())
