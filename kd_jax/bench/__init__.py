"""Benchmarks, one module per sub-command of `python -m kd_jax.bench` (`loss`: fused vs naive KD loss)."""
