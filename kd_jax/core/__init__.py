"""The stages behind the commands: precompute, trace generation, training (prepare, loop, step,
optimizer, fused losses, state, checkpoints, on-policy sampling), evaluation and grading, run
directories and export, and the equal-compute comparison. They use kd_jax/data/ and kd_jax/models/,
over the base in kd_jax/base/. Compile accounting (the dry run) is kd_jax/fit/, above them."""
