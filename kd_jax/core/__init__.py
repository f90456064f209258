"""The stages behind the commands: precompute, trace generation, training (prepare, loop, step,
fused losses, state, checkpoints, on-policy sampling), evaluation and grading, run directories and
export, the dry run. They use kd_jax/data/ and kd_jax/models/, over the base in kd_jax/base/."""
