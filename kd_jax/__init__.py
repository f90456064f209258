"""kd_jax: distill a big teacher LLM into a small student, DeepSeek-R1 style, in JAX.

Two floors. The commands are the top-level modules, each a `python -m kd_jax.X` target that parses
its flags and calls libraries: train, precompute, evaluate, export, demo, config, and the bench
package. The libraries are the subfolders: core/ (config, sharding, state, step, losses, loop,
checkpoint, teacher, generate, evaluation, runs, dry run), models/ and data/. A library never
imports a command, and no command imports another (tests/test_layout.py). docs/architecture.md
describes the whole.
"""
