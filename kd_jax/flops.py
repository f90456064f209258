"""Model FLOPs per token and MFU.

Training FLOPs per token (PaLM, appendix B): 6·N + 12·L·H·Q·T, with N the parameters that take
part in matmuls (the input embedding is a gather and does not count; a tied output projection
does), L layers, H·Q = heads × head dim, T the sequence length; the second term is attention's
QK^T and AV in forward and backward. MFU = achieved model FLOPs per second / the devices' peak.
"""

from __future__ import annotations

import jax

from kd_jax.models.decoder import DecoderConfig

# Dense bf16 peak FLOP/s per device, by jax `device_kind` prefix (vendor data sheets).
PEAK_FLOPS = {
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def matmul_params(cfg: DecoderConfig) -> int:
    D, F, N, K, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F
    return cfg.num_layers * per_layer + D * cfg.vocab_size  # + the output projection


def train_flops_per_token(cfg: DecoderConfig, seq_len: int) -> float:
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak bf16 FLOP/s of one device, or None when unknown (CPU)."""
    kind = (device or jax.devices()[0]).device_kind
    for prefix, flops in PEAK_FLOPS.items():
        if kind.startswith(prefix):
            return flops
    return None


def mfu(cfg: DecoderConfig, seq_len: int, tokens_per_s: float) -> float | None:
    peak = peak_flops()
    return None if peak is None else train_flops_per_token(cfg, seq_len) * tokens_per_s / (peak * jax.device_count())
