"""Every `python -m kd_jax.bench` sub-command in a tiny CPU mode: it runs, writes JSON with the
expected keys and sane values; the FLOP formulas against a hand count; the PyTorch baseline's loss
against kd_jax's on the same numbers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.bench.__main__ import main
from kd_jax.bench.presets import PRESETS, synthetic_batch
from kd_jax.core import losses
from kd_jax.models import DecoderConfig, config_from_hf, flops


def _run(tmp_path, name, *argv):
    out = tmp_path / f"{name}.json"
    main([name, *argv, "--out", str(out)])
    return json.loads(out.read_text())


def test_flops_by_hand():
    # D=8, F=16, N=2 heads, K=1 kv head, H=4, L=3, V=32, T=10.
    cfg = DecoderConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=3, num_heads=2,
                        num_kv_heads=1, head_dim=4)
    per_layer = 8 * 2 * 4 + 2 * 8 * 1 * 4 + 2 * 4 * 8 + 3 * 8 * 16  # q, k+v, o, SwiGLU = 576
    P = 3 * per_layer + 8 * 32  # + output projection = 1984
    assert flops.matmul_params(cfg) == P == 1984
    attn_causal = 4 * 3 * 2 * 4 * (10 + 1) / 2  # QK^T + AV per query head, (T+1)/2 keys on average
    assert flops.attention_flops_per_token(cfg, 10) == attn_causal
    assert flops.train_flops_per_token(cfg, 10) == 6 * P + 3 * attn_causal
    assert flops.train_flops_per_token(cfg, 10, causal=False) == 6 * P + 12 * 3 * 2 * 4 * 10  # PaLM
    assert flops.forward_flops_per_token(cfg, 10) == 2 * P + attn_causal
    peak = 1e12
    assert flops.mfu(cfg, 10, 1000.0, peak=peak) == pytest.approx(
        (6 * P + 3 * attn_causal) * 1000.0 / (peak * jax.device_count()))
    assert flops.mfu(cfg, 10, 1000.0) is None  # CPU: no known peak
    assert flops.peak_flops_of_kind("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops_of_kind("NVIDIA H100 PCIe") == 756e12
    # Qwen2.5-1.5B: 28 layers of 46.8M matmul parameters + the tied 1536 x 151936 head.
    q15 = config_from_hf(PRESETS["qwen2.5-1.5b"])
    assert flops.matmul_params(q15) == 28 * (1536 * 1536 * 2 + 2 * 1536 * 256 + 3 * 1536 * 8960) + 1536 * 151936


def test_flops_table(tmp_path):
    result = _run(tmp_path, "flops", "--seq-len", "4096")
    rows = {r["preset"]: r for r in result["rows"]}
    assert {"qwen2.5-0.5b", "qwen2.5-1.5b"} <= rows.keys()
    r = rows["qwen2.5-1.5b"]
    assert r["train_flops_per_token"] < r["train_flops_per_token_palm"]
    assert r["tokens_per_s_at_50pct_mfu"] == pytest.approx(0.5 * 989e12 / r["train_flops_per_token"])


def test_synthetic_batch_layout():
    b = synthetic_batch(2, 64, 100, 8, seed=1, docs_per_row=2)
    assert b["inputs"].shape == (2, 64) and b["topk_ids"].shape == (2, 64, 8)
    assert set(np.unique(b["segment_ids"])) == {1, 2} and b["positions"][0, 32] == 0
    assert (b["topk_ids"] < 100).all() and all(len(set(row)) == 8 for row in b["topk_ids"].reshape(-1, 8))
    assert (np.diff(b["topk_logprobs"], axis=-1) <= 0).all() and (np.exp(b["topk_logprobs"]).sum(-1) < 1).all()
    assert not b["loss_mask"][b["role"] == 0].any() and b["loss_mask"].any() and (b["role"] == 2).any()
    again = synthetic_batch(2, 64, 100, 8, seed=1, docs_per_row=2)
    assert all(np.array_equal(b[k], again[k]) for k in b)  # deterministic: torch and jax see the same


def test_loss_bench(tmp_path):
    result = _run(tmp_path, "loss", "--shapes", "64x32x256", "--repeats", "2", "--warmup", "0")
    r = result["results"][0]
    assert r["fused"]["median_ms"] > 0 and r["naive"]["median_ms"] > 0 and len(r["fused"]["times_ms"]) == 2
    assert r["fused"]["loss"] == pytest.approx(r["naive"]["loss"], rel=1e-3)
    assert r["fused_over_naive"]["median_ms"] > 0
    # Compiled only: at a shape where the logits dominate, the fused loss needs far less memory.
    big = _run(tmp_path, "loss", "--shapes", "2048x32x4096", "--memory-only", "--chunk-size", "128")["results"][0]
    assert big["fused"]["temp_bytes"] < big["naive"]["temp_bytes"] / 4
    assert big["fused_over_naive"]["temp_bytes"] < 0.25


def test_step_bench(tmp_path):
    result = _run(tmp_path, "step", "--preset", "tiny", "--batch", "8", "--seq-len", "32", "--steps", "2",
                  "--warmup", "1", "--variant", "name=base", "--variant", "name=cudnn,attention=cudnn",
                  "run.tensorboard=false")
    base, cudnn = result["variants"]
    assert base["tokens_per_s"] > 0 and base["step_ms"] > 0 and base["compile_s"] > 0 and len(base["times_ms"]) == 2
    assert base["tokens_per_s"] == pytest.approx(8 * 32 / (base["step_ms"] / 1e3))
    assert base["mfu"] is None and base["temp_bytes"] > 0  # CPU: no peak; XLA's accounting always
    assert base["train_flops_per_token"] == flops.train_flops_per_token(
        config_from_hf(PRESETS["tiny"]), 32)
    assert "error" in cudnn  # cuDNN attention does not compile on CPU: reported, not fatal
    assert np.isfinite(result["final_loss"]) and result["devices"] == jax.device_count()


def test_step_bench_online_teacher(tmp_path):
    """Offline, online and online + hidden alignment in one run: the teacher (a wider preset, so
    alignment needs projections and its own train state) is built once and passed to the online
    steps; each variant reports speed and XLA's memory, the online ones more of it."""
    result = _run(tmp_path, "step", "--preset", "tiny", "--teacher-preset", "small", "--batch", "8", "--seq-len", "32",
                  "--steps", "1", "--warmup", "1", "--variant", "name=offline",
                  "--variant", "name=online,teacher=online", "--variant", "name=hidden,teacher=online,hidden=0.5",
                  "run.tensorboard=false", "data.top_k=4")
    offline, online, hidden = result["variants"]
    assert [v["teacher"] for v in (offline, online, hidden)] == ["offline", "online", "online"]
    assert hidden["hidden_weight"] == 0.5 and hidden["align_shape"] == [2, 64, 256] and online["align_shape"] is None
    for v in (offline, online, hidden):
        assert "error" not in v and v["tokens_per_s"] > 0 and len(v["times_ms"]) == 1
        assert v["temp_bytes"] > 0 and v["total_bytes"] > 0
    assert result["teacher_params"] > 10 * result["params"] and result["teacher_param_dtype"] == "bfloat16"
    # the teacher's bf16 weights are arguments of the online steps (sharded over data: replicated)
    assert online["argument_bytes"] > offline["argument_bytes"] + result["teacher_params"]
    assert hidden["argument_bytes"] > online["argument_bytes"]  # + the projections and their Adam moments
    assert offline["teacher_flops_per_token"] == 0 < online["teacher_flops_per_token"]
    assert online["model_tflops_per_s"] == pytest.approx(
        (online["train_flops_per_token"] + online["teacher_flops_per_token"]) * online["tokens_per_s"] / 1e12)
    assert np.isfinite(result["final_loss"])


def test_precompute_bench(tmp_path):
    result = _run(tmp_path, "precompute", "--preset", "tiny", "--batch", "8", "--seq-len", "32", "--topk", "4",
                  "--logits-chunks", "16", "--steps", "2")
    assert [v["logits_chunk"] for v in result["variants"]] == [16]
    for v in result["variants"]:
        assert v["tokens_per_s"] > 0 and v["mfu"] is None
        assert v["forward_flops_per_token"] == flops.forward_flops_per_token(config_from_hf(PRESETS["tiny"]), 32)


def test_memory_bench(tmp_path):
    """Compiled memory per attention implementation and length: XLA's numbers beside the analytic
    estimate; growth from the second length on."""
    result = _run(tmp_path, "memory", "--preset", "tiny", "--seq-lens", "64,128", "--attention", "blockwise")
    rows = result["rows"]
    assert [(r["attention"], r["seq_len"]) for r in rows] == [("blockwise", 64), ("blockwise", 128)]
    assert all(r["temp_bytes"] > 0 and r["analytic_bytes"] > 0 for r in rows)
    assert rows[0]["temp_growth_bytes_per_1k_tokens"] is None and rows[1]["temp_growth_bytes_per_1k_tokens"] > 0


def test_input_bench(tmp_path):
    result = _run(tmp_path, "input", "--synthetic", "24", "--seq-len", "128", "--batch", "2", "--batches", "3",
                  "--warmup", "1", "--topk", "4", "--vocab", "512")
    assert result["real_tokens_per_s"] > 0 and 0 < result["fill"] <= 1 and result["sequences"] == 24


def test_torch_bench(tmp_path):
    pytest.importorskip("torch")
    result = _run(tmp_path, "torch", "--preset", "tiny", "--batch", "2", "--seq-len", "32", "--steps", "2",
                  "--warmup", "1", "--topk", "4")
    assert result["loss"] == "naive"  # no liger-kernel / CUDA here: the output says so
    assert result["tokens_per_s"] > 0 and np.isfinite(result["final_loss"])


def test_torch_loss_matches_kd_jax():
    """The baseline optimizes kd_jax's objective (α = 0.5, forward KL on the renormalized top-K, T = 1)."""
    torch = pytest.importorskip("torch")
    from kd_jax.bench.torch_baseline import ALPHA, _losses
    rng = np.random.default_rng(0)
    b = synthetic_batch(2, 16, 64, 4, seed=0)
    N, D = 32, 8
    hidden = rng.normal(size=(N, D)).astype(np.float32)
    weight_VxD = rng.normal(size=(64, D)).astype(np.float32)
    mask = b["loss_mask"].reshape(-1)
    labels = b["labels"].reshape(-1)
    ids, lps = b["topk_ids"].reshape(N, 4), b["topk_logprobs"].reshape(N, 4)
    _, naive = _losses(torch)
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x))  # noqa: E731
    torch_loss = float(naive(t(hidden), t(weight_VxD), t(ids).long(), t(lps), t(np.where(mask, labels, -100)).long()))
    a, b_ = losses.token_weights(b["role"], b["reasoning_step"], b["segment_ids"], b["loss_mask"], alpha=ALPHA, beta=0.0,
                                 step_weight=1.0, answer_weight=1.0)
    jax_loss, _ = losses.kd_loss(jnp.asarray(hidden), jnp.asarray(weight_VxD.T), jnp.asarray(labels),
                                 jnp.asarray(ids), jnp.asarray(lps), a.reshape(-1), b_.reshape(-1), chunk_size=8)
    assert torch_loss == pytest.approx(float(jax_loss), rel=1e-5)
