"""kd_jax: distill a big teacher LLM into a small student, DeepSeek-R1 style, in JAX.

Floors, imports only going down (tests/test_layout.py): the commands (`python -m kd_jax.X`: train,
precompute, generate, evaluate, export, config, demo, bench) -> the demo's recipe and task
(kd_jax/demo/) -> the stages (kd_jax/core/) -> data (kd_jax/data/) and models (kd_jax/models/) ->
the base (kd_jax/base/: config schema, loader, errors, sharding rules). docs/architecture.md
describes the whole.
"""
