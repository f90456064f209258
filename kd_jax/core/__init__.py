"""The libraries behind the commands: config, mesh and sharding rules, train state, step and
fused loss, checkpoints, the training loop, the teacher pass, generation, evaluation, run
directories, the dry run. Models are in kd_jax/models/, data in kd_jax/data/."""
